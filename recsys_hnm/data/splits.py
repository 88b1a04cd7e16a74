"""Train / validation / test splits; each phase knows what the user already had before it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .interactions import DataError, Interactions, parse_timestamps, to_csr

PHASES = ("train", "valid", "test")


@dataclass
class Split:
    """Events of each phase (rows of ``Interactions.events``) and derived matrices."""

    data: Interactions
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    report: dict[str, int] = field(default_factory=dict)

    def phase(self, name: str) -> pd.DataFrame:
        if name not in PHASES:
            raise DataError(f"phase must be one of {PHASES}, not {name!r}")
        return getattr(self, name)

    def matrix(self, name: str) -> sp.csr_matrix:
        """users x items of one phase (binary)."""
        return self._matrices[name]

    @cached_property
    def _matrices(self) -> dict[str, sp.csr_matrix]:
        out = {}
        for name in PHASES:
            m = to_csr(self.phase(name), self.data.n_users, self.data.n_items, values=None)
            m.data[:] = 1.0
            out[name] = m
        return out

    def known(self, name: str) -> sp.csr_matrix:
        """Items each user had before ``name``: train for valid; train + valid for test."""
        if name == "train":
            return self.matrix("train")
        if name == "valid":
            return self.matrix("train")
        m = (self.matrix("train") + self.matrix("valid")).tocsr()
        m.data[:] = 1.0
        return m

    def known_all(self) -> sp.csr_matrix:
        """Items each user has in any phase: what the serving view masks."""
        m = (self.known("test") + self.matrix("test")).tocsr()
        m.data[:] = 1.0
        return m

    def history_all(self) -> pd.DataFrame:
        """Every event (train, valid, test) in time order: the serving view's history."""
        return pd.concat([self.train, self.valid, self.test]).sort_values(["user"] + _order(self.data), kind="stable")

    def history(self, name: str) -> pd.DataFrame:
        """Events before phase ``name`` in time order: the input of the user tower."""
        if name in ("train", "valid"):
            return self.train
        return pd.concat([self.train, self.valid]).sort_values(_order(self.data), kind="stable")

    def summary(self) -> dict:
        """Phase sizes and users, and the split's report: cold-start users and items of valid and
        test (``*_users_without_train_events``, ``*_items_not_in_train``), known repeats, and
        for leave-last-out the timestamp ties its tie rule decided."""
        out = {name: len(self.phase(name)) for name in PHASES}
        out.update({f"{name}_users": int(self.phase(name)["user"].nunique()) for name in PHASES})
        out.update(self.report)
        return out


def _order(data: Interactions) -> list[str]:
    """Time order of events; events at the same time are ordered by item index (the sort order
    of the raw item ids), so the order never depends on the order of the input rows."""
    return ["timestamp", "item"] if data.has_time else []


def _sorted(data: Interactions) -> pd.DataFrame:
    """Events by user, then time, then item index (see ``_order``), keeping the row labels."""
    keys = ["user"] + _order(data)
    return data.events.sort_values(keys, kind="stable")


def _make(data: Interactions, phase_of: pd.Series, report: dict[str, int]) -> Split:
    ev = data.events
    parts = {}
    for code, name in enumerate(PHASES):
        rows = phase_of.index[phase_of.to_numpy() == code]
        part = ev.loc[np.sort(rows)]
        parts[name] = part.sort_values(["user"] + _order(data), kind="stable")
    split = Split(data, parts["train"], parts["valid"], parts["test"], report)
    # With duplicates kept, a later phase can repeat an item the user already had; the
    # evaluator masks known items, so such events cannot be hit: count them.
    for name in ("valid", "test"):
        part = split.phase(name)
        repeats = 0
        if len(part):
            users, items = part["user"].to_numpy().copy(), part["item"].to_numpy().copy()
            repeats = int((np.asarray(split.known(name)[users, items]).ravel() > 0).sum())
        report[f"{name}_events_already_known"] = repeats
    # Cold start: valid / test users without any training event, and items never trained on.
    train_users = np.zeros(data.n_users, bool)
    train_users[split.train["user"].to_numpy()] = True
    train_items = np.zeros(data.n_items, bool)
    train_items[split.train["item"].to_numpy()] = True
    for name in ("valid", "test"):
        part = split.phase(name)
        report[f"{name}_users_without_train_events"] = int((~train_users[part["user"].unique()]).sum())
        report[f"{name}_items_not_in_train"] = int((~train_items[part["item"].unique()]).sum())
    return split


def leave_last_out(data: Interactions, min_events: int = 3) -> Split:
    """Per user, the last event by time is test, the one before it validation.

    Tie rule: events of a user at the same timestamp are ordered by item index, i.e. by raw item
    id (ids are sorted when mapped), so among events in the user's last second the largest item
    id is test. The split does not depend on the order of the input rows. The report counts
    the ties the rule decided: ``users_last_timestamp_tied`` (users whose last timestamp is
    shared by several events), ``users_valid_test_same_timestamp`` (the same among users that
    get valid and test events: their valid and test events share a timestamp) and
    ``users_train_valid_same_timestamp`` (the valid event shares its timestamp with a training
    event).

    Users with fewer than ``min_events`` events keep all of them in training (counted).
    """
    if not data.has_time:
        raise DataError("leave_last_out needs a timestamp column")
    if min_events < 3:
        raise DataError(f"leave_last_out min_events must be >= 3, not {min_events}")
    ordered = _sorted(data)
    user = ordered["user"].to_numpy()
    counts = np.bincount(user, minlength=data.n_users)
    pos_from_end = _position_from_end(user)
    eligible = counts[user] >= min_events
    phase = np.zeros(len(ordered), np.int8)
    phase[eligible & (pos_from_end == 0)] = 2
    phase[eligible & (pos_from_end == 1)] = 1
    report = {"users_too_short_for_valid_test": int(((counts > 0) & (counts < min_events)).sum())}
    ts = ordered["timestamp"].to_numpy()
    same_as_next = np.r_[(user[1:] == user[:-1]) & (ts[1:] == ts[:-1]), False]
    report["users_last_timestamp_tied"] = int((same_as_next & (pos_from_end == 1)).sum())
    report["users_valid_test_same_timestamp"] = int((eligible & same_as_next & (pos_from_end == 1)).sum())
    report["users_train_valid_same_timestamp"] = int((eligible & same_as_next & (pos_from_end == 2)).sum())
    return _make(data, pd.Series(phase, index=ordered.index), report)


