"""Per-position training pieces: sequences, causal position outputs, the chunked full softmax."""

import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recsys_hnm.models import FeatureBuilder, HistoryEncoder, TowerSizes, TwoTower
from recsys_hnm.training.sequence import chunked_full_softmax, end_weights, next_item_sequences


def _sequences(events: dict[int, list[int]]):
    users = sorted(events)
    items = torch.tensor([i for u in users for i in events[u]])
    lengths = torch.tensor([len(events[u]) for u in users])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return items, starts, lengths


def test_next_item_sequences_pair_each_step_with_the_next():
    items, starts, lengths = _sequences({0: [10, 11, 12, 13], 1: [20], 2: [30, 31]})
    inputs, targets = next_item_sequences(items, starts, lengths, torch.tensor([0, 1, 2]), 3)
    assert inputs.tolist() == [[10, 11, 12], [-1, -1, -1], [-1, -1, 30]]
    assert targets.tolist() == [[11, 12, 13], [-1, -1, -1], [-1, -1, 31]]
    short, short_t = next_item_sequences(items, starts, lengths, torch.tensor([0]), 2)  # the last 3 events
    assert short.tolist() == [[11, 12]] and short_t.tolist() == [[12, 13]]


def test_end_weights_lean_toward_the_end_and_average_one():
    real = torch.tensor([[False, True, True, True], [False, False, False, True]])
    ends, seq_len = torch.tensor([4, 2]), torch.tensor([4, 2])  # windows over whole histories of 4 and 2 events
    flat = end_weights(real, ends, seq_len, 0.0)
    assert torch.allclose(flat[real], torch.ones(4)) and (flat[~real] == 0).all()
    lean = end_weights(real, ends, seq_len, 1.0)
    assert torch.isclose(lean[real].mean(), torch.tensor(1.0)) and lean[0, 1] < lean[0, 2] < lean[0, 3]
    assert torch.isclose(lean[0, 3], lean[1, 3])  # each user's latest event weighs the same


def test_end_weights_follow_the_event_across_the_windows_of_a_long_history():
    """45 events in windows of 20: the end of an older window is not recent, so the weights rise
    with the event over the whole history (by place in the window they would repeat each window)."""
    seq_len = torch.tensor([45])
    users, ends = sequence_windows(seq_len, 20)
    _, targets = next_item_sequences(torch.arange(45), torch.tensor([0]), seq_len, users, 20, ends)
    real = targets >= 0
    w = end_weights(real, ends, seq_len[users], 1.0)
    by_event = w[real][torch.argsort(targets[real])]
    assert sorted(targets[real].tolist()) == list(range(1, 45)) and (by_event.diff() > 0).all()


def _model(n_items=40, dim=16, L=6, seed=0):
    torch.manual_seed(seed)
    return TwoTower(TowerSizes(5, n_items, 0), dim=dim, hidden=[32], encoder=HistoryEncoder("sasrec", history_len=L, dropout=0.0)).eval()


def test_no_position_sees_its_target_or_anything_after_it():
    model = _model()
    history = torch.tensor([[-1, 3, 7, 1, 9, 4], [5, 6, 2, 8, 11, 12]])
    out = model.position_embeddings(history)
    for i in range(5):
        changed = history.clone()
        changed[:, i + 1:] = torch.where(changed[:, i + 1:] >= 0, 20 + changed[:, i + 1:], -1)  # every later item replaced
        again = model.position_embeddings(changed)
        assert torch.allclose(out[:, :i + 1], again[:, :i + 1], atol=1e-6)
        assert not torch.allclose(out[:, i + 1:], again[:, i + 1:], atol=1e-4)


def test_the_last_position_is_the_user_vector_of_last_item_inference():
    model = _model()
    events = pd.DataFrame({"user": [0, 0, 0, 1, 1], "item": [3, 7, 1, 5, 6], "timestamp": [1.0, 2, 3, 1, 2]})
    features = FeatureBuilder(events, 5, sp.csr_matrix((40, 0)), history_len=6, user_id=False)
    users = torch.tensor([0, 1])
    served = model.user_embeddings(features.user_features(users))
    history = torch.tensor([[-1, -1, -1, 3, 7, 1], [-1, -1, -1, -1, 5, 6]])
    assert torch.allclose(model.position_embeddings(history)[:, -1], served, atol=1e-5)


