import numpy as np
import pytest
import scipy.sparse as sp
import torch
from mlflow.tracking import MlflowClient

from recsys_hnm.config import ConfigError, config_from_dict
from recsys_hnm.experiment import train
from recsys_hnm.index import AnnoyItemIndex, ExactIndex, HnswItemIndex, IndexFileError, IndexOptions, IvfItemIndex, load_index, make_index, recall_at_k
from recsys_hnm.sampling import AnnSampler, resolve_window
from recsys_hnm.training import IndexRefresh
from recsys_hnm.ops.io import atomic_write
from recsys_hnm.sampling import Context, MixtureSampler, UniformSampler


def clustered(n, dim, seed=0, normalise=True):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_exact_index_ranks_by_dot_product_and_excludes():
    items = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    index = ExactIndex(items)
    q = np.array([[1.0, 0.1]], np.float32)
    assert index.search(q, 4).tolist() == [[0, 1, 2, 3]]
    exclude = sp.csr_matrix(np.array([[1, 0, 1, 0]]))
    assert index.search(q, 3, exclude).tolist() == [[1, 3, -1]]


@pytest.mark.parametrize("normalise", [True, False])
def test_annoy_agrees_with_exact_on_a_small_index(tmp_path, normalise):
    items = clustered(2000, 16, normalise=normalise)
    queries = clustered(100, 16, seed=1, normalise=normalise)
    annoy = AnnoyItemIndex.build(items, tmp_path / "i.ann", n_trees=20, search_k=20_000, n_jobs=2)
    assert annoy.meta["metric"] == ("angular" if normalise else "euclidean")  # MIPS augmentation otherwise
    exact = ExactIndex(items)
    assert recall_at_k(annoy.search(queries, 20), exact.search(queries, 20)) > 0.95
    # exclusions are honoured by both
    exclude = sp.csr_matrix((np.ones(100), (np.arange(100), exact.search(queries, 1)[:, 0])), shape=(100, 2000))
    found = annoy.search(queries, 10, exclude)
    assert not (found == exclude.indices[:, None]).any()


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("backend", ["hnsw", "ivf"])
def test_faiss_indexes_agree_with_exact_and_their_files_are_validated(tmp_path, normalise, backend):
    items = clustered(2000, 16, normalise=normalise)
    queries = clustered(100, 16, seed=1, normalise=normalise)
    path = tmp_path / f"i.{backend}"
    index = make_index(items, backend, path, hnsw_m=16, ef_search=200, ivf_nprobe=16)
    assert isinstance(index, {"hnsw": HnswItemIndex, "ivf": IvfItemIndex}[backend])
    exact = ExactIndex(items)
    assert recall_at_k(index.search(queries, 20), exact.search(queries, 20)) > 0.95  # inner product, normalised or not
    exclude = sp.csr_matrix((np.ones(100), (np.arange(100), exact.search(queries, 1)[:, 0])), shape=(100, 2000))
    assert not (index.search(queries, 10, exclude) == exclude.indices[:, None]).any()
    loaded = load_index(path, dim=16, ef_search=200, ivf_nprobe=16)
    assert np.array_equal(loaded.search(queries, 10), index.search(queries, 10))
    with pytest.raises(IndexFileError, match="built for dimension 16, not 8"):
        load_index(path, dim=8)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(IndexFileError, match="truncated"):
        load_index(path, dim=16)


def test_index_files_are_validated(tmp_path):
    items = clustered(300, 8)
    path = tmp_path / "i.ann"
    AnnoyItemIndex.build(items, path, n_trees=2)
    assert load_index(path, dim=8).n_items == 300
    with pytest.raises(IndexFileError, match="built for dimension 8, not 16"):
        load_index(path, dim=16)
    with pytest.raises(IndexFileError, match="index file not found"):
        load_index(tmp_path / "missing.ann")
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, corrupted: Annoy alone would load it and crash later
    path.write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="checksum does not match"):
        load_index(path, dim=8)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match="truncated"):
        load_index(path, dim=8)
    exact_path = tmp_path / "e.pt"
    ExactIndex(items).save(exact_path)
    assert load_index(exact_path, dim=8).n_items == 300


def test_a_crash_while_writing_leaves_no_file(tmp_path):
    target = tmp_path / "items.ann"

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert list(tmp_path.iterdir()) == []


