"""Ranking metrics and the full-ranking evaluator."""

from .evaluator import Evaluator, embedding_scorer, mask_known, popularity_scorer
from .metrics import METRICS, ranking_metrics

__all__ = ["METRICS", "Evaluator", "embedding_scorer", "mask_known", "popularity_scorer", "ranking_metrics"]
