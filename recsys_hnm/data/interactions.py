"""Validated, id-mapped interaction logs: the structure samplers, models and evaluation share."""

from __future__ import annotations

import hashlib
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


def _plain(value):
    """A numpy scalar as the plain Python value, so messages show ``5`` and not ``np.int64(5)``."""
    return value.item() if isinstance(value, np.generic) else value


def _bad_values(what: str, column: str, mask, values, problem: str, hint: str = "") -> DataError:
    """One-line error naming the source, column, count, first data row (1-based) and its value."""
    pos = np.flatnonzero(np.asarray(mask))
    first = int(pos[0])
    value = _plain(np.asarray(values, dtype=object)[first])
    return DataError(
        f"{what}: column {column!r} has {len(pos)} {problem} value(s); first at data row {first + 1}: {value!r}{hint}"
    )


def _require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; columns present: {list(frame.columns)}")


def _require_no_nulls(frame: pd.DataFrame, column: str, what: str) -> None:
    nulls = frame[column].isna().to_numpy()
    if nulls.any():
        raise _bad_values(what, column, nulls, frame[column].to_numpy(), "null")


# Kinds of raw id columns: ids of different kinds cannot be matched (is 12 the same user as "12"?).
_ID_KINDS = {"integer": "integers", "floating": "floats", "string": "text", "boolean": "booleans"}


def _id_kind(values: np.ndarray, what: str, column: str) -> str:
    """The kind of a raw id column (integers, floats, text...); a column mixing kinds is an error."""
    kind = pd.api.types.infer_dtype(values, skipna=True)
    if kind.startswith("mixed"):
        types = pd.Series(values).map(lambda v: type(_plain(v)).__name__)  # error path only
        firsts = types.drop_duplicates()
        shown = ", ".join(f"data row {i + 1}: {_plain(values[i])!r} ({t})" for i, t in firsts.iloc[:2].items())
        raise DataError(f"{what}: column {column!r} mixes value types ({shown}); give ids of one type")
    return _ID_KINDS.get(kind, kind)


def _check_parts_agree(names: list[str], cleaned, kinds, items: pd.DataFrame | None, items_source: str) -> None:
    """The event parts (and the items file) agree on the optional columns and on their ids' types."""
    for col in ("timestamp", "basket_raw"):
        has = [col in c.columns for c in cleaned]
        if any(has) and not all(has):
            name = "basket_id" if col == "basket_raw" else col
            with_, without = [n for n, h in zip(names, has) if h], [n for n, h in zip(names, has) if not h]
            raise DataError(f"column {name!r} is in {with_} but missing from {without}; give it in every file or in none")
    for col, name in (("user_raw", "user_id"), ("item_raw", "item_id"), ("basket_raw", "basket_id")):
        if col in cleaned[0].columns:
            _check_same_kind(name, [(what, k[col]) for what, k in zip(names, kinds)])
    if items is not None and len(items) and "item_id" in items.columns:
        _require_no_nulls(items, "item_id", items_source)
        item_kinds = [(what, k["item_raw"]) for what, k in zip(names, kinds)]
        items_kind = _id_kind(items["item_id"].to_numpy(), items_source, "item_id")
        _check_same_kind("item_id", item_kinds + [(items_source, items_kind)])


def _check_same_kind(column: str, kinds: list[tuple[str, str]]) -> None:
    """Raw ids of ``column`` must be of one kind in every source, e.g. not ints in one file and text in another."""
    seen = {}
    for what, kind in kinds:
        seen.setdefault(kind, what)
    if len(seen) > 1:
        shown = ", ".join(f"{kind} in {what}" for kind, what in seen.items())
        raise DataError(
            f"column {column!r} has ids of different types across files ({shown}); "
            "ids cannot be matched across types: write them with one type in every file"
        )


# Numeric timestamps are Unix seconds. Beyond +-MAX_SECONDS (year 2200 / 1740) they are taken as
# a finer unit given by mistake and refused, not silently read as seconds in the far future.
MAX_SECONDS = 7_258_118_400.0  # 2200-01-01T00:00:00Z
_FINER_UNITS = (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))


