"""Baselines: hand-computed scores, selection on validation only, and one tracked run."""

import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from mlflow.tracking import MlflowClient

from conftest import small_config
from recsys_hnm.baselines import ALS, BASELINES, EASE, Baseline, ItemKNN, MostPop, fit_final, make_baseline, tune
from recsys_hnm.experiment import run_baseline
from recsys_hnm.data import Interactions, fixed_split
from recsys_hnm.evaluation import Evaluator, phase_counts, popularity_scorer
from recsys_hnm.ops.ranking import top_k

# 4 users x 5 items; item columns: 0 {u0, u1}, 1 {u0, u2}, 2 {u1, u2}, 3 {u3}, 4 {u2, u3}
X = sp.csr_matrix(np.array([
    [1, 1, 0, 0, 0],
    [1, 0, 1, 0, 0],
    [0, 1, 1, 0, 1],
    [0, 0, 0, 1, 1],
], dtype=np.float32))
R2 = 1 / np.sqrt(2)


def _split(train, valid, test, n_items):
    """A fixed split from {user: [items]} per phase; raw ids = indices (every user and item present)."""
    rows = [(u, i, phase) for phase, part in (("train", train), ("valid", valid), ("test", test))
            for u, items in part.items() for i in items]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "phase"])
    split = fixed_split(Interactions.from_frames(frame, keep_columns=("phase",)))
    assert split.data.n_items == n_items and (split.data.items.raw == np.arange(n_items)).all()
    return split


def _scores(model, users=(0, 1, 2, 3)):
    return model(torch.tensor(users)).numpy()


# -- MostPop ------------------------------------------------------------------------------------

def test_mostpop_counts_users_per_item_and_ties_go_to_the_lower_index():
    model = MostPop().fit(X * 3)  # weights ignored: users per item
    assert model.counts.tolist() == [2, 2, 2, 1, 2]
    s = model(torch.tensor([0, 3]))
    assert s.shape == (2, 5) and (s[0] == s[1]).all()
    assert top_k(s, 5)[0][0].tolist() == [0, 1, 2, 4, 3]


def test_mostpop_fit_on_known_equals_the_phase_counts_the_evaluator_uses():
    split = _split({0: [0, 1], 1: [1, 2], 2: [2, 3]}, {0: [2], 1: [3], 2: [0]}, {0: [3], 1: [0], 2: [1]}, 4)
    for phase in ("valid", "test"):
        ev = Evaluator(split, phase, ks=[1, 2])
        assert ev.evaluate(MostPop().fit(split.known(phase))) == ev.evaluate(popularity_scorer(phase_counts(split, phase)))


# -- ItemKNN ------------------------------------------------------------------------------------

def test_itemknn_cosine_by_hand():
    sim = ItemKNN(k=100).fit(X).similarity.toarray()
    expected = np.array([  # co-occurrences / (norm_i norm_j); item 3 has one user
        [0, .5, .5, 0, 0],
        [.5, 0, .5, 0, .5],
        [.5, .5, 0, 0, .5],
        [0, 0, 0, 0, R2],
        [0, .5, .5, R2, 0],
    ])
    assert np.allclose(sim, expected)
    assert np.allclose(_scores(ItemKNN(k=100).fit(X))[0], [.5, .5, 1, 0, .5])  # user 0: rows 0 + 1


def test_itemknn_keeps_top_k_per_column_ties_to_lower_index_and_shrinks():
    # k=1: column j keeps its best neighbour i; columns 0, 1, 2 tie at .5 -> lowest row
    sim = ItemKNN(k=1).fit(X).similarity.toarray()
    expected = np.zeros((5, 5))
    expected[1, 0] = expected[0, 1] = expected[0, 2] = .5
    expected[4, 3] = expected[3, 4] = R2
    assert np.allclose(sim, expected)
    scores = _scores(ItemKNN(k=1).fit(X))
    assert np.allclose(scores[0], [.5, .5, .5, 0, 0]) and np.allclose(scores[3], [0, 0, 0, R2, R2])
    shrunk = ItemKNN(k=100, shrink=1.0).fit(X).similarity.toarray()
    assert np.isclose(shrunk[0, 1], 1 / 3) and np.isclose(shrunk[3, 4], 1 / (np.sqrt(2) + 1))


