"""Negative draws per second of each sampler on a synthetic 1,000,000-item catalog; prints JSON.

Each figure is the best of several timed calls of ``sample`` (draws only) for a batch of 4096
rows and 64 negatives per row. ``mixture`` also computes the mixture logQ of every drawn item
and the known-positive mask, i.e. everything the trainer asks of it per step.
"""

import json
import time

import numpy as np
import scipy.sparse as sp
import torch

from recsys_hnm.sampling import (
    CategorySampler, Context, CopurchaseSampler, KnownPositives, MixtureSampler, PopularitySampler, UniformSampler,
)

N_ITEMS, BATCH, NEGATIVES, N_USERS = 1_000_000, 4096, 64, 100_000


def best_rate(fn, n_draws: int, repeats: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_draws / best


def main() -> dict:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    counts = np.floor(1e6 / np.arange(1, N_ITEMS + 1) ** 1.0).astype(np.int64) + 1  # Zipf popularity
    rng.shuffle(counts)
    n_cats = 1000
    item_cats = sp.csr_matrix((np.ones(N_ITEMS), (np.arange(N_ITEMS), rng.integers(0, n_cats, N_ITEMS))), shape=(N_ITEMS, n_cats))
    # co-purchase graph: 10 random neighbours per item with Zipf-like counts, symmetrised
    rows = np.repeat(np.arange(N_ITEMS), 10)
    cols = rng.integers(0, N_ITEMS, len(rows))
    graph = sp.csr_matrix((rng.zipf(2.0, len(rows)).astype(np.float64), (rows, cols)), shape=(N_ITEMS, N_ITEMS))
    graph = (graph + graph.T).tocsr()
    graph.setdiag(0)
    graph.eliminate_zeros()
    known = sp.csr_matrix((np.ones(N_USERS * 20), (np.repeat(np.arange(N_USERS), 20), rng.integers(0, N_ITEMS, N_USERS * 20))), shape=(N_USERS, N_ITEMS))

    build = {}
    start = time.perf_counter()
    uniform = UniformSampler(N_ITEMS, shared=False)
    popularity = PopularitySampler(counts, alpha=0.75, shared=False)
    build["popularity"] = time.perf_counter() - start
    start = time.perf_counter()
    category = CategorySampler(item_cats, uniform, counts, alpha=0.75)
    build["category"] = time.perf_counter() - start
    start = time.perf_counter()
    copurchase = CopurchaseSampler(graph, uniform, beta=1.0)
    build["copurchase"] = time.perf_counter() - start

    gen = torch.Generator().manual_seed(0)
    ctx = Context(torch.randint(0, N_USERS, (BATCH,), generator=gen), torch.randint(0, N_ITEMS, (BATCH,), generator=gen))
    n = BATCH * NEGATIVES
    out = {"catalog": N_ITEMS, "batch": BATCH, "negatives": NEGATIVES, "threads": 2, "samplers": {}}
    for name, sampler in (("uniform", uniform), ("popularity", popularity), ("category", category), ("copurchase", copurchase)):
        out["samplers"][name] = {"negatives_per_s": round(best_rate(lambda: sampler.sample(ctx, NEGATIVES, gen), n))}
    mixture = MixtureSampler(
        {"uniform": uniform, "popularity": popularity, "category": category, "copurchase": copurchase},
        {"uniform": 0.25, "popularity": 0.25, "category": 0.25, "copurchase": 0.25},
        NEGATIVES, KnownPositives(known), logq="mixture",
    )
    out["samplers"]["mixture"] = {"negatives_per_s": round(best_rate(lambda: mixture.sample(ctx, gen), n)),
                                  "includes": "draws + mixture logQ of every item + known-positive mask"}
    out["build_s"] = {k: round(v, 3) for k, v in build.items()}
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
