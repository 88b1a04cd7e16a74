"""FeatureBuilder: the user tower's history bag, on a hand-built event log.

In training the target (positive) item must not be in its own user's history bag, or the user
tower can read the answer. The expected bags below are written out by hand.
"""

import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from recsys_hnm.models.features import FeatureBuilder
from recsys_hnm.models.two_tower import FEATURES, HISTORY, ITEM_CATEGORY, ITEM_ID, USER_ID, TowerSizes, TwoTower

N_USERS, N_ITEMS, HISTORY_LEN = 5, 10, 3

# (user, item, timestamp), deliberately not in time order in the frame
EVENTS = [
    (0, 7, 30), (0, 5, 10), (0, 4, 40), (0, 2, 20),  # user 0 in time order: 5 2 7 4 -> last 3: 2 7 4
    (1, 3, 50),                                      # user 1: only item 3
    (2, 6, 70), (2, 1, 60),                          # user 2: 1 6
    (4, 8, 80), (4, 1, 90), (4, 8, 95),              # user 4 bought 8 twice: 8 1 8
]                                                    # user 3: no events


def _builder(history_len=HISTORY_LEN) -> FeatureBuilder:
    events = pd.DataFrame(EVENTS, columns=["user", "item", "timestamp"])
    item_categories = sp.csr_matrix((N_ITEMS, 2))
    return FeatureBuilder(events, N_USERS, item_categories, history_len)


def _bags(kjt) -> list[list[int]]:
    return [b.tolist() for b in kjt.to_dict()[HISTORY].to_dense()]


def test_history_is_the_most_recent_items_in_time_order():
    fb = _builder()
    kjt = fb.user_features(torch.arange(N_USERS))
    assert _bags(kjt) == [[2, 7, 4], [3], [1, 6], [], [8, 1, 8]]
    # a longer window keeps user 0's oldest item too; a window of one keeps only the last item
    assert _bags(_builder(10).user_features(torch.tensor([0])))[0] == [5, 2, 7, 4]
    assert _bags(_builder(1).user_features(torch.arange(N_USERS))) == [[4], [3], [6], [], [8]]
    # every KJT carries all features; the item tower's are empty here
    d = kjt.to_dict()
    assert list(kjt.keys()) == list(FEATURES)
    assert d[USER_ID].values().tolist() == list(range(N_USERS)) and d[USER_ID].lengths().tolist() == [1] * N_USERS
    assert d[ITEM_ID].lengths().tolist() == [0] * N_USERS and d[ITEM_CATEGORY].lengths().tolist() == [0] * N_USERS


def test_training_target_is_left_out_of_its_own_row_only():
    fb = _builder()
    # user 0 appears twice with different targets: the exclusion is per row, not per user
    users = torch.tensor([0, 0, 2, 1, 3, 0])
    targets = torch.tensor([7, 4, 9, 3, 2, 5])
    kjt = fb.user_features(users, exclude=targets)
    assert _bags(kjt) == [
        [2, 4],     # 7 removed, the others kept in time order
        [2, 7],     # 4 (the most recent) removed; the window is not refilled with the older 5
        [1, 6],     # target 9 was never bought: nothing to remove
        [],         # the only history item was the target: an empty bag
        [],         # no history at all
        [2, 7, 4],  # 5 is older than the window: nothing to remove
    ]
    assert kjt.to_dict()[HISTORY].lengths().tolist() == [2, 2, 2, 0, 0, 3]
    assert kjt.to_dict()[USER_ID].values().tolist() == users.tolist()
    # without exclude (scoring) the same rows keep the target
    assert _bags(fb.user_features(users))[0] == [2, 7, 4]


def test_a_repeated_target_is_removed_everywhere_in_the_bag():
    # user 4's history is 8 1 8; with target 8 both copies go, so no copy of the answer leaks
    kjt = _builder().user_features(torch.tensor([4, 4]), exclude=torch.tensor([8, 1]))
    assert _bags(kjt) == [[1], [8, 8]]


def test_with_history_swaps_the_events_and_leaves_the_original_alone():
    fb = _builder()
    later = pd.DataFrame(EVENTS + [(3, 9, 100), (1, 0, 110)], columns=["user", "item", "timestamp"])
    fb2 = fb.with_history(later)
    assert _bags(fb2.user_features(torch.tensor([1, 3]))) == [[3, 0], [9]]
    assert _bags(fb.user_features(torch.tensor([1, 3]))) == [[3], []]


