"""Typed experiment configuration, loaded from YAML with every key checked before training."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..baselines.item_item import KINDS as ITEM_ITEM_KINDS
from ..evaluation import EXCLUDE
from ..evaluation.metrics import METRICS, is_metric_at
from ..index.item_index import BACKENDS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IVF_NLIST, IVF_NPROBE
from ..mining.miners import SELECTIONS
from ..models.two_tower import HISTORY_ENCODERS, LEARNED_T_MAX, LEARNED_T_MIN
from ..training.trainer import HARD_LOSSES, HISTORIES, LOSSES, PER_POSITION, SELECT_RANKS, SELECT_RESTS
from ..ops.errors import ConfigError

SOURCES = ("in_batch", "uniform", "popularity", "category", "copurchase", "ann", "full", "static")


@dataclass
class DataConfig:
    dataset: str | None = "ml-latest-small"  # shipped name or a MovieLens folder
    train: str | None = None  # external fixed splits: CSV/parquet with user_id,item_id,timestamp
    valid: str | None = None
    test: str | None = None
    items: str | None = None  # item_id,category (several categories separated by |)
    min_rating: float | None = None
    duplicates: str = "first"
    unknown_items: str = "error"
    split: str = "leave_last_out"  # leave_last_out | last_basket | ratio | time
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    ratio_by_time: bool = True
    valid_start: str | None = None
    test_start: str | None = None
    seed: int = 0
    item_features: list[str] = field(default_factory=list)  # item-metadata columns the item tower reads beside categories
    numeric_bins: int = 10  # numeric item features with more values are cut into this many quantile bins


@dataclass
class ModelConfig:
    dim: int = 64
    hidden: list[int] = field(default_factory=lambda: [128])
    # "auto" (here and for item_bias, user_id, history_decay, train_history): chosen from the data's
    # profile by the rules of data/profile.py, then checked on validation within auto.budget
    temperature: float | str = 0.1
    learn_temperature: bool = False
    item_bias: bool | str = False
    history_len: int = 100
    user_id: bool | str = True  # false: no user id embedding, the history alone (cold users with a history are served)
    history_decay: float | str = 1.0  # weight of an item in the history bag: decay ** age (0 = newest), normalised; 1 = mean
    # all: every other training item of the user | causal: only items before the positive |
    # per_position (sasrec): windows of history_len events, every position predicts its next item
    train_history: str = "all"
    # bag: recency-weighted mean | learned_recency: the same with a learned weight per age (from
    # history_decay) | last_k: last k items concatenated | sasrec: self-attention
    history_encoder: str = "bag"
    last_k: int = 5  # last_k: how many of the most recent items
    attention_layers: int = 2  # sasrec: Transformer blocks, heads and dropout
    attention_heads: int = 2
    attention_dropout: float = 0.2
    item_id_dropout: float = 0.0  # > 0: item ids dropped at this rate in training, and items unseen in training scored from their categories
    # repeat-aware: items of the user's history get a learned repeat term (per-item propensity,
    # log count); its history items are exact negatives in training. For eval.exclude train / none
    repeat: bool = False


@dataclass
class PopularityConfig:
    alpha: float = 0.75
    shared: bool = True  # one set of draws for the whole batch


@dataclass
class UniformConfig:
    shared: bool = True


@dataclass
class CategoryConfig:
    alpha: float = 0.0  # within the category: 0 uniform, > 0 popularity ** alpha
    fallback: str = "uniform"  # uniform | popularity


@dataclass
class CopurchaseConfig:
    source: str = "auto"  # basket | session | history | auto (basket if present, else session)
    session_gap_s: float = 1800.0
    window: int | None = None
    min_count: int = 1
    top_n: int | None = None
    beta: float = 1.0
    fallback: str = "uniform"


@dataclass
class StaticConfig:
    path: str | None = None  # negatives mined offline (recsys-hnm mine): CSV/parquet with user_id, item_id, negative_id
    fallback: str = "uniform"  # rows whose (user, positive) the file does not list


@dataclass
class AnnConfig:
    anchor: str = "user"  # user | item
    window: list[float] = field(default_factory=lambda: [10, 100])  # ranks [lo, hi); < 1 = fraction of catalog
    refresh_every: int = 1
    warmup_epochs: int = 2
    ramp_epochs: int = 0  # share of ann negatives ramps from 0 to its weight over these epochs
    backend: str = "auto"  # auto | annoy | exact | hnsw | ivf (faiss)
    n_trees: int = 10  # annoy
    search_k: int = -1
    # hnsw: links per node, build and search beam widths: the fastest refresh measured at
    # recall@100 >= 0.98 on clustered embeddings (benchmarks/index_refresh.py; 32/80/128 took 2.5x longer)
    hnsw_m: int = HNSW_M
    ef_construction: int = HNSW_EF_CONSTRUCTION
    ef_search: int = HNSW_EF_SEARCH
    # ivf: k-means cells (0: 2 sqrt(n)) and how many of the nearest a query scans: 2.2x faster
    # than HNSW at 1,000,000 items, recall@100 0.92 on clustered embeddings (benchmarks/index_refresh.py)
    ivf_nlist: int = IVF_NLIST
    ivf_nprobe: int = IVF_NPROBE
    n_jobs: int = 2
    recall_sample: int = 200


@dataclass
class SelectConfig:
    mode: str = "none"  # online mining among each row's candidates: none | hardest | semi_hard
    k: int = 64  # hardest: keep the k highest-scoring valid candidates of each row
    margin: float = 1.0  # semi_hard: keep candidates scoring in (positive - margin, positive), logit units
    # the candidates left out: dropped, or summarised in one detached term per row, so that the
    # softmax's normaliser stays the whole pool's and the kept ones get their share of its gradient
    # (summarise), or that term with the user side's gradient of the rest too (centroid: the
    # share-weighted mean of their embeddings; only the left-out items get no gradient), or with
    # the item side's only (item_side: a probe, it keeps the pool's graph)
    rest: str = "drop"
    # hardest: by raw score (the most confusable items), or by share of the corrected normaliser,
    # logit - log_q (the candidates that hold most of the gradient)
    rank: str = "score"


@dataclass
class MemoryBankConfig:
    size: int = 0  # 0 = off; else a FIFO of the item embeddings of this many recent positives, as extra negatives
    warmup_steps: int = 200  # the bank is used from this step on (embeddings drift early)


@dataclass
class SamplerConfig:
    num_negatives: int = 256
    per_row_negatives: int | None = None  # set: per-row sources (category, copurchase, ann...) share this count, the shared ones num_negatives
    logq: str = "mixture"  # mixture | per_source | none
    mixture: dict[str, float] = field(default_factory=lambda: {"in_batch": 1.0, "uniform": 1.0})
    known_positives: str = "mask"  # mask | redraw
    # roles: sources named here are hard (mined) negatives, extras beside the corrected proposal
    # that the others form. joint: one softmax over all; separate: softmax(positive vs
    # proposal) + hard_weight * softmax(positive vs hard)
    hard: list[str] = field(default_factory=list)
    hard_loss: str = "joint"
    hard_weight: float = 1.0
    # what a hard candidate stands for: none, itself (log_q 0); source, the share of its source's
    # pool it was drawn from (that source's own log n q): see MixtureSampler
    hard_correction: str = "none"
    false_negative_guard: bool = False  # drop hard negatives scoring above the row's positive
    guard_cooccurrence: int = 0  # > 0: drop hard negatives that at least this many users have together with the positive
    select: SelectConfig = field(default_factory=SelectConfig)
    memory_bank: MemoryBankConfig = field(default_factory=MemoryBankConfig)
    uniform: UniformConfig = field(default_factory=UniformConfig)
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    category: CategoryConfig = field(default_factory=CategoryConfig)
    copurchase: CopurchaseConfig = field(default_factory=CopurchaseConfig)
    ann: AnnConfig = field(default_factory=AnnConfig)
    static: StaticConfig = field(default_factory=StaticConfig)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 0.001
    weight_decay: float = 0.0
    seed: int = 0
    num_threads: int = 1  # measured: small models run faster on 1 thread than 2 here
    patience: int = 3  # early stopping: epochs without improvement of monitor; 0 = off
    monitor: str = "ndcg@10"
    checkpoint_dir: str = "mlruns/checkpoints"
    refit: bool = False  # after selection on validation, train afresh on train + valid for the best epoch count
    progress: bool = True
    # the embedding tables' optimizer: adam (with the dense layers: every row every step);
    # sparse_adam (lazy Adam on the rows a step looked up: the cost follows the batch, not the
    # catalog; single process); or adagrad / rowwise_adagrad, which TorchRec fuses into the table
    # lookup's backward when the tables are sharded (fbgemm's CPU kernels have no fused adam).
    # auto: adam in one process, rowwise_adagrad where the tables are sharded (CPU ranks).
    # embedding_lr: the tables' learning rate (null = lr)
    embedding_optimizer: str = "auto"
    embedding_lr: float | None = None
    # per_position training: loss weight (t / (n - 1)) ** position_weight of the target at event t
    # of a user's n, mean 1 (0: every position alike; > 0 leans toward the user's latest events)
    position_weight: float = 0.0

EMBEDDING_OPTIMIZERS = ("auto", "adam", "sparse_adam", "adagrad", "rowwise_adagrad")


@dataclass
class DistributedConfig:
    # how DistributedModelParallel places the embedding tables: auto (TorchRec's planner chooses
    # among table_wise, row_wise, column_wise) or one of those for every table
    sharding: str = "auto"
    # in-batch negatives from the whole global batch (every rank's positives, their logQ that of
    # the global batch) instead of this rank's share
    gather_in_batch: bool = False


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    chunk_size: int = 1024
    # what ranking leaves out: history (every item the user had before the phase) | train (the
    # training items) | none (repeats may be recommended; metrics then also split into repeat.*
    # and explore.*). Training's known-positive mask of negatives is sampler.known_positives
    exclude: str = "history"


@dataclass
class ItemItemConfig:
    # A full-rank item-item model beside the towers (baselines/item_item.py), the two blended per
    # user: (1 - weight) z(towers) + weight z(item-item). weight: 0 = off | in (0, 1) | auto
    # (chosen on validation once the towers are trained; 0 when the blend does not clearly beat
    # the towers alone). The model's own hyperparameters (EASE's lam, ItemKNN's k) are tuned on
    # validation as the baselines are.
    weight: float | str = 0.0
    kind: str = "auto"  # ease | itemknn | mostpop | auto (ease up to ease_max_items items, else itemknn; and mostpop)
    ease_max_items: int = 30_000  # EASE's dense items x items inverse: 4 n^2 bytes
    keep: int = 1000  # weights kept per item (largest magnitudes): the sparse matrix logged and served


@dataclass
class AutoConfig:
    # validation probes among the candidates the rules leave for the "auto" settings, the rules'
    # pick included (0 or 1: the rules alone); each probe trains probe_epochs epochs (0: a whole
    # early-stopped training) and stops early once it falls below the best probe's curve
    budget: int = 0
    probe_epochs: int = 3


@dataclass
class TrackingConfig:
    uri: str | None = None  # default: sqlite:///mlruns/mlflow.db (or MLFLOW_TRACKING_URI)
    experiment: str = "recsys-hnm"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags, e.g. variant (set by compare)
    register: str | None = None  # register the logged recommender model under this name


@dataclass
class LossConfig:
    type: str = "softmax"  # softmax (sampled, with logQ) | bpr | triplet (pairwise: no logQ) | gbce
    margin: float = 1.0  # triplet, in logit units
    triplet_negative: str = "hardest"  # hardest | semi_hard
    # gbce (gSASRec's calibrated binary cross-entropy, for uniform negatives, no logQ): its t in
    # [0, 1]; 0 = plain BCE. gSASRec's recommended 0.75 at 256 negatives
    gbce_calibration: float = 0.75


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    item_item: ItemItemConfig = field(default_factory=ItemItemConfig)
    auto: AutoConfig = field(default_factory=AutoConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}`` for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and not prefix.endswith("mixture"):  # the mix stays one param
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML (or start from defaults), apply ``key.path=value`` overrides, check everything."""
    raw: dict = {} if path is None else read_yaml(path, "config file")
    sections = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"name"}  # every other top-level key is a section
    for key in sorted(sections & set(raw)):  # before overrides: a scalar section is the file's fault, not a --set's
        if not isinstance(raw[key], dict):
            raise ConfigError(f"{path}: {key}: expected a mapping (a section), got {raw[key]!r}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: {value!r} is not valid YAML ({yaml_problem(e)})") from e
        _set_path(raw, key.strip().split("."), parsed)
    config = _build(ExperimentConfig, raw, "")
    validate(config)
    return config


