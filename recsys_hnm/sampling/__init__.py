"""Negative samplers: one file per source (the ANN source included), and their mixture."""

from ..data.known import KnownPositives
from .ann import AnnSampler, resolve_window
from .base import Context, Negatives, Sampler
from .category import CategorySampler
from .copurchase import CopurchaseSampler
from .in_batch import InBatchSampler
from .mixture import FULL, IN_BATCH, MixtureSampler, allocate
from .popularity import PopularitySampler
from .tables import AliasTable, SegmentedAlias
from .uniform import FullCatalog, UniformSampler

__all__ = [
    "FULL", "IN_BATCH", "AliasTable", "AnnSampler", "CategorySampler", "Context", "CopurchaseSampler", "FullCatalog",
    "InBatchSampler", "KnownPositives", "MixtureSampler", "Negatives", "PopularitySampler", "Sampler", "SegmentedAlias",
    "UniformSampler", "allocate", "resolve_window",
]
