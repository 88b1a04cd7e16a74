"""Hyperparameter search: trials as child runs, selection on validation only, refusals before any
trial, median pruning, resuming from the MLflow record."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import small_config
from recsys_hnm import experiment
from recsys_hnm.config import ConfigError
from recsys_hnm.studies.search import run_search
from recsys_hnm.training import trainer as trainer_module

NAME = "srch"


def _base(synthetic_files, tmp_path, epochs=2):
    base = small_config(synthetic_files, tmp_path, train={"epochs": epochs}).to_dict()
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path), f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def _runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    trials = sorted((r for r in runs if "search.trial" in r.data.tags), key=lambda r: int(r.data.tags["search.trial"]))
    best = [r for r in runs if r.data.tags.get("variant") == "search-best"]
    return parents, trials, best


def _valid_history(uri, run_id, metric="valid.ndcg_at_10"):
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, metric)}


def test_search_runs_trials_under_one_parent_and_selects_on_validation(synthetic_files, tmp_path, monkeypatch):
    base, uri = _base(synthetic_files, tmp_path)
    real_train = experiment.train

    def train_with_upside_down_test(config, **kwargs):  # test metrics ranked against validation
        result = real_train(config, **kwargs)
        result.test = {k: -max(h["valid.ndcg@10"] for h in result.history) for k in result.test}
        return result

    monkeypatch.setattr(experiment, "train", train_with_upside_down_test)
    spec = {"metric": "ndcg@10", "trials": 3, "seed": 0, "space": {
        "train.lr": {"type": "float", "low": 0.0005, "high": 0.02, "log": True},
        "model.dim": {"type": "categorical", "choices": [16, 32]},
    }}
    result = run_search(spec, base, NAME, uri, seeds=[0, 1], overrides=["model.hidden=[32]", "train.refit=true"])

    parents, trials, best = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    assert [r.data.tags["pipeline.key"] for r in trials] == ["search/trial-0", "search/trial-1", "search/trial-2"]
    assert all(r.info.status == "FINISHED" and r.data.tags["search.pruned"] == "false" for r in trials)
    assert all(r.data.tags["mlflow.parentRunId"] == parent and r.data.tags["pipeline"] == NAME for r in trials + best)
    assert all(r.data.params["model.hidden"] == "[32]" for r in trials + best)  # the pipeline's overrides apply
    # trials are selection runs (validation only): the refit is left to the best config's runs
    assert all(r.data.params["train.refit"] == "False" for r in trials)
    assert all(r.data.params["train.refit"] == "True" and "refit.epochs" in r.data.metrics for r in best)
    assert [r.data.tags["variant"] for r in trials] == ["trial-0", "trial-1", "trial-2"]
    # the selection: the trial whose best epoch on validation is highest
    best_valid = {r.info.run_id: max(_valid_history(uri, r.info.run_id).values()) for r in trials}
    assert all(len(_valid_history(uri, r.info.run_id)) == 2 for r in trials)
    winner = max(trials, key=lambda r: best_valid[r.info.run_id])
    assert result["best_value"] == pytest.approx(best_valid[winner.info.run_id])
    assert result["best_trial"] == int(winner.data.tags["search.trial"]) and result["best_trial_run"] == winner.info.run_id
    assert result["best_params"] == json.loads(winner.data.tags["search.params"])
    assert float(winner.data.params["train.lr"]) == pytest.approx(result["best_params"]["train.lr"])
    assert int(winner.data.params["model.dim"]) == result["best_params"]["model.dim"]
    assert result["trials"] == 3 and result["pruned"] == 0 and result["failed"] == []
    # the best config, once per seed
    assert sorted(r.data.tags["pipeline.key"] for r in best) == ["search/best/s0", "search/best/s1"]
    assert sorted(result["best_runs"]) == sorted(r.info.run_id for r in best)
    for r in best:
        assert r.info.status == "FINISHED" and r.data.params["train.seed"] == r.data.tags["pipeline.key"][-1]
        assert float(r.data.params["train.lr"]) == pytest.approx(result["best_params"]["train.lr"])
        assert int(r.data.params["model.dim"]) == result["best_params"]["model.dim"]
    logged = json.loads(Path(MlflowClient(uri).download_artifacts(parent, "search_best.json", str(tmp_path))).read_text())
    assert logged["best_params"] == result["best_params"] and logged["best_value"] == result["best_value"]
    assert logged["best_runs"] == {f"s{s}": run for s, run in zip([0, 1], result["best_runs"])}


LR = {"type": "float", "low": 0.001, "high": 0.01}


@pytest.mark.parametrize("spec, message", [
    ({"trials": 2, "space": {"train.lr": {"type": "uniform", "low": 0.001, "high": 0.01}}}, "search.space.train.lr.type"),
    ({"trials": 2, "space": {"train.lr": {"type": "float", "low": 0.01, "high": 0.01}}}, "search.space.train.lr: low"),
    ({"trials": 2, "space": {"train.lr": {"type": "float", "low": "fast", "high": 0.01}}}, "search.space.train.lr.low"),
    ({"trials": 2, "space": {"train.lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}}, "search.space.train.lr.low"),
    ({"trials": 2, "space": {"train.lr": {**LR, "lo": 1}}}, "search.space.train.lr: unknown key(s) ['lo']"),
    ({"trials": 2, "space": {"model.dim": {"type": "categorical", "choices": []}}}, "search.space.model.dim.choices"),
    ({"trials": 2, "space": {"model.hidden": {"type": "categorical", "choices": [[64], [128]]}}}, "search.space.model.hidden.choices"),
    ({"trials": 2, "space": {"train.lrr": LR}}, "search.space.train.lrr="),
    ({"trials": 2, "space": {"model.dim": {"type": "int", "low": 0, "high": 64}}}, "search.space.model.dim=0: model.dim"),
    ({"trials": 2, "space": {"model.dim": {"type": "int", "low": 8, "high": 64.5}}}, "search.space.model.dim.high"),
    ({"space": {"train.lr": LR}}, "search: no budget"),
    ({"trials": 0, "space": {"train.lr": LR}}, "search.trials"),
    ({"minutes": -1, "space": {"train.lr": LR}}, "search.minutes"),
    ({"trials": 2}, "search: missing key 'space'"),
    ({"trials": 2, "space": {}}, "search.space"),
    ({"trials": 2, "trails": 3, "space": {"train.lr": LR}}, "search: unknown key(s) ['trails']"),
    ({"trials": 2, "metric": "ndcg@5", "space": {"train.lr": LR}}, "search.metric"),
    ({"trials": 2, "metric": "auc@10", "space": {"train.lr": LR}}, "search.metric"),
    ({"trials": 2, "pruner": {"patience": 2}, "space": {"train.lr": LR}}, "search.pruner: unknown key(s) ['patience']"),
    ({"trials": 2, "enqueue": [{"train.lr": 0.5}], "space": {"train.lr": LR}}, "search.enqueue[0].train.lr"),
    ({"trials": 2, "enqueue": [{"model.dim": 8}], "space": {"train.lr": LR}}, "search.enqueue[0].model.dim"),
])
def test_a_bad_search_section_is_refused_before_any_trial(synthetic_files, tmp_path, spec, message):
    base, uri = _base(synthetic_files, tmp_path)
    with pytest.raises(ConfigError) as e:
        run_search(spec, base, NAME, uri, seeds=[0], overrides=[])
    assert message in str(e.value)
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # the store untouched: no parent, no trial


def test_a_trial_worse_than_the_median_is_pruned(synthetic_files, tmp_path):
    base, uri = _base(synthetic_files, tmp_path, epochs=2)
    spec = {"trials": 2, "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0},
            "space": {"train.lr": {"type": "categorical", "choices": [0.005, 1.0e-7]}},
            "enqueue": [{"train.lr": 0.005}, {"train.lr": "1e-7"}]}  # a good trial, then one that barely learns
    result = run_search(spec, base, NAME, uri, seeds=[0], overrides=[])

    parents, trials, best = _runs(uri)
    assert [json.loads(r.data.tags["search.params"])["train.lr"] for r in trials] == [0.005, 1e-7]
    good, bad = trials
    assert good.data.tags["search.pruned"] == "false" and len(_valid_history(uri, good.info.run_id)) == 2
    # pruned after its first epoch: the run stopped training, evaluated, and ended FINISHED, tagged
    assert bad.data.tags["search.pruned"] == "true" and bad.data.tags["search.pruned_epoch"] == "0"
    assert bad.info.status == "FINISHED" and len(_valid_history(uri, bad.info.run_id)) == 1
    assert "test.ndcg_at_10" in bad.data.metrics
    assert result["trials"] == 2 and result["pruned"] == 1 and result["best_params"] == {"train.lr": 0.005}
    assert result["best_value"] == pytest.approx(max(_valid_history(uri, good.info.run_id).values()))
    assert len(best) == 1 and parents[0].info.status == "FINISHED"


def test_a_search_resumes_from_its_runs(synthetic_files, tmp_path, monkeypatch):
    base, uri = _base(synthetic_files, tmp_path, epochs=1)
    spec = {"trials": 2, "pruner": False, "space": {"train.lr": {"type": "categorical", "choices": [0.005, 0.0123]}},
            "enqueue": [{"train.lr": 0.005}, {"train.lr": 0.0123}]}
    real_epoch = trainer_module.Trainer.train_epoch

    def failing_epoch(self, epoch):  # the second trial fails inside its run
        if self.optimizer.param_groups[0]["lr"] == 0.0123:
            raise RuntimeError("trial made to fail")
        return real_epoch(self, epoch)

    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", failing_epoch)
    first = run_search(spec, base, NAME, uri, seeds=[0], overrides=[])
    assert first["failed"] == ["search/trial-1"] and first["trials"] == 1 and first["best_params"] == {"train.lr": 0.005}
    parents, trials, best = _runs(uri)
    assert parents[0].info.status == "FAILED" and [r.info.status for r in trials] == ["FINISHED", "FAILED"]

    # the next invocation keeps trial 0, does not reuse the failed trial's number, runs one more
    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", real_epoch)
    second = run_search(spec, base, NAME, uri, seeds=[0], overrides=[])
    parents, trials, best = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [(r.data.tags["search.trial"], r.info.status) for r in trials] == [("0", "FINISHED"), ("1", "FAILED"), ("2", "FINISHED")]
    assert second["trials"] == 2 and second["failed"] == []
    if second["best_trial"] == 0:  # the same best config: its run is reused
        assert second["best_runs"] == first["best_runs"] and len(best) == 1
    else:  # a better one: trained anew, the earlier one marked superseded
        assert len(best) == 2 and second["best_runs"] != first["best_runs"]
        assert {r.info.run_id for r in best if r.data.tags.get("search.superseded") == "true"} == set(first["best_runs"])

    # nothing left: a third invocation trains nothing and selects the same
    third = run_search(spec, base, NAME, uri, seeds=[0], overrides=[])
    assert third["best_runs"] == second["best_runs"] and third["best_value"] == second["best_value"]
    assert len(_runs(uri)[1]) == 3
    # another space is another search: refused
    with pytest.raises(ConfigError, match="ran another search"):
        run_search({**spec, "space": {"train.lr": {"type": "categorical", "choices": [0.005, 0.02]}}, "enqueue": None},
                   base, NAME, uri, seeds=[0], overrides=[])
