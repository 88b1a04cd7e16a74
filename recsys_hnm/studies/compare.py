"""Comparisons: the spec of variants x seeds that a pipeline runs, and the table of an experiment's
finished runs (mean ± sd over seeds, paired bootstrap CI over test users against a baseline)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ConfigError, check_name, read_yaml

log = logging.getLogger(__name__)
TABLE_METRICS = ("ndcg@10", "map@10", "recall@10")
SPLIT_METRICS = ("repeat.ndcg@10", "explore.ndcg@10")  # runs scored with repeats allowed (eval.exclude train / none)


def table_metrics(records) -> tuple[str, ...]:
    """The table's columns: the totals, and the repeat / explore parts where a run has them."""
    from ..tracking import metric_name

    split = any(metric_name(f"test.{SPLIT_METRICS[0]}") in r.metrics for r in records)
    return TABLE_METRICS + SPLIT_METRICS if split else TABLE_METRICS


@dataclass
class ComparisonSpec:
    name: str
    base: str
    seeds: list[int]
    variants: dict[str, list[str]]  # variant -> --set overrides
    overrides: list[str] = field(default_factory=list)  # applied to every variant
    baselines: list[str] = field(default_factory=list)  # tuned on validation, run once each
    search: dict | None = None  # an Optuna search section (recsys_hnm.studies.search), run before the variants
    # offline negatives the pipeline makes before the variants that read them: output path ->
    # {from: "<variant>/s<seed>", sources, per_positive, window} (the arguments of `recsys-hnm mine`)
    mined: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, seeds: list[int] | None = None) -> "ComparisonSpec":
        """The spec at ``path``; ``seeds``, when given, replace its seeds (checked the same way)."""
        raw = read_yaml(path, "comparison spec")
        unknown = set(raw) - {"name", "base", "seeds", "variants", "set", "baselines", "search", "mined"}
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: base, baselines, mined, name, search, seeds, set, "
                              "variants")
        if not {"variants", "search", "baselines"} & raw.keys():
            raise ConfigError(f"{path}: needs variants, baselines or a search section")
        for key in ("name", "base"):
            if key not in raw:
                raise ConfigError(f"{path}: missing key {key!r}")

        def refuse(key: str, expected: str):
            return ConfigError(f"{path}: {key}: expected {expected}, got {raw.get(key)!r}")

        def strings(value) -> bool:
            return isinstance(value, list) and all(isinstance(v, str) for v in value)

        if not isinstance(raw["name"], str):
            raise refuse("name", "a string")
        check_name(raw["name"], f"{path}: name")  # part of every run's name, hence of checkpoint paths
        if not isinstance(raw["base"], str):
            raise refuse("base", "a config file path")
        seeds = _seeds(raw.get("seeds", [0]), seeds, path)
        if not strings(raw.get("set", [])):
            raise refuse("set", "a list of KEY=VALUE strings")
        if "variants" in raw and not (isinstance(raw["variants"], dict) and raw["variants"]):
            raise refuse("variants", "a non-empty mapping of variant name to a list of KEY=VALUE strings")
        if "search" in raw and not isinstance(raw["search"], dict):
            raise refuse("search", "a mapping (metric, trials/minutes, space)")
        variants = {}
        for name, sets in raw.get("variants", {}).items():
            if not strings(sets or []):
                raise ConfigError(f"{path}: variants.{name}: expected a list of KEY=VALUE strings, got {sets!r}")
            variants[str(name)] = list(sets or [])
        if "MostPop" in variants:
            raise ConfigError(f"{path}: variants: 'MostPop' is the name of the popularity baseline row")
        slugs: dict[str, str] = {}
        for name in variants:
            other = slugs.setdefault(_slug(name), name)
            if other != name:
                raise ConfigError(f"{path}: variants {other!r} and {name!r} give the same run name {_slug(name)!r}")
        baselines = raw.get("baselines", [])
        if not strings(baselines):
            raise refuse("baselines", "a list of baseline names (mostpop, itemknn, ease, als)")
        from ..baselines.models import BASELINES  # at load (and so at --dry-run), not as a job that fails

        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"{path}: baselines: unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
        repeated = sorted({b for b in baselines if baselines.count(b) > 1})
        if repeated:
            raise ConfigError(f"{path}: baselines: {repeated} listed more than once")
        mined = _mined_steps(raw.get("mined", {}), variants, seeds, path)
        return cls(raw["name"], raw["base"], seeds, variants, list(raw.get("set", [])), list(baselines), raw.get("search"), mined)


