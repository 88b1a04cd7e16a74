"""Seeded synthetic interaction logs with Zipf popularity, latent categories and co-purchases."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .interactions import DataError, Interactions


# size: one generative story (users' tastes, items' categories, events, baskets) read in order
def synthetic_frames(
    n_users: int = 500,
    n_items: int = 1000,
    n_events: int = 20_000,
    *,
    n_categories: int = 20,
    categories_per_user: int = 2,
    zipf_a: float = 1.1,
    basket_size: float = 2.0,
    complement_p: float = 0.6,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, items) frames in the raw format of ``Interactions.from_frames``.

    Each item belongs to one category; within a category popularity follows Zipf(``zipf_a``).
    Each user prefers ``categories_per_user`` categories. Events come in baskets of mean size
    ``basket_size``: the first item is drawn from a preferred category, each further item is,
    with probability ``complement_p``, one of the first item's three fixed complements
    (co-purchase structure), otherwise a fresh draw. Fully vectorised.
    """
    if min(n_users, n_items, n_events, n_categories) < 1 or n_categories > n_items:
        raise DataError("synthetic: sizes must be >= 1 and n_categories <= n_items")
    rng = np.random.default_rng(seed)
    per_cat = n_items // n_categories
    # Item i is in category i % n_categories and has within-category rank i // n_categories.
    ranks = np.arange(1, per_cat + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -zipf_a)
    cdf /= cdf[-1]
    prefs = rng.integers(0, n_categories, size=(n_users, categories_per_user))
    complements = _complements(rng, n_items, n_categories, per_cat, cdf)

    n_baskets = max(1, int(round(n_events / basket_size)))
    sizes = 1 + rng.poisson(basket_size - 1, n_baskets)
    sizes = _trim_to(sizes, n_events)
    n_baskets = len(sizes)
    basket_user = rng.integers(0, n_users, n_baskets)

    def draw(users: np.ndarray) -> np.ndarray:
        cat = prefs[users, rng.integers(0, categories_per_user, len(users))]
        rank = np.searchsorted(cdf, rng.random(len(users)))
        return cat + rank * n_categories

    first = draw(basket_user)
    basket = np.repeat(np.arange(n_baskets), sizes)
    user = basket_user[basket]
    item = first[basket]
    later = np.ones(len(basket), bool)
    later[np.r_[0, np.cumsum(sizes)[:-1]]] = False
    is_comp = later & (rng.random(len(basket)) < complement_p)
    item[is_comp] = complements[item[is_comp], rng.integers(0, 3, is_comp.sum())]
    fresh = later & ~is_comp
    item[fresh] = draw(user[fresh])

    basket_time = np.sort(rng.uniform(1.5e9, 1.5e9 + 365 * 86400, n_baskets))
    ids = rng.permutation(n_items) + 1  # raw ids unrelated to popularity rank
    events = pd.DataFrame(
        {
            "user_id": user + 1,
            "item_id": ids[item],
            "timestamp": basket_time[basket],
            "basket_id": basket,
        }
    )
    items = pd.DataFrame({"item_id": ids, "category": [f"c{i % n_categories}" for i in range(n_items)]})
    return events, items


def synthetic(n_users: int = 500, n_items: int = 1000, n_events: int = 20_000, *, duplicates="first", **kw) -> Interactions:
    events, items = synthetic_frames(n_users, n_items, n_events, **kw)
    return Interactions.from_frames(events, items, duplicates=duplicates, source="synthetic")


def _complements(rng, n_items, n_categories, per_cat, cdf) -> np.ndarray:
    """Three complements per item, popularity-weighted, from other categories."""
    cat = rng.integers(0, n_categories, (n_items, 3))
    rank = np.searchsorted(cdf, rng.random((n_items, 3)))
    return np.minimum(cat + rank * n_categories, n_items - 1)


def _trim_to(sizes: np.ndarray, total: int) -> np.ndarray:
    """Basket sizes summing exactly to ``total``."""
    ends = np.cumsum(sizes)
    while ends[-1] < total:
        sizes = np.r_[sizes, sizes[: len(sizes) // 4 + 1]]
        ends = np.cumsum(sizes)
    last = int(np.searchsorted(ends, total))
    sizes = sizes[: last + 1].copy()
    sizes[-1] -= ends[last] - total
    return sizes[sizes > 0]
