"""The training loop: batches, negatives, sampled softmax, callbacks. It knows nothing about ANN
indexes or MLflow; those come in as callbacks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..evaluation import Evaluator
from ..losses import pairwise, sampled_softmax_by_role
from ..models import FeatureBuilder, TwoTower, model_scorer
from ..sampling import Context, MixtureSampler, Negatives
from ..sampling.diagnostics import NegativeDiagnostics
from .callbacks import Callback
from .mining import MemoryBank, select_candidates
from ..sparse import SortedPairs

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What a training step returns beside the loss, detached (TorchRec's train-task shape)."""

    loss: float
    blocks: list[Negatives]
    neg_scores: list[torch.Tensor]


class Trainer:
    """Fits a TwoTower on training events with a MixtureSampler.

    Reproducible: every random draw (the epoch's order, the negatives) comes from one seeded
    ``torch.Generator`` whose state is part of ``state_dict``, so a resumed run continues exactly.
    """

    def __init__(
        self,
        model: TwoTower,
        features: FeatureBuilder,
        sampler: MixtureSampler,
        train_events: pd.DataFrame,
        evaluator: Evaluator | None,
        *,
        epochs: int = 20,
        batch_size: int = 1024,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        callbacks: list[Callback] | None = None,
        diagnostics: NegativeDiagnostics | None = None,
        progress: bool = True,
        causal_history: bool = False,
        item_id_dropout: float = 0.0,
        hard_loss: str = "joint",
        hard_weight: float = 1.0,
        false_negative_guard: bool = False,
        cooccurring: SortedPairs | None = None,
        loss: str = "softmax",
        margin: float = 1.0,
        triplet_negative: str = "hardest",
        select: str = "none",
        select_k: int = 64,
        select_margin: float = 1.0,
        memory_bank: MemoryBank | None = None,
    ):
        self.model = model
        self.features = features
        self.sampler = sampler
        self.users = torch.tensor(train_events["user"].to_numpy(np.int64))
        self.items = torch.tensor(train_events["item"].to_numpy(np.int64))
        # causal: each (user, positive) sees only the items before the positive; otherwise every
        # other training item of the user (the positive itself left out)
        self.positions = features.event_positions(train_events) if causal_history else None
        self.item_id_dropout = item_id_dropout  # the item tower learns to score cold items from categories
        if hard_loss not in ("joint", "separate"):
            raise ValueError(f"hard_loss must be 'joint' or 'separate', not {hard_loss!r}")
        self.hard_loss, self.hard_weight = hard_loss, hard_weight
        self.false_negative_guard = false_negative_guard
        self.cooccurring = cooccurring  # (positive, item) pairs many users share: not negatives of each other
        self.guard_counts = torch.zeros(3)  # hard negatives seen; dropped as above the positive; as co-consumed
        if loss not in ("softmax", "bpr", "triplet"):
            raise ValueError(f"loss must be 'softmax', 'bpr' or 'triplet', not {loss!r}")
        self.loss, self.margin, self.triplet_negative = loss, margin, triplet_negative
        self.select, self.select_k, self.select_margin = select, select_k, select_margin
        self.memory_bank = memory_bank
        self.step_means: dict[str, list[float]] = {}  # per-epoch means of step statistics (selection, bank)
        self.evaluator = evaluator
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.callbacks = list(callbacks or [])
        self.diagnostics = diagnostics
        self.progress = progress
        self.epoch = 0  # the next epoch to run
        self.history: list[dict[str, float]] = []
        self.should_stop = False

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, float]]:
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.epoch < self.epochs and not self.should_stop:
            epoch = self.epoch
            for cb in self.callbacks:
                cb.on_epoch_start(self, epoch)
            start = time.perf_counter()
            self.guard_counts.zero_()
            self.step_means.clear()
            logs = {"train_loss": self.train_epoch(epoch), "temperature": self.model.temperature}
            seen, above, together = self.guard_counts.tolist()
            if seen and self.false_negative_guard:
                logs["guard.above_positive_share"] = above / seen
            if seen and self.cooccurring is not None:
                logs["guard.cooccurring_share"] = together / seen
            logs.update({k: total / n for k, (total, n) in self.step_means.items() if n})
            if self.model.temperature_at_bound():
                log.warning("epoch %d: the learned temperature sits at a bound (%.4g); its gradient is zero there", epoch, self.model.temperature)
            logs["epoch_s"] = time.perf_counter() - start
            if self.evaluator is not None:  # None: no validation (a refit on train + valid)
                start = time.perf_counter()
                logs.update({f"valid.{k}": v for k, v in self.evaluate().items()})
                logs["eval_s"] = time.perf_counter() - start
            if self.diagnostics is not None:
                logs.update(self.diagnostics.results())
            self.history.append(logs)
            self.epoch = epoch + 1
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in logs.items() if not k.startswith("neg.")})
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, logs)
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        if self.diagnostics is not None:
            self.diagnostics.reset()
        order = torch.randperm(len(self.users), generator=self.generator)
        batches = range(0, len(order), self.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=None if self.progress else True, leave=False)  # None: off when not a terminal
        total, count = 0.0, 0
        for start in bar:
            idx = order[start:start + self.batch_size]
            out = self.train_step(self.users[idx], self.items[idx], None if self.positions is None else self.positions[idx])
            total += out.loss * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{out.loss:.4f}")
        return total / max(count, 1)

    def train_step(self, users: torch.Tensor, pos_items: torch.Tensor, positions: torch.Tensor | None = None) -> StepOutput:
        ctx = Context(users, pos_items)
        blocks = self.sampler.sample(ctx, self.generator)
        # Each distinct item goes through the item tower once per step.
        parts = [pos_items] + [b.items.reshape(-1) for b in blocks]
        unique, inverse = torch.unique(torch.cat(parts), return_inverse=True)
        drop_id = torch.rand(len(unique), generator=self.generator) < self.item_id_dropout if self.item_id_dropout > 0 else None
        item_emb = self.model.item_embeddings(self.features.item_features(unique, drop_id))
        if positions is not None:
            user_features = self.features.user_features_before(users, positions)
        else:
            user_features = self.features.user_features(users, exclude=pos_items)
        user_emb = self.model.user_embeddings(user_features)
        scale = self.model.scale
        offsets = np.cumsum([0] + [p.numel() for p in parts])
        pos_emb = item_emb[inverse[: offsets[1]]]
        pos_logits = (user_emb * pos_emb).sum(-1) * scale + self.model.bias(pos_items)
        neg_cos, terms = [], []  # per block: logits, log_q, invalid, hard
        for i, block in enumerate(blocks):
            emb = item_emb[inverse[offsets[i + 1]:offsets[i + 2]]]
            if block.shared:
                cos = user_emb @ emb.T
            else:
                emb = emb.reshape(*block.items.shape, -1)
                cos = torch.einsum("bd,bnd->bn", user_emb, emb)
            neg_cos.append(cos.detach())
            logits = cos * scale + self.model.bias(block.items)
            invalid = block.invalid
            if block.hard:
                invalid = self._guard(logits, pos_logits, pos_items, block, invalid)
            terms.append((logits, block.log_q.expand(len(users), -1), invalid, block.hard))
        if self.memory_bank is not None and self.memory_bank.ready:
            items, emb, log_q, invalid, staleness = self.memory_bank.negatives(users, pos_items, self.sampler.known)
            terms.append(((user_emb @ emb.T) * scale + self.model.bias(items), log_q.expand(len(users), -1), invalid, False))
            self._note("bank.staleness_steps", staleness)
            self._note("bank.entries", len(items))
        if self.select != "none":
            widths = [p[0].shape[1] for p in terms]
            invalid, stats = select_candidates(torch.cat([p[0] for p in terms], 1), pos_logits, torch.cat([p[2] for p in terms], 1),
                                               self.select, self.select_k, self.select_margin)
            terms = [(lg, lq, inv, hard) for (lg, lq, _, hard), inv in zip(terms, torch.split(invalid, widths, dim=1))]
            for name, value in stats.items():
                self._note(f"select.{name}", value)
        if self.loss == "softmax":
            loss = sampled_softmax_by_role(pos_logits, terms, self.hard_loss, self.hard_weight)
        else:
            loss = pairwise(self.loss, pos_logits, torch.cat([p[0] for p in terms], 1), torch.cat([p[2] for p in terms], 1),
                            self.margin, self.triplet_negative)
        if self.memory_bank is not None:
            self.memory_bank.push(pos_items, pos_emb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.diagnostics is not None:
            self.diagnostics.update(ctx, blocks, neg_cos, self._rank_sample_scores(user_emb))
        return StepOutput(float(loss.detach()), blocks, neg_cos)

    def _guard(self, logits, pos_logits, pos_items, block, invalid) -> torch.Tensor:
        """The false-negative guard on mined negatives: those scoring above the row's positive,
        and those many users consume together with the positive, are more likely unlabelled
        positives than negatives; they leave the loss and are counted."""
        self.guard_counts[0] += float((~invalid).sum())
        if self.false_negative_guard:
            above = (logits.detach() > pos_logits.detach()[:, None]) & ~invalid
            self.guard_counts[1] += float(above.sum())
            invalid = invalid | above
        if self.cooccurring is not None:
            together = (self.cooccurring.find(pos_items, block.per_row_items(len(pos_items))) >= 0) & ~invalid
            self.guard_counts[2] += float(together.sum())
            invalid = invalid | together
        return invalid

    def _note(self, name: str, value: float) -> None:
        if value == value:  # not NaN
            total = self.step_means.setdefault(name, [0.0, 0])
            total[0] += value
            total[1] += 1

    @torch.no_grad()
    def _rank_sample_scores(self, user_emb: torch.Tensor) -> torch.Tensor | None:
        """Scores of the first rows against the diagnostics' uniform item sample, computed apart
        from the training step so that diagnostics never change what training computes."""
        items = self.diagnostics.rank_items()
        if items is None:
            return None
        rows = min(self.diagnostics.rank_rows, len(user_emb))
        return user_emb[:rows].detach() @ self.model.item_embeddings(self.features.item_features(items)).T

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, evaluator: Evaluator | None = None, features: FeatureBuilder | None = None) -> dict[str, float]:
        return (evaluator or self.evaluator).evaluate(model_scorer(self.model, features or self.features))

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "history": self.history,
            "should_stop": self.should_stop,
            "diagnostics_generator": self.diagnostics.generator.get_state() if self.diagnostics is not None else None,
            "callbacks": {_callback_key(i, cb): cb.state_dict() for i, cb in enumerate(self.callbacks)},
            "memory_bank": self.memory_bank.state_dict() if self.memory_bank is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self.history = state["history"]
        self.should_stop = state["should_stop"]
        if self.diagnostics is not None and state.get("diagnostics_generator") is not None:
            self.diagnostics.generator.set_state(state["diagnostics_generator"])
        if self.memory_bank is not None and state.get("memory_bank") is not None:
            self.memory_bank.load_state_dict(state["memory_bank"])
        for i, cb in enumerate(self.callbacks):
            key = _callback_key(i, cb)
            if key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][key])


def _callback_key(position: int, callback: Callback) -> str:
    """Position and class: two callbacks of one class keep their own state."""
    return f"{position}.{type(callback).__name__}"
