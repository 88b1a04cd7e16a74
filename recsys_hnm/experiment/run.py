"""An experiment from its config: data, split, sampler, model, training, evaluation, tracking.

The batch pipelines and the CLI are thin layers over ``train``, ``evaluate_run`` and
``recommend``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import yaml

from ..config import AUTO, PER_POSITION, ConfigError, ExperimentConfig, auto_keys, config_from_dict, with_values
from ..data import (
    DataError, Interactions, Split, copurchase_graph, last_basket_out, leave_last_out, load_dataset, load_fixed_split, ratio_split, read_table,
    time_split,
)
from ..data.profile import DataProfile, describe_profile, profile_split, suggest_settings
from ..evaluation import EXCLUDE, Evaluator, mask_known, metric_means, phase_counts, popularity_scorer, top_k
from ..sampling.ann import AnnSampler
from ..sampling.mixture import FULL
from ..index import IndexOptions
from ..training.refresh import IndexRefresh
from ..training.distributed import (
    Cluster, PeerFailures, ShardedTwoTower, check_supported, cluster_from_env, embedding_optimizer_for,
)
from ..ops.io import atomic_write
from ..ops.memory import available_bytes, gigabytes
from ..ops.sparse import SortedPairs
from ..models import FeatureBuilder, HistoryEncoder, TowerSizes, TwoTower, model_scorer
from ..baselines.item_item import GRIDS, WEIGHTS, ItemItemHead, fit_weights, head_kinds, named, standardize
from ..baselines import grid_points
from ..sampling import (
    CategorySampler, CopurchaseSampler, FullCatalog, InBatchSampler, KnownPositives, MixtureSampler, PopularitySampler,
    UniformSampler,
)
from ..sampling.static import StaticSampler
from ..sampling.diagnostics import NegativeDiagnostics
from ..tracking.pyfunc import log_recommender, lookup_ids
from ..tracking import (
    MlflowLogger, TrackingError, download, get_run, git_commit, log_metrics, log_per_user, tracked_run, tracking_uri,
)
from ..training import Checkpoint, CheckpointError, EarlyStopping, Objective, Trainer, TrainOptions, load_checkpoint, load_torch_file
from ..mining import MemoryBank

log = logging.getLogger(__name__)


# -- data ---------------------------------------------------------------------------------------

def load_data(config: ExperimentConfig) -> tuple[Interactions, Split]:
    d = config.data
    options = {"duplicates": d.duplicates, "unknown_items": d.unknown_items}
    if d.train:
        return load_fixed_split(d.train, d.valid, d.test, d.items, **options)
    data = load_dataset(d.dataset, min_rating=d.min_rating, **options)
    split = split_data(config, data)
    empty = [phase for phase in ("train", "valid", "test") if not len(split.phase(phase))]
    if empty:  # checked before any run: a model selected on nothing and scored on nothing reports NaN
        sizes = ", ".join(f"{p} {len(split.phase(p)):,}" for p in ("train", "valid", "test"))
        side = "before" if not len(split.train) else "after"
        hint = f" (data.valid_start / data.test_start {side} every event?)" if d.split == "time" else ""
        raise ConfigError(f"data.split={d.split}: the {' and '.join(empty)} {'phases are' if len(empty) > 1 else 'phase is'} "
                          f"empty ({sizes} events){hint}")
    return data, split


def split_data(config: ExperimentConfig, data: Interactions) -> Split:
    """``data`` split as ``config.data.split`` says."""
    d = config.data
    if d.split == "leave_last_out":
        return leave_last_out(data)
    if d.split == "last_basket":
        return last_basket_out(data)
    if d.split == "ratio":
        return ratio_split(data, d.ratios, by_time=d.ratio_by_time, seed=d.seed)
    return time_split(data, d.valid_start, d.test_start)


# -- components ---------------------------------------------------------------------------------

def item_side_features(config: ExperimentConfig, data: Interactions) -> sp.csr_matrix:
    """What the item tower reads beside the id: categories, then the configured item features."""
    try:
        _, attributes = data.item_attributes(config.data.item_features, config.data.numeric_bins)
    except DataError as e:
        raise ConfigError(f"data.item_features: {e}") from e
    return sp.hstack([data.item_categories, attributes], format="csr")


def build_model(config: ExperimentConfig, data: Interactions) -> TwoTower:
    unresolved = auto_keys(config)
    if unresolved:
        raise ConfigError(f"{unresolved} are 'auto': train() resolves them from the data; to build components by hand, "
                          "call choose_settings(config, data, split) first")
    m = config.model
    if m.repeat and m.train_history != "causal":  # an "auto" history may resolve to all
        raise ConfigError(f"model.repeat: the repeat term is trained on what came before each positive; it needs "
                          f"model.train_history=causal, not {m.train_history!r}")
    n_side = item_side_features(config, data).shape[1]
    torch.manual_seed(config.train.seed)
    try:
        encoder = HistoryEncoder(m.history_encoder, m.history_len, m.history_decay, m.last_k, m.attention_layers,
                                 m.attention_heads, m.attention_dropout)
        return TwoTower(TowerSizes(data.n_users, data.n_items, n_side), dim=m.dim, hidden=m.hidden, temperature=m.temperature,
                        learn_temperature=m.learn_temperature, item_bias=m.item_bias, encoder=encoder, repeat=m.repeat)
    except ValueError as e:  # what the config's checks cannot see alone (a learned temperature's start, dim by heads)
        raise ConfigError(f"model: {e}") from e


def build_features(config: ExperimentConfig, data: Interactions, train_events) -> FeatureBuilder:
    """The towers' inputs; ``train_events`` are the events the model trains on (histories, and
    which items are cold)."""
    m = config.model
    return FeatureBuilder(train_events, data.n_users, item_side_features(config, data), m.history_len, m.history_decay, m.user_id,
                          cold_items="features" if m.item_id_dropout > 0 else "id")


def training_stream(config: ExperimentConfig, train: pd.DataFrame, n_items: int) -> np.ndarray:
    """How often each item is a training positive: the frequency in-batch negatives (and a
    memory bank's entries) are drawn at. Per position, every event but each user's first."""
    counts = np.bincount(train["item"].to_numpy(), minlength=n_items)
    if config.model.train_history == PER_POSITION:
        first = train.sort_values(["user", "timestamp"] if "timestamp" in train.columns else ["user"], kind="stable")
        counts = counts - np.bincount(first.drop_duplicates("user")["item"].to_numpy(), minlength=n_items)
    return counts


def build_sampler(config: ExperimentConfig, data: Interactions, split: Split) -> MixtureSampler:
    """The configured mixture; a source the data cannot serve is refused naming its key."""
    s = config.sampler
    counts = np.bincount(split.train["item"].to_numpy(), minlength=data.n_items)
    wanted = {k for k, w in s.mixture.items() if w > 0}
    fallbacks = {  # built only when a source declares one
        "uniform": lambda: UniformSampler(data.n_items, shared=False),
        "popularity": lambda: PopularitySampler(counts, s.popularity.alpha, shared=False),
    }
    components: dict = {"in_batch": InBatchSampler(training_stream(config, split.train, data.n_items)), "uniform": UniformSampler(data.n_items, shared=s.uniform.shared),
                        "full": FullCatalog(data.n_items)}
    if "popularity" in wanted:
        components["popularity"] = PopularitySampler(counts, s.popularity.alpha, shared=s.popularity.shared)
    if "category" in wanted:
        if data.n_categories == 0:
            raise ConfigError("sampler.mixture.category: the data has no item categories")
        try:
            components["category"] = CategorySampler(data.item_categories, fallbacks[s.category.fallback](), counts, s.category.alpha)
        except ValueError as e:
            raise ConfigError(f"sampler.category: {e}") from e
    if "copurchase" in wanted:
        c = s.copurchase
        source = c.source
        if source == "auto":
            source = "basket" if data.has_baskets else "session" if data.has_time else "history"
        try:
            graph = copurchase_graph(split.train, data.n_items, source=source, session_gap_s=c.session_gap_s,
                                     window=c.window, min_count=c.min_count, top_n=c.top_n)
            components["copurchase"] = CopurchaseSampler(graph, fallbacks[c.fallback](), c.beta)
        except (DataError, ValueError) as e:
            raise ConfigError(f"sampler.copurchase: {e}") from e
    if "static" in wanted:
        components["static"] = StaticSampler(_static_negatives(s.static.path, data), data.n_items, fallbacks[s.static.fallback]())
    if "ann" in wanted:
        try:
            components["ann"] = AnnSampler(data.n_items, data.n_users, s.ann.anchor, s.ann.window)
        except ValueError as e:
            raise ConfigError(f"sampler.ann.window: {e}") from e
    return MixtureSampler(
        components, s.mixture, s.num_negatives, KnownPositives(split.matrix("train")),
        logq=s.logq, known_policy=s.known_positives, hard=set(s.hard), per_row_negatives=s.per_row_negatives,
        hard_correction=s.hard_correction,
    )


def step_memory(config: ExperimentConfig, sampler: MixtureSampler, data: Interactions) -> int:
    """Bytes a training step holds at its peak, roughly: the tables with their gradients and
    Adam states, the item tower's activations over the step's candidates, and the rows x
    candidates logits (with their gradient, softmax, logQ and mask)."""
    m, t = config.model, config.train
    rows = t.batch_size * (m.history_len if m.train_history == PER_POSITION else 1)
    shared = per_row = 0
    for name, count in sampler.counts.items():
        if name == FULL:  # per position the exact softmax runs in chunks of the catalog
            shared += 0 if m.train_history == PER_POSITION else data.n_items
        elif sampler.components[name].shared:
            shared += count
        else:
            per_row += count
    shared += rows if sampler.use_in_batch else 0
    width = 3 * m.dim + sum(m.hidden)  # one candidate's activations through the item tower
    tables = 16 * (data.n_users + data.n_items + data.n_categories) * m.dim  # weights, gradients, two Adam moments
    tower = 3 * 4 * (min(shared + rows * per_row, data.n_items + rows) * width + rows * per_row * m.dim)
    return tables + tower + 17 * rows * (shared + per_row)


def check_memory(config: ExperimentConfig, sampler: MixtureSampler, data: Interactions) -> None:
    """Refuse, before any run, a step that cannot fit in this machine's available memory."""
    need, free = step_memory(config, sampler, data), available_bytes()
    if need > free:
        s, t = config.sampler, config.train
        raise ConfigError(f"sampler.num_negatives: a training step needs about {gigabytes(need)} (train.batch_size "
                          f"{t.batch_size} x {s.num_negatives:,} negatives, model.dim {config.model.dim}, "
                          f"{data.n_items:,} items), more than the {gigabytes(free)} available; lower sampler.num_negatives, "
                          "sampler.per_row_negatives or train.batch_size")


def _static_negatives(path: str, data: Interactions) -> pd.DataFrame:
    """A mined-negatives file as index columns user, item, negative; an id the data does not
    know is refused, naming the file and column (a pipeline's ``mined:`` step may make the file,
    so it is looked for here, before the run, not when the config is read)."""
    if not Path(path).is_file():
        raise ConfigError(f"sampler.static.path: file not found: {path}")
    frame = read_table(path)
    missing = [c for c in ("user_id", "item_id", "negative_id") if c not in frame.columns]
    if missing:
        raise ConfigError(f"sampler.static.path: {path} lacks column(s) {missing}; columns present: {list(frame.columns)}")
    try:
        return pd.DataFrame({"user": data.users.to_index(frame["user_id"], f"user_id of {path}"),
                             "item": data.items.to_index(frame["item_id"], f"item_id of {path}"),
                             "negative": data.items.to_index(frame["negative_id"], f"negative_id of {path}")})
    except DataError as e:
        raise ConfigError(f"sampler.static.path: {e}") from e


def check_item_item(config: ExperimentConfig, data: Interactions) -> None:
    """Refuse, before any run, an EASE head whose dense items x items inverse is over the limit."""
    ii = config.item_item
    if ii.weight != 0 and ii.kind == "ease" and data.n_items > ii.ease_max_items:
        raise ConfigError(f"item_item.kind: ease on {data.n_items:,} items needs a dense {data.n_items:,} x {data.n_items:,} "
                          f"inverse ({gigabytes(8 * data.n_items ** 2)}), above item_item.ease_max_items="
                          f"{ii.ease_max_items:,}; use kind auto, itemknn or mostpop, or raise item_item.ease_max_items")


def heldout_positives(split: Split) -> KnownPositives:
    """Validation and test items of each user: a negative among them is a false negative."""
    m = (split.matrix("valid") + split.matrix("test")).tocsr()
    return KnownPositives(m)


def describe_mix(config: ExperimentConfig) -> str:
    return ",".join(f"{k}={w:g}" for k, w in config.sampler.mixture.items() if w > 0)


# -- training -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_id: str
    test: dict[str, float]
    mostpop_test: dict[str, float]
    history: list[dict[str, float]]
    summary: list[str] = field(default_factory=list)  # the profile, the settings chosen and why, warnings
    config: ExperimentConfig | None = None  # as trained: "auto" settings resolved


def checkpoint_path(config: ExperimentConfig, run_id: str, rank: int = 0) -> Path:
    """Each run keeps its own checkpoint: a new run never overwrites one that can be resumed.
    In distributed training each rank writes its own shards (rank 0 the usual ``last.pt``)."""
    return Path(config.train.checkpoint_dir) / config.name / run_id / ("last.pt" if rank == 0 else f"last.rank{rank}.pt")


def latest_checkpoint(config: ExperimentConfig) -> Path:
    """The most recently written checkpoint of a run of this config's name."""
    found = sorted(Path(config.train.checkpoint_dir, config.name).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from under {Path(config.train.checkpoint_dir, config.name)}")
    return found[-1]


def train(config: ExperimentConfig, *, resume: bool | str = False, extra_callbacks=None) -> TrainResult:
    """Train, evaluate and track one experiment; returns its MLflow run id and test metrics.

    ``resume``: True continues the most recently checkpointed run of this config's name, a run
    id continues that run; its checkpoint must have been written for the same config (only
    ``train.epochs`` may grow).

    Under torchrun (WORLD_SIZE > 1) every rank calls this: the tables are sharded by TorchRec's
    DistributedModelParallel, rank 0 alone tracks the run, evaluates and logs the unsharded
    model, and the other ranks return empty test metrics."""
    torch.set_num_threads(config.train.num_threads)
    cluster = cluster_from_env()
    if cluster is None:
        return _train(config, None, resume, extra_callbacks)
    failures = PeerFailures(config.train.checkpoint_dir, config.name)
    if cluster.chief:  # ends the run FAILED with another rank's error when that stopped it
        return _train(config, cluster, resume, extra_callbacks, failures.message)
    with failures.reported(cluster.rank):
        return _train(config, cluster, resume, extra_callbacks)


def _train(config: ExperimentConfig, cluster: Cluster | None, resume: bool | str, extra_callbacks,
           peer_failure=None) -> TrainResult:
    chief, rank, world = (cluster.chief, cluster.rank, cluster.world) if cluster is not None else (True, 0, 1)
    device = cluster.device.type if cluster is not None else None
    config = with_values(config, {"train.embedding_optimizer": embedding_optimizer_for(config.train.embedding_optimizer, device)})
    check_shardable(config, device)
    state, run_id = _resumed(config, cluster, resume) if resume else (None, None)
    logged = get_run(run_id, tracking_uri(config.tracking.uri)) if resume and chief else None  # another store: refused by name
    data, split = load_data(config)
    if logged is not None and logged.data.tags.get("data_fingerprint") not in (None, data.fingerprint()):
        # refused before the run is reopened: its status and tags stay as they were
        where = config.data.train or config.data.dataset
        raise ConfigError(f"run {run_id}: its input data ({where}) changed since the run was trained; refusing to resume it")
    sampler = build_sampler(config, data, split)  # refuses what the data cannot serve, before any run
    check_memory(config, sampler, data)
    check_item_item(config, data)
    tags = {"dataset": config.data.dataset or config.data.train, "sampler_mix": describe_mix(config),
            "logq": config.sampler.logq, "git_commit": git_commit(), "config_name": config.name, "model": "two_tower",
            **config.tracking.tags}
    tracking = tracked_run(config.tracking.uri, config.tracking.experiment, config.tracking.run_name or config.name, run_id,
                           None if run_id else tags, peer_failure) if chief else contextlib.nullcontext()
    with tracking as run:
        run_id = run.info.run_id if chief else None
        run_id = cluster.broadcast(run_id) if cluster is not None else run_id
        ckpt = checkpoint_path(config, run_id, rank)
        config, selection = _settings(config, state, data, split, cluster)
        early = EarlyStopping(f"valid.{config.train.monitor}", config.train.patience)
        # order matters: logs are complete before MLflow sees them, and checkpointed state is final
        callbacks = [early, *([MlflowLogger()] if chief else []),
                     Checkpoint(ckpt, {"run_id": run_id, "config": config.to_dict(), "world": world}), *(extra_callbacks or [])]
        trainer, refresh = build_trainer(config, data, split, sampler, callbacks, ckpt.parent / "items.index", cluster=cluster)
        if trainer.sharded is not None and chief:
            mlflow.log_dict({"world_size": world, "tables": trainer.sharded.placements()}, "sharding_plan.json")
        if state is not None:
            try:
                trainer.load_state_dict(state["trainer"])
            except (RuntimeError, KeyError, ValueError) as e:
                raise ConfigError(f"checkpoint {ckpt} does not match this config: {e}") from e
        history = trainer.fit()
        train_s = sum(h["epoch_s"] for h in trainer.history)
        summary, head = selection.lines(), None  # head: the item-item head's (kind, params, weight), fit below
        if chief:
            mlflow.set_tag("best_epoch", str(early.best_epoch))
            head, best, lines = _logged_head_choice(config, data, split, trainer, early.best, cluster is None)
            summary += lines + _against_mostpop(config, split, best)
        if config.train.refit:  # model selection is done: train afresh on train + valid for the selected epochs
            trainer, refresh = _refit(config, data, split, early, ckpt.parent / "items.index", cluster)
            train_s += sum(h["epoch_s"] for h in trainer.history)
        model = trainer.unsharded_model()  # the last collective
        if not chief:
            return TrainResult(run_id, {}, {}, history, config=config)
        if head is not None:  # timed with the towers
            started = time.perf_counter()
            head = fit_head(config, *head, split)
            train_s += time.perf_counter() - started
        log_metrics({"train_s": train_s})
        test, mostpop = _log_outcome(config, data, split, model, trainer.features, refresh, trainer, head)
        _log_plot(history, config.train.monitor)
        return TrainResult(run_id, test, mostpop, history, summary, config)


def _refit(config: ExperimentConfig, data: Interactions, split: Split, early: EarlyStopping, index_path: Path,
           cluster: Cluster | None) -> tuple[Trainer, IndexRefresh | None]:
    """A fresh model trained on train + valid for the epochs early stopping selected."""
    epochs = early.best_epoch + 1 if early.best_epoch >= 0 else config.train.epochs
    refit = refit_split(split)
    trainer, refresh = build_trainer(config, data, refit, build_sampler(config, data, refit), [], index_path,
                                     epochs=epochs, validate=False, cluster=cluster)
    trainer.fit()
    if cluster is None or cluster.chief:
        log_metrics({"refit.epochs": epochs, "refit.train_loss": trainer.history[-1]["train_loss"]})
    return trainer, refresh


def check_shardable(config: ExperimentConfig, device_type: str | None) -> None:
    """Refuse what a run with tables sharded on ``device_type`` cannot do (None: one process, all
    can): called by the CLI before torchrun starts the ranks, and by every rank."""
    if device_type is None:
        return
    if config.model.train_history == PER_POSITION:
        raise ConfigError(f"model.train_history: {PER_POSITION!r} runs in one process; drop --nproc")
    check_supported(embedding_optimizer_for(config.train.embedding_optimizer, device_type), device_type)


def _resumed(config: ExperimentConfig, cluster: Cluster | None, resume: bool | str) -> tuple[dict, str]:
    """The checkpointed state a resume continues from, and its run id (every rank its own shards)."""
    chief, rank, world = (cluster.chief, cluster.rank, cluster.world) if cluster is not None else (True, 0, 1)
    state = run_id = None
    if chief:
        ckpt = latest_checkpoint(config) if resume is True else checkpoint_path(config, resume)
        state = load_checkpoint(ckpt)
        run_id = state["extra"]["run_id"]
    if cluster is not None:  # the other ranks load their own shards of the run rank 0 chose
        run_id = cluster.broadcast(run_id)
        ckpt = checkpoint_path(config, run_id, rank)
        state = state if chief else load_checkpoint(ckpt)
    _check_same_config(state["extra"]["config"], config, ckpt)
    if state["extra"].get("world", 1) != world:
        raise ConfigError(f"checkpoint {ckpt} holds the shards of {state['extra'].get('world', 1)} processes; "
                          f"resume it with that many, not {world}")
    epoch = state["trainer"]["epoch"]
    if cluster is not None and (cluster.max(epoch), -cluster.max(-epoch)) != (epoch, epoch):
        # a rank that died between two ranks' checkpoint writes: their states do not fit together
        raise ConfigError(f"run {run_id}: the ranks' checkpoints are from different epochs; it cannot be resumed")
    return state, run_id


def _settings(config: ExperimentConfig, state: dict | None, data: Interactions, split: Split,
              cluster: Cluster | None) -> tuple[ExperimentConfig, Selection]:
    """The run's "auto" settings: those a resumed run chose, or chosen now and logged (rank 0)."""
    if state is not None:  # a resumed run keeps the settings it chose
        saved = state["extra"]["config"]
        config = with_values(config, {k: saved[k.split(".")[0]][k.split(".")[1]] for k in auto_keys(config)})
        return config, Selection(profile_split(split, "valid"))
    # probes run in a single process; under torchrun every rank applies the same rules
    config, selection = choose_settings(config, data, split, probe=cluster is None)
    if cluster is None or cluster.chief:
        mlflow.set_tags(selection.tags())
        mlflow.log_dict({"profile": selection.profile.as_dict(), "choices": {k: {"value": v, "why": why} for k, (v, why) in
                         selection.choices.items()}, "probes": selection.probes}, "auto_selection.json")
        mlflow.log_params(config.flat())
        mlflow.log_text(yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
        mlflow.log_dict({"data": data.report, "split": split.summary()}, "data_report.json")
        mlflow.set_tag("data_fingerprint", data.fingerprint())
    return config, selection


def _log_outcome(config: ExperimentConfig, data: Interactions, split: Split, model: TwoTower, features: FeatureBuilder,
                 refresh: IndexRefresh | None, trainer: Trainer, head: ItemItemHead | None) -> tuple[dict[str, float], dict[str, float]]:
    """Test metrics (the model's and MostPop's), per user, the model, the item-item head, the
    served recommender and the final index, logged; returns the two sets of test metrics."""
    test_eval = Evaluator(split, "test", config.eval.ks, config.eval.chunk_size, exclude=config.eval.exclude)
    per_user = test_eval.per_user(blended(model_scorer(model, features.with_history(split.history("test"))), head,
                                          split.known("test")))
    test = metric_means(per_user)
    log_per_user(per_user, "test", data.users)
    mostpop = test_eval.evaluate(popularity_scorer(phase_counts(split, "test")))
    log_metrics(test, prefix="test.")
    log_metrics(mostpop, prefix="mostpop.test.")
    _log_model(model)
    if head is not None:
        with tempfile.TemporaryDirectory() as tmp:
            head.save(Path(tmp) / ITEM_ITEM_ARTIFACT)
            mlflow.log_artifact(str(Path(tmp) / ITEM_ITEM_ARTIFACT))
    # the serving view: every known event of a user is its history and masked
    log_recommender(model, features.with_history(split.history_all()), data, split.known_all(),
                    registered_name=config.tracking.register, head=head)
    if refresh is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "items.index"
            refresh.final_index(trainer, path)
            mlflow.log_artifact(str(path), "index")
            mlflow.log_artifact(str(path) + ".json", "index")
    return test, mostpop


ITEM_ITEM_ARTIFACT = "item_item.npz"


def blended(towers, head: ItemItemHead | None, history: sp.csr_matrix):
    """The towers' scorer, or their blend with ``head`` over ``history`` (users x items at the phase)."""
    return towers if head is None else head.scorer(towers, history)


def choose_item_item(config: ExperimentConfig, data: Interactions, split: Split, towers, towers_best: float,
                     single_process: bool = True) -> tuple[tuple | None, float, str]:
    """The item-item head of a run: ``(kind, params, weight)`` or None, the validation monitor it
    reaches, and a line that says what was chosen and why. Each kind ``head_kinds`` leaves is
    tuned on validation as the baselines are (fit on train, the best of ``GRIDS`` alone); then
    every (kind, weight) blend, ``WEIGHTS`` for an "auto" weight, is scored in one validation
    pass and the best kept, for "auto" only when its paired per-user gain over the towers alone
    exceeds twice its standard error (``choose_settings``' rule), else there is no head. Test is
    never read. Under torchrun an "auto" weight is 0: the sharded towers are not scored on
    validation here."""
    ii, monitor = config.item_item, config.train.monitor
    if ii.weight == AUTO and not single_process:
        return None, towers_best, "item_item: off (an 'auto' weight is chosen in one process, not under torchrun)"
    evaluator = Evaluator(split, "valid", config.eval.ks, config.eval.chunk_size, exclude=config.eval.exclude)
    history = split.known("valid")
    tuned = {}  # kind -> (its validation monitor alone, params, the head at weight 1)
    for kind in head_kinds(ii.kind, data.n_items, ii.ease_max_items):
        for point in grid_points(kind, GRIDS[kind]):  # first in grid order among equals
            head = ItemItemHead(kind, point, 1.0, fit_weights(kind, point, history, ii.keep))
            score = evaluator.evaluate(head.item_item_scorer(history))[monitor]
            if kind not in tuned or score > tuned[kind][0]:
                tuned[kind] = (score, point, head)
    weights = WEIGHTS if ii.weight == AUTO else (float(ii.weight),)
    sides = {kind: head.item_item_scorer(history) for kind, (_, _, head) in tuned.items()}
    blends = [(kind, w) for kind in tuned for w in weights]

    def scored(users):  # the towers once per chunk, every blend from them
        z = standardize(towers(users))
        yield "towers", z.clone()
        for kind, side in sides.items():
            z_side = standardize(side(users))
            for w in weights:
                yield (kind, w), (1.0 - w) * z + w * z_side

    runs = {name: frame[monitor].to_numpy() for name, frame in evaluator.per_user_many(["towers", *blends], scored).items()}
    base = runs.pop("towers")
    kind, weight = max(runs, key=lambda b: (runs[b].mean(), -b[1]))  # first kind, then the smaller weight, among equals
    params = tuned[kind][1]
    checked = "; ".join(f"{k}: " + ", ".join(f"{w:g} {runs[k, w].mean():.4f}" for w in weights) for k in tuned)
    tried = "; ".join(f"{named(k, p)} alone {alone:.4f}" for k, (alone, p, _) in tuned.items())
    score = float(runs[kind, weight].mean())
    if ii.weight != AUTO:
        why = f"given; validation: {monitor} {score:.4f}, towers alone {base.mean():.4f}; {tried}; weights {checked}"
    else:
        diff = runs[kind, weight] - base
        gain, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(max(len(diff), 1)))
        if not (gain > 0 and gain > 2 * se):
            return None, towers_best, (f"item_item: off (validation: no blend clearly beats the towers alone, {monitor} "
                                       f"{base.mean():.4f}; {tried}; weights {checked})")
        why = (f"validation: {monitor} {score:.4f} against {base.mean():.4f} for the towers alone (paired gain {gain:+.4f} "
               f"± {se:.4f}); {tried}; weights {checked}")
    return (kind, params, weight), score, f"item_item: {named(kind, params)} (tuned on validation) at weight {weight:g} ({why})"


def _logged_head_choice(config: ExperimentConfig, data: Interactions, split: Split, trainer: Trainer, best: float,
                        single_process: bool) -> tuple[tuple | None, float, list[str]]:
    """``choose_item_item`` for a tracked run (tags ``item_item``, ``item_item.weight``): the head,
    the validation monitor with it, the summary line."""
    if config.item_item.weight == 0:
        return None, best, []
    head, best, line = choose_item_item(config, data, split, model_scorer(trainer.model, trainer.features), best, single_process)
    mlflow.set_tags({"item_item": line[:5000], "item_item.weight": f"{head[2]:g}" if head else "0"})
    log_metrics({"item_item.valid": best})
    return head, best, [line]


def fit_head(config: ExperimentConfig, kind: str, params: dict, weight: float, split: Split) -> ItemItemHead:
    """The chosen head fit on what the towers were trained on: train, or train + valid when refit."""
    matrix = split.known("test") if config.train.refit else split.matrix("train")
    return ItemItemHead(kind, params, weight, fit_weights(kind, params, matrix, config.item_item.keep))


def _against_mostpop(config: ExperimentConfig, split: Split, best: float) -> list[str]:
    """MostPop on validation beside the model's best epoch, logged; a plain warning when the model
    does not beat it (the settings do not fit the data, or popularity is all there is)."""
    if not len(split.valid):
        return []
    m = config.train.monitor
    evaluator = Evaluator(split, "valid", config.eval.ks, config.eval.chunk_size, exclude=config.eval.exclude)
    mostpop = evaluator.evaluate(popularity_scorer(phase_counts(split, "valid")))
    log_metrics(mostpop, prefix="mostpop.valid.")
    beats = best > mostpop[m]
    mlflow.set_tag("beats_mostpop", str(beats).lower())
    if beats:
        return [f"validation {m}: model {best:.4f}, MostPop {mostpop[m]:.4f}"]
    warning = (f"WARNING: the model does not beat MostPop on validation ({m} {best:.4f} against {mostpop[m]:.4f}); "
               "recommend the popular items instead, or try model settings 'auto' with a larger auto.budget")
    mlflow.set_tag("warning", warning)
    log.warning(warning)
    return [warning]


def build_trainer(config: ExperimentConfig, data: Interactions, split: Split, sampler: MixtureSampler, callbacks: list,
                  index_path: Path, *, epochs: int | None = None, validate: bool = True,
                  cluster: Cluster | None = None) -> tuple[Trainer, IndexRefresh | None]:
    """A fresh model and its Trainer on ``split.train`` (with the index refresh callback first
    when the mix has ANN negatives); ``validate=False`` trains without validation (refit);
    ``cluster``: the model's tables sharded over its ranks."""
    model = build_model(config, data)
    t = config.train
    table_optimizer = embedding_optimizer_for(t.embedding_optimizer, cluster.device.type if cluster is not None else None)
    sharded = None
    if cluster is not None:
        check_shardable(config, cluster.device.type)
        sharded = ShardedTwoTower(model, cluster, sharding=config.distributed.sharding, table_optimizer=table_optimizer,
                                  lr=t.embedding_lr or t.lr)
    features = build_features(config, data, split.history("train"))
    evaluator = Evaluator(split, "valid", config.eval.ks, config.eval.chunk_size, exclude=config.eval.exclude) if validate else None
    diagnostics = NegativeDiagnostics(sampler.names, heldout_positives(split), data.n_items, seed=config.train.seed)
    refresh = None
    if "ann" in sampler.components:
        a = config.sampler.ann
        options = IndexOptions(n_trees=a.n_trees, search_k=a.search_k, n_jobs=a.n_jobs, seed=config.train.seed, hnsw_m=a.hnsw_m,
                               ef_construction=a.ef_construction, ef_search=a.ef_search, ivf_nlist=a.ivf_nlist,
                               ivf_nprobe=a.ivf_nprobe)
        refresh = IndexRefresh(sampler.components["ann"], sampler, exclude=split.matrix("train"), backend=a.backend,
                               refresh_every=a.refresh_every, warmup_epochs=a.warmup_epochs, ramp_epochs=a.ramp_epochs,
                               index_path=index_path, index_options=options, recall_sample=a.recall_sample, seed=config.train.seed)
        callbacks = [refresh, *callbacks]
    bank = config.sampler.memory_bank
    memory_bank = None
    if bank.size > 0:  # entries are training positives: the in-batch proposal, p(j) of the stream
        stream = InBatchSampler(training_stream(config, split.train, data.n_items))
        memory_bank = MemoryBank(bank.size, config.model.dim, None if config.sampler.logq == "none" else stream.log_p,
                                 bank.warmup_steps)
    m, s, loss = config.model, config.sampler, config.loss
    options = TrainOptions(epochs=epochs or t.epochs, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                           embedding_optimizer=table_optimizer, embedding_lr=t.embedding_lr, seed=t.seed,
                           progress=t.progress, history=m.train_history, gather_in_batch=config.distributed.gather_in_batch)
    objective = Objective(loss=loss.type, margin=loss.margin, triplet_negative=loss.triplet_negative,
                          gbce_calibration=loss.gbce_calibration, hard_loss=s.hard_loss, hard_weight=s.hard_weight,
                          false_negative_guard=s.false_negative_guard, cooccurring=_cooccurring(config, data, split),
                          select=s.select.mode, select_k=s.select.k, select_margin=s.select.margin, select_rest=s.select.rest,
                          select_rank=s.select.rank,
                          position_weight=t.position_weight, item_id_dropout=m.item_id_dropout)
    miner = refresh.mine_positions if refresh is not None and refresh.sampler.anchor == "position" else None
    trainer = Trainer(model, features, sampler, split.train, evaluator, options=options, objective=objective, callbacks=callbacks,
                      diagnostics=diagnostics, memory_bank=memory_bank, sharded=sharded, position_miner=miner)
    return trainer, refresh


# -- "auto" settings ------------------------------------------------------------------------------

@dataclass
class Selection:
    """How the "auto" settings of a run were decided: the profile, each choice with its reason,
    and the validation probes (settings, best validation monitor, epochs run)."""

    profile: DataProfile
    choices: dict[str, tuple[object, str]] = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)

    def tags(self) -> dict[str, str]:
        out = {f"profile.{k}": str(round(v, 4) if isinstance(v, float) else v) for k, v in self.profile.as_dict().items()}
        out.update({f"auto.{k}": f"{v} ({why})"[:5000] for k, (v, why) in self.choices.items()})
        return out

    def lines(self) -> list[str]:
        return [describe_profile(self.profile), *(f"{k}: {v} ({why})" for k, (v, why) in self.choices.items())]


def choose_settings(config: ExperimentConfig, data: Interactions, split: Split, *, probe: bool = True) -> tuple[ExperimentConfig, Selection]:
    """``config`` with its "auto" settings resolved: the rules' pick from the split's profile
    (data/profile.py), then, within ``auto.budget`` probes, each alternative the rules leave
    tried one setting at a time on top of the best so far (a greedy coordinate search). An
    alternative replaces the incumbent only when it beats it clearly: its paired per-user gain on
    validation (``train.monitor`` at the probes' best epochs) exceeds twice its standard error,
    so the rules stand where validation cannot tell. Probes train on ``split.train`` and score
    on validation only; the same seed gives the same choice."""
    selection = Selection(profile_split(split, "valid"))
    keys = auto_keys(config)
    if not keys:
        return config, selection
    options = {k: v for k, v in suggest_settings(selection.profile).items() if k in keys}
    chosen = {k: opts[0][0] for k, opts in options.items()}
    selection.choices = {k: (opts[0][0], f"rule: {opts[0][1]}") for k, opts in options.items()}
    alternatives = [(k, v) for k, opts in options.items() for v, _ in opts[1:]]
    budget = config.auto.budget if probe else 0
    if budget < 2 or not alternatives:
        return with_values(config, chosen), selection
    monitor = config.train.monitor
    best, curve, per_user = _probe(config, data, split, chosen, None, selection)
    tried: dict[str, list[str]] = {}
    for key, value in alternatives[:budget - 1]:
        trial = {**chosen, key: value}
        score, trial_curve, trial_users = _probe(config, data, split, trial, curve, selection)
        diff = trial_users - per_user
        gain, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(max(len(diff), 1)))
        wins = gain > 2 * se and gain > 0
        tried.setdefault(key, []).append(f"{value} {score:.4f} (paired gain {gain:+.4f} ± {se:.4f})")
        if wins:
            selection.choices[key] = (value, f"validation: {monitor} {score:.4f} against {best:.4f} for {chosen[key]}")
            best, curve, per_user, chosen = score, trial_curve, trial_users, trial
    for key, others in tried.items():  # what each choice was checked against
        value, why = selection.choices[key]
        selection.choices[key] = (value, f"{why}; checked on validation: {', '.join(others)}")
    return with_values(config, chosen), selection


