import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import small_config
from recsys_hnm.cli import main
from recsys_hnm.experiment import build_sampler, build_trainer, evaluate_run, load_data, load_run, recommend, train
from recsys_hnm.models import model_scorer
from recsys_hnm.training import Callback


def test_training_beats_mostpop_and_is_tracked(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path)
    result = train(config)
    assert result.test["ndcg@10"] > 1.5 * result.mostpop_test["ndcg@10"]
    assert result.test["map@10"] > result.mostpop_test["map@10"]
    client = MlflowClient(config.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.005" and run.data.params["sampler.num_negatives"] == "64"
    assert run.data.tags["sampler_mix"] == "in_batch=1,uniform=1" and "git_commit" in run.data.tags
    assert len(client.get_metric_history(result.run_id, "valid.ndcg_at_10")) == 4
    assert len(client.get_metric_history(result.run_id, "epoch_s")) == 4
    assert run.data.metrics["test.ndcg_at_10"] == pytest.approx(result.test["ndcg@10"])
    assert "mostpop.test.ndcg_at_10" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "model.pt", "metrics.png", "data_report.json", "per_user_test.parquet"} <= artifacts
    (logged,) = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{result.run_id}'")
    assert logged.name == "recommender"  # the serving pyfunc
    # the logged model reproduces the logged test metrics
    again = evaluate_run(result.run_id, config.tracking.uri)
    assert again["ndcg@10"] == pytest.approx(result.test["ndcg@10"], abs=1e-6)


class Crash(Callback):
    def __init__(self, at_epoch):
        self.at_epoch = at_epoch

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == self.at_epoch:
            raise RuntimeError("simulated crash")


def test_failed_run_is_failed_and_resume_matches_uninterrupted(synthetic_files, tmp_path):
    full = train(small_config(synthetic_files, tmp_path / "full", name="full"))
    config = small_config(synthetic_files, tmp_path / "cut", name="cut")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, extra_callbacks=[Crash(at_epoch=1)])
    client = MlflowClient(config.tracking.uri)
    (crashed,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert crashed.info.status == "FAILED"
    assert "simulated crash" in crashed.data.tags["error"]
    resumed = train(config, resume=True)
    assert resumed.run_id == crashed.info.run_id
    assert resumed.test == pytest.approx(full.test, abs=1e-6)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history], abs=1e-6)
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


def test_resume_refuses_a_different_config(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path, name="x", train={"epochs": 1})
    train(config)
    changed = small_config(synthetic_files, tmp_path, name="x", train={"epochs": 1, "lr": 0.01})
    with pytest.raises(ValueError, match=r"train.lr=0.005, not 0.01"):
        train(changed, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small_config(synthetic_files, tmp_path, name="never-ran"), resume=True)


def test_recommend_views_and_users(synthetic_files, tmp_path, capsys):
    config = small_config(synthetic_files, tmp_path, train={"epochs": 1})
    run_id = train(config).run_id
    loaded = load_run(run_id, config.tracking.uri)
    split = loaded.split

    def pairs(recs):
        return loaded.data.users.to_index(recs["user_id"]), loaded.data.items.to_index(recs["item_id"])

    # test view (default): train + valid items are masked, test items may come back
    recs = recommend(run_id, 20, uri=config.tracking.uri)
    u, i = pairs(recs)
    assert np.asarray(split.known("test")[u, i]).ravel().sum() == 0
    assert recs.groupby("user_id")["rank"].apply(list).map(lambda r: r == list(range(1, 21))).all()
    assert recs["user_id"].nunique() == len(split.test["user"].unique())
    assert np.asarray(split.matrix("test")[u, i]).ravel().sum() > 0  # the view evaluation scores
    # serving view: nothing the user has, test items included
    served = recommend(run_id, 20, uri=config.tracking.uri, history="all")
    u, i = pairs(served)
    everything = split.known("test") + split.matrix("test")
    assert np.asarray(everything[u, i]).ravel().sum() == 0
    # requested users: duplicates served once; unknown and non-numeric ids reported, the rest served
    known_ids = recs["user_id"].unique()[:2].tolist()
    out = recommend(run_id, 5, [known_ids[0], known_ids[0], 999999, known_ids[1]], uri=config.tracking.uri)
    assert out["user_id"].tolist() == [known_ids[0]] * 5 + [known_ids[1]] * 5
    assert out.attrs["unknown_users"] == [999999]
    users = tmp_path / "users.csv"
    users.write_text("user_id\n" + "\n".join(map(str, known_ids)) + "\nnot-a-user\n")
    out_path = tmp_path / "recs.parquet"
    args = ["recommend", "--run-id", run_id, "--k", "5", "--output", str(out_path), "--users", str(users), "--tracking-uri", config.tracking.uri]
    assert main(args) == 0
    assert sorted(pd.read_parquet(out_path)["user_id"].unique().tolist()) == sorted(known_ids)
    pd.DataFrame({"user_id": [999999]}).to_csv(users, index=False)
    assert main(args) == 2  # nobody to serve
    assert "none of the 1 requested user ids" in capsys.readouterr().err


