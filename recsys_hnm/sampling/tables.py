"""Vectorised draw tables: Walker alias tables and segmented cumulative sums."""

from __future__ import annotations

import numpy as np
import torch


class AliasTable:
    """O(1) draws from a fixed discrete distribution (Walker/Vose), built without a per-item
    Python loop: each round pairs all remaining under-full slots with over-full ones at once."""

    def __init__(self, weights: np.ndarray):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError("alias table weights must be a non-empty 1-D array of finite values >= 0 with a positive sum")
        n = len(w)
        self.probs = torch.from_numpy(w / w.sum())
        q = w * (n / w.sum())
        prob = np.ones(n)
        alias = np.arange(n)
        small = np.flatnonzero(q < 1.0)
        large = np.flatnonzero(q >= 1.0)
        while len(small) and len(large):
            deficit = 1.0 - q[small]
            starts = np.cumsum(deficit) - deficit
            excess = np.cumsum(q[large] - 1.0)
            owner = np.searchsorted(excess, starts, side="right")  # large whose excess covers it
            ok = owner < len(large)
            s, o = small[ok], owner[ok]
            prob[s] = q[s]
            alias[s] = large[o]
            q[large] -= np.bincount(o, weights=deficit[ok], minlength=len(large))
            drops = q[large] < 1.0
            small = np.concatenate([small[~ok], large[drops]])
            large = large[~drops]
        self.prob = torch.from_numpy(prob.astype(np.float32))  # leftovers are rounding: keep 1
        self.alias = torch.from_numpy(alias.astype(np.int64))
        self.n = n

    def sample(self, shape, generator: torch.Generator) -> torch.Tensor:
        slot = torch.randint(0, self.n, shape, generator=generator)
        keep = torch.rand(shape, generator=generator) < self.prob[slot]
        return torch.where(keep, slot, self.alias[slot])


class SegmentSampler:
    """Draws within segments of a concatenated array (a CSR row each: the items of a
    category, the neighbours of an item), uniformly or by per-entry weights."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray | None = None):
        self.indptr = torch.from_numpy(np.asarray(indptr, dtype=np.int64))
        self.indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        self.sizes = self.indptr[1:] - self.indptr[:-1]
        if weights is None:
            self.cum = None
            self.totals = self.sizes.double()
        else:
            w = np.asarray(weights, dtype=np.float64)
            cum = np.concatenate([[0.0], np.cumsum(w)])
            self.cum = torch.from_numpy(cum)
            self.totals = self.cum[self.indptr[1:]] - self.cum[self.indptr[:-1]]
            self.weights = torch.from_numpy(w)

    def sample(self, segments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One entry from each of ``segments`` (any shape; every segment must be non-empty)."""
        u = torch.rand(segments.shape, generator=generator, dtype=torch.float64)
        start = self.indptr[segments]
        if self.cum is None:
            pos = start + (u * self.sizes[segments]).long()
            pos = torch.minimum(pos, self.indptr[segments + 1] - 1)
        else:
            target = self.cum[start] + u * self.totals[segments]
            pos = torch.searchsorted(self.cum, target.reshape(-1), right=True).reshape(segments.shape) - 1
            pos = torch.minimum(torch.maximum(pos, start), self.indptr[segments + 1] - 1)
        return self.indices[pos]
