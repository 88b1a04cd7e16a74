"""Item indexes over embeddings: exact (matmul + top-k), Annoy, and faiss HNSW and IVF, one interface.

All answer "the top-k items for each query vector by inner product, leaving out each query's
excluded items". L2-normalised embeddings use Annoy's angular metric (same order as the dot
product); other vectors use the standard MIPS augmentation: items get an extra coordinate
sqrt(M^2 - |x|^2), queries a 0, and the Euclidean nearest neighbour is the maximum inner product.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from annoy import AnnoyIndex

from ..ops.ranking import mask_known
from ..ops.io import atomic_write
from ..ops.sparse import SortedPairs

# Measured on 2 cores (benchmarks/index_refresh.py, README): below 100,000 items exact search
# wins; from there faiss IVF refreshes fastest (HNSW's build is most of its refresh, and Annoy
# loses to exact at 100,000 items).
AUTO_ANN_MIN_ITEMS = 100_000
# HNSW: links per node, build and search beam widths: the fastest refresh measured at
# recall@100 >= 0.98 on clustered embeddings (benchmarks/index_refresh.py; 32/80/128 took 2.5x longer).
# IVF: k-means cells (0: 2 sqrt(n)) and how many of the nearest a query scans: 2.2x faster than HNSW
# at 1,000,000 items, recall@100 0.92 on clustered embeddings. The config's ann.* defaults are these.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 16, 40, 100
IVF_NLIST, IVF_NPROBE = 0, 8
IVF_KMEANS_ITERATIONS = 10  # faiss' default is 25: a refresh needs cells, not a converged k-means (recall in the benchmark)


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
            # torch's own order within ties: mining reads a rank window, not a tie-exact list
            # (top_k's tie rule sorts twice more, most of a mining step's cost)
            values, indices = torch.topk(s, k_eff, dim=1)
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


class FaissItemIndex:
    """A faiss index kept in a file, over the vectors as ``_mips_vectors`` stores them (inner
    product for unit vectors, else the MIPS augmentation to L2, since an index over inner
    products, which is no metric, loses recall: 0.91 at 2,000 items in the HNSW test). faiss
    searches a batch of queries on ``n_jobs`` threads. Subclasses say how the index is made
    (``_new``) and set its search width for ``k`` results (``_prepare``)."""

    backend = ""

    def __init__(self, index, meta: dict, path: Path, n_jobs: int = 2):
        self.index, self.meta, self.path = index, meta, path
        self.n_items, self.dim = meta["n_items"], meta["dim"]
        self.n_jobs = max(1, n_jobs)

    @classmethod
    def _build(cls, vectors: np.ndarray, path: str | Path, n_jobs: int, params: dict, **new_options) -> tuple:
        """(faiss index, meta, path): made by ``_new``, filled with ``vectors``, written atomically with its metadata."""
        import faiss

        vectors = np.asarray(vectors, dtype=np.float32)
        n, dim = vectors.shape
        faiss.omp_set_num_threads(max(1, n_jobs))
        stored, augmented = _mips_vectors(vectors)
        stored = np.ascontiguousarray(stored)
        index = cls._new(stored, faiss.METRIC_L2 if augmented else faiss.METRIC_INNER_PRODUCT, **new_options)
        index.add(stored)
        path = Path(path)
        atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
        meta = {"backend": cls.backend, "dim": dim, "n_items": n, "metric": "l2" if augmented else "inner_product", **params,
                "bytes": path.stat().st_size, "sha256": _sha256(path)}
        _write_meta(path, meta)
        return index, meta, path

    @classmethod
    def _read(cls, path: str | Path, dim: int | None, verify: bool) -> tuple:
        import faiss

        path = Path(path)
        meta = _checked_meta(path, cls.backend, dim, verify)
        index = faiss.read_index(str(path))
        if index.ntotal != meta["n_items"]:
            raise IndexFileError(f"{path}: holds {index.ntotal} items, expected {meta['n_items']}")
        return index, meta, path

    @staticmethod
    def _new(stored: np.ndarray, metric: int, **options):
        raise NotImplementedError

    def _prepare(self, k: int) -> None:
        """Set the search width for ``k`` results."""

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
            self._prepare(kk)
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


class HnswItemIndex(FaissItemIndex):
    """faiss HNSW (``IndexHNSWFlat``): ``m`` links per node, ``ef_construction`` and ``ef_search``
    the build and search beam widths (search uses at least k)."""

    backend = "hnsw"

    def __init__(self, index, meta: dict, path: Path, ef_search: int = HNSW_EF_SEARCH, n_jobs: int = 2):
        super().__init__(index, meta, path, n_jobs)
        self.ef_search = ef_search

    @classmethod
    def build(cls, vectors: np.ndarray, path: str | Path, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
              ef_search: int = HNSW_EF_SEARCH, n_jobs: int = 2, seed: int = 0) -> "HnswItemIndex":
        # insertion order is the only randomness: deterministic for given vectors, whatever the seed
        index, meta, path = cls._build(vectors, path, n_jobs, {"m": m, "ef_construction": ef_construction}, m=m, ef_construction=ef_construction)
        return cls(index, meta, path, ef_search, n_jobs)

    @staticmethod
    def _new(stored: np.ndarray, metric: int, m: int, ef_construction: int):
        import faiss

        index = faiss.IndexHNSWFlat(stored.shape[1], m, metric)
        index.hnsw.efConstruction = ef_construction
        return index

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None, ef_search: int = HNSW_EF_SEARCH, n_jobs: int = 2, verify: bool = True) -> "HnswItemIndex":
        return cls(*cls._read(path, dim, verify), ef_search, n_jobs)

    def _prepare(self, k: int) -> None:
        self.index.hnsw.efSearch = max(self.ef_search, k)


class IvfItemIndex(FaissItemIndex):
    """faiss inverted lists (``IndexIVFFlat``): k-means cuts the items into ``nlist`` cells (0:
    2 sqrt(n)), and a query scans the items of its ``nprobe`` nearest cells exactly. Its build is
    a short k-means and one assignment pass, which is what a refresh every epoch needs: at
    1,000,000 items it refreshed 2.2x faster than HNSW at recall@100 0.92 (benchmarks/index_refresh.py)."""

    backend = "ivf"

    def __init__(self, index, meta: dict, path: Path, nprobe: int = IVF_NPROBE, n_jobs: int = 2):
        super().__init__(index, meta, path, n_jobs)
        self.nprobe = nprobe

    @classmethod
    def build(cls, vectors: np.ndarray, path: str | Path, nlist: int = 0, nprobe: int = IVF_NPROBE, n_jobs: int = 2,
              seed: int = 0) -> "IvfItemIndex":
        n = len(vectors)
        nlist = int(min(n, nlist or max(1, round(2 * np.sqrt(n)))))
        index, meta, path = cls._build(vectors, path, n_jobs, {"nlist": nlist}, nlist=nlist, seed=seed)
        return cls(index, meta, path, nprobe, n_jobs)

    @staticmethod
    def _new(stored: np.ndarray, metric: int, nlist: int, seed: int):
        import faiss

        quantizer = faiss.IndexFlatIP(stored.shape[1]) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(stored.shape[1])
        index = faiss.IndexIVFFlat(quantizer, stored.shape[1], nlist, metric)
        index.cp.niter, index.cp.seed = IVF_KMEANS_ITERATIONS, seed
        # k-means on a seeded sample of 40 points per cell (faiss asks for at least 39)
        sample = np.random.default_rng(seed).choice(len(stored), min(len(stored), 40 * nlist), replace=False)
        index.train(stored[np.sort(sample)])
        return index

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None, nprobe: int = IVF_NPROBE, n_jobs: int = 2, verify: bool = True) -> "IvfItemIndex":
        return cls(*cls._read(path, dim, verify), nprobe, n_jobs)

    def _prepare(self, k: int) -> None:
        self.index.nprobe = min(self.nprobe, self.meta["nlist"])


BACKENDS = ("auto", "exact", "annoy", "hnsw", "ivf")


@dataclass(frozen=True)
class IndexOptions:
    """Build and search settings of every backend (each reads its own): Annoy's trees and node
    budget, HNSW's links and beam widths, IVF's cells and probes, threads and the build seed."""

    n_trees: int = 10
    search_k: int = -1
    n_jobs: int = 2
    seed: int = 0
    hnsw_m: int = HNSW_M
    ef_construction: int = HNSW_EF_CONSTRUCTION
    ef_search: int = HNSW_EF_SEARCH
    ivf_nlist: int = IVF_NLIST
    ivf_nprobe: int = IVF_NPROBE

    def as_kwargs(self) -> dict:
        """The keyword arguments of ``make_index`` and ``load_index``."""
        return asdict(self)


def make_index(vectors: np.ndarray, backend: str = "auto", path: str | Path | None = None, *, n_trees: int = 10,
               search_k: int = -1, n_jobs: int = 2, seed: int = 0, hnsw_m: int = HNSW_M,
               ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH,
               ivf_nlist: int = IVF_NLIST, ivf_nprobe: int = IVF_NPROBE) -> ItemIndex:
    """``exact``, ``annoy``, ``hnsw`` or ``ivf`` (faiss), or ``auto``: what measured fastest per
    catalog size (benchmarks/index_refresh.py: exact below AUTO_ANN_MIN_ITEMS, IVF from there;
    Annoy stays the memory-mapped, fork-friendly choice)."""
    if backend not in BACKENDS:
        raise ValueError(f"index backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        backend = "exact" if len(vectors) < AUTO_ANN_MIN_ITEMS else "ivf"
    if backend == "exact":
        return ExactIndex(vectors)
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="recsys-hnm-index-")) / "items.index"
    if backend == "hnsw":
        return HnswItemIndex.build(vectors, path, hnsw_m, ef_construction, ef_search, n_jobs, seed)
    if backend == "ivf":
        return IvfItemIndex.build(vectors, path, ivf_nlist, ivf_nprobe, n_jobs, seed)
    return AnnoyItemIndex.build(vectors, path, n_trees=n_trees, search_k=search_k, n_jobs=n_jobs, seed=seed)


def load_index(path: str | Path, dim: int | None = None, **options) -> ItemIndex:
    """An index saved by ``save``, refused with a clear error when missing, truncated or built
    for another dimension. ``options``: search settings; each backend takes its own
    (annoy: search_k, n_jobs; hnsw: ef_search, n_jobs; ivf: ivf_nprobe, n_jobs) and the rest do
    not apply to it."""
    meta = _read_meta(Path(path))
    if meta["backend"] == "annoy":
        return AnnoyItemIndex.load(path, dim, **{k: options[k] for k in ("search_k", "n_jobs") if k in options})
    if meta["backend"] == "hnsw":
        return HnswItemIndex.load(path, dim, **{k: options[k] for k in ("ef_search", "n_jobs") if k in options})
    if meta["backend"] == "ivf":
        return IvfItemIndex.load(path, dim, nprobe=options.get("ivf_nprobe", IVF_NPROBE), n_jobs=options.get("n_jobs", 2))
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