def test_cli_train_prints_run_id_last_and_evaluate_prints_json(synthetic_files, tmp_path, capsys):
    config = small_config(synthetic_files, tmp_path, train={"epochs": 1})
    import yaml

    path = tmp_path / "c.yaml"
    raw = config.to_dict()
    for key in ("train", "valid", "test", "items"):
        raw["data"][key] = None
    raw["data"]["dataset"] = None
    path.write_text(yaml.safe_dump(raw))
    f = synthetic_files
    code = main(["train", "--config", str(path), "--train", str(f["train"]), "--valid", str(f["valid"]),
                 "--test", str(f["test"]), "--items", str(f["items"]), "--set", "train.epochs=1"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("run_id=")
    assert main(["evaluate", "--run-id", last[len("run_id="):], "--tracking-uri", config.tracking.uri]) == 0
    assert '"ndcg@10"' in capsys.readouterr().out
    assert main(["evaluate", "--run-id", "0" * 32, "--tracking-uri", config.tracking.uri]) == 2
    assert "not found" in capsys.readouterr().err


def test_with_logq_scores_learn_log_popularity_as_the_full_softmax_does(tmp_path):
    # users independent of items, item popularity Zipf(1): the full-softmax optimum is
    # score(u, j) = log p(j) + c(u). Sampled softmax with the logQ correction gets there (the item
    # bias and the embeddings together); without it, in-batch negatives cancel popularity.
    rng = np.random.default_rng(0)
    n_items, per = 200, 8
    p = 1.0 / np.arange(1, n_items + 1)
    phases = {"train": [], "valid": [], "test": []}
    for u in range(3000):
        items = rng.choice(n_items, size=per + 2, replace=False, p=p / p.sum())
        phases["train"] += [(u, int(i), t) for t, i in enumerate(items[:-2])]
        phases["valid"].append((u, int(items[-2]), per))
        phases["test"].append((u, int(items[-1]), per + 1))
    paths = {}
    for phase, rows in phases.items():
        paths[phase] = tmp_path / f"{phase}.csv"
        pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(paths[phase], index=False)
    paths["items"] = tmp_path / "items.csv"
    pd.DataFrame({"item_id": np.arange(n_items), "category": 0}).to_csv(paths["items"], index=False)
    slopes = {}
    for logq in ("mixture", "none"):
        config = small_config(paths, tmp_path, model={"dim": 16, "hidden": [], "item_bias": True, "user_id": False, "history_len": 10},
                              sampler={"num_negatives": 32, "logq": logq, "mixture": {"in_batch": 1.0}},
                              train={"epochs": 5, "batch_size": 256, "lr": 0.01, "patience": 0, "progress": False,
                                     "checkpoint_dir": str(tmp_path / "ckpt")})
        data, split = load_data(config)
        trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path, validate=False)
        trainer.fit()
        counts = np.bincount(split.train["item"].to_numpy(), minlength=data.n_items)
        mean_score = model_scorer(trainer.model, trainer.features)(torch.arange(data.n_users)).mean(0).numpy()
        seen = counts > 0
        slopes[logq] = np.polyfit(np.log(counts[seen]), mean_score[seen], 1)[0]
    assert 0.8 < slopes["mixture"] < 1.25, slopes
    assert slopes["none"] < 0.4, slopes


@pytest.mark.parametrize("optimizer", ["sparse_adam", "adam"])
def test_sparse_adam_moves_only_the_rows_a_step_looked_up(synthetic_files, tmp_path, optimizer):
    config = small_config(synthetic_files, tmp_path, train={"embedding_optimizer": optimizer, "embedding_lr": 0.01})
    data, split = load_data(config)
    trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path, validate=False)
    model = trainer.model
    looked_up = []
    forward = model.ebc.forward

    def recording(features):
        looked_up.append(torch.cat([features["history"].values(), features["item_id"].values()]))
        return forward(features)

    model.ebc.forward = recording
    table = model.ebc.embedding_bags["item_table"].weight
    for step in range(2):
        looked_up.clear()
        before = table.detach().clone()
        rows = slice(step * 256, (step + 1) * 256)
        trainer.train_step(trainer.users[rows], trainer.items[rows])
    moved = set(torch.nonzero((table.detach() != before).any(1)).squeeze(1).tolist())
    step_rows = set(torch.cat(looked_up).tolist())
    assert moved and step_rows < set(range(data.n_items))
    # lazy Adam leaves alone the rows the second step did not touch; dense Adam keeps moving
    # every row the first step gave momentum
    assert (moved <= step_rows) == (optimizer == "sparse_adam")


