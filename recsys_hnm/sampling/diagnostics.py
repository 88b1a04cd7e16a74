"""Measures of the negatives themselves: how hard they are and how often they are real positives."""

from __future__ import annotations

from collections import defaultdict

import torch

from .base import Context, Negatives
from ..data.known import KnownPositives


class NegativeDiagnostics:
    """Accumulates, per source over an epoch:

    score     mean (cosine) score of the drawn negatives;
    rank      their mean estimated rank among all items for the user, from the ranks of a
              shared uniform sample of ``rank_sample`` items (rank = n_items x share of the sample
              scoring higher);
    false_negative_rate  share of drawn negatives that are among the user's held-out positives
              (validation and test items): the measure of "too hard / mislabeled" negatives;
    known_hit_rate  share that are items the user has in training (masked, never trained on);
    fallback_rate   share of rows whose draws came from the source's fallback sampler.

    Each step is measured on its first ``rank_rows`` rows (batches are shuffled, so a random
    sample): a full-catalog block would otherwise cost more to diagnose than to train on.
    """

    def __init__(self, names: list[str], heldout: KnownPositives | None, n_items: int, rank_sample: int = 512,
                 rank_rows: int = 128, seed: int = 0):
        self.names = names
        # its own random stream: turning diagnostics on or off never changes the training draws
        self.generator = torch.Generator().manual_seed(seed)
        self.heldout = heldout
        self.n_items = n_items
        self.rank_sample = rank_sample
        self.rank_rows = rank_rows
        self.reset()

    def rank_items(self) -> torch.Tensor | None:
        """The uniform item sample that estimates the ranks of this step's negatives."""
        if not self.rank_sample:
            return None
        return torch.randint(0, self.n_items, (self.rank_sample,), generator=self.generator)

    def reset(self) -> None:
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    @torch.no_grad()
    def update(self, ctx: Context, blocks: list[Negatives], neg_scores: list[torch.Tensor], sample_scores: torch.Tensor | None) -> None:
        """``neg_scores[i]`` [B, n_i]: cosine scores of block i; ``sample_scores`` [r, S]: scores
        of the first r rows against a uniform item sample (or None to skip the rank)."""
        B = min(len(ctx), self.rank_rows)
        users, pos_items = ctx.users[:B], ctx.pos_items[:B]
        sorted_sample = torch.sort(sample_scores[:B], dim=1).values if sample_scores is not None else None
        for block, scores in zip(blocks, neg_scores):
            acc = self.sums[self.names[block.source]]
            items = block.per_row_items(len(ctx))[:B]
            scores = scores[:B]
            accidental = items == pos_items[:, None]
            known = block.invalid[:B] & ~accidental if block.invalid is not None else torch.zeros_like(accidental)
            acc["count"] += items.numel()
            acc["score"] += float(scores.sum())
            acc["known_hits"] += float(known.sum())
            acc["accidental_hits"] += float(accidental.sum())
            if self.heldout is not None:
                acc["false_negatives"] += float(self.heldout.contains(users, items).sum())
            acc["rows"] += B
            if block.fallback is not None:
                acc["fallback_rows"] += float(block.fallback[:B].sum())
            if sorted_sample is not None:
                r = sorted_sample.shape[0]
                above = sorted_sample.shape[1] - torch.searchsorted(sorted_sample, scores[:r].contiguous(), right=True)
                acc["rank"] += float((above.double() / sorted_sample.shape[1] * self.n_items).sum())
                acc["rank_count"] += scores[:r].numel()

    def results(self) -> dict[str, float]:
        out = {}
        for name, acc in self.sums.items():
            n = max(acc["count"], 1.0)
            out[f"neg.{name}.score"] = acc["score"] / n
            out[f"neg.{name}.known_hit_rate"] = acc["known_hits"] / n
            out[f"neg.{name}.accidental_hit_rate"] = acc["accidental_hits"] / n
            if self.heldout is not None:
                out[f"neg.{name}.false_negative_rate"] = acc["false_negatives"] / n
            out[f"neg.{name}.fallback_rate"] = acc["fallback_rows"] / max(acc["rows"], 1.0)
            if acc["rank_count"]:
                out[f"neg.{name}.rank"] = acc["rank"] / acc["rank_count"]
        return out
