"""A full-rank item-item head beside the towers, blended per user.

The towers score a user by a low-rank dot product with a pooled history; where the held-out
items are a random part of a dense history (a random split, baskets), EASE's full-rank
item-item closed form is the stronger model (docs/results.md). The head keeps both: each user's
scores from either side are standardised over the catalog and mixed,

    score = (1 - weight) z(towers) + weight z(history @ W),

W the items x items weights of EASE (or of ItemKNN where EASE's dense inverse does not fit),
each item's column pruned to its ``keep`` largest-magnitude weights, so what is logged and served
is a sparse matrix. MostPop is the rank-one case (every history item votes for the popular
items: W = 1 counts^T, and z(history @ W) = z(counts)), kept as the one row of counts and scored
the same for every user, cold ones too: where the held-out items are new and popular (baskets
with history masked) it is the stronger side. The kind and ``weight`` are chosen on validation
(``experiment.run.choose_item_item``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from .models import EASE, ItemKNN, MostPop
from ..ops.io import atomic_write
from ..ops.ranking import Scorer

KINDS = ("ease", "itemknn", "mostpop")
WEIGHTS = (0.1, 0.25, 0.5, 0.7, 0.85)  # what an "auto" weight chooses among, beside 0 (the towers alone)
# the head's hyperparameters, tuned on validation: coarser than the baselines' grids (each EASE
# fit inverts an items x items matrix: ~12 s at 9,724 items on one core)
GRIDS = {"ease": {"lam": [25.0, 100.0, 400.0, 1600.0]}, "itemknn": {"k": [100, 400], "shrink": [0.0, 10.0]}, "mostpop": {}}
EPS = 1e-6  # a user whose scores are all equal (no history) standardises to zeros


def head_kinds(kind: str, n_items: int, ease_max_items: int) -> tuple[str, ...]:
    """The kinds validation chooses among: ``auto`` is EASE up to ``ease_max_items`` items (its
    dense inverse), ItemKNN above, and MostPop."""
    if kind != "auto":
        return (kind,)
    return ("ease" if n_items <= ease_max_items else "itemknn", "mostpop")


def fit_weights(kind: str, params: dict, matrix: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """The items x items weights of ``kind`` fit on ``matrix`` (users x items, binary), each
    column j (the weights that score item j) pruned to its ``keep`` largest magnitudes; for
    MostPop the 1 x items row of its counts (users per item)."""
    if kind == "mostpop":
        return sp.csr_matrix(MostPop().fit(matrix).counts[None, :])
    if kind == "ease":
        weights = EASE(**params, max_items=max(matrix.shape[1], 1)).fit(matrix).weights
        return prune_columns(weights, keep)
    if kind == "itemknn":
        return prune_columns(ItemKNN(**params).fit(matrix).similarity, keep)
    raise ValueError(f"item_item.kind must be one of {KINDS}, not {kind!r}")


def prune_columns(weights, keep: int, block: int = 512) -> sp.csr_matrix:
    """``weights`` (dense or sparse, items x items) with each column's ``keep`` largest
    magnitudes kept and zeros dropped, as float32 CSR; a dense matrix is pruned ``block``
    columns at a time (memory: n x block indices)."""
    if sp.issparse(weights):
        w = sp.csc_matrix(weights, dtype=np.float32)
        w.eliminate_zeros()
        for j in np.flatnonzero(np.diff(w.indptr) > keep):  # columns over the limit only
            lo, hi = w.indptr[j], w.indptr[j + 1]
            drop = np.argpartition(-np.abs(w.data[lo:hi]), keep - 1)[keep:]
            w.data[lo + drop] = 0.0
        w.eliminate_zeros()
        return w.tocsr()
    n, m = weights.shape
    rows, cols, vals = [], [], []
    for start in range(0, m, block):
        part = np.asarray(weights[:, start:start + block], dtype=np.float32)
        if n > keep:
            top = np.argpartition(-np.abs(part), keep - 1, axis=0)[:keep]
        else:
            top = np.broadcast_to(np.arange(n)[:, None], part.shape)
        v = np.take_along_axis(part, top, 0)
        c = np.broadcast_to(np.arange(start, start + part.shape[1])[None, :], top.shape)
        nz = v != 0
        rows.append(top[nz])
        cols.append(c[nz])
        vals.append(v[nz])
    out = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, m), dtype=np.float32)
    out.sort_indices()
    return out


def named(kind: str, params: dict) -> str:
    """``ease (lam=100)``, ``mostpop``."""
    described = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return f"{kind} ({described})" if described else kind


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Each row to mean 0 and standard deviation 1 over the catalog."""
    return (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + EPS)


@dataclass
class ItemItemHead:
    """The fitted head: ``kind`` with its tuned ``params``, the blend ``weight`` and the pruned
    items x items ``weights``."""

    kind: str
    params: dict
    weight: float
    weights: sp.csr_matrix

    def describe(self) -> str:
        return f"{named(self.kind, self.params)} at weight {self.weight:g}, {self.weights.nnz:,} weights"

    def shape(self, n_items: int) -> tuple[int, int]:
        """The shape of ``weights`` over ``n_items`` items."""
        return (1, n_items) if self.kind == "mostpop" else (n_items, n_items)

    def item_item_scorer(self, history: sp.csr_matrix) -> Scorer:
        """The item-item side alone: ``history @ weights`` (MostPop: its counts for every user)."""
        if self.kind == "mostpop":
            counts = torch.from_numpy(self.weights.toarray().astype(np.float32))
            return lambda users: counts.expand(len(users), -1).clone()
        history = (sp.csr_matrix(history) != 0).astype(np.float32)  # binary, explicit zeros dropped
        return lambda users: torch.from_numpy(np.ascontiguousarray((history[users.numpy()] @ self.weights).toarray(), dtype=np.float32))

    def scorer(self, towers: Scorer, history: sp.csr_matrix) -> Scorer:
        """``towers`` blended with ``history @ weights``; ``history``: users x items, the items each
        user has at the phase scored (what is masked under eval.exclude=history)."""
        item_item, a = self.item_item_scorer(history), float(self.weight)

        @torch.no_grad()
        def score(users: torch.Tensor) -> torch.Tensor:
            return (1.0 - a) * standardize(towers(users)) + a * standardize(item_item(users))

        return score

    def save(self, path: str | Path) -> None:
        """One .npz (no pickle): the weights as CSR arrays, the rest as JSON."""
        w = self.weights
        meta = json.dumps({"kind": self.kind, "params": self.params, "weight": self.weight})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, meta=np.array(meta), indptr=w.indptr.astype(np.int64), indices=w.indices.astype(np.int64),
                         data=w.data.astype(np.float32), shape=np.asarray(w.shape, dtype=np.int64))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "ItemItemHead":
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            weights = sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(int(x) for x in f["shape"]))
        return cls(meta["kind"], meta["params"], float(meta["weight"]), weights)
