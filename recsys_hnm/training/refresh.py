"""The callback that re-embeds the items, rebuilds the index and re-mines the hard negatives."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..models import item_embeddings, user_embeddings
from ..sampling import MixtureSampler
from .callbacks import Callback
from ..sampling.ann import AnnSampler
from ..index.item_index import ExactIndex, IndexOptions, load_index, make_index, recall_at_k

log = logging.getLogger(__name__)


class IndexRefresh(Callback):
    """Every ``refresh_every`` epochs from the end of the warm-up (the first ``warmup_epochs``
    epochs train on easy negatives only), embeds all items with the current model, rebuilds the
    index and re-mines the pools of the ANN sampler.

    The share of ANN negatives ramps linearly from 0 to its configured weight over
    ``ramp_epochs`` (0: at once). Per refresh it adds to the epoch's logs: ``ann.build_s``,
    ``ann.mine_s``, ``ann.recall_at_k`` (the index against exact search on ``recall_sample``
    anchors), ``ann.pool_overlap`` (share of each pool still there since the last refresh),
    and ``ann.weight``.
    """

    def __init__(
        self,
        sampler: AnnSampler,
        mixture: MixtureSampler,
        *,
        exclude: sp.csr_matrix | None,
        backend: str = "auto",
        refresh_every: int = 1,
        warmup_epochs: int = 2,
        ramp_epochs: int = 0,
        index_path: str | Path | None = None,  # where an Annoy index is kept memory-mapped
        index_options: IndexOptions = IndexOptions(),
        recall_sample: int = 200,
        seed: int = 0,
    ):
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, not {refresh_every}")
        self.sampler = sampler
        self.mixture = mixture
        self.target_weight = mixture.weights.get("ann", 0.0)
        # a user's known items (of the row's user, per position), or the anchor item itself, never enter a pool
        self.exclude = sp.identity(sampler.n_items, format="csr") if sampler.anchor == "item" else exclude
        self.backend = backend
        self.refresh_every = refresh_every
        self.warmup_epochs = warmup_epochs
        self.ramp_epochs = ramp_epochs
        self.index_path = Path(index_path) if index_path else None
        self.index_options = index_options.as_kwargs()
        self.recall_sample = recall_sample
        self.index = None
        self.biased = False  # the index holds the item bias as an extra coordinate (see vectors)
        self.stats: dict[str, float] = {}
        self.rng = np.random.default_rng(seed)

    def weight_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return 0.0
        if self.ramp_epochs <= 0:
            return self.target_weight
        return self.target_weight * min(1.0, (epoch - self.warmup_epochs + 1) / self.ramp_epochs)

    def on_fit_start(self, trainer):
        self.mixture.set_weight("ann", self.weight_at(trainer.epoch))

    def on_epoch_start(self, trainer, epoch):
        weight = self.weight_at(epoch)
        self.stats = {"ann.weight": weight}
        on_schedule = (epoch - self.warmup_epochs) % self.refresh_every == 0
        mined = self.index is not None if self.sampler.anchor == "position" else bool((self.sampler.sizes > 0).any())
        due = epoch >= self.warmup_epochs and (on_schedule or not mined)
        if due and weight > 0:
            self.stats.update(self.refresh(trainer))
        self.mixture.set_weight("ann", weight)

    def on_epoch_end(self, trainer, epoch, logs):
        logs.update(self.stats)

    def vectors(self, trainer) -> tuple[np.ndarray, np.ndarray]:
        """(items, anchors) of the current model, as the index stores and queries them."""
        model = trainer.unsharded_model()
        items = item_embeddings(model, trainer.features).numpy()
        anchors = user_embeddings(model, trainer.features).numpy() if self.sampler.anchor != "item" else items
        if model.item_bias is not None:
            # score x T = u . v + b T = [u, 1] . [v, b T]: a maximum inner product search. Item
            # anchors look for look-alikes, so their extra coordinate is 0 (no bias).
            bias_t = model.item_bias.detach().numpy()[:, None] / float(model.scale.detach())
            items = np.hstack([items, bias_t]).astype(np.float32)
            anchors = np.hstack([anchors, np.full((len(anchors), 1), 1.0 if self.sampler.anchor == "user" else 0.0, np.float32)])
        return items, anchors

    def final_index(self, trainer, path: str | Path):
        """The index of the model as training leaves it (after any best-weight restore), saved
        to ``path``: the artifact that goes with the logged model."""
        items, _ = self.vectors(trainer)
        index = make_index(items, self.backend, Path(path), **self.index_options)
        index.save(path)
        return index

    def refresh(self, trainer) -> dict[str, float]:
        items, anchors = self.vectors(trainer)
        self.biased = trainer.unsharded_model().item_bias is not None
        cluster = trainer.cluster
        start = time.perf_counter()
        if cluster is None:
            self.index = make_index(items, self.backend, self.index_path, **self.index_options)
        else:  # built once, by rank 0; the other ranks open the saved file (Annoy memory-maps it)
            if cluster.chief:
                make_index(items, self.backend, self.index_path, **self.index_options).save(self.index_path)
            cluster.broadcast(None)  # the file is complete
            self.index = load_index(self.index_path, items.shape[1], **self.index_options)
        build_s = time.perf_counter() - start
        stats = {"ann.build_s": build_s}
        if self.sampler.anchor != "position":  # position pools are mined in every step (mine_positions)
            start = time.perf_counter()
            moved = self.sampler.mine(self.index, anchors, self.exclude, share=cluster)
            stats.update({"ann.mine_s": time.perf_counter() - start, "ann.pool_overlap": moved["pool_overlap"],
                          "ann.pool_mean_size": moved["pool_mean_size"]})
        if not isinstance(self.index, ExactIndex):
            stats["ann.recall_at_k"] = self._recall(items, anchors)
        log.info("index refresh: %s", {k: round(v, 4) for k, v in stats.items()})
        return stats

    def mine_positions(self, queries: torch.Tensor, users: torch.Tensor) -> None:
        """The Trainer's ``position_miner``: each step's position vectors searched in the index of
        the last refresh (uniform fallback before the first), the row user's items excluded."""
        index = self.index if self.mixture.weights.get("ann", 0.0) > 0 else None
        q = queries.numpy()
        if index is not None and self.biased:  # the item bias as one more coordinate, as in vectors()
            q = np.hstack([q, np.ones((len(q), 1), np.float32)])
        start = time.perf_counter()
        self.sampler.mine_rows(index, q, self.exclude[users.numpy()] if self.exclude is not None and index is not None else None)
        self.stats["ann.mine_s"] = self.stats.get("ann.mine_s", 0.0) + time.perf_counter() - start

    def _recall(self, items: np.ndarray, anchors: np.ndarray) -> float:
        rows = self.rng.choice(len(anchors), min(self.recall_sample, len(anchors)), replace=False)
        exclude = self.exclude[rows] if self.exclude is not None else None
        k = self.sampler.hi
        return recall_at_k(self.index.search(anchors[rows], k, exclude), ExactIndex(items).search(anchors[rows], k, exclude))

    def state_dict(self) -> dict:
        # The index itself is not state: every refresh rebuilds it, and the final one is built
        # from the final model (``final_index``).
        return {"pools": self.sampler.pools, "sizes": self.sampler.sizes, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.pools, self.sampler.sizes = state["pools"], state["sizes"]
        self.rng.bit_generator.state = state["rng"]
