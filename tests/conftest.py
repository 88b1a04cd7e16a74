"""Shared fixtures: synthetic data written as the external-file inputs of the CLI."""

import pandas as pd
import pytest

from recsys_hnm.config import config_from_dict
from recsys_hnm.data import leave_last_out, synthetic


@pytest.fixture(scope="session")
def synthetic_files(tmp_path_factory):
    """train/valid/test CSVs (user_id,item_id,timestamp,basket_id) and items.csv from a seeded
    synthetic log, split leave-last-out."""
    root = tmp_path_factory.mktemp("synthetic")
    data = synthetic(300, 600, 12_000, n_categories=12, seed=3)
    return write_split(data, leave_last_out(data), root, baskets=True, items=True)


def write_split(data, split, root, *, baskets: bool = False, items: bool = False) -> dict:
    """The split as the CLI's external files: train/valid/test CSVs (user_id, item_id,
    timestamp, and basket_id with ``baskets``) and, with ``items``, items.csv (item_id, category)."""
    paths = {}
    for phase in ("train", "valid", "test"):
        ev = split.phase(phase)
        frame = pd.DataFrame({"user_id": data.users.to_raw(ev["user"]), "item_id": data.items.to_raw(ev["item"]),
                              "timestamp": ev["timestamp"].to_numpy()})
        if baskets:
            frame["basket_id"] = ev["basket"].to_numpy()
        paths[phase] = root / f"{phase}.csv"
        frame.to_csv(paths[phase], index=False)
    if items:
        coo = data.item_categories.tocoo()
        paths["items"] = root / "items.csv"
        pd.DataFrame({"item_id": data.items.to_raw(coo.row), "category": data.categories.to_raw(coo.col)}).to_csv(paths["items"], index=False)
    return paths


def small_config(files, tmp_path, **sections):
    """A fast config on the synthetic files with its own MLflow store and checkpoints."""
    raw = {
        "name": "test",
        "data": {"dataset": None, **{k: str(files[k]) for k in ("train", "valid", "test", "items") if k in files}},
        "model": {"dim": 32, "hidden": [64], "temperature": 0.1, "history_len": 50},
        "sampler": {"num_negatives": 64, "mixture": {"in_batch": 1.0, "uniform": 1.0}},
        "train": {"epochs": 4, "batch_size": 256, "lr": 0.005, "patience": 0, "progress": False,
                  "checkpoint_dir": str(tmp_path / "ckpt")},
        "eval": {"ks": [10, 20]},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "experiment": "tests"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return config_from_dict(raw)
