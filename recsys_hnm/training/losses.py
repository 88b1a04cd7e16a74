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


def sampled_softmax_by_role(
    pos_logits: torch.Tensor,
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]],
    hard_loss: str = "joint",
    hard_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax over negative blocks ``(logits [B, n], log_q [B, n], invalid, hard)``;
    ``weights`` [B]: a weighted mean over rows (per-position training's end weights).

    ``joint``: one softmax over every block (hard blocks carry log_q 0: uncorrected extras).
    ``separate``: softmax(positive vs proposal blocks) + hard_weight * softmax(positive vs hard
    blocks), the hard negatives' own term with its own weight (Etsy, Pinterest).
    """
    if hard_loss not in ("joint", "separate"):
        raise ValueError(f"hard_loss must be 'joint' or 'separate', not {hard_loss!r}")
    groups: dict[bool, list] = {False: [], True: []}
    for logits, log_q, invalid, hard in blocks:
        groups[hard and hard_loss == "separate"].append((logits, log_q, invalid))

    def term(group):
        logits, log_q, invalid = zip(*group)
        invalid = [torch.zeros_like(x, dtype=torch.bool) if m is None else m for x, m in zip(logits, invalid)]
        return sampled_softmax(pos_logits, *(x[0] if len(x) == 1 else torch.cat(x, 1) for x in (logits, log_q, invalid)), weights)

    # no proposal block (e.g. a last batch of one row: no other in-batch positive): that term is
    # the softmax of the positive alone, 0
    loss = term(groups[False]) if groups[False] else pos_logits.sum() * 0.0
    return loss + hard_weight * term(groups[True]) if groups[True] else loss


def bpr(pos_logits: torch.Tensor, neg_logits: torch.Tensor, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Bayesian personalised ranking: mean of -log sigmoid(pos - neg) over valid pairs."""
    losses = -F.logsigmoid(pos_logits[:, None] - neg_logits)
    return _masked_mean(losses, invalid)


def triplet(pos_logits: torch.Tensor, neg_logits: torch.Tensor, margin: float = 0.1, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Hinge on score differences: mean of max(0, margin - (pos - neg)) over every valid pair.
    The training loss ``loss.type: triplet`` takes one negative per row instead (``pairwise``)."""
    losses = F.relu(margin - (pos_logits[:, None] - neg_logits))
    return _masked_mean(losses, invalid)


def gbce(pos_logits: torch.Tensor, neg_logits: torch.Tensor, invalid: torch.Tensor | None, n_items: int,
         calibration: float = 0.75) -> torch.Tensor:
    """gSASRec's generalised binary cross-entropy (Petrov & Macdonald, RecSys 2023):
    -beta log sigmoid(pos) - sum log(1 - sigmoid(neg)) over the row's valid negatives, with
    beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = k / (n_items - 1) the row's sampling rate
    of k negatives: t = 0 is plain BCE, t = 1 the calibrated limit whose sigmoid estimates the
    full softmax's probabilities. It assumes uniform negatives and takes no logQ."""
    if not 0.0 <= calibration <= 1.0:
        raise ValueError(f"gbce calibration must be in [0, 1], not {calibration}")
    keep = torch.ones_like(neg_logits, dtype=torch.bool) if invalid is None else ~invalid
    alpha = keep.sum(1).clamp(min=1) / max(n_items - 1, 1)
    beta = alpha * (calibration * (1 - 1 / alpha) + 1 / alpha)
    return (beta * F.softplus(-pos_logits) + (F.softplus(neg_logits) * keep).sum(1)).mean()


def _masked_mean(losses: torch.Tensor, invalid: torch.Tensor | None) -> torch.Tensor:
    if invalid is None:
        return losses.mean()
    keep = (~invalid).float()
    return (losses * keep).sum() / keep.sum().clamp(min=1.0)


def pairwise(kind: str, pos_logits: torch.Tensor, neg_logits: torch.Tensor, invalid: torch.Tensor | None = None,
             margin: float = 1.0, triplet_negative: str = "hardest", n_items: int = 0, calibration: float = 0.75) -> torch.Tensor:
    """The pairwise losses over a row's valid negatives; they take no logQ (a pair's loss does
    not estimate a partition function), so the sources' corrections do not apply to them.

    ``bpr``: mean of -log sigmoid(pos - neg) over every valid pair; ``gbce``: see ``gbce``.
    ``triplet``: the user as anchor, its positive, and one negative per row: the highest-scoring
    valid one (``hardest``), or (``semi_hard``, FaceNet) the highest-scoring one below the
    positive, falling back to the hardest where none is below; max(0, margin - (pos - neg)),
    mean over rows that have a valid negative. Scores and margin are in logit units.
    """
    if kind == "bpr":
        return bpr(pos_logits, neg_logits, invalid)
    if kind == "gbce":
        return gbce(pos_logits, neg_logits, invalid, n_items, calibration)
    if kind != "triplet":
        raise ValueError(f"pairwise loss must be 'bpr' or 'triplet', not {kind!r}")
    if triplet_negative not in ("hardest", "semi_hard"):
        raise ValueError(f"triplet_negative must be 'hardest' or 'semi_hard', not {triplet_negative!r}")
    invalid = torch.zeros_like(neg_logits, dtype=torch.bool) if invalid is None else invalid
    scores = neg_logits.masked_fill(invalid, float("-inf"))
    hardest = scores.max(dim=1).values
    if triplet_negative == "semi_hard":
        below = scores.masked_fill(scores >= pos_logits.detach()[:, None], float("-inf")).max(dim=1).values
        hardest = torch.where(torch.isfinite(below), below, hardest)
    has = torch.isfinite(hardest)
    if not has.any():
        return pos_logits.sum() * 0.0
    return F.relu(margin - (pos_logits[has] - hardest[has])).mean()