class _BelowIncumbent(EarlyStopping):
    """Early stopping that also prunes a probe whose best so far is below the best probe's curve at
    the same epoch, from the third epoch on (a slower start is not a worse end)."""

    def __init__(self, monitor: str, patience: int, incumbent: list[float] | None):
        super().__init__(monitor, patience)
        self.incumbent = incumbent or []

    def on_epoch_end(self, trainer, epoch, logs):
        super().on_epoch_end(trainer, epoch, logs)
        if 2 <= epoch < len(self.incumbent) and self.best < self.incumbent[epoch]:
            trainer.should_stop = True


def _probe(config, data, split, values, incumbent, selection) -> tuple[float, list[float], np.ndarray]:
    """One probe: (best validation monitor, its curve, per-user validation monitor at the best epoch)."""
    trial = with_values(config, values)
    monitor = f"valid.{config.train.monitor}"
    stopper = _BelowIncumbent(monitor, config.train.patience, incumbent)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(with_values(trial, {"train.progress": False}), data, split, build_sampler(trial, data, split),
                                   [stopper], Path(tmp) / "items.index", epochs=config.auto.probe_epochs or config.train.epochs)
        trainer.fit()  # ends on the best epoch's weights
    per_user = trainer.evaluator.per_user(model_scorer(trainer.model, trainer.features))[config.train.monitor].to_numpy()
    curve = [h[monitor] for h in trainer.history]
    selection.probes.append({"settings": dict(values), "valid": max(curve), "epochs": len(curve)})
    log.info("auto probe %s: %s %.4f over %d epochs", values, monitor, max(curve), len(curve))
    return max(curve), curve, per_user


