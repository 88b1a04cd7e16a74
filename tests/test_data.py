import hashlib
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recsys_hnm.cli import main
from recsys_hnm.data import (
    DataError,
    Interactions,
    copurchase_graph,
    download_movielens,
    leave_last_out,
    load_movielens,
    load_retail,
    load_table,
    Split,
    ratio_split,
    synthetic,
    synthetic_frames,
    time_split,
)


def frame(rows, columns=("user_id", "item_id", "timestamp")):
    return pd.DataFrame(rows, columns=list(columns))


ITEMS = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "category": ["x|y", "x", "y", "z"]})


# --- validation -------------------------------------------------------------------------------

def test_empty_frame_is_refused():
    with pytest.raises(DataError, match="empty"):
        Interactions.from_frames(frame([]), ITEMS)


def test_missing_column_is_named():
    with pytest.raises(DataError, match=r"missing column\(s\) \['item_id'\]"):
        Interactions.from_frames(pd.DataFrame({"user_id": [1], "movie": ["a"]}), ITEMS)


def test_null_ids_are_named_with_rows():
    with pytest.raises(DataError, match=r"^events: column 'user_id' has 1 null value\(s\); first at data row 2: nan$"):
        Interactions.from_frames(frame([[1, "a", 1], [None, "b", 2]]), ITEMS)


def test_unparseable_timestamp_is_named():
    with pytest.raises(DataError, match=r"^events: column 'timestamp' has 1 unparseable value\(s\); first at data row 2: 'yesterday'$"):
        Interactions.from_frames(frame([[1, "a", "2020-01-01"], [1, "b", "yesterday"]]), ITEMS)


def test_negative_weight_is_refused():
    events = frame([[1, "a", 1, 1.0], [1, "b", 2, -2.0]], ("user_id", "item_id", "timestamp", "weight"))
    with pytest.raises(DataError, match=r"^events: column 'weight' has 1 negative value\(s\); first at data row 2: -2.0$"):
        Interactions.from_frames(events, ITEMS)


def test_unknown_items_error_names_count_and_examples():
    events = frame([[1, "a", 1], [1, "q", 2], [2, "r", 3]])
    with pytest.raises(DataError, match=r"2 item\(s\) .* absent from the item metadata \(items\), e.g. \['q', 'r'\]; first at data row 2: 'q'"):
        Interactions.from_frames(events, ITEMS)


def test_unknown_items_can_get_unknown_category():
    events = frame([[1, "a", 1], [1, "q", 2]])
    data = Interactions.from_frames(events, ITEMS, unknown_items="unknown_category")
    q = data.items.to_index(["q"])[0]
    cats = data.categories.to_raw(data.item_categories[q].indices)
    assert list(cats) == ["unknown"]
    assert data.report["items_missing_from_metadata"] == 1


def test_duplicate_policy_first_last_keep():
    events = frame([[1, "a", 5], [1, "a", 1], [1, "b", 3]])
    first = Interactions.from_frames(events, ITEMS, duplicates="first")
    assert first.report["duplicate_events_removed"] == 1
    assert first.events.loc[first.events["item"] == first.items.to_index(["a"])[0], "timestamp"].tolist() == [1.0]
    last = Interactions.from_frames(events, ITEMS, duplicates="last")
    assert last.events.loc[last.events["item"] == last.items.to_index(["a"])[0], "timestamp"].tolist() == [5.0]
    keep = Interactions.from_frames(events, ITEMS, duplicates="keep")
    assert len(keep.events) == 3 and keep.matrix.sum() == 3


def test_bad_policy_values_are_refused():
    with pytest.raises(DataError, match="duplicates"):
        Interactions.from_frames(frame([[1, "a", 1]]), ITEMS, duplicates="sum")
    with pytest.raises(DataError, match="unknown_items"):
        Interactions.from_frames(frame([[1, "a", 1]]), ITEMS, unknown_items="drop")


# --- structures -------------------------------------------------------------------------------

