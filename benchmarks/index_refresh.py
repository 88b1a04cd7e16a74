"""A full index refresh (build + mining the pools of 100,000 users) with Annoy, faiss HNSW and faiss IVF vs exact search,
on clustered d=64 embeddings of 100,000 and 1,000,000 items (clusters of --items-per-cluster
items, queries drawn around the same centres); prints JSON, one object per size.

Exact search is timed on a sample of queries and scaled linearly (said so in the output).
Annoy: 10 trees, search_k 10,000; HNSW and IVF: the library's defaults (M, efConstruction, efSearch;
nlist, nprobe in the JSON); both cores.
"best": the backend with the largest speedup over exact among those with recall@100 >= 0.9.
Usage: python benchmarks/index_refresh.py [--sizes 100000 1000000] [--queries 100000]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recsys_hnm.index import AnnoyItemIndex, ExactIndex, HnswItemIndex, IvfItemIndex, recall_at_k
from recsys_hnm.index.item_index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, IVF_NPROBE

DIM, K = 64, 100


def clustered(n: int, rng, per_cluster: int) -> np.ndarray:
    """Unit vectors around n / per_cluster random centres (noise 0.5 per coordinate)."""
    n_clusters = max(1, n // per_cluster)
    centres = np.random.default_rng(1).normal(size=(n_clusters, DIM)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + 0.5 * rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run(n_items: int, n_queries: int, exact_sample: int, n_trees: int, search_k: int, jobs: int, per_cluster: int) -> dict:
    rng = np.random.default_rng(0)
    items = clustered(n_items, rng, per_cluster)
    queries = clustered(n_queries, rng, per_cluster)  # queries (users) live among the same clusters
    out = {"items": n_items, "queries": n_queries, "dim": DIM, "k": K, "items_per_cluster": per_cluster}
    builders = {
        "annoy": lambda path: AnnoyItemIndex.build(items, path, n_trees=n_trees, search_k=search_k, n_jobs=jobs),
        "hnsw": lambda path: HnswItemIndex.build(items, path, n_jobs=jobs),
        "ivf": lambda path: IvfItemIndex.build(items, path, n_jobs=jobs),
    }
    timed, nlist = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in builders.items():
            start = time.perf_counter()
            index = build(Path(tmp) / f"items.{name}")
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            found = index.search(queries, K)
            timed[name] = (build_s, time.perf_counter() - start, found)
            nlist[name] = index.meta.get("nlist")
    exact = ExactIndex(items)
    sample = min(exact_sample, n_queries)
    start = time.perf_counter()
    truth = exact.search(queries[:sample], K)
    exact_sample_s = time.perf_counter() - start
    exact_mine_s = exact_sample_s * n_queries / sample
    for name, (build_s, mine_s, found) in timed.items():
        out[name] = {
            "threads": jobs, "build_s": round(build_s, 2), "mine_s": round(mine_s, 2), "refresh_s": round(build_s + mine_s, 2),
            "queries_per_s": round(n_queries / mine_s), "recall_at_100": round(recall_at_k(found[:sample], truth), 4),
            "speedup": round(exact_mine_s / (build_s + mine_s), 2),
        }
    out["annoy"].update(n_trees=n_trees, search_k=search_k)
    out["hnsw"].update(m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH)
    out["ivf"].update(nlist=nlist["ivf"], nprobe=IVF_NPROBE)
    out["exact"] = {"mine_s": round(exact_mine_s, 2), "queries_per_s": round(n_queries / exact_mine_s),
                    "timed_queries": sample, "scaled_linearly": sample < n_queries}
    good = [name for name in timed if out[name]["recall_at_100"] >= 0.9]
    best = max(good, key=lambda name: out[name]["speedup"]) if good else "exact"
    out["best"] = {"backend": best, "speedup": out[best]["speedup"] if good else 1.0,
                   "recall_at_100": out[best]["recall_at_100"] if good else 1.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--exact-sample", type=int, default=5_000)
    parser.add_argument("--n-trees", type=int, default=10)
    parser.add_argument("--search-k", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--items-per-cluster", type=int, default=100, help="cluster size (a fine category)")
    args = parser.parse_args()
    torch.set_num_threads(args.jobs)
    for n in args.sizes:
        print(json.dumps(run(n, args.queries, args.exact_sample, args.n_trees, args.search_k, args.jobs, args.items_per_cluster)), flush=True)


if __name__ == "__main__":
    main()