def test_chunked_full_softmax_equals_the_dense_one_value_and_gradient():
    torch.manual_seed(0)
    P, n, d = 7, 23, 5
    user = F.normalize(torch.randn(P, d), dim=-1).requires_grad_()
    items = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    bias = torch.randn(n).requires_grad_()
    scale = torch.tensor(4.0, requires_grad=True)
    targets = torch.randint(0, n, (P,))
    rows = torch.tensor([0, 0, 3, 5, 6, 6])
    cols = torch.tensor([1, 9, 22, 4, 0, int(targets[6])])  # the last is row 6's own target: it stays in
    loss = chunked_full_softmax(user, items, targets, scale, bias, (rows, cols), chunk=4)
    grads = torch.autograd.grad(loss.square().sum(), [user, items, bias, scale])
    logits = scale * user @ items.T + bias
    mask = torch.zeros(P, n, dtype=torch.bool)
    mask[rows[:-1], cols[:-1]] = True
    dense = F.cross_entropy(logits.masked_fill(mask, float("-inf")), targets, reduction="none")
    dense_grads = torch.autograd.grad(dense.square().sum(), [user, items, bias, scale])
    assert torch.allclose(loss, dense, atol=1e-5)
    for got, want in zip(grads, dense_grads):
        assert torch.allclose(got, want, atol=1e-4)


def _cycle_batch(n_items, L, B, generator):
    """Sequences that step through the catalog: the item after i is i + 1 (mod n)."""
    start = torch.randint(0, n_items, (B, 1), generator=generator)
    seq = (start + torch.arange(L + 1)) % n_items
    return seq[:, :-1], seq[:, 1:]


