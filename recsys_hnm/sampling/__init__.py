"""Negative samplers: one file per source, and their mixture."""

from .base import Context, KnownPositives, Negatives, Sampler
from .category import CategorySampler
from .copurchase import CopurchaseSampler
from .in_batch import InBatchSampler
from .mixture import FULL, IN_BATCH, MixtureSampler, allocate
from .popularity import PopularitySampler
from .tables import AliasTable, SegmentedAlias
from .uniform import FullCatalog, UniformSampler

__all__ = [
    "FULL", "IN_BATCH", "AliasTable", "CategorySampler", "Context", "CopurchaseSampler", "FullCatalog", "InBatchSampler",
    "KnownPositives", "MixtureSampler", "Negatives", "PopularitySampler", "Sampler", "SegmentedAlias",
    "UniformSampler", "allocate",
]