def read_yaml(path: str | Path, what: str) -> dict:
    """A YAML file whose top level is a non-empty mapping, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({yaml_problem(e)})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from e
    if raw is None:  # an empty file would otherwise run the defaults without a word
        raise ConfigError(f"{path}: the {what} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line (PyYAML's own message spans several, with a caret drawing)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(e, "problem", None) or str(e).splitlines()[0])


def config_from_dict(raw: dict, *, logged: bool = False) -> ExperimentConfig:
    """``logged=True`` for the config.yaml of an existing run: its name is not checked, since runs
    logged before names were restricted may hold any, and loading a run builds no path from it."""
    config = _build(ExperimentConfig, raw, "")
    validate(config, check_run_name=not logged)
    return config


def _set_path(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {k} is not a section")
    node[keys[-1]] = value


def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {[where + k for k in unknown]}; known in {prefix or 'top level'}: {sorted(names)}")
    kwargs = {}
    for name in names & set(raw):
        kwargs[name] = _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-3, 2.5E+4, .5e1


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, varg = typing.get_args(tp)
        return {str(k): _coerce(v, varg, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return _finite(value, key)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return _finite(value, key)
    if tp is str:
        if _is_date(value):  # unquoted YAML dates (valid_start: 2015-01-01) are dates: take their ISO text
            return value.isoformat()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _finite(value: Any, key: str) -> float:
    """``value`` as a finite float: every float of the config, one rule (YAML's .nan, .inf and
    -.inf, 1e999, or an integer too large for a float are refused, with the key named)."""
    import math

    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(f"{key}: {value!r} is too large for a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value if isinstance(value, str) else number!r}")
    return number


def _is_date(value: Any) -> bool:
    import datetime

    return isinstance(value, (datetime.date, datetime.datetime))


def _choice(value, allowed, key):
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")


def _positive(value, key, strict=True):
    if value is None or (value <= 0 if strict else value < 0):
        raise ConfigError(f"{key}: must be {'>' if strict else '>='} 0, got {value!r}")


NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # a file name on every OS: no separators, no leading dot


def check_name(name: str, key: str) -> None:
    """``name`` becomes a directory under train.checkpoint_dir: no ``..``, slashes or absolute paths."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"{key}: {name!r} must be a simple file name (letters, digits, '.', '_', '-'; not starting with '.')")