def test_id_maps_round_trip_and_structures():
    events = frame([["u2", "c", 1], ["u1", "a", 2], ["u1", "b", 3], ["u2", "a", 4]])
    data = Interactions.from_frames(events, ITEMS[ITEMS.item_id != "d"])
    assert data.n_users == 2 and data.n_items == 3
    raw_users = events["user_id"].to_numpy()
    assert (data.users.to_raw(data.users.to_index(raw_users)) == raw_users).all()
    # events keep the input rows' raw ids after mapping
    back = data.items.to_raw(data.events["item"])
    assert sorted(back.tolist()) == sorted(events["item_id"].tolist())
    a = data.items.to_index(["a"])[0]
    assert data.item_popularity[a] == 2
    assert data.matrix.shape == (2, 3) and data.matrix.sum() == 4
    # several categories per item, and the reverse map
    cats_a = set(data.categories.to_raw(data.item_categories[a].indices))
    assert cats_a == {"x", "y"}
    x = data.categories.to_index(["x"])[0]
    assert set(data.items.to_raw(data.category_items[x].indices)) == {"a", "b"}
    with pytest.raises(DataError, match="not known"):
        data.items.to_index(["zzz"])


def test_date_string_timestamps_parse_to_seconds():
    data = Interactions.from_frames(frame([[1, "a", "1970-01-02"]]), ITEMS)
    assert data.events["timestamp"].iloc[0] == 86400.0


# --- splits -----------------------------------------------------------------------------------

def _check_partition(split, in_time_order=True):
    """Every event row is in exactly one phase, unchanged; and, for splits by time, per user no
    valid or test event comes before a train event (nor test before valid) in the order
    (timestamp, item index) the tie rule defines."""
    data = split.data
    labels = np.concatenate([split.phase(p).index.to_numpy() for p in ("train", "valid", "test")])
    assert len(labels) == len(np.unique(labels)), "an event is in two phases"
    assert set(labels) == set(data.events.index), "an event is in no phase"
    for p in ("train", "valid", "test"):
        part = split.phase(p)
        assert part.equals(data.events.loc[part.index]), f"{p} events differ from the data's"
    if in_time_order:
        key = lambda part: part["timestamp"].to_numpy() * (data.n_items + 1) + part["item"].to_numpy()
        for earlier, later in (("train", "valid"), ("valid", "test"), ("train", "test")):
            a, b = split.phase(earlier), split.phase(later)
            last = pd.Series(key(a), index=a["user"].to_numpy()).groupby(level=0).max()
            first = pd.Series(key(b), index=b["user"].to_numpy()).groupby(level=0).min()
            common = last.index.intersection(first.index)
            assert (last[common] < first[common]).all(), f"a {later} event precedes a {earlier} event"


def test_partition_check_catches_broken_splits():
    data = Interactions.from_frames(frame([[1, "a", 1], [1, "b", 2], [1, "c", 3], [1, "d", 4]]), ITEMS)
    split = leave_last_out(data)
    _check_partition(split)
    ev = data.events
    broken = [
        Split(data, ev.iloc[:2], ev.iloc[2:3], ev.iloc[2:4]),  # an event in two phases
        Split(data, ev.iloc[:2], ev.iloc[2:3], ev.iloc[:0]),  # an event lost
        Split(data, ev.iloc[1:3], ev.iloc[:1], ev.iloc[3:]),  # valid before train
        Split(data, ev.iloc[:2], ev.iloc[2:3], ev.iloc[3:].assign(timestamp=9.0)),  # event changed
    ]
    for bad in broken:
        with pytest.raises(AssertionError):
            _check_partition(bad)


def test_leave_last_out_takes_last_by_time():
    # rows deliberately not in time order
    events = frame([[1, "c", 30], [1, "a", 10], [1, "d", 40], [1, "b", 20], [2, "a", 5], [2, "b", 6]])
    data = Interactions.from_frames(events, ITEMS)
    split = leave_last_out(data)
    raw = lambda p: list(data.items.to_raw(split.phase(p)["item"]))
    assert raw("test") == ["d"] and raw("valid") == ["c"]
    assert sorted(raw("train")) == ["a", "a", "b", "b"]  # user 2 has too few events: all train
    assert split.report["users_too_short_for_valid_test"] == 1
    _check_partition(split)
    # known items: train before valid; train + valid before test
    u1 = data.users.to_index([1])[0]
    assert set(data.items.to_raw(split.known("test")[u1].indices)) == {"a", "b", "c"}
    assert set(data.items.to_raw(split.known("valid")[u1].indices)) == {"a", "b"}


