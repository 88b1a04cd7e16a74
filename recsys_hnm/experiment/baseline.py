"""A baseline as one tracked run: tuned on the config's validation split, refit, evaluated on
test and logged to MLflow (the baselines package itself knows no MLflow)."""

from __future__ import annotations

import mlflow
import torch

from ..baselines.tuning import check_metric, fit_final, grid_points, tune
from ..evaluation.evaluator import Evaluator, metric_means
from ..tracking import git_commit, log_metrics, log_per_user, tracked_run
from .run import load_data


def run_baseline(config, name: str, grid: dict | None = None, uri: str | None = None) -> dict:
    """Tune ``name`` on the config's validation split, evaluate it on test, and log one MLflow
    run (name ``tracking.run_name``, default ``name``; tags ``model``, ``baseline=true``,
    ``dataset``, ``config_name`` and the config's ``tracking.tags``) in the config's experiment:
    params ``baseline.*`` (the chosen hyperparameters), metrics ``valid.*`` (the chosen point) and
    ``test.*``, ``fit_s`` (the final fit), the tuning table as ``tuning.json`` and per-user test
    metrics as ``per_user_test.parquet``. The selection metric
    is ``train.monitor``, the Ks ``eval.ks``. Returns ``{"run_id", "params", "valid", "test"}``."""
    ks, chunk, metric = config.eval.ks, config.eval.chunk_size, config.train.monitor
    check_metric(metric, ks)
    grid_points(name, grid)  # a bad name or grid is refused before a run is created
    torch.set_num_threads(config.train.num_threads)  # as train(): the same cores budget
    data, split = load_data(config)
    # the config's extra tags (e.g. a pipeline's variant and parent run) first: ours stay honest
    tags = {**getattr(config.tracking, "tags", {}), "model": name, "baseline": "true",
            "dataset": config.data.dataset or config.data.train, "config_name": config.name, "git_commit": git_commit()}
    run_name = config.tracking.run_name or name
    with tracked_run(uri or config.tracking.uri, config.tracking.experiment, run_name, tags=tags) as run:
        mlflow.set_tag("data_fingerprint", data.fingerprint())
        flat = config.flat()
        mlflow.log_params({k: v for k, v in flat.items() if k.startswith(("data.", "eval."))})
        best, table = tune(name, split, grid, ks, metric, chunk, exclude=config.eval.exclude)
        mlflow.log_params({f"baseline.{k}": v for k, v in best.items()})
        mlflow.log_params({"baseline.select_by": f"valid.{metric}", "baseline.grid_size": len(table)})
        mlflow.log_dict({"metric": f"valid.{metric}", "best": best, "points": table}, "tuning.json")
        valid = next(row["valid"] for row in table if row["params"] == best)
        log_metrics(valid, prefix="valid.")
        model, fit_s = fit_final(name, best, split)
        per_user = Evaluator(split, "test", ks, chunk, exclude=config.eval.exclude).per_user(model.scorer())
        test = metric_means(per_user)
        log_metrics(test, prefix="test.")
        log_metrics({"fit_s": fit_s})
        log_per_user(per_user, "test", data.users)
        return {"run_id": run.info.run_id, "params": best, "valid": valid, "test": test}
