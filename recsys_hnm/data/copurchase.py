"""Co-purchase graph: symmetric item x item co-occurrence counts, built with sparse algebra."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..ops.sparse import row_ids
from .interactions import DataError

CopurchaseSource = Literal["basket", "session", "history"]


def copurchase_graph(
    events: pd.DataFrame,
    n_items: int,
    *,
    source: CopurchaseSource = "basket",
    session_gap_s: float = 1800.0,
    window: int | None = None,
    min_count: int = 1,
    top_n: int | None = None,
) -> sp.csr_matrix:
    """Item x item co-occurrence counts (zero diagonal, symmetric, float32 CSR).

    source:
      ``basket``  items in the same ``basket`` column value co-occur (counted once per basket);
      ``session`` a user's events with gaps of at most ``session_gap_s`` seconds form a basket;
      ``history`` a user's whole history is one basket, or, with ``window=w``, each event
                  co-occurs with the user's next ``w`` events (in time order).
    min_count: pairs seen fewer times are dropped.
    top_n: keep each item's ``top_n`` strongest neighbours (ties broken by item index); the
      result is symmetrised, so a pair stays when either side keeps it.
    """
    if min_count < 1:
        raise DataError(f"copurchase min_count must be >= 1, not {min_count}")
    if top_n is not None and top_n < 1:
        raise DataError(f"copurchase top_n must be >= 1, not {top_n}")
    if source == "history" and window is not None:
        counts = _window_counts(events, n_items, window)
    else:
        groups = _groups(events, source, session_gap_s)
        counts = _group_counts(groups, events["item"].to_numpy(), n_items)
    counts.setdiag(0)
    counts.eliminate_zeros()
    if min_count > 1:
        counts.data[counts.data < min_count] = 0
        counts.eliminate_zeros()
    if top_n is not None:
        kept = _top_n_per_row(counts, top_n)
        counts = kept.maximum(kept.T).tocsr()
    counts.sort_indices()
    return counts.astype(np.float32)


def _groups(events: pd.DataFrame, source: str, session_gap_s: float) -> np.ndarray:
    if source == "basket":
        if "basket" not in events.columns:
            raise DataError("copurchase source 'basket' needs a basket column (basket_id) in the events")
        return events["basket"].to_numpy()
    if source == "history":
        return events["user"].to_numpy()
    if source == "session":
        if "timestamp" not in events.columns:
            raise DataError("copurchase source 'session' needs a timestamp column in the events")
        if session_gap_s <= 0:
            raise DataError(f"copurchase session_gap_s must be > 0, not {session_gap_s}")
        ordered = events.sort_values(["user", "timestamp"], kind="stable")
        user = ordered["user"].to_numpy()
        ts = ordered["timestamp"].to_numpy()
        new = np.ones(len(ordered), bool)
        new[1:] = (user[1:] != user[:-1]) | (np.diff(ts) > session_gap_s)
        return _align(events, ordered, np.cumsum(new) - 1)
    raise DataError(f"copurchase source must be 'basket', 'session' or 'history', not {source!r}")


def _align(events: pd.DataFrame, ordered: pd.DataFrame, values: np.ndarray) -> np.ndarray:
    """Values computed on ``ordered`` rows, put back in ``events`` row order."""
    return pd.Series(values, index=ordered.index).reindex(events.index).to_numpy()


def _group_counts(groups: np.ndarray, items: np.ndarray, n_items: int) -> sp.csr_matrix:
    """B^T B over the binary group x item incidence matrix: baskets holding both items."""
    group_idx = pd.factorize(groups)[0]
    incidence = sp.csr_matrix(
        (np.ones(len(items), np.float32), (group_idx, items)), shape=(group_idx.max() + 1, n_items)
    )
    incidence.sum_duplicates()
    incidence.data[:] = 1.0  # an item twice in one basket counts once
    return (incidence.T @ incidence).tocsr()


def _window_counts(events: pd.DataFrame, n_items: int, window: int) -> sp.csr_matrix:
    """Pairs (event, one of the user's next ``window`` events), in both directions."""
    if window < 1:
        raise DataError(f"copurchase window must be >= 1, not {window}")
    order = ["user", "timestamp"] if "timestamp" in events.columns else ["user"]
    ordered = events.sort_values(order, kind="stable")
    user = ordered["user"].to_numpy()
    item = ordered["item"].to_numpy()
    rows, cols = [], []
    for d in range(1, window + 1):  # a loop over offsets, vectorised over all events
        same = user[d:] == user[:-d]
        rows.append(item[:-d][same])
        cols.append(item[d:][same])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    keep = r != c
    r, c = r[keep], c[keep]
    m = sp.csr_matrix(
        (np.ones(2 * len(r), np.float32), (np.concatenate([r, c]), np.concatenate([c, r]))),
        shape=(n_items, n_items),
    )
    m.sum_duplicates()
    return m


def _top_n_per_row(m: sp.csr_matrix, n: int, cap: int = 64) -> sp.csr_matrix:
    """Each row's ``n`` largest entries, ties to the lower column. Counts are small integers, so
    no row needs a sort: a per-row histogram of the counts (capped at ``cap``) gives the count
    of the n-th largest; entries above it are kept, and entries equal to it fill the rest in
    column order. Rows with n counts at the cap, and non-integer weights, are sorted."""
    m = m.tocsr()
    m.sort_indices()
    rows = row_ids(m.indptr)
    data = m.data
    keep = np.zeros(len(data), bool)
    sort_rows = np.arange(m.shape[0])
    if len(data) and data.min() >= 0 and (data == np.round(data)).all():
        # small dtypes: on Epinions these arrays hold 187 M pairs each
        c = np.minimum(data, cap).astype(np.int8)
        hist = np.bincount(rows * (cap + 1) + c, minlength=m.shape[0] * (cap + 1)).reshape(-1, cap + 1)
        at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [row, v]: entries with count >= v
        at_least = np.append(at_least, np.zeros((m.shape[0], 1), np.int64), axis=1)
        threshold = (at_least >= n).sum(axis=1) - 1  # the row's n-th largest count; -1: fewer than n
        room = n - at_least[np.arange(m.shape[0]), threshold + 1]  # places left for entries equal to it
        t = threshold.astype(np.int8)[rows]
        equal = c == t
        # rank among the row's tied entries, in column order
        tie_rank = np.cumsum(equal, dtype=np.int64) - np.r_[0, np.cumsum(np.bincount(rows[equal], minlength=m.shape[0]))[:-1]][rows]
        keep = (c > t) | (equal & (tie_rank <= room[rows]))
        sort_rows = np.flatnonzero(threshold >= cap)
    if len(sort_rows):
        sorted_here = np.zeros(m.shape[0], bool)
        sorted_here[sort_rows] = True
        at = np.flatnonzero(sorted_here[rows])
        keep[at] = False
        order = at[np.lexsort((m.indices[at], -data[at], rows[at]))]  # by row, weight desc, column asc
        sizes = np.diff(m.indptr)[sort_rows]
        first = np.zeros(m.shape[0], np.int64)
        first[sort_rows] = np.r_[0, np.cumsum(sizes)[:-1]]
        keep[order[np.arange(len(order)) - first[rows[order]] < n]] = True
    return sp.csr_matrix((data[keep], m.indices[keep], np.r_[0, np.cumsum(np.bincount(rows[keep], minlength=m.shape[0]))]),
                         shape=m.shape)


def describe_graph(graph: sp.csr_matrix) -> dict:
    neighbours = np.diff(graph.indptr)
    return {
        "pairs": int(graph.nnz // 2),
        "items_with_neighbours": int((neighbours > 0).sum()),
        "mean_neighbours_per_item": float(neighbours.mean()) if len(neighbours) else 0.0,
    }
