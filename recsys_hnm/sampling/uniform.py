"""Uniform negatives over the catalog."""

from __future__ import annotations

import math

import torch

from .base import Context


class UniformSampler:
    def __init__(self, n_items: int, shared: bool = True):
        if n_items < 1:
            raise ValueError("uniform sampler needs at least one item")
        self.n_items = n_items
        self.shared = shared

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        shape = (n,) if self.shared else (len(ctx), n)
        return torch.randint(0, self.n_items, shape, generator=generator)

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        return torch.full(items.shape, -math.log(self.n_items))


class FullCatalog:
    """Every item once, as shared candidates: the exact full softmax (known positives masked by
    the mixture), the reference sampled training is measured against. Each item is among the
    candidates exactly once, so its log expected count is log 1 = 0. For catalogs whose
    [batch, n_items] scores fit in memory."""

    shared = True

    def __init__(self, n_items: int):
        self.n_items = n_items

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.arange(self.n_items)

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        return torch.zeros(items.shape)
