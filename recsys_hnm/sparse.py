"""Small vectorised helpers over CSR structures, shared by the data layer, features and samplers."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def row_ids(indptr: np.ndarray) -> np.ndarray:
    """The row of every stored entry of a CSR matrix with this ``indptr``."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def jagged_positions(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ranges [starts[i], starts[i] + lengths[i]) for all i, without a loop."""
    shift = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
    return torch.arange(int(lengths.sum())) + shift


class SortedPairs:
    """(row, col) lookup in a CSR matrix: keys row * n_cols + col, sorted, and one binary search
    for all queries (measured 2x faster here than a search bounded to each row)."""

    def __init__(self, matrix: sp.csr_matrix):
        m = matrix.tocsr()
        m.sort_indices()
        self.n_cols = m.shape[1]
        self.keys = torch.from_numpy(row_ids(m.indptr) * self.n_cols + m.indices.astype(np.int64))

    def find(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Position in the matrix's stored entries of (rows[b], cols[b, j]), or -1 if absent."""
        if len(self.keys) == 0:
            return torch.full(cols.shape, -1, dtype=torch.long)
        keys = rows[:, None] * self.n_cols + cols
        at = torch.searchsorted(self.keys, keys).clamp_(max=len(self.keys) - 1)
        return torch.where(self.keys[at] == keys, at, -1)
