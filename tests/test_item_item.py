"""The item-item head beside the towers: pruning, the blend, its choice on validation, and the
run that logs, reloads and serves it."""

from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import small_config, write_split
from recsys_hnm import TwoTowerRecommender
from recsys_hnm.baselines import EASE, MostPop
from recsys_hnm.config import ConfigError, load_config
from recsys_hnm.data import ratio_split, synthetic
from recsys_hnm.experiment import evaluate_run, load_run, recommend, train
from recsys_hnm.experiment.run import choose_item_item
from recsys_hnm.baselines.item_item import ItemItemHead, fit_weights, head_kinds, prune_columns, standardize


def test_prune_keeps_each_columns_largest_magnitudes_dense_and_sparse():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 30)).astype(np.float32)
    w[rng.random(w.shape) < 0.3] = 0.0
    for given in (w, sp.csr_matrix(w)):
        pruned = prune_columns(given, 5, block=7).toarray()
        for j in range(w.shape[1]):
            col = w[:, j]
            keep = np.argsort(-np.abs(col), kind="stable")[:5]
            keep = keep[col[keep] != 0]
            expected = np.zeros_like(col)
            expected[keep] = col[keep]
            np.testing.assert_array_equal(pruned[:, j], expected)
    assert prune_columns(w, 100).nnz == np.count_nonzero(w)  # nothing to prune: only zeros dropped


def test_unpruned_ease_head_is_the_ease_baseline():
    x = sp.random(50, 20, density=0.3, random_state=1, format="csr")
    x.data[:] = 1.0
    np.testing.assert_allclose(fit_weights("ease", {"lam": 10.0}, x, keep=20).toarray(), EASE(10.0).fit(x).weights, atol=1e-6)
    assert head_kinds("auto", 30_000, 30_000) == ("ease", "mostpop")
    assert head_kinds("auto", 30_001, 30_000) == ("itemknn", "mostpop") and head_kinds("ease", 9, 1) == ("ease",)


def test_blend_is_the_weighted_sum_of_each_sides_standardised_scores():
    rng = np.random.default_rng(2)
    towers_scores = torch.from_numpy(rng.normal(size=(6, 8)).astype(np.float32)) * 5 + 3
    dense = (rng.random((6, 8)) < 0.3).astype(np.float32)
    dense[5] = 0  # no history: the item-item side is constant, standardised to zeros
    history = sp.csr_matrix(dense)
    weights = sp.csr_matrix(rng.normal(size=(8, 8)).astype(np.float32))
    head = ItemItemHead("ease", {"lam": 1.0}, 0.3, weights)
    got = head.scorer(lambda u: towers_scores[u], history)(torch.arange(6)).numpy()

    def z(a):
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-6)

    expected = 0.7 * z(towers_scores.numpy()) + 0.3 * z(history.toarray() @ weights.toarray())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[5], 0.7 * z(towers_scores.numpy())[5], atol=1e-6)
    s = standardize(towers_scores)
    np.testing.assert_allclose(s.mean(1).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(s.std(1).numpy(), 1, atol=1e-4)


def test_a_mostpop_head_blends_the_same_counts_into_every_user_cold_ones_too():
    rng = np.random.default_rng(4)
    x = sp.csr_matrix((rng.random((30, 12)) < 0.3).astype(np.float32))
    w = fit_weights("mostpop", {}, x, keep=5)  # keep does not prune the one row of counts
    np.testing.assert_array_equal(w.toarray()[0], MostPop().fit(x).counts)
    head = ItemItemHead("mostpop", {}, 0.4, w)
    assert head.shape(12) == (1, 12) == w.shape
    towers_scores = torch.from_numpy(rng.normal(size=(30, 12)).astype(np.float32))
    history = sp.csr_matrix((30, 12), dtype=np.float32)  # no history at all: popularity still speaks
    got = head.scorer(lambda u: towers_scores[u], history)(torch.arange(30))
    counts = torch.from_numpy(w.toarray().astype(np.float32)).expand(30, -1)
    expected = 0.6 * standardize(towers_scores) + 0.4 * standardize(counts)
    torch.testing.assert_close(got, expected)


def test_head_saves_and_loads(tmp_path):
    w = sp.random(9, 9, density=0.4, random_state=3, format="csr", dtype=np.float32)
    head = ItemItemHead("itemknn", {"k": 100, "shrink": 10.0}, 0.25, w)
    head.save(tmp_path / "head.npz")
    again = ItemItemHead.load(tmp_path / "head.npz")
    assert (again.kind, again.params, again.weight) == ("itemknn", {"k": 100, "shrink": 10.0}, 0.25)
    assert (again.weights != w).nnz == 0 and not list(tmp_path.glob(".*tmp"))


def test_config_refuses_impossible_weights_and_kinds():
    for bad, says in (("item_item.weight=1.0", "must be in [0, 1)"), ("item_item.weight=often", "expected a number"),
                      ("item_item.kind=svd", "item_item.kind"), ("item_item.keep=0", "item_item.keep")):
        with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace(")", r"\)")):
            load_config("pipelines/quickstart.yaml", [bad])
    assert load_config("pipelines/quickstart.yaml").item_item.weight == "auto"


@pytest.fixture(scope="module")
def random_split():
    """A random (not temporal) split, where the item-item side carries what the towers miss."""
    data = synthetic(300, 600, 12_000, n_categories=12, seed=3)
    return data, ratio_split(data, [0.8, 0.1, 0.1], by_time=False, seed=0)


def _config(tmp_path, **item_item):
    return small_config({}, tmp_path, data={"dataset": "unused"}, item_item={"weight": "auto", **item_item})


