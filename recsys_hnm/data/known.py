"""Which (user, item) pairs a user already has: the mask of samplers, miners and the evaluator."""

from __future__ import annotations

import scipy.sparse as sp
import torch

from ..ops.sparse import SortedPairs, scatter_rows


class KnownPositives:
    """Fast (user, item) membership in a users x items matrix. Where a dense bitmap fits, a
    gather per lookup. Else from the queried users' own entries (``SortedPairs``): shared
    candidates [n] get a [B, n] grid filled from those entries, per-row ones a binary search
    among them. At 22k users x 296k items this is 4-5x faster than one binary search over
    every stored pair."""

    DENSE_LIMIT = 64_000_000  # cells; 64 MB of bools

    def __init__(self, matrix: sp.csr_matrix):
        self.pairs = SortedPairs(matrix)
        self.n_items = matrix.shape[1]
        self.bitmap = None
        if matrix.shape[0] * matrix.shape[1] <= self.DENSE_LIMIT:
            self.bitmap = torch.zeros(matrix.shape[0] * matrix.shape[1], dtype=torch.bool)
            self.bitmap[self.pairs.keys] = True

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[B, n] bool: is (users[b], items[b, j]) known? ``items`` is [B, n] or shared [n]."""
        if self.bitmap is not None:
            return self.bitmap[users[:, None] * self.n_items + items]  # shared [n] broadcasts to [B, n]
        if items.dim() == 1:
            if items.numel() == 0:
                return torch.zeros(len(users), 0, dtype=torch.bool)
            rows, _, cols = self.pairs.entries(users)
            return scatter_rows(rows, cols, torch.ones(len(cols), dtype=torch.bool), items, len(users))
        return self.pairs.find(users, items) >= 0