def test_an_empty_bag_gives_a_finite_user_embedding():
    # mean pooling over no items: the user tower must still produce a usable (finite, unit) vector
    fb = _builder()
    torch.manual_seed(0)
    model = TwoTower(TowerSizes(N_USERS, N_ITEMS, 2), dim=8, hidden=[16])
    emb = model.user_embeddings(fb.user_features(torch.tensor([1, 3, 0]), exclude=torch.tensor([3, 0, 7])))
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_causal_training_bags_hold_only_items_before_the_positive():
    # user 0: items 5, 3, 7, 1 at times 4, 1, 3, 2 (rows out of time order on purpose); user 1: 2, 4
    events = pd.DataFrame({"user": [0, 0, 1, 0, 0, 1], "item": [5, 3, 2, 7, 1, 4], "timestamp": [4, 1, 0, 3, 2, 1]})
    fb = FeatureBuilder(events, 2, sp.csr_matrix((8, 1)), history_len=2)
    positions = fb.event_positions(events)
    assert positions.tolist() == [3, 0, 0, 2, 1, 1]
    kjt = fb.user_features_before(torch.tensor(events["user"].to_numpy()), positions)
    bags = [b.tolist() for b in torch.split(kjt["history"].values(), kjt["history"].lengths().tolist())]
    # time order of user 0: 3 (t1), 1 (t2), 7 (t3), 5 (t4); last 2 strictly before each positive
    assert bags == [[1, 7], [], [], [3, 1], [3], [2]]
    for bag, (_, row) in zip(bags, events.iterrows()):  # nothing at or after the positive
        later = set(events[(events.user == row.user) & (events.timestamp >= row.timestamp)]["item"])
        assert not set(bag) & later
    with pytest.raises(ValueError, match="causal histories need"):
        fb.event_positions(events.iloc[:3])


def test_history_weights_decay_with_age_and_sum_to_one():
    events = pd.DataFrame({"user": [0, 0, 0, 1], "item": [4, 5, 6, 2], "timestamp": [1, 2, 3, 1]})
    fb = FeatureBuilder(events, 3, sp.csr_matrix((8, 1)), history_len=10, decay=0.5)
    kjt = fb.user_features(torch.tensor([0, 1, 2]))
    hist = kjt["history"]
    assert hist.values().tolist() == [4, 5, 6, 2] and hist.lengths().tolist() == [3, 1, 0]
    assert hist.weights().tolist() == pytest.approx([0.25 / 1.75, 0.5 / 1.75, 1 / 1.75, 1.0])  # newest weighs most
    # decay 1: the plain mean, through the model's weighted-sum tables
    model = TwoTower(TowerSizes(3, 8, 1), dim=4, hidden=[])
    mean_fb = FeatureBuilder(events, 3, sp.csr_matrix((8, 1)), history_len=10)
    pooled = model.ebc(mean_fb.user_features(torch.tensor([0])))["history"][0]
    table = model.ebc.embedding_bags["item_table"].weight
    assert torch.allclose(pooled, table[[4, 5, 6]].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        FeatureBuilder(events, 3, sp.csr_matrix((8, 1)), decay=0.0)


def test_without_user_ids_the_user_tower_reads_the_history_only():
    events = pd.DataFrame({"user": [0, 0, 1], "item": [4, 5, 4], "timestamp": [1, 2, 1]})
    fb = FeatureBuilder(events, 2, sp.csr_matrix((8, 1)), user_id=False)
    kjt = fb.user_features(torch.tensor([0, 1]))
    assert kjt["user_id"].lengths().tolist() == [0, 0]
    model = TwoTower(TowerSizes(2, 8, 1), dim=4, hidden=[8])
    emb = model.user_embeddings(fb.user_features(torch.tensor([0, 1])))
    twin = FeatureBuilder(pd.DataFrame({"user": [0, 1], "item": [4, 4], "timestamp": [1, 1]}), 2, sp.csr_matrix((8, 1)), user_id=False)
    same = model.user_embeddings(twin.user_features(torch.tensor([0, 1])))
    assert torch.allclose(same[0], same[1]) and not torch.allclose(emb[0], emb[1])  # same history, same user vector
