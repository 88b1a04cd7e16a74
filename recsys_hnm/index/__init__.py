"""Item indexes (exact, Annoy, faiss HNSW and IVF): build, query, save/load, and their defaults.
The ANN hard-negative sampler is ``sampling.ann``; its refresh callback ``training.refresh``."""

from .item_index import (
    AUTO_ANN_MIN_ITEMS, AnnoyItemIndex, ExactIndex, FaissItemIndex, HnswItemIndex, IndexFileError, IndexOptions, IvfItemIndex,
    ItemIndex,    load_index, make_index, recall_at_k,
)

__all__ = [
    "AUTO_ANN_MIN_ITEMS", "AnnoyItemIndex", "ExactIndex", "FaissItemIndex", "HnswItemIndex", "IndexFileError",
    "IndexOptions", "IvfItemIndex", "ItemIndex", "load_index", "make_index", "recall_at_k",
]
