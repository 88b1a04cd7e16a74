import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import chisquare

from conftest import small_config
from recsys_hnm.config import ConfigError
from recsys_hnm.data import Interactions, copurchase_graph, leave_last_out, synthetic
from recsys_hnm.experiment import build_sampler, load_data
from recsys_hnm.losses import sampled_softmax
from recsys_hnm.sampling import (
    AliasTable, CategorySampler, Context, CopurchaseSampler, InBatchSampler, KnownPositives, MixtureSampler,
    PopularitySampler, SegmentedAlias, UniformSampler, allocate,
)


@pytest.fixture(scope="module")
def data():
    return synthetic(200, 400, 12_000, n_categories=8, seed=5)


def _fits(draws: torch.Tensor, log_prob: torch.Tensor, n_items: int) -> float:
    """Chi-square p-value of the draws against exp(log_prob) (cells with tiny expectation pooled)."""
    observed = torch.bincount(draws.reshape(-1), minlength=n_items).double().numpy()
    expected = log_prob.double().exp().numpy() * draws.numel()
    assert expected.sum() == pytest.approx(draws.numel(), rel=1e-6)
    assert observed[expected == 0].sum() == 0, "drew an item of probability 0"
    big = expected >= 5
    obs = np.r_[observed[big], observed[~big].sum()]
    exp = np.r_[expected[big], expected[~big].sum()]
    keep = exp > 0
    if keep.sum() == 1:  # a single possible outcome: every draw must be it
        return 1.0 if obs[keep][0] == draws.numel() else 0.0
    exp = exp[keep] * obs[keep].sum() / exp[keep].sum()  # float32 log-probs: renormalise
    return chisquare(obs[keep], exp).pvalue


def _one_context(pos: int, n: int = 1) -> Context:
    return Context(torch.zeros(n, dtype=torch.long), torch.full((n,), pos, dtype=torch.long))


