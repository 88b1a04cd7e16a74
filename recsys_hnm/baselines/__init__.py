"""Strong simple baselines (MostPop, ItemKNN, EASE, ALS) tuned on validation and scored by the
same evaluator, split and masking as the two-tower model."""

from .models import ALS, BASELINES, DEFAULT_GRIDS, EASE, Baseline, ItemKNN, MostPop, make_baseline
from .tuning import check_metric, fit_final, grid_points, tune

__all__ = [
    "ALS", "BASELINES", "DEFAULT_GRIDS", "EASE", "Baseline", "ItemKNN", "MostPop", "fit_final", "grid_points",
    "check_metric", "make_baseline", "tune",
]
