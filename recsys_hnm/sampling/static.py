"""Static negatives: a file of mined negatives per training (user, positive), computed once
(``recsys-hnm mine``) and trained on, the offline mining pattern."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .base import Context, fallback_log_prob, with_fallback


class StaticSampler:
    """Per row, draws uniformly (with replacement) from the negatives the file lists for the
    row's (user, positive): q(j | user, pos) = (times j is listed) / (list length). Rows whose
    pair the file does not list draw from ``fallback`` (counted by ``fallback_rows``).

    ``negatives``: frame with integer columns ``user``, ``item`` (the positive), ``negative``.
    """

    shared = False

    def __init__(self, negatives: pd.DataFrame, n_items: int, fallback):
        if negatives.empty:
            raise ValueError("the static source needs at least one mined negative")
        frame = negatives.sort_values(["user", "item"], kind="stable")
        keys = frame["user"].to_numpy(np.int64) * n_items + frame["item"].to_numpy(np.int64)
        self.keys, starts, lengths = np.unique(keys, return_index=True, return_counts=True)
        self.n_items = n_items
        width = int(lengths.max())
        # one padded row of listed negatives per (user, positive); -1 pads
        table = np.full((len(self.keys), width), -1, np.int64)
        pair = np.repeat(np.arange(len(self.keys)), lengths)
        slot = np.arange(len(keys)) - np.repeat(starts, lengths)
        table[pair, slot] = frame["negative"].to_numpy(np.int64)
        self.table = torch.from_numpy(table)
        self.lengths = torch.from_numpy(lengths.astype(np.int64))
        self.keys_t = torch.from_numpy(self.keys)
        self.fallback = fallback

    def _rows(self, ctx: Context) -> torch.Tensor:
        """Index of each row's (user, positive) in the table, -1 where the file has none."""
        keys = ctx.users * self.n_items + ctx.pos_items
        at = torch.searchsorted(self.keys_t, keys).clamp(max=len(self.keys_t) - 1)
        return torch.where(self.keys_t[at] == keys, at, -1)

    def fallback_rows(self, ctx: Context) -> torch.Tensor:
        return self._rows(ctx) < 0

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        rows = self._rows(ctx).clamp(min=0)
        pick = (torch.rand(len(ctx), n, generator=generator) * self.lengths[rows][:, None]).long()
        return with_fallback(self, ctx, self.table[rows[:, None], pick], n, generator)

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        rows = self._rows(ctx).clamp(min=0)
        items_b = items.expand(len(ctx), -1) if items.dim() == 1 else items
        listed = self.table[rows]  # [B, width]
        hits = (items_b[:, :, None] == listed[:, None, :]).sum(-1).double()
        return fallback_log_prob(self, ctx, items_b, hits / self.lengths[rows][:, None].double())