def test_window_checks():
    assert resolve_window([10, 100], 1000) == (10, 100)
    assert resolve_window([0.01, 0.1], 1000) == (10, 100)
    with pytest.raises(ValueError, match="beyond the catalog"):
        resolve_window([10, 2000], 1000)
    with pytest.raises(ValueError, match="need 0 <= lo < hi"):
        resolve_window([50, 10], 1000)


def test_pools_hold_exactly_the_window_ranks_without_known_items():
    n_items, n_users, dim = 500, 40, 8
    items = clustered(n_items, dim)
    users = clustered(n_users, dim, seed=2)
    known = sp.random(n_users, n_items, density=0.05, random_state=1, format="csr")
    known.data[:] = 1
    sampler = AnnSampler(n_items, n_users, "user", [5, 30])
    sampler.mine(ExactIndex(items), users, known)
    scores = users @ items.T
    for u in range(n_users):
        s = scores[u].copy()
        s[known[u].indices] = -np.inf
        expected = set(np.argsort(-s, kind="stable")[5:30].tolist())
        pool = set(sampler.pools[u][: sampler.sizes[u]].tolist())
        assert pool == expected
        assert not pool & set(known[u].indices.tolist())
    # draws come from the pool and log_prob is uniform over it
    ctx = Context(torch.arange(n_users), torch.zeros(n_users, dtype=torch.long))
    draws = sampler.sample(ctx, 50, torch.Generator().manual_seed(0))
    for u in range(n_users):
        assert set(draws[u].tolist()) <= set(sampler.pools[u][: sampler.sizes[u]].tolist())
    lp = sampler.log_prob(ctx, draws)
    assert torch.allclose(lp.exp(), torch.full_like(lp, 1 / 25))
    assert sampler.log_prob(ctx, torch.full((n_users, 1), int(known[0].indices[0])))[0].exp().item() == 0.0


class _Model:
    """Stands in for a TwoTower whose embeddings the test sets directly."""

    item_bias = None


def test_refresh_remines_after_embeddings_change(monkeypatch):
    import recsys_hnm.training.refresh as refresh_mod

    n_items, n_users = 300, 20
    state = {"items": torch.from_numpy(clustered(n_items, 8, seed=0)), "users": torch.from_numpy(clustered(n_users, 8, seed=1))}
    monkeypatch.setattr(refresh_mod, "item_embeddings", lambda model, features: state["items"])
    monkeypatch.setattr(refresh_mod, "user_embeddings", lambda model, features: state["users"])
    ann = AnnSampler(n_items, n_users, "user", [5, 50])
    mix = MixtureSampler({"uniform": UniformSampler(n_items), "ann": ann}, {"uniform": 0.5, "ann": 0.5}, 10)
    cb = IndexRefresh(ann, mix, exclude=None, backend="annoy", warmup_epochs=1, ramp_epochs=2, index_options=IndexOptions(n_trees=10), recall_sample=20)
    trainer = type("T", (), {"model": _Model(), "features": None, "epoch": 0, "cluster": None,
                            "unsharded_model": lambda self: self.model})()
    cb.on_fit_start(trainer)
    assert mix.counts == {"uniform": 10}  # warm-up: no ANN draws
    cb.on_epoch_start(trainer, 0)
    assert cb.stats == {"ann.weight": 0.0} and (ann.sizes == 0).all()
    cb.on_epoch_start(trainer, 1)
    assert mix.weights["ann"] == 0.25 and mix.counts == {"uniform": 7, "ann": 3}  # ramp: half of 0.5
    first = ann.pools.clone()
    assert cb.stats["ann.recall_at_k"] > 0.8 and cb.stats["ann.build_s"] >= 0
    cb.on_epoch_start(trainer, 2)  # same embeddings: same pools
    assert cb.stats["ann.pool_overlap"] > 0.9 and mix.weights["ann"] == 0.5
    state["items"] = torch.from_numpy(clustered(n_items, 8, seed=7))
    cb.on_epoch_start(trainer, 3)
    assert not torch.equal(first, ann.pools)
    assert cb.stats["ann.pool_overlap"] < 0.5
    logs = {}
    cb.on_epoch_end(trainer, 3, logs)
    assert {"ann.mine_s", "ann.recall_at_k", "ann.pool_overlap", "ann.weight"} <= set(logs)


