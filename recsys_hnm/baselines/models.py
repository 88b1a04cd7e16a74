"""Strong simple baselines with an ``implicit``-style API: construct with hyperparameters,
``fit(users x items CSR)``, then score users like any ``Scorer`` of the evaluator.

Every baseline returns dense float32 scores [c, n_items] for a chunk of user indices; the
evaluator masks known items and ranks with its tie rule (equal scores: lower item index first).
"""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp
import torch

from ..ops.ranking import Scorer, embedding_scorer
from ..evaluation.evaluator import popularity_scorer


class Baseline:
    """``fit(matrix) -> self``; ``scorer()`` (or calling the model) maps user indices [c] to
    scores [c, n_items]. Subclasses set ``_score`` in ``fit``. ``matrix``: users x items, what
    the user had (binary). A baseline with ``reads_events`` is fit as ``fit(matrix, events)``,
    ``events`` the same as a frame of ``user``, ``item`` and, where the data have them,
    ``timestamp`` and ``basket``, repeats included (the personal-frequency baselines)."""

    name = "baseline"
    reads_events = False
    _score: Scorer | None = None

    def fit(self, matrix: sp.csr_matrix) -> "Baseline":
        raise NotImplementedError

    def scorer(self) -> Scorer:
        if self._score is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before scoring")
        return self._score

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        return self.scorer()(users)

    def params(self) -> dict:
        """The constructor's hyperparameters and their values (what a run logs)."""
        return {k: getattr(self, k) for k in inspect.signature(type(self)).parameters}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


def _csr(matrix) -> sp.csr_matrix:
    m = sp.csr_matrix(matrix, dtype=np.float32)
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def _sparse_scorer(history: sp.csr_matrix, weights) -> Scorer:
    """Scores = history rows of the chunk @ weights (sparse or dense items x items), as a dense
    float32 tensor: the chunk's sparse product is densified only chunk by chunk."""

    def score(users: torch.Tensor) -> torch.Tensor:
        s = history[users.numpy()] @ weights
        s = s.toarray() if sp.issparse(s) else np.asarray(s)
        return torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))

    return score


class MostPop(Baseline):
    """Number of users per item in the fitted matrix, the same for every user. Ties (items with
    the same count) go to the lower item index: the evaluator's rule."""

    name = "mostpop"

    def fit(self, matrix):
        m = _csr(matrix)
        self.counts = m.getnnz(axis=0).astype(np.float32)  # users, not events: weights ignored
        self._score = popularity_scorer(self.counts)
        return self


class ItemKNN(Baseline):
    """Item-based k nearest neighbours (the "ItemKNN-CF" of Ferrari Dacrema et al. 2019).

    sim[i, j] = <x_i, x_j> / (|x_i| |x_j| + shrink) over the item columns of the user x item
    matrix, diagonal 0. Each column j keeps its ``k`` largest similarities (equal ones: lower
    item index), so the score of item j for user u is the sum of sim[i, j] over the items i of
    u's history that are among j's k neighbours: score = x_u @ sim.

    The similarity is computed sparsely, one block of items at a time (rows of X^T X for the
    block), the blocks sized by the number of products they need (``block_products``), so memory
    stays bounded at any catalog size; no dense items x items matrix is ever built.
    """

    name = "itemknn"

    def __init__(self, k: int = 100, shrink: float = 0.0, block_products: int = 20_000_000):
        if k <= 0:
            raise ValueError(f"ItemKNN: k must be > 0, not {k}")
        if shrink < 0:
            raise ValueError(f"ItemKNN: shrink must be >= 0, not {shrink}")
        self.k, self.shrink, self.block_products = int(k), float(shrink), int(block_products)

    def fit(self, matrix):
        x = _csr(matrix)
        n_items = x.shape[1]
        xt = x.T.tocsr()  # items x users: the rows of X^T X for a block of items are xt[block] @ x
        norms = np.sqrt(np.asarray(x.multiply(x).sum(0), dtype=np.float64).ravel())
        # Products needed for item j's row: sum over its users of their history lengths.
        cost = xt.astype(bool).astype(np.float64) @ np.diff(x.indptr).astype(np.float64)
        ends = _block_ends(cost, self.block_products)
        rows, cols, vals = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
        start = 0
        for end in ends:  # a loop over blocks, not items
            block = (xt[start:end] @ x).tocoo()  # co-occurrences of items start..end-1 with all items
            r = block.row.astype(np.int64) + start
            keep = r != block.col  # an item is not its own neighbour
            r, c, v = r[keep], block.col[keep].astype(np.int64), block.data[keep]
            v = v.astype(np.float64) / (norms[r] * norms[c] + self.shrink)  # neighbours chosen in float64
            r, c, v = _top_k_per_row(r, c, v, self.k)
            rows.append(r)
            cols.append(c)
            vals.append(v)
            start = end
        # Row j holds column j of sim (sim is symmetric): transpose to the items x items weights.
        sim_t = sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                              shape=(n_items, n_items))
        self.similarity = sim_t.T.tocsr()
        self._score = _sparse_scorer(x, self.similarity)
        return self


