"""Hyperparameter search: a pipeline's ``search:`` section tunes its base config with Optuna.

    search:
      metric: ndcg@10          # validation metric, higher is better (default: the config's train.monitor)
      trials: 20               # budget in trials ...
      minutes: null            # ... and/or in minutes (whichever comes first)
      seed: 0                  # Optuna sampler (TPE) seed
      pruner: {n_startup_trials: 5, n_warmup_steps: 0}   # MedianPruner options; false: no pruning
      enqueue:                 # optional: points tried first (e.g. the base config's values)
        - {train.lr: 0.001}
      space:
        train.lr: {type: float, low: 0.0005, high: 0.02, log: true}
        model.dim: {type: categorical, choices: [32, 64, 128]}
        sampler.num_negatives: {type: int, low: 64, high: 512, step: 64}

Each trial is one MLflow child run of the pipeline's parent run (variant ``trial-<n>``, key
``search/trial-<n>``); the objective is the best validation value of ``metric`` over the run's
epochs, so the test split plays no part in the selection. Trials skip ``train.refit`` (only their
validation is read); the best config's runs keep it. The best config is then trained once
per seed (variant ``search-best``, key ``search/best/s<seed>``).

Pruned trials: the median pruner stops the training after the epoch it prunes at; the run still
evaluates on test and ends FINISHED, tagged ``search.pruned=true`` and ``search.pruned_epoch``
(every trial run carries ``search.pruned``, "false" unless pruned).

Resuming: the Optuna study lives in memory; the MLflow runs are the record. A second invocation
rebuilds the study from the FINISHED trial runs of the pipeline (their params, pruned state and
per-epoch validation values), so ``trials`` is a total over invocations; trials that failed or
were interrupted are not counted and are not re-run under the same number. ``minutes`` is per
invocation. A change of the space, the metric or the base config is refused, since the earlier
trials no longer belong to the search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ..config import ConfigError, ExperimentConfig, load_config
from ..evaluation.metrics import METRICS, is_metric_at
from ..tracking import Terminated, experiment_id, metric_name, tracking_uri
from ..tracking.runs import KEY_TAG, PARENT_TAG, child_tags, parent_run
from ..training.callbacks import Callback

log = logging.getLogger(__name__)

SPEC_KEYS = ("enqueue", "metric", "minutes", "pruner", "seed", "space", "trials")
PRUNER_KEYS = ("interval_steps", "n_min_trials", "n_startup_trials", "n_warmup_steps")
PARAM_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
              "categorical": {"type", "choices"}}
BEST_VARIANT, BEST_ARTIFACT, TRIALS_ARTIFACT = "search-best", "search_best.json", "search_trials.csv"
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # YAML 1.1 reads 5e-4 (no dot) as a string


class SearchError(RuntimeError):
    """A search that could not select a config (no trial completed)."""


# -- the search: section ----------------------------------------------------------------------------

def parse_space(space) -> dict[str, BaseDistribution]:
    """``search.space`` as Optuna distributions; a bad entry is refused naming its key."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search.space: expected a non-empty mapping of config key to a distribution, got {space!r}")
    return {str(key): _distribution(str(key), spec) for key, spec in space.items()}


def _distribution(key: str, p) -> BaseDistribution:
    where = f"search.space.{key}"
    if not isinstance(p, dict):
        raise ConfigError(f"{where}: expected a mapping with a type (float, int, categorical), got {p!r}")
    kind = p.get("type")
    if kind not in PARAM_KEYS:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {list(PARAM_KEYS)}")
    unknown = sorted(set(p) - PARAM_KEYS[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for type {kind}; known: {sorted(PARAM_KEYS[kind])}")
    if kind == "categorical":
        choices = p.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        choices = [_float_if_scientific(c) for c in choices]
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{where}.choices: {c!r} is not a single value (number, string, true/false, null)")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}.choices: {choices!r} holds a choice twice")
        return CategoricalDistribution(choices)
    low, high = (_number(p.get(b), kind, f"{where}.{b}") for b in ("low", "high"))
    if low >= high:
        raise ConfigError(f"{where}: low ({low!r}) must be < high ({high!r})")
    log_scale = p.get("log", False)
    if not isinstance(log_scale, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log_scale!r}")
    if log_scale and low <= 0:
        raise ConfigError(f"{where}.low: a log scale needs low > 0, got {low!r}")
    step = p.get("step")
    if step is not None:
        step = _number(step, kind, f"{where}.step")
        if step <= 0:
            raise ConfigError(f"{where}.step: must be > 0, got {step!r}")
        if log_scale:
            raise ConfigError(f"{where}: step and log cannot be combined")
    try:
        if kind == "int":
            return IntDistribution(low, high, log=log_scale, step=step or 1)
        return FloatDistribution(low, high, log=log_scale, step=step)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def _float_if_scientific(value):
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()) else value