def last_basket_out(data: Interactions, min_baskets: int = 3) -> Split:
    """Per user, the last basket (by its first event's time, then basket id) is test, the one
    before it validation: the next-basket protocol. Users with fewer than ``min_baskets``
    baskets keep all of them in training (counted)."""
    if not data.has_baskets:
        raise DataError("last_basket_out needs a basket_id column")
    if min_baskets < 3:
        raise DataError(f"last_basket_out min_baskets must be >= 3, not {min_baskets}")
    ev = data.events
    start = ev.groupby("basket")["timestamp"].transform("min") if data.has_time else ev["basket"]
    baskets = ev.assign(_start=start.to_numpy()).drop_duplicates(["user", "basket"])[["user", "_start", "basket"]]
    baskets = baskets.sort_values(["user", "_start", "basket"], kind="stable")
    user = baskets["user"].to_numpy()
    counts = np.bincount(user, minlength=data.n_users)
    from_end = _position_from_end(user)
    phase = np.where(counts[user] >= min_baskets, np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0)), 0).astype(np.int8)
    code = pd.Series(phase, index=pd.MultiIndex.from_arrays([user, baskets["basket"].to_numpy()]))
    of_event = code.reindex(pd.MultiIndex.from_arrays([ev["user"].to_numpy(), ev["basket"].to_numpy()])).to_numpy()
    report = {"users_too_short_for_valid_test": int(((counts > 0) & (counts < min_baskets)).sum())}
    return _make(data, pd.Series(of_event.astype(np.int8), index=ev.index), report)


def ratio_split(
    data: Interactions, ratios=(0.8, 0.1, 0.1), *, by_time: bool = True, seed: int = 0
) -> Split:
    """Per user, the first ``ratios[0]`` of the events (by time, or in a seeded random order)
    train, the next ``ratios[1]`` validate, the rest test. Cut points are rounded per user."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (3,) or (r < 0).any() or not np.isclose(r.sum(), 1.0):
        raise DataError(f"ratios must be three non-negative numbers summing to 1, not {list(ratios)}")
    if by_time:
        if not data.has_time:
            raise DataError("ratio_split(by_time=True) needs a timestamp column; use by_time=False")
        ordered = _sorted(data)
    else:
        rng = np.random.default_rng(seed)
        shuffled = data.events.assign(_r=rng.random(len(data.events)))
        ordered = shuffled.sort_values(["user", "_r"], kind="stable")
    user = ordered["user"].to_numpy()
    counts = np.bincount(user, minlength=data.n_users)[user]
    pos = _position_from_start(user)
    train_end = np.rint(counts * r[0])
    valid_end = np.rint(counts * (r[0] + r[1]))
    phase = np.where(pos < train_end, 0, np.where(pos < valid_end, 1, 2)).astype(np.int8)
    return _make(data, pd.Series(phase, index=ordered.index), {})


def time_split(data: Interactions, valid_start, test_start) -> Split:
    """Global cut: events before ``valid_start`` train, before ``test_start`` validate, the rest
    test. Cut points are seconds since the epoch or date strings."""
    if not data.has_time:
        raise DataError("time_split needs a timestamp column")
    cuts = [_to_seconds(v, name) for v, name in ((valid_start, "valid_start"), (test_start, "test_start"))]
    if cuts[0] > cuts[1]:
        raise DataError(f"time_split: valid_start ({valid_start}) is after test_start ({test_start})")
    ts = data.events["timestamp"].to_numpy()
    phase = np.where(ts < cuts[0], 0, np.where(ts < cuts[1], 1, 2)).astype(np.int8)
    return _make(data, pd.Series(phase, index=data.events.index), {})


def fixed_split(data: Interactions, column: str = "phase") -> Split:
    """A split given with the data: ``column`` holds train, valid or test for each event."""
    if column not in data.events.columns:
        raise DataError(f"fixed_split: the events have no {column!r} column")
    codes = data.events[column].map({name: i for i, name in enumerate(PHASES)})
    if codes.isna().any():
        bad = data.events[column][codes.isna()].unique()[:5].tolist()
        raise DataError(f"fixed_split: column {column!r} holds values other than {PHASES}, e.g. {bad}")
    return _make(data, codes.astype(np.int8), {})


def _to_seconds(value, name: str) -> float:
    """A cut point by the rule of ``parse_timestamps``: numbers are Unix seconds, strings dates."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise DataError(f"time_split: {name} is not given")
    if isinstance(value, (pd.Timestamp, datetime)):
        value = pd.Timestamp(value).isoformat()
    return float(parse_timestamps(pd.Series([value], dtype=object), "time_split", name)[0])


def _position_from_start(user: np.ndarray) -> np.ndarray:
    """0, 1, 2... within each run of equal values of a grouped array."""
    idx = np.arange(len(user))
    starts = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(user)]))
    return idx - run_start


def _position_from_end(user: np.ndarray) -> np.ndarray:
    return _position_from_start(user[::-1])[::-1]