def check_register_name(name: str | None, key: str = "tracking.register") -> None:
    """A model registry name that MLflow (3.x) accepts, checked before training instead of after
    it: not blank; no '/', ':' (every store), '\\' or '%' (the file store); a path that
    normalises to itself (no '..', '.', '//' or leading '/'); at most 256 characters (the
    registry table's column). ``None``: nothing is registered."""
    import posixpath

    if name is None:
        return
    if not name.strip():
        raise ConfigError(f"{key}: the registered model name is empty; give a name, or leave it out to register nothing")
    bad = sorted({c for c in name if c in "/:\\%"})
    if bad:
        raise ConfigError(f"{key}: {name!r} is not a valid registered model name: it may not contain {' or '.join(map(repr, bad))}")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise ConfigError(f"{key}: {name!r} is not a valid registered model name: it would resolve to {norm!r} as a path")
    if len(name) > 256:
        raise ConfigError(f"{key}: the registered model name has {len(name)} characters; at most 256")


AUTO = "auto"


def _check_auto(m: ModelConfig) -> None:
    """A string where a number or true/false is expected must be "auto"."""
    for key in ("temperature", "history_decay", "item_bias", "user_id"):
        value = getattr(m, key)
        if isinstance(value, str) and value != AUTO:
            kind = "a number" if key in ("temperature", "history_decay") else "true or false"
            raise ConfigError(f"model.{key}: expected {kind} or 'auto', got {value!r}")
    if m.learn_temperature and m.temperature == AUTO:
        raise ConfigError("model.temperature: 'auto' picks a fixed temperature; with learn_temperature=true give its start value")


