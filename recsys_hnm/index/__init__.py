"""Item indexes (exact, Annoy, faiss HNSW), the ANN hard-negative sampler and its refresh callback."""

from .ann_sampler import AnnSampler, resolve_window
from .item_index import (
    AUTO_HNSW_MIN_ITEMS, AnnoyItemIndex, ExactIndex, HnswItemIndex, IndexFileError, ItemIndex, load_index, make_index, recall_at_k,
)
from .refresh import IndexRefresh

__all__ = [
    "AUTO_HNSW_MIN_ITEMS", "AnnSampler", "AnnoyItemIndex", "ExactIndex", "HnswItemIndex", "IndexFileError", "IndexRefresh", "ItemIndex",
    "load_index", "make_index", "recall_at_k", "resolve_window",
]
