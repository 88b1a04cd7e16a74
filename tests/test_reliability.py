"""Reproducibility, early stopping, resume with ANN pools, the index artifact, run lifecycle."""

import logging
import os
import signal
import tempfile

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import small_config
from recsys_hnm.config import ConfigError
from recsys_hnm.data import leave_last_out, synthetic
from recsys_hnm.evaluation import phase_counts, popularity_scorer
from recsys_hnm.experiment import checkpoint_path, load_run, train
from recsys_hnm.index import load_index
from recsys_hnm.models import FeatureBuilder, TowerSizes, TwoTower, item_embeddings
from recsys_hnm.sampling import InBatchSampler, KnownPositives, MixtureSampler, UniformSampler
from recsys_hnm.sampling.diagnostics import NegativeDiagnostics
from recsys_hnm.tracking import download
from recsys_hnm.training import Callback, EarlyStopping, Trainer, TrainOptions

ANN = {"num_negatives": 64, "mixture": {"in_batch": 1.0, "uniform": 0.5, "ann": 0.5},
       "ann": {"window": [5, 50], "warmup_epochs": 1, "backend": "annoy", "n_trees": 5, "n_jobs": 1, "recall_sample": 50}}


def test_same_config_and_seed_give_identical_metrics(synthetic_files, tmp_path):
    a = train(small_config(synthetic_files, tmp_path / "a", train={"epochs": 2}))
    b = train(small_config(synthetic_files, tmp_path / "b", train={"epochs": 2}))
    assert a.test == b.test  # exactly, not approximately
    drop_times = lambda h: [{k: v for k, v in e.items() if not k.endswith("_s")} for e in h]  # noqa: E731
    assert drop_times(a.history) == drop_times(b.history)


# -- a bare Trainer on synthetic data ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    data = synthetic(120, 200, 3000, n_categories=5, seed=1)
    return data, leave_last_out(data)


def _trainer(tiny, evaluator, *, diagnostics=None, callbacks=(), temperature=0.1, learn=False, epochs=2):
    data, split = tiny
    torch.manual_seed(0)
    model = TwoTower(TowerSizes(data.n_users, data.n_items, data.n_categories), dim=16, hidden=[16],
                     temperature=temperature, learn_temperature=learn)
    counts = np.bincount(split.train["item"], minlength=data.n_items)
    sampler = MixtureSampler({"in_batch": InBatchSampler(counts), "uniform": UniformSampler(data.n_items)},
                             {"in_batch": 1.0, "uniform": 1.0}, 32, KnownPositives(split.matrix("train")))
    features = FeatureBuilder(split.history("train"), data.n_users, data.item_categories, 20)
    return Trainer(model, features, sampler, split.train, evaluator, options=TrainOptions(epochs=epochs, batch_size=256, lr=0.01, progress=False),
                   callbacks=list(callbacks), diagnostics=diagnostics)


class Scripted:
    """An evaluator whose validation metric follows a script."""

    def __init__(self, values):
        self.values = list(values)

    def evaluate(self, scorer):
        return {"ndcg@10": self.values.pop(0)}


class Snapshot(Callback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, trainer, epoch, logs):
        self.weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})


def test_early_stopping_stops_and_restores_the_best_epoch(tiny):
    snap = Snapshot()
    trainer = _trainer(tiny, Scripted([0.1, 0.3, 0.2, 0.25, 0.9]), callbacks=[EarlyStopping("valid.ndcg@10", 2), snap], epochs=5)
    history = trainer.fit()
    assert len(history) == 4  # epochs 2 and 3 did not beat epoch 1: stop after epoch 3
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], snap.weights[1][k]) for k in final)
    assert not all(torch.equal(final[k], snap.weights[3][k]) for k in final)


