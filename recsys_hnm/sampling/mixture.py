"""A weighted mixture of negative sources with a consistent logQ correction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from .base import Context, Negatives, Sampler, sparse_log
from ..data.known import KnownPositives

LogQ = Literal["mixture", "per_source", "none"]
IN_BATCH, FULL = "in_batch", "full"
SWITCHED = (IN_BATCH, FULL)  # sources whose weight is only a switch: their draws are fixed


def allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` draws by weight, deterministically (largest remainder, ties by order)."""
    names = [k for k, w in weights.items() if w > 0]
    if not names:
        return {}
    w = np.array([weights[k] for k in names], dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return {k: int(c) for k, c in zip(names, counts) if c > 0}


class MixtureSampler:
    """Draws ``num_negatives`` per row from the sampled sources in proportion to their weights
    (the count per source is fixed by the weights, not random; with ``per_row_negatives`` set,
    the per-row sources share that count instead), plus, when ``in_batch`` has a
    weight > 0, the batch's positives as shared negatives (the B - 1 others per row; its weight is
    only a switch); ``full`` (also a switch) adds the whole catalog once: the exact softmax.

    Roles: each source is a proposal source or, when named in ``hard``, a hard one. The
    proposal sources together are the importance-sampling proposal that logQ corrects; hard
    sources (mined negatives) are extra terms beside it, in the one softmax or as a separate loss
    term (the Trainer's ``hard_loss``). ``hard_correction`` says what a hard candidate stands for:
      ``none``    itself alone (log_q 0). Beside corrected proposal candidates, each of which
                  stands for 1 / (n q) items (about 1,000 for 256 uniform draws from 300k
                  items), such extras barely move a joint softmax;
      ``source``  the share of its source's pool it was drawn from (log n q of its own source),
                  so the mined region's mass enters the softmax once more beside the proposal's
                  estimate of it: hard items weigh twice what the exact softmax gives them.

    logq (of the proposal sources):
      ``mixture``     every candidate is corrected by log sum_k n_k q_k(item | context), the
                      expected count of the item under the whole proposal: consistent for any mix;
      ``per_source``  each candidate by log n_k q_k(item) of the source that drew it;
      ``none``        no correction.
    known: ``mask`` known positives of the user in the loss, or ``redraw`` them (per-row sources,
      up to ``redraw_tries`` times, then mask). Redrawing conditions the proposal on missing the
      user's items, which the logQ above ignores; masking keeps it exact.
    """

    def __init__(
        self,
        components: Mapping[str, Sampler],
        weights: Mapping[str, float],
        num_negatives: int,
        known: KnownPositives | None = None,
        logq: LogQ = "mixture",
        known_policy: Literal["mask", "redraw"] = "mask",
        redraw_tries: int = 5,
        hard: frozenset[str] | set[str] = frozenset(),
        per_row_negatives: int | None = None,
        hard_correction: Literal["none", "source"] = "none",
    ):
        unknown = {k for k, w in weights.items() if w > 0} - set(components)
        if unknown:
            raise ValueError(f"mixture weights name source(s) without a sampler: {sorted(unknown)}")
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"mixture weights must be >= 0: {dict(weights)}")
        if logq not in ("mixture", "per_source", "none"):
            raise ValueError(f"logq must be 'mixture', 'per_source' or 'none', not {logq!r}")
        self.weights = dict(weights)
        self.num_negatives = num_negatives
        # per-row sources (one set of draws per row, each through the item tower) may get their
        # own, smaller count: then num_negatives is split among the shared sources only
        self.per_row_negatives = per_row_negatives
        # Sources are fixed at construction (their index names them in diagnostics); a weight set
        # to 0 later (e.g. ANN negatives during warm-up) only stops that source's draws.
        self.names = [k for k in ([IN_BATCH] + [k for k in weights if k != IN_BATCH]) if weights.get(k, 0.0) > 0]
        if not self.names:
            raise ValueError("the mixture has no source with a weight > 0")
        self.components = {k: components[k] for k in self.names}
        self.hard = frozenset(hard) & set(self.names)
        if unknown_hard := set(hard) - set(self.names):
            raise ValueError(f"hard source(s) {sorted(unknown_hard)} are not in the mixture (sources: {self.names})")
        if FULL in self.hard or not set(self.names) - self.hard:
            raise ValueError(f"the proposal needs a source that is not hard, and 'full' cannot be hard (hard: {sorted(self.hard)})")
        if hard_correction not in ("none", "source"):
            raise ValueError(f"hard_correction must be 'none' or 'source', not {hard_correction!r}")
        self.hard_correction = hard_correction
        self._allocate()
        self.known = known
        self.logq = logq
        self.known_policy = known_policy
        self.redraw_tries = redraw_tries

    def _allocate(self) -> None:
        sampled = {k: w for k, w in self.weights.items() if k not in SWITCHED and k in self.components}
        if self.per_row_negatives is None:
            self.counts = allocate(self.num_negatives, sampled)
        else:
            per_row = {k: w for k, w in sampled.items() if not self.components[k].shared}
            self.counts = {**allocate(self.num_negatives, {k: w for k, w in sampled.items() if k not in per_row}),
                           **allocate(self.per_row_negatives, per_row)}
        self.counts.update({k: 1 for k in (FULL,) if self.weights.get(k, 0.0) > 0})  # one copy of the catalog
        self.use_in_batch = self.weights.get(IN_BATCH, 0.0) > 0

    def set_weight(self, name: str, weight: float) -> None:
        """Change one source's weight (a curriculum); the per-source counts follow."""
        if name not in self.components:
            raise ValueError(f"source {name!r} is not in this mixture (sources: {self.names})")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, not {weight}")
        self.weights[name] = weight
        self._allocate()

    def active(self, batch: int) -> list[tuple[int, str]]:
        """(source index, name) of the sources that draw in this configuration."""
        return [(i, k) for i, k in enumerate(self.names) if self.draws(k, batch) > 0]

    def draws(self, name: str, batch: int) -> int:
        """Draws of a source per row. In-batch: the other B - 1 rows' positives (a row's own
        positive among them is an accidental hit, always masked), so the expected count of j
        among a row's in-batch negatives is (B - 1) p(j)."""
        if name == IN_BATCH:
            return batch - 1 if self.use_in_batch else 0
        return self.counts.get(name, 0)

    def sample(self, ctx: Context, generator: torch.Generator) -> list[Negatives]:
        B, batch = len(ctx), ctx.in_batch_size
        active = self.active(batch)
        drawn = []
        for _, name in active:
            sampler = self.components[name]
            items = sampler.sample(ctx, self.draws(name, batch), generator)
            if self.known_policy == "redraw" and not sampler.shared and self.known is not None:
                items = self._redraw(sampler, ctx, items, generator)
            drawn.append(items)
        # log_q per source over all shared proposal candidates at once, then all per-row ones:
        # sources compute shared items faster (one matmul or scatter instead of B x n lookups).
        # Hard sources' candidates are not part of the proposal's correction.
        parts = {}
        for kind, dims in (("shared", 1), ("per_row", 2)):
            group = [(name, x) for (_, name), x in zip(active, drawn) if x.dim() == dims and name not in self.hard]
            if group:
                candidates = torch.cat([x for _, x in group], dim=-1)
                parts[kind] = self._log_q(ctx, candidates, [(name, x.shape[-1]) for name, x in group])
        blocks, offset = [], {"shared": 0, "per_row": 0}
        for (index, name), items, invalid in zip(active, drawn, self._invalid_blocks(ctx, drawn)):
            hard = name in self.hard
            if hard and self.hard_correction == "none":
                log_q = torch.zeros(B, items.shape[-1])
            elif hard:
                log_q = self._own_log_q(ctx, name, items)
            else:
                kind = "shared" if items.dim() == 1 else "per_row"
                start, end = offset[kind], offset[kind] + items.shape[-1]
                offset[kind] = end
                log_q = parts[kind][:, start:end]
            sampler = self.components[name]
            fallback = sampler.fallback_rows(ctx) if hasattr(sampler, "fallback_rows") else None
            blocks.append(Negatives(items, log_q, index, invalid, fallback, hard))
        return blocks

    def proposal_log_q(self, ctx: Context, items: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """[B, n]: log expected count of shared ``items`` under this mixture's proposal plus an
        ``extra`` source's log count [n] (e.g. a memory bank's), under the mixture correction."""
        return torch.logaddexp(self._log_q(ctx, items, []), extra.expand(len(ctx), -1))

    def _own_log_q(self, ctx: Context, name: str, items: torch.Tensor) -> torch.Tensor:
        """[B, n]: log expected count of ``items`` among source ``name``'s draws alone."""
        return self.components[name].log_prob(ctx, items).expand(len(ctx), -1) + math.log(self.draws(name, ctx.in_batch_size))

    def _log_q(self, ctx: Context, candidates: torch.Tensor, widths: list[tuple[str, int]]) -> torch.Tensor:
        """[B, N] log expected count of each candidate ([N] shared or [B, N]) under the chosen
        correction."""
        B, batch = len(ctx), ctx.in_batch_size
        if self.logq == "none":
            return torch.zeros(B, candidates.shape[-1])
        if self.logq == "per_source":
            parts, start = [], 0
            for name, width in widths:
                cols = candidates[..., start:start + width]
                parts.append(self._own_log_q(ctx, name, cols))
                start += width
            return torch.cat(parts, dim=1)
        if candidates.dim() == 1:
            return self._shared_log_q(ctx, candidates)
        total = None
        for _, name in self.active(batch):
            if name in self.hard:
                continue
            lp = self.components[name].log_prob(ctx, candidates) + math.log(self.draws(name, batch))
            total = lp if total is None else torch.logaddexp(total, lp)
        return torch.zeros(B, candidates.shape[-1]) if total is None else total.expand(B, -1)

    def _shared_log_q(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        """``_log_q`` of shared candidates [n] under the mixture correction. The shared sources'
        log counts [n] are combined once, in log space (tiny probabilities do not underflow); each
        sparse per-row source's few nonzero entries are then added on as counts (its fallback
        rows: the fallback's counts, on those rows only), with one log at the end, instead of a
        dense [B, n] log and logaddexp per per-row source."""
        B, batch, n = len(ctx), ctx.in_batch_size, len(items)
        shared, dense, entries = None, [], []
        for _, name in self.active(batch):
            if name in self.hard:
                continue
            sampler, count = self.components[name], self.draws(name, batch)
            if hasattr(sampler, "prob_entries"):
                rows, positions, q = sampler.prob_entries(ctx, items)
                entries.append((rows, positions, count * q.float()))
                fallback = sampler.fallback_rows(ctx)
                if fallback.any():
                    fb_rows = fallback.nonzero().squeeze(1)
                    q_fb = sampler.fallback.log_prob(ctx, items).exp().expand(B, n)[fb_rows]
                    entries.append((fb_rows.repeat_interleave(n), torch.arange(n).repeat(len(fb_rows)), count * q_fb.reshape(-1)))
                continue
            lp = sampler.log_prob(ctx, items) + math.log(count)
            if lp.dim() == 1:
                shared = lp if shared is None else torch.logaddexp(shared, lp)
            else:
                dense.append(lp.exp())
        if shared is None:
            shared = torch.full((n,), float("-inf"))
        if not dense and not entries:  # the same for every row
            return shared.expand(B, n)
        total = shared.exp().expand(B, n).clone()
        for q in dense:
            total += q
        for rows, positions, q in entries:
            total.index_put_((rows, positions), q, accumulate=True)
        return sparse_log(total)

    def _invalid(self, ctx: Context, items: torch.Tensor) -> torch.Tensor:
        """[B, n]: accidental hits (the row's positive) and known positives of the user."""
        invalid = items == ctx.pos_items[:, None]
        if self.known is not None:
            invalid |= self.known.contains(ctx.users, items)
        return invalid

    def _invalid_blocks(self, ctx: Context, drawn: list[torch.Tensor]) -> list[torch.Tensor]:
        """``_invalid`` of each block, with one known-positive lookup for all shared blocks and
        one for all per-row ones (each lookup gathers the users' own entries first)."""
        invalid = [items == ctx.pos_items[:, None] for items in drawn]
        if self.known is not None:
            for dims in (1, 2):
                group = [i for i, items in enumerate(drawn) if items.dim() == dims]
                if group:
                    known = self.known.contains(ctx.users, torch.cat([drawn[i] for i in group], dim=-1))
                    for i, part in zip(group, known.split([drawn[i].shape[-1] for i in group], dim=1)):
                        invalid[i] |= part
        return invalid

    def _redraw(self, sampler, ctx: Context, items: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for _ in range(self.redraw_tries):
            bad = self._invalid(ctx, items)
            if not bad.any():
                break
            fresh = sampler.sample(ctx, items.shape[1], generator)
            items = torch.where(bad, fresh, items)
        return items
