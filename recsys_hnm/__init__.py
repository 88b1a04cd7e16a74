"""recsys-hnm: hard negative mining for two-tower recommender models."""

from .data import DataError, Interactions, Split, leave_last_out, load_dataset, ratio_split, time_split

__version__ = "0.1.0"
__all__ = ["DataError", "Interactions", "Split", "leave_last_out", "load_dataset", "ratio_split", "time_split"]