def test_diagnostics_never_change_the_training_draws(tiny):
    data, split = tiny
    losses = []
    for diagnostics in (None, NegativeDiagnostics(["in_batch", "uniform"], None, data.n_items, rank_sample=512),
                        NegativeDiagnostics(["in_batch", "uniform"], None, data.n_items, rank_sample=64)):
        trainer = _trainer(tiny, Scripted([0.0, 0.0]), diagnostics=diagnostics)
        losses.append([h["train_loss"] for h in trainer.fit()])
    assert losses[0] == losses[1] == losses[2]


def test_a_fixed_temperature_is_used_as_configured(tiny):
    for t in (0.005, 2.0, 5.0):
        model = _trainer(tiny, None, temperature=t).model
        assert float(model.scale) == pytest.approx(1 / t) and model.temperature == pytest.approx(t)
        assert not model.temperature_at_bound()


def test_a_learned_temperature_is_bounded_and_says_so(tiny, caplog):
    trainer = _trainer(tiny, Scripted([0.0]), learn=True, epochs=1)
    with torch.no_grad():
        trainer.model.log_temperature.fill_(np.log(1e-4))  # far below the bound
    assert float(trainer.model.scale.detach()) == pytest.approx(100.0) and trainer.model.temperature_at_bound()
    with caplog.at_level(logging.WARNING, logger="recsys_hnm"):
        history = trainer.fit()
    assert history[0]["temperature"] == pytest.approx(0.01)
    assert "sits at a bound" in caplog.text
    with pytest.raises(ValueError, match="learned temperature starts within"):
        _trainer(tiny, None, temperature=5.0, learn=True)


def test_config_refuses_a_learned_temperature_out_of_range(synthetic_files, tmp_path):
    with pytest.raises(ConfigError, match=r"model.temperature: a learned temperature starts within \[0.01, 1.0\]"):
        small_config(synthetic_files, tmp_path, model={"temperature": 3.0, "learn_temperature": True})  # before any run
    assert not (tmp_path / "mlruns").exists()


# -- experiments with ANN pools -------------------------------------------------------------------

class Crash(Callback):
    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 2:
            raise RuntimeError("simulated crash")


def _index_matches_model(run_id, uri):
    run = load_run(run_id, uri)
    with tempfile.TemporaryDirectory() as tmp:
        download(run_id, "index", uri, tmp)
        index = load_index(os.path.join(tmp, "index", "items.index"))
        stored = np.array([index.index.get_item_vector(i) for i in range(index.n_items)], dtype=np.float32)
    expected = item_embeddings(run.model, run.features).numpy()
    return float(np.abs(stored - expected).max())


def test_resume_with_ann_pools_and_early_stopping_matches_an_uninterrupted_run(synthetic_files, tmp_path):
    sections = {"sampler": ANN, "train": {"epochs": 4, "patience": 2}}
    full = train(small_config(synthetic_files, tmp_path / "full", name="full", **sections))
    config = small_config(synthetic_files, tmp_path / "cut", name="cut", **sections)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, extra_callbacks=[Crash()])
    resumed = train(config, resume=True)
    assert resumed.test == full.test
    keys = ["train_loss", "valid.ndcg@10", "ann.recall_at_k", "ann.pool_overlap", "neg.ann.score"]
    np.testing.assert_equal([[h.get(k) for k in keys] for h in resumed.history], [[h.get(k) for k in keys] for h in full.history])
    assert any("ann.recall_at_k" in h for h in full.history)
    run = MlflowClient(config.tracking.uri).get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags  # the old failure is gone
    # the index artifact is the final (best-epoch) model's, not the one built before the last epoch
    assert _index_matches_model(resumed.run_id, config.tracking.uri) < 1e-5


