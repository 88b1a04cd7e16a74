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


# -- the repeat-aware two-tower ------------------------------------------------------------------

import scipy.sparse as sp  # noqa: E402

from conftest import small_config  # noqa: E402
from recsys_hnm.config import ConfigError  # noqa: E402
from recsys_hnm.experiment import train  # noqa: E402
from recsys_hnm.models import FeatureBuilder, TowerSizes, TwoTower, model_scorer  # noqa: E402


def test_repeat_counts_see_only_what_came_before_and_scoring_only_the_phase_history():
    events = pd.DataFrame({"user": [0, 0, 0, 0, 1], "item": [2, 3, 2, 2, 1], "timestamp": [1.0, 2, 3, 4, 1]})
    features = FeatureBuilder(events, 2, sp.csr_matrix((5, 0)), history_len=10)
    positions = features.event_positions(events)
    items, counts = features.repeat_counts(torch.tensor([0, 0, 0]), positions[[1, 2, 3]])
    got = [{int(i): int(c) for i, c in zip(r, n) if i >= 0} for r, n in zip(items, counts)]
    assert got == [{2: 1}, {2: 1, 3: 1}, {2: 2, 3: 1}]  # the event itself and later ones never counted
    model = TwoTower(TowerSizes(2, 5, 0), dim=8, hidden=[8], repeat=True)
    with torch.no_grad():
        model.repeat_term.item[2] = 1.5
    plain = TwoTower(TowerSizes(2, 5, 0), dim=8, hidden=[8])
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("repeat_term")})
    diff = model_scorer(model, features)(torch.tensor([0, 1])) - model_scorer(plain, features)(torch.tensor([0, 1]))
    # user 0 has item 2 three times and 3 once; 1.5 + log 4 and 0 + log 2; nothing else moves
    assert torch.allclose(diff[0], torch.tensor([0, 0, 1.5 + np.log(4), np.log(2), 0], dtype=torch.float32), atol=1e-5)
    assert torch.allclose(diff[1], torch.tensor([0, float(np.log(2)), 0, 0, 0]), atol=1e-5)
    later = features.with_history(pd.concat([events, pd.DataFrame({"user": [1], "item": [4], "timestamp": [9.0]})]))
    assert model_scorer(model, later)(torch.tensor([1]))[0, 4] - model_scorer(plain, later)(torch.tensor([1]))[0, 4] > 0


@pytest.fixture(scope="module")
def rebuy_files(tmp_path_factory):
    """Shoppers who buy again: each household's last basket is two of its earlier items."""
    rng = np.random.default_rng(0)
    rows, t = [], 0
    for u in range(150):
        own = rng.choice(120, 6, replace=False)
        for b in range(8):
            t += 1
            for i in rng.choice(own, 2, replace=False) if b % 2 else rng.choice(120, 2, replace=False):
                rows.append((u, int(i), t, f"{u}-{b}"))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "basket_id"])
    root = tmp_path_factory.mktemp("rebuy")
    frame.to_csv(root / "events.csv", index=False)  # a generic events folder
    return root


def test_the_repeat_aware_model_learns_what_is_bought_again(rebuy_files, tmp_path):
    def run(repeat):
        config = small_config({}, tmp_path / str(repeat), data={"dataset": str(rebuy_files), "split": "last_basket",
                                                                "duplicates": "keep"},
                              model={"repeat": repeat, "train_history": "causal", "history_len": 30},
                              eval={"exclude": "none", "ks": [10, 20]}, train={"epochs": 3})
        return train(config).test
    plain, repeat = run(False), run(True)
    assert repeat["repeat.recall@10"] > plain["repeat.recall@10"] + 0.1, (plain, repeat)
    assert repeat["ndcg@10"] > plain["ndcg@10"]
    with pytest.raises(ConfigError, match="eval.exclude"):
        small_config({}, tmp_path, data={"dataset": "ml-latest-small"}, model={"repeat": True, "train_history": "causal"})
    with pytest.raises(ConfigError, match="train_history=causal"):
        small_config({}, tmp_path, data={"dataset": "ml-latest-small"}, model={"repeat": True, "train_history": "all"},
                     eval={"exclude": "none"})


def test_history_items_are_exact_candidates_once_and_the_sampled_blocks_mask_them(tmp_path):
    from recsys_hnm.data import leave_last_out, synthetic
    from recsys_hnm.experiment.run import build_sampler, build_trainer
    data = synthetic(40, 60, 900, n_categories=3, seed=4, duplicates="keep")
    split = leave_last_out(data)
    config = small_config({}, tmp_path, data={"dataset": "ml-latest-small"}, eval={"exclude": "none"},
                          model={"repeat": True, "train_history": "causal", "history_len": 20, "dim": 16, "hidden": [16]},
                          sampler={"num_negatives": 32})
    trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path / "index", epochs=1, validate=False)
    users, pos, positions = trainer.users[:64], trainer.items[:64], trainer.positions[:64]
    block, pos_offset = trainer._history_block(users, pos, positions)
    items, counts = trainer.features.repeat_counts(users, positions)
    assert (block.log_q == 0).all() and torch.equal(block.invalid, (items < 0) | (items == pos[:, None]))
    assert torch.equal(pos_offset != 0, ((items == pos[:, None]) & (counts > 0)).any(1))  # a repeat positive carries its term
    out = trainer.train_step(users, pos, positions)
    for b in out.blocks:  # the sampler's blocks: a history item is never a valid sampled candidate
        cand = b.per_row_items(len(users))
        in_history = (cand[:, :, None] == items[:, None, :]).any(-1)
        assert not (in_history & ~b.invalid).any()