def test_itemknn_validation_metric_by_hand():
    split = _split({0: [0, 1], 1: [0, 2], 2: [1, 2, 4], 3: [3, 4]}, {0: [2], 1: [4]}, {0: [3], 1: [1]}, 5)
    ev = Evaluator(split, "valid", ks=[1])
    # user 0: [.5, .5, 1, 0, .5], items 0, 1 masked -> item 2: hit
    # user 1: rows 0 + 2 = [.5, 1, .5, 0, .5], items 0, 2 masked -> item 1: miss (valid item 4)
    assert ev.evaluate(ItemKNN(k=100).fit(split.known("valid")))["ndcg@1"] == pytest.approx(0.5)


def test_itemknn_sparse_blocks_equal_a_dense_reference():
    rng = np.random.default_rng(0)
    dense = (rng.random((30, 50)) < 0.15).astype(np.float64)
    dense[:, 7] = 0  # an item nobody has
    dense[5] = 0  # a user with no history
    k, shrink = 4, 2.0
    # tiny blocks: many of them, and single items above the budget
    model = ItemKNN(k=k, shrink=shrink, block_products=20).fit(sp.csr_matrix(dense))
    gram = dense.T @ dense
    norms = np.sqrt((dense ** 2).sum(0))
    full = gram / (norms[:, None] * norms[None, :] + shrink)
    np.fill_diagonal(full, 0)
    ref = np.zeros_like(full)
    for j in range(50):  # per column: k largest, equal values to the lower row
        best = sorted(range(50), key=lambda i: (-full[i, j], i))[:k]
        ref[best, j] = full[best, j]
    assert np.allclose(model.similarity.toarray(), ref, atol=1e-6)
    assert np.allclose(_scores(model, range(30)), dense @ ref, atol=1e-5)
    assert np.allclose(model.similarity.toarray(), ItemKNN(k=k, shrink=shrink).fit(sp.csr_matrix(dense)).similarity.toarray())


# -- EASE ---------------------------------------------------------------------------------------

def test_ease_weights_equal_a_numpy_inversion():
    x = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=np.float64)
    lam = 2.0
    p = np.linalg.inv(x.T @ x + lam * np.eye(3))
    b = np.eye(3) - p @ np.diag(1 / np.diag(p))
    assert np.allclose(np.diag(b), 0)
    model = EASE(lam=lam).fit(sp.csr_matrix(x))
    assert np.allclose(model.weights, b, atol=1e-5)
    assert np.allclose(_scores(model), x @ b, atol=1e-5)


def test_ease_refuses_a_large_catalog_naming_its_size():
    with pytest.raises(ValueError, match="30,001 items"):
        EASE().fit(sp.csr_matrix((3, 30_001), dtype=np.float32))
    with pytest.raises(ValueError, match="5 items, above max_items=4"):
        EASE(max_items=4).fit(X)


# -- ALS ----------------------------------------------------------------------------------------

def _blocks():
    """40 users x 20 items: users 0-19 take 5 of items 0-9, users 20-39 5 of items 10-19."""
    rng = np.random.default_rng(1)
    m = np.zeros((40, 20), np.float32)
    for u in range(40):
        base = 0 if u < 20 else 10
        m[u, base + rng.choice(10, 5, replace=False)] = 1
    return sp.csr_matrix(m)


def test_als_recommends_within_the_users_block_and_is_reproducible():
    pytest.importorskip("implicit")
    x = _blocks()
    model = ALS(factors=4, regularization=0.1, alpha=1.0, iterations=10).fit(x)
    scores = model(torch.arange(40))
    scores[torch.from_numpy(x.toarray() > 0)] = float("-inf")
    top = top_k(scores, 3)[0].numpy()
    block = np.arange(40)[:, None] >= 20
    assert ((top >= 10) == block).all()
    again = ALS(factors=4, regularization=0.1, alpha=1.0, iterations=10).fit(x)
    assert torch.allclose(model.item_factors, again.item_factors)


def test_als_without_implicit_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "implicit", None)
    monkeypatch.setitem(sys.modules, "implicit.als", None)
    with pytest.raises(ImportError, match=r"recsys-hnm\[baselines\]"):
        ALS().fit(X)


# -- factory and tuning -------------------------------------------------------------------------

def test_make_baseline_refuses_unknown_names_and_hyperparameters():
    assert isinstance(make_baseline("ItemKNN", k=3), ItemKNN)
    assert make_baseline("ease", lam=5.0).params() == {"lam": 5.0, "max_items": 30_000}
    with pytest.raises(ValueError, match="unknown baseline 'slim'"):
        make_baseline("slim")
    with pytest.raises(ValueError, match=r"no hyperparameter\(s\) \['lambda'\]"):
        make_baseline("ease", **{"lambda": 5.0})
    with pytest.raises(RuntimeError, match="fit"):
        ItemKNN()(torch.tensor([0]))


