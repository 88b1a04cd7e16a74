"""Turns user and item indices into the KeyedJaggedTensors the towers read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torchrec import KeyedJaggedTensor

from ..ops.sparse import jagged_positions
from .two_tower import HISTORY, ITEM_CATEGORY, ITEM_ID, USER_ID, kjt


class FeatureBuilder:
    """Holds each user's most recent ``history_len`` items (from the events given) and each
    item's categories as padded tensors, and builds KJTs from index tensors without Python loops.

    Every KJT carries all four features (the ones of the other tower empty), since one
    EmbeddingBagCollection reads them all.
    """

    def __init__(self, history: pd.DataFrame, n_users: int, item_categories: sp.csr_matrix, history_len: int = 100,
                 decay: float = 1.0, user_id: bool = True, cold_items: str = "id"):
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, not {history_len}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"history decay must be in (0, 1], not {decay}")
        self.n_users = n_users
        self.history_len = history_len
        self.decay = decay
        self.user_id = user_id  # False: the user tower reads the history only (cold users work alike)
        if cold_items not in ("id", "features"):
            raise ValueError(f"cold_items must be 'id' or 'features', not {cold_items!r}")
        # "features": an item with no event in these (training) events is scored without its id
        # embedding, which never saw a positive; the item tower must then have been trained with
        # id dropout to read its categories alone
        self.no_id = torch.from_numpy(np.bincount(history["item"].to_numpy(), minlength=item_categories.shape[0]) == 0) \
            if cold_items == "features" else torch.zeros(item_categories.shape[0], dtype=torch.bool)
        self.history = _recent_items(history, n_users, history_len)
        # every event in time order, per user: what a causal training bag is cut from
        ordered = _time_ordered(history)
        self.seq_items = torch.tensor(ordered["item"].to_numpy(np.int64))
        self.seq_start = torch.from_numpy(np.r_[0, np.cumsum(np.bincount(ordered["user"].to_numpy(), minlength=n_users))[:-1]].astype(np.int64))
        cats = item_categories.tocsr()
        self.cat_indptr = torch.from_numpy(cats.indptr.astype(np.int64))
        self.cat_indices = torch.from_numpy(cats.indices.astype(np.int64))

    def with_history(self, history: pd.DataFrame) -> "FeatureBuilder":
        """The same items, with user histories from other events (e.g. train + valid for test)."""
        out = object.__new__(FeatureBuilder)
        out.__dict__.update(self.__dict__)
        out.history = _recent_items(history, self.n_users, self.history_len)
        return out

    def user_features(self, users: torch.Tensor, exclude: torch.Tensor | None = None) -> KeyedJaggedTensor:
        """User id and history bag; ``exclude[b]`` (the training target) is left out of row b."""
        hist = self.history[users]  # [B, L], -1 = padding
        keep = hist >= 0
        if exclude is not None:
            keep &= hist != exclude[:, None]
        lengths = keep.sum(1)
        return self._user_kjt(users, lengths, hist[keep])

    def event_positions(self, events: pd.DataFrame) -> torch.Tensor:
        """Each event's position in its user's time-ordered history (aligned with ``events``'
        rows): what ``user_features_before`` cuts at. ``events`` must be the history the
        builder was made from (the training events)."""
        ordered = _time_ordered(events)
        user = ordered["user"].to_numpy()
        first = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1]
        pos_sorted = np.arange(len(user)) - np.repeat(first, np.diff(np.r_[first, len(user)]))
        positions = np.empty(len(user), np.int64)
        positions[events.index.get_indexer(ordered.index)] = pos_sorted
        positions = torch.from_numpy(positions)
        users = torch.tensor(events["user"].to_numpy(np.int64))
        if len(events) != len(self.seq_items) or not torch.equal(self.seq_items[self.seq_start[users] + positions], torch.tensor(events["item"].to_numpy(np.int64))):
            raise ValueError("causal histories need the training events to be the history this FeatureBuilder was built from")
        return positions

    def user_features_before(self, users: torch.Tensor, positions: torch.Tensor) -> KeyedJaggedTensor:
        """User id and the bag of the last ``history_len`` items strictly before each row's
        event: at training time a (user, positive) sees nothing at or after the positive."""
        lengths = positions.clamp(max=self.history_len)
        starts = self.seq_start[users] + positions - lengths
        return self._user_kjt(users, lengths, self.seq_items[jagged_positions(starts, lengths)])

    def repeat_counts(self, users: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(items, counts), each [B, history_len]: the distinct items of each row's history and
        how often each occurs in it (-1 and 0 padding): what the repeat term reads. ``positions``:
        the last ``history_len`` events strictly before each row's event (training, causal);
        None: the user's recent history (scoring: train events for validation, train + valid
        for test, never the phase scored)."""
        L = self.history_len
        if positions is None:
            window = self.history[users]
        else:
            lengths = positions.clamp(max=L)
            at = (self.seq_start[users] + positions - lengths)[:, None] + torch.arange(L)
            window = torch.where(torch.arange(L) < lengths[:, None], self.seq_items[at.clamp(max=max(len(self.seq_items) - 1, 0))], -1)
        ordered = window.sort(dim=1).values
        counts = (ordered[:, :, None] == ordered[:, None, :]).sum(-1)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        keep = first & (ordered >= 0)
        return torch.where(keep, ordered, -1), torch.where(keep, counts, 0)

    def _user_kjt(self, users: torch.Tensor, lengths: torch.Tensor, items: torch.Tensor) -> KeyedJaggedTensor:
        """The history bag's weights sum to 1 per row: decay ** age (age 0 = the most recent
        item), normalised; decay 1 is the plain mean."""
        age = torch.repeat_interleave(lengths, lengths) - 1 - (torch.arange(len(items)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths))
        weights = self.decay ** age.double()
        totals = torch.zeros(len(users), dtype=torch.float64).index_add_(0, torch.repeat_interleave(torch.arange(len(users)), lengths), weights)
        weights = (weights / torch.repeat_interleave(totals, lengths)).float()
        ids = (torch.ones_like(users), users, None) if self.user_id else (torch.zeros_like(users), users[:0], None)
        return kjt(len(users), {USER_ID: ids, HISTORY: (lengths, items, weights)})

    def item_features(self, items: torch.Tensor, drop_id: torch.Tensor | None = None) -> KeyedJaggedTensor:
        """Item id and the mean of its categories; the id is left out for cold items (see
        ``cold_items``) and where ``drop_id`` (id dropout at training time) is True."""
        starts = self.cat_indptr[items]
        lengths = self.cat_indptr[items + 1] - starts
        categories = self.cat_indices[jagged_positions(starts, lengths)]
        mean = (1.0 / torch.repeat_interleave(lengths, lengths).float())  # the mean of the item's categories
        no_id = self.no_id[items] if drop_id is None else self.no_id[items] | drop_id
        return kjt(len(items), {ITEM_ID: ((~no_id).long(), items[~no_id], None), ITEM_CATEGORY: (lengths, categories, mean)})


def _time_ordered(events: pd.DataFrame) -> pd.DataFrame:
    keys = ["user", "timestamp"] if "timestamp" in events.columns else ["user"]
    return events.sort_values(keys, kind="stable")


def _recent_items(events: pd.DataFrame, n_users: int, length: int) -> torch.Tensor:
    """[n_users, length] of each user's last ``length`` items in time order, -1 padded."""
    ordered = _time_ordered(events)
    user = ordered["user"].to_numpy()
    item = ordered["item"].to_numpy()
    ends = np.cumsum(np.bincount(user, minlength=n_users))
    from_end = ends[user] - 1 - np.arange(len(user))
    keep = from_end < length
    table = np.full((n_users, length), -1, np.int64)
    # most recent item last, so the row reads in time order
    table[user[keep], length - 1 - from_end[keep]] = item[keep]
    return torch.from_numpy(table)