def _number(value, kind: str, key: str):
    if kind == "float":
        value = _float_if_scientific(value)
    wanted = int if kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    return value


def _contains(dist: BaseDistribution, value) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in dist.choices)
    if isinstance(value, bool) or not isinstance(value, int if isinstance(dist, IntDistribution) else (int, float)):
        return False
    return dist.low <= value <= dist.high


def _corners(dist: BaseDistribution) -> list:
    """The values checked against the config before any trial: low and high, or every choice."""
    return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]


def _budget(spec: dict) -> tuple[int | None, float | None]:
    trials, minutes = spec.get("trials"), spec.get("minutes")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError(f"search.trials: expected an integer >= 1 (or null), got {trials!r}")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0):
        raise ConfigError(f"search.minutes: expected a number > 0 (or null), got {minutes!r}")
    if trials is None and minutes is None:
        raise ConfigError("search: no budget: give search.trials and/or search.minutes")
    return trials, minutes


def _pruner(value) -> optuna.pruners.BasePruner:
    if value is False:
        return optuna.pruners.NopPruner()
    if value is None:
        return optuna.pruners.MedianPruner()
    if not isinstance(value, dict):
        raise ConfigError(f"search.pruner: expected a mapping of MedianPruner options or false, got {value!r}")
    unknown = sorted(set(value) - set(PRUNER_KEYS))
    if unknown:
        raise ConfigError(f"search.pruner: unknown key(s) {unknown}; known: {list(PRUNER_KEYS)}")
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k in ("interval_steps", "n_min_trials") else 0):
            raise ConfigError(f"search.pruner.{k}: expected an integer >= {1 if k in ('interval_steps', 'n_min_trials') else 0}, got {v!r}")
    return optuna.pruners.MedianPruner(**value)


def _enqueued(value, dists: dict[str, BaseDistribution]) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise ConfigError(f"search.enqueue: expected a list of mappings of space key to value, got {value!r}")
    points = []
    for i, point in enumerate(value):
        points.append({})
        for key, v in point.items():
            if key not in dists:
                raise ConfigError(f"search.enqueue[{i}].{key}: not a key of search.space {sorted(dists)}")
            if not isinstance(dists[key], IntDistribution):
                v = _float_if_scientific(v)
            if not _contains(dists[key], v):
                raise ConfigError(f"search.enqueue[{i}].{key}: {v!r} lies outside its search.space distribution")
            points[-1][key] = v
    return points


def _sets(params: dict) -> list[str]:
    """A trial's params as ``key=value`` overrides (JSON is YAML: strings stay strings)."""
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def _names(name: str, label: str, uri: str) -> list[str]:
    """Run name, experiment and store, as ``pipeline._config`` sets them."""
    return [f"name={name}-{label}", f"tracking.experiment={json.dumps(name)}", f"tracking.run_name={json.dumps(label)}",
            f"tracking.uri={json.dumps(uri)}"]


