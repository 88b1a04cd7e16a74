"""The evaluator's ranking rules: ties, masking, chunking, K beyond the catalog."""

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_hnm.data import Interactions, leave_last_out, ratio_split
from recsys_hnm.evaluation import Evaluator, popularity_scorer, ranking_metrics
from recsys_hnm.evaluation.evaluator import RANKED_BY_COUNT
from recsys_hnm.ops.ranking import top_k


def test_top_k_breaks_ties_by_lower_item_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, float("-inf"), -2.0, 3.0]])
    items, values = top_k(scores, 8)
    assert items.tolist() == [[1, 2, 7, 0, 3, 4, 6, 5]]  # -0.0 and 0.0 tie too
    assert values[0, :3].tolist() == [3.0, 3.0, 3.0]
    # the same first items whatever K is asked: a metric at 10 cannot depend on the other K
    assert top_k(scores, 2)[0].tolist() == [[1, 2]]
    ties = torch.zeros(3, 50)
    assert (top_k(ties, 5)[0] == torch.arange(5)).all()


def test_top_k_matches_a_sort_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    ties = torch.randint(-5, 5, (40, 300), generator=gen).float() / 3  # many ties, at the k-th value too
    distinct = torch.rand(40, 300, generator=gen)
    distinct[:, 7] = distinct[:, 3] = distinct[:, 250] = 2.0  # ties inside the top k only
    scores = torch.cat([ties, distinct])
    items, values = top_k(scores, 25)
    for row, s in enumerate(scores.numpy()):
        expected = sorted(range(len(s)), key=lambda i: (-s[i], i))[:25]  # independent reference
        assert items[row].tolist() == expected
        assert np.allclose(values[row].numpy(), s[expected])