def test_leave_last_out_on_synthetic_every_test_event_is_users_latest():
    data = synthetic(100, 200, 3000, seed=1)
    split = leave_last_out(data)
    _check_partition(split)
    latest = data.events.groupby("user")["timestamp"].max()
    test = split.test.set_index("user")["timestamp"]
    assert (test == latest[test.index]).all()
    train_max = split.train.groupby("user")["timestamp"].max()
    valid = split.valid.set_index("user")["timestamp"]
    assert (train_max[valid.index] <= valid).all()


def test_leave_last_out_breaks_time_ties_by_item_id_and_counts_them():
    # user 1: three events in its last second; user 2: valid shares its second with training;
    # user 3: no ties
    events = frame([
        [1, "a", 1], [1, "d", 5], [1, "b", 5], [1, "c", 5],
        [2, "c", 1], [2, "a", 2], [2, "b", 2], [2, "d", 3],
        [3, "a", 1], [3, "b", 2], [3, "c", 3],
    ])
    data = Interactions.from_frames(events, ITEMS)
    split = leave_last_out(data)
    raw = lambda p, u: sorted(data.items.to_raw(split.phase(p).loc[split.phase(p)["user"] == data.users.to_index([u])[0], "item"]))
    assert (raw("test", 1), raw("valid", 1), raw("train", 1)) == (["d"], ["c"], ["a", "b"])
    assert (raw("test", 2), raw("valid", 2), raw("train", 2)) == (["d"], ["b"], ["a", "c"])
    summary = split.summary()
    assert summary["users_last_timestamp_tied"] == 1
    assert summary["users_valid_test_same_timestamp"] == 1
    assert summary["users_train_valid_same_timestamp"] == 2  # user 1 (b, c at 5) and user 2 (a, b at 2)
    _check_partition(split)