class _Fixed(Baseline):
    """Puts one item first for everyone; records what it was fit on."""

    name = "fixed"
    fitted: list = []

    def __init__(self, item: int = 0):
        self.item = item

    def fit(self, matrix):
        _Fixed.fitted.append(matrix.nnz)
        n = matrix.shape[1]
        self._score = lambda users: torch.nn.functional.one_hot(torch.full((len(users),), self.item), n).float()
        return self


def test_tune_selects_on_validation_and_refits_on_train_plus_valid(monkeypatch):
    monkeypatch.setitem(BASELINES, "fixed", _Fixed)
    monkeypatch.setattr(_Fixed, "fitted", [])
    # every user: validation item 4, test item 5; test would prefer item=5, validation item=4
    split = _split({u: [u] for u in range(4)}, {u: [4] for u in range(4)}, {u: [5] for u in range(4)}, 6)
    best, table = tune("fixed", split, {"item": [5, 4]}, ks=[1], metric="ndcg@1")
    assert best == {"item": 4}
    assert [row["valid"]["ndcg@1"] for row in table] == [0.0, 1.0]
    assert _Fixed.fitted == [4, 4]  # tuning saw train only
    model, _ = fit_final("fixed", best, split)
    assert _Fixed.fitted[-1] == 8  # train + valid
    test = Evaluator(split, "test", ks=[1])
    assert test.evaluate(model)["ndcg@1"] == 0.0  # the test-best point was not chosen
    assert test.evaluate(_Fixed(5).fit(split.known("test")))["ndcg@1"] == 1.0
    with pytest.raises(ValueError, match="recall@5"):
        tune("fixed", split, {"item": [4]}, ks=[1], metric="recall@5")


def test_tune_ties_keep_the_first_grid_point():
    split = _split({0: [0, 1], 1: [0, 2], 2: [1, 2, 4], 3: [3, 4]}, {0: [2], 1: [4]}, {0: [3], 1: [1]}, 5)
    best, table = tune("itemknn", split, {"k": [50, 100]}, ks=[1, 2], metric="ndcg@1")  # equal on 5 items
    assert best == {"k": 50} and len(table) == 2
    assert table[0]["valid"] == table[1]["valid"]


# -- tracked run --------------------------------------------------------------------------------

def test_run_baseline_logs_one_finished_run(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path, tracking={"tags": {"variant": "knn", "model": "not-this"}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = run_baseline(config, "itemknn", grid={"k": [10, 50]}, uri=uri)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED" and run.info.run_name == "itemknn"
    tags = run.data.tags
    assert tags["model"] == "itemknn" and tags["baseline"] == "true" and tags["config_name"] == "test"
    assert tags["dataset"] == str(synthetic_files["train"]) and tags["variant"] == "knn"  # config tags kept
    assert run.data.params["baseline.k"] == str(out["params"]["k"])
    metrics = run.data.metrics
    assert {"valid.ndcg_at_10", "test.ndcg_at_10", "test.recall_at_20", "fit_s"} <= set(metrics)
    assert metrics["test.ndcg_at_10"] == pytest.approx(out["test"]["ndcg@10"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"tuning.json", "per_user_test.parquet"} <= artifacts
    tuning = client.download_artifacts(run.info.run_id, "tuning.json", str(tmp_path))
    assert len(pd.read_json(tuning, typ="series")["points"]) == 2
    per_user = pd.read_parquet(client.download_artifacts(run.info.run_id, "per_user_test.parquet", str(tmp_path)))
    assert "user_id" in per_user and per_user["ndcg@10"].mean() == pytest.approx(out["test"]["ndcg@10"])
    # the same numbers as an independent refit on train + valid scored by the test evaluator
    from recsys_hnm.experiment import load_data

    _, split = load_data(config)
    again = Evaluator(split, "test", config.eval.ks).evaluate(ItemKNN(**out["params"]).fit(split.known("test")))
    assert again == pytest.approx(out["test"])


def test_run_baseline_failure_ends_the_run_failed(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="max_items=10"):
        run_baseline(config, "ease", grid={"lam": [10.0], "max_items": [10]}, uri=uri)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED" and "max_items" in run.data.tags["error"]
    with pytest.raises(ValueError, match="unknown baseline"):  # refused before a run exists
        run_baseline(config, "slim", uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1
