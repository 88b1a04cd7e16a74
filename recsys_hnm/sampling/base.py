"""The contracts every negative sampler follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Context:
    """What a sampler may condition on: the batch's users and positive items, both [B].

    batch_items: the positives that serve as in-batch negatives when they are more than this
    batch's own (distributed training gathers every rank's share of the global batch)."""

    users: torch.Tensor
    pos_items: torch.Tensor
    batch_items: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.users)

    @property
    def in_batch_size(self) -> int:
        return len(self.users) if self.batch_items is None else len(self.batch_items)


@dataclass(frozen=True)
class Negatives:
    """A block of negatives for a batch of B rows.

    items: [n] shared by every row, or [B, n] per row.
    log_q: [n] or [B, n]: log of the expected number of times the item is among the row's
      candidates under the proposal (log of draws x probability). Sampled softmax subtracts it,
      which is the importance-sampling estimate of the full softmax; 0 means "no correction".
    source: index of the source that drew the block.
    invalid: [B, n] (or None): the loss must ignore these (known positives, accidental hits).
    fallback: [B] (or None): rows whose draws came from the source's fallback sampler.
    hard: the source's role. False (a proposal source): log_q is its share of the corrected
      proposal. True (a hard source, e.g. mined negatives): log_q is 0, the negatives enter the
      loss uncorrected, since correcting them would cancel the hardness they were mined for.
    offset: what the model adds to these candidates' logits beyond the two towers (the repeat
      term of the user's history items).
    """

    items: torch.Tensor
    log_q: torch.Tensor
    source: int = 0
    invalid: torch.Tensor | None = None
    fallback: torch.Tensor | None = None
    hard: bool = False
    offset: torch.Tensor | None = None  # [B, n]: a term added to the candidates' logits (the repeat term)

    @property
    def shared(self) -> bool:
        return self.items.dim() == 1

    @property
    def n(self) -> int:
        return self.items.shape[-1]

    def per_row_items(self, batch: int) -> torch.Tensor:
        return self.items.expand(batch, -1) if self.shared else self.items


@runtime_checkable
class Sampler(Protocol):
    """A proposal distribution over items, given the (user, positive) context.

    ``sample`` is a pure function of its inputs and the explicit generator. ``log_prob`` gives
    the log probability of one draw for any item (shape of ``items``: [n] or [B, n]), so a
    mixture can compute the log proposal of items that other sources drew.
    """

    shared: bool  # True when one set of draws serves the whole batch

    def sample(self, ctx: Context, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def log_prob(self, ctx: Context, items: torch.Tensor) -> torch.Tensor: ...


class SparseRows(Protocol):
    """A per-row source whose probability of most shared candidates is 0 for most rows (ANN
    pools, co-purchase neighbours, same-category items). It gives the nonzero ones as entries,
    so a mixture adds them onto the shared sources' dense total instead of filling a
    [batch, n] tensor per source; ``fallback_rows`` (with ``fallback``) says which rows draw
    from the fallback instead: those rows have no entries."""

    fallback: Sampler

    def fallback_rows(self, ctx: Context) -> torch.Tensor: ...

    def prob_entries(self, ctx: Context, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position in ``items`` [n], probability of one draw) of the nonzero entries;
        an entry may repeat, its values then add up."""
        ...


def entries_log_prob(sampler: SparseRows, ctx: Context, items: torch.Tensor) -> torch.Tensor:
    """[B, n] log probability of the shared ``items`` [n] from the sampler's entries."""
    rows, positions, values = sampler.prob_entries(ctx, items)
    q = torch.zeros(len(ctx), len(items), dtype=values.dtype).index_put_((rows, positions), values, accumulate=True)
    return fallback_log_prob(sampler, ctx, items.expand(len(ctx), -1), q)


def with_fallback(sampler, ctx: Context, items: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Replace the rows of ``items`` that ``sampler`` cannot serve by draws of its fallback."""
    fb = sampler.fallback_rows(ctx)
    if not fb.any():
        return items
    fb_items = sampler.fallback.sample(ctx, n, generator)
    return torch.where(fb[:, None], fb_items.expand(len(ctx), -1) if fb_items.dim() == 1 else fb_items, items)


def fallback_log_prob(sampler, ctx: Context, items_b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log of ``q`` (per-row probabilities), with the fallback's where rows fall back."""
    fb = sampler.fallback_rows(ctx)
    if fb.any():
        q = torch.where(fb[:, None], sampler.fallback.log_prob(ctx, items_b).double().exp(), q)
    return sparse_log(q.float())


def sparse_log(q: torch.Tensor) -> torch.Tensor:
    """log q, -inf where q is 0. Per-row proposals are 0 for most candidates, and log(0) (like
    the log of a subnormal) takes a slow path: 12x the log of normal numbers on this CPU. No
    probability here is below 1e-30, so clamping there changes nothing else."""
    return torch.log(q.clamp(min=1e-30)).masked_fill_(q == 0, float("-inf"))
