"""Offline mining throughput: train a short run of a config (or take --run-id), then mine its
negatives for every training (user, positive) to a temporary parquet file; prints JSON.

positives_per_s: training (user, positive) pairs mined per second, every source of --sources on.
Usage: python benchmarks/mine.py [--config pipelines/quickstart.yaml] [--run-id ID]
       [--sources ann,category] [--per-positive 10]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from recsys_hnm.config import load_config
from recsys_hnm.offline import mine


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="pipelines/quickstart.yaml")
    parser.add_argument("--run-id", help="mine this finished run instead of training a 1-epoch one")
    parser.add_argument("--sources", default="ann,category")
    parser.add_argument("--per-positive", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        run_id = args.run_id
        if run_id is None:
            from recsys_hnm.experiment import train

            config = load_config(args.config, ["train.epochs=1", "train.progress=false", f"tracking.uri={uri}",
                                               f"train.checkpoint_dir={Path(tmp) / 'ckpt'}"])
            run_id = train(config).run_id
        else:
            uri = None
        out = Path(tmp) / "mined.parquet"
        start = time.perf_counter()
        rows = mine(run_id, str(out), sources=tuple(args.sources.split(",")), per_positive=args.per_positive,
                    uri=uri, progress=False)
        seconds = time.perf_counter() - start
        size = out.stat().st_size
    positives = rows // args.per_positive
    return {"config": args.config, "sources": args.sources, "per_positive": args.per_positive, "positives": positives,
            "rows": rows, "seconds": round(seconds, 2), "positives_per_s": round(positives / seconds),
            "file_mb": round(size / 2 ** 20, 1)}


if __name__ == "__main__":
    print(json.dumps(main()))
