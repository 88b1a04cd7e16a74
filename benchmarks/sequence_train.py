"""Per-position (SASRec) training at catalog scale: positions per second and peak memory of
one training step for each way of finding a position's negatives, on synthetic catalogs; prints
JSON.

Methods, at --negatives per position (N):
  uniform   N shared uniform draws, logQ-corrected;
  selected  in-batch (every target of the step) + 4N uniform, each position keeping its N
            highest-scoring candidates (sampler.select.mode=hardest, the easy rest dropped: SCE);
  mined     in-batch + N/2 uniform + N/2 index-mined per position (sampler.ann.anchor=position:
            each position's output searched in the item index, ranks [10, 10 + 4N)); the index
            build of a refresh is reported apart (once per epoch);
  full      the exact cross-entropy over every item, chunked (8,192 items at a time).

Each (catalog, method) runs in its own process, so peak RSS is that run's own; ``step_mb`` is
how far the steps raise it above the setup's high-water mark (data, model, optimizer). Data:
one user per 10 items, 20 events each (plus one for every item drawn by none: the catalog is the
size asked for), windows of 20 positions, --batch windows per step.
Usage: python benchmarks/sequence_train.py [--sizes 10000 100000 1000000] [--steps 10]
       [--negatives 256] [--batch 64] [--methods uniform selected mined full]
"""

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("uniform", "selected", "mined", "full")


def overrides(method: str, n: int) -> list[str]:
    if method == "uniform":
        return [f"sampler.num_negatives={n}", 'sampler.mixture={"uniform": 1}']
    if method == "selected":
        return [f"sampler.num_negatives={4 * n}", 'sampler.mixture={"in_batch": 1, "uniform": 1}',
                "sampler.select.mode=hardest", f"sampler.select.k={n}"]
    if method == "mined":
        return [f"sampler.num_negatives={n}", 'sampler.mixture={"in_batch": 1, "uniform": 1, "ann": 1}',
                "sampler.ann.anchor=position", f"sampler.ann.window=[10, {10 + 4 * n}]", "sampler.ann.warmup_epochs=0",
                "sampler.ann.backend=auto", "sampler.ann.recall_sample=50"]
    return ['sampler.mixture={"full": 1}']


def rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def catalog(items: int):
    """Synthetic events over exactly ``items`` items: one user per 10 items, 20 events each, and
    every item the Zipf tail never drew given one event (a copy of a random event's user and
    time): without it a 1,000,000-item catalog had 412,924 items in the data, and so in the
    model, the index and the full softmax."""
    import numpy as np
    import pandas as pd

    from recsys_hnm.data import Interactions, synthetic_frames

    users = max(items // 10, 100)
    events, item_frame = synthetic_frames(users, items, 20 * users, n_categories=max(items // 500, 20), seed=0)
    unseen = np.setdiff1d(item_frame["item_id"].to_numpy(), events["item_id"].to_numpy())
    extra = events.sample(len(unseen), replace=True, random_state=0).assign(item_id=unseen)
    data = Interactions.from_frames(pd.concat([events, extra], ignore_index=True), item_frame, source="synthetic")
    assert data.n_items == items, (data.n_items, items)
    return data


def run(items: int, method: str, steps: int, n: int, batch: int, queue) -> None:
    from recsys_hnm.config import load_config
    from recsys_hnm.data import leave_last_out
    from recsys_hnm.experiment import build_sampler, build_trainer

    torch.set_num_threads(1)
    config = load_config("pipelines/sasrec.yaml", overrides(method, n) + [
        "train.progress=false", f"train.batch_size={batch}", "model.history_len=20", "train.embedding_optimizer=sparse_adam",
        "model.item_bias=false", "model.user_id=false", "model.temperature=0.05", "model.history_decay=1.0"])
    data = catalog(items)
    split = leave_last_out(data)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, refresh = build_trainer(config, data, split, build_sampler(config, data, split), [], Path(tmp) / "items.index",
                                         validate=False)
        trainer.diagnostics = None  # the training cost, not the diagnostics'
        out = {}
        if refresh is not None:
            start = time.perf_counter()
            refresh.on_fit_start(trainer)
            refresh.on_epoch_start(trainer, 0)
            out["refresh_s"] = round(time.perf_counter() - start, 2)
        setup = rss_mb()
        trainer.model.train()
        order = torch.randperm(len(trainer.users), generator=torch.Generator().manual_seed(0))
        positions, start = 0, None
        for i in range(steps + 1):  # the first step warms up
            if i == 1:
                start = time.perf_counter()
            idx = order[(i * batch) % len(order):][:batch]
            trainer.sequence_step(trainer.users[idx], trainer.ends[idx])
            if i >= 1:
                positions += int((trainer.ends[idx] - (trainer.ends[idx] - 20).clamp(min=1)).sum())
        seconds = time.perf_counter() - start
    out.update({"positions_per_s": round(positions / seconds), "s_per_step": round(seconds / steps, 3),
                "positions_per_step": round(positions / steps), "peak_rss_mb": rss_mb(), "step_mb": rss_mb() - setup,
                "items": data.n_items})
    queue.put(out)


def measure(*args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="windows (user sequences) per step")
    args = parser.parse_args()
    sizes = []
    for items in args.sizes:
        entry = {"items": items}
        for method in args.methods:
            result = measure(items, method, args.steps, args.negatives, args.batch)
            result.pop("items")
            entry[method] = result
            print(json.dumps({"items": items, method: result}), flush=True)
        sizes.append(entry)
    print(json.dumps({"sizes": sizes, "steps": args.steps, "negatives": args.negatives, "batch_windows": args.batch,
                      "threads": 1}))


if __name__ == "__main__":
    main()
