"""Walker alias tables: O(1) draws, one table per segment of a concatenated array.

A segment is a CSR row: the items of a category, the neighbours of an item, or (with a single
segment) the whole catalog. Building is vectorised: each round pairs every under-full slot with
an over-full slot of the same segment at once, instead of Vose's one-pair-at-a-time loop.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sparse import row_ids


class SegmentedAlias:
    """Draws entry ``indices[p]`` for p in segment s with probability w_p / sum of w in s."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None = None):
        indptr = np.asarray(indptr, dtype=np.int64)
        sizes = np.diff(indptr)
        n = int(indptr[-1])
        if weights is None:
            w = np.ones(n)
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (n,) or (w < 0).any() or not np.isfinite(w).all():
                raise ValueError("alias weights must be finite, >= 0, one per entry")
        seg = row_ids(indptr)
        totals = np.bincount(seg, weights=w, minlength=len(sizes))
        empty_mass = (sizes > 0) & (totals <= 0)
        if empty_mass.any():
            raise ValueError(f"{int(empty_mass.sum())} segment(s) have entries but zero total weight")
        prob, alias = _build(seg, w, sizes, totals, n)
        self.indptr = torch.from_numpy(indptr)
        self.sizes = torch.from_numpy(sizes)
        self.indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        self.prob = torch.from_numpy(prob.astype(np.float32))
        self.alias = torch.from_numpy(alias)
        self.totals = torch.from_numpy(totals)
        self.entry_prob = torch.from_numpy(np.divide(w, totals[seg], out=np.zeros(n), where=totals[seg] > 0))

    def sample(self, starts: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw per element of ``starts``/``sizes`` (the segment's offset and length,
        broadcast to the output shape; every segment must be non-empty)."""
        shape = torch.broadcast_shapes(starts.shape, sizes.shape)
        u = torch.rand(shape, generator=generator)
        slot = starts + (u * sizes).long().minimum(sizes - 1)
        keep = torch.rand(shape, generator=generator) < self.prob[slot]
        return self.indices[torch.where(keep, slot, self.alias[slot])]


def _build(seg: np.ndarray, w: np.ndarray, sizes: np.ndarray, totals: np.ndarray, n: int):
    """Per-segment alias tables by rounds of bulk matching (alias holds global positions)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(totals[seg] > 0, w * sizes[seg] / totals[seg], 1.0)
    prob = np.ones(n)
    alias = np.arange(n, dtype=np.int64)
    small = np.flatnonzero(q < 1.0)
    large = np.flatnonzero(q >= 1.0)
    # Cumulative sums restart at each segment: offset every segment by a stride larger than
    # any segment's total excess, so one global searchsorted matches within segments.
    stride = float(sizes.max() + 1) if len(sizes) else 1.0
    while len(small) and len(large):
        deficit = 1.0 - q[small]
        starts = _segment_cumsum(seg[small], deficit) - deficit + seg[small] * stride
        excess_end = _segment_cumsum(seg[large], q[large] - 1.0) + seg[large] * stride
        owner = np.searchsorted(excess_end, starts, side="right")
        ok = owner < len(large)
        ok[ok] = seg[large[owner[ok]]] == seg[small[ok]]
        s, o = small[ok], owner[ok]
        prob[s] = q[s]
        alias[s] = large[o]
        q[large] -= np.bincount(o, weights=deficit[ok], minlength=len(large))
        drops = q[large] < 1.0
        if not ok.any() and not drops.any():
            break  # what is left is rounding error: those slots keep probability 1
        small = np.concatenate([small[~ok], large[drops]])
        small = small[np.argsort(seg[small], kind="stable")]
        large = large[~drops]
    return prob, alias


def _segment_cumsum(seg: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``values`` restarting where ``seg`` (sorted) changes."""
    total = np.cumsum(values)
    starts = np.r_[0, np.flatnonzero(seg[1:] != seg[:-1]) + 1]
    before = np.r_[0.0, total][starts]
    return total - np.repeat(before, np.diff(np.r_[starts, len(seg)]))


class AliasTable(SegmentedAlias):
    """A single alias table over ``len(weights)`` outcomes."""

    def __init__(self, weights: np.ndarray):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or w.sum() <= 0:
            raise ValueError("alias table weights must be a non-empty 1-D array with a positive sum")
        super().__init__(np.array([0, len(w)]), np.arange(len(w)), w)
        self.n = len(w)

    def draw(self, shape, generator: torch.Generator) -> torch.Tensor:
        slot = torch.randint(0, self.n, shape, generator=generator)
        keep = torch.rand(shape, generator=generator) < self.prob[slot]
        return torch.where(keep, slot, self.alias[slot])
