"""Training speed on 1 process and on 2 processes under torchrun (TorchRec DMP, gloo on CPU),
on the same synthetic data with a 1,000,000-item table; prints JSON.

Each run generates the same seeded data (5 events per item, one user per 20 items), builds the
trainer and times --steps global batches of 1024 after two warm-up steps: one plain process,
one process under torchrun (DMP on a single rank) and two. All use the same table optimizer,
rowwise Adagrad (fbgemm's CPU kernels fuse no Adam): dense in the plain process (every row
updated each step), fused into the lookup's backward under DMP (only the rows looked up). On a
2-core machine two processes share the cores, so 2 against 1 under DMP shows the overhead of
sharding and collectives, not a speed-up.
Usage: python benchmarks/distributed.py [--items 1000000] [--steps 20] [--sharding auto]
Output: {"runs": [{"processes": 1, "examples_per_s": x}, {"processes": 2, "examples_per_s": y}], "items": n,
         "ratio_2_to_1": y / x, "plain_single_process": {"processes": 1, "examples_per_s": z}, ...}
(both "runs" under DMP; the plain process without torchrun beside them)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(items: int, steps: int, sharding: str) -> None:
    import torch.distributed as dist

    from recsys_hnm.config import load_config
    from recsys_hnm.data import leave_last_out, synthetic
    from recsys_hnm.training.distributed import cluster_from_env, shutdown
    from recsys_hnm.experiment import build_sampler, build_trainer, choose_settings

    torch.set_num_threads(1)
    cluster = cluster_from_env()
    config = load_config("pipelines/quickstart.yaml", ["train.progress=false", "train.embedding_optimizer=rowwise_adagrad",
                                                       "train.embedding_lr=0.05", f"distributed.sharding={sharding}"])
    data = synthetic(max(items // 20, 100), items, 5 * items, n_categories=max(items // 500, 20), seed=0)
    split = leave_last_out(data)
    config, _ = choose_settings(config, data, split, probe=False)  # "auto" settings: the rules' pick
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], Path(tmp) / "items.index",
                                   validate=False, cluster=cluster)
    trainer.diagnostics = None  # the training cost, not the diagnostics'
    trainer.model.train()
    rank, world = (cluster.rank, cluster.world) if cluster else (0, 1)
    order = torch.randperm(len(trainer.users), generator=torch.Generator().manual_seed(0))
    batch = config.train.batch_size
    start = None
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            if cluster:
                dist.barrier()
            start = time.perf_counter()
        idx = order[i * batch:(i + 1) * batch][rank::world]
        trainer.train_step(trainer.users[idx], trainer.items[idx], None if trainer.positions is None else trainer.positions[idx])
    if cluster:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        plan = trainer.sharded.placements() if trainer.sharded is not None else None
        print("RESULT " + json.dumps({"processes": world, "examples_per_s": round(steps * batch / seconds, 1), "tables": plan}))
    shutdown()


def launch(processes: int, sharded: bool, args) -> dict:
    script = [str(Path(__file__).resolve()), "--worker", "--items", str(args.items), "--steps", str(args.steps),
              "--sharding", args.sharding]
    if not sharded:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *script]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if out.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{out.stderr[-3000:]}")
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "sharded": sharded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sharding", default="auto", choices=["auto", "table_wise", "row_wise", "column_wise"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.items, args.steps, args.sharding)
        if "TORCHELASTIC_RUN_ID" in os.environ:
            from recsys_hnm.cli import exit_worker

            exit_worker(0)  # a rank may abort in C++ static destructors at exit (see exit_worker)
        return
    # one plain process (the dense table update touches every row each step), one process under
    # torchrun (DMP on one rank: the fused optimizer updates only the rows looked up), two ranks
    plain = launch(1, False, args)
    runs = [launch(1, True, args), launch(2, True, args)]
    print(json.dumps({"runs": runs, "items": args.items, "steps": args.steps, "batch_size": 1024,
                      "ratio_2_to_1": round(runs[1]["examples_per_s"] / runs[0]["examples_per_s"], 3),
                      "plain_single_process": plain}))


if __name__ == "__main__":
    main()
