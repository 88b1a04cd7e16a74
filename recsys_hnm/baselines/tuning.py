"""Baselines scored like the two-tower model: the same split, evaluator and masking.

Hyperparameters are chosen on validation only (fit on ``split.known("valid")`` = train), then
the chosen model is refit on ``split.known("test")`` (train + valid: all a model may see at
test time) and evaluated once on test.
"""

from __future__ import annotations

import itertools
import time

from ..data.splits import Split
from ..evaluation.evaluator import Evaluator
from ..evaluation.metrics import METRICS, is_metric_at
from .models import BASELINES, DEFAULT_GRIDS, Baseline, make_baseline


def grid_points(name: str, grid: dict | None = None) -> list[dict]:
    """Every combination of ``grid`` (default: ``DEFAULT_GRIDS[name]``), in the grid's order; a
    scalar value is one option. Unknown names and hyperparameters are refused before any fit."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    grid = DEFAULT_GRIDS.get(name, {}) if grid is None else grid
    options = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in grid.items()}
    for key, values in options.items():
        if not values:
            raise ValueError(f"baseline {name!r}: grid entry {key!r} has no values")
    points = [dict(zip(options, combo)) for combo in itertools.product(*options.values())]
    make_baseline(name, **points[0])  # refuses unknown hyperparameters now, not after fits
    return points


def check_metric(metric: str, ks) -> None:
    if not is_metric_at(metric, ks):
        raise ValueError(f"metric {metric!r} must be one of {list(METRICS)} @ a K in {list(ks)}")


def fit_timed(name: str, params: dict, matrix, events=None) -> tuple[Baseline, float]:
    start = time.perf_counter()
    model = make_baseline(name, **params)
    model = model.fit(matrix, events) if model.reads_events else model.fit(matrix)
    return model, time.perf_counter() - start


def tune(name: str, split: Split, grid: dict | None = None, ks=(10, 20, 50), metric: str = "ndcg@10",
         chunk_size: int = 1024, exclude: str = "history") -> tuple[dict, list[dict]]:
    """(best params, table): each grid point fit on train and evaluated on validation (what it
    ranks leaves out ``exclude``, as the Evaluator's); the best by ``metric`` on validation wins
    (the first in grid order among equals). Test is never read.
    Table rows: ``{"params", "valid": {metric: value}, "fit_s"}``."""
    check_metric(metric, ks)
    points = grid_points(name, grid)
    evaluator = Evaluator(split, "valid", ks, chunk_size, exclude=exclude)
    train, events = split.known("valid"), split.history("valid")
    table = []
    for params in points:
        model, fit_s = fit_timed(name, params, train, events)
        table.append({"params": params, "valid": evaluator.evaluate(model.scorer()), "fit_s": fit_s})
    best = max(range(len(table)), key=lambda i: (table[i]["valid"][metric], -i))
    return dict(table[best]["params"]), table


def fit_final(name: str, params: dict, split: Split) -> tuple[Baseline, float]:
    """The chosen baseline refit on train + valid, what the model may see at test time."""
    return fit_timed(name, params, split.known("test"), split.history("test"))