def test_adagrad_takes_sparse_gradients_with_the_dense_update(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path, train={"embedding_optimizer": "adagrad", "embedding_lr": 0.05})
    data, split = load_data(config)
    tables = []
    for sparse in (True, False):
        trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path, validate=False)
        for bag in trainer.model.ebc.embedding_bags.values():
            assert bag.sparse  # the trainer asked for sparse gradients
            bag.sparse = sparse
        for step in range(3):
            rows = slice(step * 256, (step + 1) * 256)
            trainer.train_step(trainer.users[rows], trainer.items[rows])
        tables.append(trainer.model.ebc.embedding_bags["item_table"].weight.detach())
    # float32 rounding of the two paths differs by CPU (3e-6 on one machine after 3 steps that move
    # rows by 0.15); a wrong update differs by orders of magnitude more
    assert torch.allclose(tables[0], tables[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("edit", ["same ids, one item changed", "a new user"])
def test_resume_refuses_changed_data_and_leaves_the_run_as_it_was(synthetic_files, tmp_path, edit):
    import shutil

    import mlflow

    files = {k: tmp_path / f"{k}.csv" for k in ("train", "valid", "test", "items")}
    for k, path in files.items():
        shutil.copy(synthetic_files[k], path)
    config = small_config(files, tmp_path, name="fp", train={"epochs": 1})
    run_id = train(config).run_id
    frame = pd.read_csv(files["train"])
    if edit == "a new user":
        frame = pd.concat([frame, frame.iloc[:3].assign(user_id=frame["user_id"].max() + 1)])
    else:
        frame.loc[0, "item_id"] = frame.loc[frame["item_id"] != frame.loc[0, "item_id"], "item_id"].iloc[0]
    frame.to_csv(files["train"], index=False)
    mlflow.set_tracking_uri(config.tracking.uri)
    before = mlflow.get_run(run_id)
    with pytest.raises(ValueError, match=rf"run {run_id}: its input data .* changed since the run was trained; refusing to resume"):
        train(config, resume=run_id)
    after = mlflow.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.tags == before.data.tags
