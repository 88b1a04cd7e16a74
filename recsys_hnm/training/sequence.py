"""Per-position (next-item) training of sequence encoders: the pieces.

A batch is B user sequences of their last L training items; position i of the input predicts
the item after it, so one sequence gives up to L (position, target) pairs instead of one
(SASRec's own objective; eSASRec, gSASRec). Negatives are shared by all B x L positions of a
batch; the exact full cross-entropy over the catalog is the reference, chunked so that its
memory stays bounded.
"""

from __future__ import annotations

import torch


def sequence_windows(seq_len: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(users, ends)`` of the windows that tile every user's events: each window is ``length``
    inputs and their ``length`` next items ending at event ``ends`` (exclusive), windows of one
    user overlapping by one event, so that every event but a user's first is a target exactly
    once per epoch (a history longer than ``length`` is trained on in full, not only its end).
    Users with one event have no window."""
    if length < 1:
        raise ValueError(f"length must be >= 1, not {length}")
    targets = (seq_len - 1).clamp(min=0)
    count = (targets + length - 1) // length  # windows per user
    users = torch.repeat_interleave(torch.arange(len(seq_len)), count)
    first = torch.cumsum(count, 0) - count
    back = torch.arange(len(users)) - torch.repeat_interleave(first, count)  # 0 = the user's last window
    return users, seq_len[users] - back * length


def next_item_sequences(seq_items: torch.Tensor, seq_start: torch.Tensor, seq_len: torch.Tensor, users: torch.Tensor,
                        length: int, ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each [B, length], right-aligned, -1 padding: the ``length + 1``
    events of each user before ``ends`` (default: the last ones; ``seq_items[seq_start[u]:
    seq_start[u] + seq_len[u]]`` in time order), ``inputs[:, i]`` the item at a step and
    ``targets[:, i]`` the one after it. A position is real where both are >= 0; a user with one
    event has none."""
    if length < 1:
        raise ValueError(f"length must be >= 1, not {length}")
    n = seq_len[users] if ends is None else ends
    k = torch.clamp(n, max=length + 1)
    offsets = torch.arange(length + 1) - (length + 1 - k)[:, None]  # [B, L + 1], < 0 = padding
    index = (seq_start[users] + n - k)[:, None] + offsets.clamp(min=0)
    window = torch.where(offsets >= 0, seq_items[index.clamp(max=max(len(seq_items) - 1, 0))], -1)
    inputs, targets = window[:, :-1], window[:, 1:]
    real = (inputs >= 0) & (targets >= 0)
    return torch.where(real, inputs, -1), torch.where(real, targets, -1)


def end_weights(real: torch.Tensor, ends: torch.Tensor, seq_len: torch.Tensor, power: float = 0.0) -> torch.Tensor:
    """Per-position loss weights over the real positions [B, L] of right-aligned windows ending
    at event ``ends`` (exclusive) of users with ``seq_len`` events: ``(t / (n - 1)) ** power`` for
    the target at event t (from 0) of a user's n, normalised to mean 1 over all real positions;
    power 0 weighs every position alike, > 0 leans toward the user's latest events. By event, not
    by place in the window: a long history is cut into several windows, and the end of an older
    one is not recent."""
    if power < 0:
        raise ValueError(f"power must be >= 0, not {power}")
    event = ends[:, None] - real.shape[1] + torch.arange(real.shape[1])  # the target's event index
    w = torch.where(real, (event / (seq_len[:, None] - 1).clamp(min=1)) ** power, torch.zeros(()))
    return w * real.sum() / w.sum().clamp(min=1e-12)


class _ChunkedLogSumExp(torch.autograd.Function):
    """logsumexp over the catalog of ``scale * user @ items.T + bias`` with some (row, item)
    entries excluded, computed ``chunk`` items at a time in the forward and again in the backward:
    no [P, n] tensor is ever held, only [P, chunk]."""

    @staticmethod
    def forward(ctx, user, items, bias, scale, masked_rows, masked_cols, chunk):
        P, n = user.shape[0], items.shape[0]
        running = torch.full((P,), float("-inf"), dtype=user.dtype, device=user.device)
        for start in range(0, n, chunk):
            logits = _chunk_logits(user, items, bias, scale, masked_rows, masked_cols, start, min(start + chunk, n))
            running = torch.logaddexp(running, torch.logsumexp(logits, dim=1))
        ctx.save_for_backward(user, items, bias, scale, masked_rows, masked_cols, running)
        ctx.chunk = chunk
        return running

    @staticmethod
    def backward(ctx, grad):
        user, items, bias, scale, masked_rows, masked_cols, lse = ctx.saved_tensors
        n = items.shape[0]
        g_user, g_items, g_bias = torch.zeros_like(user), torch.zeros_like(items), torch.zeros_like(bias)
        g_scale = torch.zeros_like(scale)
        for start in range(0, n, ctx.chunk):
            end = min(start + ctx.chunk, n)
            logits = _chunk_logits(user, items, bias, scale, masked_rows, masked_cols, start, end)
            p = torch.exp(logits - lse[:, None]) * grad[:, None]  # d lse / d logit, times the upstream gradient
            block = items[start:end]
            g_user += scale * (p @ block)
            g_items[start:end] = scale * (p.T @ user)
            g_bias[start:end] = p.sum(0)
            g_scale += (p * (user @ block.T)).sum()
        return g_user, g_items, g_bias, g_scale, None, None, None


def _chunk_logits(user, items, bias, scale, masked_rows, masked_cols, start, end):
    logits = scale * (user @ items[start:end].T) + bias[start:end]
    lo, hi = torch.searchsorted(masked_cols, torch.tensor([start, end], device=masked_cols.device))  # masked entries sorted by item
    if hi > lo:
        logits[masked_rows[lo:hi], masked_cols[lo:hi] - start] = float("-inf")
    return logits


def chunked_full_softmax(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None = None, masked: tuple[torch.Tensor, torch.Tensor] | None = None,
                         chunk: int = 8192) -> torch.Tensor:
    """Per-row cross-entropy of the exact softmax over every item: ``user`` [P, d] against
    ``items`` [n, d], target item ``targets`` [P], logits ``scale * cos + bias``; ``masked``:
    (rows, items) pairs left out of the partition function (known positives other than the
    row's target). Memory [P, chunk] instead of [P, n]; the value and gradient of the dense
    computation (tested)."""
    n = items.shape[0]
    bias = torch.zeros(n, dtype=user.dtype, device=user.device) if bias is None else bias
    scale = torch.as_tensor(scale, dtype=user.dtype, device=user.device)
    none = torch.zeros(0, dtype=torch.long, device=user.device)
    rows, cols = masked if masked is not None else (none, none)
    keep = cols != targets[rows]  # the target always stays in its own partition function
    rows, cols = rows[keep], cols[keep]
    order = torch.argsort(cols, stable=True)
    lse = _ChunkedLogSumExp.apply(user, items, bias, scale, rows[order], cols[order], chunk)
    target_logits = scale * (user * items[targets]).sum(-1) + bias[targets]
    return lse - target_logits