def _seeds(spec_seeds, override: list[int] | None, path) -> list[int]:
    """The spec's seeds, or the ``--seeds`` that replace them: a non-empty list of distinct integers."""
    if override is not None:
        if not (override and len(set(override)) == len(override)):
            raise ConfigError(f"--seeds {' '.join(map(str, override))}: expected distinct integers")
        return list(override)
    if not (isinstance(spec_seeds, list) and spec_seeds and all(type(s) is int for s in spec_seeds) and len(set(spec_seeds)) == len(spec_seeds)):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of distinct integers, got {spec_seeds!r}")
    return spec_seeds


MINED_DEFAULTS = {"sources": ["ann"], "per_positive": 10, "window": [10, 100]}


def _mined_steps(raw, variants: dict, seeds: list[int], path) -> dict[str, dict]:
    """The spec's ``mined:`` section checked: each output made from a run of the spec itself."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: mined: expected a mapping of output file to {{from, sources, per_positive, window}}, got {raw!r}")
    steps = {}
    for output, step in raw.items():
        where = f"{path}: mined.{output}"
        if not isinstance(step, dict):
            raise ConfigError(f"{where}: expected a mapping with 'from', got {step!r}")
        unknown = set(step) - {"from", *MINED_DEFAULTS}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: from, {', '.join(MINED_DEFAULTS)}")
        source = step.get("from")
        jobs = [f"{v}/s{s}" for v in variants for s in seeds]
        if source not in jobs:
            raise ConfigError(f"{where}: from: {source!r} is not a run of this pipeline; one of {jobs[:6]}")
        step = {**MINED_DEFAULTS, **step}
        if not (isinstance(step["sources"], list) and step["sources"] and all(isinstance(x, str) for x in step["sources"])):
            raise ConfigError(f"{where}: sources: expected a non-empty list of names, got {step['sources']!r}")
        if type(step["per_positive"]) is not int or step["per_positive"] < 1:
            raise ConfigError(f"{where}: per_positive: expected an integer >= 1, got {step['per_positive']!r}")
        w = step["window"]
        if not (isinstance(w, list) and len(w) == 2 and all(type(x) is int for x in w) and 0 <= w[0] < w[1]):
            raise ConfigError(f"{where}: window: expected [lo, hi] with 0 <= lo < hi, got {w!r}")
        steps[str(output)] = step
    return steps


def _slug(variant: str) -> str:
    """The variant label as a file-name-safe part of the run name (labels like '+ann[10,100)' are free text)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", variant)


# -- comparing the runs of an experiment ------------------------------------------------------------

def paired_bootstrap(variant: np.ndarray, baseline: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     chunk: int = 100) -> tuple[float, float, float]:
    """Relative change of the mean, mean(variant) / mean(baseline) - 1, and its 95% bootstrap CI,
    resampling users (rows paired: the same user in both arrays)."""
    variant, baseline = np.asarray(variant, np.float64), np.asarray(baseline, np.float64)
    if variant.shape != baseline.shape or variant.ndim != 1 or not len(variant):
        raise ValueError(f"paired arrays must be 1-D, non-empty and of one length, not {variant.shape} and {baseline.shape}")
    rng = np.random.default_rng(seed)
    n = len(variant)
    ratios = []
    for start in range(0, n_boot, chunk):  # [chunk, n] resample indices at a time bounds memory
        idx = rng.integers(0, n, (min(chunk, n_boot - start), n))
        ratios.append(variant[idx].mean(1) / baseline[idx].mean(1) - 1.0)
    ratios = np.concatenate(ratios)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(variant.mean() / baseline.mean() - 1.0), float(lo), float(hi)


@dataclass
class RunRecord:
    run_id: str
    variant: str
    metrics: dict[str, float]
    per_user: "object | None" = None  # DataFrame of per-user test metrics, when logged
    baseline: bool = False  # a tuned baseline (MostPop, ItemKNN...), not a trained variant