def auto_keys(c: ExperimentConfig) -> list[str]:
    """The ``model.*`` keys set to "auto", in the order they are decided."""
    return [f"model.{k}" for k in ("train_history", "history_decay", "temperature", "item_bias", "user_id")
            if getattr(c.model, k) == AUTO]


def with_values(c: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """A copy of ``c`` with ``{"section.key": value}`` set (values already of the key's type)."""
    sections: dict[str, dict] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(c, **{s: dataclasses.replace(getattr(c, s), **v) for s, v in sections.items()})


def _check_repeat(c: ExperimentConfig) -> None:
    """The repeat term scores items the user already has: it needs an evaluation that may rank
    them, and a training history that ends before each positive."""
    m = c.model
    if not m.repeat:
        return
    if c.eval.exclude == "history":
        raise ConfigError("model.repeat: eval.exclude=history masks every item the repeat term scores; "
                          "set eval.exclude=none (or train)")
    if m.train_history not in ("causal", AUTO):
        raise ConfigError(f"model.repeat: needs model.train_history=causal (what came before each positive), not {m.train_history!r}")
    if c.sampler.memory_bank.size:
        raise ConfigError("model.repeat: not with sampler.memory_bank (its split-gradient softmax has no history block)")


def _check_per_position(c: ExperimentConfig) -> None:
    """What per-position training needs, and what only it allows."""
    m, t, s = c.model, c.train, c.sampler
    _positive(t.position_weight, "train.position_weight", strict=False)
    if m.train_history != PER_POSITION:
        if t.position_weight:
            raise ConfigError(f"train.position_weight: {t.position_weight} weighs positions of model.train_history={PER_POSITION!r} only")
        if s.ann.anchor == "position" and s.mixture.get("ann", 0) > 0:
            raise ConfigError(f"sampler.ann.anchor: 'position' queries per-position outputs; it needs model.train_history={PER_POSITION!r}")
        return
    if m.history_encoder != "sasrec":
        raise ConfigError(f"model.train_history: {PER_POSITION!r} needs model.history_encoder=sasrec, not {m.history_encoder!r}")
    if t.position_weight and (c.loss.type != "softmax" or s.memory_bank.size):
        raise ConfigError("train.position_weight: position weights apply to the sampled softmax without a memory bank")
    exact = {k for k, w in s.mixture.items() if w > 0} == {"full"} and c.loss.type == "softmax"
    if exact and (s.select.mode != "none" or s.memory_bank.size):  # the chunked exact softmax has no candidates to pick or bank
        raise ConfigError(f"sampler.mixture {{full: 1}}: per-position training takes the exact softmax, chunked; "
                          f"sampler.select.mode={s.select.mode!r} and sampler.memory_bank.size={s.memory_bank.size} do not apply to it")


def _check_data(c: ExperimentConfig) -> None:
    """data.*: the files or dataset, the split and its keys."""
    d = c.data
    external = [d.train, d.valid, d.test]
    if any(external):
        if not all(external):
            raise ConfigError("data.train, data.valid and data.test must be given together")
        for key, value in (("data.train", d.train), ("data.valid", d.valid), ("data.test", d.test), ("data.items", d.items)):
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{key}: file not found: {value}")
    elif d.dataset is None:
        raise ConfigError("data.dataset: give a dataset, or data.train/valid/test files")
    _choice(d.duplicates, ("first", "last", "keep"), "data.duplicates")
    _choice(d.unknown_items, ("error", "unknown_category"), "data.unknown_items")
    _choice(d.split, ("leave_last_out", "last_basket", "ratio", "time"), "data.split")
    _positive(d.numeric_bins, "data.numeric_bins")
    if d.split == "time" and not external[0] and (d.valid_start is None or d.test_start is None):
        raise ConfigError("data.valid_start and data.test_start are needed for data.split=time")


def _check_model(c: ExperimentConfig) -> None:
    """model.*: sizes, the history encoder and its settings."""
    m = c.model
    _check_auto(m)
    for key, v in (("model.dim", m.dim), ("model.history_len", m.history_len)):
        _positive(v, key)
    if m.temperature != AUTO:
        _positive(m.temperature, "model.temperature")
        if m.learn_temperature and not LEARNED_T_MIN <= m.temperature <= LEARNED_T_MAX:
            raise ConfigError(f"model.temperature: a learned temperature starts within [{LEARNED_T_MIN}, {LEARNED_T_MAX}], "
                              f"not at {m.temperature}")
    for i, h in enumerate(m.hidden):
        _positive(h, f"model.hidden[{i}]")
    _choice(m.train_history, (*HISTORIES, AUTO), "model.train_history")
    _choice(m.history_encoder, HISTORY_ENCODERS, "model.history_encoder")
    for key, v in (("model.last_k", m.last_k), ("model.attention_layers", m.attention_layers), ("model.attention_heads", m.attention_heads)):
        _positive(v, key)
    if m.history_encoder == "last_k" and m.last_k > m.history_len:
        raise ConfigError(f"model.last_k: {m.last_k} is more than model.history_len ({m.history_len})")
    if m.history_encoder == "sasrec" and m.dim % m.attention_heads:
        raise ConfigError(f"model.attention_heads: {m.attention_heads} does not divide model.dim ({m.dim})")
    for key, v in (("model.attention_dropout", m.attention_dropout), ("model.item_id_dropout", m.item_id_dropout)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{key}: {v!r} must be in [0, 1)")
    if m.history_decay != AUTO and not 0.0 < m.history_decay <= 1.0:
        raise ConfigError(f"model.history_decay: {m.history_decay!r} must be in (0, 1] (1 = plain mean)")


def _check_sampler(c: ExperimentConfig) -> None:
    """sampler.*, loss.*, train's table optimizer, distributed.sharding."""
    s = c.sampler
    _positive(s.num_negatives, "sampler.num_negatives", strict=False)
    if s.per_row_negatives is not None:
        _positive(s.per_row_negatives, "sampler.per_row_negatives", strict=False)
    _choice(s.logq, ("mixture", "per_source", "none"), "sampler.logq")
    _choice(s.known_positives, ("mask", "redraw"), "sampler.known_positives")
    for name, w in s.mixture.items():
        _choice(name, SOURCES, "sampler.mixture (source)")
        _positive(w, f"sampler.mixture.{name}", strict=False)
    if not any(w > 0 for w in s.mixture.values()):
        raise ConfigError("sampler.mixture: all weights are zero")
    _choice(s.hard_loss, HARD_LOSSES, "sampler.hard_loss")
    _choice(s.hard_correction, ("none", "source"), "sampler.hard_correction")
    _positive(s.guard_cooccurrence, "sampler.guard_cooccurrence", strict=False)
    _positive(s.hard_weight, "sampler.hard_weight", strict=False)
    for name in s.hard:
        if s.mixture.get(name, 0) <= 0:
            raise ConfigError(f"sampler.hard: {name!r} has no weight > 0 in sampler.mixture ({sorted(s.mixture)})")
    if "full" in s.hard or not any(w > 0 for k, w in s.mixture.items() if k not in s.hard):
        raise ConfigError(f"sampler.hard: the proposal needs a source that is not hard, and 'full' cannot be hard (hard: {s.hard})")
    if s.num_negatives == 0 and any(w > 0 for k, w in s.mixture.items() if k not in ("in_batch", "full")):
        raise ConfigError("sampler.num_negatives: sampled sources need num_negatives > 0")
    if s.mixture.get("static", 0) > 0:
        if s.static.path is None:
            raise ConfigError("sampler.static.path: the static source needs the file of mined negatives")
    _choice(s.static.fallback, ("uniform", "popularity"), "sampler.static.fallback")
    _choice(s.select.mode, SELECTIONS, "sampler.select.mode")
    _positive(s.select.k, "sampler.select.k")
    _positive(s.select.margin, "sampler.select.margin")
    _choice(s.select.rest, SELECT_RESTS, "sampler.select.rest")
    _choice(s.select.rank, SELECT_RANKS, "sampler.select.rank")
    if s.select.rank == "share" and s.select.mode != "hardest":
        raise ConfigError(f"sampler.select.rank: 'share' ranks the hardest k; sampler.select.mode is {s.select.mode!r}")
    _positive(s.memory_bank.size, "sampler.memory_bank.size", strict=False)
    _positive(s.memory_bank.warmup_steps, "sampler.memory_bank.warmup_steps", strict=False)
    _choice(c.loss.type, LOSSES, "loss.type")
    if s.select.rest != "drop" and (s.select.mode == "none" or c.loss.type != "softmax" or s.memory_bank.size):
        # the bank's split softmax gives the item tower a loss without the bank: one rest term cannot serve both sides
        raise ConfigError(f"sampler.select.rest: {s.select.rest!r} keeps the softmax's normaliser whole; it needs sampler.select.mode "
                          f"hardest or semi_hard, loss.type softmax and no memory bank, not {s.select.mode!r}, "
                          f"{c.loss.type!r} and sampler.memory_bank.size={s.memory_bank.size}")
    if not 0.0 <= c.loss.gbce_calibration <= 1.0:
        raise ConfigError(f"loss.gbce_calibration: {c.loss.gbce_calibration!r} must be in [0, 1]")
    _choice(c.train.embedding_optimizer, EMBEDDING_OPTIMIZERS, "train.embedding_optimizer")
    if c.train.embedding_lr is not None:
        _positive(c.train.embedding_lr, "train.embedding_lr")
    _choice(c.distributed.sharding, ("auto", "table_wise", "row_wise", "column_wise"), "distributed.sharding")
    _choice(c.loss.triplet_negative, ("hardest", "semi_hard"), "loss.triplet_negative")
    _positive(c.loss.margin, "loss.margin", strict=False)
    _positive(s.popularity.alpha, "sampler.popularity.alpha", strict=False)
    _positive(s.category.alpha, "sampler.category.alpha", strict=False)
    _choice(s.category.fallback, ("uniform", "popularity"), "sampler.category.fallback")
    _choice(s.copurchase.source, ("auto", "basket", "session", "history"), "sampler.copurchase.source")
    _choice(s.copurchase.fallback, ("uniform", "popularity"), "sampler.copurchase.fallback")
    _positive(s.copurchase.min_count, "sampler.copurchase.min_count")
    _positive(s.copurchase.beta, "sampler.copurchase.beta", strict=False)


def _check_ann(c: ExperimentConfig) -> None:
    """sampler.ann.*: the index, its window and refresh schedule."""
    s = c.sampler
    a = s.ann
    _choice(a.anchor, ("user", "item", "position"), "sampler.ann.anchor")
    _choice(a.backend, BACKENDS, "sampler.ann.backend")
    for key in ("hnsw_m", "ef_construction", "ef_search", "ivf_nprobe"):
        _positive(getattr(a, key), f"sampler.ann.{key}")
    _positive(a.ivf_nlist, "sampler.ann.ivf_nlist", strict=False)
    if a.refresh_every < 1:
        raise ConfigError(f"sampler.ann.refresh_every: must be >= 1, got {a.refresh_every}")
    if len(a.window) != 2 or not (0 <= a.window[0] < a.window[1]):
        raise ConfigError(f"sampler.ann.window: must be [lo, hi) with 0 <= lo < hi, got {a.window}")
    _positive(a.warmup_epochs, "sampler.ann.warmup_epochs", strict=False)
    _positive(a.ramp_epochs, "sampler.ann.ramp_epochs", strict=False)
    others = [k for k, w in s.mixture.items() if w > 0 and k != "ann"]
    if s.mixture.get("ann", 0) > 0 and not others and (a.warmup_epochs > 0 or a.ramp_epochs > 0):
        raise ConfigError("sampler.mixture: ann needs another source for its warm-up epochs (or set sampler.ann.warmup_epochs=0)")
    _positive(a.n_trees, "sampler.ann.n_trees")


def _check_train_eval(c: ExperimentConfig) -> None:
    """train.*, eval.*, item_item.*, auto.*: the loop, the metrics, what is monitored and blended."""
    t = c.train
    for key, v in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("train.lr", t.lr), ("train.num_threads", t.num_threads)):
        _positive(v, key)
    _positive(t.weight_decay, "train.weight_decay", strict=False)
    _positive(t.patience, "train.patience", strict=False)
    e = c.eval
    if not e.ks:
        raise ConfigError("eval.ks: give at least one K")
    for i, k in enumerate(e.ks):
        _positive(k, f"eval.ks[{i}]")
    _positive(e.chunk_size, "eval.chunk_size")
    _choice(e.exclude, EXCLUDE, "eval.exclude")
    ii = c.item_item
    if isinstance(ii.weight, str) and ii.weight != AUTO:
        raise ConfigError(f"item_item.weight: expected a number in [0, 1) or 'auto', got {ii.weight!r}")
    if ii.weight != AUTO and not 0.0 <= ii.weight < 1.0:
        raise ConfigError(f"item_item.weight: {ii.weight!r} must be in [0, 1) (0 = off; 1 would drop the towers)")
    _choice(ii.kind, (AUTO, *ITEM_ITEM_KINDS), "item_item.kind")
    _positive(ii.ease_max_items, "item_item.ease_max_items")
    _positive(ii.keep, "item_item.keep")
    _positive(c.auto.budget, "auto.budget", strict=False)
    _positive(c.auto.probe_epochs, "auto.probe_epochs", strict=False)
    if not is_metric_at(t.monitor, e.ks):
        raise ConfigError(f"train.monitor: {t.monitor!r} must be one of {list(METRICS)} @ a K in eval.ks {e.ks}")

def validate(c: ExperimentConfig, check_run_name: bool = True) -> None:
    """Impossible values, refused with the key named: each section's checks, then those that
    span sections."""
    if check_run_name:
        check_name(c.name, "name")
    for check in (_check_data, _check_model, _check_sampler, _check_ann, _check_train_eval, _check_per_position, _check_repeat):
        check(c)
    if check_run_name:  # a logged run's config is not refused for its (already used) registry name
        check_register_name(c.tracking.register, "tracking.register")

