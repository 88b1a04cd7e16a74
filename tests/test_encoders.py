"""History encoders (bag, learned_recency, last_k, sasrec) and cold items scored from their features.

The sequence data is hand-built so that only the last item predicts the next one: each user's
sequence is pairs (r, perm(r)) of a random item followed by its fixed successor. A mean of the
history cannot tell which item came last; the sequence encoders can.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from recsys_hnm.data import Interactions
from recsys_hnm.evaluation import Evaluator
from recsys_hnm.experiment import build_features, build_sampler, build_trainer
from recsys_hnm.models import model_scorer
from recsys_hnm.models.features import FeatureBuilder
from recsys_hnm.models.two_tower import HISTORY_ENCODERS, HistoryEncoder, SelfAttentiveEncoder, TowerSizes, TwoTower

from conftest import small_config

ENCODER_ARGS = {"bag": {}, "learned_recency": {"decay": 0.5}, "last_k": {"last_k": 3},
                "sasrec": {"layers": 2, "heads": 2, "dropout": 0.0}}


@pytest.mark.parametrize("encoder", HISTORY_ENCODERS)
def test_no_encoder_sees_the_positive_or_anything_after_it(encoder):
    # one user, items 0..7 in time order; the training row of the positive at position 5
    events = pd.DataFrame({"user": 0, "item": np.arange(8), "timestamp": np.arange(8)})
    later_changed = events.assign(item=[0, 1, 2, 3, 4, 9, 8, 10])  # the positive and later items differ
    earlier_changed = events.assign(item=[0, 1, 2, 3, 11, 5, 6, 7])  # the item just before differs
    torch.manual_seed(0)
    model = TwoTower(TowerSizes(1, 12, 1), dim=8, hidden=[8],
                     encoder=HistoryEncoder(encoder, history_len=4, **ENCODER_ARGS[encoder])).eval()

    def row_embedding(log):
        fb = FeatureBuilder(log, 1, sp.csr_matrix((12, 1)), history_len=4, user_id=False)
        positions = fb.event_positions(log)
        return model.user_embeddings(fb.user_features_before(torch.tensor([0]), positions[5:6]))

    base = row_embedding(events)
    assert torch.equal(base, row_embedding(later_changed))
    assert not torch.allclose(base, row_embedding(earlier_changed))


def test_sasrec_blocks_compute_what_the_torch_transformer_computes():
    # the encoder runs its blocks' forward itself (last block from the last query only, fused
    # attention); at eval it must give the user vector nn.TransformerEncoder's own forward gives,
    # with padding, empty histories and full ones in the batch; in training, dropout must act
    torch.manual_seed(0)
    encoder = SelfAttentiveEncoder(16, max_len=6, layers=2, heads=2, dropout=0.3).eval()
    items = torch.randn(5, 6, 16)
    valid = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    items = items * valid[..., None]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    allowed = (causal & valid[:, None, :]) | torch.eye(6, dtype=torch.bool)
    x = items + encoder.positions.weight
    reference = encoder.norm(encoder.blocks(x, mask=~allowed.repeat_interleave(2, dim=0))[:, -1])
    torch.testing.assert_close(encoder(items, valid), reference, rtol=1e-5, atol=1e-5)
    encoder.train()
    assert not torch.allclose(encoder(items, valid), reference, atol=1e-3)


@pytest.mark.parametrize("encoder", ["learned_recency", "last_k", "sasrec"])
def test_sequence_encoders_read_order_and_ignore_padding(encoder):
    # the same items in another order give another user vector; empty histories stay finite
    torch.manual_seed(0)
    model = TwoTower(TowerSizes(3, 6, 1), dim=8, hidden=[8],
                     encoder=HistoryEncoder(encoder, history_len=4, **ENCODER_ARGS[encoder])).eval()
    log = pd.DataFrame({"user": [0, 0, 0, 1, 1, 1], "item": [1, 2, 3, 3, 2, 1], "timestamp": [1, 2, 3, 1, 2, 3]})
    emb = model.user_embeddings(FeatureBuilder(log, 3, sp.csr_matrix((6, 1)), history_len=4, user_id=False)
                                .user_features(torch.arange(3)))
    assert torch.isfinite(emb).all() and not torch.allclose(emb[0], emb[1])
    with pytest.raises(ValueError, match="longer than history_len"):
        five = pd.DataFrame({"user": 0, "item": [1, 2, 3, 4, 5], "timestamp": range(5)})
        model.user_embeddings(FeatureBuilder(five, 3, sp.csr_matrix((6, 1)), history_len=5).user_features(torch.arange(3)))


def _successor_files(tmp_path, n_train_users=2000, n_test_users=500, n_context=20, seq_len=5, seed=0):
    """Each user sees ``seq_len`` distinct context items in random order, then the successor
    s(last context item), one of another 20 items. Training users' sequences are all in train;
    test users have the first context items in train, the last in valid, the successor in test."""
    rng = np.random.default_rng(seed)
    successor = n_context + rng.permutation(n_context)
    phases = {"train": [], "valid": [], "test": []}
    for user in range(n_train_users + n_test_users):
        seq = [*rng.choice(n_context, size=seq_len, replace=False).tolist()]
        seq.append(int(successor[seq[-1]]))
        rows = [(user, item, t) for t, item in enumerate(seq)]
        if user < n_train_users:
            phases["train"] += rows
        else:
            phases["train"] += rows[:-2]
            phases["valid"].append(rows[-2])
            phases["test"].append(rows[-1])
    paths = {}
    for phase, rows in phases.items():
        paths[phase] = tmp_path / f"{phase}.csv"
        pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(paths[phase], index=False)
    paths["items"] = tmp_path / "items.csv"
    pd.DataFrame({"item_id": np.arange(2 * n_context), "category": 0}).to_csv(paths["items"], index=False)
    return paths


def _fit_and_test(config):
    from recsys_hnm.experiment import load_data

    data, split = load_data(config)
    trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], config.train.checkpoint_dir,
                               validate=False)
    trainer.fit()
    scorer = model_scorer(trainer.model, trainer.features.with_history(split.history("test")))
    return Evaluator(split, "test", [1]).evaluate(scorer)["hr@1"]


def test_only_sequence_encoders_learn_that_the_last_item_predicts_the_next(tmp_path):
    files = _successor_files(tmp_path)
    hits = {}
    for encoder in HISTORY_ENCODERS:
        config = small_config(files, tmp_path, model={
            "dim": 32, "hidden": [64], "history_len": 10, "user_id": False, "train_history": "causal",
            "history_encoder": encoder, "last_k": 2, "attention_layers": 1, "attention_dropout": 0.0,
            "history_decay": 0.9 if encoder == "learned_recency" else 1.0},
            train={"epochs": 8, "batch_size": 256, "lr": 0.003, "patience": 0, "progress": False,
                   "checkpoint_dir": str(tmp_path / "ckpt")})
        hits[encoder] = _fit_and_test(config)
    # the mean cannot know which of the five random items came last: at best about 1 in 5
    assert hits["bag"] < 0.3, hits
    assert hits["last_k"] > 0.9 and hits["sasrec"] > 0.9, hits
    # learned weights per age: from a near-flat start (0.9 ** age) to the last item
    assert hits["learned_recency"] > 0.9, hits


def test_a_cold_item_is_ranked_by_its_category(tmp_path):
    # two categories of 20 items; each user buys within one category only. Item 19 (category 0)
    # and item 39 (category 1) never occur in training: with id dropout their scores come from
    # the category, so category-0 users rank item 19 above item 39, and the reverse.
    rng = np.random.default_rng(1)
    phases = {"train": [], "valid": [], "test": []}
    for user in range(400):
        cat = user % 2
        items = (rng.choice(19, size=9, replace=False) + 20 * cat).tolist()
        items[-1] = 19 + 20 * cat if user % 4 < 2 else items[-1]  # half the users' test item is the cold one
        phases["train"] += [(user, i, t) for t, i in enumerate(items[:-2])]
        phases["valid"].append((user, items[-2], 7))
        phases["test"].append((user, items[-1], 8))
    paths = {}
    for phase, rows in phases.items():
        paths[phase] = tmp_path / f"{phase}.csv"
        pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(paths[phase], index=False)
    paths["items"] = tmp_path / "items.csv"
    pd.DataFrame({"item_id": np.arange(40), "category": np.arange(40) // 20}).to_csv(paths["items"], index=False)
    config = small_config(paths, tmp_path, model={"dim": 16, "hidden": [32], "history_len": 10, "user_id": False,
                                                   "item_id_dropout": 0.5},
                          train={"epochs": 6, "batch_size": 128, "lr": 0.01, "patience": 0, "progress": False,
                                 "checkpoint_dir": str(tmp_path / "ckpt")})
    from recsys_hnm.experiment import load_data

    data, split = load_data(config)
    trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path, validate=False)
    trainer.fit()
    cold = data.items.to_index(np.array([19, 39]))
    assert trainer.features.no_id[cold].all() and trainer.features.no_id.sum() == 2
    scores = model_scorer(trainer.model, trainer.features)(torch.arange(data.n_users))[:, cold]
    user_cat = torch.tensor(data.users.to_raw(np.arange(data.n_users)) % 2)
    prefers_own = torch.where(user_cat == 0, scores[:, 0] > scores[:, 1], scores[:, 1] > scores[:, 0])
    assert prefers_own.float().mean() > 0.95
    # the cold items' id rows play no part: overwrite them with noise and nothing changes, whereas a
    # builder that keeps ids (the default, no id dropout) scores the noise
    table = trainer.model.ebc.embedding_bags["item_table"].weight
    with torch.no_grad():
        table[torch.from_numpy(cold)] = torch.randn(2, table.shape[1]) * 10
    assert torch.equal(scores, model_scorer(trainer.model, trainer.features)(torch.arange(data.n_users))[:, cold])
    keeps_ids = build_features(small_config(paths, tmp_path), data, split.history("train"))
    assert not keeps_ids.no_id.any()
    assert not torch.allclose(scores, model_scorer(trainer.model, keeps_ids)(torch.arange(data.n_users))[:, cold])


def test_item_features_from_the_items_file_become_tokens_of_the_item_tower(tmp_path):
    events = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "item_id": [10, 11, 10, 12, 11, 12], "timestamp": range(6)})
    items = pd.DataFrame({"item_id": [10, 11, 12, 13], "category": ["a", "a|b", "b", "c"],
                          "brand": ["x", None, "y", "z"], "price": [1.0, 2.0, 30.0, 4.0]})
    data = Interactions.from_frames(events, items)
    names, m = data.item_attributes(["brand", "price"], bins=2)
    # brand: 2 tokens (item 11 has none; item 13 has no events, so it is not in the catalog);
    # price: 3 values > 2 bins, cut into 2 quantile bins
    assert names[:2] == ["brand=x", "brand=y"] and len(names) == 4 and names[2].startswith("price=")
    assert m.toarray().tolist() == [[1, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 1]]
    with pytest.raises(Exception, match=r"item feature column\(s\) \['colour'\] are not in the item metadata"):
        data.item_attributes(["colour"])
    # through a config: the item tower's side bag holds categories then the tokens
    paths = {}
    for phase, rows in (("train", events.iloc[:4]), ("valid", events.iloc[4:5]), ("test", events.iloc[5:])):
        paths[phase] = tmp_path / f"{phase}.csv"
        rows.to_csv(paths[phase], index=False)
    paths["items"] = tmp_path / "items.csv"
    items.to_csv(paths["items"], index=False)
    from recsys_hnm.config import ConfigError
    from recsys_hnm.experiment import build_model, item_side_features, load_data

    config = small_config(paths, tmp_path, data={"item_features": ["brand"]})
    data, _ = load_data(config)
    side = item_side_features(config, data)
    assert side.shape == (3, 2 + 2) and side[2].toarray().tolist() == [[0, 1, 0, 1]]  # item 12: category b, brand y
    assert build_model(config, data).sizes.n_categories == 4
    with pytest.raises(ConfigError, match="data.item_features: .*'colour'"):
        item_side_features(small_config(paths, tmp_path, data={"item_features": ["colour"]}), data)
