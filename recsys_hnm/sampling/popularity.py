"""Popularity negatives: item count ** alpha, drawn from an alias table in O(1)."""

from __future__ import annotations

import numpy as np
import torch

from .base import Context
from .tables import AliasTable


class PopularitySampler:
    """alpha = 1 follows popularity, 0.75 (word2vec's choice) flattens it, 0 is uniform.
    Items with no training events have probability 0 (unless alpha = 0)."""

    def __init__(self, counts: np.ndarray, alpha: float = 0.75, shared: bool = True):
        counts = np.asarray(counts, dtype=np.float64)
        if alpha < 0:
            raise ValueError(f"popularity alpha must be >= 0, not {alpha}")
        weights = np.where(counts > 0, counts, 0.0) ** alpha if alpha > 0 else np.ones_like(counts)
        self.table = AliasTable(weights)
        self.log_probs = torch.log(self.table.entry_prob).float()
        self.shared = shared

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        shape = (n,) if self.shared else (len(ctx), n)
        return self.table.draw(shape, generator)

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        return self.log_probs.take(items)
