"""Online mining (hardest-k, semi-hard), the cross-batch memory bank and the pairwise losses, on
hand-built inputs; then each trains end to end."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import small_config
from recsys_hnm.experiment import build_sampler, build_trainer, load_data
from recsys_hnm.losses import pairwise
from recsys_hnm.sampling import KnownPositives
from recsys_hnm.training.mining import MemoryBank, select_candidates


def test_semi_hard_selection_keeps_exactly_the_margin_band():
    # positive 2.0, margin 1.0: the band is (1.0, 2.0)
    logits = torch.tensor([[2.5, 1.9, 1.0, 1.5, 0.2, 1.2],
                           [0.1, 0.9, 1.95, 3.0, 1.01, 1.5]])
    pos = torch.tensor([2.0, 2.0])
    invalid = torch.tensor([[False, False, False, False, False, True],  # 1.2 is in the band but masked
                            [False] * 6])
    dropped, stats = select_candidates(logits, pos, invalid, "semi_hard", margin=1.0)
    kept = (~dropped).tolist()
    assert kept == [[False, True, False, True, False, False],  # 2.5 above, 1.0 on the edge, 0.2 below
                    [False, False, True, False, True, True]]
    assert stats["qualified_per_row"] == 2.5
    # ranks among the row's valid candidates: row 0 keeps ranks 2 and 3; row 1 ranks 3, 4, 2
    assert stats["mean_rank"] == pytest.approx((2 + 3 + 3 + 4 + 2) / 5)


def test_hardest_selection_keeps_the_top_k_valid_candidates():
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0]])
    invalid = torch.tensor([[True, False, False, False, False]])  # the 5.0 is a known positive
    dropped, stats = select_candidates(logits, torch.tensor([0.0]), invalid, "hardest", k=2)
    assert (~dropped).tolist() == [[False, False, True, True, False]]
    assert stats == {"qualified_per_row": 2.0, "mean_rank": 1.5}
    assert select_candidates(logits, torch.tensor([0.0]), invalid, "none")[0] is invalid


def test_memory_bank_is_fifo_and_masks_known_positives_and_the_row_positive():
    log_p = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0 + 1e-9, 1e-9]))
    bank = MemoryBank(4, 2, log_p, warmup_steps=2)
    emb = lambda items: torch.stack([items.float(), -items.float()], 1)  # noqa: E731 - identifiable rows
    bank.push(torch.tensor([0, 1, 2]), emb(torch.tensor([0, 1, 2])))
    assert not bank.ready  # warm-up: 1 step of 2
    bank.push(torch.tensor([3, 4]), emb(torch.tensor([3, 4])))  # evicts item 0, the oldest
    assert bank.ready
    known = KnownPositives(sp.csr_matrix(([1.0], ([0], [2])), shape=(2, 6)))  # user 0 knows item 2
    items, embeddings, log_q, invalid, staleness = bank.negatives(torch.tensor([0, 1]), torch.tensor([3, 5]), known)
    assert items.tolist() == [1, 2, 3, 4]  # oldest first
    assert torch.equal(embeddings, emb(items))
    assert invalid.tolist() == [[False, True, True, False],  # user 0: item 2 known, item 3 its positive
                                [False, False, False, False]]
    assert torch.allclose(log_q, math.log(4) + log_p[items])  # 4 entries drawn at stream frequency
    assert staleness == pytest.approx((2 + 2 + 1 + 1) / 4)  # steps since: items 1, 2 two, items 3, 4 one
    bank.push(torch.tensor([5, 0, 1, 2, 3]), emb(torch.tensor([5, 0, 1, 2, 3])))  # more than the size: the last 4
    assert bank.negatives(torch.tensor([1]), torch.tensor([9]), None)[0].tolist() == [0, 1, 2, 3]


def test_pairwise_losses_match_hand_computed_values():
    pos = torch.tensor([2.0, 1.0])
    neg = torch.tensor([[1.0, 2.5, 0.0], [0.5, 3.0, 0.8]])
    invalid = torch.tensor([[False, False, True], [False, True, False]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bpr_hand = -(math.log(sig(1.0)) + math.log(sig(-0.5)) + math.log(sig(0.5)) + math.log(sig(0.2))) / 4
    assert pairwise("bpr", pos, neg, invalid).item() == pytest.approx(bpr_hand, rel=1e-6)
    # triplet, margin 1: hardest valid negatives 2.5 and 0.8
    hardest = (max(0, 1 - (2.0 - 2.5)) + max(0, 1 - (1.0 - 0.8))) / 2
    assert pairwise("triplet", pos, neg, invalid, margin=1.0).item() == pytest.approx(hardest)
    # semi-hard: the hardest below the positive: 1.0 (row 0; 2.5 is above) and 0.8 (row 1)
    semi = (max(0, 1 - (2.0 - 1.0)) + max(0, 1 - (1.0 - 0.8))) / 2
    assert pairwise("triplet", pos, neg, invalid, margin=1.0, triplet_negative="semi_hard").item() == pytest.approx(semi)
    with pytest.raises(ValueError, match="pairwise loss"):
        pairwise("hinge", pos, neg)


@pytest.mark.parametrize("setting", [
    {"loss": {"type": "bpr"}},
    {"loss": {"type": "triplet", "margin": 0.5, "triplet_negative": "semi_hard"}},
    {"sampler": {"select": {"mode": "semi_hard", "margin": 2.0}}},
    {"sampler": {"select": {"mode": "hardest", "k": 16}, "memory_bank": {"size": 512, "warmup_steps": 5}}},
])
def test_each_pattern_and_loss_trains_end_to_end(synthetic_files, tmp_path, setting):
    config = small_config(synthetic_files, tmp_path, **setting)
    data, split = load_data(config)
    trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path, epochs=2)
    history = trainer.fit()
    assert np.isfinite([h["train_loss"] for h in history]).all()
    assert history[-1]["valid.ndcg@10"] > 0
    if "select" in setting.get("sampler", {}):
        assert history[-1]["select.qualified_per_row"] > 0 and history[-1]["select.mean_rank"] >= 1
    if "memory_bank" in setting.get("sampler", {}):
        assert history[-1]["bank.entries"] == 512 and history[-1]["bank.staleness_steps"] > 0
        # the bank is part of the trainer's state: a resumed run continues with the same queue
        state = trainer.state_dict()["memory_bank"]
        assert torch.equal(state["items"], trainer.memory_bank.items)