def _cooccurring(config: ExperimentConfig, data: Interactions, split: Split) -> SortedPairs | None:
    """Item pairs that at least ``sampler.guard_cooccurrence`` users have both of in training."""
    threshold = config.sampler.guard_cooccurrence
    if threshold <= 0:
        return None
    return SortedPairs(copurchase_graph(split.train, data.n_items, source="history", min_count=threshold))


def refit_split(split: Split) -> Split:
    """Train + validation as the training phase (validation left empty), test unchanged: the
    split a selected config is refit on."""
    keys = ["user", "timestamp"] if split.data.has_time else ["user"]
    train = pd.concat([split.train, split.valid]).sort_values(keys, kind="stable")
    return Split(split.data, train, split.valid.iloc[:0], split.test, dict(split.report))


def _check_same_config(saved: dict, config: ExperimentConfig, path: Path) -> None:
    """A key the saved config lacks (written before the key existed) had its default value."""
    now, default = config.to_dict(), ExperimentConfig().to_dict()
    ignore = {("train", "progress"), ("train", "epochs")}
    for section, values in now.items():
        if not isinstance(values, dict):
            if saved.get(section, default[section]) != values:
                raise ConfigError(f"checkpoint {path} was written for {section}={saved.get(section)!r}, not {values!r}")
            continue
        for key, value in values.items():
            was = saved.get(section, {}).get(key, default[section][key])
            if (section, key) not in ignore and was != value and value != AUTO:  # "auto": the run's own choice is kept
                raise ConfigError(f"checkpoint {path} was written for {section}.{key}={was!r}, not {value!r}")