def _block_ends(cost: np.ndarray, budget: int) -> np.ndarray:
    """End indices of consecutive item blocks whose summed cost stays within ``budget`` (a block
    holds at least one item, however costly)."""
    n = len(cost)
    cum = np.cumsum(cost)
    ends, start = [], 0
    while start < n:
        base = cum[start - 1] if start else 0.0
        end = max(int(np.searchsorted(cum, base + budget, side="right")), start + 1)
        ends.append(min(end, n))
        start = end
    return np.asarray(ends, dtype=np.int64)


def _top_k_per_row(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int):
    """The ``k`` largest entries of each row of a COO triplet; equal values: lower column."""
    if len(rows) == 0:
        return rows, cols, vals
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.r_[0, np.flatnonzero(rows[1:] != rows[:-1]) + 1]
    lengths = np.diff(np.r_[starts, len(rows)])
    rank = np.arange(len(rows)) - np.repeat(starts, lengths)
    keep = rank < k
    return rows[keep], cols[keep], vals[keep]


class EASE(Baseline):
    """EASE^R (Steck 2019): B = I - P diag(1 / diag(P)), P = (X^T X + lam I)^-1, so diag(B) = 0;
    score = x_u @ B.

    B is a dense items x items matrix (float32: 4 n^2 bytes, about twice that at the inversion):
    catalogs above ``max_items`` are refused before anything is allocated."""

    name = "ease"

    def __init__(self, lam: float = 100.0, max_items: int = 30_000):
        if lam <= 0:
            raise ValueError(f"EASE: lam must be > 0, not {lam}")
        self.lam, self.max_items = float(lam), int(max_items)

    def fit(self, matrix):
        x = _csr(matrix)
        n = x.shape[1]
        if n > self.max_items:
            gb = 4 * n * n / 1e9
            raise ValueError(
                f"EASE: the catalog has {n:,} items, above max_items={self.max_items:,}; its dense "
                f"{n:,} x {n:,} weight matrix would need {gb:.1f} GB ({2 * gb:.1f} GB to invert). "
                "Use ItemKNN or ALS, or raise max_items if the memory is there."
            )
        gram = (x.T @ x).toarray().astype(np.float32, copy=False)
        gram[np.diag_indices(n)] += self.lam
        b = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)  # P; float32 LAPACK
        del gram
        b /= -np.diag(b).copy()[None, :]  # in place: B_ij = -P_ij / P_jj off the diagonal
        b[np.diag_indices(n)] = 0.0
        self.weights = b
        self._score = _sparse_scorer(x, self.weights)
        return self


