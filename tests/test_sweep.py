"""The bad-input sweep of the CLI (issues 29 and 32): every case is refused (or accepted, where
valid) with its exit code, one message naming the key, flag, file or value, no traceback on
screen, and no MLflow run created by a refused command. Tiny data; one 1-epoch training shared
by the cases that need a run. New commands join by adding rows to CASES."""

import argparse
import datetime
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import small_config, write_split
from recsys_hnm import experiment
from recsys_hnm.cli import build_parser, main
from recsys_hnm.config import ConfigError, check_register_name, config_from_dict, load_config
from recsys_hnm.data import leave_last_out, synthetic

QUICK = "pipelines/quickstart.yaml"
TRIPWIRE = ["--set", "train.epochs=0"]  # should a check be skipped, the command still stops before training


@pytest.fixture(autouse=True)
def isolate(tmp_path, monkeypatch):
    """Logs of failed commands go to this test's directory; main() reconfigures the root logger: put it back."""
    monkeypatch.setenv("RECSYS_HNM_LOG_DIR", str(tmp_path / "logs"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished 1-epoch run on a 50-item catalog that logged test metrics at K 5 and 10."""
    root = tmp_path_factory.mktemp("tiny")
    data = synthetic(80, 50, 2000, n_categories=5, seed=2)
    files = write_split(data, leave_last_out(data), root, items=True)
    config = small_config(files, root, name="tiny", model={"dim": 8, "hidden": [8]}, sampler={"num_negatives": 8},
                          train={"epochs": 1}, eval={"ks": [5, 10]})
    result = experiment.train(config)
    return {"run_id": result.run_id, "uri": config.tracking.uri, "experiment": config.tracking.experiment, "root": root,
            "variant": MlflowClient(config.tracking.uri).get_run(result.run_id).info.run_name}


def runs_in(uri: str) -> dict[str, str]:
    """run id -> status of every run of the store (nothing when the store was never created)."""
    path = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(path).exists():
        return {}
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r.info.status for r in client.search_runs(ids)} if ids else {}


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def spec(t: Path, extra: str = "variants: {a: []}\n") -> str:
    write(t / "base.yaml", "name: base\ntrain: {epochs: 0}\n")  # would refuse to train: a tripwire
    return write(t / "spec.yaml", f"name: s\nbase: {t / 'base.yaml'}\n{extra}")


def store(t: Path) -> str:
    return f"sqlite:///{t / 'store' / 'mlflow.db'}"


# (id, argv from (tmp_path, tiny run), expected exit code, substrings of the message; {t} is tmp_path)
CASES = [
    # issue 29: every float of the config finite, refused in the config layer before any run
    ("lr nan", lambda t, r: ["train", "--set", "train.lr=.nan", "--tracking-uri", store(t), *TRIPWIRE], 2, ["train.lr", "nan"]),
    ("weight_decay -inf", lambda t, r: ["train", "--set", "train.weight_decay=-.inf", "--tracking-uri", store(t)], 2,
     ["train.weight_decay", "-inf"]),
    ("temperature inf", lambda t, r: ["train", "--set", "model.temperature=.inf", "--tracking-uri", store(t)], 2,
     ["model.temperature", "inf"]),
    ("mixture weight nan", lambda t, r: ["train", "--set", "sampler.mixture={in_batch: .nan, uniform: 1}", "--tracking-uri", store(t)], 2,
     ["sampler.mixture.in_batch", "nan"]),
    ("list item inf", lambda t, r: ["train", "--set", "sampler.ann.window=[10, .inf]", "--tracking-uri", store(t)], 2,
     ["sampler.ann.window[1]", "inf"]),
    ("optional float nan", lambda t, r: ["train", "--set", "data.min_rating=.nan", "--tracking-uri", store(t)], 2, ["data.min_rating"]),
    ("1e999 overflows", lambda t, r: ["train", "--set", "train.lr=1e999", "--tracking-uri", store(t)], 2, ["train.lr", "1e999"]),
    ("nan in a config file", lambda t, r: ["train", "--config", write(t / "c.yaml", "name: c\ntrain: {lr: .nan}\n"),
                                           "--tracking-uri", store(t)], 2, ["train.lr"]),
    # issue 29: flags checked by name
    ("mine per-positive 0", lambda t, r: ["mine", "--run-id", r["run_id"], "--output", str(t / "m.parquet"), "--per-positive", "0",
                                          "--tracking-uri", r["uri"]], 2, ["--per-positive", "0"]),
    ("mine per-positive -3", lambda t, r: ["mine", "--run-id", "nope", "--output", str(t / "m.parquet"), "--per-positive", "-3"], 2,
     ["--per-positive"]),
    ("mine unknown source", lambda t, r: ["mine", "--run-id", "nope", "--output", str(t / "m.parquet"), "--sources", "ann,bogus"], 2,
     ["--sources", "bogus"]),
    ("mine category ignores the ann window", lambda t, r: ["mine", "--run-id", r["run_id"], "--output", str(t / "m.parquet"),
                                                           "--sources", "category", "--per-positive", "2", "--tracking-uri", r["uri"]], 0,
     ["wrote", "m.parquet"]),
    ("mine ann window past the catalog", lambda t, r: ["mine", "--run-id", r["run_id"], "--output", str(t / "m.parquet"),
                                                       "--tracking-uri", r["uri"]], 2, ["window [10, 100)", "50 items"]),
    # issue 32
    ("register empty", lambda t, r: ["train", "--register", "", "--tracking-uri", store(t), *TRIPWIRE], 2, ["--register", "empty"]),
    ("register a path", lambda t, r: ["train", "--register", "../../evil name/x", "--tracking-uri", store(t), *TRIPWIRE], 2,
     ["--register", "'../../evil name/x'", "'/'"]),
    ("register colon", lambda t, r: ["train", "--register", "a:b", "--tracking-uri", store(t), *TRIPWIRE], 2, ["--register", "':'"]),
    ("tracking.register in the config", lambda t, r: ["train", "--set", "tracking.register=../x", "--tracking-uri", store(t),
                                                                   "--set", "data.dataset=no-such-dataset"],
     2, ["tracking.register", "'../x'"]),
    ("pipeline workers 0", lambda t, r: ["pipeline", "run", spec(t), "--workers", "0", "--tracking-uri", store(t)], 2, ["--workers", "0"]),
    ("pipeline workers -2", lambda t, r: ["pipeline", "run", spec(t), "--workers", "-2", "--dry-run", "--tracking-uri", store(t)], 2,
     ["--workers", "-2"]),
    ("pipeline unknown baseline", lambda t, r: ["pipeline", "run", spec(t, "baselines: [mostpop, bogus]\n"), "--dry-run",
                                                "--tracking-uri", store(t)], 2, ["spec.yaml", "'bogus'", "ease", "itemknn"]),
    ("compare spec unknown baseline", lambda t, r: ["compare", "--spec", spec(t, "variants: {a: []}\nbaselines: [EASE]\n"),
                                                    "--tracking-uri", store(t)], 2, ["'EASE'", "ease"]),
    ("pipeline baseline twice", lambda t, r: ["pipeline", "run", spec(t, "baselines: [ease, ease]\n"), "--dry-run",
                                              "--tracking-uri", store(t)], 2, ["ease", "more than once"]),
    ("compare metric not logged", lambda t, r: ["compare", "--experiment", r["experiment"], "--metric", "ndcg@50",
                                                "--tracking-uri", r["uri"]], 2, ["--metric", "ndcg@50", "K 5, 10"]),
    ("compare metric not logged, baseline", lambda t, r: ["compare", "--experiment", r["experiment"], "--metric", "ndcg@50",
                                                          "--baseline", r["variant"], "--tracking-uri", r["uri"]], 2,
     ["--metric", "ndcg@50", "K 5, 10"]),
    ("compare metric unknown name", lambda t, r: ["compare", "--experiment", r["experiment"], "--metric", "auc",
                                                  "--tracking-uri", r["uri"]], 2, ["--metric", "'auc'", "ndcg"]),
    ("recommend header-only users", lambda t, r: ["recommend", "--run-id", r["run_id"], "--users", write(t / "users.csv", "user_id\n"),
                                                  "--output", str(t / "recs.csv"), "--tracking-uri", r["uri"]], 2,
     ["{t}/users.csv", "no rows"]),
]


@pytest.mark.parametrize("argv, code, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sweep(tmp_path, capsys, tiny_run, argv, code, expected):
    before = runs_in(tiny_run["uri"])
    args = argv(tmp_path, tiny_run)
    try:
        rc = main(args)
    except SystemExit as e:  # argparse refuses a flag's value itself: usage, then one error line
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == code, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    text = out if code == 0 else err
    for part in expected:
        assert part.format(t=tmp_path) in text, text
    if code:
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") or "error: argument" in last, err  # ours, or argparse's after its usage line
        assert runs_in(store(tmp_path)) == {}  # a refused command created no run (nor a store)
    assert runs_in(tiny_run["uri"]) == before  # and left the earlier runs as they were


def test_refused_messages_are_one_line(tmp_path, capsys, tiny_run):
    for args in (["train", "--set", "train.lr=.nan"], ["mine", "--run-id", "x", "--output", str(tmp_path / "m.csv"), "--per-positive", "0"],
                 ["pipeline", "run", spec(tmp_path), "--workers", "0"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_mined_category_negatives_on_a_small_catalog(tmp_path, capsys, tiny_run):
    out = tmp_path / "m.csv"
    assert main(["mine", "--run-id", tiny_run["run_id"], "--output", str(out), "--sources", "category", "--per-positive", "3",
                 "--tracking-uri", tiny_run["uri"]]) == 0
    mined = pd.read_csv(out)
    assert len(mined) and set(mined["source"]) == {"category"} and (mined.groupby(["user_id", "item_id"]).size() % 3 == 0).all()


# -- the config layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, key", [
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"model": {"temperature": float("inf")}}, "model.temperature"),
    ({"sampler": {"mixture": {"in_batch": float("nan"), "uniform": 1.0}}}, "sampler.mixture.in_batch"),
    ({"sampler": {"copurchase": {"session_gap_s": float("-inf")}}}, "sampler.copurchase.session_gap_s"),
    ({"sampler": {"ann": {"window": [10, float("inf")]}}}, r"sampler.ann.window\[1\]"),
    ({"train": {"embedding_lr": float("nan")}}, "train.embedding_lr"),
    ({"train": {"lr": 10 ** 400}}, "train.lr"),
])
def test_every_float_is_finite(raw, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(raw)


def test_unquoted_yaml_dates_are_their_iso_text(tmp_path):
    path = write(tmp_path / "c.yaml", """\
        name: dated
        data: {split: time, valid_start: 2015-01-01, test_start: 2016-03-04 10:30:00}
        """)
    config = load_config(path)
    assert config.data.valid_start == "2015-01-01" and config.data.test_start == "2016-03-04T10:30:00"
    assert config_from_dict({"data": {"split": "time", "valid_start": datetime.date(2015, 1, 1), "test_start": "2016"}}).data.valid_start == "2015-01-01"
    with pytest.raises(ConfigError, match="train.monitor: expected a string"):  # a date is still no number, list or section
        config_from_dict({"train": {"monitor": ["x"]}})
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        config_from_dict({"train": {"lr": datetime.date(2015, 1, 1)}})


NAMES = ["recsys", "my model v1", "a.b-c_d", "", "  ", "a/b", "../../evil name/x", "a:b", ".", "..", "../x", "./x", "x/", "a%b", "a\\b"]


@pytest.mark.parametrize("name", NAMES)
def test_register_names_follow_mlflows_rule(name):
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name as file_store_rule
    from mlflow.utils.validation import _validate_model_name as every_store_rule

    try:  # the installed MLflow's own rule: every store's, and the file store's ('%', path separators)
        every_store_rule(name)
        file_store_rule(name)
        mlflow_refuses = "\\" in name  # a separator on Windows' file store
    except MlflowException:
        mlflow_refuses = True
    try:
        check_register_name(name, "tracking.register")
        ours = False
    except ConfigError as e:
        assert str(e).startswith("tracking.register: ")
        ours = True
    assert ours == mlflow_refuses
    with pytest.raises(ConfigError, match="at most 256"):
        check_register_name("x" * 257)
    check_register_name(None)


# -- the CLI boundary ------------------------------------------------------------------------------

def test_an_unexpected_error_is_one_line_and_a_log(tmp_path, capsys, monkeypatch):
    def broken(run_id, uri=None):
        raise RuntimeError("store exploded\nsecond line")

    monkeypatch.setattr(experiment, "evaluate_run", broken)
    assert main(["evaluate", "--run-id", "r1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: evaluate failed: RuntimeError: store exploded second line (at cli.py:")  # the innermost frame of the package
    (log,) = (tmp_path / "logs").glob("recsys-hnm-*.log")
    assert f"full traceback in {log}" in err
    text = log.read_text()
    assert "recsys-hnm evaluate --run-id r1" in text and "Traceback (most recent call last)" in text and "in broken" in text
    assert main(["-v", "evaluate", "--run-id", "r1"]) == 1  # -v: the traceback on screen too
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("error: evaluate failed: RuntimeError")


def test_the_log_falls_back_to_a_temp_dir(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("RECSYS_HNM_LOG_DIR", str(blocker / "logs"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").write_text("a file where mlruns/ would be")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(experiment, "evaluate_run", lambda run_id, uri=None: 1 / 0)
    assert main(["evaluate", "--run-id", "r1"]) == 1
    err = capsys.readouterr().err
    (log,) = (tmp_path / "tmp" / "recsys-hnm-logs").glob("*.log")
    assert "ZeroDivisionError" in err and str(log) in err


def test_a_known_error_keeps_exit_2_and_shows_its_traceback_only_with_v(capsys):
    assert main(["train", "--set", "train.lr=.nan"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", "train", "--set", "train.lr=.nan"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: train.lr")


def test_ctrl_c_in_a_command_or_while_parsing_is_130(capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "evaluate_run", interrupt)
    assert main(["evaluate", "--run-id", "r"]) == 130
    assert capsys.readouterr().err == "interrupted (KeyboardInterrupt)\n"
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupt)
    assert main(["evaluate", "--run-id", "r"]) == 130
    assert capsys.readouterr().err == "interrupted (KeyboardInterrupt)\n"


def test_ctrl_c_during_imports_is_130_and_one_line(tmp_path):
    """A KeyboardInterrupt raised while the command imports torch (the first seconds)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""\
        import sys

        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, Interrupt())
        """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    script = Path(sys.executable).parent / "recsys-hnm"
    scripts = [[str(script), "--help"]] if script.is_file() else []  # the console script, where installed beside this python
    for cmd in (*scripts, [sys.executable, "-m", "recsys_hnm.cli", "train"]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 130 and p.stderr == "interrupted (KeyboardInterrupt)\n", (cmd, p.stderr)


def commands(parser=None, prefix=()):
    """Every command path of the CLI: ('train',), ('datasets', 'describe'), ..."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))


def test_the_sweep_knows_every_command():
    found = set(commands())
    assert {("train",), ("evaluate",), ("recommend",), ("mine",), ("baseline",), ("compare",), ("datasets", "describe"),
            ("pipeline", "run")} <= found


@pytest.mark.parametrize("path", [(), *commands()], ids=lambda p: " ".join(p) or "recsys-hnm")
def test_help_and_no_arguments_print_no_traceback(path, capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and "usage: recsys-hnm" in out and "Traceback" not in out + err
    if path == ("train",):  # with no arguments, train trains the quickstart: here it only gets as far as the data
        def stub(config, resume=False):
            raise ConfigError("stub: no training here")

        monkeypatch.setattr(experiment, "train", stub)
        assert main(["train"]) == 2
        assert "Traceback" not in capsys.readouterr().err
        return
    try:
        code = main(list(path))
    except SystemExit as exit_:  # argparse: a required argument or subcommand is missing
        code = exit_.code
    out, err = capsys.readouterr()
    # a missing argument (argparse: 2), or a command that runs on its defaults (0); never an unexpected error
    assert code in (0, 2) and "Traceback" not in out + err, err
    if code:
        assert "error" in err, err
