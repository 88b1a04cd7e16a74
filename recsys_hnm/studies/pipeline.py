"""Batch pipelines: a base config x variants x seeds (and baselines), as MLflow child runs under one
parent run, resumable: what already FINISHED is skipped, what failed or was interrupted runs again.

    recsys-hnm pipeline run pipelines/movielens_ablation.yaml [--dry-run] [--workers N] [--only VARIANT ...]
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from .compare import TABLE_METRICS, ComparisonSpec, _slug, compare_runs, comparison_markdown, experiment_runs, plot_validation, table_metrics
from ..config import ConfigError, ExperimentConfig, load_config
from ..ops.io import atomic_write
from ..ops.logs import configure_logging
from ..tracking import TrackingError, sigterm_raises, store_exists, tracking_uri
from ..tracking.runs import KEY_TAG, PARENT_TAG, child_tags, parent_run

log = logging.getLogger(__name__)

@dataclass
class Job:
    key: str  # unique within the pipeline: what "already done" is matched on
    variant: str
    config: ExperimentConfig
    baseline: str | None = None  # a baseline's name, else a two-tower training


def plan(spec: ComparisonSpec, uri: str | None = None, only: list[str] | None = None) -> list[Job]:
    """Every job of the pipeline (or of the variants and baselines named in ``only``), each config
    checked before anything runs."""
    unknown = sorted(set(only or ()) - set(spec.variants) - set(spec.baselines))
    if unknown:
        raise ConfigError(f"--only {', '.join(map(repr, unknown))}: not a variant or baseline of pipeline {spec.name!r}; "
                          f"it has {', '.join([*spec.variants, *spec.baselines])}")
    jobs = []
    for variant, sets in spec.variants.items():
        if only and variant not in only:
            continue
        for seed in spec.seeds:
            jobs.append(Job(f"{variant}/s{seed}", variant, _config(spec, variant, [*sets, f"train.seed={seed}"], seed, uri)))
    for name in spec.baselines:
        if only and name not in only:
            continue
        jobs.append(Job(f"baseline:{name}", name, _config(spec, name, [], None, uri), baseline=name))
    return jobs


def _config(spec: ComparisonSpec, variant: str, sets: list[str], seed: int | None, uri: str | None) -> ExperimentConfig:
    suffix = f"-s{seed}" if seed is not None else ""
    overrides = [*spec.overrides, *sets, f"name={spec.name}-{_slug(variant)}{suffix}",
                 f"tracking.experiment={json.dumps(spec.name)}", f"tracking.run_name={json.dumps(variant + suffix)}"]
    if uri:
        overrides.append(f"tracking.uri={json.dumps(uri)}")
    try:
        config = load_config(spec.base, overrides)
    except ConfigError as e:
        raise ConfigError(f"variant {variant!r}: {e}") from e
    missing = [m for m in TABLE_METRICS if int(m.split("@")[1]) not in config.eval.ks]
    if missing:  # the test metrics hold only the Ks of eval.ks
        raise ConfigError(f"variant {variant!r}: eval.ks {config.eval.ks} lacks the K of {missing}, reported by the comparison table")
    return config


def finished_keys(experiment: str, uri: str) -> set[str]:
    """Keys of the pipeline's child runs that FINISHED: they are not run again."""
    return set(finished_runs(experiment, uri))