def variant_of(run) -> str:
    """The ``variant`` tag (set by compare and pipelines), a baseline's ``model`` tag, else the
    run name without its ``-s<seed>`` suffix."""
    tags = run.data.tags
    if "variant" in tags:
        return tags["variant"]
    if tags.get("baseline") == "true":
        return tags.get("model", run.info.run_name)
    return re.sub(r"-s\d+$", "", run.info.run_name or run.info.run_id)


def experiment_runs(experiment: str, uri: str | None = None, tag: tuple[str, str] | None = None) -> list[RunRecord]:
    """The FINISHED runs of ``experiment`` (with ``tag`` = (key, value) if given; parent runs
    left out), with their per-user test metrics where logged."""
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from ..tracking import PER_USER_ARTIFACT, TrackingError, tracking_uri

    uri = tracking_uri(uri, create=False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"experiment {experiment!r} not found in the tracking store {uri}")
    query = "attributes.status = 'FINISHED'" + (f" and tags.`{tag[0]}` = '{tag[1]}'" if tag else "")
    runs = [r for r in client.search_runs([exp.experiment_id], query, max_results=50_000)
            if r.data.tags.get("role") != "parent" and "search.trial" not in r.data.tags and r.data.tags.get("search.superseded") != "true"]
    records = []
    name = PER_USER_ARTIFACT.format(phase="test")
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            per_user = None
            if any(a.path == name for a in client.list_artifacts(run.info.run_id)):
                path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=tmp, tracking_uri=uri)
                per_user = pd.read_parquet(path)
            records.append(RunRecord(run.info.run_id, variant_of(run), dict(run.data.metrics), per_user,
                                     run.data.tags.get("baseline") == "true"))
    if not records:
        raise TrackingError(f"experiment {experiment!r} has no finished runs")
    return records


def logged_test_metrics(records: list[RunRecord]) -> list[str]:
    """The test metrics (``ndcg@10``...) that at least one of ``records`` logged, by name then K."""
    names = {key.removeprefix("test.").replace("_at_", "@") for r in records for key in r.metrics
             if key.startswith("test.") and "_at_" in key}
    return sorted(names, key=lambda m: (m.split("@")[0], int(m.split("@")[1]) if m.split("@")[1].isdigit() else 0))


def check_metric(records: list[RunRecord], metric: str, what: str = "--metric") -> None:
    """``metric`` (e.g. ndcg@10) must be a test metric the runs logged: a ValueError naming it,
    the Ks the runs have and the metrics, before any table, plot or bootstrap."""
    logged = logged_test_metrics(records)
    if metric in logged:
        return
    ks = sorted({int(m.split("@")[1]) for m in logged if m.split("@")[1].isdigit()})
    names = sorted({m.split("@")[0] for m in logged})
    raise ValueError(f"{what} {metric!r}: not logged by the runs; they logged {', '.join(names) or 'no test metrics'}"
                     + (f" at K {', '.join(map(str, ks))}" if ks else "") + (f" (e.g. {names[0]}@{ks[-1]})" if names and ks else ""))


