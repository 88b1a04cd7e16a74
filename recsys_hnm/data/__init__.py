"""Data layer: validated interactions, splits, the co-purchase graph and loaders."""

from .copurchase import copurchase_graph, describe_graph
from .interactions import DataError, IdMap, Interactions
from .loaders import (
    download_movielens, load_dataset, load_fixed_split, load_movielens, load_retail, load_table, read_table,
)
from .splits import Split, fixed_split, last_basket_out, leave_last_out, ratio_split, time_split
from .synthetic import synthetic, synthetic_frames

__all__ = [
    "DataError", "IdMap", "Interactions", "Split", "copurchase_graph", "describe_graph",
    "download_movielens", "fixed_split", "last_basket_out", "leave_last_out", "load_dataset", "load_fixed_split", "load_movielens", "load_retail",
    "load_table", "ratio_split", "read_table", "synthetic", "synthetic_frames", "time_split",
]