def parse_timestamps(values, what: str, column: str = "timestamp") -> np.ndarray:
    """Seconds since the epoch (float64), by one rule for every source.

    Numbers (numeric columns, and number strings in text columns) are Unix seconds; datetime
    columns are taken as they are; other strings are parsed as dates (ISO 8601 and the like;
    times without an offset are UTC). Numbers beyond year 2200 (or before 1740) as seconds are
    refused: they are milliseconds, microseconds or nanoseconds given by mistake.
    """
    values = pd.Series(values).reset_index(drop=True)
    if pd.api.types.is_bool_dtype(values):
        raise DataError(f"{what}: column {column!r} holds true/false values, not times")
    if pd.api.types.is_datetime64_any_dtype(values):
        numbers = pd.Series(np.nan, index=values.index)
    elif pd.api.types.is_numeric_dtype(values):
        numbers = values.astype(np.float64)
    else:
        numbers = pd.to_numeric(values, errors="coerce")
    seconds = numbers.to_numpy(dtype=np.float64, copy=True)
    is_number = ~np.isnan(seconds)
    if not is_number.all():
        dates = values[~is_number]
        parsed = pd.to_datetime(dates, errors="coerce", format="mixed", utc=True)
        bad = (parsed.isna() & dates.notna()).to_numpy()
        if bad.any():
            mask = np.zeros(len(values), bool)
            mask[np.flatnonzero(~is_number)[bad]] = True
            raise _bad_values(what, column, mask, values.to_numpy(), "unparseable")
        seconds[~is_number] = ((parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(np.float64)
    out_of_range = is_number & ~(np.abs(np.where(is_number, seconds, 0.0)) <= MAX_SECONDS)
    if out_of_range.any():
        example = seconds[np.flatnonzero(out_of_range)[0]]
        if not np.isfinite(example):
            hint = ": not a finite number of seconds"
        else:
            unit = next((u for u, f in _FINER_UNITS if abs(example) / f <= MAX_SECONDS), "a unit finer than seconds")
            hint = f": after year 2200 (or before 1740) as Unix seconds, it looks like {unit}; give seconds since the epoch"
        raise _bad_values(what, column, out_of_range, values.to_numpy(), "out-of-range", hint)
    return seconds


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
    # further columns of the item metadata (brand, price...), one row per item index; what
    # ``item_attributes`` turns into side features of the item tower
    item_frame: pd.DataFrame | None = None

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
        items_source: str = "items",
    ) -> "Interactions":
        """Validate and id-map an event frame and an item frame.

        events: columns ``user_id``, ``item_id``, optional ``timestamp`` (see
        ``parse_timestamps``: numbers are Unix seconds, strings are dates), ``weight`` (>= 0)
        and ``basket_id``.
        items: columns ``item_id`` and ``category``; one row per (item, category) pair, or
        several categories in one cell separated by ``|``.
        duplicates: events of the same (user, item) pair. ``first`` keeps the earliest (the
        usual choice for implicit feedback, so no pair lands in two split phases), ``last`` the
        latest, ``keep`` all of them (repeat purchases); removed rows are counted in the report.
        Events are ordered by time, then user index, then item index (input order only among
        events equal in all three), so the result does not depend on the order of input rows.
        unknown_items: items of the events absent from the item frame: ``error``, or give
        them the category ``unknown``.
        keep_columns: further event columns to carry through unchanged (e.g. a fixed split's phase).
        source, items_source: names of the inputs (file paths) used in error messages, which
        also give the 1-based data row and the value.
        """
        return cls.from_parts(
            [(source, events)], items, duplicates=duplicates, unknown_items=unknown_items,
            keep_columns=keep_columns, items_source=items_source,
        )

    @classmethod
    def from_parts(
        cls,
        parts: list[tuple[str, pd.DataFrame]],
        items: pd.DataFrame | None = None,
        *,
        duplicates: DuplicatePolicy = "first",
        unknown_items: UnknownItemPolicy = "error",
        keep_columns: tuple[str, ...] = (),
        items_source: str = "items",
    ) -> "Interactions":
        """Like ``from_frames`` for events given in several parts, e.g. one frame per file.

        ``parts`` is a list of (source name, event frame). Each part is validated on its own, so
        an error names its source and the data row within it; timestamps are parsed per part by
        the same rule. The parts must agree on the optional columns (``timestamp``,
        ``basket_id``) and on the type of their ids; they are then concatenated in the given order.
        """
        if duplicates not in ("first", "last", "keep"):
            raise DataError(f"duplicates must be 'first', 'last' or 'keep', not {duplicates!r}")
        if unknown_items not in ("error", "unknown_category"):
            raise DataError(f"unknown_items must be 'error' or 'unknown_category', not {unknown_items!r}")
        if not parts:
            raise DataError("no event sources given")
        names = [what for what, _ in parts]
        cleaned, kinds = zip(*(_clean_events(events, what, keep_columns) for what, events in parts))
        _check_parts_agree(names, cleaned, kinds, items, items_source)
        frame = pd.concat(
            [c.assign(_part=np.int64(i)) for i, c in enumerate(cleaned)], ignore_index=True
        ) if len(cleaned) > 1 else cleaned[0].assign(_part=np.int64(0))
        report: dict[str, int] = {"events_in": len(frame)}
        # Deduplication never removes a user or item entirely, so the maps can be built first.
        users = IdMap(np.sort(pd.unique(frame["user_raw"].to_numpy())))
        items_map = IdMap(np.sort(pd.unique(frame["item_raw"].to_numpy())))
        frame["user"] = users.to_index(frame["user_raw"], "user")
        frame["item"] = items_map.to_index(frame["item_raw"], "item")
        if "basket_raw" in frame.columns:
            frame["basket"] = pd.factorize(frame["basket_raw"].to_numpy(), sort=True)[0].astype(np.int64)

        # One deterministic order: time, then user, then item; only exact ties keep input order.
        if "timestamp" in frame.columns:
            order = np.lexsort((frame["item"].to_numpy(), frame["user"].to_numpy(), frame["timestamp"].to_numpy()))
            frame = frame.iloc[order].reset_index(drop=True)
        if duplicates != "keep":
            dup = frame.duplicated(["user", "item"], keep=duplicates)
            report["duplicate_events_removed"] = int(dup.sum())
            if dup.any():
                log.info("%s: removed %d repeated (user, item) events (duplicates=%r)", ", ".join(names), dup.sum(), duplicates)
                frame = frame[~dup].reset_index(drop=True)

        categories, item_categories = _category_structure(
            items, items_map, unknown_items, report, items_source, frame, names
        )
        columns = ["user", "item", "weight", "timestamp", "basket", *keep_columns]
        out = frame[[c for c in columns if c in frame.columns]].copy()
        report["events"] = len(out)
        item_frame = None
        if items is not None and len(items.columns.difference(["item_id", "category"])):
            item_frame = (items.drop(columns=["category"], errors="ignore").drop_duplicates("item_id")
                          .set_index("item_id").reindex(pd.Index(items_map.raw)).reset_index(drop=True))
        return cls(out, users, items_map, categories, item_categories, report, item_frame)

    def item_attributes(self, columns: list[str], bins: int = 10) -> tuple[list[str], sp.csr_matrix]:
        """Side features from the item metadata: each value of each column becomes a token
        ``column=value`` (a numeric column with more than ``bins`` distinct values is cut into
        ``bins`` quantile bins first). Returns the token names and the items x tokens matrix (1
        where the item has the value; a missing value gives no token)."""
        n = self.n_items
        if not columns:
            return [], sp.csr_matrix((n, 0), dtype=np.float32)
        present = [] if self.item_frame is None else list(self.item_frame.columns)
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"item feature column(s) {missing} are not in the item metadata; columns there: {present}")
        names, rows, cols = [], [], []
        for column in columns:
            values = self.item_frame[column]
            if pd.api.types.is_numeric_dtype(values) and values.nunique() > bins:
                values = pd.qcut(values, bins, duplicates="drop")
            codes, uniques = pd.factorize(values, sort=True)
            has = codes >= 0
            rows.append(np.flatnonzero(has))
            cols.append(codes[has] + len(names))
            names += [f"{column}={u}" for u in uniques]
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, len(names)))
        m.sort_indices()
        return names, m

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the content: raw user and item ids in index order, every event column
        (user, item, weight, timestamp, basket, phase... in row order), the category names and
        the item-category structure. Equal data gives the same digest in every process (no
        Python ``hash``); renaming one id, changing one event or one category changes it."""
        h = hashlib.sha256()
        _hash_array(h, "users", self.users.raw)
        _hash_array(h, "items", self.items.raw)
        for col in sorted(self.events.columns):
            _hash_array(h, f"events.{col}", self.events[col].to_numpy())
        _hash_array(h, "categories", self.categories.raw)
        ic = self.item_categories.tocsr()
        ic.sort_indices()
        _hash_array(h, "item_categories.indptr", ic.indptr)
        _hash_array(h, "item_categories.indices", ic.indices)
        if self.item_frame is not None:  # side features are read from it
            for col in sorted(self.item_frame.columns, key=str):
                _hash_array(h, f"item_frame.{col}", self.item_frame[col].to_numpy())
        return h.hexdigest()

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


def _clean_events(
    events: pd.DataFrame, what: str, keep_columns: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, dict[str, str]]:
    """One source's events validated on their own: ``user_raw``, ``item_raw``, ``weight``,
    ``timestamp`` (seconds) and ``basket_raw`` where given, ``keep_columns`` and ``_row`` (the
    1-based data row); and the kind of each raw id column. Errors name ``what``, the column,
    the 1-based data row and the value."""
    if len(events) == 0:
        raise DataError(f"{what}: no events (empty: no data rows)")
    _require_columns(events, ["user_id", "item_id"], what)
    _require_columns(events, list(keep_columns), what)
    frame = pd.DataFrame(index=pd.RangeIndex(len(events)))
    kinds = {}
    for col, raw in (("user_id", "user_raw"), ("item_id", "item_raw"), ("basket_id", "basket_raw")):
        if col in events.columns:
            _require_no_nulls(events, col, what)
            values = events[col].to_numpy()
            kinds[raw] = _id_kind(values, what, col)
            frame[raw] = values
    for col in keep_columns:
        frame[col] = events[col].to_numpy()
    if "timestamp" in events.columns:
        _require_no_nulls(events, "timestamp", what)
        frame["timestamp"] = parse_timestamps(events["timestamp"], what)
    if "weight" in events.columns:
        _require_no_nulls(events, "weight", what)
        raw_weight = events["weight"].to_numpy()
        weight = pd.to_numeric(events["weight"], errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(weight).any():
            raise _bad_values(what, "weight", np.isnan(weight), raw_weight, "non-numeric")
        if (weight < 0).any():
            raise _bad_values(what, "weight", weight < 0, raw_weight, "negative")
        frame["weight"] = weight
    else:
        frame["weight"] = 1.0
    frame["_row"] = np.arange(1, len(events) + 1)
    return frame, kinds


def _hash_array(h, name: str, values: np.ndarray) -> None:
    """Feed one named array into ``h`` by value: numbers as fixed-width little-endian bytes, other
    values as UTF-8 text with their lengths, so no two different arrays give the same bytes."""
    values = np.asarray(values)
    if values.dtype.kind in "ib":
        kind, data = "int", values.astype("<i8").tobytes()
    elif values.dtype.kind == "u":
        kind, data = "uint", values.astype("<u8").tobytes()
    elif values.dtype.kind == "f":
        kind, data = "float", values.astype("<f8").tobytes()
    else:
        text = pd.Series(values, dtype=object).map(str)  # missing values too (astype(str) keeps NaN)
        kind = "text:" + pd.api.types.infer_dtype(values, skipna=False)
        data = text.str.len().to_numpy().astype("<i8").tobytes() + "".join(text.tolist()).encode("utf-8")
    h.update(f"{name}|{kind}|{len(values)}|{len(data)}|".encode())
    h.update(data)


def _category_structure(
    items: pd.DataFrame | None,
    items_map: IdMap,
    unknown_items: UnknownItemPolicy,
    report: dict[str, int],
    what: str,
    events: pd.DataFrame,
    sources: list[str],
) -> tuple[IdMap, sp.csr_matrix]:
    """Categories and the items x categories matrix. ``what`` names the item frame; ``events``
    (with ``item``, ``_part`` and ``_row``) and ``sources`` locate an unknown item for the error."""
    n_items = len(items_map)
    if items is None:
        return IdMap(np.array([], dtype=object)), sp.csr_matrix((n_items, 0), dtype=np.float32)
    _require_columns(items, ["item_id", "category"], what)
    _require_no_nulls(items, "item_id", what)
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
            unknown = events[~in_meta[events["item"].to_numpy()]]
            first = unknown.iloc[np.lexsort((unknown["_row"].to_numpy(), unknown["_part"].to_numpy()))[0]]
            raise DataError(
                f"{sources[int(first['_part'])]}: {n_unknown} item(s) of the events are absent from the item "
                f"metadata ({what}), e.g. {examples}; first at data row {int(first['_row'])}: "
                f"{_plain(first['item_raw'])!r} in column 'item_id'; pass unknown_items='unknown_category' "
                f"to give them the category {UNKNOWN_CATEGORY!r}"
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
