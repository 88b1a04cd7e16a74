"""Item indexes over embeddings: Annoy (approximate) and exact (matmul + top-k), one interface.

Both answer "the top-k items for each query vector by inner product, leaving out each query's
excluded items". L2-normalised embeddings use Annoy's angular metric (same order as the dot
product); other vectors use the standard MIPS augmentation: items get an extra coordinate
sqrt(M^2 - |x|^2), queries a 0, and the Euclidean nearest neighbour is the maximum inner product.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from annoy import AnnoyIndex

from ..config import AnnConfig
from ..evaluation.evaluator import mask_known, top_k
from ..io import atomic_write
from ..sparse import SortedPairs

# Measured on 2 cores (benchmarks/index_refresh.py, README): below 100,000 items exact search
# wins; from there faiss HNSW refreshes fastest (Annoy loses to exact at 100,000 items).
AUTO_HNSW_MIN_ITEMS = 100_000
# HNSW defaults: those of the config (chosen there by measurement)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = AnnConfig.hnsw_m, AnnConfig.ef_construction, AnnConfig.ef_search


class IndexFileError(ValueError):
    """An index file that cannot be used (missing, truncated, another dimension)."""


class ItemIndex(Protocol):
    n_items: int
    dim: int

    def search(self, queries: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
        """[Q, k] item indices, best first; -1 where fewer than k items are left."""
        ...

    def save(self, path: str | Path) -> None: ...


def is_normalised(vectors: np.ndarray, tol: float = 1e-3) -> bool:
    norms = np.linalg.norm(vectors, axis=1)
    return bool(np.all(np.abs(norms - 1.0) < tol))


class ExactIndex:
    """Brute force in chunks of queries, so memory stays at ``chunk_cells`` scores."""

    def __init__(self, vectors: np.ndarray | torch.Tensor, chunk_cells: int = 1 << 25):
        self.vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        self.n_items, self.dim = self.vectors.shape
        self.chunk = max(1, chunk_cells // max(self.n_items, 1))

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        return queries @ self.vectors.T

    def search(self, queries: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
        k_eff = min(k, self.n_items)
        out = np.full((len(q), k), -1, dtype=np.int64)
        for start in range(0, len(q), self.chunk):
            s = self.scores(q[start:start + self.chunk])
            if exclude is not None:
                mask_known(s, exclude, torch.arange(start, start + len(s)))
            indices, values = top_k(s, k_eff)
            idx = indices.numpy()
            idx[~np.isfinite(values.numpy())] = -1
            out[start:start + len(s), :k_eff] = idx
        return out

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(self.vectors, tmp))
        _write_meta(Path(path), {"backend": "exact", "dim": self.dim, "n_items": self.n_items})


class AnnoyItemIndex:
    """An Annoy index kept in a file and memory-mapped, so threads (Annoy releases the GIL
    while searching) and other processes share one copy.

    ``search_k`` is Annoy's per-query node budget (-1: n_trees x k); ``n_jobs`` threads build the
    trees and answer queries.
    """

    def __init__(self, index: AnnoyIndex, meta: dict, path: Path, search_k: int = -1, n_jobs: int = 2):
        self.index = index
        self.meta = meta
        self.path = path
        self.n_items = meta["n_items"]
        self.dim = meta["dim"]
        self.search_k = search_k
        self.n_jobs = max(1, n_jobs)

    @classmethod
    def build(cls, vectors: np.ndarray, path: str | Path, n_trees: int = 10, search_k: int = -1, n_jobs: int = 2, seed: int = 0) -> "AnnoyItemIndex":
        vectors = np.asarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        stored, augmented = _mips_vectors(vectors)
        metric = "euclidean" if augmented else "angular"
        index = AnnoyIndex(stored.shape[1], metric)
        index.set_seed(seed)
        for i, row in enumerate(stored.tolist()):  # Annoy has no bulk add
            index.add_item(i, row)
        index.build(n_trees, n_jobs=n_jobs)
        path = Path(path)
        meta = {"backend": "annoy", "dim": dim, "n_items": n, "metric": metric, "stored_dim": stored.shape[1], "n_trees": n_trees}
        atomic_write(path, index.save)
        meta["bytes"] = path.stat().st_size
        meta["sha256"] = _sha256(path)
        _write_meta(path, meta)
        index.unload()
        return cls.load(path, dim, search_k=search_k, n_jobs=n_jobs, verify=False)

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None, search_k: int = -1, n_jobs: int = 2, verify: bool = True) -> "AnnoyItemIndex":
        """Memory-maps a saved index. ``verify`` checks its checksum first: Annoy trusts the
        file, and a corrupted one of the right size loads and then crashes the process."""
        path = Path(path)
        meta = _checked_meta(path, "annoy", dim, verify)
        index = AnnoyIndex(meta["stored_dim"], meta["metric"])
        if not index.load(str(path)):  # memory-mapped
            raise IndexFileError(f"{path}: Annoy could not load it")
        if index.get_n_items() != meta["n_items"]:
            raise IndexFileError(f"{path}: holds {index.get_n_items()} items, expected {meta['n_items']}")
        return cls(index, meta, path, search_k, n_jobs)

    def search(self, queries: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
        q = _mips_queries(queries, self.meta["metric"] == "euclidean")
        out = np.full((len(q), k), -1, dtype=np.int64)
        extra = np.diff(exclude.indptr) if exclude is not None else np.zeros(len(q), np.int64)

        def run(rows: np.ndarray) -> None:
            for r in rows:
                found = np.asarray(self.index.get_nns_by_vector(q[r].tolist(), int(k + extra[r]), self.search_k), dtype=np.int64)
                if extra[r]:
                    found = found[~np.isin(found, exclude.indices[exclude.indptr[r]:exclude.indptr[r + 1]])]
                found = found[:k]
                out[r, :len(found)] = found

        chunks = np.array_split(np.arange(len(q)), self.n_jobs * 8)
        with ThreadPoolExecutor(self.n_jobs) as pool:
            list(pool.map(run, chunks))
        return out

    def save(self, path: str | Path) -> None:
        _copy_index(self.path, Path(path), self.meta)


class HnswItemIndex:
    """A faiss HNSW graph (``IndexHNSWFlat``, inner product) kept in a file: ``m`` links per node,
    ``ef_construction`` and ``ef_search`` the build and search beam widths (search uses at least
    k); faiss searches a batch of queries on ``n_jobs`` threads."""

    def __init__(self, index, meta: dict, path: Path, ef_search: int = HNSW_EF_SEARCH, n_jobs: int = 2):
        self.index, self.meta, self.path = index, meta, path
        self.n_items, self.dim = meta["n_items"], meta["dim"]
        self.ef_search, self.n_jobs = ef_search, max(1, n_jobs)

    @classmethod
    def build(cls, vectors: np.ndarray, path: str | Path, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
              ef_search: int = HNSW_EF_SEARCH, n_jobs: int = 2, seed: int = 0) -> "HnswItemIndex":
        import faiss

        vectors = np.asarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        faiss.omp_set_num_threads(max(1, n_jobs))
        # unit vectors: inner product directly; others: the MIPS augmentation to L2, since a graph
        # over inner products, which is no metric, loses recall (0.91 at 2,000 items in the test)
        stored, augmented = _mips_vectors(vectors)
        metric = "l2" if augmented else "inner_product"
        index = faiss.IndexHNSWFlat(stored.shape[1], m, faiss.METRIC_L2 if augmented else faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(np.ascontiguousarray(stored))  # insertion order is the only randomness: deterministic for given vectors
        path = Path(path)
        atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
        meta = {"backend": "hnsw", "dim": dim, "n_items": n, "metric": metric, "m": m, "ef_construction": ef_construction,
                "bytes": path.stat().st_size, "sha256": _sha256(path)}
        _write_meta(path, meta)
        return cls(index, meta, path, ef_search, n_jobs)

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None, ef_search: int = HNSW_EF_SEARCH, n_jobs: int = 2, verify: bool = True) -> "HnswItemIndex":
        import faiss

        path = Path(path)
        meta = _checked_meta(path, "hnsw", dim, verify)
        index = faiss.read_index(str(path))
        if index.ntotal != meta["n_items"]:
            raise IndexFileError(f"{path}: holds {index.ntotal} items, expected {meta['n_items']}")
        return cls(index, meta, path, ef_search, n_jobs)

    def search(self, queries: np.ndarray, k: int, exclude: sp.csr_matrix | None = None, chunk: int = 1024) -> np.ndarray:
        import faiss

        faiss.omp_set_num_threads(self.n_jobs)
        q = np.ascontiguousarray(_mips_queries(queries, self.meta["metric"] == "l2"))
        out = np.full((len(q), k), -1, dtype=np.int64)
        extra = np.diff(exclude.indptr) if exclude is not None else np.zeros(len(q), np.int64)
        excluded = SortedPairs(exclude) if exclude is not None else None
        for start in range(0, len(q), chunk):
            rows = np.arange(start, min(start + chunk, len(q)))
            kk = int(min(k + extra[rows].max(), self.n_items))  # room for the excluded items
            self.index.hnsw.efSearch = max(self.ef_search, kk)
            _, found = self.index.search(q[rows], kk)
            drop = found < 0
            if excluded is not None:
                drop |= (excluded.find(torch.from_numpy(rows), torch.from_numpy(np.maximum(found, 0))) >= 0).numpy()
            # kept items first, in the search's order; fewer than k left: -1
            order = np.argsort(drop, axis=1, kind="stable")[:, :k]
            kept = np.take_along_axis(found, order, 1)
            kept[np.take_along_axis(drop, order, 1)] = -1
            out[rows, :kept.shape[1]] = kept
        return out

    def save(self, path: str | Path) -> None:
        _copy_index(self.path, Path(path), self.meta)


BACKENDS = ("auto", "exact", "annoy", "hnsw")


def make_index(vectors: np.ndarray, backend: str = "auto", path: str | Path | None = None, *, n_trees: int = 10,
               search_k: int = -1, n_jobs: int = 2, seed: int = 0, hnsw_m: int = HNSW_M,
               ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH) -> ItemIndex:
    """``exact``, ``annoy``, ``hnsw`` (faiss), or ``auto``: what measured fastest per catalog size
    (exact below AUTO_HNSW_MIN_ITEMS, HNSW from there: 5.8x exact at 100,000 items and 8.1x at
    1,000,000, where Annoy is 3.9x; Annoy stays the memory-mapped, fork-friendly choice)."""
    if backend not in BACKENDS:
        raise ValueError(f"index backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        backend = "exact" if len(vectors) < AUTO_HNSW_MIN_ITEMS else "hnsw"
    if backend == "exact":
        return ExactIndex(vectors)
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="recsys-hnm-index-")) / "items.index"
    if backend == "hnsw":
        return HnswItemIndex.build(vectors, path, hnsw_m, ef_construction, ef_search, n_jobs, seed)
    return AnnoyItemIndex.build(vectors, path, n_trees=n_trees, search_k=search_k, n_jobs=n_jobs, seed=seed)


def load_index(path: str | Path, dim: int | None = None, **options) -> ItemIndex:
    """An index saved by ``save``, refused with a clear error when missing, truncated or built
    for another dimension. ``options``: search settings; each backend takes its own
    (annoy: search_k, n_jobs; hnsw: ef_search, n_jobs) and the rest do not apply to it."""
    meta = _read_meta(Path(path))
    if meta["backend"] == "annoy":
        return AnnoyItemIndex.load(path, dim, **{k: options[k] for k in ("search_k", "n_jobs") if k in options})
    if meta["backend"] == "hnsw":
        return HnswItemIndex.load(path, dim, **{k: options[k] for k in ("ef_search", "n_jobs") if k in options})
    vectors = torch.load(path, weights_only=True)
    if dim is not None and vectors.shape[1] != dim:
        raise IndexFileError(f"{path}: built for dimension {vectors.shape[1]}, not {dim}")
    return ExactIndex(vectors)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k found by the approximate search (per query, averaged)."""
    hits = [len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max((e >= 0).sum(), 1) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 1.0


def _mips_vectors(vectors: np.ndarray) -> tuple[np.ndarray, bool]:
    """(stored vectors, augmented): unit vectors as they are; others with the extra coordinate
    sqrt(M^2 - |x|^2) that makes the Euclidean nearest neighbour the maximum inner product."""
    if is_normalised(vectors):
        return vectors, False
    norms2 = (vectors.astype(np.float64) ** 2).sum(1)
    extra = np.sqrt(np.maximum(norms2.max() - norms2, 0.0)).astype(np.float32)
    return np.hstack([vectors, extra[:, None]]), True


def _mips_queries(queries: np.ndarray, augmented: bool) -> np.ndarray:
    """Queries as the index stores vectors: a 0 coordinate appended when it is augmented."""
    q = np.asarray(queries, dtype=np.float32)
    return np.hstack([q, np.zeros((len(q), 1), np.float32)]) if augmented else q


def _checked_meta(path: Path, backend: str, dim: int | None, verify: bool) -> dict:
    """The metadata of a saved index file, refused when it is another backend, another dimension,
    truncated, or (``verify``) its checksum does not match."""
    meta = _read_meta(path)
    if meta.get("backend") != backend:
        raise IndexFileError(f"{path}: not an {backend} index (backend {meta.get('backend')!r})")
    if dim is not None and meta["dim"] != dim:
        raise IndexFileError(f"{path}: built for dimension {meta['dim']}, not {dim}")
    size = path.stat().st_size
    if size != meta["bytes"]:
        raise IndexFileError(f"{path}: {size} bytes, expected {meta['bytes']} (truncated or replaced?)")
    if verify and _sha256(path) != meta.get("sha256"):
        raise IndexFileError(f"{path}: its checksum does not match {_meta_path(path).name} (corrupted or replaced?)")
    return meta


def _copy_index(source: Path, path: Path, meta: dict) -> None:
    if path.resolve() != source.resolve():
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(source.read_bytes()))
        _write_meta(path, meta)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write(_meta_path(path), lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise IndexFileError(f"index file not found: {path}")
    meta_path = _meta_path(path)
    if not meta_path.is_file():
        raise IndexFileError(f"{path}: its metadata file {meta_path.name} is missing")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise IndexFileError(f"{meta_path}: unreadable ({e})") from e
