"""One config-driven run: build the components from a config, train (resume, refit, track),
load a finished run, evaluate it, recommend from it (``run``); tune and log a baseline
(``baseline``); mine negatives offline from a trained run (``offline``); the same model as a
plain object without MLflow (``recommender.TwoTowerRecommender``)."""

from .baseline import run_baseline
from .recommender import TwoTowerRecommender
from .run import (
    HISTORIES, LoadedRun, Selection, TrainResult, build_features, build_model, build_sampler, build_trainer, checkpoint_path,
    choose_settings, describe_mix, evaluate_run, heldout_positives, item_side_features, latest_checkpoint, load_data,
    load_run, recommend, refit_split, summary_json, train, write_table,
)

__all__ = [
    "HISTORIES", "LoadedRun", "Selection", "TrainResult", "TwoTowerRecommender", "build_features", "build_model", "build_sampler",
    "build_trainer", "checkpoint_path", "choose_settings", "describe_mix", "evaluate_run", "heldout_positives",
    "item_side_features", "latest_checkpoint", "load_data", "load_run", "recommend", "refit_split", "run_baseline",
    "summary_json", "train", "write_table",
]
