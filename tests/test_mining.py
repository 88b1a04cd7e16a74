"""Online mining (hardest-k, semi-hard), the cross-batch memory bank and the pairwise losses, on
hand-built inputs; then each trains end to end."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import small_config
from recsys_hnm.experiment import build_sampler, build_trainer, load_data
from recsys_hnm.training.losses import pairwise, sampled_softmax, sampled_softmax_by_role
from recsys_hnm.sampling import KnownPositives
from recsys_hnm.mining import MemoryBank, left_out_centroid_term, left_out_item_side_term, left_out_term, select_candidates


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


def test_hardest_selection_keeps_the_top_k_distinct_items_with_all_their_copies():
    # item 7 holds four columns (a popular in-batch target): by column it alone would fill k = 2
    logits = torch.tensor([[5.0, 5.0, 4.0, 5.0, 3.0, 2.0, 5.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    items = torch.tensor([[7, 7, 3, 7, 9, 1, 7],
                          [1, 2, 3, 4, 5, 6, 6]])
    invalid = torch.zeros(2, 7, dtype=torch.bool)
    invalid[0, 3] = True  # a masked copy stays out
    dropped, stats = select_candidates(logits, torch.zeros(2), invalid, "hardest", k=2, items=items)
    assert (~dropped).tolist() == [[True, True, True, False, False, False, True],
                                   [False, False, False, False, True, True, True]]
    assert stats == {"qualified_per_row": 2.0, "mean_rank": 1.5}
    shared, _ = select_candidates(logits, torch.zeros(2), invalid, "hardest", k=2, items=items[0])  # ids shared by the rows
    assert (~shared).tolist() == [[True, True, True, False, False, False, True],
                                  [True, True, False, True, False, True, True]]  # row 1: item 7 (up to 7.0), item 1 (6.0)


def test_hardest_by_share_ranks_the_corrected_logits():
    # a popular item (log_q 3) scores highest raw; corrected, the rare draws (log_q -4) hold more
    logits = torch.tensor([[4.0, 1.0, 0.5, 3.0]])
    log_q = torch.tensor([[3.0, -4.0, -4.0, 3.0]])
    invalid = torch.zeros(1, 4, dtype=torch.bool)
    by_score, _ = select_candidates(logits, torch.zeros(1), invalid, "hardest", k=2)
    by_share, _ = select_candidates(logits, torch.zeros(1), invalid, "hardest", k=2, log_q=log_q)
    assert (~by_score).tolist() == [[True, False, False, True]]
    assert (~by_share).tolist() == [[False, True, True, False]]


def test_a_summarised_rest_keeps_the_pools_loss_and_its_gradient_on_what_selection_kept():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, generator=g).requires_grad_()
    pos = torch.randn(4, generator=g).requires_grad_()
    log_q = torch.randn(4, 12, generator=g)
    invalid = torch.rand(4, 12, generator=g) < 0.2
    pool = sampled_softmax(pos, logits, log_q, invalid)
    pool_grads = torch.autograd.grad(pool, [pos, logits])
    dropped, _ = select_candidates(logits, pos, invalid, "hardest", k=3)
    selected = sampled_softmax_by_role(pos, [(logits, log_q, dropped, False), left_out_term(logits, log_q, invalid, dropped)])
    pos_grad, logit_grad = torch.autograd.grad(selected, [pos, logits])
    assert selected.item() == pytest.approx(pool.item(), rel=1e-6)
    assert torch.allclose(pos_grad, pool_grads[0], atol=1e-6)
    kept = ~dropped
    assert torch.allclose(logit_grad[kept], pool_grads[1][kept], atol=1e-6)
    assert (logit_grad[dropped] == 0).all() and (pool_grads[1][dropped & ~invalid] != 0).all()
    # dropped, the rest leaves the normaliser: the loss falls
    assert sampled_softmax_by_role(pos, [(logits, log_q, dropped, False)]).item() < pool.item()


def test_the_rest_summarised_with_one_side_of_its_gradient_gives_that_side_the_pools_gradient():
    g = torch.Generator().manual_seed(1)
    users = torch.randn(4, 8, generator=g).requires_grad_()
    shared = torch.randn(7, 8, generator=g).requires_grad_()  # in-batch-like: shared by the rows
    own = torch.randn(4, 5, 8, generator=g).requires_grad_()  # per-row draws
    pos_emb, scale = torch.randn(4, 8, generator=g), 3.0
    log_q = torch.randn(4, 12, generator=g)
    invalid = torch.rand(4, 12, generator=g) < 0.2

    def parts():
        logits = torch.cat([users @ shared.T, torch.einsum("bd,bnd->bn", users, own)], 1) * scale
        return (users * pos_emb).sum(1) * scale, logits

    pos, logits = parts()
    pool = sampled_softmax(pos, logits, log_q, invalid)
    pool_grads = torch.autograd.grad(pool, [users, shared, own])
    pos, logits = parts()
    dropped, _ = select_candidates(logits, pos, invalid, "hardest", k=3)
    rest = left_out_centroid_term(logits, log_q, invalid, dropped, users, [(shared, True), (own, False)], scale)
    selected = sampled_softmax_by_role(pos, [(logits, log_q, dropped, False), rest])
    grads = torch.autograd.grad(selected, [users, shared, own])
    assert selected.item() == pytest.approx(pool.item(), rel=1e-6)
    assert torch.allclose(grads[0], pool_grads[0], atol=1e-5)  # the user side: exact
    # the item side: the pool's gradient where an item was kept by some row, none where no row kept it
    kept_shared = (~dropped[:, :7]).any(0)
    assert torch.allclose(grads[1][~kept_shared], torch.zeros(1)) and (pool_grads[1][~kept_shared].abs() > 0).any()
    kept_own = ~dropped[:, 7:]
    assert torch.allclose(grads[2][kept_own], pool_grads[2][kept_own], atol=1e-5)
    assert (grads[2][dropped[:, 7:]] == 0).all()
    # the plain summary truncates the user side too: its gradient differs from the pool's
    pos, logits = parts()
    summary = sampled_softmax_by_role(pos, [(logits, log_q, dropped, False), left_out_term(logits, log_q, invalid, dropped)])
    assert not torch.allclose(torch.autograd.grad(summary, users)[0], pool_grads[0], atol=1e-3)
    # the other half: every item gets the pool's gradient, the user only what selection kept
    pos, logits = parts()
    rest = left_out_item_side_term(logits, log_q, invalid, dropped, users, [(shared, True), (own, False)], scale)
    item_side = sampled_softmax_by_role(pos, [(logits, log_q, dropped, False), rest])
    grads = torch.autograd.grad(item_side, [users, shared, own])
    assert item_side.item() == pytest.approx(pool.item(), rel=1e-6)
    assert torch.allclose(grads[1], pool_grads[1], atol=1e-5) and torch.allclose(grads[2], pool_grads[2], atol=1e-5)
    pos, logits = parts()
    user_of_summary = torch.autograd.grad(sampled_softmax_by_role(
        pos, [(logits, log_q, dropped, False), left_out_term(logits, log_q, invalid, dropped)]), users)[0]
    assert torch.allclose(grads[0], user_of_summary, atol=1e-5)


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
    {"sampler": {"select": {"mode": "hardest", "k": 16, "rest": "summarise", "rank": "share"}}},
    {"sampler": {"select": {"mode": "hardest", "k": 16, "rest": "centroid"}}},
    {"sampler": {"select": {"mode": "hardest", "k": 16, "rest": "item_side"}}},
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


def test_the_memory_bank_trains_the_user_tower_and_leaves_the_item_towers_gradient_as_without_it(synthetic_files, tmp_path):
    """Queued entries take softmax weight from the in-batch items, whose repulsion is what keeps
    item embeddings apart: the item tower's gradient must be the one without the bank."""
    config = small_config(synthetic_files, tmp_path, sampler={"memory_bank": {"size": 256, "warmup_steps": 0}})
    data, split = load_data(config)
    with_bank, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path / "a", epochs=1)
    without, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path / "b", epochs=1)
    without.memory_bank = None
    rows = torch.arange(128)
    with_bank.train_step(with_bank.users[rows], with_bank.items[rows])  # fills the bank
    without.model.load_state_dict(with_bank.model.state_dict())
    without.generator.set_state(with_bank.generator.get_state())
    grads = {}
    for name, trainer in (("bank", with_bank), ("plain", without)):
        trainer.diagnostics = None
        trainer.optimizer.step = lambda: None  # keep the gradients and the weights as they are
        if trainer.table_optimizer is not None:
            trainer.table_optimizer.step = lambda: None
        batch = torch.arange(128, 256)
        trainer.train_step(trainer.users[batch], trainer.items[batch])
        grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None and "mlp" in n}
    assert with_bank.step_means["bank.entries"][0] > 0  # the bank took part
    item = [n for n in grads["bank"] if n.startswith("item_mlp")]
    user = [n for n in grads["bank"] if n.startswith("user_mlp")]
    assert item and user
    for n in item:
        torch.testing.assert_close(grads["bank"][n], grads["plain"][n])
    assert any(not torch.allclose(grads["bank"][n], grads["plain"][n]) for n in user)


