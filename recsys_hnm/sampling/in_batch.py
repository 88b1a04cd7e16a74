"""In-batch negatives: the other positives of the batch."""

from __future__ import annotations

import numpy as np
import torch

from .base import Context


class InBatchSampler:
    """Every row sees the whole batch's positives (its own is an accidental hit, masked).

    A batch's positives are draws from the training stream, so item j's proposal is its stream
    frequency p(j) = count(j) / total, and the other B - 1 positives of a batch hold (B - 1) p(j)
    copies of it in expectation: the logQ correction of Yi et al. (RecSys 2019). (The count of j
    in this one batch, log 1 = 0 for most items, is not a correction: it leaves the popularity
    bias in.)
    """

    shared = True

    def __init__(self, counts: np.ndarray):
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or (counts < 0).any() or counts.sum() <= 0:
            raise ValueError("in-batch sampling needs non-negative training counts of the items, with a positive total")
        self.n_items = len(counts)
        with np.errstate(divide="ignore"):
            self.log_p = torch.from_numpy(np.log(counts / counts.sum()))  # -inf: never a training positive

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor:
        return ctx.pos_items if ctx.batch_items is None else ctx.batch_items

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        return self.log_p[items].float()
