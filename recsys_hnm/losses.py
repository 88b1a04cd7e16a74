"""Losses over a positive logit and blocks of negative logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sampled_softmax(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    log_q: torch.Tensor | None = None,
    invalid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the positive against its negatives, mean over rows.

    pos_logits [B]; neg_logits [B, N]; log_q [B, N] or [N]: subtracted from the negatives (the
    importance-sampling correction of the partition function); invalid [B, N]: negatives that
    must not count (known positives, accidental hits) are removed from the softmax.
    """
    if log_q is not None:
        neg_logits = neg_logits - log_q
    if invalid is not None:
        neg_logits = neg_logits.masked_fill(invalid, float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)
    loss = torch.logsumexp(logits, dim=1) - pos_logits
    if weights is not None:
        return (loss * weights).sum() / weights.sum()
    return loss.mean()


def bpr(pos_logits: torch.Tensor, neg_logits: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Bayesian personalised ranking: mean of -log sigmoid(pos - neg) over valid pairs."""
    losses = -F.logsigmoid(pos_logits[:, None] - neg_logits)
    return _masked_mean(losses, invalid)


def triplet(pos_logits: torch.Tensor, neg_logits: torch.Tensor, margin: float = 0.1, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge on score differences: mean of max(0, margin - (pos - neg)) over valid pairs."""
    losses = F.relu(margin - (pos_logits[:, None] - neg_logits))
    return _masked_mean(losses, invalid)


def _masked_mean(losses: torch.Tensor, invalid: torch.Tensor | None) -> torch.Tensor:
    if invalid is None:
        return losses.mean()
    keep = (~invalid).float()
    return (losses * keep).sum() / keep.sum().clamp(min=1.0)
