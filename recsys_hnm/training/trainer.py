"""The training loop: batches, negatives, sampled softmax, callbacks. It knows nothing about ANN
indexes or MLflow; those come in as callbacks."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .distributed import ShardedTwoTower, table_optimizer_class
from .losses import pairwise, sampled_softmax_by_role
from .sequence import chunked_full_softmax, end_weights, next_item_sequences, sequence_windows
from ..models import FeatureBuilder, TwoTower, model_scorer
from ..ops.ranking import Scorer
from ..sampling import Context, MixtureSampler, Negatives
from ..sampling.mixture import FULL
from ..sampling.diagnostics import NegativeDiagnostics
from .callbacks import Callback
from ..mining import MemoryBank, candidate_scores, left_out_centroid_term, left_out_item_side_term, left_out_term, select_candidates
from ..ops.sparse import SortedPairs

log = logging.getLogger(__name__)

# table optimizers that take sparse gradients (adagrad's update is the same either way)
SPARSE_GRADIENT_OPTIMIZERS = ("sparse_adam", "adagrad")
LOSSES = ("softmax", "bpr", "triplet", "gbce")
HARD_LOSSES = ("joint", "separate")  # mined candidates in the one softmax, or in a term of their own
SELECT_RESTS = ("drop", "summarise", "centroid", "item_side")  # what online selection does with the candidates it leaves out
SELECT_RANKS = ("score", "share")  # hardest by raw score, or by share of the corrected normaliser (logit - log_q)
PER_POSITION = "per_position"
HISTORIES = ("all", "causal", PER_POSITION)  # what each training row's user tower reads


@dataclass(frozen=True)
class TrainOptions:
    """The loop and its optimisers. ``history``: ``all`` (every other training item of the
    user), ``causal`` (only the items before the positive) or ``per_position`` (sequence
    encoders: every position of a window predicts its next item). ``gather_in_batch``: under
    DMP, in-batch negatives from every rank's positives (ignored in one process)."""

    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    embedding_optimizer: str = "adam"
    embedding_lr: float | None = None  # None: lr
    seed: int = 0
    progress: bool = True
    history: str = "all"
    gather_in_batch: bool = False

    def __post_init__(self):
        if self.history not in HISTORIES:
            raise ValueError(f"history must be one of {HISTORIES}, not {self.history!r}")


@dataclass(frozen=True)
class Objective:
    """What one step optimises, whatever its negatives' sources (the role of TFRS's
    ``tasks.Retrieval``): the loss; how mined ("hard") candidates enter it (``hard_loss``
    joint or separate, ``hard_weight``); the false-negative guard on them (drop those above the
    positive; drop ``cooccurring`` pairs); online selection among all candidates (``select``
    none, hardest (``select_k``) or semi_hard (``select_margin``); the rest dropped,
    summarised, summarised with the user side's gradient (centroid) or the item side's
    (item_side), ``select_rest``; ranked by score or by share of the normaliser, ``select_rank``);
    per-position weights toward the window's end; item id dropout (the item tower learns to score cold items from categories)."""

    loss: str = "softmax"
    margin: float = 1.0  # bpr / triplet
    triplet_negative: str = "hardest"
    gbce_calibration: float = 0.75
    hard_loss: str = "joint"
    hard_weight: float = 1.0
    false_negative_guard: bool = False
    cooccurring: SortedPairs | None = None  # (positive, item) pairs many users share: not negatives of each other
    select: str = "none"
    select_k: int = 64
    select_margin: float = 1.0
    select_rest: str = "drop"
    select_rank: str = "score"
    position_weight: float = 0.0
    item_id_dropout: float = 0.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        if self.hard_loss not in HARD_LOSSES:
            raise ValueError(f"hard_loss must be one of {HARD_LOSSES}, not {self.hard_loss!r}")
        if self.select_rank not in SELECT_RANKS:
            raise ValueError(f"select_rank must be one of {SELECT_RANKS}, not {self.select_rank!r}")
        if self.select_rest not in SELECT_RESTS:
            raise ValueError(f"select_rest must be one of {SELECT_RESTS}, not {self.select_rest!r}")


