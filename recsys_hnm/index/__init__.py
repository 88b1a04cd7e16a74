"""Item indexes (exact, Annoy, faiss HNSW and IVF), the ANN hard-negative sampler and its refresh callback."""

from .ann_sampler import AnnSampler, resolve_window
from .item_index import (
    AUTO_ANN_MIN_ITEMS, AnnoyItemIndex, ExactIndex, FaissItemIndex, HnswItemIndex, IndexFileError, IvfItemIndex, ItemIndex,
    load_index, make_index, recall_at_k,
)
from .refresh import IndexRefresh

__all__ = [
    "AUTO_ANN_MIN_ITEMS", "AnnSampler", "AnnoyItemIndex", "ExactIndex", "FaissItemIndex", "HnswItemIndex", "IndexFileError",
    "IndexRefresh", "IvfItemIndex", "ItemIndex",
    "load_index", "make_index", "recall_at_k", "resolve_window",
]