def compare_runs(records: list[RunRecord], metric: str = "ndcg@10", baseline: str | None = None,
                 metrics=TABLE_METRICS, n_boot: int = 2000):
    """One row per variant: mean ± sd over its runs (seeds) of each test metric, and against
    ``baseline``: the relative change of ``metric`` with a paired 95% bootstrap CI over test
    users (each user's metric averaged over the variant's seeds first), training time (a
    baseline's final fit) and the false-negative rate of each negative source."""
    import pandas as pd

    from ..tracking import metric_name

    by_variant = _by_variant(records, baseline)
    check_metric(records, metric, "metric")
    if metric not in metrics:
        metrics = (metric, *metrics)

    def user_means(runs: list[RunRecord]):
        return _user_means(runs, metric)

    base_users = user_means(by_variant[baseline]) if baseline else None
    # the strongest baseline by the mean of ``metric``: each trained variant is also compared with it
    tuned = {v: np.nanmean([r.metrics.get(metric_name(f"test.{metric}"), np.nan) for r in runs])
             for v, runs in by_variant.items() if all(r.baseline for r in runs)}
    best = max(tuned, key=tuned.get) if tuned else None
    best_users = user_means(by_variant[best]) if best else None
    rows = []
    for variant, runs in sorted(by_variant.items(), key=lambda kv: (kv[0] != baseline, kv[0])):  # the baseline first
        row = {"variant": variant, "runs": len(runs)}
        for m in metrics:
            v = np.array([r.metrics.get(metric_name(f"test.{m}"), np.nan) for r in runs])
            row[m] = float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
            row[f"{m} sd"] = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0
        if base_users is not None:
            users = user_means(runs)
            if users is not None and variant != baseline:
                both = pd.concat([users, base_users], axis=1, join="inner").to_numpy()
                row["change"], row["ci_low"], row["ci_high"] = paired_bootstrap(both[:, 0], both[:, 1], n_boot)
                row["paired_users"] = len(both)
        if best_users is not None and variant not in tuned and (users := user_means(runs)) is not None:
            both = pd.concat([users, best_users], axis=1, join="inner").to_numpy()
            row["best_baseline"] = best
            row["vs_best"], row["vs_best_low"], row["vs_best_high"] = paired_bootstrap(both[:, 0], both[:, 1], n_boot)
        train_s = [r.metrics.get("train_s", r.metrics.get("fit_s")) for r in runs if {"train_s", "fit_s"} & r.metrics.keys()]
        if train_s:
            row["train_s"] = float(np.mean(train_s))
        for key in sorted({k for r in runs for k in r.metrics if k.startswith("neg.") and k.endswith(".false_negative_rate")}):
            row[key.removesuffix(".false_negative_rate").replace("neg.", "fnr.")] = float(np.mean([r.metrics[key] for r in runs if key in r.metrics]))
        rows.append(row)
    return pd.DataFrame(rows)


def _by_variant(records: list[RunRecord], baseline: str | None) -> dict[str, list[RunRecord]]:
    """The runs of each variant; a ``baseline`` that names none of them is refused."""
    by_variant: dict[str, list[RunRecord]] = {}
    for r in records:
        by_variant.setdefault(r.variant, []).append(r)
    if baseline is not None and baseline not in by_variant:
        raise ValueError(f"baseline variant {baseline!r} is not among the runs: {sorted(by_variant)}")
    return by_variant


def _user_means(runs: list[RunRecord], metric: str):
    """Each user's ``metric`` averaged over the runs (seeds) that logged it, by raw user id; None if none did."""
    import pandas as pd

    frames = [r.per_user.set_index("user_id")[metric] for r in runs if r.per_user is not None and metric in r.per_user.columns]
    return pd.concat(frames, axis=1).mean(axis=1) if frames else None


def by_history(records: list[RunRecord], edges: list[int], metric: str = "ndcg@10", baseline: str | None = None,
               n_boot: int = 2000):
    """Where a variant wins or loses: test users grouped by their history (distinct items before
    test) into the buckets ``(edges[i-1], edges[i]]`` (the first from 0, the last open); per
    bucket each variant's mean ``metric`` (over seeds, then users) and, against ``baseline``, the
    relative change with a paired 95% bootstrap CI over the bucket's users (columns
    ``<variant> change``, ``low``, ``high``)."""
    import pandas as pd

    if not edges or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--by-history {' '.join(map(str, edges))}: expected increasing non-negative integers")
    lacking = sorted({r.variant for r in records if r.per_user is None or "history" not in r.per_user.columns})
    if lacking:
        raise ValueError(f"the per-user test metrics of {lacking} hold no history column (logged before it was added): "
                         "run them again to group their users by history")
    check_metric(records, metric, "--metric")
    # each variant's per-user mean over its seeds; users every variant scored
    users = pd.concat({v: _user_means(runs, metric) for v, runs in _by_variant(records, baseline).items()}, axis=1, join="inner")
    history = records[0].per_user.set_index("user_id")["history"].reindex(users.index).to_numpy()
    rows = []
    for lo, hi in zip([-1, *edges], [*edges, np.inf]):
        part = users[(history > lo) & (history <= hi)]
        if not len(part):
            continue
        label = f"<= {hi}" if lo < 0 else f"> {lo}" if hi == np.inf else f"{lo + 1}" if lo + 1 == hi else f"{lo + 1}-{hi}"
        row = {"history": label, "users": len(part), **part.mean().to_dict()}
        for v in users.columns:
            if baseline is not None and v != baseline and part[baseline].mean() > 0:
                row[f"{v} change"], row[f"{v} low"], row[f"{v} high"] = paired_bootstrap(part[v].to_numpy(), part[baseline].to_numpy(), n_boot)
        rows.append(row)
    return pd.DataFrame(rows)


