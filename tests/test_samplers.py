import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import chi2, chisquare

from conftest import small_config
from recsys_hnm.config import ConfigError
from recsys_hnm.data import Interactions, copurchase_graph, leave_last_out, synthetic
from recsys_hnm.experiment import build_sampler, build_trainer, load_data
from recsys_hnm.training.losses import sampled_softmax
from recsys_hnm.sampling import AnnSampler
from recsys_hnm.ops.sparse import SortedPairs
from recsys_hnm.sampling import (
    AliasTable, CategorySampler, Context, CopurchaseSampler, FullCatalog, InBatchSampler, KnownPositives, MixtureSampler,
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


def test_alias_tables_hold_each_entrys_exact_share_in_long_chains():
    # what every slot's table gives each entry, summed without sampling: its own share plus the
    # aliased remainders, over the segment's size. Segments of random, staircase (long chains of
    # drained slots) and single-heavy weights, zero weights, and small integer counts (exact ties
    # between interval ends) after a long segment (prefix sums far from 0 round at those ties).
    rng = np.random.default_rng(0)
    parts = [rng.exponential(size=50), np.arange(1.0, 301.0), np.r_[1000.0, np.ones(99)], rng.pareto(1.0, 500),
             np.r_[0.0, 0.0, 5.0], np.ones(7), rng.integers(1, 3, 20_000).astype(float)]
    parts += [rng.choice([1.0, 2.0, 2.0, 3.0, 4.0], 300) for _ in range(20)]
    w = np.concatenate(parts)
    indptr = np.r_[0, np.cumsum([len(p) for p in parts])]
    table = SegmentedAlias(indptr, np.arange(len(w)), w)
    prob, alias = table.prob.double().numpy(), table.alias.numpy()
    got = prob + np.bincount(alias, weights=1 - prob, minlength=len(w))
    for lo, hi in zip(indptr[:-1], indptr[1:]):
        assert ((alias[lo:hi] >= lo) & (alias[lo:hi] < hi)).all()
        np.testing.assert_allclose(got[lo:hi] / (hi - lo), w[lo:hi] / w[lo:hi].sum(), rtol=1e-5, atol=1e-9)


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


def test_category_with_alpha_tolerates_a_category_without_training_events():
    # Counts come from the training events, so with a leave-last-out or fixed split a category
    # whose (>= 2) items were only bought in valid/test has count 0 everywhere. No training
    # positive can pick it (a positive has count >= 1), so it should simply never be drawn; today
    # build_sampler turns the construction error into "sampler.category: 1 segment(s) have
    # entries but zero total weight" and the run cannot start.
    ic = sp.csr_matrix(np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float))
    counts = np.array([5.0, 3.0, 0.0, 0.0])
    cat = CategorySampler(ic, UniformSampler(4, shared=False), counts, alpha=0.5)
    q = cat.log_prob(_one_context(0), torch.arange(4)).exp()[0]
    assert q.tolist() == pytest.approx([math.sqrt(5) / (math.sqrt(5) + math.sqrt(3)), math.sqrt(3) / (math.sqrt(5) + math.sqrt(3)), 0, 0])
    assert set(cat.sample(_one_context(0, 50), 10, torch.Generator().manual_seed(0)).unique().tolist()) <= {0, 1}