def test_each_run_keeps_its_own_checkpoint(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path, train={"epochs": 3})
    with pytest.raises(RuntimeError):
        train(config, extra_callbacks=[Crash()])
    (crashed,) = (tmp_path / "ckpt" / "test").glob("*/last.pt")
    before = crashed.read_bytes()
    other = train(small_config(synthetic_files, tmp_path, train={"epochs": 1}))  # same name, new run
    assert checkpoint_path(config, other.run_id) != crashed and crashed.read_bytes() == before
    # the interrupted run is still resumable by its id; another store does not know it
    crashed_id = crashed.parent.name
    elsewhere = small_config(synthetic_files, tmp_path, train={"epochs": 3}, tracking={"uri": f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"})
    with pytest.raises(ConfigError, match="was written for tracking.uri="):
        train(elsewhere, resume=crashed_id)
    assert train(config, resume=crashed_id).run_id == crashed_id


class Term(Callback):
    def on_epoch_end(self, trainer, epoch, logs):
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_ends_the_run_killed(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path, train={"epochs": 2})
    with pytest.raises(BaseException, match="signal"):
        train(config, extra_callbacks=[Term()])
    client = MlflowClient(config.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is not left behind


def test_mostpop_at_test_counts_train_and_validation(tiny):
    data, split = tiny
    counts = phase_counts(split, "test")
    expected = np.zeros(data.n_items)
    for frame in (split.train, split.valid):
        for item in frame.drop_duplicates(["user", "item"])["item"]:
            expected[item] += 1
    assert np.array_equal(counts, expected)
    assert np.array_equal(phase_counts(split, "valid"), np.bincount(split.train.drop_duplicates(["user", "item"])["item"], minlength=data.n_items))
    assert popularity_scorer(counts)(torch.tensor([0, 1])).shape == (2, data.n_items)


def test_a_run_refuses_input_files_that_changed(synthetic_files, tmp_path):
    files = {k: tmp_path / p.name for k, p in synthetic_files.items()}
    for k, p in synthetic_files.items():
        files[k].write_bytes(p.read_bytes())
    config = small_config(files, tmp_path, train={"epochs": 1})
    run_id = train(config).run_id
    assert load_run(run_id, config.tracking.uri).model is not None  # unchanged files: fine
    lines = files["train"].read_text().splitlines()
    first_user = lines[1].split(",")[0]
    renamed = [lines[0]] + [",".join(["999999" if f == first_user and i == 0 else f for i, f in enumerate(line.split(","))]) for line in lines[1:]]
    files["train"].write_text("\n".join(renamed) + "\n")
    with pytest.raises(Exception, match="input data .* changed since the run was trained"):
        load_run(run_id, config.tracking.uri)


def _start_run_on(uri, queue):
    from recsys_hnm.tracking import tracked_run

    try:
        with tracked_run(uri, "race") as run:
            queue.put(run.info.run_id)
    except Exception as e:  # reported to the parent, which fails the test
        queue.put(f"error: {e}")


def test_two_runs_starting_together_on_a_fresh_store_both_succeed(tmp_path):
    import multiprocessing as mp

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_start_run_on, args=(uri, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(not r.startswith("error") for r in results), results
    assert len(set(results)) == 2


def test_causal_training_history_trains_end_to_end(synthetic_files, tmp_path):
    result = train(small_config(synthetic_files, tmp_path, train={"epochs": 2}, model={"train_history": "causal"}))
    assert result.test["ndcg@10"] > result.mostpop_test["ndcg@10"]


def test_refit_on_train_and_validation_for_the_selected_epochs(synthetic_files, tmp_path):
    from recsys_hnm.experiment import evaluate_run

    config = small_config(synthetic_files, tmp_path, train={"epochs": 3, "refit": True})
    result = train(config)
    run = MlflowClient(config.tracking.uri).get_run(result.run_id)
    best = int(run.data.tags["best_epoch"])
    assert run.data.metrics["refit.epochs"] == best + 1
    # the logged model is the refit one: evaluating it again gives the logged test metrics
    assert evaluate_run(result.run_id, config.tracking.uri)["ndcg@10"] == pytest.approx(result.test["ndcg@10"], abs=1e-6)
    plain = train(small_config(synthetic_files, tmp_path / "plain", train={"epochs": 3}))
    assert plain.test != result.test  # trained on more data, it is another model
