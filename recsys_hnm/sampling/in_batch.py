"""In-batch negatives: the other positives of the batch."""

from __future__ import annotations

import math

import torch

from .base import Context


class InBatchSampler:
    """Every row sees the whole batch's positives (its own is an accidental hit, masked). The
    proposal of item j is its frequency in the batch, the logQ correction of Yi et al. 2019."""

    shared = True

    def __init__(self, n_items: int):
        self.n_items = n_items

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        return ctx.pos_items

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(ctx.pos_items, minlength=self.n_items)
        return torch.log(counts[items].float()) - math.log(len(ctx))