def _toy_split():
    # 4 users, 6 items; every user: train items, then valid, then test (leave-last-out by time)
    rows = [(u, i, t) for u, items in enumerate([[0, 1, 2, 3], [1, 2, 4], [0, 3, 5, 1], [2, 5, 0]]) for t, i in enumerate(items)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return leave_last_out(Interactions.from_frames(frame))


def test_mostpop_with_ties_gives_the_hand_computed_metrics():
    split = _toy_split()
    ev = Evaluator(split, "test", ks=[1, 2])
    counts = np.array([2, 2, 0, 0, 0, 0])  # items 0 and 1 tie; item 0 wins by the tie rule
    top, _ = ev.top_k(popularity_scorer(counts), ev.users, 2)
    known = split.known("test").toarray()
    for u, row in zip(ev.users.tolist(), top.tolist()):
        unmasked = [i for i in range(6) if not known[u, i]]
        assert row == sorted(unmasked, key=lambda i: (-counts[i], i))[:2]


def test_many_scorers_in_one_pass_give_each_ones_per_user_metrics():
    split = _toy_split()
    gen = torch.Generator().manual_seed(2)
    tables = {name: torch.randint(0, 3, (4, 6), generator=gen).float() for name in ("a", "b")}
    ev = Evaluator(split, "test", ks=[1, 3], chunk_size=3)
    many = ev.per_user_many(["a", "b"], lambda users: ((name, t[users].clone()) for name, t in tables.items()))
    for name, table in tables.items():
        pd.testing.assert_frame_equal(many[name], ev.per_user(lambda users: table[users].clone()))
    with pytest.raises(ValueError, match="not each of"):
        ev.per_user_many(["a", "b"], lambda users: iter([("a", tables["a"][users].clone())]))


def test_metrics_do_not_depend_on_chunk_size_or_other_ks():
    split = _toy_split()
    gen = torch.Generator().manual_seed(1)
    table = torch.randint(0, 3, (4, 6), generator=gen).float()  # ties on purpose
    scorer = lambda users: table[users].clone()  # noqa: E731
    a = Evaluator(split, "test", ks=[1], chunk_size=1).evaluate(scorer)
    b = Evaluator(split, "test", ks=[1, 2, 5], chunk_size=1000).evaluate(scorer)
    assert a["ndcg@1"] == b["ndcg@1"] and a["map@1"] == b["map@1"]


def test_k_larger_than_the_catalog_counts_missing_ranks_as_misses():
    split = _toy_split()
    ev = Evaluator(split, "test", ks=[10])
    values = ev.evaluate(popularity_scorer(np.arange(6)))
    # every user's test item is among its unmasked items, so recall@10 over a 6-item catalog is 1
    assert values["recall@10"] == 1.0 and values["hr@10"] == 1.0
    assert values["precision@10"] == pytest.approx(1 / 10)


def test_known_items_are_masked_with_duplicates_kept():
    frame = pd.DataFrame({"user_id": [0, 0, 0, 0, 1, 1, 1], "item_id": [5, 5, 6, 5, 5, 6, 7],
                          "timestamp": [0, 1, 2, 3, 0, 1, 2]})
    data = Interactions.from_frames(frame, duplicates="keep")
    split = leave_last_out(data)
    # user 0's test event repeats item 5, which is already known: it cannot be hit, and is counted
    assert split.report["test_events_already_known"] == 1
    ev = Evaluator(split, "test", ks=[3])
    top, scores = ev.top_k(popularity_scorer(np.ones(data.n_items)), ev.users, 3)
    known = split.known("test").toarray()
    for u, items, s in zip(ev.users.tolist(), top.tolist(), scores.tolist()):
        assert all(known[u, i] == 0 for i, v in zip(items, s) if np.isfinite(v))


def test_a_masked_item_in_a_short_list_is_never_a_hit():
    # user 0 has every item but one before the test phase, and the test repeats a known item
    frame = pd.DataFrame({"user_id": [0, 0, 0, 0], "item_id": [1, 2, 3, 1], "timestamp": [0, 1, 2, 3]})
    data = Interactions.from_frames(frame, duplicates="keep")
    split = leave_last_out(data)
    values = Evaluator(split, "test", ks=[3]).evaluate(popularity_scorer(np.ones(data.n_items)))
    assert values["hr@3"] == 0.0


def _metrics_from_top_k(ev: Evaluator, scorer, kmax: int) -> dict:
    """The plain reference: a top-k of every row, then which of its items are relevant."""
    top, scores = ev.top_k(scorer, ev.users, kmax)
    hits = ev.relevant[""].contains(ev.users, top) & torch.isfinite(scores)  # "": the total part
    hits = torch.nn.functional.pad(hits, (0, kmax - hits.shape[1]))
    return ranking_metrics(hits, ev.n_relevant, ev.ks)


@pytest.mark.parametrize("levels", [3, 0])  # 3: many ties, at and around the relevant items; 0: distinct floats
def test_ranking_by_counting_gives_the_top_k_metrics(levels):
    # 1 to 12 relevant items per user (a ratio split), so both paths run: counting for rows with
    # few relevant items, the top-k for the others
    rng = np.random.default_rng(0)
    rows = [(u, i, t) for u in range(60) for t, i in enumerate(rng.choice(40, rng.integers(5, 40), replace=False))]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    split = ratio_split(Interactions.from_frames(frame), (0.5, 0.2, 0.3))
    ev = Evaluator(split, "test", ks=[1, 5, 10], chunk_size=7)
    n_rel = ev.n_relevant.numpy()
    assert (n_rel <= RANKED_BY_COUNT).any() and (n_rel > RANKED_BY_COUNT).any()
    gen = torch.Generator().manual_seed(2)
    table = torch.randint(0, levels, (60, 40), generator=gen).float() if levels else torch.randn(60, 40, generator=gen)
    scorer = lambda users: table[users].clone()  # noqa: E731
    got = ev.evaluate(scorer, per_user=True)
    expected = _metrics_from_top_k(ev, scorer, 10)
    for name, values in expected.items():
        assert torch.allclose(got[name], values), name
    # a catalog shorter than K: every unmasked item is ranked
    short = Evaluator(split, "test", ks=[50])
    assert torch.allclose(short.evaluate(scorer, per_user=True)["ndcg@50"], _metrics_from_top_k(short, scorer, 50)["ndcg@50"])
