"""TwoTowerRecommender: the model as a plain object, without MLflow, giving what ``train`` gives."""

import numpy as np
import pytest
import torch

from conftest import small_config
from recsys_hnm import TwoTowerRecommender, train
from recsys_hnm.experiment import load_data


@pytest.fixture(scope="module")
def fitted(synthetic_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recommender")
    config = small_config(synthetic_files, tmp, train={"epochs": 2, "num_threads": 1})
    torch.set_num_threads(2)  # fit() takes the config's thread count, as train() does (results follow it)
    rec = TwoTowerRecommender(config).fit()
    assert torch.get_num_threads() == 1
    return config, tmp, rec


def test_fit_writes_no_tracking_store_and_scores_as_the_tracked_run(fitted):
    config, tmp, rec = fitted
    assert not (tmp / "mlruns").exists()  # nothing tracked, nothing checkpointed
    assert not (tmp / "ckpt").exists()
    result = train(config)  # the same config and seed, tracked
    got = rec.evaluate("test")
    assert set(got) == set(result.test)
    for name, value in result.test.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert rec.evaluate("valid")["ndcg@10"] > 0


def test_recommend_returns_the_best_unknown_items_and_score_agrees(fitted):
    _, _, rec = fitted
    data, split = rec.data, rec.split
    users = data.users.to_raw(np.arange(5))
    recs = rec.recommend(users, k=10)
    assert recs.groupby("user_id").size().eq(10).all() and set(recs["user_id"]) == set(users)
    known = split.known_all().tocsr()
    for user, rows in recs.groupby("user_id"):
        u = int(np.flatnonzero(data.users.raw == user)[0])
        items = data.items.to_index(rows["item_id"], "item")
        assert not known[u, items].toarray().any(), "a known item was recommended"
        assert rows["rank"].tolist() == list(range(1, 11))
        scores = rec.score([user], data.items.raw)[0]
        np.testing.assert_allclose(rows["score"].to_numpy(), scores[items], rtol=1e-5)
        scores[known[u].indices] = -np.inf
        assert rows["score"].iloc[-1] >= np.sort(scores)[-10] - 1e-5  # nothing unknown scores above the list
    # exclude none: the same tower may return what the user has
    anything = rec.recommend(users, k=10, exclude="none")
    assert anything["score"].min() >= recs["score"].min() - 1e-6


def test_bad_calls_say_what_is_wrong(fitted, synthetic_files, tmp_path):
    _, _, rec = fitted
    with pytest.raises(KeyError, match="no-such-user"):
        rec.recommend(["no-such-user"])
    with pytest.raises(ValueError, match="exclude"):
        rec.recommend(exclude="everything")
    with pytest.raises(ValueError, match="k must be > 0"):
        rec.recommend(k=0)
    with pytest.raises(RuntimeError, match="fit"):
        TwoTowerRecommender(small_config(synthetic_files, tmp_path)).recommend()
    data, split = load_data(small_config(synthetic_files, tmp_path))
    with pytest.raises(ValueError, match="Interactions"):
        TwoTowerRecommender(small_config(synthetic_files, tmp_path)).fit(split=split)
