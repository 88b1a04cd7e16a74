"""recsys-hnm: hard negative mining for two-tower recommender models.

The main entry points; each subpackage (data, models, sampling, index, training, evaluation,
tracking) holds the rest.
"""

from .config import ConfigError, ExperimentConfig, load_config
from .data import DataError, Interactions, Split, leave_last_out, load_dataset, ratio_split, time_split
from .evaluation import Evaluator, popularity_scorer
from .experiment import evaluate_run, recommend, train
from .models import FeatureBuilder, TowerSizes, TwoTower, model_scorer
from .sampling import MixtureSampler, Negatives
from .training import Callback, EarlyStopping, Trainer

__version__ = "0.1.0"
__all__ = [
    "Callback", "ConfigError", "DataError", "EarlyStopping", "Evaluator", "ExperimentConfig", "FeatureBuilder",
    "Interactions", "MixtureSampler", "Negatives", "Split", "TowerSizes", "Trainer", "TwoTower", "evaluate_run",
    "leave_last_out", "load_config", "load_dataset", "model_scorer", "popularity_scorer", "ratio_split", "recommend",
    "time_split", "train",
]