def test_offline_mining_round_trips_into_the_static_source(synthetic_files, tmp_path, capsys):
    from recsys_hnm.cli import main
    from recsys_hnm.data import read_table
    from recsys_hnm.experiment import load_run, train

    config = small_config(synthetic_files, tmp_path, train={"epochs": 1})
    run_id = train(config).run_id
    out = tmp_path / "mined.parquet"
    uri = config.tracking.uri
    args = ["mine", "--run-id", run_id, "--output", str(out), "--sources", "ann,category", "--per-positive", "4",
            "--window", "5", "50", "--tracking-uri", uri]
    assert main(args) == 0
    mined = read_table(out)
    run = load_run(run_id, uri)
    assert list(mined.columns) == ["user_id", "item_id", "negative_id", "source", "rank", "score"]
    assert len(mined) == 4 * len(run.split.train)  # every training (user, positive), 4 negatives each
    assert (mined.groupby("source").size() == 2 * len(run.split.train)).all()
    ann = mined[mined.source == "ann"]
    assert ann["rank"].between(6, 50).all()  # ranks [5, 50) counted from 1
    # rank = 1 + the number of the user's unknown items the run's model scores higher
    from recsys_hnm.evaluation import mask_known
    from recsys_hnm.models import model_scorer

    sample = mined.iloc[::997]
    u_idx = torch.from_numpy(run.data.users.to_index(sample["user_id"]))
    scores = model_scorer(run.model, run.features.with_history(run.split.history("train")))(u_idx)
    mask_known(scores, run.split.matrix("train"), u_idx)
    higher = (scores > torch.tensor(sample["score"].to_numpy())[:, None]).sum(1)
    assert (sample["rank"].to_numpy() == 1 + higher.numpy()).all()
    known = run.split.matrix("train")
    u = run.data.users.to_index(mined["user_id"])
    j = run.data.items.to_index(mined["negative_id"])
    assert not np.asarray(known[u, j]).ravel().any()  # no known item of the user is a mined negative
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # no overwrite unless --force
    assert main(args + ["--force"]) == 0
    beyond = ["--window", "5", str(run.data.n_items + 1), "--force"]
    assert main(args + beyond) == 2 and "reaches beyond the catalog" in capsys.readouterr().err

    # the static source trains from the file: its draws are the listed negatives, its log_q
    # the listed share, and a pair the file does not list falls back
    static = small_config(synthetic_files, tmp_path, sampler={"mixture": {"in_batch": 1.0, "static": 1.0},
                                                              "static": {"path": str(out)}})
    data, split = load_data(static)
    sampler = build_sampler(static, data, split).components["static"]
    first = mined.iloc[:8]  # two (user, positive) pairs, 4 negatives each
    users = torch.from_numpy(data.users.to_index(first["user_id"].iloc[[0, 4]]))
    pos = torch.from_numpy(data.items.to_index(first["item_id"].iloc[[0, 4]]))
    from recsys_hnm.sampling import Context

    ctx = Context(users, pos)
    listed = [sorted(data.items.to_index(first["negative_id"].iloc[4 * r:4 * r + 4]).tolist()) for r in range(2)]
    draws = sampler.sample(ctx, 200, torch.Generator().manual_seed(0))
    assert [sorted(set(row.tolist())) == sorted(set(lst)) for row, lst in zip(draws, listed)] == [True, True]
    for r in range(2):
        items = torch.tensor(listed[r])
        expected = [np.log(listed[r].count(i) / 4) for i in listed[r]]
        assert sampler.log_prob(Context(users[r:r + 1], pos[r:r + 1]), items[None])[0].tolist() == pytest.approx(expected)
    user_0 = mined[mined.user_id == first["user_id"].iloc[0]]
    unlisted = int(np.setdiff1d(np.arange(data.n_items), data.items.to_index(user_0["item_id"]))[0])
    other = Context(users[:1], torch.tensor([unlisted]))  # a positive the file does not list for this user
    assert sampler.fallback_rows(other).item()
    assert sampler.log_prob(other, torch.tensor([[0]])).item() == pytest.approx(-np.log(data.n_items))
    trainer, _ = build_trainer(static, data, split, build_sampler(static, data, split), [], tmp_path, epochs=1)
    assert np.isfinite(trainer.fit()[-1]["train_loss"])


def test_mining_a_run_with_hard_roles_uses_the_mining_sources_only(synthetic_files, tmp_path):
    from recsys_hnm.data import read_table
    from recsys_hnm.experiment import train
    from recsys_hnm.experiment.offline import mine

    config = small_config(synthetic_files, tmp_path, train={"epochs": 1}, sampler={
        "mixture": {"in_batch": 1.0, "uniform": 1.0, "category": 1.0}, "hard": ["category"], "per_row_negatives": 8})
    run_id = train(config).run_id
    out = tmp_path / "mined.CSV"  # the suffix decides the format, whatever its case
    assert mine(run_id, str(out), sources=("category",), per_positive=2, uri=config.tracking.uri, progress=False) > 0
    assert set(read_table(out)["source"]) == {"category"}


def test_items_above_counts_strictly_higher_scores_with_ties_and_masked_items():
    from recsys_hnm.experiment.offline import items_above

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (20, 300), generator=gen).float()  # many ties
    scores[scores == -3] = float("-inf")  # masked (known) items
    values = torch.randint(-2, 4, (20, 40), generator=gen).float()
    values[:, -5:] = float("inf")  # the padding of a grid
    assert torch.equal(items_above(scores, values), (scores[:, None, :] > values[:, :, None]).sum(2))
