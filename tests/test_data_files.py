"""Fixed splits read from files: per-file validation, one timestamp rule, fingerprints."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from recsys_hnm.data import DataError, Interactions, load_fixed_split, load_table, time_split

HEADER = "user_id,item_id,timestamp\n"


def write(root, name, text):
    path = root / name
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path):
    """A small valid fixed split: 3 users, items 10..15, numeric seconds everywhere."""
    return {
        "train": write(tmp_path, "train.csv", HEADER + "1,10,100\n1,11,200\n2,10,150\n2,12,250\n3,11,120\n"),
        "valid": write(tmp_path, "valid.csv", HEADER + "1,12,300\n2,13,300\n"),
        "test": write(tmp_path, "test.csv", HEADER + "1,13,400\n2,14,400\n4,15,400\n"),
        "items": write(tmp_path, "items.csv", "item_id,category\n10,a\n11,b\n12,a|b\n13,c\n14,c\n15,d\n"),
    }


def load(files, **overrides):
    paths = {**files, **overrides}
    return load_fixed_split(paths["train"], paths["valid"], paths["test"], paths.get("items"))


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# --- per-file validation ------------------------------------------------------------------------

def test_loads_phases_and_keeps_raw_ids(files):
    data, split = load(files)
    assert {p: len(split.phase(p)) for p in ("train", "valid", "test")} == {"train": 5, "valid": 2, "test": 3}
    assert data.users.raw.tolist() == [1, 2, 3, 4] and data.items.raw.dtype.kind == "i"
    test = split.test
    assert sorted(zip(data.users.to_raw(test["user"]).tolist(), data.items.to_raw(test["item"]).tolist())) == [
        (1, 13), (2, 14), (4, 15)
    ]


def test_bad_value_in_test_file_names_that_file_row_and_value(files, tmp_path):
    bad = write(tmp_path, "bad_test.csv", HEADER + "1,13,400\n2,14,400\n4,15,soon\n")
    with pytest.raises(DataError) as e:
        load(files, test=bad)
    assert one_line(e) == (
        f"{bad}: column 'timestamp' has 1 unparseable value(s); first at data row 3: 'soon'"
    )


def test_null_id_in_valid_file_names_that_file(files, tmp_path):
    bad = write(tmp_path, "bad_valid.csv", HEADER + "1,12,300\n,13,300\n")
    with pytest.raises(DataError) as e:
        load(files, valid=bad)
    assert one_line(e) == f"{bad}: column 'user_id' has 1 null value(s); first at data row 2: nan"


def test_negative_weight_counts_only_its_own_file(files, tmp_path):
    cols = "user_id,item_id,timestamp,weight\n"
    train = write(tmp_path, "w_train.csv", cols + "1,10,100,1\n1,11,200,-1\n2,10,150,-3\n3,11,120,1\n")
    valid = write(tmp_path, "w_valid.csv", cols + "1,12,300,1\n2,13,300,1\n")
    test = write(tmp_path, "w_test.csv", cols + "1,13,400,1\n2,14,400,-2\n")
    with pytest.raises(DataError, match=rf"^{train}: column 'weight' has 2 negative value\(s\); first at data row 2: -1$"):
        load(files, train=train, valid=valid, test=test)
    good_train = write(tmp_path, "w_train2.csv", cols + "1,10,100,1\n1,11,200,1\n2,10,150,1\n3,11,120,1\n")
    with pytest.raises(DataError, match=rf"^{test}: column 'weight' has 1 negative value\(s\); first at data row 2: -2$"):
        load(files, train=good_train, valid=valid, test=test)


def test_unknown_item_names_the_file_and_row_it_is_in(files, tmp_path):
    test = write(tmp_path, "u_test.csv", HEADER + "1,13,400\n2,99,400\n")
    with pytest.raises(DataError) as e:
        load(files, test=test)
    message = one_line(e)
    assert message.startswith(f"{test}: 1 item(s) of the events are absent from the item metadata ({files['items']})")
    assert "first at data row 2: 99" in message


@pytest.mark.parametrize("phase", ["train", "valid", "test"])
def test_header_only_file_is_refused_naming_it(files, tmp_path, phase):
    empty = write(tmp_path, f"empty_{phase}.csv", HEADER)
    with pytest.raises(DataError) as e:
        load(files, **{phase: empty})
    assert one_line(e) == f"{empty}: no events (empty: no data rows)"


def test_zero_byte_file_is_refused_naming_it(files, tmp_path):
    empty = write(tmp_path, "nothing.csv", "")
    with pytest.raises(DataError, match=rf"^{empty}: empty file"):
        load(files, valid=empty)


def test_phase_emptied_by_duplicate_removal_is_refused(files, tmp_path):
    # the only test event repeats a training pair: duplicates='first' removes it
    test = write(tmp_path, "dup_test.csv", HEADER + "1,10,400\n")
    with pytest.raises(DataError, match=rf"^{test}: no test events left: all were repeats"):
        load(files, test=test)


def test_ids_of_different_types_across_files_are_refused_in_one_line(files, tmp_path):
    test = write(tmp_path, "s_test.csv", HEADER + "u1,13,400\n2,14,400\n")
    with pytest.raises(DataError) as e:
        load(files, test=test)
    message = one_line(e)
    assert "column 'user_id'" in message and f"integers in {files['train']}" in message and f"text in {test}" in message
    items = write(tmp_path, "s_items.csv", "item_id,category\ni10,a\n")
    with pytest.raises(DataError, match=rf"'item_id'.*integers in {files['train']}, text in {items}"):
        load(files, items=items)


def test_text_ids_in_every_file_work_and_round_trip(files, tmp_path):
    train = write(tmp_path, "t_train.csv", HEADER + "a,x,1\na,y,2\nb,x,3\n")
    valid = write(tmp_path, "t_valid.csv", HEADER + "a,z,4\n")
    test = write(tmp_path, "t_test.csv", HEADER + "b,z,5\n")
    data, split = load_fixed_split(train, valid, test)
    assert data.users.raw.tolist() == ["a", "b"] and data.items.raw.tolist() == ["x", "y", "z"]


def test_ids_mixing_types_within_a_frame_are_refused_not_a_traceback():
    events = pd.DataFrame({"user_id": [1, "u2", 3], "item_id": ["a", "b", "a"]})
    with pytest.raises(DataError, match=r"^events: column 'user_id' mixes value types \(data row 1: 1 \(int\), data row 2: 'u2' \(str\)\)"):
        Interactions.from_frames(events)


def test_optional_column_missing_from_one_file_is_refused(files, tmp_path):
    test = write(tmp_path, "n_test.csv", "user_id,item_id\n1,13\n")
    with pytest.raises(DataError, match=rf"'timestamp' is in .* but missing from \['{test}'\]"):
        load(files, test=test)


def test_baskets_are_matched_across_files(tmp_path):
    cols = "user_id,item_id,timestamp,basket_id\n"
    train = write(tmp_path, "b_train.csv", cols + "1,10,1,7\n1,11,1,7\n2,10,2,8\n")
    valid = write(tmp_path, "b_valid.csv", cols + "1,12,1,7\n")
    test = write(tmp_path, "b_test.csv", cols + "2,13,2,8\n")
    data, split = load_fixed_split(train, valid, test)
    assert split.valid["basket"].iloc[0] == split.train["basket"].iloc[0] == split.train["basket"].iloc[1]
    assert data.events["basket"].nunique() == 2


# --- one timestamp rule ---------------------------------------------------------------------------

def test_seconds_in_one_file_and_iso_strings_in_another(files, tmp_path):
    valid = write(tmp_path, "iso_valid.csv", HEADER + "1,12,2017-09-18T05:05:54Z\n2,13,2017-09-18 07:05:54+02:00\n")
    train = write(tmp_path, "s_train.csv", HEADER + "1,10,1505711150\n1,11,1505711151\n2,10,1505711152\n2,12,1505711153\n")
    test = write(tmp_path, "s_test.csv", HEADER + "1,13,1505711160\n2,14,1505711161\n")
    data, split = load(files, train=train, valid=valid, test=test)
    assert split.valid["timestamp"].tolist() == [1505711154.0, 1505711154.0]
    assert split.train["timestamp"].min() == 1505711150.0
    assert split.test["timestamp"].max() == 1505711161.0


def test_number_strings_among_dates_are_seconds():
    events = pd.DataFrame({"user_id": [1, 1], "item_id": ["a", "b"], "timestamp": ["1505711154", "1970-01-02"]})
    data = Interactions.from_frames(events)
    assert sorted(data.events["timestamp"]) == [86400.0, 1505711154.0]


def test_milliseconds_are_refused_naming_file_column_and_value(files, tmp_path):
    test = write(tmp_path, "ms_test.csv", HEADER + "1,13,1505711160\n2,14,1505711160000\n")
    with pytest.raises(DataError) as e:
        load(files, test=test)
    message = one_line(e)
    assert message.startswith(f"{test}: column 'timestamp' has 1 out-of-range value(s); first at data row 2: 1505711160000")
    assert "looks like milliseconds" in message


def test_same_rule_for_single_tables_frames_and_cut_points(tmp_path):
    path = write(tmp_path, "events.csv", HEADER + "1,a,1505711154123456\n")
    with pytest.raises(DataError, match=rf"^{path}: column 'timestamp' .* looks like microseconds"):
        load_table(path)
    frame = pd.DataFrame({"user_id": [1, 1, 1], "item_id": ["a", "b", "c"], "timestamp": [1.0, 2.0, 3.0]})
    frame["timestamp"] = frame["timestamp"] * 1.5e12
    with pytest.raises(DataError, match="looks like milliseconds"):
        Interactions.from_frames(frame)
    data = Interactions.from_frames(frame.assign(timestamp=[1.0, 2.0, 3.0]))
    with pytest.raises(DataError, match="looks like milliseconds"):
        time_split(data, 2_000, 1_505_711_154_000)
    assert len(time_split(data, 2, "1970-01-01T00:00:03Z").test) == 1


def test_datetime_columns_from_parquet_are_taken_as_they_are(tmp_path):
    frame = pd.DataFrame({"user_id": [1], "item_id": [5], "timestamp": pd.to_datetime(["2017-09-18 05:05:54"])})
    frame.to_parquet(tmp_path / "e.parquet")
    assert load_table(tmp_path / "e.parquet").events["timestamp"].tolist() == [1505711154.0]


# --- cold start in the summary ----------------------------------------------------------------------

def test_summary_counts_cold_start_users_and_items(files):
    _, split = load(files)
    summary = split.summary()
    # valid: user 1 and 2 trained; item 13 new. test: user 4 new; items 13, 14, 15 new
    assert summary["valid_users_without_train_events"] == 0
    assert summary["valid_items_not_in_train"] == 1
    assert summary["test_users_without_train_events"] == 1
    assert summary["test_items_not_in_train"] == 3


# --- fingerprint --------------------------------------------------------------------------------------

def test_fingerprint_is_stable_across_reads_and_processes(files):
    first = load(files)[0].fingerprint()
    assert load(files)[0].fingerprint() == first
    assert len(first) == 64 and int(first, 16) >= 0
    code = (
        "import sys; from recsys_hnm.data import load_fixed_split; "
        "print(load_fixed_split(*sys.argv[1:]).__getitem__(0).fingerprint())"
    )
    paths = [str(files[k]) for k in ("train", "valid", "test", "items")]
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == first


def test_fingerprint_changes_with_any_content(files, tmp_path):
    base = load(files)[0].fingerprint()
    renamed = write(tmp_path, "r_train.csv", HEADER + "1,10,100\n1,11,200\n2,10,150\n2,12,250\n33,11,120\n")
    moved = write(tmp_path, "m_train.csv", HEADER + "1,10,100\n1,11,201\n2,10,150\n2,12,250\n3,11,120\n")
    recat = write(tmp_path, "r_items.csv", "item_id,category\n10,a\n11,b\n12,a\n13,c\n14,c\n15,d\n")
    # the same pair moved from valid to test changes only the phase column
    valid = write(tmp_path, "p_valid.csv", HEADER + "1,12,300\n")
    test = write(tmp_path, "p_test.csv", HEADER + "2,13,300\n1,13,400\n2,14,400\n4,15,400\n")
    prints = {
        base,
        load(files, train=renamed)[0].fingerprint(),
        load(files, train=moved)[0].fingerprint(),
        load(files, items=recat)[0].fingerprint(),
        load(files, valid=valid, test=test)[0].fingerprint(),
    }
    assert len(prints) == 5
    # text ids vs integer ids with the same digits are different data
    ints = Interactions.from_frames(pd.DataFrame({"user_id": [1], "item_id": [2]}))
    text = Interactions.from_frames(pd.DataFrame({"user_id": ["1"], "item_id": ["2"]}))
    assert ints.fingerprint() != text.fingerprint()


def test_fingerprint_ignores_input_row_order():
    rng = np.random.default_rng(0)
    events = pd.DataFrame({
        "user_id": rng.integers(0, 20, 300), "item_id": rng.integers(0, 50, 300), "timestamp": rng.integers(0, 30, 300),
    })
    a = Interactions.from_frames(events)
    b = Interactions.from_frames(events.sample(frac=1.0, random_state=1))
    assert a.fingerprint() == b.fingerprint()
