"""Loaders: MovieLens (every official layout), generic CSV/parquet tables, retail baskets."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd

from .interactions import DataError, DuplicatePolicy, Interactions, UnknownItemPolicy
from .splits import Split, fixed_split

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS_DIR = REPO_ROOT / "datasets"
SHIPPED = {"ml-latest-small": DATASETS_DIR / "ml-latest-small"}

MOVIELENS_URLS = {
    name: f"https://files.grouplens.org/datasets/movielens/{name}.zip"
    for name in ("ml-100k", "ml-1m", "ml-latest-small", "ml-25m", "ml-32m")
}
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]


def read_table(path: str | Path, **kwargs) -> pd.DataFrame:
    """A CSV or parquet file, chosen by extension; a missing file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith(".parquet") or suffix.endswith(".pq"):
        try:
            return pd.read_parquet(path)
        except OSError as e:
            raise DataError(f"{path}: cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if any(suffix.endswith(s) for s in (".csv", ".csv.gz", ".tsv", ".txt")):
        return read_csv(path, sep="\t" if ".tsv" in suffix else ",", **kwargs)
    raise DataError(f"{path}: unsupported file type (use .csv, .csv.gz, .tsv or .parquet)")


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failures name the file (and, for bytes that are not UTF-8, the line)."""
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path}: empty file (no header and no data rows)") from e
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(path)) from e
    except (pd.errors.ParserError, OSError) as e:
        raise DataError(f"{path}: cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _not_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 sits: line (1 = the header) and column."""
    raw = path.read_bytes() if path.suffix.lower() != ".gz" else b""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return (f"{path}: line {line} (data row {line - 1}), column {column}: byte 0x{raw[e.start]:02x} is not UTF-8; "
                "save the file as UTF-8")
    return f"{path}: cannot be read: it is not UTF-8 text"


def _require_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; it has {list(frame.columns)}")
    return frame


def load_fixed_split(
    train: str | Path,
    valid: str | Path,
    test: str | Path,
    items: str | Path | None = None,
    *,
    duplicates: DuplicatePolicy = "first",
    unknown_items: UnknownItemPolicy = "error",
) -> tuple[Interactions, Split]:
    """A split given as three event files (CSV or parquet; columns as for
    ``Interactions.from_frames``) and optional item metadata, read into one ``Interactions``
    with a ``phase`` column and its ``fixed_split``.

    Each file is validated on its own: every error names the file, the column, the 1-based data
    row (header not counted) and the value. Timestamps are parsed per file by one rule (numbers
    are Unix seconds, strings are dates; milliseconds are refused). An empty file, or a phase
    left empty once repeated (user, item) events are removed, is refused naming the file. The
    files must agree on the optional columns (timestamp, basket_id) and on the type of their ids
    (e.g. user ids all integers or all text). The split summary counts valid / test users
    without training events and items never seen in training.
    """
    paths = {"train": train, "valid": valid, "test": test}
    for phase, path in paths.items():
        if path is None or str(path) == "":
            raise DataError(f"fixed split: no {phase} file given")
    parts = [(str(path), read_table(path).assign(phase=phase)) for phase, path in paths.items()]
    item_frame = read_table(items) if items else None
    data = Interactions.from_parts(
        parts, item_frame, duplicates=duplicates, unknown_items=unknown_items,
        keep_columns=("phase",), items_source=str(items),
    )
    split = fixed_split(data)
    for phase, path in paths.items():
        if len(split.phase(phase)) == 0:
            raise DataError(
                f"{path}: no {phase} events left: all were repeats of (user, item) pairs of earlier "
                f"events, removed by duplicates={duplicates!r}"
            )
    return data, split


def load_movielens(path: str | Path, *, min_rating: float | None = None, **options) -> Interactions:
    """MovieLens from a local folder: 100K (u.data/u.item), 1M (ratings.dat/movies.dat) or
    latest/20M/25M/32M (ratings.csv/movies.csv). Genres become categories; every rating is an
    interaction unless ``min_rating`` keeps only ratings >= it."""
    path = Path(path)
    if (path / "ratings.csv").is_file():
        files = ("ratings.csv", "movies.csv")
        ratings = _require_columns(read_csv(path / "ratings.csv"),
                                   ["userId", "movieId", "timestamp"] + (["rating"] if min_rating is not None else []),
                                   path / "ratings.csv")
        movies = _require_columns(read_csv(path / "movies.csv"), ["movieId", "genres"], path / "movies.csv")
        ratings = ratings.rename(columns={"userId": "user_id", "movieId": "item_id"})
        items = movies.rename(columns={"movieId": "item_id", "genres": "category"})
    elif (path / "ratings.dat").is_file():
        files = ("ratings.dat", "movies.dat")
        ratings = read_csv(
            path / "ratings.dat", sep="::", engine="python", header=None,
            names=["user_id", "item_id", "rating", "timestamp"],
        )
        items = read_csv(
            path / "movies.dat", sep="::", engine="python", header=None,
            names=["item_id", "title", "category"], encoding="latin-1",
        )
    elif (path / "u.data").is_file():
        files = ("u.data", "u.item")
        ratings = read_csv(
            path / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"]
        )
        raw = read_csv(path / "u.item", sep="|", header=None, encoding="latin-1")
        flags = raw.iloc[:, 5:5 + len(ML100K_GENRES)].to_numpy().astype(bool)
        items = pd.DataFrame(
            {"item_id": raw[0], "category": ["|".join(g for g, f in zip(ML100K_GENRES, row) if f) for row in flags]}
        )
    else:
        raise DataError(
            f"{path}: not a MovieLens folder (expected ratings.csv+movies.csv, ratings.dat+movies.dat or u.data+u.item)"
        )
    # latest-small marks movies without genres as "(no genres listed)": keep it as a category.
    if min_rating is not None:
        before = len(ratings)
        ratings = ratings[ratings["rating"] >= min_rating]
        log.info("min_rating=%s kept %d of %d ratings", min_rating, len(ratings), before)
    events = ratings[["user_id", "item_id", "timestamp"]].copy()
    data = Interactions.from_frames(
        events.reset_index(drop=True), items[["item_id", "category"]],
        source=str(path / files[0]), items_source=str(path / files[1]), **options,
    )
    if min_rating is not None:
        data.report["ratings_below_min_rating"] = int(before - len(ratings))
    return data


def load_table(
    events_path: str | Path,
    columns: dict[str, str] | None = None,
    *,
    items_path: str | Path | None = None,
    item_columns: dict[str, str] | None = None,
    **options,
) -> Interactions:
    """Events (and optional item metadata) from CSV or parquet, with a column mapping from our
    names (user_id, item_id, timestamp, weight, basket_id; item_id, category) to the file's."""
    events = _rename(read_table(events_path), columns, events_path)
    items = None
    if items_path is not None:  # unmapped item columns stay: side features may use them
        items = _rename(read_table(items_path), item_columns, items_path, keep_unmapped=True)
    return Interactions.from_frames(
        events, items, source=str(events_path), items_source=str(items_path), **options
    )


def _rename(frame: pd.DataFrame, mapping: dict[str, str] | None, path, keep_unmapped: bool = False) -> pd.DataFrame:
    if not mapping:
        return frame
    missing = [theirs for theirs in mapping.values() if theirs not in frame.columns]
    if missing:
        raise DataError(f"{path}: mapped column(s) {missing} not found; columns present: {list(frame.columns)}")
    ours = {v: k for k, v in mapping.items()}
    kept = [c for c in frame.columns if c not in ours and c not in mapping] if keep_unmapped else []
    return frame[list(mapping.values()) + kept].rename(columns=ours)


def load_retail(
    transactions_path: str | Path,
    products_path: str | Path | None = None,
    *,
    user: str = "household_id",
    item: str = "product_id",
    basket: str = "basket_id",
    time: str = "transaction_timestamp",
    category: str = "product_category",
    **options,
) -> Interactions:
    """Retail baskets (defaults: the Complete Journey column names). Repeat purchases are
    normal in retail; ``duplicates`` (default ``first``) decides what happens to them."""
    columns = {"user_id": user, "item_id": item, "basket_id": basket, "timestamp": time}
    item_columns = {"item_id": item, "category": category}
    return load_table(
        transactions_path, columns, items_path=products_path, item_columns=item_columns, **options
    )


def load_dataset(name_or_path: str | Path, *, min_rating: float | None = None, **options) -> Interactions:
    """A shipped dataset by name (``ml-latest-small``) or a folder by path, recognised by its
    files: MovieLens (ratings.csv, ratings.dat or u.data); retail baskets (transactions*.csv +
    products.csv, Complete Journey columns); or generic events (events.csv[.gz] with
    user_id,item_id[,timestamp] + optional items.csv[.gz] with item_id,category)."""
    key = str(name_or_path)
    if key in SHIPPED:
        return load_movielens(SHIPPED[key], min_rating=min_rating, **options)
    path = Path(key)
    if path.is_dir():
        transactions = sorted(path.glob("transactions*.csv"))
        events = _first(path, "events.csv", "events.csv.gz", "events.parquet")
        if transactions:
            return load_retail(transactions[0], _first(path, "products.csv"), **options)
        if events is not None:
            if min_rating is not None:
                raise DataError(f"{path}: min_rating applies to MovieLens ratings, not to an events file")
            return load_table(events, items_path=_first(path, "items.csv", "items.csv.gz", "items.parquet"), **options)
        return load_movielens(path, min_rating=min_rating, **options)
    raise DataError(f"unknown dataset {key!r}: use one of {sorted(SHIPPED)} or a dataset folder path")


def _first(folder: Path, *names: str) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def download_movielens(name: str, dest: str | Path, sha256: str, *, url: str | None = None) -> Path:
    """Download and unpack a MovieLens zip into ``dest``, verifying its SHA-256 first.

    ``sha256`` is required: GroupLens publishes checksums beside each zip. Nothing is left in
    ``dest`` when the download or the check fails.
    """
    if url is None:
        if name not in MOVIELENS_URLS:
            raise DataError(f"unknown MovieLens dataset {name!r}; known: {sorted(MOVIELENS_URLS)}")
        url = MOVIELENS_URLS[name]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        with urllib.request.urlopen(url) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != sha256.lower():
            raise DataError(f"{url}: checksum mismatch (sha256 {digest}, expected {sha256})")
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        unpacked = Path(tmp) / name
        if not unpacked.is_dir():
            raise DataError(f"{url}: archive has no folder {name}/")
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked, target)
    return target