def _draw(sampler, pos: int, total: int, gen) -> torch.Tensor:
    if sampler.shared:
        return sampler.sample(_one_context(pos), total, gen)
    return sampler.sample(_one_context(pos, total // 50), 50, gen)


@pytest.mark.parametrize("name", ["uniform", "popularity", "popularity_a1", "category", "category_pop", "copurchase"])
def test_each_sampler_matches_its_declared_log_prob(data, name):
    counts = data.item_popularity
    uniform = UniformSampler(data.n_items, shared=False)
    samplers = {
        "uniform": UniformSampler(data.n_items),
        "popularity": PopularitySampler(counts, 0.75),
        "popularity_a1": PopularitySampler(counts, 1.0, shared=False),
        "category": CategorySampler(data.item_categories, uniform),
        "category_pop": CategorySampler(data.item_categories, uniform, counts, alpha=0.75),
        "copurchase": CopurchaseSampler(copurchase_graph(data.events, data.n_items), uniform, beta=1.0),
    }
    sampler = samplers[name]
    gen = torch.Generator().manual_seed(11)
    pos = int(np.argmax(counts))
    draws = _draw(sampler, pos, 100_000, gen)
    lp = sampler.log_prob(_one_context(pos), torch.arange(data.n_items)).reshape(-1)
    assert _fits(draws, lp, data.n_items) > 1e-3


def test_alias_tables_are_exact_for_skewed_and_segmented_weights():
    w = np.array([1e6, 1.0, 1.0, 0.0, 3.0])
    table = AliasTable(w)
    gen = torch.Generator().manual_seed(0)
    draws = table.draw((200_000,), gen)
    assert (draws != 3).all()
    assert _fits(draws, torch.log(table.entry_prob), 5) > 1e-3
    # three segments of different shapes; each draw stays inside its segment
    seg = SegmentedAlias(np.array([0, 3, 4, 8]), np.array([10, 11, 12, 13, 14, 15, 16, 17]), np.array([1, 2, 7, 5, 1, 1, 1, 97.0]))
    starts, sizes = torch.tensor([0, 3, 4]), torch.tensor([3, 1, 4])
    for s in range(3):
        x = seg.sample(starts[s].expand(100_000), sizes[s].expand(100_000), gen) - 10
        lp = torch.full((8,), float("-inf"))
        lo, hi = int(starts[s]), int(starts[s] + sizes[s])
        lp[lo:hi] = torch.log(seg.entry_prob[lo:hi])
        assert _fits(x, lp, 8) > 1e-3


def test_category_sampler_stays_in_the_positives_categories_and_falls_back(data):
    # item 0 alone in its own category -> must fall back
    ic = sp.lil_matrix((6, 3))
    ic[0, 0] = 1
    ic[1, 1] = ic[2, 1] = ic[3, 1] = 1
    ic[3, 2] = ic[4, 2] = ic[5, 2] = 1
    cat = CategorySampler(ic.tocsr(), UniformSampler(6, shared=False))
    gen = torch.Generator().manual_seed(0)
    draws = cat.sample(_one_context(1, 100), 20, gen)
    assert set(draws.unique().tolist()) <= {1, 2, 3}
    draws3 = cat.sample(_one_context(3, 200), 20, gen)  # item 3 is in categories 1 and 2
    assert set(draws3.unique().tolist()) == {1, 2, 3, 4, 5}
    ctx0 = _one_context(0, 4)
    assert cat.fallback_rows(ctx0).all()
    assert cat.log_prob(ctx0, torch.arange(6)).exp()[0].tolist() == pytest.approx([1 / 6] * 6)
    # q(4 | 3) = 1/2 (category 2 chosen) * 1/3
    assert cat.log_prob(_one_context(3), torch.tensor([4])).exp().item() == pytest.approx(1 / 6)


def test_copurchase_sampler_uses_co_counts_and_falls_back():
    graph = sp.csr_matrix(np.array([[0, 3, 1, 0], [3, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=float))
    cp = CopurchaseSampler(graph, UniformSampler(4, shared=False), beta=1.0)
    assert cp.log_prob(_one_context(0), torch.arange(4)).exp()[0].tolist() == pytest.approx([0, 0.75, 0.25, 0])
    cp2 = CopurchaseSampler(graph, UniformSampler(4, shared=False), beta=0.0)
    assert cp2.log_prob(_one_context(0), torch.arange(4)).exp()[0].tolist() == pytest.approx([0, 0.5, 0.5, 0])
    assert cp.fallback_rows(_one_context(3)).all()
    draws = cp.sample(_one_context(3, 100), 10, torch.Generator().manual_seed(0))
    assert len(draws.unique()) > 1  # uniform fallback


def test_in_batch_log_prob_is_batch_frequency():
    ctx = Context(torch.arange(4), torch.tensor([7, 7, 2, 5]))
    lp = InBatchSampler(10).log_prob(ctx, torch.tensor([7, 2, 3]))
    assert lp.exp().tolist() == pytest.approx([0.5, 0.25, 0.0])


def test_allocation_is_deterministic_and_exact():
    assert allocate(64, {"uniform": 0.2, "popularity": 0.3, "category": 0.2, "copurchase": 0.3}) == {
        "uniform": 13, "popularity": 19, "category": 13, "copurchase": 19}
    assert sum(allocate(7, {"a": 1, "b": 1, "c": 1}).values()) == 7
    assert allocate(10, {"a": 1.0, "b": 0.0}) == {"a": 10}


def _mixture(data, logq="mixture", known=None, in_batch=False, policy="mask"):
    counts = data.item_popularity
    uniform = UniformSampler(data.n_items, shared=False)
    components = {
        "in_batch": InBatchSampler(data.n_items),
        "uniform": uniform,  # per row, so that rows are independent draws of the mixture
        "popularity": PopularitySampler(counts, 0.75, shared=False),
        "category": CategorySampler(data.item_categories, uniform),
        "copurchase": CopurchaseSampler(copurchase_graph(data.events, data.n_items), uniform),
    }
    weights = {"uniform": 0.2, "popularity": 0.3, "category": 0.2, "copurchase": 0.3, "in_batch": 1.0 if in_batch else 0.0}
    return MixtureSampler(components, weights, 20, known, logq=logq, known_policy=policy)


def test_mixture_draws_match_the_mixture_log_q(data):
    mix = _mixture(data)
    gen = torch.Generator().manual_seed(3)
    pos = int(np.argmax(data.item_popularity))
    ctx = _one_context(pos, 2000)
    blocks = mix.sample(ctx, gen)
    assert [b.n for b in blocks] == [4, 6, 4, 6]  # fixed by the weights, not random
    draws = torch.cat([b.per_row_items(len(ctx)) for b in blocks], 1)
    # log_q is the log expected count of the item per row: exp(log_q) / 20 is the proposal
    lp = mix._log_q(_one_context(pos), torch.arange(data.n_items)[None], [])[0] - math.log(20)
    assert _fits(draws, lp, data.n_items) > 1e-3
    # every block carries that same mixture correction for its items
    for b in blocks:
        items = b.per_row_items(len(ctx))
        assert torch.allclose(b.log_q, (lp + math.log(20))[items], atol=1e-5)


def test_per_source_and_no_correction(data):
    gen = torch.Generator().manual_seed(3)
    ctx = _one_context(int(np.argmax(data.item_popularity)), 8)
    per = _mixture(data, "per_source").sample(ctx, gen)
    uni = per[0]
    assert torch.allclose(uni.log_q, torch.full_like(uni.log_q, math.log(4 / data.n_items)))
    none = _mixture(data, "none").sample(ctx, gen)
    assert all((b.log_q == 0).all() for b in none)


def test_known_positives_never_count_in_the_loss(data):
    split = leave_last_out(data)
    known = KnownPositives(split.matrix("train"))
    mix = _mixture(data, known=known, in_batch=True)
    gen = torch.Generator().manual_seed(0)
    train = split.train.iloc[:256]
    ctx = Context(torch.tensor(train["user"].to_numpy()), torch.tensor(train["item"].to_numpy()))
    blocks = mix.sample(ctx, gen)
    hits = 0
    for b in blocks:
        items = b.per_row_items(len(ctx))
        dense = split.matrix("train").toarray()
        is_known = torch.from_numpy(dense[ctx.users[:, None].numpy(), items.contiguous().numpy()] > 0)
        assert (b.invalid[is_known]).all()
        assert (b.invalid[items == ctx.pos_items[:, None]]).all()
        hits += int(is_known.sum())
    assert hits > 0  # the in-batch and popular sources do hit known items here
    # masked logits get no gradient and do not change the loss
    logits = torch.randn(len(ctx), blocks[0].n, requires_grad=True)
    pos = torch.zeros(len(ctx), requires_grad=True)
    loss = sampled_softmax(pos, logits, blocks[0].log_q, blocks[0].invalid)
    loss.backward()
    assert (logits.grad[blocks[0].invalid] == 0).all()


def test_redraw_removes_known_positives_from_per_row_sources(data):
    split = leave_last_out(data)
    known = KnownPositives(split.matrix("train"))
    mix = _mixture(data, known=known, policy="redraw")
    train = split.train.iloc[:256]
    ctx = Context(torch.tensor(train["user"].to_numpy()), torch.tensor(train["item"].to_numpy()))
    masked = _mixture(data, known=known).sample(ctx, torch.Generator().manual_seed(0))
    redrawn = mix.sample(ctx, torch.Generator().manual_seed(0))
    per_row = [i for i, name in enumerate(mix.names) if not mix.components[name].shared]
    assert sum(int(redrawn[i].invalid.sum()) for i in per_row) < sum(int(masked[i].invalid.sum()) for i in per_row)


def test_same_seed_same_draws(data):
    ctx = _one_context(3, 64)
    a = _mixture(data).sample(ctx, torch.Generator().manual_seed(9))
    b = _mixture(data).sample(ctx, torch.Generator().manual_seed(9))
    c = _mixture(data).sample(ctx, torch.Generator().manual_seed(10))
    assert all(torch.equal(x.items, y.items) for x, y in zip(a, b))
    assert not all(torch.equal(x.items, y.items) for x, y in zip(a, c))


def test_bad_sampler_configs_are_refused_naming_the_key(synthetic_files, tmp_path):
    with pytest.raises(ConfigError, match=r"sampler.mixture \(source\): 'hard' is not one of"):
        small_config(synthetic_files, tmp_path, sampler={"mixture": {"hard": 1.0}})
    with pytest.raises(ConfigError, match=r"sampler.mixture.uniform: must be >= 0"):
        small_config(synthetic_files, tmp_path, sampler={"mixture": {"uniform": -1.0}})
    with pytest.raises(ConfigError, match="all weights are zero"):
        small_config(synthetic_files, tmp_path, sampler={"mixture": {"uniform": 0.0, "in_batch": 0}})
    config = small_config(synthetic_files, tmp_path, sampler={"mixture": {"copurchase": 1.0}, "copurchase": {"source": "session"}})
    data, split = load_data(config)
    assert build_sampler(config, data, split).counts == {"copurchase": 64}
    no_cats = small_config(synthetic_files, tmp_path, data={"items": None}, sampler={"mixture": {"category": 1.0}})
    data, split = load_data(no_cats)
    with pytest.raises(ConfigError, match="sampler.mixture.category: the data has no item categories"):
        build_sampler(no_cats, data, split)


def test_copurchase_without_baskets_is_refused():
    import pandas as pd

    from recsys_hnm.config import config_from_dict

    events = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [1, 2, 1], "timestamp": [1, 2, 3]})
    data = Interactions.from_frames(events)
    split = leave_last_out(data)
    config = config_from_dict({"sampler": {"mixture": {"copurchase": 1.0}, "copurchase": {"source": "basket"}}})
    with pytest.raises(ConfigError, match="sampler.copurchase: copurchase source 'basket' needs a basket column"):
        build_sampler(config, data, split)
