"""Batch pipelines: parent and child runs, skipping what finished, re-running what failed, workers."""

import yaml
from mlflow.tracking import MlflowClient

from conftest import small_config
from recsys_hnm.cli import main
from recsys_hnm.studies.compare import ComparisonSpec
from recsys_hnm.studies.pipeline import run_pipeline
from recsys_hnm.training import trainer as trainer_module


def _spec(synthetic_files, tmp_path, variants, seeds=(0, 1)):
    base = small_config(synthetic_files, tmp_path, train={"epochs": 1}).to_dict()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"name": "pipe", "base": str(tmp_path / "base.yaml"), "seeds": list(seeds), "variants": variants}))
    return path


def _children(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pipe").experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    return parents, [r for r in runs if r.data.tags.get("role") != "parent"]


def test_pipeline_runs_children_under_one_parent_and_resumes(synthetic_files, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = _spec(synthetic_files, tmp_path, {"base": [], "bad": ["train.lr=0.0123"]})
    real_epoch = trainer_module.Trainer.train_epoch

    def failing_epoch(self, epoch):  # the "bad" variant fails inside its run
        if self.optimizer.param_groups[0]["lr"] == 0.0123:
            raise RuntimeError("variant made to fail")
        return real_epoch(self, epoch)

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", failing_epoch)
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--baseline", "base"]) == 1
    parents, children = _children(uri)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert sorted((r.data.tags["variant"], r.info.status) for r in children) == [
        ("bad", "FAILED"), ("bad", "FAILED"), ("base", "FINISHED"), ("base", "FINISHED")]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    # dry run: only the failed ones would run again
    capsys.readouterr()
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--dry-run"]) == 0
    assert capsys.readouterr().out.split("would run:")[1].split() == ["bad/s0", "bad/s1"]
    # fixed: the next invocation re-runs only the failed variant, under the same parent
    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", real_epoch)
    summary = run_pipeline(ComparisonSpec.load(path), uri, baseline="base")
    assert summary["ran"] == ["bad/s0", "bad/s1"] and summary["skipped"] == ["base/s0", "base/s1"]
    parents, children = _children(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sum(r.info.status == "FINISHED" for r in children) == 4
    assert "| bad | 2 |" in summary["table"] and "vs base" in summary["table"]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(parents[0].info.run_id)}
    assert {"comparison.md", "comparison.csv", "validation_curves.png"} <= artifacts
    # nothing left: a third invocation runs nothing
    assert run_pipeline(ComparisonSpec.load(path), uri)["ran"] == []


def test_only_runs_the_named_variants_and_refuses_a_name_the_spec_lacks(synthetic_files, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = _spec(synthetic_files, tmp_path, {"a": [], "b": ["train.lr=0.02"]}, seeds=(0,))
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--only", "b"]) == 0
    assert [r.data.tags["variant"] for r in _children(uri)[1]] == ["b"]
    capsys.readouterr()
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--dry-run"]) == 0
    assert capsys.readouterr().out.split("would run:")[1].split() == ["a/s0"]
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--only", "c", "--only", "a"]) == 2
    err = capsys.readouterr().err
    assert "--only 'c': not a variant or baseline of pipeline 'pipe'; it has a, b" in err
    assert len(_children(uri)[1]) == 1  # refused before anything ran


def test_seeds_from_the_command_line_replace_the_specs_and_a_repeated_seed_is_refused(synthetic_files, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = _spec(synthetic_files, tmp_path, {"a": []}, seeds=(0,))
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--seeds", "3"]) == 0
    assert [r.data.tags["pipeline.key"] for r in _children(uri)[1]] == ["a/s3"]
    capsys.readouterr()  # seed 3 finished: only the others of --seeds are left
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--seeds", "3", "5", "--dry-run"]) == 0
    assert capsys.readouterr().out.split("would run:")[1].split() == ["a/s5"]
    assert main(["pipeline", "run", str(path), "--tracking-uri", uri, "--seeds", "1", "1"]) == 2
    assert "--seeds 1 1: expected distinct integers" in capsys.readouterr().err


def test_pipeline_with_two_workers_loses_no_run(synthetic_files, tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = _spec(synthetic_files, tmp_path, {"a": [], "b": ["train.lr=0.01"]})
    summary = run_pipeline(ComparisonSpec.load(path), uri, workers=2)
    assert "is_fx_tracing" not in capfd.readouterr().err  # the workers log as the CLI does: torch's notice muted
    assert sorted(summary["ran"]) == ["a/s0", "a/s1", "b/s0", "b/s1"] and summary["failed"] == []
    _, children = _children(uri)
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert all("test.ndcg_at_10" in r.data.metrics for r in children)


def test_a_pipeline_with_a_search_section_tabulates_the_best_config_only(synthetic_files, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = _spec(synthetic_files, tmp_path, {"base": []}, seeds=(0,))
    raw = yaml.safe_load(path.read_text())
    raw["search"] = {"trials": 2, "seed": 0, "pruner": False,
                     "space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.02, "log": True}}}
    path.write_text(yaml.safe_dump(raw))
    summary = run_pipeline(ComparisonSpec.load(path), uri)
    assert "| search-best | 1 |" in summary["table"] and "| base | 1 |" in summary["table"]
    assert "trial-" not in summary["table"]
    _, children = _children(uri)
    assert sum("search.trial" in r.data.tags for r in children) == 2


def test_sigterm_stops_the_workers_and_marks_the_runs(synthetic_files, tmp_path):
    """A pipeline killed mid-run leaves no worker process behind, and no run RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    path = _spec(synthetic_files, tmp_path, {"a": ["train.epochs=50"], "b": ["train.epochs=50"]}, seeds=(0,))
    proc = subprocess.Popen([sys.executable, "-m", "recsys_hnm.cli", "pipeline", "run", str(path), "--workers", "2",
                             "--tracking-uri", uri], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:  # until both children have started training
        time.sleep(2)
        try:
            _, children = _children(uri)
        except Exception:  # the experiment does not exist yet
            continue
        if len(children) == 2:
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "the pipeline should have worker processes"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    time.sleep(1)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}") and "zombie" not in open(f"/proc/{w}/status").read().lower()]
    assert alive == []
    parents, children = _children(uri)
    assert parents[0].info.status == "KILLED"
    assert {r.info.status for r in children} <= {"KILLED", "FINISHED"} and "RUNNING" not in {r.info.status for r in children}


def _specs():
    """The shipped pipeline specs (the other YAML files in pipelines/ are configs)."""
    from pathlib import Path

    return sorted(p for p in Path("pipelines").glob("*.yaml") if {"variants", "baselines", "search"} & set(yaml.safe_load(p.read_text())))


def test_every_shipped_pipeline_dry_runs_from_a_clean_checkout_and_writes_nothing(tmp_path, capsys):
    specs = _specs()
    assert len(specs) >= 10 and any(p.name == "movielens_ablation.yaml" for p in specs)
    for path in specs:
        store = tmp_path / path.stem / "m.db"
        assert main(["pipeline", "run", str(path), "--dry-run", "--tracking-uri", f"sqlite:///{store}"]) == 0, path
        assert "would run:" in capsys.readouterr().out, path
        assert not store.parent.exists(), path
    # the offline variant's file is made by the pipeline, and the dry run says so
    main(["pipeline", "run", "pipelines/movielens_ablation.yaml", "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 'a.db'}"])
    assert "would mine mlruns/mined/movielens-default-s0.parquet from the run default/s0" in capsys.readouterr().out


def test_a_pipeline_mines_its_offline_negatives_from_its_own_run_before_the_variant_that_reads_them(synthetic_files, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    mined = tmp_path / "mined" / "default-s0.parquet"
    path = _spec(synthetic_files, tmp_path, {
        "offline": ["sampler.mixture={in_batch: 1.0, uniform: 0.75, static: 0.25}", "sampler.hard=[static]",
                    f"sampler.static.path={mined}"],
        "default": []}, seeds=(0,))
    spec = yaml.safe_load(path.read_text())
    spec["mined"] = {str(mined): {"from": "default/s0", "sources": ["ann"], "per_positive": 2, "window": [5, 50]}}
    path.write_text(yaml.safe_dump(spec))
    summary = run_pipeline(ComparisonSpec.load(path), uri)
    assert summary["ran"] == ["default/s0", "offline/s0"] and summary["failed"] == []  # the producer first
    assert summary["mined"] == [str(mined)] and mined.is_file()
    parents, children = _children(uri)
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    # what exists is not made again; a static file nobody makes is refused before anything runs
    assert run_pipeline(ComparisonSpec.load(path), uri)["ran"] == [] and "mined" not in run_pipeline(ComparisonSpec.load(path), uri)
    del spec["mined"]
    spec["variants"]["offline"][-1] = f"sampler.static.path={tmp_path / 'nobody.parquet'}"
    path.write_text(yaml.safe_dump(spec))
    import pytest
    from recsys_hnm.config import ConfigError

    with pytest.raises(ConfigError, match=r"variant 'offline': sampler.static.path: file not found: .*declare it under mined:"):
        run_pipeline(ComparisonSpec.load(path), uri, dry_run=True)
    spec["mined"] = {"x.parquet": {"from": "nope/s0"}}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"mined.x.parquet: from: 'nope/s0' is not a run of this pipeline"):
        ComparisonSpec.load(path)
