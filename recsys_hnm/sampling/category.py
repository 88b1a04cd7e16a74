"""Same-category negatives: items sharing a category with the positive."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .base import Context, entries_log_prob, fallback_log_prob, with_fallback
from ..ops.sparse import jagged_positions, row_ids
from .tables import SegmentedAlias


class CategorySampler:
    """Per draw, one of the positive's usable categories (those with at least two drawable items) is
    chosen uniformly, then an item within it, uniformly (alpha = 0) or by count ** alpha from a
    per-category alias table. Rows whose positive has no usable category draw from
    ``fallback``; ``fallback_rows`` tells which, so they are counted.

    q(j | pos) = 1/|U(pos)| * sum over c in U(pos) and C(j) of w_j / W_c.
    """

    shared = False

    def __init__(self, item_categories: sp.csr_matrix, fallback, counts: np.ndarray | None = None, alpha: float = 0.0):
        ic = sp.csr_matrix(item_categories, dtype=np.float32)
        ic.data[:] = 1.0
        n_items, n_cats = ic.shape
        if n_cats == 0 or ic.nnz == 0:
            raise ValueError("the category sampler needs item categories, and this data has none")
        if alpha < 0:
            raise ValueError(f"category alpha must be >= 0, not {alpha}")
        if alpha > 0:
            if counts is None:
                raise ValueError("category sampling with alpha > 0 needs item counts")
            w_item = np.maximum(np.asarray(counts, np.float64), 0.0) ** alpha
        else:
            w_item = np.ones(n_items)
        # usable: two or more items that can be drawn (weight > 0); with alpha > 0 an item never
        # seen in training cannot, so a category of such items goes unused instead of failing
        drawable = ic.T @ (w_item > 0).astype(np.float32)
        usable = np.asarray(drawable).ravel() >= 2
        if not usable.any():
            raise ValueError("the category sampler needs a category with two or more drawable items, and none has")
        ic = (ic @ sp.diags(usable.astype(np.float32))).tocsr()
        ic.eliminate_zeros()
        ic.sort_indices()
        ci = ic.T.tocsr()
        ci.sort_indices()
        self.within = SegmentedAlias(ci.indptr, ci.indices, w_item[ci.indices])
        self.w_item = torch.from_numpy(w_item)
        totals = self.within.totals
        inv_total = torch.where(totals > 0, 1.0 / totals, torch.zeros_like(totals))
        self.inv_total = torch.cat([inv_total, torch.zeros(1, dtype=torch.float64)]).float()  # + padding
        # item -> usable categories, padded with the extra column n_cats (weight 0)
        n_usable = np.diff(ic.indptr)
        width = max(1, int(n_usable.max()))
        table = np.full((n_items, width), n_cats, np.int64)
        rows = row_ids(ic.indptr)
        table[rows, np.arange(ic.nnz) - ic.indptr[rows]] = ic.indices
        self.cat_table = torch.from_numpy(table)
        self.n_usable = torch.from_numpy(n_usable.astype(np.int64))
        self.n_cats = n_cats
        self.fallback = fallback

    def fallback_rows(self, ctx: Context) -> torch.Tensor:
        return self.n_usable[ctx.pos_items] == 0

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        B = len(ctx)
        n_usable = self.n_usable[ctx.pos_items].clamp(min=1)
        pick = (torch.rand((B, n), generator=generator) * n_usable[:, None]).long().minimum(n_usable[:, None] - 1)
        cats = torch.gather(self.cat_table[ctx.pos_items], 1, pick)
        # rows that fall back point at the padding category; give them any real one, replaced below
        cats = torch.where(cats == self.n_cats, self.within.sizes.argmax(), cats)
        items = self.within.sample(self.within.indptr[cats], self.within.sizes[cats], generator)
        return with_fallback(self, ctx, items, n, generator)

    def prob_entries(self, ctx: Context, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The shared ``items`` [n] in each of the row's positive's usable categories, one entry
        per category they share (``SparseRows``): the candidates grouped by category once, then
        each row takes its categories' groups."""
        width = self.cat_table.shape[1]
        item_cats = torch.index_select(self.cat_table, 0, items).reshape(-1)  # padding: n_cats
        by_cat = torch.argsort(item_cats, stable=True) // width  # candidate positions, by category
        in_cat = torch.bincount(item_cats, minlength=self.n_cats + 1)
        in_cat[self.n_cats] = 0  # the padding category holds nothing
        starts = torch.cumsum(in_cat, 0) - in_cat
        pos_cats = torch.index_select(self.cat_table, 0, ctx.pos_items)  # [B, width]
        lengths = in_cat.take(pos_cats).reshape(-1)
        positions = by_cat.take(jagged_positions(starts.take(pos_cats).reshape(-1), lengths))
        share = 1.0 / self.n_usable[ctx.pos_items].clamp(min=1).double()
        per_cat = (share[:, None] * self.inv_total.take(pos_cats)).reshape(-1)
        rows = torch.arange(len(ctx)).repeat_interleave(width).repeat_interleave(lengths)
        return rows, positions, per_cat.repeat_interleave(lengths) * self.w_item.take(items.take(positions))

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        if items.dim() == 1:
            return entries_log_prob(self, ctx, items)
        B = len(ctx)
        width = self.cat_table.shape[1]
        if width * width * items.shape[1] < self.n_cats:
            # fewer category pairs to compare per row than a dense [B, categories] table has
            # cells per row: compare each candidate's categories with its row's (2.3x faster at
            # 1,000 categories, one per item; slower at 27)
            item_cats = torch.index_select(self.cat_table, 0, items.reshape(-1)).view(*items.shape, width)
            pos_cats = self.cat_table[ctx.pos_items]  # [B, width]
            shared = (item_cats[..., None] == pos_cats[:, None, None, :]).any(-1)  # padding weighs 0 below
            share = 1.0 / self.n_usable[ctx.pos_items].clamp(min=1).float()
            per_item = share[:, None] * (self.inv_total.take(item_cats) * shared).sum(-1)
            return fallback_log_prob(self, ctx, items, per_item.double() * self.w_item.take(items))
        # weight[b, c] = 1 / (|U(pos_b)| W_c) for c in U(pos_b); the padding column stays 0
        weight = torch.zeros(B, self.n_cats + 1, dtype=torch.float32)
        pos_cats = self.cat_table[ctx.pos_items]
        share = 1.0 / self.n_usable[ctx.pos_items].clamp(min=1).float()
        weight.scatter_(1, pos_cats, share[:, None] * self.inv_total[pos_cats])
        per_item = torch.gather(weight, 1, self.cat_table[items].reshape(B, -1)).reshape(*items.shape, -1).sum(-1)
        return fallback_log_prob(self, ctx, items, per_item.double() * self.w_item[items])
