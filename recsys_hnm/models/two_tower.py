"""Two-tower model on TorchRec modules; it knows nothing about sharding or sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

# Feature names of the KeyedJaggedTensors the towers read.
USER_ID, HISTORY, ITEM_ID, ITEM_CATEGORY = "user_id", "history", "item_id", "item_category"
FEATURES = (USER_ID, HISTORY, ITEM_ID, ITEM_CATEGORY)
# Bounds of a learned temperature; a fixed one is used exactly as configured.
LEARNED_T_MIN, LEARNED_T_MAX = 0.01, 1.0


@dataclass(frozen=True)
class TowerSizes:
    n_users: int
    n_items: int
    n_categories: int


def _mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """User tower: user id + a recency-weighted mean of the user's recent items (see
    ``FeatureBuilder``; decay 1 is the plain mean); item tower: item id + mean of its categories. One EmbeddingBagCollection holds the tables (the item table is shared by the
    item id and the history bag), an MLP tops each tower, outputs are L2-normalised and the
    score is their dot product divided by a temperature (fixed or learned), plus an optional
    per-item bias that lets the item side express popularity.
    """

    def __init__(
        self,
        sizes: TowerSizes,
        dim: int = 64,
        hidden: list[int] | None = None,
        temperature: float = 0.1,
        learn_temperature: bool = False,
        item_bias: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        hidden = [128] if hidden is None else list(hidden)
        self.sizes = sizes
        tables = [
            EmbeddingBagConfig(name="user_table", embedding_dim=dim, num_embeddings=sizes.n_users,
                               feature_names=[USER_ID], pooling=PoolingType.SUM),
            EmbeddingBagConfig(name="item_table", embedding_dim=dim, num_embeddings=sizes.n_items,
                               feature_names=[HISTORY, ITEM_ID], pooling=PoolingType.SUM),
            EmbeddingBagConfig(name="category_table", embedding_dim=dim, num_embeddings=max(1, sizes.n_categories),
                               feature_names=[ITEM_CATEGORY], pooling=PoolingType.SUM),
        ]
        # weighted sums: the features carry the weights (1 for ids, 1/n for a mean of categories,
        # recency weights summing to 1 for the history bag), so one collection pools them all
        self.ebc = EmbeddingBagCollection(tables=tables, is_weighted=True, device=torch.device(device) if device else None)
        self.user_mlp = _mlp(2 * dim, hidden, dim)
        self.item_mlp = _mlp(2 * dim, hidden, dim)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, not {temperature}")
        if learn_temperature and not LEARNED_T_MIN <= temperature <= LEARNED_T_MAX:
            raise ValueError(f"a learned temperature starts within [{LEARNED_T_MIN}, {LEARNED_T_MAX}], not at {temperature}")
        self.learn_temperature = learn_temperature
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.item_bias = nn.Parameter(torch.zeros(sizes.n_items)) if item_bias else None

    @property
    def scale(self) -> torch.Tensor:
        """1 / temperature: the configured value as it is, or a learned one kept within
        [LEARNED_T_MIN, LEARNED_T_MAX] so it cannot run away (see ``temperature_at_bound``)."""
        scale = torch.exp(-self.log_temperature)
        return scale.clamp(1.0 / LEARNED_T_MAX, 1.0 / LEARNED_T_MIN) if self.learn_temperature else scale

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale.detach())

    def temperature_at_bound(self) -> bool:
        """A learned temperature that has reached a bound (its gradient is then zero)."""
        t = float(torch.exp(self.log_temperature.detach()))
        return self.learn_temperature and not LEARNED_T_MIN < t < LEARNED_T_MAX

    def user_embeddings(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(features)
        return F.normalize(self.user_mlp(torch.cat([pooled[USER_ID], pooled[HISTORY]], dim=1)), dim=-1)

    def item_embeddings(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(features)
        return F.normalize(self.item_mlp(torch.cat([pooled[ITEM_ID], pooled[ITEM_CATEGORY]], dim=1)), dim=-1)

    def bias(self, items: torch.Tensor) -> torch.Tensor | float:
        return self.item_bias[items] if self.item_bias is not None else 0.0
