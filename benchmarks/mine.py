"""Offline mining throughput (`recsys-hnm mine`): for each dataset, train a 1-epoch run of the
config on it, then mine its negatives for every training (user, positive) to a temporary parquet
file; prints JSON.

Datasets: the config's own (the shipped MovieLens by default) and a synthetic set of
--synthetic-events interactions (users with 20 distinct items each from a Zipf-popular catalog in
100-item categories, written as events.csv + items.csv). positives_per_s: training (user,
positive) pairs mined per second, every source of --sources on; the 1-epoch training is not timed.
Usage: python benchmarks/mine.py [--config pipelines/quickstart.yaml] [--synthetic-events 1000000]
       [--sources ann,category] [--per-positive 10]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys_hnm.config import load_config
from recsys_hnm.data import load_dataset
from recsys_hnm.experiment import train
from recsys_hnm.experiment.offline import mine

EVENTS_PER_USER, ITEMS_PER_CATEGORY = 20, 100


def synthetic(folder: Path, n_events: int, seed: int = 0) -> Path:
    """events.csv (user_id, item_id, timestamp; ``n_events`` rows, each user's items distinct)
    and items.csv (item_id, category) in ``folder``."""
    rng = np.random.default_rng(seed)
    n_users, n_items = n_events // EVENTS_PER_USER, max(1000, n_events // 50)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    draws = 2 * EVENTS_PER_USER  # then the first EVENTS_PER_USER distinct ones of each user
    events = pd.DataFrame({"user_id": np.repeat(np.arange(n_users), draws),
                           "item_id": rng.choice(n_items, n_users * draws, p=popularity / popularity.sum())})
    events = events.drop_duplicates()
    events["timestamp"] = events.groupby("user_id").cumcount()
    events = events[events["timestamp"] < EVENTS_PER_USER]
    folder.mkdir(parents=True, exist_ok=True)
    events.to_csv(folder / "events.csv", index=False)
    pd.DataFrame({"item_id": np.arange(n_items), "category": np.arange(n_items) // ITEMS_PER_CATEGORY}).to_csv(
        folder / "items.csv", index=False)
    return folder


def measure(name: str, config_path: str, overrides: list[str], tmp: Path, sources: str, per_positive: int) -> dict:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = load_config(config_path, ["train.epochs=1", "train.progress=false", f"tracking.uri={uri}",
                                       f"train.checkpoint_dir={tmp / 'ckpt'}", *overrides])
    result = train(config)
    out = tmp / f"{name}.parquet"
    start = time.perf_counter()
    rows = mine(result.run_id, str(out), sources=tuple(sources.split(",")), per_positive=per_positive, uri=uri, progress=False)
    seconds = time.perf_counter() - start
    positives = rows // per_positive
    return {"name": name, "interactions": len(load_dataset(config.data.dataset).events), "positives": positives, "rows": rows,
            "seconds": round(seconds, 2), "positives_per_s": round(positives / seconds), "file_mb": round(out.stat().st_size / 2 ** 20, 1)}


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="pipelines/quickstart.yaml")
    parser.add_argument("--synthetic-events", type=int, default=1_000_000, help="0: the config's dataset only")
    parser.add_argument("--sources", default="ann,category")
    parser.add_argument("--per-positive", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets.append(measure(load_config(args.config).data.dataset, args.config, [], tmp, args.sources, args.per_positive))
        print(json.dumps(datasets[-1]), flush=True)
        if args.synthetic_events:
            folder = synthetic(tmp / "synthetic", args.synthetic_events)
            datasets.append(measure(f"synthetic-{args.synthetic_events}", args.config, [f"data.dataset={folder}"], tmp,
                                    args.sources, args.per_positive))
            print(json.dumps(datasets[-1]), flush=True)
    return {"sources": args.sources, "per_positive": args.per_positive, "threads": args.threads, "datasets": datasets}


if __name__ == "__main__":
    print(json.dumps(main()))
