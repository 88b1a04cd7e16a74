"""Walker alias tables: O(1) draws, one table per segment of a concatenated array.

A segment is a CSR row: the items of a category, the neighbours of an item, or (with a single
segment) the whole catalog. Building is vectorised: one pass over prefix sums pairs every slot,
instead of Vose's one-pair-at-a-time loop (see ``_build``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops.sparse import row_ids


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
        keep = torch.rand(shape, generator=generator) < self.prob.take(slot)
        return self.indices.take(torch.where(keep, slot, self.alias.take(slot)))


def _build(seg: np.ndarray, w: np.ndarray, sizes: np.ndarray, totals: np.ndarray, n: int):
    """Per-segment alias tables in one vectorised pass (alias holds global positions).

    Vose's algorithm drains the over-full ("large") slots in order, and a drained large slot
    becomes under-full and takes its own alias from the next large. Laid on one line per
    segment, the under-full slots' deficits end to end and the large slots' excesses end to end
    cover the same length, and one merge of the two fixes every pair: an under-full slot takes
    the large slot whose excess interval holds the start of its deficit; large slot j keeps
    1 - overflow, where overflow is how far the last deficit starting inside its interval (or
    before it) reaches past the interval's end, and takes the next large slot as its alias.
    Both come from the same merged order, so float rounding at ties moves a deficit to a
    neighbour's interval without losing mass (a first version, which placed the large slots
    by the deficits' ends instead, lost whole deficits at such ties). The earlier rounds of
    bulk matching needed one round per link of the longest chain: minutes on Epinions'
    co-purchase graph.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(totals[seg] > 0, w * sizes[seg] / totals[seg], 1.0)
    prob = np.ones(n)
    alias = np.arange(n, dtype=np.int64)
    small = np.flatnonzero(q < 1.0)
    large = np.flatnonzero(q >= 1.0)
    if not len(small) or not len(large):
        return prob, alias  # every slot exactly full (up to rounding)
    seg_small, seg_large = seg[small], seg[large]
    deficit_end = _segment_cumsum(seg_small, 1.0 - q[small])
    excess_end = _segment_cumsum(seg_large, q[large] - 1.0)
    # one merged order of deficit starts and excess ends, by (segment, position): segments apart
    # by a stride beyond any segment's length; a deficit starting exactly at an interval's end
    # is the next interval's. Both searches read the same keys, so they agree.
    stride = float(sizes.max() + 1)
    large_key = excess_end + seg_large * stride
    small_key = deficit_end - (1.0 - q[small]) + seg_small * stride
    # an under-full slot: the first large slot after its start in its segment (else the
    # segment's last one: rounding at the very end)
    j = np.searchsorted(large_key, small_key, side="right")
    first_after = (j < len(large)) & (seg_large[np.minimum(j, len(large) - 1)] == seg_small)
    j = np.where(first_after, j, j - 1)
    has_large = (j >= 0) & (seg_large[np.maximum(j, 0)] == seg_small)
    prob[small] = np.where(has_large, q[small], 1.0)  # no large slot in the segment: rounding
    alias[small] = np.where(has_large, large[np.maximum(j, 0)], small)
    # a large slot: the last deficit starting before its interval's end, in its segment
    i = np.searchsorted(small_key, large_key, side="left") - 1
    last = (i >= 0) & (seg_small[np.maximum(i, 0)] == seg_large)
    overflow = np.where(last, deficit_end[np.maximum(i, 0)] - excess_end, 0.0)
    next_same = np.r_[seg_large[1:] == seg_large[:-1], False]  # a segment's last large keeps its slot
    overflow = np.where(next_same, np.clip(overflow, 0.0, 1.0), 0.0)
    prob[large] = 1.0 - overflow
    alias[large] = np.where(next_same, np.r_[large[1:], 0], large)
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
        keep = torch.rand(shape, generator=generator) < self.prob.take(slot)
        return torch.where(keep, slot, self.alias.take(slot))