def by_history_markdown(frame, variants: list[str], metric: str = "ndcg@10", baseline: str | None = None) -> str:
    """``by_history``'s table: each variant's mean, then each one's change against the baseline."""
    changed = [v for v in variants if f"{v} change" in frame]
    head = ["history (items)", "users", *(f"{v} {metric}" for v in variants), *(f"{v} vs {baseline} (95% CI)" for v in changed)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in frame.iterrows():
        cells = [r["history"], str(int(r["users"])), *(f"{r[v]:.4f}" for v in variants)]
        cells += [f"{r[f'{v} change']:+.1%} [{r[f'{v} low']:+.1%}, {r[f'{v} high']:+.1%}]" if np.isfinite(r[f"{v} change"]) else "—"
                  for v in changed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(frame, metrics=TABLE_METRICS, baseline: str | None = None, metric: str = "ndcg@10") -> str:
    """The comparison as a markdown table: mean ± sd, then the change against the baseline."""
    head = ["variant", "runs", *metrics]
    if baseline:
        head.append(f"{metric} vs {baseline} (95% CI)")
    if "train_s" in frame:
        head.append("train s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in frame.iterrows():
        cells = [str(r["variant"]), str(int(r["runs"]))] + [f"{r[m]:.4f} ± {r[f'{m} sd']:.4f}" for m in metrics]
        if baseline:
            has = "change" in r and np.isfinite(r.get("change", np.nan))
            cells.append(f"{r['change']:+.1%} [{r['ci_low']:+.1%}, {r['ci_high']:+.1%}]" if has else "—")
        if "train_s" in frame:
            cells.append(f"{r['train_s']:.0f}" if np.isfinite(r.get("train_s", np.nan)) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    if "vs_best" in frame:  # every trained variant beside the strongest tuned baseline, in words
        lines.append("")
        for _, r in frame[frame["vs_best"].notna()].iterrows():
            verdict = "beats" if r["vs_best_low"] > 0 else "is below" if r["vs_best_high"] < 0 else "is level with"
            lines.append(f"- `{r['variant']}` {verdict} the best baseline, {r['best_baseline']}: {metric} {r['vs_best']:+.1%} "
                         f"[{r['vs_best_low']:+.1%}, {r['vs_best_high']:+.1%}]")
    return "\n".join(lines)


def plot_validation(records: list[RunRecord], path: str | Path, metric: str = "ndcg@10", uri: str | None = None) -> None:
    """PNG of the validation ``metric`` per epoch, one line per run, one colour per variant;
    baselines (one validation value) as dashed levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from ..ops.io import atomic_write
    from ..tracking import metric_name, tracking_uri

    client = MlflowClient(tracking_uri(uri, create=False))
    fig, ax = plt.subplots(figsize=(8, 5))
    colours: dict[str, str] = {}
    for r in records:
        history = client.get_metric_history(r.run_id, metric_name(f"valid.{metric}"))
        if not history:
            continue  # baselines have no epochs
        steps = sorted(history, key=lambda m: m.step)
        first = r.variant not in colours
        colour = colours.setdefault(r.variant, f"C{len(colours) % 10}")
        label = r.variant if first else None
        if len(steps) == 1:  # a baseline: its (tuned) validation value as a level
            ax.axhline(steps[0].value, color=colour, linestyle="--", alpha=0.8, label=label)
        else:
            ax.plot([m.step for m in steps], [m.value for m in steps], color=colour, alpha=0.8, label=label)
    ax.set(xlabel="epoch", ylabel=f"validation {metric}", title="validation curves per variant (one line per seed)")
    if colours:
        ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
