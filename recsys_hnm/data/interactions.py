"""Validated, id-mapped interaction logs: the structure samplers, models and evaluation share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

DuplicatePolicy = Literal["first", "last", "keep"]
UnknownItemPolicy = Literal["error", "unknown_category"]
UNKNOWN_CATEGORY = "unknown"


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file, column or value."""


@dataclass(frozen=True)
class IdMap:
    """Raw ids <-> contiguous indices 0..n-1 (index i holds raw id ``raw[i]``)."""

    raw: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", pd.Index(self.raw))
        if not self._index.is_unique:
            raise DataError("IdMap: raw ids are not unique")

    def __len__(self) -> int:
        return len(self.raw)

    def to_index(self, raw_ids, what: str = "id") -> np.ndarray:
        """Indices of ``raw_ids``; an id that is not in the map is an error naming it."""
        idx = self._index.get_indexer(pd.Index(np.asarray(raw_ids)))
        missing = idx < 0
        if missing.any():
            raise DataError(f"{missing.sum()} {what}(s) not known, e.g. {_examples(np.asarray(raw_ids)[missing])}")
        return idx.astype(np.int64)

    def to_raw(self, indices) -> np.ndarray:
        return self.raw[np.asarray(indices, dtype=np.int64)]


def _examples(values, n: int = 5) -> list:
    """A few values as plain Python objects, for error messages."""
    return pd.unique(np.asarray(values))[:n].tolist()


def _require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; columns present: {list(frame.columns)}")


def _require_no_nulls(frame: pd.DataFrame, column: str, what: str) -> None:
    nulls = frame[column].isna()
    if nulls.any():
        rows = frame.index[nulls][:5].tolist()
        raise DataError(f"{what}: column {column!r} has {int(nulls.sum())} null value(s), e.g. at rows {rows}")


