"""ANN-mined hard negatives: items the current model ranks just below the top for the anchor."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .base import Context, entries_log_prob, fallback_log_prob, with_fallback
from ..ops.sparse import row_entries
from .uniform import UniformSampler
from ..index.item_index import ItemIndex


def resolve_window(window: list[float], n_items: int) -> tuple[int, int]:
    """[lo, hi) in ranks; a bound below 1 (other than 0) is a fraction of the catalog."""
    lo, hi = (int(round(b * n_items)) if 0 < b < 1 else int(b) for b in window)
    if not 0 <= lo < hi:
        raise ValueError(f"ann window {window} gives ranks [{lo}, {hi}): need 0 <= lo < hi")
    if hi > n_items:
        raise ValueError(f"ann window {window} reaches rank {hi}, beyond the catalog of {n_items} items")
    return lo, hi


ANCHORS = ("user", "item", "position")


class AnnSampler:
    """Uniform draws from each anchor's candidate pool: the items at ranks [lo, hi) of the
    anchor's neighbours in the item index, the anchor's known items left out before ranking.

    anchor ``user``: the pool of the row's user (the items the model ranks high for the user);
    anchor ``item``: the pool of the row's positive item (its look-alikes);
    anchor ``position`` (per-position training): the pool of the row's own query vector, the
    sequence encoder's output at that position, searched in every step (``mine_rows``) against
    the index of the last refresh.
    Until pools are mined (or for an anchor whose pool is empty) rows fall back to uniform draws.
    q(j | anchor) = 1 / |pool| for j in the pool, so the mixture logQ stays exact.
    """

    shared = False

    def __init__(self, n_items: int, n_users: int, anchor: str = "user", window: list[float] = (10, 100)):
        if anchor not in ANCHORS:
            raise ValueError(f"ann anchor must be one of {ANCHORS}, not {anchor!r}")
        self.n_items = n_items
        self.anchor = anchor
        self.lo, self.hi = resolve_window(list(window), n_items)
        n_anchors = {"user": n_users, "item": n_items, "position": 0}[anchor]  # position: the step's rows
        width = self.hi - self.lo
        # rows sorted by item id, padded with n_items (sorts last) so log_prob can binary-search
        self.pools = torch.full((n_anchors, width), n_items, dtype=torch.int64)
        self.sizes = torch.zeros(n_anchors, dtype=torch.int64)
        self.fallback = UniformSampler(n_items, shared=False)

    def anchors(self, ctx: Context) -> torch.Tensor:
        if self.anchor == "position":
            return torch.arange(len(ctx))
        return ctx.users if self.anchor == "user" else ctx.pos_items

    def mine_rows(self, index: ItemIndex | None, queries: np.ndarray, exclude: sp.csr_matrix | None) -> None:
        """The pools of this step's rows (anchor ``position``): the window of each query's
        neighbours, the row's ``exclude`` items left out before ranking; no index yet (warm-up):
        empty pools, so every row falls back to uniform draws."""
        if index is None:
            self.pools = torch.full((len(queries), self.hi - self.lo), self.n_items, dtype=torch.int64)
            self.sizes = torch.zeros(len(queries), dtype=torch.int64)
            return
        window = torch.from_numpy(index.search(queries, self.hi, exclude)[:, self.lo:self.hi])
        self.sizes = (window >= 0).sum(1)
        self.pools = torch.where(window >= 0, window, self.n_items).sort(dim=1).values

    def fallback_rows(self, ctx: Context) -> torch.Tensor:
        return self.sizes[self.anchors(ctx)] == 0

    def mine(self, index: ItemIndex, anchor_vectors: np.ndarray, exclude: sp.csr_matrix | None, share=None) -> dict[str, float]:
        """Re-mine every anchor's pool; returns how much the pools moved (overlap with before).

        ``share`` (distributed): a ``Cluster``; each rank mines every world-th anchor and the
        ranks then exchange their rows, so that all hold the same pools."""
        rows = slice(None) if share is None else slice(share.rank, None, share.world)
        top = index.search(anchor_vectors[rows], self.hi, exclude[rows] if exclude is not None else None)
        window = torch.from_numpy(top[:, self.lo:self.hi])
        if share is not None:
            every = torch.zeros((len(anchor_vectors), window.shape[1]), dtype=torch.int64)
            every[rows] = window + 1  # 0 elsewhere: the sum over ranks assembles the rows
            torch.distributed.all_reduce(every)
            window = every - 1
        new_sizes = (window >= 0).sum(1)
        new = torch.where(window >= 0, window, self.n_items).sort(dim=1).values
        had = self.sizes > 0
        overlap = float("nan")
        if had.any():
            same = _row_overlap(self.pools[had], new[had], self.n_items)
            overlap = float((same / new_sizes[had].clamp(min=1)).mean())
        self.pools, self.sizes = new, new_sizes
        return {"pool_overlap": overlap, "pool_mean_size": float(new_sizes.float().mean())}

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        a = self.anchors(ctx)
        size = self.sizes[a].clamp(min=1)[:, None]
        slot = (torch.rand((len(ctx), n), generator=generator) * size).long().minimum(size - 1)
        items = torch.gather(self.pools[a], 1, slot)
        return with_fallback(self, ctx, items, n, generator)

    def prob_entries(self, ctx: Context, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared ``items`` [n] in each row's pool (``SparseRows``)."""
        a = self.anchors(ctx)
        rows = self.pools[a]
        real = rows < self.n_items
        q_each = (1.0 / self.sizes[a].clamp(min=1).double())[:, None].expand_as(rows)
        return row_entries(torch.arange(len(ctx))[:, None].expand_as(rows)[real], rows[real], q_each[real], items)

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        if items.dim() == 1:
            return entries_log_prob(self, ctx, items)
        a = self.anchors(ctx)
        q_each = 1.0 / self.sizes[a].clamp(min=1).double()
        rows = self.pools[a]
        at = torch.searchsorted(rows, items.contiguous()).clamp_(max=rows.shape[1] - 1)
        member = torch.gather(rows, 1, at) == items
        return fallback_log_prob(self, ctx, items, torch.where(member, q_each[:, None], 0.0))


def _row_overlap(old: torch.Tensor, new: torch.Tensor, pad: int) -> torch.Tensor:
    """Per row, how many real entries of ``new`` are in ``old`` (rows sorted, padded with pad)."""
    at = torch.searchsorted(old, new).clamp_(max=old.shape[1] - 1)
    return ((torch.gather(old, 1, at) == new) & (new != pad)).sum(1)
