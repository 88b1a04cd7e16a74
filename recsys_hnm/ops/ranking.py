"""Ranking helpers shared by the evaluator, the indexes and inference: a documented top-k
(ties to the lower item index), masking of known items, and the dot-product scorer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from .sparse import row_ids

Scorer = Callable[[torch.Tensor], torch.Tensor]  # user indices [c] -> scores [c, n_items]


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [R, k'], values [R, k']) of each row's ``k' = min(k, n)`` highest scores, best
    first. Ties go to the lower item index: a documented rule, so a metric does not depend on
    ``torch.topk``'s unspecified tie order (MostPop has many ties), nor on the other K asked for.

    A float top-k decides every row whose k-th value is not tied with an item left out (then
    only the order within the k needs the rule); the other rows, few except for tie-heavy
    scorers such as MostPop, take an exact top-k over int64 keys that pack the order-preserving
    bits of the score with the reversed item index.
    """
    n = scores.shape[1]
    k = min(k, n)
    if k == 0:
        return torch.topk(scores, 0, dim=1)
    # one more than asked: the (k+1)-th value equal to the k-th means a tie with an item left out
    values, indices = torch.topk(scores, min(k + 1, n), dim=1)
    tied = values[:, k] == values[:, k - 1] if k < n else torch.zeros(len(scores), dtype=torch.bool)
    values, indices = values[:, :k], indices[:, :k]
    # equal values in index order: sort by index, then stably by value
    indices, by_index = indices.sort(dim=1)
    values = values.gather(1, by_index)
    values, by_value = values.sort(dim=1, descending=True, stable=True)
    indices = indices.gather(1, by_value)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        indices[rows] = _top_k_exact(scores[rows], k)
        values[rows] = torch.gather(scores[rows], 1, indices[rows])
    return indices, values


def _top_k_exact(scores: torch.Tensor, k: int) -> torch.Tensor:
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long() << 32
    key |= (0xFFFFFFFF - torch.arange(scores.shape[1], dtype=torch.int64))
    return torch.topk(key, k, dim=1).indices


def mask_known(scores: torch.Tensor, known: sp.csr_matrix, users: torch.Tensor) -> None:
    """Set the scores of each user's known items to -inf, in place."""
    sub = known[users.numpy()]
    scores[torch.from_numpy(row_ids(sub.indptr)), torch.from_numpy(sub.indices.astype(np.int64))] = float("-inf")



def embedding_scorer(user_emb: torch.Tensor, item_emb: torch.Tensor, scale: float = 1.0, bias: torch.Tensor | None = None) -> Scorer:
    """Dot products of precomputed user rows and all items (times scale, plus item bias)."""
    item_t = (item_emb * scale).T.contiguous()

    def score(users: torch.Tensor) -> torch.Tensor:
        s = user_emb[users] @ item_t
        return s + bias if bias is not None else s

    return score
