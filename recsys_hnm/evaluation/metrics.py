"""Ranking metrics at K from the hit pattern of each user's top list."""

from __future__ import annotations

import torch

METRICS = ("ndcg", "map", "recall", "hr", "mrr", "precision")


def is_metric_at(metric, ks) -> bool:
    """Whether ``metric`` names one of METRICS at a K of ``ks``, as ``ndcg@10``."""
    name, _, k = str(metric).partition("@")
    return isinstance(metric, str) and name in METRICS and k.isdigit() and int(k) in {int(x) for x in ks}


def ranking_metrics(hits: torch.Tensor, n_relevant: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user metrics: ``hits`` [U, Kmax] bool (is the item at rank r relevant?), ``n_relevant``
    [U] (> 0). Returns ``{"ndcg@10": tensor[U], ...}``.

    NDCG@K: DCG with gain 1/log2(rank+1), over the ideal DCG of min(n_relevant, K) hits.
    mAP@K: sum of precision@r at each hit rank r <= K, divided by min(n_relevant, K).
    Recall@K: hits in the top K / n_relevant. HR@K: any hit. MRR@K: 1 / rank of the first hit.
    Precision@K: hits in the top K / K.
    """
    if hits.shape[1] < max(ks):
        raise ValueError(f"need the top {max(ks)} items, got {hits.shape[1]}")
    h = hits.double()
    n_rel = n_relevant.double()
    ranks = torch.arange(1, h.shape[1] + 1, dtype=torch.float64)
    gains = 1.0 / torch.log2(ranks + 1.0)
    cum_hits = torch.cumsum(h, 1)
    ideal = torch.cumsum(gains, 0)
    first = torch.where(hits.any(1), hits.double().argmax(1).double() + 1, torch.full_like(n_rel, float("inf")))
    out = {}
    for k in ks:
        hk = h[:, :k]
        n_hit = cum_hits[:, k - 1]
        denom = torch.minimum(n_rel, torch.tensor(float(k)))
        out[f"ndcg@{k}"] = (hk * gains[:k]).sum(1) / ideal[(denom - 1).long()]
        out[f"map@{k}"] = (hk * cum_hits[:, :k] / ranks[:k]).sum(1) / denom
        out[f"recall@{k}"] = n_hit / n_rel
        out[f"hr@{k}"] = (n_hit > 0).double()
        out[f"mrr@{k}"] = torch.where(first <= k, 1.0 / first, torch.zeros_like(first))
        out[f"precision@{k}"] = n_hit / k
    return out
