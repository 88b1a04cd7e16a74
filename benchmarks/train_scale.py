"""Training speed and memory at catalog scale: the default mix (in-batch + uniform) against the
full mix (in-batch, uniform, popularity, same-category, co-purchase and ANN with an index
refresh), on synthetic catalogs (and optionally a real dataset folder); prints JSON.

Each (size, mix) runs in its own process, so peak RSS is that run's own. Per run: the data is
generated (5 events per item, one user per 20 items: long-tail catalogs), the ANN pools are
refreshed once (its seconds reported), then --steps training steps of batch 1024 are timed.
Usage: python benchmarks/train_scale.py [--sizes 10000 100000 1000000] [--dataset ../shared/datasets/epinions]
       [--steps 30] [--per-row-negatives 32] [--embedding-optimizer sparse_adam]
Output: {"sizes": [{"items": N, "default": {"examples_per_s", "peak_rss_mb"},
                    "full": {"examples_per_s", "refresh_s", "peak_rss_mb"}}, ...]}
"""

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

MIXES = {
    "default": {"in_batch": 1.0, "uniform": 1.0},
    "full": {"in_batch": 1.0, "uniform": 0.4, "popularity": 0.2, "category": 0.2, "copurchase": 0.2, "ann": 0.2},
}


def run(items: int | None, dataset: str | None, mix: str, steps: int, per_row: int | None, optimizer: str, queue) -> None:
    from recsys_hnm.config import load_config
    from recsys_hnm.data import leave_last_out, load_dataset, ratio_split, synthetic
    from recsys_hnm.experiment import build_sampler, build_trainer, choose_settings

    torch.set_num_threads(1)
    overrides = [f"sampler.mixture={json.dumps(MIXES[mix])}", "sampler.ann.warmup_epochs=0", "train.progress=false",
                 "sampler.copurchase.source=basket" if dataset is None else "sampler.copurchase.source=auto",
                 "sampler.copurchase.top_n=100", f"train.embedding_optimizer={optimizer}"]
    if per_row is not None:
        overrides.append(f"sampler.per_row_negatives={per_row}")
    config = load_config("pipelines/quickstart.yaml", overrides)
    data = load_dataset(dataset) if dataset else synthetic(max(items // 20, 100), items, 5 * items, n_categories=max(items // 500, 20), seed=0)
    split = leave_last_out(data) if data.has_time else ratio_split(data, by_time=False)
    config, _ = choose_settings(config, data, split, probe=False)  # "auto" settings: the rules' pick
    with tempfile.TemporaryDirectory() as tmp:
        trainer, refresh = build_trainer(config, data, split, build_sampler(config, data, split), [], Path(tmp) / "items.index",
                                         validate=False)
        trainer.diagnostics = None  # the training cost, not the diagnostics'
        out = {}
        if refresh is not None:
            start = time.perf_counter()
            refresh.on_epoch_start(trainer, 0)
            out["refresh_s"] = round(time.perf_counter() - start, 2)
        out["examples_per_s"] = examples_per_s(trainer, config.train.batch_size, steps)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["items"] = data.n_items
    queue.put(out)


def examples_per_s(trainer, batch: int, steps: int) -> int:
    """Training examples per second over ``steps`` steps of shuffled batches, after two warm-up steps."""
    trainer.model.train()
    order = torch.randperm(len(trainer.users), generator=torch.Generator().manual_seed(0))
    positions = trainer.positions
    done, start = 0, None
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        idx = order[(i * batch) % len(order):][:batch]
        trainer.train_step(trainer.users[idx], trainer.items[idx], None if positions is None else positions[idx])
        done += len(idx) if i >= 2 else 0
    return round(done / (time.perf_counter() - start))


def measure(items, dataset, mix, steps, per_row, optimizer) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run, args=(items, dataset, mix, steps, per_row, optimizer, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dataset", help="also a real dataset folder, e.g. ../shared/datasets/epinions")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--per-row-negatives", type=int, default=32, help="per-row sources' own count (sampler.per_row_negatives)")
    parser.add_argument("--embedding-optimizer", default="sparse_adam",
                        help="train.embedding_optimizer: sparse_adam updates only the rows a step looked up; adam every row")
    args = parser.parse_args()
    runs = [(n, None) for n in args.sizes] + ([(None, args.dataset)] if args.dataset else [])
    sizes = []
    for items, dataset in runs:
        default = measure(items, dataset, "default", args.steps, None, args.embedding_optimizer)
        full = measure(items, dataset, "full", args.steps, args.per_row_negatives, args.embedding_optimizer)
        entry = {"items": default.pop("items"), "default": default, "full": {k: v for k, v in full.items() if k != "items"}}
        if dataset:
            entry["dataset"] = dataset
        entry["full_over_default"] = round(full["examples_per_s"] / default["examples_per_s"], 2)
        sizes.append(entry)
        print(json.dumps(entry), flush=True)
    print(json.dumps({"sizes": sizes, "steps": args.steps, "batch": 1024, "per_row_negatives": args.per_row_negatives,
                      "embedding_optimizer": args.embedding_optimizer}))


if __name__ == "__main__":
    main()
