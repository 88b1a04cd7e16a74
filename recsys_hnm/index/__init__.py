"""Item indexes (Annoy and exact), the ANN hard-negative sampler and its refresh callback."""

from .ann_sampler import AnnSampler, resolve_window
from .item_index import (
    AUTO_ANNOY_MIN_ITEMS, AnnoyItemIndex, ExactIndex, IndexFileError, ItemIndex, load_index, make_index, recall_at_k,
)
from .refresh import IndexRefresh

__all__ = [
    "AUTO_ANNOY_MIN_ITEMS", "AnnSampler", "AnnoyItemIndex", "ExactIndex", "IndexFileError", "IndexRefresh", "ItemIndex",
    "load_index", "make_index", "recall_at_k", "resolve_window",
]
