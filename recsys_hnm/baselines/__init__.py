"""Strong simple baselines (MostPop, ItemKNN, EASE, ALS, and for repeat purchases RepeatPop and
TIFU-KNN) tuned on validation and scored by the same evaluator, split and masking as the
two-tower model."""

from .models import ALS, BASELINES, DEFAULT_GRIDS, EASE, TIFUKNN, Baseline, ItemKNN, MostPop, RepeatPop, make_baseline
from .tuning import check_metric, fit_final, grid_points, tune

__all__ = [
    "ALS", "BASELINES", "DEFAULT_GRIDS", "EASE", "TIFUKNN", "Baseline", "ItemKNN", "MostPop", "RepeatPop", "fit_final", "grid_points",
    "check_metric", "make_baseline", "tune",
]
