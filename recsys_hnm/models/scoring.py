"""Embeddings of every user and item, and the scorer the evaluator and ANN mining use."""

from __future__ import annotations

import torch

from ..ops.ranking import Scorer, embedding_scorer
from .features import FeatureBuilder
from .two_tower import TwoTower


@torch.no_grad()
def item_embeddings(model: TwoTower, features: FeatureBuilder, chunk: int = 8192) -> torch.Tensor:
    model.eval()
    n = model.sizes.n_items
    return torch.cat([model.item_embeddings(features.item_features(torch.arange(s, min(s + chunk, n)))) for s in range(0, n, chunk)])


@torch.no_grad()
def user_embeddings(model: TwoTower, features: FeatureBuilder, chunk: int = 8192) -> torch.Tensor:
    model.eval()
    n = model.sizes.n_users
    return torch.cat([model.user_embeddings(features.user_features(torch.arange(s, min(s + chunk, n)))) for s in range(0, n, chunk)])


def model_scorer(model: TwoTower, features: FeatureBuilder) -> Scorer:
    """Scores = user . item / temperature (+ item bias), from embeddings computed once, plus the
    repeat term on the items of each user's history (``features``' history: what the phase may
    see) when the model has one."""
    bias = model.item_bias.detach() if model.item_bias is not None else None
    score = embedding_scorer(user_embeddings(model, features), item_embeddings(model, features), float(model.scale.detach()), bias)
    if model.repeat_term is None:
        return score

    @torch.no_grad()
    def with_repeats(users: torch.Tensor) -> torch.Tensor:
        s = score(users)
        items, counts = features.repeat_counts(users)
        rows, cols = (items >= 0).nonzero(as_tuple=True)
        s.index_put_((rows, items[rows, cols]), model.repeat_term(items[rows, cols], counts[rows, cols]), accumulate=True)
        return s

    return with_repeats