def _load(base: str, sets: list[str], where: str) -> ExperimentConfig:
    try:
        return load_config(base, sets)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def _check(spec, base: str, name: str, uri: str, overrides: list[str]) -> dict:
    """Everything the search needs, checked before any trial (ConfigError naming the key)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"search: expected a mapping, got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"search: unknown key(s) {unknown}; known: {list(SPEC_KEYS)}")
    trials, minutes = _budget(spec)
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"search.seed: expected an integer, got {seed!r}")
    if "space" not in spec:
        raise ConfigError("search: missing key 'space'")
    dists = parse_space(spec["space"])
    pruner = _pruner(spec.get("pruner"))
    enqueue = _enqueued(spec.get("enqueue"), dists)
    config = _load(base, [*overrides, *_names(name, "search", uri)], "search: the base config")
    for key, dist in dists.items():  # each key alone at each of its ends (unknown keys, wrong types, bad values)
        for value in _corners(dist):
            _load(base, [*overrides, *_sets({key: value}), *_names(name, "search", uri)], f"search.space.{key}={value!r}")
    lows = {key: _corners(dist)[0] for key, dist in dists.items()}
    _load(base, [*overrides, *_sets(lows), *_names(name, "search", uri)], f"search.space (every key at its low/first value {lows})")
    metric = spec.get("metric", config.train.monitor)
    if not is_metric_at(metric, config.eval.ks):
        raise ConfigError(f"search.metric: {metric!r} must be one of {list(METRICS)} @ a K in eval.ks {config.eval.ks}")
    base_config = config.to_dict()
    for section in ("name", "tracking"):
        base_config.pop(section)
    base_config["train"].pop("progress")
    fingerprint = hashlib.sha256(json.dumps({
        "metric": metric, "space": {k: optuna.distributions.distribution_to_json(d) for k, d in dists.items()},
        "config": base_config}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"trials": trials, "minutes": minutes, "seed": seed, "dists": dists, "pruner": pruner, "enqueue": enqueue,
            "metric": metric, "fingerprint": fingerprint}


# -- the trials ---------------------------------------------------------------------------------------

class PruningCallback(Callback):
    """Reports the validation metric of each epoch to the Optuna trial; when the trial should be
    pruned, stops the training (the run then evaluates and ends FINISHED) and tags the run."""

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial, self.monitor = trial, monitor
        self.pruned_epoch: int | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        self.trial.report(float(logs[self.monitor]), epoch)
        if self.pruned_epoch is None and self.trial.should_prune():
            self.pruned_epoch = epoch
            trainer.should_stop = True
            mlflow.set_tags({"search.pruned": "true", "search.pruned_epoch": str(epoch)})


def _suggest(trial: optuna.Trial, key: str, dist: BaseDistribution):
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)


def _child_runs(client: MlflowClient, exp_id: str, name: str) -> list:
    return client.search_runs([exp_id], f"tags.`{PARENT_TAG}` = '{name}'", max_results=50_000)


def _earlier_trials(client: MlflowClient, runs: list, checked: dict, monitor: str) -> list:
    """The study so far, from the trial runs of earlier invocations: numbers without a FINISHED
    run (failed, interrupted) stay as FAIL so that new trials get new numbers (and keys)."""
    trials = [r for r in runs if "search.trial" in r.data.tags]
    finished = {int(r.data.tags["search.trial"]): r for r in trials if r.info.status == "FINISHED"}
    stale = sorted(n for n, r in finished.items() if r.data.tags.get("search.fingerprint") != checked["fingerprint"])
    if stale:
        raise ConfigError(f"search: trial(s) {stale} of an earlier invocation ran another search (the space, the metric or "
                          "the base config changed since); give the pipeline a new name to search again")
    rebuilt = []
    for n in range(1 + max((int(r.data.tags["search.trial"]) for r in trials), default=-1)):
        run = finished.get(n)
        if run is None:
            rebuilt.append(optuna.trial.create_trial(state=TrialState.FAIL))
            continue
        steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric_name(monitor))}
        pruned = run.data.tags.get("search.pruned") == "true"
        rebuilt.append(optuna.trial.create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else max(steps.values()),
            params=json.loads(run.data.tags["search.params"]), distributions=checked["dists"], intermediate_values=steps,
            user_attrs={"run_id": run.info.run_id}))
    return rebuilt


def run_search(spec: dict, base: str, name: str, uri: str | None, seeds: list[int], overrides: list[str]) -> dict:
    """Tunes the config ``base`` (+ ``overrides``) on the validation split with Optuna (TPE,
    median pruning), each trial a child run of the pipeline ``name``'s parent run, then trains the
    best config once per seed. Returns {"best_params", "best_value", "best_trial", "trials",
    "pruned", "best_runs", "failed"}; ``trials`` counts the trials that completed or were pruned
    (also those of earlier invocations), ``failed`` lists the keys that failed in this one."""
    uri = tracking_uri(uri)
    checked = _check(spec, base, name, uri, list(overrides))
    metric, monitor = checked["metric"], f"valid.{checked['metric']}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    client = MlflowClient(uri)
    exp_id = experiment_id(name, uri)
    earlier = _earlier_trials(client, _child_runs(client, exp_id, name), checked, monitor)
    parent = parent_run(name, uri)
    failed: list[str] = []
    try:
        objective = _trial_objective(base, list(overrides), name, uri, parent, checked, client, failed)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=checked["seed"]),
                                    pruner=checked["pruner"])
        study.add_trials(earlier)
        counted = (TrialState.COMPLETE, TrialState.PRUNED)
        done = sum(t.state in counted for t in earlier)
        remaining = None if checked["trials"] is None else checked["trials"] - done
        if remaining is None or remaining > 0:
            if not earlier:  # enqueued points come first in a new search only
                for point in checked["enqueue"]:
                    study.enqueue_trial(point)
            timeout = None if checked["minutes"] is None else checked["minutes"] * 60
            study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(Exception,))
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise SearchError(f"search {name!r}: no trial completed ({len(study.trials)} tried, failed: {failed})")
        best = study.best_trial
        best_runs = _train_best(client, exp_id, name, base, list(overrides), list(seeds), uri, parent, best, checked, failed)
        summary = {
            "metric": metric, "best_params": dict(best.params), "best_value": float(best.value), "best_trial": best.number,
            "best_trial_run": best.user_attrs.get("run_id"), "trials": sum(t.state in counted for t in study.trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in study.trials),
            "best_runs": [best_runs[s] for s in seeds if s in best_runs], "failed": failed,
        }
        client.log_text(parent, json.dumps({**summary, "best_runs": {f"s{s}": r for s, r in best_runs.items()}}, indent=2) + "\n", BEST_ARTIFACT)
        frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs"))
        client.log_text(parent, frame.to_csv(index=False), TRIALS_ARTIFACT)
        client.set_tag(parent, "search.best_value", repr(summary["best_value"]))
        client.set_tag(parent, "search.best_trial", str(best.number))
    except BaseException as e:
        killed = isinstance(e, (KeyboardInterrupt, Terminated))
        client.set_terminated(parent, "KILLED" if killed else "FAILED")
        raise
    client.set_terminated(parent, "FAILED" if failed else "FINISHED")  # re-run: it resumes
    return summary


def _trial_objective(base: str, overrides: list[str], name: str, uri: str, parent: str, checked: dict,
                     client: MlflowClient, failed: list[str]):
    """Optuna's objective: one trial trains a child run on train only and returns its best
    validation value; a trial that fails is appended to ``failed``."""
    from ..experiment import train

    monitor, dists = f"valid.{checked['metric']}", checked["dists"]

    def objective(trial: optuna.Trial) -> float:
        params = {key: _suggest(trial, key, dist) for key, dist in dists.items()}
        n = trial.number
        pruning = PruningCallback(trial, monitor)
        try:  # a combination the config refuses fails this trial only (no run)
            # a trial is read on validation only: the refit on train + valid is the best runs' job
            config = load_config(base, [*overrides, *_sets(params), "train.refit=false", *_names(name, f"trial-{n}", uri)])
            config.tracking.tags = {
                **config.tracking.tags, **child_tags(name, parent, f"trial-{n}", f"search/trial-{n}"),
                "search.trial": str(n), "search.params": json.dumps(params, sort_keys=True),
                "search.fingerprint": checked["fingerprint"], "search.pruned": "false"}
            result = train(config, extra_callbacks=[pruning])
        except Exception:  # Optuna marks the trial FAIL (and logs why); the run, if any, is FAILED
            failed.append(f"search/trial-{n}")
            raise
        trial.set_user_attr("run_id", result.run_id)
        value = max(h[monitor] for h in result.history)  # validation only: result.test is not read
        client.set_tag(result.run_id, "search.value", repr(value))
        if pruning.pruned_epoch is not None:
            raise optuna.TrialPruned(f"trial {n} pruned after epoch {pruning.pruned_epoch}")
        return value

    return objective


def _train_best(client: MlflowClient, exp_id: str, name: str, base: str, overrides: list[str], seeds: list[int],
                uri: str, parent: str, best, checked: dict, failed: list[str]) -> dict[int, str]:
    """The best config once per seed; a FINISHED run of an earlier invocation for the same best
    trial is reused, one for another trial is tagged ``search.superseded=true``."""
    from ..experiment import train

    runs = {}
    earlier = [r for r in _child_runs(client, exp_id, name)
               if r.data.tags.get("variant") == BEST_VARIANT and r.info.status == "FINISHED"]
    for seed in seeds:
        key = f"search/best/s{seed}"
        for run in (r for r in earlier if r.data.tags.get(KEY_TAG) == key):
            if (run.data.tags.get("search.best_trial") == str(best.number)
                    and run.data.tags.get("search.fingerprint") == checked["fingerprint"]):
                runs.setdefault(seed, run.info.run_id)
            elif run.data.tags.get("search.superseded") != "true":
                client.set_tag(run.info.run_id, "search.superseded", "true")
        if seed in runs:
            continue
        label = f"{BEST_VARIANT}-s{seed}"
        config = load_config(base, [*overrides, *_sets(best.params), f"train.seed={seed}", *_names(name, label, uri)])
        config.tracking.tags = {
            **config.tracking.tags, **child_tags(name, parent, BEST_VARIANT, key),
            "search.best_trial": str(best.number), "search.params": json.dumps(best.params, sort_keys=True),
            "search.fingerprint": checked["fingerprint"]}
        try:
            runs[seed] = train(config).run_id
        except Exception as e:  # the run is already FAILED; the next invocation trains it again
            log.error("search %s: %s failed: %s", name, key, e)
            failed.append(key)
    return runs
