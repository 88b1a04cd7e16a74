"""Per-position training pieces: sequences, causal position outputs, the chunked full softmax."""

import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recsys_hnm.models import FeatureBuilder, TowerSizes, TwoTower
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
    flat = end_weights(real, 0.0)
    assert torch.allclose(flat[real], torch.ones(4)) and (flat[~real] == 0).all()
    lean = end_weights(real, 1.0)
    assert torch.isclose(lean[real].mean(), torch.tensor(1.0)) and lean[0, 1] < lean[0, 2] < lean[0, 3]


def _model(n_items=40, dim=16, L=6, seed=0):
    torch.manual_seed(seed)
    return TwoTower(TowerSizes(5, n_items, 0), dim=dim, hidden=[32], history_encoder="sasrec", history_len=L, dropout=0.0).eval()


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