def parse_timestamps(values: pd.Series, what: str) -> np.ndarray:
    """Seconds since the epoch (float64) from numbers (taken as seconds) or date strings."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64)
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        parsed = pd.to_datetime(values, errors="coerce", format="mixed")
        bad = parsed.isna() & values.notna()
        if bad.any():
            examples = _examples(values[bad])
            raise DataError(f"{what}: column 'timestamp' has {int(bad.sum())} unparseable value(s), e.g. {examples}")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]").to_numpy().astype(np.int64) / 1e9


@dataclass
class Interactions:
    """Events with users and items mapped to 0..n-1, and the sparse structures derived from them.

    ``events`` has integer columns ``user``, ``item``, float ``weight``, and where given
    ``timestamp`` (seconds since the epoch) and ``basket`` (integer group id). Every row that
    validation removed or changed is counted in ``report``.
    """

    events: pd.DataFrame
    users: IdMap
    items: IdMap
    categories: IdMap
    item_categories: sp.csr_matrix  # items x categories, 1 where the item is in the category
    report: dict[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def has_time(self) -> bool:
        return "timestamp" in self.events.columns

    @property
    def has_baskets(self) -> bool:
        return "basket" in self.events.columns

    @property
    def matrix(self) -> sp.csr_matrix:
        """users x items, summed weights of all events."""
        return to_csr(self.events, self.n_users, self.n_items)

    @property
    def item_popularity(self) -> np.ndarray:
        """Number of events per item."""
        return np.bincount(self.events["item"].to_numpy(), minlength=self.n_items)

    @property
    def category_items(self) -> sp.csr_matrix:
        """categories x items."""
        return self.item_categories.T.tocsr()

    @classmethod
    def from_frames(
        cls,
        events: pd.DataFrame,
        items: pd.DataFrame | None = None,
        *,
        duplicates: DuplicatePolicy = "first",
        unknown_items: UnknownItemPolicy = "error",
        source: str = "events",
        keep_columns: tuple[str, ...] = (),
    ) -> "Interactions":
        """Validate and id-map an event frame and an item frame.

        events: columns ``user_id``, ``item_id``, optional ``timestamp`` (seconds or date
        strings), ``weight`` (>= 0) and ``basket_id``.
        items: columns ``item_id`` and ``category``; one row per (item, category) pair, or
        several categories in one cell separated by ``|``.
        duplicates: events of the same (user, item) pair. ``first`` keeps the earliest (the
        usual choice for implicit feedback, so no pair lands in two split phases), ``last`` the
        latest, ``keep`` all of them (repeat purchases); removed rows are counted in the report.
        unknown_items: items of the events absent from the item frame: ``error``, or give
        them the category ``unknown``.
        keep_columns: further event columns to carry through unchanged (e.g. a fixed split's phase).
        """
        what = source
        if len(events) == 0:
            raise DataError(f"{what}: no events (the frame is empty)")
        _require_columns(events, ["user_id", "item_id"], what)
        for col in ["user_id", "item_id"]:
            _require_no_nulls(events, col, what)
        if duplicates not in ("first", "last", "keep"):
            raise DataError(f"duplicates must be 'first', 'last' or 'keep', not {duplicates!r}")
        if unknown_items not in ("error", "unknown_category"):
            raise DataError(f"unknown_items must be 'error' or 'unknown_category', not {unknown_items!r}")
        report: dict[str, int] = {"events_in": len(events)}

        frame = pd.DataFrame({"user_raw": events["user_id"].to_numpy(), "item_raw": events["item_id"].to_numpy()})
        _require_columns(events, list(keep_columns), what)
        for col in keep_columns:
            frame[col] = events[col].to_numpy()
        if "timestamp" in events.columns:
            _require_no_nulls(events, "timestamp", what)
            frame["timestamp"] = parse_timestamps(events["timestamp"].reset_index(drop=True), what)
        if "weight" in events.columns:
            _require_no_nulls(events, "weight", what)
            weight = pd.to_numeric(events["weight"], errors="coerce").to_numpy(dtype=np.float64)
            if np.isnan(weight).any():
                raise DataError(f"{what}: column 'weight' has non-numeric values, e.g. {_examples(events['weight'][np.isnan(weight)])}")
            if (weight < 0).any():
                raise DataError(f"{what}: column 'weight' has {(weight < 0).sum()} negative value(s), e.g. {_examples(weight[weight < 0])}")
            frame["weight"] = weight
        else:
            frame["weight"] = 1.0
        if "basket_id" in events.columns:
            _require_no_nulls(events, "basket_id", what)
            frame["basket"] = pd.factorize(events["basket_id"].to_numpy())[0].astype(np.int64)

        # Duplicates: keep a deterministic order (by time if any, then input order).
        if "timestamp" in frame.columns:
            frame = frame.sort_values("timestamp", kind="stable", ignore_index=True)
        if duplicates != "keep":
            dup = frame.duplicated(["user_raw", "item_raw"], keep=duplicates)
            report["duplicate_events_removed"] = int(dup.sum())
            if dup.any():
                log.info("%s: removed %d repeated (user, item) events (duplicates=%r)", what, dup.sum(), duplicates)
                frame = frame[~dup].reset_index(drop=True)

        users = IdMap(np.sort(pd.unique(frame["user_raw"])))
        item_ids = np.sort(pd.unique(frame["item_raw"]))
        items_map = IdMap(item_ids)
        categories, item_categories = _category_structure(items, items_map, unknown_items, report, what)

        out = pd.DataFrame(
            {
                "user": users.to_index(frame["user_raw"], "user"),
                "item": items_map.to_index(frame["item_raw"], "item"),
                "weight": frame["weight"].to_numpy(),
            }
        )
        for col in ("timestamp", "basket", *keep_columns):
            if col in frame.columns:
                out[col] = frame[col].to_numpy()
        report["events"] = len(out)
        return cls(out, users, items_map, categories, item_categories, report)

    def describe(self) -> dict:
        """Summary figures: sizes, density, categories, time range."""
        n_events = len(self.events)
        cats_per_item = np.diff(self.item_categories.indptr)
        info = {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n_events,
            "density": n_events / (self.n_users * self.n_items),
            "categories": self.n_categories,
            "mean_categories_per_item": float(cats_per_item.mean()) if self.n_items else 0.0,
            "items_without_category": int((cats_per_item == 0).sum()),
            "top_categories": self._top_categories(10),
        }
        if self.has_time:
            ts = self.events["timestamp"]
            info["time_range"] = [
                pd.Timestamp(ts.min(), unit="s").isoformat(),
                pd.Timestamp(ts.max(), unit="s").isoformat(),
            ]
        if self.has_baskets:
            info["baskets"] = int(self.events["basket"].nunique())
        info["report"] = dict(self.report)
        return info

    def _top_categories(self, k: int) -> dict[str, int]:
        counts = np.asarray(self.item_categories.sum(axis=0)).ravel()
        order = np.argsort(-counts, kind="stable")[:k]
        return {str(self.categories.raw[i]): int(counts[i]) for i in order}


def to_csr(events: pd.DataFrame, n_users: int, n_items: int, values: str | None = "weight") -> sp.csr_matrix:
    """users x items CSR of the events (duplicates summed)."""
    data = events[values].to_numpy(dtype=np.float32) if values else np.ones(len(events), np.float32)
    m = sp.csr_matrix(
        (data, (events["user"].to_numpy(), events["item"].to_numpy())), shape=(n_users, n_items)
    )
    m.sum_duplicates()
    m.sort_indices()
    return m


def _category_structure(
    items: pd.DataFrame | None,
    items_map: IdMap,
    unknown_items: UnknownItemPolicy,
    report: dict[str, int],
    what: str,
) -> tuple[IdMap, sp.csr_matrix]:
    n_items = len(items_map)
    if items is None:
        return IdMap(np.array([], dtype=object)), sp.csr_matrix((n_items, 0), dtype=np.float32)
    _require_columns(items, ["item_id", "category"], "items")
    _require_no_nulls(items, "item_id", "items")
    pairs = items[["item_id", "category"]].copy()
    no_category = pairs["category"].isna() | (pairs["category"].astype(str).str.strip() == "")
    report["item_rows_without_category"] = int(no_category.sum())
    pairs = pairs[~no_category]
    pairs["category"] = pairs["category"].astype(str).str.split("|")
    pairs = pairs.explode("category")
    pairs["category"] = pairs["category"].str.strip()
    pairs = pairs[pairs["category"] != ""].drop_duplicates()

    known = pd.Index(pd.unique(items["item_id"].to_numpy()))
    in_meta = known.get_indexer(pd.Index(items_map.raw)) >= 0
    n_unknown = int((~in_meta).sum())
    report["items_missing_from_metadata"] = n_unknown
    if n_unknown:
        examples = _examples(items_map.raw[~in_meta])
        if unknown_items == "error":
            raise DataError(
                f"{what}: {n_unknown} item(s) of the events are absent from the item metadata, e.g. "
                f"{examples}; pass unknown_items='unknown_category' to give them the category {UNKNOWN_CATEGORY!r}"
            )
        log.warning("%d item(s) absent from the item metadata get category %r, e.g. %s", n_unknown, UNKNOWN_CATEGORY, examples)
        extra = pd.DataFrame({"item_id": items_map.raw[~in_meta], "category": UNKNOWN_CATEGORY})
        pairs = pd.concat([pairs, extra], ignore_index=True)
    # Metadata rows of items that have no events are not part of the catalog: counted, not used.
    item_idx = pd.Index(items_map.raw).get_indexer(pd.Index(pairs["item_id"].to_numpy()))
    report["metadata_items_without_events"] = int(len(known) - (n_items - n_unknown))
    pairs = pairs[item_idx >= 0]
    item_idx = item_idx[item_idx >= 0]
    categories = IdMap(np.sort(pd.unique(pairs["category"].to_numpy()).astype(object)))
    cat_idx = categories.to_index(pairs["category"].to_numpy(), "category")
    m = sp.csr_matrix(
        (np.ones(len(item_idx), np.float32), (item_idx, cat_idx)), shape=(n_items, len(categories))
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return categories, m