def _train(per_position: bool, steps=40, n_items=40, L=6, seed=0) -> float:
    model = _model(n_items, L=L, seed=seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    all_items = torch.arange(n_items)
    from recsys_hnm.models.two_tower import kjt, ITEM_ID

    def item_matrix():
        return model.item_embeddings(kjt(n_items, {ITEM_ID: (torch.ones(n_items, dtype=torch.long), all_items, None)}))

    for _ in range(steps):
        inputs, targets = _cycle_batch(n_items, L, 32, generator)
        out = model.position_embeddings(inputs)
        if not per_position:  # last-item training: one (sequence, next item) pair per sequence
            out, targets = out[:, -1:], targets[:, -1:]
        loss = chunked_full_softmax(out.reshape(-1, out.shape[-1]), item_matrix(), targets.reshape(-1), model.scale).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        inputs, targets = _cycle_batch(n_items, L, 256, torch.Generator().manual_seed(99))
        scores = model.position_embeddings(inputs)[:, -1] @ item_matrix().T
        return float((scores.argmax(1) == targets[:, -1]).float().mean())


def test_a_sequence_task_is_learned_faster_per_position_than_from_the_last_item():
    per_position = [_train(True, seed=s) for s in (0, 1)]
    last_item = [_train(False, seed=s) for s in (0, 1)]
    assert min(per_position) > max(last_item) + 0.1, (per_position, last_item)


# -- per-position training in the Trainer --------------------------------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import small_config  # noqa: E402
from recsys_hnm.config import ConfigError  # noqa: E402
from recsys_hnm.data import leave_last_out, synthetic  # noqa: E402
from recsys_hnm.experiment import train  # noqa: E402
from recsys_hnm.experiment.run import build_sampler, build_trainer, training_stream  # noqa: E402
from recsys_hnm.sampling import Context  # noqa: E402
from recsys_hnm.training.sequence import sequence_windows  # noqa: E402

PER_POSITION = {"history_encoder": "sasrec", "train_history": "per_position", "history_len": 8, "dim": 16,
                "hidden": [16], "user_id": False}


def test_windows_make_every_event_but_the_first_a_target_once():
    items, starts, lengths = _sequences({0: [1, 2, 3, 4, 5, 6, 7], 1: [8], 2: [9, 10], 3: [11, 12, 13, 14]})
    users, ends = sequence_windows(lengths, 3)
    _, targets = next_item_sequences(items, starts, lengths, users, 3, ends)
    got = sorted(int(t) for t in targets[targets >= 0])
    assert got == [2, 3, 4, 5, 6, 7, 10, 12, 13, 14]


@pytest.fixture(scope="module")
def seq_data():
    data = synthetic(60, 80, 1500, n_categories=4, seed=2)
    return data, leave_last_out(data)


def _seq_trainer(seq_data, tmp_path, mixture=None, **sampler):
    data, split = seq_data
    config = small_config({}, tmp_path, data={"dataset": "ml-latest-small"}, model=PER_POSITION,  # the data: seq_data's
                          sampler={"num_negatives": 16, "mixture": mixture or {"in_batch": 1.0, "uniform": 1.0}, **sampler})
    mix = build_sampler(config, data, split)
    trainer, refresh = build_trainer(config, data, split, mix, [], tmp_path / "index", epochs=1, validate=False)
    return config, trainer, refresh


def _rows(trainer, users, ends):
    inputs, targets = next_item_sequences(trainer.features.seq_items, trainer.features.seq_start, trainer.seq_len, users,
                                          trainer.model.history_len, ends)
    real = targets >= 0
    return users[:, None].expand_as(targets)[real], targets[real]


def test_in_batch_stream_is_the_per_position_targets_and_the_logq_their_exact_expected_count(seq_data, tmp_path):
    data, split = seq_data
    config, trainer, _ = _seq_trainer(seq_data, tmp_path)
    _, targets = _rows(trainer, trainer.users, trainer.ends)  # one epoch's rows
    counts = np.bincount(targets.numpy(), minlength=data.n_items)
    assert (training_stream(config, split.train, data.n_items) == counts).all()
    users, pos = _rows(trainer, trainer.users[:10], trainer.ends[:10])
    ctx = Context(users, pos)
    P, n = len(pos), data.n_items
    for block in trainer.sampler.sample(ctx, torch.Generator().manual_seed(0)):
        expected = (P - 1) * counts[block.items.numpy()] / counts.sum() + 16 / n  # in-batch P - 1 draws, 16 uniform
        assert torch.allclose(block.log_q[0].double(), torch.tensor(np.log(expected)), atol=1e-5)


def test_no_position_gets_its_target_or_any_item_of_its_user_as_a_negative(seq_data, tmp_path):
    data, split = seq_data
    _, trainer, _ = _seq_trainer(seq_data, tmp_path)
    users, ends = trainer.users[:12], trainer.ends[:12]
    rows_users, pos = _rows(trainer, users, ends)
    out = trainer.sequence_step(users, ends)
    own = split.matrix("train").tocsr()
    for block in out.blocks:
        items = block.per_row_items(len(pos))
        valid = ~block.invalid
        for r in range(len(pos)):
            user_items = set(own[int(rows_users[r])].indices) | {int(pos[r])}
            assert not user_items & set(items[r][valid[r]].tolist())
    assert all(b.invalid.any() for b in out.blocks if b.source == 0)  # in-batch: a sequence's own targets are there and masked


def test_chunked_full_softmax_in_a_step_equals_the_mixture_dense_full_softmax(seq_data, tmp_path):
    _, trainer, _ = _seq_trainer(seq_data, tmp_path, mixture={"full": 1.0})
    assert trainer.full_softmax
    users, ends = trainer.users[:9], trainer.ends[:9]
    rows_users, pos = _rows(trainer, users, ends)
    trainer.model.eval()
    with torch.no_grad():
        inputs, _ = next_item_sequences(trainer.features.seq_items, trainer.features.seq_start, trainer.seq_len, users, 8, ends)
        user_emb = trainer.model.position_embeddings(inputs)[inputs >= 0]
        ctx = Context(rows_users, pos)
        chunked = trainer._full_softmax(ctx, user_emb, None)
        blocks = trainer.sampler.sample(ctx, torch.Generator())
        unique, inverse = torch.unique(torch.cat([pos] + [b.items for b in blocks]), return_inverse=True)
        item_emb = trainer.model.item_embeddings(trainer.features.item_features(unique))
        dense, _ = trainer._objective(ctx, blocks, user_emb, item_emb, inverse)
    assert torch.isclose(chunked, dense, atol=1e-5)


def test_position_anchored_index_mining_pools_are_each_positions_exact_neighbours(seq_data, tmp_path):
    data, split = seq_data
    ann = {"anchor": "position", "window": [2, 12], "warmup_epochs": 0, "backend": "exact", "recall_sample": 10}
    _, trainer, refresh = _seq_trainer(seq_data, tmp_path, mixture={"in_batch": 1.0, "uniform": 0.5, "ann": 0.5}, ann=ann)
    assert trainer.position_miner == refresh.mine_positions
    refresh.on_fit_start(trainer)
    refresh.on_epoch_start(trainer, 0)
    users, ends = trainer.users[:6], trainer.ends[:6]
    indexed, _ = refresh.vectors(trainer)  # what the refresh indexed; the step then moves the model
    seen = {}
    trainer.position_miner = lambda q, u: (seen.update(q=q, u=u), refresh.mine_positions(q, u))
    trainer.sequence_step(users, ends)
    q, u = seen["q"], seen["u"]
    scores = q @ torch.as_tensor(indexed).T
    own = split.matrix("train").tocsr()
    sampler = refresh.sampler
    for r in range(len(q)):
        s = scores[r].clone()
        s[own[int(u[r])].indices] = float("-inf")
        window = set(torch.argsort(s, descending=True)[2:12].tolist())
        assert set(sampler.pools[r][: int(sampler.sizes[r])].tolist()) == window


def test_per_position_trains_end_to_end_and_refuses_what_it_cannot_do(synthetic_files, tmp_path):
    model = {**PER_POSITION, "history_len": 20}
    result = train(small_config(synthetic_files, tmp_path, model=model, sampler={"num_negatives": 64, "select": {"mode": "hardest", "k": 32}},
                                train={"epochs": 2, "batch_size": 32, "position_weight": 1.0}))
    assert result.test["ndcg@10"] > 0 and "select.qualified_per_row" in result.history[-1]
    with pytest.raises(ConfigError, match="model.history_encoder=sasrec"):
        small_config(synthetic_files, tmp_path, model={**model, "history_encoder": "bag"})
    with pytest.raises(ConfigError, match="train.position_weight"):
        small_config(synthetic_files, tmp_path, train={"position_weight": 1.0})
    with pytest.raises(ConfigError, match="sampler.ann.anchor"):
        small_config(synthetic_files, tmp_path, sampler={"mixture": {"uniform": 1.0, "ann": 1.0}, "ann": {"anchor": "position"}})
    with pytest.raises(ConfigError, match="sampler.select.mode='hardest'"):  # the exact softmax has nothing to select from
        small_config(synthetic_files, tmp_path, model=model, sampler={"mixture": {"full": 1.0}, "select": {"mode": "hardest", "k": 8}})


def test_gbce_is_bce_at_zero_and_weighs_the_positive_by_the_sampling_rate_at_one():
    from recsys_hnm.training.losses import gbce
    pos, neg = torch.tensor([1.5, -0.5]), torch.tensor([[0.2, -1.0, 3.0], [0.0, 0.5, -2.0]])
    invalid = torch.tensor([[False, False, True], [False, False, False]])
    keep = ~invalid
    bce = (-F.logsigmoid(pos) - (torch.log1p(-torch.sigmoid(neg)) * keep).sum(1)).mean()
    assert torch.isclose(gbce(pos, neg, invalid, 101, 0.0), bce)
    alpha = keep.sum(1) / 100.0  # 2 and 3 negatives of 100 others
    calibrated = (-alpha * F.logsigmoid(pos) - (torch.log1p(-torch.sigmoid(neg)) * keep).sum(1)).mean()
    assert torch.isclose(gbce(pos, neg, invalid, 101, 1.0), calibrated)
    with pytest.raises(ValueError, match="calibration"):
        gbce(pos, neg, invalid, 101, 1.5)


def test_the_epoch_loss_of_per_position_training_averages_over_positions(seq_data, tmp_path, monkeypatch):
    """Windows hold different numbers of real positions: the epoch's loss is the mean over
    positions (each step's mean weighted by its positions), not over windows."""
    _, trainer, _ = _seq_trainer(seq_data, tmp_path)
    seen = []
    real_step = trainer.sequence_step

    def step(users, ends):
        out = real_step(users, ends)
        seen.append((out.loss, out.rows, int(_rows(trainer, users, ends)[0].numel())))
        return out

    monkeypatch.setattr(trainer, "sequence_step", step)
    trainer.batch_size = 7  # uneven batches
    epoch_loss = trainer.train_epoch(0)
    assert all(rows == n for _, rows, n in seen)  # a step's rows are its real positions
    expected = sum(loss * rows for loss, rows, _ in seen) / sum(rows for _, rows, _ in seen)
    assert epoch_loss == pytest.approx(expected)
