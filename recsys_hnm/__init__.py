"""recsys-hnm: hard negative mining for two-tower recommender models.

The main entry points; each subpackage (data, models, sampling, index, training, evaluation,
tracking) holds the rest.
"""

import sys as _sys


def _interrupted_cli() -> None:
    """Ctrl-C while the ``recsys-hnm`` command is still importing (torch, MLflow: seconds): one
    line and exit 130, not a traceback. Imported as a library, the KeyboardInterrupt stays."""
    argv = list(getattr(_sys, "orig_argv", None) or _sys.argv)
    script = _sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] if _sys.argv else ""
    as_module = "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "recsys_hnm.cli"
    if script.startswith("recsys-hnm") or as_module:
        print("interrupted (KeyboardInterrupt)", file=_sys.stderr)
        raise SystemExit(130)


try:
    from .config import ConfigError, ExperimentConfig, load_config
    from .data import DataError, Interactions, Split, leave_last_out, load_dataset, ratio_split, time_split
    from .evaluation import Evaluator, popularity_scorer
    from .experiment import TwoTowerRecommender, evaluate_run, recommend, train
    from .models import FeatureBuilder, TowerSizes, TwoTower, model_scorer
    from .sampling import MixtureSampler, Negatives
    from .training import Callback, EarlyStopping, Trainer
except KeyboardInterrupt:
    _interrupted_cli()
    raise

__version__ = "0.1.0"
__all__ = [
    "Callback", "ConfigError", "DataError", "EarlyStopping", "Evaluator", "ExperimentConfig", "FeatureBuilder",
    "Interactions", "MixtureSampler", "Negatives", "Split", "TowerSizes", "Trainer", "TwoTower", "TwoTowerRecommender", "evaluate_run",
    "leave_last_out", "load_config", "load_dataset", "model_scorer", "popularity_scorer", "ratio_split", "recommend",
    "time_split", "train",
]
