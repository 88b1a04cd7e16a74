"""Training and evaluation speed of the default config on the shipped dataset; prints JSON.

epoch_s: one training epoch (in-batch + shared uniform negatives, mixture logQ, diagnostics on);
eval_s: one full-ranking validation pass (embed all users and items, score, mask, top-k,
metrics); eval_matmul_s: the bare users x items score matmul that no evaluator can avoid.
Usage: python benchmarks/train_throughput.py [--config pipelines/quickstart.yaml] [--threads 1]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from recsys_hnm.config import load_config
from recsys_hnm.experiment import build_sampler, build_trainer, choose_settings, load_data
from recsys_hnm.models import item_embeddings, user_embeddings


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="pipelines/quickstart.yaml")
    parser.add_argument("--threads", type=int, default=None, help="default: the config's train.num_threads")
    args = parser.parse_args()
    config = load_config(args.config)
    threads = args.threads or config.train.num_threads
    torch.set_num_threads(threads)
    config.train.progress = False
    data, split = load_data(config)
    config, _ = choose_settings(config, data, split, probe=False)  # "auto" settings: the rules' pick
    with tempfile.TemporaryDirectory() as tmp:  # the experiment's own trainer: same features, options
        trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], Path(tmp) / "items.index")
    model, features, evaluator = trainer.model, trainer.features, trainer.evaluator
    start = time.perf_counter()
    trainer.train_epoch(0)
    epoch_s = time.perf_counter() - start
    trainer.evaluate()  # warm-up
    start = time.perf_counter()
    trainer.evaluate()
    eval_s = time.perf_counter() - start
    users = user_embeddings(model, features)[evaluator.users]
    items = item_embeddings(model, features)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        users @ items.T
        best = min(best, time.perf_counter() - start)
    return {
        "config": args.config, "threads": threads, "train_examples": len(split.train),
        "examples_per_s": round(len(split.train) / epoch_s), "epoch_s": round(epoch_s, 2),
        "eval_users": len(evaluator.users), "eval_s": round(eval_s, 4), "eval_matmul_s": round(best, 4),
        "eval_over_matmul": round(eval_s / best, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
