import math

import pandas as pd
import pytest
import torch

from recsys_hnm.data import Interactions, leave_last_out
from recsys_hnm.evaluation import Evaluator, ranking_metrics
from recsys_hnm.training.losses import bpr, sampled_softmax, sampled_softmax_by_role, triplet


def test_metrics_against_hand_computed_values():
    # user A: 2 relevant, hits at ranks 2 and 4; user B: 3 relevant, hit at rank 1
    hits = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    m = ranking_metrics(hits, torch.tensor([2, 3]), [2, 5])
    g2, g3 = 1 / math.log2(3), 1 / math.log2(4)
    g4 = 1 / math.log2(5)
    expected = {
        "ndcg@2": [g2 / (1 + g2), 1 / (1 + g2)],
        "ndcg@5": [(g2 + g4) / (1 + g2), 1 / (1 + g2 + g3)],
        "map@2": [0.5 / 2, 1 / 2],
        "map@5": [(1 / 2 + 2 / 4) / 2, 1 / 3],
        "recall@2": [0.5, 1 / 3],
        "recall@5": [1.0, 1 / 3],
        "hr@2": [1.0, 1.0],
        "mrr@2": [0.5, 1.0],
        "mrr@5": [0.5, 1.0],
        "precision@2": [0.5, 0.5],
        "precision@5": [0.4, 0.2],
    }
    for key, values in expected.items():
        assert m[key].tolist() == pytest.approx(values), key
    # literal values for the two trickiest ones
    assert m["ndcg@2"][0].item() == pytest.approx(0.386853, abs=1e-6)
    assert m["ndcg@5"][0].item() == pytest.approx(0.650921, abs=1e-6)


def test_no_hit_gives_zero_everywhere():
    m = ranking_metrics(torch.zeros(1, 3, dtype=torch.bool), torch.tensor([1]), [3])
    assert all(float(v) == 0.0 for v in m.values())


def test_evaluator_masks_known_items_and_ranks_fully():
    # user 1 trains on a, b, c; validates on d; test on e
    events = pd.DataFrame({"user_id": [1] * 5, "item_id": list("abcde"), "timestamp": [1, 2, 3, 4, 5]})
    data = Interactions.from_frames(events)
    split = leave_last_out(data)
    ev = Evaluator(split, "test", ks=[1, 2])
    idx = {raw: i for i, raw in enumerate(data.items.raw)}
    # the scorer likes the known items best; they must be masked, leaving d... but d is known for test too
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0]])[:, [idx[x] for x in "abcde"]]
    m = ev.evaluate(lambda users: scores.clone())
    assert m["hr@1"] == 1.0  # a, b, c, d masked: e is first
    valid = Evaluator(split, "valid", ks=[1])
    assert valid.evaluate(lambda users: scores.clone())["hr@1"] == 1.0  # d first once a, b, c are masked


def test_sampled_softmax_matches_formula_and_masks():
    pos = torch.tensor([2.0, 0.5])
    neg = torch.tensor([[1.0, 3.0, 0.0], [0.2, 0.1, 4.0]])
    log_q = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.3, 2.0]])
    invalid = torch.tensor([[False, True, False], [False, False, False]])
    got = sampled_softmax(pos, neg, log_q, invalid)
    row0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.0 - 0.5) + math.exp(0.0))
    row1 = -0.5 + math.log(math.exp(0.5) + math.exp(0.2) + math.exp(0.1 - 0.3) + math.exp(4.0 - 2.0))
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_loss_by_role_matches_hand_computed_values_on_five_items():
    # item 0 is the positive (logit 2); items 1, 2 come from the proposal (log_q ln 2, ln 0.5);
    # items 3, 4 were mined (logits 1.5 and 3)
    pos = torch.tensor([2.0])
    proposal = (torch.tensor([[1.0, 0.5]]), torch.log(torch.tensor([[2.0, 0.5]])), None, False)

    def mined(hard, log_q=(0.0, 0.0)):
        return torch.tensor([[1.5, 3.0]]), torch.tensor([list(log_q)]), None, hard

    e = math.exp
    # every source a proposal source: the mined ones corrected too (here by ln 1.5 and ln 3)
    all_proposal = sampled_softmax_by_role(pos, [proposal, mined(False, (math.log(1.5), math.log(3.0)))])
    assert all_proposal.item() == pytest.approx(math.log(e(2) + e(1) / 2 + e(0.5) / 0.5 + e(1.5) / 1.5 + e(3) / 3) - 2, rel=1e-6)
    # joint: one softmax, the mined negatives uncorrected
    joint = sampled_softmax_by_role(pos, [proposal, mined(True)], "joint")
    assert joint.item() == pytest.approx(math.log(e(2) + e(1) / 2 + e(0.5) / 0.5 + e(1.5) + e(3)) - 2, rel=1e-6)
    # separate, lambda 0.5: the proposal term plus half the hard term
    separate = sampled_softmax_by_role(pos, [proposal, mined(True)], "separate", 0.5)
    by_hand = (math.log(e(2) + e(1) / 2 + e(0.5) / 0.5) - 2) + 0.5 * (math.log(e(2) + e(1.5) + e(3)) - 2)
    assert separate.item() == pytest.approx(by_hand, rel=1e-6)
    # a masked mined negative (what the false-negative guard does to item 4) leaves the softmax
    guarded = sampled_softmax_by_role(pos, [proposal, (*mined(True)[:2], torch.tensor([[False, True]]), True)], "separate", 0.5)
    assert guarded.item() == pytest.approx((math.log(e(2) + e(1) / 2 + e(0.5) / 0.5) - 2) + 0.5 * (math.log(e(2) + e(1.5)) - 2), rel=1e-6)
    with pytest.raises(ValueError, match="hard_loss"):
        sampled_softmax_by_role(pos, [proposal], "sum")
    # a batch of one row has no other in-batch positive: no proposal block, the hard term alone
    alone = sampled_softmax_by_role(pos, [mined(True)], "separate", 0.5)
    assert alone.item() == pytest.approx(0.5 * (math.log(e(2) + e(1.5) + e(3)) - 2), rel=1e-6)


def test_pairwise_losses_ignore_invalid_pairs():
    pos = torch.tensor([1.0])
    neg = torch.tensor([[0.0, 5.0]])
    invalid = torch.tensor([[False, True]])
    assert bpr(pos, neg, invalid).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert triplet(pos, neg, margin=1.5, invalid=invalid).item() == pytest.approx(0.5)
