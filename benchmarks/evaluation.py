"""Full-ranking evaluation against the bare score matmul, on random d=64 embeddings with ~20
known (masked) items and 1 relevant item per user; prints JSON, one object per shape.

eval_s: Evaluator.evaluate end to end (score in user chunks, mask the known items, top-50 with the
tie rule, metrics at 10/20/50); matmul_s: the same chunked users x items products alone (the
part no evaluator can avoid). Best of --repeat runs each.
Usage: python benchmarks/evaluation.py [--shapes 610x9724 10000x1000000] [--threads 1]
"""

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from recsys_hnm.data import Interactions, leave_last_out
from recsys_hnm.evaluation import Evaluator
from recsys_hnm.ops.ranking import embedding_scorer

DIM, KNOWN = 64, 20


def measure(n_users: int, n_items: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    # every user: KNOWN train items, one valid, one test (times in that order); every item occurs
    per_user = KNOWN + 2
    items = rng.integers(0, n_items, (n_users, per_user))
    items[:, 0] = np.arange(n_users) % n_items
    events = pd.DataFrame({"user_id": np.repeat(np.arange(n_users), per_user), "item_id": items.ravel(),
                           "timestamp": np.tile(np.arange(per_user), n_users)})
    events = pd.concat([events, pd.DataFrame({"user_id": 0, "item_id": np.arange(n_items), "timestamp": -1})])
    split = leave_last_out(Interactions.from_frames(events, duplicates="first"))
    evaluator = Evaluator(split, "test", ks=[10, 20, 50])
    n = split.data.n_items
    users = torch.nn.functional.normalize(torch.randn(split.data.n_users, DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    item_emb = torch.nn.functional.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(1)), dim=1)
    scorer = embedding_scorer(users, item_emb, 10.0)
    best_eval = best_mm = float("inf")
    chunk = evaluator.chunk_size
    item_t = item_emb.T.contiguous()
    for _ in range(repeat):
        start = time.perf_counter()
        evaluator.evaluate(scorer)
        best_eval = min(best_eval, time.perf_counter() - start)
        start = time.perf_counter()
        for s in range(0, len(evaluator.users), chunk):
            users[evaluator.users[s:s + chunk]] @ item_t
        best_mm = min(best_mm, time.perf_counter() - start)
    return {"users": len(evaluator.users), "items": n, "chunk_users": chunk, "eval_s": round(best_eval, 4),
            "matmul_s": round(best_mm, 4), "eval_over_matmul": round(best_eval / best_mm, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["610x9724", "10000x1000000"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes:
        u, i = (int(x) for x in shape.split("x"))
        results.append({"threads": args.threads, **measure(u, i, args.repeat)})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"shapes": results}))


if __name__ == "__main__":
    main()