class ALS(Baseline):
    """Implicit-feedback matrix factorisation (Hu, Koren & Volinsky 2008) by
    ``implicit.als.AlternatingLeastSquares`` on CPU: confidence = ``alpha`` x the matrix value;
    score = user factors @ item factors. Needs the optional dependency: pip install '.[baselines]'.

    BLAS is limited to one thread while fitting (implicit's advice: its own ``num_threads``
    parallelise the solver, a BLAS thread pool on top only oversubscribes the cores)."""

    name = "als"

    def __init__(self, factors: int = 64, regularization: float = 0.01, alpha: float = 1.0, iterations: int = 15,
                 random_state: int = 0, num_threads: int = 1):
        self.factors, self.regularization, self.alpha = int(factors), float(regularization), float(alpha)
        self.iterations, self.random_state, self.num_threads = int(iterations), int(random_state), int(num_threads)

    def fit(self, matrix):
        try:
            from implicit.als import AlternatingLeastSquares
            from threadpoolctl import threadpool_limits
        except ImportError as e:
            raise ImportError(
                f"ALS needs the optional dependency 'implicit' ({e}): pip install 'recsys-hnm[baselines]' "
                "(or pip install 'implicit>=0.7.2')"
            ) from e
        x = _csr(matrix)
        with threadpool_limits(1, "blas"):  # inside: implicit checks the BLAS pool when constructed
            model = AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=self.alpha,
                iterations=self.iterations, random_state=self.random_state, num_threads=self.num_threads,
                use_gpu=False,
            )
            model.fit(x, show_progress=False)
        self.user_factors = torch.from_numpy(np.asarray(model.user_factors, dtype=np.float32))
        self.item_factors = torch.from_numpy(np.asarray(model.item_factors, dtype=np.float32))
        self._score = embedding_scorer(self.user_factors, self.item_factors)
        return self


class RepeatPop(Baseline):
    """The user's own purchase counts (every event, repeats included), ties broken by the number
    of users per item: what a shopper buys again. Under ``eval.exclude: history`` it is MostPop,
    since every item it ranks first is masked."""

    name = "repeatpop"
    reads_events = True

    def fit(self, matrix, events=None):
        m = _csr(matrix)
        counts = m if events is None else _event_counts(events, m.shape)
        pop = m.getnnz(axis=0).astype(np.float32)
        tie = torch.from_numpy(pop / (pop.max(initial=0.0) + 1.0))  # < 1: below one more purchase
        self._score = lambda users: torch.from_numpy(counts[users.numpy()].toarray().astype(np.float32)) + tie
        return self


