"""Online hard negative mining inside a training step: selecting among each row's candidates,
and a cross-batch memory bank of item embeddings."""

from __future__ import annotations

import math

import torch

from ..sampling import KnownPositives

SELECTIONS = ("none", "hardest", "semi_hard")


def select_candidates(logits: torch.Tensor, pos_logits: torch.Tensor, invalid: torch.Tensor, mode: str,
                      k: int = 64, margin: float = 1.0,
                      items: torch.Tensor | None = None,
                      log_q: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Online mining among each row's candidates (in-batch and sampled): which of them the loss
    keeps. Returns the new invalid mask [B, N] and statistics of the qualified candidates.

    ``hardest``: the k highest-scoring valid candidates of the row; with ``items`` (the
    candidates' ids, [N] shared by the rows or [B, N]), the k highest-scoring distinct items,
    each with all its copies. A pool of in-batch targets holds a popular item many times: ranked
    by column, its copies would fill the k places, so that a row kept one or two items (and,
    uncorrected, counted them k times). Keeping every copy of a kept item leaves the logQ estimate of that item as it was.
    With ``log_q``, hardest ranks by ``logit - log_q``, each candidate's share of the corrected
    normaliser (the ones that hold most of the softmax's gradient), not by raw score.
    ``semi_hard`` (FaceNet): candidates scoring below the positive but within ``margin`` of it,
    positive - margin < score < positive.

    Statistics: ``qualified_per_row`` (mean count of kept candidates, distinct items where
    ``items`` is given) and ``mean_rank`` (1 = the row's highest-scoring valid candidate) of them.
    """
    if mode not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {mode!r}")
    if mode == "none":
        return invalid, {}
    scores = logits.detach().masked_fill(invalid, float("-inf"))
    if mode == "hardest":
        if log_q is not None:
            scores = scores - log_q.detach()
        group = None if items is None else _item_groups(items[None] if items.dim() == 1 else items).expand_as(scores)
        ranked = scores if group is None else torch.full_like(scores, float("-inf")).scatter_reduce_(1, group, scores, "amax")
        top, at = ranked.topk(min(k, ranked.shape[1]), dim=1)
        found = torch.isfinite(top)  # fewer than k valid ones leave -inf places
        chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(1, at, found)
        keep = (chosen if group is None else chosen.gather(1, group)) & ~invalid
        n = int(found.sum())
        ranks = torch.arange(1, top.shape[1] + 1, device=top.device).expand_as(top)[found]
        return ~keep, {"qualified_per_row": n / len(scores), "mean_rank": float(ranks.float().mean()) if n else float("nan")}
    # rank of every candidate within its row (1 = highest); valid ones precede masked ones
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(1, scores.shape[1] + 1, device=order.device).expand_as(order))
    pos = pos_logits.detach()[:, None]
    keep = (scores < pos) & (scores > pos - margin) & ~invalid
    n = keep.sum()
    stats = {"qualified_per_row": float(n) / len(scores),
             "mean_rank": float(rank[keep].float().mean()) if n else float("nan")}
    return ~keep, stats


def left_out_term(logits: torch.Tensor, log_q: torch.Tensor, before: torch.Tensor,
                  after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The candidates a selection left out (valid ``before`` it, invalid ``after``) as one
    softmax column per row: the log of their corrected sum, sum exp(logit - log_q), detached.
    Beside the kept candidates it keeps the normaliser of the whole pool, so that the positive
    and every kept candidate get the gradient they get without selection, and the left-out
    ones none (SCE's truncated gradient, with the loss's value unchanged). Returns a block
    ``(logits [B, 1], log_q 0, invalid where nothing was left out, hard False)``."""
    left = after & ~before
    rest = (logits - log_q).detach().masked_fill(~left, float("-inf")).logsumexp(1, keepdim=True)
    return rest, torch.zeros_like(rest), ~left.any(1, keepdim=True), False


def left_out_centroid_term(logits: torch.Tensor, log_q: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                           user_emb: torch.Tensor, embs: list[tuple[torch.Tensor, bool]], scale: torch.Tensor | float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``left_out_term`` with the user side's gradient of the left-out candidates kept: the
    column's value is their log corrected sum, as there, and its gradient in the user vector is
    ``scale`` times the centroid of their embeddings, weighted by their shares of that sum, which
    is what the whole pool's softmax gives the user (d/du logsumexp = the weighted mean of d
    logit/du). Only the item side of the rest is truncated (no left-out item is pushed down). The
    centroid costs [B, d] beside the pool's detached scores. ``embs``: each block's candidate
    embeddings with its ``shared`` flag ([n, d] shared by the rows, or [B, n, d]), in the
    columns' order."""
    rest, zero, none_left, hard = left_out_term(logits, log_q, before, after)
    left = after & ~before
    shares = torch.softmax((logits - log_q).detach().masked_fill(~left, float("-inf")), 1).nan_to_num(0.0)  # rows with none: 0
    centroid = torch.zeros_like(user_emb)
    for (emb, shared), w in zip(embs, torch.split(shares, _widths(embs), 1)):
        centroid = centroid + (w @ emb.detach() if shared else torch.einsum("bn,bnd->bd", w, emb.detach()))
    pull = (user_emb * centroid).sum(1, keepdim=True) * scale
    return rest + (pull - pull.detach()), zero, none_left, hard


def left_out_item_side_term(logits: torch.Tensor, log_q: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                            user_emb: torch.Tensor, embs: list[tuple[torch.Tensor, bool]], scale: torch.Tensor | float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The other half of ``left_out_centroid_term``: the left-out candidates' column with the
    item side's gradient of the whole pool (every left-out item pushed down by its share, as
    without selection) and none in the user vector. A probe of which half of the rest's
    gradient training needs, not a saving: it keeps the pool's [B, N] graph."""
    user_part = torch.cat([candidate_scores(user_emb, emb.detach(), shared) for emb, shared in embs], 1) * scale
    items_only = logits - user_part + user_part.detach()  # the same values; d/du 0, d/d(item) as the pool's
    left = after & ~before
    # a finite floor, not -inf: a row with nothing left out is masked, and its gradient stays 0, not NaN
    rest = (items_only - log_q.detach()).masked_fill(~left, -1e30).logsumexp(1, keepdim=True)
    return rest, torch.zeros_like(rest), ~left.any(1, keepdim=True), False


def _widths(embs: list[tuple[torch.Tensor, bool]]) -> list[int]:
    return [emb.shape[0] if shared else emb.shape[1] for emb, shared in embs]


def candidate_scores(user_emb: torch.Tensor, emb: torch.Tensor, shared: bool) -> torch.Tensor:
    """[B, n] scores of each row against shared candidates [n, d] or its own [B, n, d]."""
    return user_emb @ emb.T if shared else torch.einsum("bd,bnd->bn", user_emb, emb)


def _item_groups(items: torch.Tensor) -> torch.Tensor:
    """For each column of ``items`` [B, N], the index of its item among the row's distinct items
    (0 .. distinct - 1, in id order)."""
    order = items.argsort(dim=1, stable=True)
    ids = items.gather(1, order)
    new = torch.ones_like(ids, dtype=torch.long)
    new[:, 1:] = (ids[:, 1:] != ids[:, :-1]).long()
    return torch.empty_like(order).scatter_(1, order, new.cumsum(1) - 1)


class MemoryBank:
    """A FIFO queue of the item embeddings of recent batches' positives, with their item ids:
    cross-batch negatives (Wang et al., SIGIR 2021). The embeddings are stored detached (stale by
    the steps since they were computed); only the user side gets gradient through them.

    logQ: items enter the queue at their training-stream frequency p(j), like in-batch
    negatives, so among ``n`` queued entries j is expected n p(j) times (``log_count``). Under
    the mixture correction the bank is one more proposal source: every candidate, queued or
    sampled, is corrected by its expected count under all of them together (``join``). Corrected
    by its own count alone, the bank would estimate the partition function a second time beside
    the other sources (about 2Z), with no uniform share to bound the weight of rare queued items.
    Known positives of the row's user and the row's own positive are masked by id. ``log_p``
    None: no correction (log_q 0), as under ``logq: none``.
    """

    def __init__(self, size: int, dim: int, log_p: torch.Tensor | None, warmup_steps: int = 0):
        if size < 1:
            raise ValueError(f"memory bank size must be >= 1, not {size}")
        self.size, self.warmup_steps = size, warmup_steps
        self.log_p = log_p
        self.embeddings = torch.zeros(size, dim)
        self.items = torch.full((size,), -1, dtype=torch.long)
        self.step_added = torch.zeros(size, dtype=torch.long)
        self.next = 0  # where the next entry goes (the oldest entry once full)
        self.filled = 0
        self.step = 0

    def push(self, items: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Enqueue a batch (evicting the oldest entries) and count a step."""
        items, embeddings = items[-self.size:], embeddings.detach()[-self.size:]
        at = (self.next + torch.arange(len(items))) % self.size
        self.items[at], self.embeddings[at], self.step_added[at] = items, embeddings, self.step
        self.next = int((self.next + len(items)) % self.size)
        self.filled = min(self.size, self.filled + len(items))
        self.step += 1

    @property
    def ready(self) -> bool:
        return self.step >= self.warmup_steps and self.filled > 0

    def log_count(self, items: torch.Tensor) -> torch.Tensor:
        """log of the expected number of queued entries of each item: log n + log p(j)."""
        return math.log(self.filled) + self.log_p[items].float()

    def negatives(self, users: torch.Tensor, pos_items: torch.Tensor, known: KnownPositives | None):
        """(items [n], embeddings [n, d], log_q [n], invalid [B, n], staleness in steps) of the
        queued entries, oldest first."""
        at = (self.next - self.filled + torch.arange(self.filled)) % self.size
        items = self.items[at]
        invalid = items[None, :] == pos_items[:, None]
        if known is not None:
            invalid |= known.contains(users, items)
        log_q = self.log_count(items) if self.log_p is not None else torch.zeros(len(items))
        staleness = float((self.step - self.step_added[at]).float().mean())
        return items, self.embeddings[at], log_q, invalid, staleness

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("embeddings", "items", "step_added", "next", "filled", "step")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
