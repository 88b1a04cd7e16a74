"""Repeat-aware evaluation and baselines: what may be recommended again, metrics split into
repeat and explore items, RepeatPop and TIFU-KNN against hand-computed scores."""

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_hnm.baselines import make_baseline, tune
from recsys_hnm.data import Interactions, fixed_split
from recsys_hnm.evaluation import Evaluator


def _split(rows, n_items):
    """rows: (user, item, phase, timestamp, basket); raw ids = indices; repeats kept."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "phase", "timestamp", "basket_id"])
    split = fixed_split(Interactions.from_frames(frame, keep_columns=("phase",), duplicates="keep"))
    assert split.data.n_items == n_items and (split.data.items.raw == np.arange(n_items)).all()
    return split


# user 0 bought 0 twice and 1 once, then (test) 0 again and 2, new; user 1 bought 3, then 4, new
SPLIT = [(0, 0, "train", 1, 1), (0, 1, "train", 1, 1), (0, 0, "train", 2, 2), (1, 3, "train", 1, 3),
         (0, 3, "valid", 3, 4), (1, 2, "valid", 2, 5),
         (0, 0, "test", 4, 6), (0, 2, "test", 4, 6), (1, 4, "test", 3, 7)]


def _fixed(scores):
    table = torch.tensor(scores, dtype=torch.float32)
    return lambda users: table[users].clone()


def test_the_metrics_split_into_repeat_and_explore_items_on_the_same_list():
    split = _split(SPLIT, 5)
    # user 0 ranks 0 (a repeat), 4, 2 (explore) first; user 1 ranks 4 (explore) first
    scorer = _fixed([[9, 1, 7, 0, 8], [0, 0, 0, 0, 9]])
    ev = Evaluator(split, "test", ks=[1, 3], exclude="none")
    got = ev.evaluate(scorer)
    assert got["hr@1"] == 1.0 and got["recall@3"] == 1.0
    assert got["repeat.hr@1"] == 1.0  # user 0's one repeat is first; user 1 has none: averaged over user 0 only
    assert got["explore.recall@3"] == 1.0 and got["explore.hr@1"] == pytest.approx(0.5)  # user 0's item 2 at rank 3
    assert got["explore.ndcg@3"] == pytest.approx((1 / np.log2(4) + 1.0) / 2)
    masked = Evaluator(split, "test", ks=[1, 3], exclude="history").evaluate(scorer)
    assert masked["recall@3"] == pytest.approx((0.5 + 1.0) / 2)  # the repeat can never be ranked
    assert not any(k.startswith(("repeat.", "explore.")) for k in masked)


def test_exclude_none_recommends_history_items_and_history_never_does():
    split = _split(SPLIT, 5)
    scorer = _fixed([[9, 8, 0, 7, 1], [0, 0, 0, 9, 1]])
    users = torch.tensor([0, 1])
    items = {}
    for exclude in ("history", "train", "none"):
        top, scores = Evaluator(split, "test", ks=[3], exclude=exclude).top_k(scorer, users, 3)
        items[exclude] = [[int(i) for i, s in zip(row, srow) if s > float("-inf")] for row, srow in zip(top, scores)]
    history = {0: {0, 1, 3}, 1: {3, 2}}
    assert all(not set(row) & history[u] for u, row in zip((0, 1), items["history"]))
    assert items["none"] == [[0, 1, 3], [3, 4, 0]]
    assert 3 in items["train"][0] and 0 not in items["train"][0]  # a validation item may come back, a training one not


def test_repeatpop_ranks_the_users_own_counts_with_popularity_ties():
    split = _split(SPLIT, 5)
    model = make_baseline("repeatpop").fit(split.known("test"), split.history("test"))
    s = model(torch.tensor([0, 1])).numpy()
    # user 0: item 0 twice, 1 and 3 once; users per item (train + valid): 0:1, 1:1, 2:1, 3:2, 4:0
    assert s[0].argsort()[::-1][:3].tolist() == [0, 3, 1]
    assert s[0, 0] == pytest.approx(2 + 1 / 3) and s[0, 3] == pytest.approx(1 + 2 / 3)
    assert s[1].argsort()[::-1][:2].tolist() == [3, 2] and s[1, 3] == pytest.approx(1 + 2 / 3)


def test_tifuknn_user_vectors_and_scores_by_hand():
    # user 0: baskets {0, 1}, {0}, {2}; user 1: {0}, {3}; groups of 2 baskets
    rows = [(0, 0, "train", 1, 1), (0, 1, "train", 1, 1), (0, 0, "train", 2, 2), (0, 2, "train", 3, 3),
            (1, 0, "train", 1, 4), (1, 3, "train", 2, 5), (0, 4, "valid", 4, 6), (1, 4, "valid", 3, 7),
            (0, 1, "test", 5, 8), (1, 2, "test", 4, 9)]
    split = _split(rows, 5)
    model = make_baseline("tifuknn", k=1, alpha=0.6, group_size=2, basket_decay=0.5, group_decay=0.8)
    vectors = model.user_vectors(split.history("valid"), (2, 5)).toarray()
    # user 0: group 1 = baskets 1, 2 (weights 0.5/2 and 1/2), group 2 = basket 3 (1/1); groups weigh 0.8/2 and 1/2
    g1 = (0.5 * np.array([1, 1, 0, 0, 0]) + 1.0 * np.array([1, 0, 0, 0, 0])) / 2
    g2 = np.array([0, 0, 1, 0, 0])
    assert np.allclose(vectors[0], 0.8 * g1 / 2 + 1.0 * g2 / 2)
    assert np.allclose(vectors[1], (0.5 * np.array([1, 0, 0, 0, 0]) + np.array([0, 0, 0, 1, 0])) / 2)
    model.fit(split.known("valid"), split.history("valid"))
    s = model(torch.tensor([0, 1])).numpy()
    assert np.allclose(s[0], 0.6 * vectors[0] + 0.4 * vectors[1])  # the one neighbour is the other user
    assert np.allclose(s[1], 0.6 * vectors[1] + 0.4 * vectors[0])


def test_personal_baselines_are_tuned_on_validation_under_the_chosen_protocol():
    split = _split(SPLIT, 5)
    best, table = tune("tifuknn", split, {"k": [1], "alpha": [0.5, 1.0]}, ks=[1, 3], metric="ndcg@3", exclude="none")
    assert best == max(table, key=lambda row: row["valid"]["ndcg@3"])["params"]
    assert len(table) == 2 and all("repeat.ndcg@1" in row["valid"] or "explore.ndcg@1" in row["valid"] for row in table)
    with pytest.raises(ValueError, match="events"):
        make_baseline("tifuknn").fit(split.known("valid"))