def test_bad_ann_configs_are_refused():
    with pytest.raises(ConfigError, match="sampler.ann.refresh_every"):
        config_from_dict({"sampler": {"ann": {"refresh_every": 0}}})
    with pytest.raises(ConfigError, match="sampler.ann.window"):
        config_from_dict({"sampler": {"ann": {"window": [100, 10]}}})
    with pytest.raises(ConfigError, match="sampler.ann.ivf_nprobe: must be > 0"):
        config_from_dict({"sampler": {"ann": {"backend": "ivf", "ivf_nprobe": 0}}})
    with pytest.raises(ConfigError, match="sampler.ann.backend"):
        config_from_dict({"sampler": {"ann": {"backend": "ivfpq"}}})
    with pytest.raises(ConfigError, match="ann needs another source"):
        config_from_dict({"sampler": {"mixture": {"ann": 1.0}}})


def test_ann_mixture_trains_on_the_shipped_dataset(tmp_path):
    config = config_from_dict({
        "name": "ann-test",
        "model": {"dim": 32, "hidden": [64]},
        "sampler": {"num_negatives": 64, "mixture": {"in_batch": 1.0, "uniform": 0.5, "ann": 0.5},
                    "ann": {"window": [10, 100], "warmup_epochs": 1, "backend": "annoy", "n_trees": 5, "recall_sample": 50}},
        "train": {"epochs": 2, "batch_size": 2048, "lr": 0.005, "patience": 0, "progress": False,
                  "checkpoint_dir": str(tmp_path / "ckpt")},
        "eval": {"ks": [10]},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "experiment": "ann"},
    })
    result = train(config)
    client = MlflowClient(config.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("ann.build_s", "ann.mine_s", "ann.recall_at_k", "ann.pool_mean_size", "neg.ann.false_negative_rate", "neg.ann.rank"):
        assert key in run.data.metrics, key
    weights = [m.value for m in client.get_metric_history(result.run_id, "ann.weight")]
    assert weights == [0.0, 0.5]
    # hard negatives are harder than uniform ones: higher score, better (lower) rank
    assert run.data.metrics["neg.ann.score"] > run.data.metrics["neg.uniform.score"]
    assert run.data.metrics["neg.ann.rank"] < run.data.metrics["neg.uniform.rank"]
    assert {"index/items.index", "index/items.index.json"} <= {a.path for a in client.list_artifacts(result.run_id, "index")}


def test_refresh_mines_the_window_of_the_real_model_with_item_bias():
    """The refresh embeds with the trainer's own model (no stand-ins) and, with an item bias, mines
    by the full score u.v / T + b (the MIPS path): pools are exactly the window of those ranks."""
    from recsys_hnm.data import leave_last_out, synthetic
    from recsys_hnm.models import FeatureBuilder, TowerSizes, TwoTower, model_scorer

    data = synthetic(60, 150, 1500, n_categories=4, seed=2)
    split = leave_last_out(data)
    torch.manual_seed(0)
    model = TwoTower(TowerSizes(data.n_users, data.n_items, data.n_categories), dim=8, hidden=[8], item_bias=True)
    with torch.no_grad():
        model.item_bias.copy_(torch.linspace(-3, 3, data.n_items))  # large enough to reorder ranks
    features = FeatureBuilder(split.history("train"), data.n_users, data.item_categories, 20)
    known = split.matrix("train")
    ann = AnnSampler(data.n_items, data.n_users, "user", [3, 20])
    mix = MixtureSampler({"uniform": UniformSampler(data.n_items), "ann": ann}, {"uniform": 0.5, "ann": 0.5}, 10)
    cb = IndexRefresh(ann, mix, exclude=known, backend="exact", warmup_epochs=0)
    trainer = type("T", (), {"model": model, "features": features, "epoch": 0, "cluster": None,
                            "unsharded_model": lambda self: self.model})()
    cb.on_fit_start(trainer)
    cb.on_epoch_start(trainer, 0)
    scores = model_scorer(model, features)(torch.arange(data.n_users)).numpy()  # the evaluator's scores
    for u in range(data.n_users):
        s = scores[u].copy()
        s[known[u].indices] = -np.inf
        expected = np.argsort(-s, kind="stable")[3:20]
        pool = ann.pools[u][: ann.sizes[u]].numpy()
        assert len(set(pool) & set(expected.tolist())) >= len(expected) - 1, u  # float ties at the edges


def test_auto_backend_follows_the_measured_size_thresholds(tmp_path, monkeypatch):
    from recsys_hnm.index import item_index

    monkeypatch.setattr(item_index, "AUTO_ANN_MIN_ITEMS", 100)
    assert isinstance(make_index(clustered(99, 8), "auto", tmp_path / "a"), ExactIndex)
    assert isinstance(make_index(clustered(150, 8), "auto", tmp_path / "b"), IvfItemIndex)