def _log_model(model: TwoTower) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        mlflow.log_artifact(str(path))


def _log_plot(history: list[dict[str, float]], monitor: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(len(history)))
    keys = [k for k in history[0] if k.startswith("valid.") and k.split("@")[-1] == monitor.split("@")[-1]] if history else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    axes[0].set(title="train loss", xlabel="epoch")
    for k in keys:
        axes[1].plot(epochs, [h[k] for h in history], marker="o", label=k)
    axes[1].set(title="validation metrics", xlabel="epoch")
    axes[1].legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "metrics.png")
    plt.close(fig)


# -- using a finished run -----------------------------------------------------------------------

@dataclass
class LoadedRun:
    config: ExperimentConfig
    data: Interactions
    split: Split
    model: TwoTower
    features: FeatureBuilder
    head: ItemItemHead | None = None  # the item-item head blended with the towers, when the run chose one


def load_run(run_id: str, uri: str | None = None) -> LoadedRun:
    uri = tracking_uri(uri, create=False)
    logged = get_run(run_id, uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = download(run_id, "config.yaml", uri, tmp)
        try:
            config = config_from_dict(yaml.safe_load(path.read_text()), logged=True)
        except (yaml.YAMLError, ConfigError) as e:
            raise TrackingError(f"run {run_id}: its config.yaml cannot be read ({str(e).splitlines()[0]})") from e
        path = download(run_id, "model.pt", uri, tmp)
        try:
            weights = load_torch_file(path)
        except CheckpointError as e:  # the temp path means nothing to the user: name the run and artifact
            raise TrackingError(f"run {run_id}: artifact model.pt: {str(e).removeprefix(f'{path}: ')}") from e
        head = None
        if float(logged.data.tags.get("item_item.weight", 0)) > 0:
            path = download(run_id, ITEM_ITEM_ARTIFACT, uri, tmp)
            try:
                head = ItemItemHead.load(path)
            except (OSError, ValueError, KeyError) as e:
                raise TrackingError(f"run {run_id}: artifact {ITEM_ITEM_ARTIFACT} cannot be read ({e})") from e
    data, split = load_data(config)
    fingerprint = logged.data.tags.get("data_fingerprint")
    if fingerprint is not None and fingerprint != data.fingerprint():
        # e.g. a renamed id shifts every index: the weights would score other users' histories
        where = config.data.train or config.data.dataset
        raise TrackingError(f"run {run_id}: its input data ({where}) changed since the run was trained; refusing to use it")
    model = build_model(config, data)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise TrackingError(f"run {run_id}: its weights do not fit the model its config builds on this data: {e}") from e
    model.eval()
    trained_on = refit_split(split) if config.train.refit else split
    features = build_features(config, data, trained_on.history("train")).with_history(split.history("test"))
    if head is not None and head.weights.shape != head.shape(data.n_items):
        raise TrackingError(f"run {run_id}: its item-item weights are {head.weights.shape}, the data has {data.n_items:,} items")
    return LoadedRun(config, data, split, model, features, head)


def evaluate_run(run_id: str, uri: str | None = None) -> dict[str, float]:
    """Test metrics of a finished run, recomputed from its logged config and weights."""
    run = load_run(run_id, uri)
    ev = Evaluator(run.split, "test", run.config.eval.ks, run.config.eval.chunk_size, exclude=run.config.eval.exclude)
    return ev.evaluate(blended(model_scorer(run.model, run.features), run.head, run.split.known("test")))


HISTORIES = ("test", "all")


def recommend(run_id: str, k: int, users=None, uri: str | None = None, history: str = "test",
              exclude: str | None = None) -> pd.DataFrame:
    """Top-``k`` items per user (raw ids, rank 1 best). Default users: everyone with test items.

    ``history="test"``: the test-phase view used for offline evaluation: the user tower reads
    the train + validation events and those items are masked (a test item can be recommended).
    ``history="all"``: the serving view: every known event of the user (train, validation and
    test) is both the tower's history and masked, so no item the user has is returned.

    ``exclude`` (default: the run's ``eval.exclude``): ``history`` masks the items of that
    history, as above; ``train`` the training items only; ``none`` nothing, so items the user
    already has may come back (repeat purchases).

    Requested users are de-duplicated (first occurrence kept); ids the run does not know are
    reported in the log and the rest are served. The frame's ``attrs["unknown_users"]`` lists them.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, not {k}")
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, not {history!r}")
    if exclude is not None and exclude not in EXCLUDE:
        raise ValueError(f"exclude must be one of {EXCLUDE}, not {exclude!r}")
    run = load_run(run_id, uri)
    exclude = exclude or run.config.eval.exclude
    split, data = run.split, run.data
    idx, unknown = _requested_users(users, run_id, split, data)
    features, known = run.features, split.known("test")
    if history == "all":
        features, known = run.features.with_history(split.history_all()), split.known_all()
    masked = {"history": known, "train": split.matrix("train"), "none": None}[exclude]
    scorer = blended(model_scorer(run.model, features), run.head, known)
    out = top_k_frame(scorer, idx, masked, k, data, run.config.eval.chunk_size)
    out.attrs["unknown_users"] = unknown
    return out


def top_k_frame(scorer, idx: torch.Tensor, masked, k: int, data: Interactions, chunk_size: int = 1024) -> pd.DataFrame:
    """The top ``k`` unmasked items of each user index in ``idx``, in raw ids: columns
    ``user_id, item_id, rank`` (1 best) ``, score``; a user with fewer than k unmasked items
    gets fewer rows. ``masked``: a users x items matrix of items never returned, or None."""
    items, scores = [], []
    for start in range(0, len(idx), chunk_size):
        chunk = idx[start:start + chunk_size]
        s = scorer(chunk)
        if masked is not None:
            mask_known(s, masked, chunk)
        top_items, top_scores = top_k(s, k)
        items.append(top_items)
        scores.append(top_scores)
    items = torch.cat(items) if items else torch.zeros(0, min(k, data.n_items), dtype=torch.long)
    scores = torch.cat(scores) if scores else torch.zeros(0, min(k, data.n_items))
    valid = torch.isfinite(scores)
    rows = valid.nonzero()
    return pd.DataFrame({
        "user_id": data.users.to_raw(idx[rows[:, 0]].numpy()),
        "item_id": data.items.to_raw(items[valid].numpy()),
        "rank": (rows[:, 1] + 1).numpy(),
        "score": scores[valid].numpy(),
    })


def _requested_users(users, run_id: str, split: Split, data: Interactions) -> tuple[torch.Tensor, list]:
    """The indices of the requested raw user ids (default: everyone with test items),
    de-duplicated, and the ids the run does not know (logged; refused when none is known)."""
    if users is None:
        return torch.from_numpy(np.flatnonzero(np.diff(split.matrix("test").indptr) > 0)), []
    wanted = pd.Series(users).drop_duplicates()
    found = lookup_ids(pd.Index(data.users.raw), wanted)
    unknown = wanted[found < 0].tolist()
    if unknown and len(unknown) == len(wanted):
        raise DataError(f"recommend: none of the {len(wanted)} requested user ids is known to run {run_id}, e.g. {unknown[:5]}")
    if unknown:
        log.warning("recommend: %d user id(s) unknown to run %s, skipped, e.g. %s", len(unknown), run_id, unknown[:5])
    return torch.from_numpy(found[found >= 0]), unknown


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """CSV or parquet by extension, written to a temporary file and renamed (never half-written)."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"{path}: output must end in .csv or .parquet")
    if path.suffix.lower() == ".parquet":
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def summary_json(result: TrainResult, ks=(10,)) -> str:
    keys = [f"{m}@{k}" for k in ks for m in ("ndcg", "map")]
    return json.dumps({"test": {k: round(result.test[k], 4) for k in keys}, "mostpop": {k: round(result.mostpop_test[k], 4) for k in keys}})