def finished_runs(experiment: str, uri: str) -> dict[str, str]:
    """Key -> run id of the pipeline's child runs that FINISHED."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=50_000)
    return {r.data.tags[KEY_TAG]: r.info.run_id for r in runs if KEY_TAG in r.data.tags}


def run_job(job: Job, parent_id: str) -> str:
    """One child run (in this process or a worker); returns its run id."""
    job.config.tracking.tags = {**job.config.tracking.tags,
                                **child_tags(job.config.tracking.experiment, parent_id, job.variant, job.key)}
    if job.baseline is not None:
        from ..experiment import run_baseline

        return run_baseline(job.config, job.baseline)["run_id"]
    from ..experiment import train

    return train(job.config).run_id


def run_pipeline(spec: ComparisonSpec, uri: str | None = None, *, workers: int = 1, dry_run: bool = False,
                 baseline: str | None = None, output: str | Path | None = None, only: list[str] | None = None) -> dict:
    """Runs what is not yet done (of the variants and baselines in ``only``, when given), then
    tabulates the experiment (``compare_runs``) into the parent run (and ``output``). Returns
    {"planned", "skipped", "ran", "failed", "table"}, with "mined" (the files its ``mined:`` steps
    made) or, for a dry run, "to_run" and "to_mine"."""
    uri = tracking_uri(uri, create=None if dry_run else True)
    jobs = plan(spec, uri, only)
    to_mine = _to_mine(spec, jobs)
    if dry_run and not store_exists(uri):  # nothing tracked there yet: every job is to run, and nothing is written
        return {"planned": [j.key for j in jobs], "skipped": [], "ran": [], "failed": [], "to_run": [j.key for j in jobs],
                "to_mine": to_mine}
    if spec.search is not None and not dry_run:
        from .search import run_search

        best = run_search(spec.search, spec.base, spec.name, uri, spec.seeds, spec.overrides)
        log.info("search: best %s=%.4f with %s", best.get("metric"), best["best_value"], best["best_params"])
    done = finished_keys(spec.name, uri)
    todo = [j for j in jobs if j.key not in done]
    summary = {"planned": [j.key for j in jobs], "skipped": [j.key for j in jobs if j.key in done], "ran": [], "failed": []}
    if dry_run:
        summary["to_run"] = [j.key for j in todo]
        summary["to_mine"] = to_mine
        return summary
    parent = parent_run(spec.name, uri)
    try:
        producers = {spec.mined[out]["from"] for out in to_mine}  # the runs the mined files come from go first
        _run_jobs([j for j in todo if j.key in producers], parent, workers, summary)
        _mine(spec, to_mine, uri, summary)
        _run_jobs([j for j in todo if j.key not in producers], parent, workers, summary)
    except BaseException:  # interrupted: the parent says so; running again resumes
        MlflowClient(uri).set_terminated(parent, "KILLED")
        raise
    client = MlflowClient(uri)
    try:  # the table covers every finished child, also those of earlier invocations
        records = experiment_runs(spec.name, uri, tag=(PARENT_TAG, spec.name))
    except TrackingError:  # nothing finished (yet): the parent says so and fails
        summary["table"] = "(no finished runs)"
        client.set_terminated(parent, "FAILED")
        return summary
    base = baseline if baseline in {r.variant for r in records} else None
    frame = compare_runs(records, baseline=base, metrics=table_metrics(records))
    summary["table"] = comparison_markdown(frame, table_metrics(records), baseline=base)
    client.log_text(parent, summary["table"] + "\n", "comparison.md")
    client.log_text(parent, frame.to_csv(index=False), "comparison.csv")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "validation_curves.png"
        plot_validation(records, png, uri=uri)
        client.log_artifact(parent, str(png))
        if output:
            atomic_write(Path(output).with_suffix(".png"), lambda t: Path(t).write_bytes(png.read_bytes()))
    if output:
        atomic_write(output, lambda tmp: Path(tmp).write_text(summary["table"] + "\n"))
    client.set_tag(parent, "failed_jobs", str(len(summary["failed"])))
    client.set_terminated(parent, "FAILED" if summary["failed"] else "FINISHED")  # re-run: it resumes
    return summary


def _to_mine(spec: ComparisonSpec, jobs: list[Job]) -> list[str]:
    """The spec's mined files not made yet; a job reading a static file that neither exists nor
    is made by the spec is refused here, before anything runs."""
    for job in jobs:
        path = job.config.sampler.static.path
        if job.config.sampler.mixture.get("static", 0) > 0 and not Path(path).is_file() and path not in spec.mined:
            raise ConfigError(f"variant {job.variant!r}: sampler.static.path: file not found: {path}; make it first, or "
                              "declare it under mined: in the spec (the pipeline then mines it from one of its runs)")
    return [out for out in spec.mined if not Path(out).is_file()]


def _mine(spec: ComparisonSpec, outputs: list[str], uri: str, summary: dict) -> None:
    """Each mined file from the FINISHED run it names (``recsys-hnm mine``'s work)."""
    from ..experiment.offline import mine

    runs = finished_runs(spec.name, uri)
    for out in outputs:
        step = spec.mined[out]
        if step["from"] not in runs:  # its producer failed: the jobs reading the file fail on it, by name
            log.error("mined %s: run %s did not finish; not mined", out, step["from"])
            summary["failed"].append(f"mined:{out}")
            continue
        try:  # a step that fails fails the jobs reading its file (by name), not the whole pipeline
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            n = mine(runs[step["from"]], out, sources=tuple(step["sources"]), per_positive=step["per_positive"],
                     window=tuple(step["window"]), uri=uri, progress=False)
        except Exception as e:
            log.error("mined %s from %s failed: %s", out, step["from"], e)
            summary["failed"].append(f"mined:{out}")
            continue
        log.info("mined %d negatives from %s into %s", n, step["from"], out)
        summary.setdefault("mined", []).append(out)


def _run_jobs(todo: list[Job], parent: str, workers: int, summary: dict) -> None:
    if workers <= 1:
        for job in todo:
            _collect(summary, job, lambda job=job: run_job(job, parent))
        return
    # spawn: a fresh interpreter per worker (no forked torch/MLflow state)
    # a spawned worker starts with Python's default logging: it takes the parent's (-v, muted notices)
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=configure_logging, initargs=(verbose,))
    try:
        with sigterm_raises():
            futures = {pool.submit(run_job, job, parent): job for job in todo}
            for future in as_completed(futures):
                _collect(summary, futures[future], future.result)
    except BaseException:
        # interrupted: stop the workers too (SIGTERM, so their runs end KILLED), never orphan them
        for process in list(pool._processes.values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(summary: dict, job: Job, result) -> None:
    try:
        result()
        summary["ran"].append(job.key)
    except Exception as e:  # the child run is already marked FAILED; the next invocation re-runs it
        log.error("pipeline job %s failed: %s", job.key, e)
        summary["failed"].append(job.key)
