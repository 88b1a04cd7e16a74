"""Bad input to the ``recsys-hnm`` command ends in one ``error: ...`` line naming the file or key,
with exit code 2, before any training. Most cases also set ``train.epochs=0`` (or a missing
dataset) as a tripwire: should the check under test be skipped, the command still fails fast,
on another message, instead of training."""

import logging
import os
import stat

import pandas as pd
import pytest
import torch

from recsys_hnm import experiment
from recsys_hnm.cli import main
from recsys_hnm.ops.io import atomic_write

QUICK = "pipelines/quickstart.yaml"
TRIPWIRE = ["--set", "train.epochs=0"]


@pytest.fixture(autouse=True)
def restore_logging():
    """main() reconfigures the root logger onto this test's captured stderr; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write(path, text):
    path.write_text(text)
    return str(path)


def spec(tmp_path, text):
    """A comparison spec whose base config would refuse to train (epochs 0) on today's code path."""
    write(tmp_path / "base.yaml", "name: base\ntrain: {epochs: 0}\n")
    return write(tmp_path / "spec.yaml", text.replace("BASE", str(tmp_path / "base.yaml")))


def movielens(tmp_path, ratings: bytes):
    """A MovieLens-layout folder with these ratings.csv bytes."""
    folder = tmp_path / "ml"
    folder.mkdir(exist_ok=True)
    (folder / "movies.csv").write_text("movieId,title,genres\n1,A,Drama\n2,B,Comedy\n")
    (folder / "ratings.csv").write_bytes(ratings)
    return str(folder)


def foreign_database(tmp_path):
    """An SQLite file of another application."""
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE foo (a INTEGER)")
    return path