class Evaluator(Protocol):
    """What validation needs of an evaluator (``evaluation.Evaluator`` is one): metrics of a
    scorer. Typed here so that the loop does not import the evaluation stage above it."""

    def evaluate(self, scorer: Scorer) -> dict[str, float]: ...


@dataclass
class StepOutput:
    """What a training step returns beside the loss, detached (TorchRec's train-task shape)."""

    loss: float
    blocks: list[Negatives]
    neg_scores: list[torch.Tensor]
    rows: int  # the rows the loss averages over (per-position steps: the real positions, not the windows)


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
        options: TrainOptions = TrainOptions(),
        objective: Objective = Objective(),
        callbacks: list[Callback] | None = None,
        diagnostics: NegativeDiagnostics | None = None,
        memory_bank: MemoryBank | None = None,
        sharded: ShardedTwoTower | None = None,
        position_miner=None,
    ):
        o = self.options = options
        self.objective = objective
        # distributed (``sharded``): the model's tables are sharded by DMP and every rank runs
        # this same loop on its share of each global batch; see ``recsys_hnm.training.distributed``
        self.sharded = sharded
        self.cluster = sharded.cluster if sharded is not None else None
        self.model = sharded.module if sharded is not None else model
        self.forward = sharded.dmp if sharded is not None else model  # the call that syncs dense gradients
        self._version = self._gathered_at = 0  # weight updates so far; those the gathered copy has
        self.gather_in_batch = o.gather_in_batch and self.cluster is not None  # in-batch negatives from the global batch
        self.features = features
        self.sampler = sampler
        self.users = torch.tensor(train_events["user"].to_numpy(np.int64))
        self.items = torch.tensor(train_events["item"].to_numpy(np.int64))
        # causal: each (user, positive) sees only the items before the positive; otherwise every
        # other training item of the user (the positive itself left out)
        self.positions = features.event_positions(train_events) if o.history == "causal" else None
        # per position (sequence encoders): a step's rows are the real positions of B windows of
        # history_len events, each predicting its next item; the epoch's examples are the windows
        self.per_position = o.history == PER_POSITION
        self.position_miner = position_miner  # called with each step's position vectors before sampling (index mining)
        if self.per_position:
            self._windows()
        self.guard_counts = torch.zeros(3)  # hard negatives seen; dropped as above the positive; as co-consumed
        self.memory_bank = memory_bank
        self.step_means: dict[str, list[float]] = {}  # per-epoch means of step statistics (selection, bank)
        self.evaluator = evaluator
        self.epochs = o.epochs
        self.batch_size = o.batch_size
        self._optimizers(model, sharded)
        self.generator = torch.Generator().manual_seed(o.seed)
        # the epoch's order is the same on every rank (each takes its share of every global
        # batch); the negatives differ by rank
        self.order_generator = self.generator
        if self.cluster is not None:
            self.order_generator = torch.Generator().manual_seed(o.seed)
            self.generator = torch.Generator().manual_seed(o.seed + 1_000_003 * (self.cluster.rank + 1))
        self.callbacks = list(callbacks or [])
        self.diagnostics = diagnostics
        self.epoch = 0  # the next epoch to run
        self.history: list[dict[str, float]] = []
        self.should_stop = False

    def _windows(self) -> None:
        """Per position: the epoch's examples are windows of the users' sequences, (user, end)."""
        if self.sharded is not None:
            raise ValueError("per-position training runs in one process (its step has no sharded form yet)")
        features = self.features
        self.seq_len = torch.diff(torch.cat([features.seq_start, torch.tensor([len(features.seq_items)])]))
        self.users, self.ends = sequence_windows(self.seq_len, self.model.history_len)
        if not len(self.users):
            raise ValueError("per-position training needs users with at least two training events; there are none")
        self.full_softmax = self.sampler.names == [FULL] and self.objective.loss == "softmax"  # exact, chunked over the catalog

    def _optimizers(self, model: TwoTower, sharded: ShardedTwoTower | None) -> None:
        """Adam on the dense layers; the tables' own optimizer where the options ask for one
        (sparse gradients, another rate) or where DMP runs it fused in the lookup's backward."""
        o = self.options
        lr, weight_decay, embedding_optimizer, embedding_lr = o.lr, o.weight_decay, o.embedding_optimizer, o.embedding_lr
        self.table_optimizer = None
        if sharded is not None:  # the tables' optimizer runs fused in the lookup's backward
            self.optimizer = torch.optim.Adam(sharded.dense_parameters(), lr=lr, weight_decay=weight_decay)
        elif embedding_optimizer == "adam" and embedding_lr is None:
            self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            tables = list(model.ebc.parameters())
            dense = [p for p in model.parameters() if all(p is not t for t in tables)]
            if embedding_optimizer == "adam":
                self.optimizer = torch.optim.Adam([{"params": dense}, {"params": tables, "lr": embedding_lr}], lr=lr,
                                                  weight_decay=weight_decay)
            else:
                if embedding_optimizer in SPARSE_GRADIENT_OPTIMIZERS:
                    # gradients of the looked-up rows only: no dense [catalog, dim] gradient per step
                    for bag in model.ebc.embedding_bags.values():
                        bag.sparse = True
                    # torch's sparse adagrad asks callers to opt in or out of checks they never enabled
                    warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly disabled", UserWarning)
                self.optimizer = torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay)
                self.table_optimizer = table_optimizer_class(embedding_optimizer)(tables, lr=embedding_lr or lr)

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
            if seen and self.objective.false_negative_guard:
                logs["guard.above_positive_share"] = above / seen
            if seen and self.objective.cooccurring is not None:
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
        order = torch.randperm(len(self.users), generator=self.order_generator)
        batches = range(0, len(order), self.batch_size)
        chief = self.cluster is None or self.cluster.chief
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=None if self.options.progress and chief else True, leave=False)  # None: off when not a terminal
        rank, world = (self.cluster.rank, self.cluster.world) if self.cluster is not None else (0, 1)
        total, count = 0.0, 0
        for start in bar:
            idx = order[start:start + self.batch_size]
            # equal shares on every rank (the sharded lookups need them): the last batch gives
            # up its last len % world events, which other epochs' orders place elsewhere
            idx = idx[: len(idx) - len(idx) % world][rank::world]
            if not len(idx):
                continue
            if self.per_position:
                out = self.sequence_step(self.users[idx], self.ends[idx])
            else:
                out = self.train_step(self.users[idx], self.items[idx], None if self.positions is None else self.positions[idx])
            total += out.loss * out.rows
            count += out.rows
            bar.set_postfix(loss=f"{out.loss:.4f}")
        if self.cluster is not None:  # the epoch's loss over all ranks' rows
            sums = torch.tensor([total, float(count)], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            total, count = float(sums[0]), float(sums[1])
        return total / max(count, 1)

    def train_step(self, users: torch.Tensor, pos_items: torch.Tensor, positions: torch.Tensor | None = None) -> StepOutput:
        batch_items = None
        if self.gather_in_batch:  # the ids of every rank's positives; this rank's item tower embeds them
            shares = [torch.empty_like(pos_items) for _ in range(self.cluster.world)]
            torch.distributed.all_gather(shares, pos_items)
            batch_items = torch.cat(shares)
        ctx = Context(users, pos_items, batch_items)
        sampled = self.sampler.sample(ctx, self.generator)
        blocks, pos_offset = sampled, None
        if self.model.repeat_term is not None:
            history, pos_offset = self._history_block(users, pos_items, positions)
            blocks = sampled + [history]
        # Each distinct item goes through the item tower once per step.
        unique, inverse = torch.unique(torch.cat([pos_items] + [b.items.reshape(-1) for b in blocks]), return_inverse=True)
        drop_id = self._drop_ids(len(unique))
        looked_up = unique
        if self.cluster is not None:  # row-wise shards need the same lookup size on every rank: pad with a repeat
            extra = self.cluster.max(len(unique)) - len(unique)
            looked_up = torch.cat([unique, unique[:1].expand(extra)])
            drop_id = None if drop_id is None else torch.cat([drop_id, drop_id[:1].expand(extra)])
        if positions is not None:
            user_features = self.features.user_features_before(users, positions)
        else:
            user_features = self.features.user_features(users, exclude=pos_items)
        user_emb, item_emb = self.forward(user_features, self.features.item_features(looked_up, drop_id))
        loss, neg_cos = self._objective(ctx, blocks, user_emb, item_emb[: len(unique)], inverse, pos_offset=pos_offset)
        self._update(loss)
        neg_cos = neg_cos[: len(sampled)]  # the history block is the model's, not a sampler's
        if self.diagnostics is not None:
            self.diagnostics.update(ctx, sampled, neg_cos, self._rank_sample_scores(user_emb))
        return StepOutput(float(loss.detach()), sampled, neg_cos, len(users))

    def _history_block(self, users: torch.Tensor, pos_items: torch.Tensor, positions: torch.Tensor | None) -> tuple[Negatives, torch.Tensor]:
        """The repeat-aware model's exact candidates: every distinct item of the row's history
        (before the positive), scored with its repeat term and log_q 0, so that the items a user
        has but did not buy again at this step are negatives; the sampled blocks mask them as
        known positives, so none is counted twice. The positive's own repeat term comes back too."""
        items, counts = self.features.repeat_counts(users, positions)
        pos_count = ((items == pos_items[:, None]) * counts).sum(1)
        term = self.model.repeat_term
        invalid = (items < 0) | (items == pos_items[:, None])
        block = Negatives(items.clamp(min=0), torch.zeros(items.shape), source=-1, invalid=invalid, offset=term(items, counts))
        return block, term(pos_items[:, None], pos_count[:, None]).squeeze(1)

    def sequence_step(self, users: torch.Tensor, ends: torch.Tensor) -> StepOutput:
        """One per-position step over the windows ``(users, ends)``: every real position is a
        row (its user, its next item as the positive), and the rows share the mixture as
        rows of any batch do: in-batch negatives are all the step's targets, the logQ is exact
        per row, and the known-positive mask is the row's user's (every training item of the
        user: the position's own target, the items before it and the later ones)."""
        inputs, targets = next_item_sequences(self.features.seq_items, self.features.seq_start, self.seq_len, users,
                                              self.model.history_len, ends)
        real = targets >= 0
        rows_users, pos_items = users[:, None].expand_as(targets)[real], targets[real]
        power = self.objective.position_weight
        weights = end_weights(real, ends, self.seq_len[users], power)[real] if power > 0 else None
        user_emb = self.model.position_embeddings(inputs, users if self.features.user_id else None)[real]
        if self.position_miner is not None:
            self.position_miner(user_emb.detach(), rows_users)
        ctx = Context(rows_users, pos_items)
        if self.full_softmax:
            loss = self._full_softmax(ctx, user_emb, weights)
            self._update(loss)
            return StepOutput(float(loss.detach()), [], [], len(pos_items))
        blocks = self.sampler.sample(ctx, self.generator)
        unique, inverse = torch.unique(torch.cat([pos_items] + [b.items.reshape(-1) for b in blocks]), return_inverse=True)
        item_emb = self.model.item_embeddings(self.features.item_features(unique, self._drop_ids(len(unique))))
        loss, neg_cos = self._objective(ctx, blocks, user_emb, item_emb, inverse, weights)
        self._update(loss)
        if self.diagnostics is not None:
            self.diagnostics.update(ctx, blocks, neg_cos, self._rank_sample_scores(user_emb))
        return StepOutput(float(loss.detach()), blocks, neg_cos, len(pos_items))

    def _full_softmax(self, ctx: Context, user_emb: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The exact cross-entropy over the whole catalog, chunked (``chunked_full_softmax``), the
        rows' known positives other than their own target left out as the mixture's ``full``
        source leaves them out."""
        catalog = torch.arange(self.model.sizes.n_items)
        items = self.model.item_embeddings(self.features.item_features(catalog, self._drop_ids(len(catalog))))
        masked = None
        if self.sampler.known is not None:
            rows, _, cols = self.sampler.known.pairs.entries(ctx.users)
            masked = (rows, cols)
        bias = self.model.item_bias
        per_row = chunked_full_softmax(user_emb, items, ctx.pos_items, self.model.scale, bias, masked)
        return per_row.mean() if weights is None else (per_row * weights).sum() / weights.sum()

    def _drop_ids(self, n: int) -> torch.Tensor | None:
        rate = self.objective.item_id_dropout
        return torch.rand(n, generator=self.generator) < rate if rate > 0 else None

    def _update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.table_optimizer is not None:
            self.table_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.table_optimizer is not None:
            self.table_optimizer.step()
        self._version += 1

    def _objective(self, ctx: Context, blocks: list[Negatives], user_emb: torch.Tensor, item_emb: torch.Tensor,
                   inverse: torch.Tensor, weights: torch.Tensor | None = None,
                   pos_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The step's loss from the rows' user vectors and the embeddings of the distinct items
        (``inverse``: where the positives, then each block's items, sit among them); per-row
        ``weights`` (softmax only); ``pos_offset``: added to the positives' logits as each
        block's ``offset`` to its own. Returns the loss and each block's detached cosines."""
        users, pos_items = ctx.users, ctx.pos_items
        scale = self.model.scale
        offsets = np.cumsum([0, len(pos_items)] + [b.items.numel() for b in blocks])
        pos_emb = item_emb[inverse[: offsets[1]]]
        pos_logits = (user_emb * pos_emb).sum(-1) * scale + self.model.bias(pos_items)
        if pos_offset is not None:
            pos_logits = pos_logits + pos_offset
        neg_cos, terms = [], []  # per block: logits, log_q, invalid, hard
        bank = self.memory_bank if self.memory_bank is not None and self.memory_bank.ready else None
        # the mixture correction counts the bank as one more proposal source (see MemoryBank)
        joint = bank is not None and bank.log_p is not None and self.sampler.logq == "mixture"
        block_emb, own_log_q = [], []  # per block: candidate embeddings, log_q without the bank
        for i, block in enumerate(blocks):
            emb = item_emb[inverse[offsets[i + 1]:offsets[i + 2]]]
            if not block.shared:
                emb = emb.reshape(*block.items.shape, -1)
            cos = candidate_scores(user_emb, emb, block.shared)
            neg_cos.append(cos.detach())
            logits = cos * scale + self.model.bias(block.items)
            if block.offset is not None:
                logits = logits + block.offset
            invalid = block.invalid
            if block.hard:
                invalid = self._guard(logits, pos_logits, pos_items, block, invalid)
            log_q = block.log_q.expand(len(users), -1)
            block_emb.append(emb)
            own_log_q.append(log_q)
            if joint and not block.hard:
                log_q = torch.logaddexp(log_q, bank.log_count(block.items))
            terms.append((logits, log_q, invalid, block.hard))
        if bank is not None:
            bank_items, emb, log_q, invalid, staleness = bank.negatives(users, pos_items, self.sampler.known)
            log_q = self.sampler.proposal_log_q(ctx, bank_items, log_q) if joint else log_q.expand(len(users), -1)
            terms.append(((user_emb @ emb.T) * scale + self.model.bias(bank_items), log_q, invalid, False))
            self._note("bank.staleness_steps", staleness)
            self._note("bank.entries", len(bank_items))
        ob = self.objective
        if ob.select != "none":
            ids = [b.items for b in blocks] + ([bank_items] if bank is not None else [])
            terms = self._select(terms, pos_logits, ids, user_emb, [(e, b.shared) for e, b in zip(block_emb, blocks)])
        if ob.loss == "softmax" and bank is not None:
            loss = self._bank_softmax(user_emb, pos_emb, pos_items, blocks, block_emb, own_log_q, terms)
        elif ob.loss == "softmax":
            loss = sampled_softmax_by_role(pos_logits, terms, ob.hard_loss, ob.hard_weight, weights)
        else:
            loss = pairwise(ob.loss, pos_logits, torch.cat([p[0] for p in terms], 1), torch.cat([p[2] for p in terms], 1),
                            ob.margin, ob.triplet_negative, self.model.sizes.n_items, ob.gbce_calibration)
        if self.memory_bank is not None:
            self.memory_bank.push(pos_items, pos_emb)
        return loss, neg_cos

    def _select(self, terms: list[tuple], pos_logits: torch.Tensor, items: list[torch.Tensor], user_emb: torch.Tensor,
                embs: list[tuple[torch.Tensor, bool]]) -> list[tuple]:
        """Online selection among all of a row's candidates (``items``: each term's ids, shared
        [N] or per row [B, N]; ``embs``: each block's embeddings and shared flag): the others
        leave the loss, or come back as one term (``select_rest``)."""
        ob = self.objective
        widths = [p[0].shape[1] for p in terms]
        rows = len(pos_logits)  # shared ids stay one row: the distinct items are found once
        ids = torch.cat(items) if all(i.dim() == 1 for i in items) else torch.cat([i.expand(rows, -1) for i in items], 1)
        log_q = torch.cat([p[1] for p in terms], 1) if ob.select_rank == "share" else None
        invalid, stats = select_candidates(torch.cat([p[0] for p in terms], 1), pos_logits, torch.cat([p[2] for p in terms], 1),
                                           ob.select, ob.select_k, ob.select_margin, ids, log_q)
        for name, value in stats.items():
            self._note(f"select.{name}", value)
        kept = [(lg, lq, inv, hard) for (lg, lq, _, hard), inv in zip(terms, torch.split(invalid, widths, dim=1))]
        if ob.select_rest == "drop":
            return kept
        pool = [torch.cat([p[i] for p in terms], 1) for i in range(3)]
        if ob.select_rest in ("centroid", "item_side"):
            term = left_out_centroid_term if ob.select_rest == "centroid" else left_out_item_side_term
            return kept + [term(*pool, invalid, user_emb, embs, self.model.scale)]
        return kept + [left_out_term(*pool, invalid)]

    def _bank_softmax(self, user_emb, pos_emb, pos_items, blocks, block_emb, own_log_q, terms) -> torch.Tensor:
        """The memory bank's sampled softmax with split gradients. The user tower learns from every
        candidate, queued ones included, against items held fixed; the item tower learns from the
        loss without the bank. Queued entries carry no gradient (Wang et al.), and under the joint
        correction they would take most of the softmax weight from the in-batch items, whose
        repulsion is all that keeps item embeddings apart: with a 4,096-entry bank beside a
        batch of 1,024 that is 5x less, and Amazon-sports collapsed to random ranking. The value
        is the full loss (with the bank)."""
        scale, bias = self.model.scale, self.model.bias
        frozen = lambda x: x.detach() if torch.is_tensor(x) else x  # noqa: E731 (bias may be 0.0)
        n = len(blocks)
        user_side = [(candidate_scores(user_emb, e.detach(), b.shared) * scale + frozen(bias(b.items)), lq, inv, hard)
                     for b, e, (_, lq, inv, hard) in zip(blocks, block_emb, terms[:n])] + terms[n:]
        item_side = [(candidate_scores(user_emb.detach(), e, b.shared) * scale + bias(b.items), lq, inv, hard)
                     for b, e, lq, (_, _, inv, hard) in zip(blocks, block_emb, own_log_q, terms[:n])]
        pos_user = (user_emb * pos_emb.detach()).sum(-1) * scale + frozen(bias(pos_items))
        pos_item = (user_emb.detach() * pos_emb).sum(-1) * scale + bias(pos_items)
        ob = self.objective
        user_loss = sampled_softmax_by_role(pos_user, user_side, ob.hard_loss, ob.hard_weight)
        item_loss = sampled_softmax_by_role(pos_item, item_side, ob.hard_loss, ob.hard_weight)
        return user_loss + (item_loss - item_loss.detach())

    def _guard(self, logits, pos_logits, pos_items, block, invalid) -> torch.Tensor:
        """The false-negative guard on mined negatives: those scoring above the row's positive,
        and those many users consume together with the positive, are more likely unlabelled
        positives than negatives; they leave the loss and are counted."""
        self.guard_counts[0] += float((~invalid).sum())
        if self.objective.false_negative_guard:
            above = (logits.detach() > pos_logits.detach()[:, None]) & ~invalid
            self.guard_counts[1] += float(above.sum())
            invalid = invalid | above
        if self.objective.cooccurring is not None:
            together = (self.objective.cooccurring.find(pos_items, block.per_row_items(len(pos_items))) >= 0) & ~invalid
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
        """Metrics of the current weights; distributed, rank 0 evaluates and every rank gets its
        figures (call it on every rank)."""
        model = self.unsharded_model()
        if self.cluster is not None and not self.cluster.chief:
            return self.cluster.broadcast(None)
        result = (evaluator or self.evaluator).evaluate(model_scorer(model, features or self.features))
        return result if self.cluster is None else self.cluster.broadcast(result)

    def unsharded_model(self) -> TwoTower:
        """The model as one process holds it. Distributed: a copy with the gathered weights, a
        collective whenever the weights changed since the last gather (every rank calls it)."""
        if self.sharded is None:
            return self.model
        if self._gathered_at != self._version:
            self.sharded.gather()
            self._gathered_at = self._version
        return self.sharded.unsharded

    def weights(self) -> dict:
        """A copy of the current weights (this rank's shards, when distributed)."""
        return self.sharded.local_weights() if self.sharded is not None else copy.deepcopy(self.model.state_dict())

    def load_weights(self, weights: dict) -> None:
        if self.sharded is not None:
            self.sharded.load_local_weights(weights)
        else:
            self.model.load_state_dict(weights)
        self._version += 1

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.sharded.local_weights() if self.sharded is not None else self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "table_optimizer": (self.table_optimizer.state_dict() if self.table_optimizer is not None
                                else self.sharded.local_optimizer_state() if self.sharded is not None else None),
            "generator": self.generator.get_state(),
            "order_generator": self.order_generator.get_state(),
            "epoch": self.epoch,
            "history": self.history,
            "should_stop": self.should_stop,
            "diagnostics_generator": self.diagnostics.generator.get_state() if self.diagnostics is not None else None,
            "callbacks": {_callback_key(i, cb): cb.state_dict() for i, cb in enumerate(self.callbacks)},
            "memory_bank": self.memory_bank.state_dict() if self.memory_bank is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.load_weights(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.table_optimizer is not None:
            self.table_optimizer.load_state_dict(state["table_optimizer"])
        elif self.sharded is not None:
            self.sharded.load_local_optimizer_state(state["table_optimizer"])
        self.generator.set_state(state["generator"])
        if "order_generator" in state:
            self.order_generator.set_state(state["order_generator"])
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