class TIFUKNN(Baseline):
    """TIFU-KNN (Hu et al., SIGIR 2020): a user's baskets in time order are cut into groups of
    ``group_size``; within a group basket j of n weighs ``basket_decay ** (n - 1 - j) / n``, and
    group i of k weighs ``group_decay ** (k - 1 - i) / k``: the user vector is the weighted sum
    of the multi-hot baskets (time-decayed personal item frequency). Scores are ``alpha`` times
    the user's vector plus (1 - alpha) times the mean vector of the ``k`` most cosine-similar
    users. Without baskets, a timestamp is a basket; without timestamps, an event."""

    name = "tifuknn"
    reads_events = True

    def __init__(self, k: int = 300, alpha: float = 0.7, group_size: int = 7, basket_decay: float = 0.9,
                 group_decay: float = 0.7):
        if k < 1 or group_size < 1 or not 0.0 <= alpha <= 1.0 or not 0.0 < basket_decay <= 1.0 or not 0.0 < group_decay <= 1.0:
            raise ValueError(f"tifuknn: need k, group_size >= 1, alpha in [0, 1], decays in (0, 1]; got k={k}, "
                             f"alpha={alpha}, group_size={group_size}, basket_decay={basket_decay}, group_decay={group_decay}")
        self.k, self.alpha, self.group_size = int(k), float(alpha), int(group_size)
        self.basket_decay, self.group_decay = float(basket_decay), float(group_decay)

    def fit(self, matrix, events=None):
        m = _csr(matrix)
        if events is None:
            raise ValueError("tifuknn reads the users' baskets in time order: fit it with the events")
        vectors = self.user_vectors(events, m.shape)
        norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(1)).ravel())
        unit = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ vectors
        unit_t = unit.T.tocsr()
        k = min(self.k, max(m.shape[0] - 1, 1))

        def score(users: torch.Tensor) -> torch.Tensor:
            rows = users.numpy()
            sim = np.asarray((unit[rows] @ unit_t).todense())
            sim[np.arange(len(rows)), rows] = -np.inf  # not one's own neighbour
            near = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            pick = sp.csr_matrix((np.full(near.size, 1.0 / k), near.ravel(), np.arange(0, near.size + 1, k)), shape=(len(rows), m.shape[0]))
            out = self.alpha * vectors[rows].toarray() + (1 - self.alpha) * (pick @ vectors).toarray()
            return torch.from_numpy(out.astype(np.float32))

        self._score = score
        return self

    def user_vectors(self, events: pd.DataFrame, shape: tuple[int, int]) -> sp.csr_matrix:
        """users x items: the time-decayed, group-decayed sum of each user's baskets."""
        key = "basket" if "basket" in events.columns else "timestamp" if "timestamp" in events.columns else None
        order = ["user"] + [c for c in ("timestamp", "basket") if c in events.columns]
        ev = events.sort_values(order, kind="stable")
        user = ev["user"].to_numpy()
        basket = (ev[key].to_numpy() if key else np.arange(len(ev)))
        new = np.r_[True, (user[1:] != user[:-1]) | (basket[1:] != basket[:-1])]
        basket_id = np.cumsum(new) - 1  # consecutive baskets, numbered over all users
        first_basket = pd.Series(basket_id).groupby(user).transform("min").to_numpy()
        n_baskets = pd.Series(basket_id).groupby(user).transform("max").to_numpy() - first_basket + 1
        j = basket_id - first_basket  # the basket's position in the user's sequence
        g, pos = j // self.group_size, j % self.group_size
        n_groups = (n_baskets - 1) // self.group_size + 1
        in_group = np.where(g == n_groups - 1, n_baskets - g * self.group_size, self.group_size)  # the last group may be short
        w = self.basket_decay ** (in_group - 1 - pos) / in_group * self.group_decay ** (n_groups - 1 - g) / n_groups
        return sp.csr_matrix((w, (user, ev["item"].to_numpy())), shape=shape)  # a repeat in a basket adds up


def _event_counts(events: pd.DataFrame, shape: tuple[int, int]) -> sp.csr_matrix:
    """users x items: how many events each pair has (repeat purchases counted)."""
    return sp.csr_matrix((np.ones(len(events), np.float32), (events["user"].to_numpy(), events["item"].to_numpy())), shape=shape)


BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (MostPop, ItemKNN, EASE, ALS, RepeatPop, TIFUKNN)}

# Small grids, tuned on validation: a handful of fits each.
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "mostpop": {},
    "itemknn": {"k": [50, 100, 200, 400], "shrink": [0.0, 10.0]},
    "ease": {"lam": [10.0, 50.0, 100.0, 250.0, 500.0, 1000.0]},
    "als": {"factors": [64, 128], "regularization": [0.01, 0.1], "alpha": [1.0, 10.0], "iterations": [15]},
    "repeatpop": {},
    # around the paper's settings for grocery data (m 7, r_b 0.9, r_g 0.7, k 300, alpha 0.7)
    "tifuknn": {"k": [100, 300], "alpha": [0.5, 0.7, 0.9], "group_size": [7], "basket_decay": [0.9], "group_decay": [0.6, 0.8, 1.0]},
}


def make_baseline(name: str, **params) -> Baseline:
    """A baseline by name (``mostpop``, ``itemknn``, ``ease``, ``als``, ``repeatpop``, ``tifuknn``) with its hyperparameters;
    an unknown name or hyperparameter is refused naming the ones that exist."""
    cls = BASELINES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    allowed = list(inspect.signature(cls).parameters)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"baseline {name!r} has no hyperparameter(s) {unknown}; it takes {allowed}")
    return cls(**params)