# (id, argv built from tmp_path, substrings the one error line must hold; {t} is tmp_path)
CASES = [
    ("movielens without timestamps", lambda t: ["datasets", "describe", movielens(t, b"userId,movieId,rating\n1,1,4.0\n")],
     ["ml/ratings.csv", "missing column(s) ['timestamp']"]),
    ("movielens not utf-8", lambda t: ["train", "--set", "data.dataset=" + movielens(t, b"userId,movieId,rating,timestamp\n1,1,4,1\n1,\xff2,4,2\n"),
                                       "--tracking-uri", f"sqlite:///{t / 'm.db'}"],
     ["ml/ratings.csv", "line 3 (data row 2), column 3", "byte 0xff is not UTF-8"]),
    ("foreign sqlite store", lambda t: ["compare", "--experiment", "x", "--tracking-uri", f"sqlite:///{foreign_database(t)}"],
     ["other.db is an SQLite database but not an MLflow store", "foo"]),
    ("empty store file", lambda t: ["evaluate", "--run-id", "r", "--tracking-uri", f"sqlite:///{write(t / 'e.db', '')}"],
     ["{t}/e.db is empty: no run was tracked there"]),
    ("bad value", lambda t: ["train", "--config", QUICK, "--set", "train.lr=-1"], ["train.lr: must be > 0"]),
    ("bad list item", lambda t: ["train", "--config", QUICK, "--set", "eval.ks=[0]"], ["eval.ks[0]"]),
    ("config yaml syntax", lambda t: ["train", "--config", write(t / "bad.yaml", "train: [1,\n"), *TRIPWIRE],
     ["bad.yaml", "invalid YAML", "line 2"]),
    ("config empty", lambda t: ["train", "--config", write(t / "empty.yaml", ""), *TRIPWIRE], ["empty.yaml", "empty"]),
    ("config only comments", lambda t: ["train", "--config", write(t / "c.yaml", "# nothing\n"), *TRIPWIRE], ["c.yaml", "empty"]),
    ("config a list", lambda t: ["train", "--config", write(t / "l.yaml", "- a\n"), *TRIPWIRE], ["l.yaml", "mapping"]),
    ("config an empty list", lambda t: ["train", "--config", write(t / "l.yaml", "[]\n"), *TRIPWIRE], ["l.yaml", "mapping"]),
    ("config not utf-8", lambda t: ["train", "--config", str(t / "b.yaml"), *TRIPWIRE], ["b.yaml", "cannot be read"]),
    ("--set yaml syntax", lambda t: ["train", "--config", QUICK, "--set", "train.lr=[1,", *TRIPWIRE], ["--set train.lr", "not valid YAML"]),
    ("name parent dir", lambda t: ["train", "--config", QUICK, "--set", "name=../x", *TRIPWIRE], ["name: '../x'"]),
    ("name absolute", lambda t: ["train", "--config", QUICK, "--set", "name=/tmp/x", *TRIPWIRE], ["name: '/tmp/x'"]),
    ("name slash", lambda t: ["train", "--config", QUICK, "--set", "name=a/b", *TRIPWIRE], ["name: 'a/b'"]),
    ("name dot", lambda t: ["train", "--config", QUICK, "--set", "name=.hidden", *TRIPWIRE], ["name: '.hidden'"]),
    ("name in file", lambda t: ["train", "--config", write(t / "n.yaml", "name: ../../etc\n"), *TRIPWIRE], ["name: '../../etc'"]),
    ("spec yaml syntax", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nvariants: {a: [\n")], ["spec.yaml", "invalid YAML"]),
    ("spec empty", lambda t: ["compare", "--spec", spec(t, "")], ["spec.yaml", "empty"]),
    ("spec a list", lambda t: ["compare", "--spec", spec(t, "- a\n")], ["spec.yaml", "mapping"]),
    ("spec variants a list", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nvariants: [a, b]\n")],
     ["spec.yaml", "variants"]),
    ("spec variant sets a string", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nvariants: {a: train.lr=1}\n")],
     ["spec.yaml", "variants.a"]),
    ("spec seeds a string", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nseeds: '0'\nvariants: {a: []}\n")],
     ["spec.yaml", "seeds"]),
    ("spec seeds not ints", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nseeds: [0, x]\nvariants: {a: []}\n")],
     ["spec.yaml", "seeds"]),
    ("spec seeds bools", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nseeds: [true]\nvariants: {a: []}\n")],
     ["spec.yaml", "seeds"]),
    ("spec set a string", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nset: train.lr=1\nvariants: {a: []}\n")],
     ["spec.yaml", "set"]),
    ("spec name unsafe", lambda t: ["compare", "--spec", spec(t, "name: ../s\nbase: BASE\nvariants: {a: []}\n")],
     ["spec.yaml", "name: '../s'"]),
    ("spec variant bad yaml", lambda t: ["compare", "--spec", spec(t, "name: s\nbase: BASE\nvariants: {a: ['train.lr=[1,']}\n")],
     ["variant 'a'", "--set train.lr"]),
    ("recommend output under a file", lambda t: ["recommend", "--run-id", "r", "--output", str(t / "f" / "x.csv"),
                                                 "--tracking-uri", f"sqlite:///{t / 'm.db'}"], ["{t}/f, which is a file"]),
    ("recommend output suffix", lambda t: ["recommend", "--run-id", "r", "--output", str(t / "x.txt"),
                                           "--tracking-uri", f"sqlite:///{t / 'm.db'}"], ["x.txt", ".csv or .parquet"]),
    ("recommend output a directory", lambda t: ["recommend", "--run-id", "r", "--output", str(t / "d.csv"),
                                                "--tracking-uri", f"sqlite:///{t / 'm.db'}"], ["d.csv", "is a directory"]),
    ("compare output under a file", lambda t: ["compare", "--spec", str(t / "missing.yaml"), "--output", str(t / "f" / "x.md")],
     ["{t}/f, which is a file"]),
    ("compare output json", lambda t: ["compare", "--spec", str(t / "missing.yaml"), "--output", str(t / "x.json")],
     ["x.json", ".md or .txt"]),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_file_or_key(tmp_path, capsys, argv, expected):
    (tmp_path / "f").write_text("a file where a directory is needed")
    (tmp_path / "d.csv").mkdir()
    (tmp_path / "b.yaml").write_bytes(b"name: \xff\xfe\n")
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text.format(t=tmp_path) in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_read_only_output_directory_is_refused_before_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["recommend", "--run-id", "r", "--output", str(ro / "x.csv"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    finally:
        ro.chmod(0o755)
    assert f"directory {ro} is not writable" in capsys.readouterr().err


def test_compare_refuses_a_table_metric_missing_from_eval_ks_before_training(tmp_path, capsys):
    # the dataset does not exist: were the check left to after training, loading it would fail first
    write(tmp_path / "base.yaml", "name: base\ndata: {dataset: no-such-dataset}\n")
    path = write(tmp_path / "spec.yaml", f"name: s\nbase: {tmp_path / 'base.yaml'}\nvariants:\n  full: []\n"
                                         "  '+short ks': ['eval.ks=[20, 50]']\n")
    assert main(["compare", "--spec", path]) == 2
    err = capsys.readouterr().err
    assert "variant '+short ks'" in err and "eval.ks" in err and "ndcg@10" in err


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a torch file"], ids=["empty", "truncated", "garbage"])
def test_unreadable_checkpoint_names_the_file(tmp_path, capsys, content):
    ckpt = tmp_path / "ck" / "cfg" / "run1" / "last.pt"  # <checkpoint_dir>/<name>/<run id>/last.pt
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(content)
    argv = ["train", "--config", QUICK, "--resume", "--set", f"train.checkpoint_dir={tmp_path / 'ck'}", "--set", "name=cfg"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(ckpt) in err


@pytest.mark.parametrize("content, says", [(b"", "empty"), (b"random bytes \x80\x03", "not a torch file"),
                                           (b"PK\x03\x04 cut short", "truncated or damaged torch file")])
def test_unreadable_model_weights_name_the_run_and_artifact(tmp_path, capsys, content, says):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.set_tracking_uri(uri)
    (tmp_path / "model.pt").write_bytes(content)
    with mlflow.start_run() as run:
        mlflow.log_text("name: x\n", "config.yaml")
        mlflow.log_artifact(str(tmp_path / "model.pt"))
    assert main(["evaluate", "--run-id", run.info.run_id, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"run {run.info.run_id}: artifact model.pt: {says}" in err and "tmp" not in err.split("model.pt")[1][:20]


def test_verbose_logs_info_to_stderr(tmp_path, capsys):
    log = logging.getLogger("recsys_hnm.experiment")
    assert main(["compare", "--spec", str(tmp_path / "missing.yaml")]) == 2
    log.info("quiet by default")
    assert "quiet by default" not in capsys.readouterr().err
    assert main(["-v", "compare", "--spec", str(tmp_path / "missing.yaml")]) == 2
    log.info("heard with -v")
    assert "INFO recsys_hnm.experiment: heard with -v" in capsys.readouterr().err


@pytest.mark.parametrize("history", [None, "test", "all"])
def test_recommend_passes_history(tmp_path, capsys, monkeypatch, history):
    calls = []

    def fake(run_id, k, users=None, uri=None, history="test", exclude=None):
        calls.append((history, exclude))
        return pd.DataFrame({"user_id": [1], "item_id": [2], "rank": [1], "score": [0.5]})

    monkeypatch.setattr(experiment, "recommend", fake)
    out = tmp_path / "recs.csv"
    argv = ["recommend", "--run-id", "r", "--output", str(out)] + (["--history", history] if history else [])
    assert main(argv) == 0
    assert calls == [(history or "test", None)] and out.is_file()
    assert main(argv + ["--exclude", "none"]) == 0 and calls[-1] == (history or "test", "none")


def test_recommend_history_refuses_other_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["recommend", "--run-id", "r", "--output", "x.csv", "--history", "train"])
    assert e.value.code == 2 and "--history" in capsys.readouterr().err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.pt", lambda tmp: torch.save({"x": torch.zeros(2)}, tmp))
        atomic_write(tmp_path / "b.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_tracking_stores_are_checked_before_use(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "m.db"
    cases = [
        (["train", "--config", QUICK, "--tracking-uri", "bogus://x", "--set", "train.epochs=1"], "unsupported scheme 'bogus'"),
        (["evaluate", "--run-id", "abc", "--tracking-uri", f"sqlite:///{missing}"], "does not exist"),
        (["compare", "--experiment", "e", "--tracking-uri", f"sqlite:///{missing}"], "does not exist"),
    ]
    garbage = tmp_path / "not.db"
    garbage.write_bytes(b"this is not a database at all")
    cases.append((["compare", "--experiment", "e", "--tracking-uri", f"sqlite:///{garbage}"], "is not an SQLite database"))
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (argv, err)
    assert not missing.parent.exists()  # a read-only command creates no store


def test_a_split_with_an_empty_phase_is_refused_before_any_run(tmp_path, capsys):
    store = tmp_path / "m.db"
    argv = ["train", "--config", QUICK, "--tracking-uri", f"sqlite:///{store}", "--set", "data.split=time",
            "--set", "data.valid_start=2100-01-01", "--set", "data.test_start=2101-01-01"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data.split=time: the valid and test phases are empty" in err and "after every event?" in err
    assert not store.exists()
    argv[-3:] = ["data.valid_start=1990-01-01", "--set", "data.test_start=1991-01-01"]  # before every event
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the train and valid phases are empty" in err and "before every event?" in err
    assert not store.exists()


def test_a_step_too_large_for_memory_is_refused_before_any_run(tmp_path, capsys):
    store = tmp_path / "m.db"
    assert main(["train", "--config", QUICK, "--set", "sampler.num_negatives=100000000", "--tracking-uri", f"sqlite:///{store}"]) == 2
    err = capsys.readouterr().err
    assert "sampler.num_negatives: a training step needs about" in err and "GB available" in err and "Traceback" not in err
    assert not store.exists()


def test_a_dry_run_on_a_new_store_writes_nothing(tmp_path, capsys):
    store = tmp_path / "new" / "m.db"
    assert main(["pipeline", "run", "pipelines/sasrec_amazon_sports.yaml", "--dry-run", "--tracking-uri", f"sqlite:///{store}"]) == 0
    assert "baseline:ease" in capsys.readouterr().out
    assert not (tmp_path / "new").exists()
    foreign = foreign_database(tmp_path)
    before = foreign.read_bytes()
    assert main(["pipeline", "run", "pipelines/sasrec_amazon_sports.yaml", "--dry-run", "--tracking-uri", f"sqlite:///{foreign}"]) == 2
    assert "not an MLflow store" in capsys.readouterr().err and foreign.read_bytes() == before