def test_an_ease_head_over_its_item_limit_is_refused_before_training(random_split, tmp_path):
    data, split = random_split
    files = write_split(data, split, tmp_path)
    config = small_config(files, tmp_path, item_item={"weight": 0.5, "kind": "ease", "ease_max_items": 100})
    with pytest.raises(ConfigError, match="item_item.kind: ease on 590 items"):
        train(config)
    assert not (tmp_path / "ckpt").exists()


def test_auto_weight_is_chosen_on_validation_only_and_off_when_it_does_not_help(random_split, tmp_path):
    data, split = random_split
    config = _config(tmp_path)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.normal(size=(data.n_users, data.n_items)).astype(np.float32))
    weak = lambda users: noise[users]  # towers that know nothing: the head must be chosen
    head, score, line = choose_item_item(config, data, split, weak, 0.0)
    assert head is not None and head[0] == "ease" and head[2] > 0 and score > 0.1
    assert "tuned on validation" in line and "paired gain" in line
    # test shuffled among users: the choice cannot move, it never reads test
    test = split.test.assign(item=rng.permutation(split.test["item"].to_numpy()))
    other = type(split)(split.data, split.train, split.valid, test, dict(split.report))
    assert choose_item_item(config, data, other, weak, 0.0)[:2] == (head, score)
    # towers that already rank each user's validation items first: no weight can clearly beat them
    truth = torch.from_numpy(split.matrix("valid").toarray())
    oracle = lambda users: truth[users] * 100 + noise[users] * 0.01
    head, _, line = choose_item_item(config, data, split, oracle, 1.0)
    assert head is None and line.startswith("item_item: off (validation")


def test_validation_picks_the_mostpop_head_where_popularity_is_what_is_held_out(random_split, tmp_path):
    data, split = random_split
    train_matrix = split.matrix("train").toarray()
    counts = train_matrix.sum(0)
    # each user's validation item: the most popular item the user does not have
    best = np.argmax(np.where(train_matrix > 0, -1, counts), axis=1)
    valid = split.valid.drop_duplicates("user").assign(item=lambda v: best[v["user"].to_numpy()])
    popular = type(split)(split.data, split.train, valid, split.test, dict(split.report))
    rng = np.random.default_rng(1)
    noise = torch.from_numpy(rng.normal(size=(data.n_users, data.n_items)).astype(np.float32))
    head, score, line = choose_item_item(_config(tmp_path), data, popular, lambda users: noise[users], 0.0)
    assert head is not None and head[0] == "mostpop" and head[1] == {} and score > 0.5
    assert line.startswith("item_item: mostpop") and "ease (lam=" in line and "mostpop alone" in line
    # asked for EASE only, the same data cannot get a MostPop head
    head, _, _ = choose_item_item(_config(tmp_path, kind="ease"), data, popular, lambda users: noise[users], 0.0)
    assert head is not None and head[0] == "ease"


def _assert_served_as_recommended(run_id: str, uri: str) -> None:
    """The served pyfunc model ranks and scores as recommend() does with the serving view."""
    ours = recommend(run_id, 10, uri=uri, history="all")
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/recommender")
    users = ours["user_id"].unique()[:40]
    theirs = served.predict(pd.DataFrame({"user_id": users}), params={"k": 10})
    mine = ours[ours["user_id"].isin(users)].reset_index(drop=True)
    np.testing.assert_array_equal(mine["item_id"].to_numpy(), theirs["item_id"].to_numpy())
    np.testing.assert_allclose(mine["score"], theirs["score"], rtol=1e-4, atol=1e-4)


def test_a_run_with_a_mostpop_head_serves_what_recommend_ranks(random_split, tmp_path):
    data, split = random_split
    files = write_split(data, split, tmp_path)
    config = small_config(files, tmp_path, train={"epochs": 1}, item_item={"weight": 0.5, "kind": "mostpop"})
    result = train(config)
    loaded = load_run(result.run_id, config.tracking.uri)
    assert loaded.head.kind == "mostpop" and loaded.head.weights.shape == (1, data.n_items)
    _assert_served_as_recommended(result.run_id, config.tracking.uri)


def test_a_run_with_the_head_logs_reloads_and_serves_it(random_split, tmp_path):
    data, split = random_split
    files = write_split(data, split, tmp_path, items=True)
    config = small_config(files, tmp_path, train={"epochs": 2}, item_item={"weight": "auto"})
    result = train(config)
    run = mlflow.get_run(result.run_id)
    assert float(run.data.tags["item_item.weight"]) > 0 and run.data.tags["item_item"].startswith("item_item: ease")
    assert any(line.startswith("item_item: ease") for line in result.summary)
    loaded = load_run(result.run_id, config.tracking.uri)
    assert loaded.head is not None and loaded.head.weights.shape == (data.n_items, data.n_items)
    assert evaluate_run(result.run_id, config.tracking.uri)["ndcg@10"] == pytest.approx(result.test["ndcg@10"], abs=1e-6)
    # the towers alone score lower on test here: the head is what the run reports
    towers = small_config(files, tmp_path, train={"epochs": 2})
    assert train(towers).test["ndcg@10"] < result.test["ndcg@10"]
    _assert_served_as_recommended(result.run_id, config.tracking.uri)
    # the plain object gives the same test figures as the tracked run
    rec = TwoTowerRecommender(config).fit()
    assert rec.head is not None and rec.head_choice.startswith("item_item: ease")
    assert rec.evaluate("test")["ndcg@10"] == pytest.approx(result.test["ndcg@10"], abs=1e-6)
