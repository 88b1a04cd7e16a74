"""Online hard negative mining inside a training step: selecting among each row's candidates,
and a cross-batch memory bank of item embeddings."""

from __future__ import annotations

import math

import torch

from ..sampling import KnownPositives

SELECTIONS = ("none", "hardest", "semi_hard")


def select_candidates(logits: torch.Tensor, pos_logits: torch.Tensor, invalid: torch.Tensor, mode: str,
                      k: int = 64, margin: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Online mining among each row's candidates (in-batch and sampled): which of them the loss
    keeps. Returns the new invalid mask [B, N] and statistics of the qualified candidates.

    ``hardest``: the k highest-scoring valid candidates of the row.
    ``semi_hard`` (FaceNet): candidates scoring below the positive but within ``margin`` of it,
    positive - margin < score < positive.

    Statistics: ``qualified_per_row`` (mean count) and ``mean_rank`` (1 = the row's highest-scoring
    valid candidate) of the kept candidates.
    """
    if mode not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, not {mode!r}")
    if mode == "none":
        return invalid, {}
    scores = logits.detach().masked_fill(invalid, float("-inf"))
    # rank of every candidate within its row (1 = highest); valid ones precede masked ones
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(1, scores.shape[1] + 1).expand_as(order))
    if mode == "hardest":
        keep = (rank <= k) & ~invalid
    else:
        pos = pos_logits.detach()[:, None]
        keep = (scores < pos) & (scores > pos - margin) & ~invalid
    n = keep.sum()
    stats = {"qualified_per_row": float(n) / len(scores),
             "mean_rank": float(rank[keep].float().mean()) if n else float("nan")}
    return ~keep, stats


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
