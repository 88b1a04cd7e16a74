"""Co-purchase negatives: neighbours of the positive in the co-purchase graph."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .base import Context, entries_log_prob, fallback_log_prob, with_fallback
from ..ops.sparse import row_entries
from ..ops.sparse import SortedPairs
from .tables import SegmentedAlias


class CopurchaseSampler:
    """Neighbour j of the positive with probability G[pos, j] ** beta / sum_k G[pos, k] ** beta,
    from a per-item alias table. Rows whose positive has no neighbour draw from ``fallback``
    (see ``fallback_rows``)."""

    shared = False

    def __init__(self, graph: sp.csr_matrix, fallback, beta: float = 1.0):
        g = sp.csr_matrix(graph, dtype=np.float64)
        g.sort_indices()
        if g.nnz == 0:
            raise ValueError("the co-purchase graph has no pairs: nothing to sample from")
        if beta < 0:
            raise ValueError(f"copurchase beta must be >= 0, not {beta}")
        self.table = SegmentedAlias(g.indptr, g.indices, g.data ** beta)
        self.pairs = SortedPairs(g)  # (positive, item) -> entry, for log_prob
        self.has_neighbours = self.table.sizes > 0
        self.placeholder = int(torch.argmax(self.table.sizes))
        self.fallback = fallback

    def fallback_rows(self, ctx: Context) -> torch.Tensor:
        return ~self.has_neighbours[ctx.pos_items]

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        pos = torch.where(self.fallback_rows(ctx), self.placeholder, ctx.pos_items)  # placeholders replaced below
        starts = self.table.indptr[pos][:, None].expand(-1, n)
        items = self.table.sample(starts, self.table.sizes[pos][:, None], generator)
        return with_fallback(self, ctx, items, n, generator)

    def prob_entries(self, ctx: Context, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared ``items`` [n] among each row's positive's neighbours (``SparseRows``)."""
        rows, entries, neighbours = self.pairs.entries(ctx.pos_items)
        return row_entries(rows, neighbours, self.table.entry_prob.take(entries), items)

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        if items.dim() == 1:
            return entries_log_prob(self, ctx, items)
        at = self.pairs.find(ctx.pos_items, items)
        q = torch.where(at >= 0, self.table.entry_prob.take(at.clamp(min=0)), 0.0)
        return fallback_log_prob(self, ctx, items, q)
