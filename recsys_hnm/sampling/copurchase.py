"""Co-purchase negatives: neighbours of the positive in the co-purchase graph."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .base import Context, fallback_log_prob, with_fallback
from .tables import SegmentSampler


class CopurchaseSampler:
    """Neighbour j of the positive with probability G[pos, j] ** beta / sum_k G[pos, k] ** beta.
    Rows whose positive has no neighbour draw from ``fallback`` (see ``fallback_rows``)."""

    shared = False

    def __init__(self, graph: sp.csr_matrix, fallback, beta: float = 1.0):
        g = graph.tocsr().astype(np.float64)
        g.sort_indices()
        if g.nnz == 0:
            raise ValueError("the co-purchase graph has no pairs: nothing to sample from")
        if beta < 0:
            raise ValueError(f"copurchase beta must be >= 0, not {beta}")
        weights = g.data ** beta
        self.table = SegmentSampler(g.indptr, g.indices, weights)
        self.n_items = g.shape[0]
        rows = np.repeat(np.arange(self.n_items, dtype=np.int64), np.diff(g.indptr))
        self.keys = torch.from_numpy(rows * self.n_items + g.indices.astype(np.int64))
        totals = self.table.totals
        self.probs = torch.from_numpy(weights) / totals[torch.from_numpy(rows)]
        self.has_neighbours = torch.from_numpy(np.diff(g.indptr) > 0)
        self.placeholder = int(torch.nonzero(self.has_neighbours)[0])
        self.fallback = fallback

    def fallback_rows(self, ctx: Context) -> torch.Tensor:
        return ~self.has_neighbours[ctx.pos_items]

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        fb = self.fallback_rows(ctx)
        pos = torch.where(fb, self.placeholder, ctx.pos_items)  # placeholder rows are replaced below
        return with_fallback(self, ctx, self.table.sample(pos[:, None].expand(-1, n), generator), n, generator)

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        items_b = items.expand(len(ctx), -1) if items.dim() == 1 else items
        keys = ctx.pos_items[:, None] * self.n_items + items_b
        at = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return fallback_log_prob(self, ctx, items_b, torch.where(self.keys[at] == keys, self.probs[at], 0.0))
