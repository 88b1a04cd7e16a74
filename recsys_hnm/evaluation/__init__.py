"""Ranking metrics and the full-ranking evaluator."""

from .evaluator import EXCLUDE, Evaluator, metric_means, phase_counts, popularity_scorer
from ..ops.ranking import embedding_scorer, mask_known, top_k
from .metrics import METRICS, ranking_metrics

__all__ = ["EXCLUDE", "METRICS", "Evaluator", "embedding_scorer", "mask_known", "metric_means", "phase_counts", "popularity_scorer", "ranking_metrics", "top_k"]
