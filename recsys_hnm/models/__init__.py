"""Two-tower model on TorchRec modules and the features it reads."""

from .features import FeatureBuilder
from .scoring import item_embeddings, model_scorer, user_embeddings
from .two_tower import HistoryEncoder, TowerSizes, TwoTower

__all__ = ["FeatureBuilder", "HistoryEncoder", "TowerSizes", "TwoTower", "item_embeddings", "model_scorer", "user_embeddings"]