def test_copurchase_sampler_uses_co_counts_and_falls_back():
    graph = sp.csr_matrix(np.array([[0, 3, 1, 0], [3, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=float))
    cp = CopurchaseSampler(graph, UniformSampler(4, shared=False), beta=1.0)
    assert cp.log_prob(_one_context(0), torch.arange(4)).exp()[0].tolist() == pytest.approx([0, 0.75, 0.25, 0])
    cp2 = CopurchaseSampler(graph, UniformSampler(4, shared=False), beta=0.0)
    assert cp2.log_prob(_one_context(0), torch.arange(4)).exp()[0].tolist() == pytest.approx([0, 0.5, 0.5, 0])
    assert cp.fallback_rows(_one_context(3)).all()
    draws = cp.sample(_one_context(3, 100), 10, torch.Generator().manual_seed(0))
    assert len(draws.unique()) > 1  # uniform fallback


@pytest.mark.parametrize("n_cats,width", [(6, 3), (400, 2)])
def test_per_row_log_prob_equals_the_shared_one_for_each_sampler(n_cats, width):
    # per-row candidates take other paths than shared ones (category: comparing categories when
    # that beats a dense table, which only the many-category case does here; co-purchase: a
    # search among the positives' own neighbours); each must give the shared path's values
    rng = np.random.default_rng(3)
    n_items, B, n = 300, 64, 20
    item_cats = sp.csr_matrix((np.ones(n_items * width), (np.repeat(np.arange(n_items), width),
                               rng.integers(0, n_cats, n_items * width))), shape=(n_items, n_cats))
    assert (width * width * n < n_cats) == (n_cats == 400)  # which category path runs
    graph = sp.random(n_items, n_items, density=0.03, format="csr", random_state=4)
    graph.data[:] = rng.integers(1, 5, graph.nnz)
    uniform = UniformSampler(n_items, shared=False)
    samplers = [CategorySampler(item_cats, uniform, rng.integers(0, 50, n_items), alpha=0.75),
                CopurchaseSampler(graph, uniform, beta=1.0)]
    ctx = Context(torch.zeros(B, dtype=torch.long), torch.tensor(rng.integers(0, n_items, B)))
    for sampler in samplers:
        items = torch.cat([sampler.sample(ctx, n // 2, torch.Generator().manual_seed(0)),
                           torch.tensor(rng.integers(0, n_items, (B, n - n // 2)))], dim=1)
        shared = sampler.log_prob(ctx, torch.arange(n_items))
        expected = torch.gather(shared, 1, items)
        got = sampler.log_prob(ctx, items)
        assert torch.isfinite(expected).any() and torch.isinf(expected).any()
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[torch.isfinite(got)], expected[torch.isfinite(expected)])


def test_shared_candidates_log_q_is_the_sum_of_every_sources_expected_count():
    # the mixture adds the per-row sources' expected counts of the shared candidates onto the
    # shared sources' as sparse entries (fallback rows: their fallback's); the reference is the
    # definition, log sum_k n_k q_k(item | row), from each source's per-row path on the
    # candidates expanded to [B, n]
    rng = np.random.default_rng(5)
    n_items, n_users, B = 300, 40, 64
    width = 2
    item_cats = sp.csr_matrix((np.ones(n_items * width), (np.repeat(np.arange(n_items), width),
                               rng.integers(0, 6, n_items * width))), shape=(n_items, 6))
    item_cats = sp.csr_matrix(sp.diags((np.arange(n_items) >= 40).astype(float)) @ item_cats)  # 0-39: no category
    graph = sp.random(n_items, n_items, density=0.02, format="csr", random_state=6)
    graph.data[:] = rng.integers(1, 5, graph.nnz)
    graph = sp.csr_matrix(sp.diags((np.arange(n_items) >= 50).astype(float)) @ graph)  # 0-49: no neighbours
    counts = rng.integers(1, 40, n_items).astype(float)
    ann = AnnSampler(n_items, n_users, "user", [0, 30])
    ann.pools[:30] = torch.sort(torch.tensor(rng.permuted(np.tile(np.arange(n_items), (30, 1)), axis=1)[:, :30]), 1).values
    ann.sizes[:30] = 30  # users 30-39 have no pool yet: uniform fallback
    components = {
        "in_batch": InBatchSampler(counts),
        "uniform": UniformSampler(n_items, shared=True),
        "popularity": PopularitySampler(counts, 0.75, shared=True),
        "category": CategorySampler(sp.csr_matrix(item_cats), UniformSampler(n_items, shared=False)),
        "copurchase": CopurchaseSampler(graph, PopularitySampler(counts, 0.5, shared=False)),
        "ann": ann,
    }
    weights = {"in_batch": 1.0, "uniform": 0.3, "popularity": 0.2, "category": 0.2, "copurchase": 0.2, "ann": 0.1}
    mix = MixtureSampler(components, weights, 60)
    ctx = Context(torch.tensor(rng.integers(0, n_users, B)), torch.tensor(rng.integers(0, n_items, B)))
    assert all(components[k].fallback_rows(ctx).any() and not components[k].fallback_rows(ctx).all()
               for k in ("category", "copurchase", "ann"))
    items = torch.cat([ctx.pos_items, torch.tensor(rng.integers(0, n_items, 150))])  # with repeats
    for k in ("category", "copurchase", "ann"):  # the contract: rows that fall back have no entries
        rows, _, _ = components[k].prob_entries(ctx, items)
        assert len(rows) and not components[k].fallback_rows(ctx).take(rows).any()
    expected = None
    for name in mix.names:
        lp = components[name].log_prob(ctx, items.expand(B, -1).contiguous()) + math.log(mix.draws(name, B))
        expected = lp if expected is None else torch.logaddexp(expected, lp)
    got = mix._log_q(ctx, items, [])
    assert got.shape == (B, len(items)) and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got.max(0).values - got.min(0).values).max() > 1.0  # the per-row sources do move rows apart
    # shared sources alone: their log counts combined in log space, the same for every row
    # (bit for bit the logaddexp of the definition, so such mixes train as they always did)
    shared_only = MixtureSampler(components, {"in_batch": 1.0, "uniform": 0.6, "popularity": 0.4}, 60)
    expected = None
    for name in shared_only.names:
        lp = components[name].log_prob(ctx, items) + math.log(shared_only.draws(name, B))
        expected = lp if expected is None else torch.logaddexp(expected, lp)
    assert torch.equal(shared_only._log_q(ctx, items, []), expected.expand(B, -1))


@pytest.mark.parametrize("local", [True, False])
def test_sorted_pairs_find_each_pairs_stored_entry(local):
    m = sp.random(50, 40, density=0.2, format="csr", random_state=1)
    m.sort_indices()
    pairs = SortedPairs(m)
    if not local:  # the one search over every stored pair, for rows holding many entries
        pairs.LOCAL_MAX_ENTRIES_PER_QUERY = 0
    rng = np.random.default_rng(0)
    rows, cols = torch.tensor(rng.integers(0, 50, 100)), torch.tensor(rng.integers(0, 40, (100, 30)))
    entry = np.full((50, 40), -1)
    entry[np.repeat(np.arange(50), np.diff(m.indptr)), m.indices] = np.arange(m.nnz)
    expected = torch.from_numpy(entry[rows.numpy()[:, None], cols.numpy()])
    assert (expected >= 0).any() and (expected < 0).any()
    assert torch.equal(pairs.find(rows, cols), expected)
    assert pairs.find(rows, cols[:, :0]).shape == (100, 0)


def test_in_batch_log_prob_is_the_stream_frequency_not_the_batch_count():
    counts = np.array([0, 0, 1, 0, 0, 1, 0, 2, 0, 0], dtype=float)  # training stream: 7 twice, 2 and 5 once
    ctx = Context(torch.arange(4), torch.tensor([7, 5, 2, 5]))  # this batch happens to hold 5 twice
    lp = InBatchSampler(counts).log_prob(ctx, torch.tensor([7, 2, 5, 3]))
    assert lp.exp().tolist() == pytest.approx([0.5, 0.25, 0.25, 0.0])
    with pytest.raises(ValueError, match="training counts"):
        InBatchSampler(np.zeros(3))


def test_allocation_is_deterministic_and_exact():
    assert allocate(64, {"uniform": 0.2, "popularity": 0.3, "category": 0.2, "copurchase": 0.3}) == {
        "uniform": 13, "popularity": 19, "category": 13, "copurchase": 19}
    assert sum(allocate(7, {"a": 1, "b": 1, "c": 1}).values()) == 7
    assert allocate(10, {"a": 1.0, "b": 0.0}) == {"a": 10}


def test_per_row_sources_can_have_their_own_count(synthetic_files, tmp_path):
    mix = {"in_batch": 1.0, "uniform": 0.5, "popularity": 0.5, "category": 0.5, "copurchase": 0.5}
    shared = small_config(synthetic_files, tmp_path, sampler={"mixture": mix, "num_negatives": 64, "copurchase": {"source": "session"}})
    data, split = load_data(shared)
    assert build_sampler(shared, data, split).counts == {"uniform": 16, "popularity": 16, "category": 16, "copurchase": 16}
    own = small_config(synthetic_files, tmp_path, sampler={"mixture": mix, "num_negatives": 64, "per_row_negatives": 8,
                                                           "copurchase": {"source": "session"}})
    sampler = build_sampler(own, data, split)
    assert sampler.counts == {"uniform": 32, "popularity": 32, "category": 4, "copurchase": 4}
    blocks = sampler.sample(Context(torch.arange(5), torch.arange(5)), torch.Generator())
    assert [tuple(b.items.shape) for b in blocks] == [(5,), (32,), (32,), (5, 4), (5, 4)]


def _mixture(data, logq="mixture", known=None, in_batch=False, policy="mask"):
    counts = data.item_popularity
    uniform = UniformSampler(data.n_items, shared=False)
    components = {
        "in_batch": InBatchSampler(counts),
        "uniform": uniform,  # per row, so that rows are independent draws of the mixture
        "popularity": PopularitySampler(counts, 0.75, shared=False),
        "category": CategorySampler(data.item_categories, uniform),
        "copurchase": CopurchaseSampler(copurchase_graph(data.events, data.n_items), uniform),
    }
    weights = {"uniform": 0.2, "popularity": 0.3, "category": 0.2, "copurchase": 0.3, "in_batch": 1.0 if in_batch else 0.0}
    return MixtureSampler(components, weights, 20, known, logq=logq, known_policy=policy)


# -- mixtures over several contexts, against a brute-force reference -----------------------------
#
# A hand-built catalog small enough to enumerate: the reference below recomputes every source's
# distribution from these dicts with plain loops (not from the samplers' tables).

N_ITEMS = 10
CATS = {0: [0, 1, 2, 3], 1: [3, 4, 5], 2: [6], 3: [7, 8]}  # category 2 = {6} is unusable; 9 has none
COUNTS = np.array([50, 20, 10, 5, 30, 1, 0, 8, 3, 12], dtype=np.float64)  # item 6 never bought
EDGES = {(0, 1): 3.0, (0, 4): 1.0, (1, 2): 2.0, (3, 7): 5.0, (4, 5): 1.0, (8, 9): 2.0}  # 6 has none
POP_ALPHA, CAT_ALPHA, CP_BETA, FB_POP_ALPHA = 0.75, 0.5, 0.5, 1.0
# six rows: two share a positive (3), 6 falls back in category and copurchase, 9 only in category
POSITIVES = [0, 3, 6, 7, 3, 9]
WEIGHTS = {"uniform": 1.0, "popularity": 2.0, "category": 3.0, "copurchase": 2.0}
NUM_NEGATIVES = 64  # -> uniform 8, popularity 16, category 24, copurchase 16
STREAM = (COUNTS + 1) / (COUNTS + 1).sum()  # the in-batch proposal: every item a training positive


def _ref_uniform(pos):
    return np.full(N_ITEMS, 1.0 / N_ITEMS)


def _ref_popularity(pos, alpha=POP_ALPHA):
    w = np.array([c ** alpha if c > 0 else 0.0 for c in COUNTS])
    return w / w.sum()


def _ref_category(pos):
    """1/|U(pos)| sum over usable categories c of pos of w_j / W_c, w = count ** alpha; uniform
    fallback when pos has no usable category."""
    usable = [c for c, members in CATS.items() if len(members) >= 2 and pos in members]
    if not usable:
        return _ref_uniform(pos)
    q = np.zeros(N_ITEMS)
    for c in usable:
        total = sum(COUNTS[i] ** CAT_ALPHA for i in CATS[c])
        for j in CATS[c]:
            q[j] += COUNTS[j] ** CAT_ALPHA / total / len(usable)
    return q


def _ref_copurchase(pos):
    """G[pos, j] ** beta normalised over pos's neighbours; popularity (alpha 1) fallback."""
    w = np.zeros(N_ITEMS)
    for (a, b), count in EDGES.items():
        if a == pos:
            w[b] = count ** CP_BETA
        if b == pos:
            w[a] = count ** CP_BETA
    if w.sum() == 0:
        return _ref_popularity(pos, FB_POP_ALPHA)
    return w / w.sum()


REF = {"uniform": _ref_uniform, "popularity": _ref_popularity, "category": _ref_category, "copurchase": _ref_copurchase}


def _ref_expected_counts(positives, counts, in_batch):
    """[B, N_ITEMS] expected number of times each item is among row b's candidates."""
    out = np.zeros((len(positives), N_ITEMS))
    for b, pos in enumerate(positives):
        for name, n in counts.items():
            out[b] += n * REF[name](pos)
        if in_batch:  # the other B - 1 positives, drawn from the training stream
            out[b] += (len(positives) - 1) * STREAM
    return out


def test_the_reference_itself_on_hand_computed_values():
    # guards the brute force against a slip: a few probabilities worked out by hand
    assert _ref_category(3)[4] == pytest.approx(0.5 * math.sqrt(30) / (math.sqrt(5) + math.sqrt(30) + 1))
    assert _ref_category(3)[3] == pytest.approx(
        0.5 * math.sqrt(5) / (math.sqrt(50) + math.sqrt(20) + math.sqrt(10) + math.sqrt(5))
        + 0.5 * math.sqrt(5) / (math.sqrt(5) + math.sqrt(30) + 1))
    assert _ref_category(6).tolist() == [0.1] * 10 and _ref_category(9).tolist() == [0.1] * 10
    assert _ref_copurchase(0)[1] == pytest.approx(math.sqrt(3) / (math.sqrt(3) + 1))
    assert _ref_copurchase(6)[0] == pytest.approx(50 / 139) and _ref_copurchase(6)[6] == 0
    assert _ref_popularity(0)[6] == 0
    e = _ref_expected_counts([0, 3], {"uniform": 4}, in_batch=True)
    assert e[1].tolist() == pytest.approx((0.4 + (COUNTS + 1) / 149).tolist())


def _small_catalog():
    ic = sp.lil_matrix((N_ITEMS, len(CATS)))
    for c, members in CATS.items():
        for i in members:
            ic[i, c] = 1.0
    g = np.zeros((N_ITEMS, N_ITEMS))
    for (a, b), count in EDGES.items():
        g[a, b] = g[b, a] = count
    return ic.tocsr(), sp.csr_matrix(g)


# shared sources (one draw for the batch) beside per-row ones; all per row; all shared
LAYOUTS = {
    "mixed": dict(shared=True, sources=("uniform", "popularity", "category", "copurchase"), in_batch=True),
    "per_row": dict(shared=False, sources=("uniform", "popularity", "category", "copurchase"), in_batch=False),
    "shared": dict(shared=True, sources=("uniform", "popularity"), in_batch=True),
}
# draws per source, by hand: 64 split 1:2:3:2, or 1:2 (21.33, 42.67 -> the remainder to popularity)
HAND_COUNTS = {
    "mixed": {"uniform": 8, "popularity": 16, "category": 24, "copurchase": 16},
    "per_row": {"uniform": 8, "popularity": 16, "category": 24, "copurchase": 16},
    "shared": {"uniform": 21, "popularity": 43},
}


def _small_mixture(layout: str, logq="mixture", in_batch: bool | None = None) -> MixtureSampler:
    spec = LAYOUTS[layout]
    ic, graph = _small_catalog()
    components = {
        "in_batch": InBatchSampler(COUNTS + 1),
        "uniform": UniformSampler(N_ITEMS, shared=spec["shared"]),
        "popularity": PopularitySampler(COUNTS, POP_ALPHA, shared=spec["shared"]),
        "category": CategorySampler(ic, UniformSampler(N_ITEMS, shared=False), COUNTS, alpha=CAT_ALPHA),
        "copurchase": CopurchaseSampler(graph, PopularitySampler(COUNTS, FB_POP_ALPHA, shared=False), beta=CP_BETA),
    }
    weights = {k: (w if k in spec["sources"] else 0.0) for k, w in WEIGHTS.items()}
    weights["in_batch"] = 1.0 if (spec["in_batch"] if in_batch is None else in_batch) else 0.0
    return MixtureSampler(components, weights, NUM_NEGATIVES, logq=logq)


def _small_context() -> Context:
    return Context(torch.arange(len(POSITIVES)), torch.tensor(POSITIVES))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixture_log_q_matches_a_brute_force_reference_per_row(layout):
    mix = _small_mixture(layout)
    ctx = _small_context()
    B = len(ctx)
    expected = _ref_expected_counts(POSITIVES, HAND_COUNTS[layout], LAYOUTS[layout]["in_batch"])
    assert expected.sum(1) == pytest.approx(NUM_NEGATIVES + (B - 1 if LAYOUTS[layout]["in_batch"] else 0))
    # rows really differ where a source depends on the positive (3 appears twice: 5 contexts)
    distinct = 5 if "category" in LAYOUTS[layout]["sources"] else 1
    assert len({tuple(np.round(r, 9)) for r in expected}) == distinct
    blocks = mix.sample(ctx, torch.Generator().manual_seed(1))
    sizes = dict(HAND_COUNTS[layout], **({"in_batch": B} if LAYOUTS[layout]["in_batch"] else {}))
    assert {mix.names[b.source]: b.n for b in blocks} == sizes
    kinds = {b.shared for b in blocks}
    assert kinds == {"mixed": {True, False}, "per_row": {False}, "shared": {True}}[layout]
    for b in blocks:
        items = b.per_row_items(B).numpy()
        assert b.log_q.shape == (B, b.n)
        want = np.log(expected[np.arange(B)[:, None], items])
        np.testing.assert_allclose(b.log_q.numpy(), want, atol=2e-5, rtol=0)
    # the correction of every catalog item, through both candidate layouts of the mixture
    # (shared [N] and per-row [B, N] items reach different code in each source)
    catalog = torch.arange(N_ITEMS)
    with np.errstate(divide="ignore"):
        want = np.log(expected)
    for candidates in (catalog, catalog.expand(B, -1)):
        got = mix._log_q(ctx, candidates, []).numpy()
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("layout", ["mixed", "per_row"])
def test_per_source_log_q_matches_the_drawing_sources_reference(layout):
    mix = _small_mixture(layout, logq="per_source")
    ctx = _small_context()
    B = len(ctx)
    for b in mix.sample(ctx, torch.Generator().manual_seed(2)):
        name = mix.names[b.source]
        items = b.per_row_items(B).numpy()
        if name == "in_batch":  # the other B - 1 positives, drawn from the training stream
            want = np.log((B - 1) * STREAM[items])
        else:
            q = np.stack([REF[name](p) for p in POSITIVES])
            want = np.log(HAND_COUNTS[layout][name] * q[np.arange(B)[:, None], items])
        np.testing.assert_allclose(b.log_q.numpy(), want, atol=2e-5, rtol=0)


def test_no_correction_changes_only_the_correction():
    # 'none' is zeros by construction; what can break is that the mode changes the draws or the
    # masks, or returns a correction of the wrong shape.
    ctx = _small_context()
    runs = {m: _small_mixture("mixed", logq=m).sample(ctx, torch.Generator().manual_seed(4)) for m in ("mixture", "per_source", "none")}
    for blocks in zip(*runs.values()):
        assert all(torch.equal(blocks[0].items, x.items) and torch.equal(blocks[0].invalid, x.invalid) for x in blocks)
        none = blocks[-1]
        assert none.log_q.shape == (len(ctx), none.n) and (none.log_q == 0).all()
        assert not (blocks[0].log_q == 0).all()


def _empirical(mix: MixtureSampler, ctx: Context, batches: int, seed: int):
    """Counts of each item among each row's candidates over ``batches`` seeded batches, and the
    log_q the blocks attached to each (row, item) (nan where never drawn)."""
    B = len(ctx)
    counts = np.zeros((B, N_ITEMS))
    log_q = np.full((B, N_ITEMS), np.nan)
    gen = torch.Generator().manual_seed(seed)
    rows = np.arange(B)[:, None]
    for _ in range(batches):
        for b in mix.sample(ctx, gen):
            items = b.per_row_items(B).numpy()
            lq = b.log_q.numpy()
            r = np.broadcast_to(rows, items.shape)
            np.add.at(counts, (r, items), 1)
            seen = log_q[r, items]
            known = ~np.isnan(seen)
            # one context, one correction: the same (row, item) always carries the same log_q
            np.testing.assert_allclose(lq[known], seen[known], atol=1e-6, rtol=0)
            log_q[r, items] = lq
    return counts, log_q


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixture_log_q_matches_the_empirical_draw_frequencies(layout):
    """exp(log_q) is the expected count of the item among the row's candidates per batch; over T
    batches the observed count has mean T exp(log_q) and variance at most that (a sum of
    binomials), so z = (obs - T E) / sqrt(T E) is within a few units. The batch's positives are
    fixed here, so in-batch candidates are left out (the partition-function test covers them)."""
    mix = _small_mixture(layout, in_batch=False)
    ctx = _small_context()
    T = 600
    counts, log_q = _empirical(mix, ctx, T, seed=7)
    per_row = NUM_NEGATIVES
    assert (counts.sum(1) == T * per_row).all()
    drawn = counts > 0
    assert (~np.isnan(log_q) == drawn).all()
    E = np.exp(log_q[drawn])
    # the corrections are expected counts: over a row's items they add up to its candidates
    # (undrawn items could only hold a sliver of mass after T batches)
    assert np.nansum(np.exp(log_q), 1) == pytest.approx(per_row, rel=1e-3)
    assert (np.nansum(np.exp(log_q), 1) <= per_row * (1 + 1e-5)).all()
    z = np.zeros_like(counts)
    z[drawn] = (counts[drawn] - T * E) / np.sqrt(T * E)
    assert np.abs(z).max() < 5.0, f"max |z| = {np.abs(z).max():.1f}"
    # per row (shared draws correlate the rows, so no pooled statistic): a chi-square bound
    for b in range(len(ctx)):
        assert (z[b] ** 2).sum() < chi2.ppf(1 - 1e-6 / len(ctx), drawn[b].sum()), f"row {b}"


def test_known_positives_never_count_in_the_loss(data):
    split = leave_last_out(data)
    known = KnownPositives(split.matrix("train"))
    mix = _mixture(data, known=known, in_batch=True)
    gen = torch.Generator().manual_seed(0)
    train = split.train.iloc[:256]
    ctx = Context(torch.tensor(train["user"].to_numpy()), torch.tensor(train["item"].to_numpy()))
    blocks = mix.sample(ctx, gen)
    dense = split.matrix("train").toarray()
    hits = 0
    for b in blocks:
        items = b.per_row_items(len(ctx))
        is_known = torch.from_numpy(dense[ctx.users[:, None].numpy(), items.contiguous().numpy()] > 0)
        is_hit = items == ctx.pos_items[:, None]
        assert torch.equal(b.invalid, is_known | is_hit)  # masked exactly when known or the positive
        hits += int(is_known.sum())
    assert hits > 0  # the in-batch and popular sources do hit known items here


@pytest.mark.parametrize("shared", [True, False])
def test_known_positives_without_the_bitmap_answer_as_the_bitmap_does(shared):
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    m = sp.random(n_users, n_items, density=0.2, format="csr", random_state=1)
    m = (sp.diags((np.arange(n_users) != 3).astype(float)) @ m).tocsr()  # user 3 knows no items
    m.eliminate_zeros()
    bitmap, search = KnownPositives(m), KnownPositives(m)
    search.bitmap = None  # the large-catalog path
    users = torch.tensor(rng.integers(0, n_users, 200))
    users[:5] = 3
    items = torch.tensor(rng.integers(0, n_items, 50 if shared else (200, 50)))
    expected = torch.from_numpy(m.toarray()[users.numpy()[:, None], items.numpy()] > 0)
    assert torch.equal(bitmap.contains(users, items), expected)
    assert torch.equal(search.contains(users, items), expected)
    assert expected.any() and not expected.all()
    assert search.contains(users, items[..., :0]).shape == (200, 0)


@pytest.mark.parametrize("bitmap", [True, False])
def test_the_mixture_masks_each_blocks_known_positives_and_hits(data, bitmap):
    # one known-positive lookup serves all per-row blocks (and one all shared ones): each block
    # must get back exactly its own mask
    uniform = UniformSampler(data.n_items, shared=False)
    known = KnownPositives(data.matrix)
    if not bitmap:
        known.bitmap = None
    mixture = MixtureSampler(
        {"in_batch": InBatchSampler(data.item_popularity), "uniform": UniformSampler(data.n_items),
         "popularity": PopularitySampler(data.item_popularity, 0.75, shared=False),
         "category": CategorySampler(data.item_categories, uniform),
         "copurchase": CopurchaseSampler(copurchase_graph(data.events, data.n_items), uniform)},
        {"in_batch": 1.0, "uniform": 1.0, "popularity": 1.0, "category": 1.0, "copurchase": 1.0}, 64, known)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(data.events), (128,), generator=gen).numpy()
    ctx = Context(torch.tensor(data.events["user"].to_numpy()[rows]), torch.tensor(data.events["item"].to_numpy()[rows]))
    blocks = mixture.sample(ctx, gen)
    assert sum(not b.shared for b in blocks) == 3 and sum(b.shared for b in blocks) == 2
    dense = torch.from_numpy(data.matrix.toarray() > 0)
    for b in blocks:
        items = b.per_row_items(len(ctx))
        expected = dense[ctx.users[:, None], items] | (items == ctx.pos_items[:, None])
        assert torch.equal(b.invalid, expected)
    assert any(b.invalid.any() for b in blocks if not b.shared)


# -- sampled softmax on a hand-built example ------------------------------------------------------
#
# row 0: positive 2.0; negatives 1.0 (q: log 2), 0.0 (log 1), 3.0 (log 0.5, masked)
# row 1: positive 0.5; negatives 0.0 (log 4), -1.0 (log 0.25, masked), 2.0 (log 8)
# corrected negatives are logit - log_q, masked ones leave the softmax:
#   Z0 = e^2 + e^1 / 2 + e^0          loss0 = log Z0 - 2   = 0.277082...
#   Z1 = e^0.5 + e^0 / 4 + e^2 / 8    loss1 = log Z1 - 0.5 = 0.537571...

POS = [2.0, 0.5]
NEG = [[1.0, 0.0, 3.0], [0.0, -1.0, 2.0]]
LOG_Q = [[math.log(2), 0.0, math.log(0.5)], [math.log(4), math.log(0.25), math.log(8)]]
INVALID = [[False, False, True], [False, True, False]]
Z0 = math.exp(2) + math.exp(1) / 2 + 1
Z1 = math.exp(0.5) + 1 / 4 + math.exp(2) / 8
LOSS0, LOSS1 = math.log(Z0) - 2, math.log(Z1) - 0.5


def _softmax_inputs():
    pos = torch.tensor(POS, dtype=torch.float64, requires_grad=True)
    neg = torch.tensor(NEG, dtype=torch.float64, requires_grad=True)
    return pos, neg, torch.tensor(LOG_Q, dtype=torch.float64), torch.tensor(INVALID)


def test_sampled_softmax_value_by_hand():
    pos, neg, log_q, invalid = _softmax_inputs()
    assert (LOSS0, LOSS1) == pytest.approx((0.2770823, 0.5375710), abs=1e-6)
    assert sampled_softmax(pos, neg, log_q, invalid).item() == pytest.approx((LOSS0 + LOSS1) / 2, rel=1e-12)
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert sampled_softmax(pos, neg, log_q, invalid, weights).item() == pytest.approx((LOSS0 + 3 * LOSS1) / 4, rel=1e-12)
    # without the correction and the mask: the plain softmax over all four logits
    plain = [math.log(math.exp(2) + math.exp(1) + 1 + math.exp(3)) - 2, math.log(math.exp(0.5) + 1 + math.exp(-1) + math.exp(2)) - 0.5]
    assert sampled_softmax(pos, neg).item() == pytest.approx(sum(plain) / 2, rel=1e-12)
    # a shared [N] correction broadcasts over the rows
    shared = torch.tensor(LOG_Q[0], dtype=torch.float64)
    row1 = math.log(math.exp(0.5) + 1 / 2 + math.exp(-1) + math.exp(2) * 2) - 0.5
    assert sampled_softmax(pos, neg, shared).item() == pytest.approx(
        (math.log(math.exp(2) + math.exp(1) / 2 + 1 + math.exp(3) * 2) - 2 + row1) / 2, rel=1e-12)


def test_sampled_softmax_gradient_by_hand_masked_negatives_get_none():
    pos, neg, log_q, invalid = _softmax_inputs()
    sampled_softmax(pos, neg, log_q, invalid).backward()
    # d mean-loss / d logit = softmax share / B; -1 / B more for the positive
    want_neg = [[math.exp(1) / 2 / Z0 / 2, 1 / Z0 / 2, 0.0], [1 / 4 / Z1 / 2, 0.0, math.exp(2) / 8 / Z1 / 2]]
    want_pos = [(math.exp(2) / Z0 - 1) / 2, (math.exp(0.5) / Z1 - 1) / 2]
    assert neg.grad.tolist() == [pytest.approx(r, rel=1e-10, abs=1e-15) for r in want_neg]
    assert pos.grad.tolist() == pytest.approx(want_pos, rel=1e-10)
    assert (neg.grad[invalid] == 0).all()
    assert (neg.grad[~invalid] > 1e-3).all()  # the valid ones do get a gradient
    # and the masked logits do not move the loss at all
    pos2, neg2, _, _ = _softmax_inputs()
    with torch.no_grad():
        neg2[invalid] += 100.0
    assert sampled_softmax(pos2, neg2, log_q, invalid).item() == pytest.approx((LOSS0 + LOSS1) / 2, rel=1e-12)


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
    with pytest.raises(ConfigError, match="sampler.hard: 'ann' has no weight > 0"):
        small_config(synthetic_files, tmp_path, sampler={"hard": ["ann"]})
    with pytest.raises(ConfigError, match="sampler.hard: the proposal needs a source that is not hard"):
        small_config(synthetic_files, tmp_path, sampler={"mixture": {"category": 1.0}, "hard": ["category"]})
    with pytest.raises(ConfigError, match="sampler.hard_loss: 'sum' is not one of"):
        small_config(synthetic_files, tmp_path, sampler={"hard_loss": "sum"})
    with pytest.raises(ConfigError, match="sampler.hard_correction: 'pool' is not one of"):
        small_config(synthetic_files, tmp_path, sampler={"hard_correction": "pool"})
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


# -- the partition function: sampled estimates against the exact sum ----------------------------

Z_MIXES = {
    "in_batch": {"in_batch": 1.0},
    "uniform": {"uniform": 1.0},
    "popularity": {"popularity": 1.0},
    "category": {"category": 1.0},
    "copurchase": {"copurchase": 1.0},
    "in_batch+uniform": {"in_batch": 1.0, "uniform": 1.0},
    "in_batch+category": {"in_batch": 1.0, "category": 1.0},
    "in_batch+copurchase": {"in_batch": 1.0, "copurchase": 1.0},
    "all": {"in_batch": 1.0, "uniform": 1.0, "popularity": 1.0, "category": 1.0, "copurchase": 1.0},
    "full": {"full": 1.0},
    "in_batch+full": {"in_batch": 1.0, "full": 1.0},
    # roles: the hard sources are left out of the proposal and of the estimate
    "in_batch+uniform | hard category": ({"in_batch": 1.0, "uniform": 1.0, "category": 1.0}, {"category"}),
    "in_batch | hard copurchase+popularity": ({"in_batch": 1.0, "copurchase": 1.0, "popularity": 1.0}, {"copurchase", "popularity"}),
}


def _small_catalog_sources() -> dict:
    """Every source over the small catalog, as the partition-function tests mix them."""
    ic, graph = _small_catalog()
    return {
        "in_batch": InBatchSampler(COUNTS + 1), "uniform": UniformSampler(N_ITEMS),
        "popularity": PopularitySampler(COUNTS, POP_ALPHA),
        "category": CategorySampler(ic, UniformSampler(N_ITEMS, shared=False), COUNTS, alpha=CAT_ALPHA),
        "copurchase": CopurchaseSampler(graph, PopularitySampler(COUNTS, FB_POP_ALPHA, shared=False), beta=CP_BETA),
        "full": FullCatalog(N_ITEMS),
    }


Z_SCORES = np.random.default_rng(0).uniform(-1.0, 1.0, N_ITEMS)


def _z_trials(estimate, exact, B: int = 8, T: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """(estimates, exact values) of a partition function over T batches of B positives drawn
    from the training stream each batch, as in training (so in-batch candidates are real draws).
    ``estimate(ctx, pos)`` and ``exact(ctx, pos)`` give row 0's; the mean of the estimates must
    match the mean of the exact values within 4 standard errors."""
    rng = np.random.default_rng(1)
    est, ref = np.zeros(T), np.zeros(T)
    for t in range(T):
        pos = rng.choice(N_ITEMS, B, p=STREAM)
        ctx = Context(torch.arange(B), torch.from_numpy(pos))
        est[t], ref[t] = estimate(ctx, pos), exact(ctx, pos)
    assert est.mean() == pytest.approx(ref.mean(), rel=4 * est.std() / np.sqrt(T) / ref.mean() + 1e-3)
    return est, ref


def _row0_mass(block, pos: np.ndarray) -> float:
    """sum over row 0's candidates of exp(s - log_q), the row's positive left out (the loss masks it)."""
    items = block.per_row_items(len(pos))[0].numpy()
    keep = items != pos[0]
    return np.exp(Z_SCORES[items[keep]] - block.log_q[0].numpy()[keep].astype(np.float64)).sum()


@pytest.mark.parametrize("mix_name", list(Z_MIXES))
def test_sampled_partition_function_is_unbiased(mix_name):
    """Z = sum_j exp(s_j). With log_q the expected count of each candidate under the whole
    proposal, sum over candidates of exp(s_c - log_q_c) estimates Z without bias, over the
    proposal's support. Per-row sources are conditioned on each positive. As in the loss, the
    positive is its own term and candidates equal to it are masked."""
    weights, hard = Z_MIXES[mix_name] if isinstance(Z_MIXES[mix_name], tuple) else (Z_MIXES[mix_name], set())
    mix = MixtureSampler(_small_catalog_sources(), weights, 16, hard=hard)
    gen = torch.Generator().manual_seed(0)

    def estimate(ctx, pos):
        total = np.exp(Z_SCORES[pos[0]])
        for block in mix.sample(ctx, gen):
            assert block.hard == (mix.names[block.source] in hard)
            if block.hard:  # uncorrected extras: not part of the estimate
                assert not block.log_q.any()
                continue
            total += _row0_mass(block, pos)
        return total

    def exact(ctx, pos):
        # row 0's exact Z over the proposal's support given its positive (every item when the
        # mix holds a full-support source; the positive's category or neighbours otherwise)
        support = mix._log_q(ctx, torch.arange(N_ITEMS), [])[0].numpy() > -np.inf
        support[pos[0]] = True
        return np.exp(Z_SCORES[support]).sum()

    est, ref = _z_trials(estimate, exact)
    if weights == {"full": 1.0}:  # the full softmax: every item once, exact at every step
        assert est == pytest.approx(ref)
    if "in_batch" in weights:  # in-batch alone covers every training positive: the whole catalog here
        assert ref.min() == pytest.approx(np.exp(Z_SCORES).sum())


@pytest.mark.parametrize("hard_source", ["popularity", "category", "copurchase"])
def test_a_hard_source_corrected_by_itself_estimates_its_own_pools_mass(hard_source):
    """hard_correction=source: each hard candidate weighed by exp(-log n q) of its own source
    estimates, without bias, the mass of that source's support (the positive left out), so in a
    joint softmax the mined region counts once more beside the proposal; with ``none`` the same
    block carries log_q 0."""
    components = _small_catalog_sources()
    weights = {"in_batch": 1.0, "uniform": 1.0, hard_source: 1.0}
    corrected = MixtureSampler(components, weights, 16, hard={hard_source}, hard_correction="source")
    plain = MixtureSampler(components, weights, 16, hard={hard_source})
    gen = torch.Generator().manual_seed(0)

    def estimate(ctx, pos):
        (block,) = [b for b in corrected.sample(ctx, gen) if b.hard]
        return _row0_mass(block, pos)

    def exact(ctx, pos):
        support = components[hard_source].log_prob(ctx, torch.arange(N_ITEMS)).expand(len(pos), -1)[0].numpy() > -np.inf
        support[pos[0]] = False
        return np.exp(Z_SCORES[support]).sum()

    _z_trials(estimate, exact)
    ctx = Context(torch.arange(8), torch.from_numpy(np.random.default_rng(2).choice(N_ITEMS, 8, p=STREAM)))
    (block,) = [b for b in plain.sample(ctx, gen) if b.hard]
    assert not block.log_q.any()


def test_a_memory_bank_joins_the_proposal_and_keeps_the_estimate_unbiased():
    """A FIFO bank of recent positives holds stream draws: corrected by its own count alone it
    estimates Z a second time (about 2Z beside in-batch + uniform); joined to the mixture (every
    candidate corrected by its count under all sources together, as the Trainer does) the
    estimate is unbiased."""
    from recsys_hnm.mining import MemoryBank

    stream = InBatchSampler(COUNTS + 1)
    mix = MixtureSampler({"in_batch": stream, "uniform": UniformSampler(N_ITEMS)}, {"in_batch": 1.0, "uniform": 1.0}, 4)
    bank = MemoryBank(6, 1, stream.log_p)
    scores = torch.from_numpy(np.random.default_rng(0).uniform(-1.0, 1.0, N_ITEMS))
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(1)
    B, T = 8, 4000
    joined, alone = np.zeros(T), np.zeros(T)
    for t in range(T):
        pos = torch.from_numpy(rng.choice(N_ITEMS, B, p=STREAM))
        bank.push(torch.from_numpy(rng.choice(N_ITEMS, 6, p=STREAM)), torch.zeros(6, 1))  # earlier batches' positives
        ctx = Context(torch.arange(B), pos)
        joined[t] = alone[t] = float(torch.exp(scores[pos[0]]))
        for block in mix.sample(ctx, gen):
            items = block.per_row_items(B)[0]  # row 0
            keep = items != pos[0]
            joined[t] += float(torch.exp(scores[items] - torch.logaddexp(block.log_q[0], bank.log_count(items)))[keep].sum())
            alone[t] += float(torch.exp(scores[items] - block.log_q[0])[keep].sum())
        queued = bank.items[bank.items >= 0]
        keep = queued != pos[0]
        own = bank.log_count(queued)
        joined[t] += float(torch.exp(scores[queued] - mix.proposal_log_q(ctx, queued, own)[0])[keep].sum())
        alone[t] += float(torch.exp(scores[queued] - own)[keep].sum())
    exact = float(torch.exp(scores).sum())
    assert joined.mean() == pytest.approx(exact, rel=4 * joined.std() / np.sqrt(T) / exact + 1e-3)
    assert alone.mean() > 1.6 * exact  # the bank's own count alone: Z estimated twice


def test_hard_roles_train_and_the_guard_logs_what_it_dropped(synthetic_files, tmp_path):
    config = small_config(synthetic_files, tmp_path, sampler={
        "num_negatives": 32, "mixture": {"in_batch": 1.0, "uniform": 1.0, "category": 1.0}, "hard": ["category"],
        "hard_loss": "separate", "hard_weight": 0.5, "false_negative_guard": True})
    data, split = load_data(config)
    sampler = build_sampler(config, data, split)
    assert sampler.hard == {"category"}
    trainer, _ = build_trainer(config, data, split, sampler, [], tmp_path, epochs=1, validate=False)
    users, items = trainer.users[:64], trainer.items[:64]
    torch.manual_seed(0)
    out = trainer.train_step(users, items)
    hard = [b for b in out.blocks if b.hard]
    assert len(hard) == 1 and not hard[0].log_q.any() and all(b.log_q.any() for b in out.blocks if not b.hard)
    seen, above, _ = trainer.guard_counts.tolist()
    assert 0 < above < seen  # at initialisation some mined negatives outscore the positive, not all
    trainer.fit()
    assert 0 < trainer.history[-1]["guard.above_positive_share"] < 1


def test_the_guard_drops_exactly_the_mined_negatives_above_the_positive_or_co_consumed(synthetic_files, tmp_path):
    from recsys_hnm.data import copurchase_graph
    from recsys_hnm.sampling import Negatives

    config = small_config(synthetic_files, tmp_path, sampler={"mixture": {"in_batch": 1.0, "category": 1.0}, "hard": ["category"],
                                                              "false_negative_guard": True, "guard_cooccurrence": 2})
    data, split = load_data(config)
    trainer, _ = build_trainer(config, data, split, build_sampler(config, data, split), [], tmp_path, epochs=1, validate=False)
    assert trainer.objective.cooccurring is not None
    # users 0 and 1 both have items 0 and 1; user 2 has items 0 and 2: only (0, 1) reaches 2 users
    history = pd.DataFrame({"user": [0, 0, 1, 1, 2, 2], "item": [0, 1, 0, 1, 0, 2]})
    trainer.objective = dataclasses.replace(trainer.objective, cooccurring=SortedPairs(copurchase_graph(history, 5, source="history", min_count=2)))
    trainer.guard_counts.zero_()
    block = Negatives(torch.tensor([[1, 2, 3], [1, 2, 3]]), torch.zeros(2, 3), 0, torch.tensor([[False, False, True], [False] * 3]), hard=True)
    logits = torch.tensor([[0.5, 2.0, 9.0], [0.5, 0.2, 0.1]])
    invalid = trainer._guard(logits, torch.tensor([1.0, 1.0]), torch.tensor([0, 4]), block, block.invalid)
    # row 0 (positive 0): item 1 is co-consumed, item 2 scores above the positive, item 3 was masked
    # already; row 1 (positive 4): nothing to drop
    assert invalid.tolist() == [[True, True, True], [False, False, False]]
    assert trainer.guard_counts.tolist() == [5.0, 1.0, 1.0]