@pytest.mark.parametrize("make_split", [leave_last_out, lambda d: ratio_split(d, (0.6, 0.2, 0.2))])
def test_splits_do_not_depend_on_input_row_order(make_split):
    events, items = synthetic_frames(80, 150, 3000, seed=5)
    events["timestamp"] = (events["timestamp"] // 86400) * 86400  # many events per user per day
    reference = make_split(Interactions.from_frames(events, items))
    raw = lambda split, p: split.phase(p).assign(
        user=split.data.users.to_raw(split.phase(p)["user"]), item=split.data.items.to_raw(split.phase(p)["item"])
    )[["user", "item", "timestamp"]].reset_index(drop=True)
    for seed in (1, 2):
        shuffled = make_split(Interactions.from_frames(events.sample(frac=1.0, random_state=seed), items))
        for p in ("train", "valid", "test"):
            pd.testing.assert_frame_equal(raw(shuffled, p), raw(reference, p))
        assert shuffled.summary() == reference.summary()


def test_ratio_split_by_time_and_random():
    data = synthetic(50, 100, 2000, seed=2)
    by_time = ratio_split(data, (0.8, 0.1, 0.1), by_time=True)
    _check_partition(by_time)
    assert abs(len(by_time.train) / len(data.events) - 0.8) < 0.03
    tmax = by_time.train.groupby("user")["timestamp"].max()
    tmin = by_time.test.groupby("user")["timestamp"].min()
    common = tmax.index.intersection(tmin.index)
    assert (tmax[common] <= tmin[common]).all()
    r1 = ratio_split(data, (0.8, 0.1, 0.1), by_time=False, seed=3)
    r2 = ratio_split(data, (0.8, 0.1, 0.1), by_time=False, seed=3)
    r3 = ratio_split(data, (0.8, 0.1, 0.1), by_time=False, seed=4)
    _check_partition(r1, in_time_order=False)
    assert r1.test.index.equals(r2.test.index) and not r1.test.index.equals(r3.test.index)
    with pytest.raises(DataError, match="summing to 1"):
        ratio_split(data, (0.8, 0.3, 0.1))


def test_time_split_cuts_globally():
    data = synthetic(50, 100, 2000, seed=2)
    ts = data.events["timestamp"]
    a, b = ts.quantile(0.8), ts.quantile(0.9)
    split = time_split(data, a, b)
    _check_partition(split)
    assert split.train["timestamp"].max() < a <= split.valid["timestamp"].min()
    assert split.valid["timestamp"].max() < b <= split.test["timestamp"].min()
    with pytest.raises(DataError, match="after test_start"):
        time_split(data, b, a)


# --- co-purchase --------------------------------------------------------------------------------

def _cp_data():
    events = frame(
        [[1, "a", 1, 10], [1, "b", 1, 10], [1, "c", 1, 10], [2, "a", 2, 20], [2, "b", 2, 20], [2, "a", 9, 30], [2, "d", 9, 30]],
        ("user_id", "item_id", "timestamp", "basket_id"),
    )
    return Interactions.from_frames(events, ITEMS, duplicates="keep")


def _dense(data, g):
    order = data.items.to_index(["a", "b", "c", "d"])
    return g.toarray()[np.ix_(order, order)]


def test_copurchase_from_baskets_known_counts():
    data = _cp_data()
    g = copurchase_graph(data.events, data.n_items, source="basket")
    expected = np.array([[0, 2, 1, 1], [2, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert (_dense(data, g) == expected).all()
    g2 = copurchase_graph(data.events, data.n_items, source="basket", min_count=2)
    assert (_dense(data, g2) == np.where(expected >= 2, expected, 0)).all()


def test_copurchase_from_sessions_and_history():
    data = _cp_data()
    # gap of 5 s: user 2's events at t=2 and t=9 fall into two sessions, like the baskets
    sess = copurchase_graph(data.events, data.n_items, source="session", session_gap_s=5)
    assert (_dense(data, sess) == _dense(data, copurchase_graph(data.events, data.n_items))).all()
    hist = _dense(data, copurchase_graph(data.events, data.n_items, source="history"))
    assert hist[0, 3] == 1 and hist[1, 3] == 1 and hist[0, 1] == 2
    # window 1: consecutive events only. user 1: a-b, b-c; user 2 (time order a,b,a,d): a-b, b-a, a-d
    win = _dense(data, copurchase_graph(data.events, data.n_items, source="history", window=1))
    expected = np.array([[0, 3, 0, 1], [3, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    assert (win == expected).all()


def test_copurchase_top_n_keeps_strongest_and_stays_symmetric():
    data = _cp_data()
    g = copurchase_graph(data.events, data.n_items, source="basket", top_n=1)
    d = _dense(data, g)
    assert (d == d.T).all()
    # a and b keep each other; c (tied a:1, b:1, lower index wins) and d keep a
    assert d[0, 1] == 2 and d[0, 2] == 1 and d[0, 3] == 1
    assert d[1, 2] == 0 and d[2, 3] == 0


def test_copurchase_top_n_by_count_histogram_matches_a_full_sort():
    """The histogram path (integer counts), its fallback for rows with n counts at the cap, and
    non-integer weights all keep what sorting each row by (weight desc, column asc) keeps."""
    from recsys_hnm.data.copurchase import _top_n_per_row
    from recsys_hnm.ops.sparse import row_ids

    def by_sorting(m, n):
        rows = row_ids(m.indptr)
        order = np.lexsort((m.indices, -m.data, rows))
        keep = order[np.arange(len(order)) - m.indptr[rows[order]] < n]
        return sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)

    rng = np.random.default_rng(0)
    for trial in range(8):
        m = sp.random(60, 300, density=0.2, random_state=trial, format="csr")
        m.data = np.floor(rng.pareto(1.0, m.nnz) * (1, 3, 100)[trial % 3]) + 1  # many ties
        for n in (1, 5, 40):
            for cap in (2, 64):
                assert (_top_n_per_row(m, n, cap) != by_sorting(m, n)).nnz == 0
    m.data += 0.5
    assert (_top_n_per_row(m, 5) != by_sorting(m, 5)).nnz == 0


def test_copurchase_needs_its_source_column():
    data = Interactions.from_frames(frame([[1, "a", 1], [1, "b", 2]]), ITEMS)
    with pytest.raises(DataError, match="basket column"):
        copurchase_graph(data.events, data.n_items, source="basket")


# --- loaders ----------------------------------------------------------------------------------

def test_movielens_100k_and_1m_layouts(tmp_path):
    k100 = tmp_path / "ml-100k"
    k100.mkdir()
    (k100 / "u.data").write_text("1\t10\t5\t100\n1\t20\t3\t200\n2\t10\t4\t300\n")
    genres = ["0"] * 19
    g10, g20 = genres.copy(), genres.copy()
    g10[1] = g10[5] = "1"  # Action, Comedy
    g20[8] = "1"  # Drama
    (k100 / "u.item").write_text(
        f"10|Movie A|01-Jan-1995||http://x|{'|'.join(g10)}\n20|Movie B|01-Jan-1995||http://x|{'|'.join(g20)}\n",
        encoding="latin-1",
    )
    d = load_movielens(k100)
    assert (d.n_users, d.n_items, len(d.events)) == (2, 2, 3)
    assert set(d.categories.raw) == {"Action", "Comedy", "Drama"}
    m1 = tmp_path / "ml-1m"
    m1.mkdir()
    (m1 / "ratings.dat").write_text("1::10::5::100\n2::20::1::200\n")
    (m1 / "movies.dat").write_text("10::Movie A (1995)::Action|Comedy\n20::Movie B (1995)::Drama\n", encoding="latin-1")
    d = load_movielens(m1, min_rating=3)
    assert len(d.events) == 1 and d.report["ratings_below_min_rating"] == 1
    with pytest.raises(DataError, match="not a MovieLens folder"):
        load_movielens(tmp_path)


def test_generic_table_loader_with_column_mapping(tmp_path):
    events = pd.DataFrame({"customer": [1, 1, 2], "sku": ["a", "b", "a"], "ts": [1, 2, 3]})
    events.to_parquet(tmp_path / "e.parquet")
    ITEMS.rename(columns={"item_id": "sku", "category": "cat"}).to_csv(tmp_path / "i.csv", index=False)
    d = load_table(
        tmp_path / "e.parquet", {"user_id": "customer", "item_id": "sku", "timestamp": "ts"},
        items_path=tmp_path / "i.csv", item_columns={"item_id": "sku", "category": "cat"},
    )
    assert (d.n_users, d.n_items) == (2, 2)
    with pytest.raises(DataError, match=r"mapped column\(s\) \['user'\] not found"):
        load_table(tmp_path / "e.parquet", {"user_id": "user", "item_id": "sku"})
    with pytest.raises(DataError, match="file not found"):
        load_table(tmp_path / "missing.csv")


def test_retail_loader_on_complete_journey_columns(tmp_path):
    tx = pd.DataFrame(
        {"household_id": [1, 1, 2], "basket_id": [7, 7, 8], "product_id": [100, 200, 100],
         "transaction_timestamp": ["2017-01-01 10:00:00", "2017-01-01 10:00:00", "2017-02-01 09:00:00"]}
    )
    products = pd.DataFrame({"product_id": [100, 200], "product_category": ["EGGS", "CHEESE"], "department": ["G", "G"]})
    tx.to_csv(tmp_path / "t.csv", index=False)
    products.to_csv(tmp_path / "p.csv", index=False)
    d = load_retail(tmp_path / "t.csv", tmp_path / "p.csv")
    assert d.has_baskets and d.events["basket"].nunique() == 2
    assert copurchase_graph(d.events, d.n_items).nnz == 2


def test_download_verifies_checksum_and_leaves_nothing_on_mismatch(tmp_path):
    src = tmp_path / "src"
    (src / "ml-tiny").mkdir(parents=True)
    (src / "ml-tiny" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4,100\n")
    (src / "ml-tiny" / "movies.csv").write_text("movieId,title,genres\n10,A,Drama\n")
    archive = tmp_path / "ml-tiny.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (src / "ml-tiny").iterdir():
            z.write(f, f"ml-tiny/{f.name}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="checksum mismatch"):
        download_movielens("ml-tiny", dest, "0" * 64, url=archive.as_uri())
    assert list(dest.iterdir()) == []
    out = download_movielens("ml-tiny", dest, digest, url=archive.as_uri())
    assert load_movielens(out).n_items == 1


def test_synthetic_is_seeded():
    a, _ = synthetic_frames(100, 300, 5000, seed=7)
    b, _ = synthetic_frames(100, 300, 5000, seed=7)
    c, _ = synthetic_frames(100, 300, 5000, seed=8)
    assert len(a) == 5000 and a.equals(b) and not a.equals(c)


def test_cli_describe_shipped_dataset(capsys):
    assert main(["datasets", "describe", "ml-latest-small"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["interactions"], info["users"], info["items"]) == (100836, 610, 9724)
    assert info["categories"] == 20 and "Drama" in info["top_categories"]
    assert info["copurchase"]["pairs"] > 0


def test_cli_describe_reports_bad_input(capsys):
    assert main(["datasets", "describe", "no-such-dataset"]) == 2
    assert "unknown dataset 'no-such-dataset'" in capsys.readouterr().err
