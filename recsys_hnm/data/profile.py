"""What a split says about the data: the facts the ``auto`` settings are decided from.

The profile is computed once per run from the split (never from test labels beyond what the
evaluator itself reads) and logged with it. What matters most is how held-out events sit in
time against the user's training events: after all of them (next-item data, leave-last-out),
interleaved with them (a random per-user split), or at the same time as the user's last ones
(baskets, whose items share one timestamp).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .splits import Split


@dataclass(frozen=True)
class DataProfile:
    users: int
    items: int
    train_events: int  # events before the held-out phase (train; train + valid for test)
    # held-out (validation) events against the user's training events, as shares of those with
    # a training event and a timestamp: strictly after the user's last one, at its very time, or
    # before it (interleaved); all None without timestamps
    heldout_after: float | None
    heldout_tied: float | None
    heldout_interleaved: float | None
    # training events sharing their (user, timestamp) or (user, basket) with another: baskets
    train_ties: float | None
    # held-out events whose item the user already had before them
    repeat_rate: float
    # share of training events on the most popular 1% of items
    top1pct_share: float
    history_median: float
    history_mean: float
    # held-out items never seen in training (the model can only reach them by features)
    cold_heldout_items: float

    @property
    def protocol(self) -> str:
        """``temporal``: held-out events come after the history; ``basket``: they come with the
        user's last training events or the history is mostly same-time groups; ``random``:
        they are interleaved with it (or there is no time to tell)."""
        if self.heldout_after is None:
            return "random"
        if self.heldout_interleaved >= 0.2:
            return "random"
        if self.heldout_tied >= 0.5 or self.baskets:
            return "basket"
        return "temporal"

    @property
    def baskets(self) -> bool:
        """Most training events share their time with another of the user's: groups, not sequences."""
        return self.train_ties is not None and self.train_ties >= 0.5

    def as_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol, "baskets": self.baskets}


def profile_split(split: Split, phase: str = "valid") -> DataProfile:
    """The profile of ``split``, its held-out figures from ``phase`` against what comes before
    it (train for ``valid``; train + valid for ``test``)."""
    data = split.data
    history = split.history(phase)  # what the model has before the held-out phase
    heldout = split.phase(phase)
    after = tied = inter = ties = None
    if data.has_time and len(heldout):
        last = history.groupby("user")["timestamp"].max()
        h_last = last.reindex(heldout["user"]).to_numpy()
        known = ~np.isnan(h_last)
        ts = heldout["timestamp"].to_numpy()[known]
        h_last = h_last[known]
        if known.any():
            after = float((ts > h_last).mean())
            tied = float((ts == h_last).mean())
            inter = float((ts < h_last).mean())
        if len(history):
            tied_rows = history.duplicated(["user", "timestamp"], keep=False)
            if data.has_baskets:  # basket items logged a few seconds apart are a group all the same
                tied_rows |= history.duplicated(["user", "basket"], keep=False)
            ties = float(tied_rows.mean())
    repeat = 0.0
    if len(heldout):
        users, items = heldout["user"].to_numpy(), heldout["item"].to_numpy()
        repeat = float((np.asarray(split.known(phase)[users, items]).ravel() > 0).mean())
    counts = np.bincount(history["item"].to_numpy(), minlength=data.n_items) if len(history) else np.zeros(data.n_items)
    top = max(1, int(np.ceil(0.01 * data.n_items)))
    top_share = float(np.sort(counts)[::-1][:top].sum() / max(1, counts.sum()))
    lengths = history.groupby("user").size()
    cold = float((counts[heldout["item"].to_numpy()] == 0).mean()) if len(heldout) else 0.0
    return DataProfile(
        users=data.n_users, items=data.n_items, train_events=len(history),
        heldout_after=after, heldout_tied=tied, heldout_interleaved=inter, train_ties=ties,
        repeat_rate=repeat, top1pct_share=top_share,
        history_median=float(lengths.median()) if len(lengths) else 0.0,
        history_mean=float(lengths.mean()) if len(lengths) else 0.0,
        cold_heldout_items=cold,
    )


def describe_profile(profile: DataProfile) -> str:
    """Printed summary, a few lines."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.0f}%"

    p = profile
    return "\n".join([
        f"data: {p.users:,} users, {p.items:,} items, {p.train_events:,} training events; "
        f"history median {p.history_median:g}, mean {p.history_mean:.1f}",
        f"held-out events vs the user's history: {pct(p.heldout_after)} after, {pct(p.heldout_tied)} at its last time, "
        f"{pct(p.heldout_interleaved)} interleaved -> protocol {p.protocol}",
        f"same-time training events {pct(p.train_ties)}, repeats {pct(p.repeat_rate)}, "
        f"top 1% of items hold {pct(p.top1pct_share)} of events, cold held-out items {pct(p.cold_heldout_items)}",
    ])


# -- the rules of the ``auto`` settings ----------------------------------------------------------

# Each rule gives the candidate values of one setting, the rule's pick first, with the reason;
# validation then checks the alternatives as far as the budget goes (experiment.choose_settings).
# The figures behind them are in docs/auto.md.
TEMPERATURES = (0.05, 0.1, 0.25, 0.5)
SMALL_CATALOG = 2_000  # items: popularity decides much of the ranking (retail, grocery)
SPARSE_HISTORY = 10  # median training events per user: one embedding per user overfits below


def suggest_settings(profile: DataProfile) -> dict[str, list[tuple[object, str]]]:
    """``{key: [(value, reason), ...]}`` for each setting that may be "auto", the rule's pick first."""
    p = profile
    temporal = p.protocol == "temporal"
    if temporal:
        history = [("causal", "held-out events come after the history: each positive is trained on what came before it"),
                   ("all", "alternative")]
        decay = [(0.5, "next-item data: recent items weigh more"), (1.0, "alternative")]
    else:
        why = ("held-out events are interleaved with the history" if p.protocol == "random"
               else "same-time events (baskets) have no order")
        history = [("all", f"{why}: train on the whole history, as it is scored"), ("causal", "alternative")]
        decay = [(1.0, f"{why}: every item weighs the same"), (0.5, "alternative")]
    if p.items < SMALL_CATALOG or p.baskets:
        t, why_t = 0.25, (f"small catalog ({p.items:,} items)" if p.items < SMALL_CATALOG else "baskets") + ": popularity-shaped scores"
    elif p.history_median < SPARSE_HISTORY:
        t, why_t = 0.05, f"sparse histories (median {p.history_median:g} events): a sharper softmax"
    else:
        t, why_t = 0.1, f"dense histories (median {p.history_median:g} events)"
    i = TEMPERATURES.index(t)
    temperature = [(t, why_t)] + [(v, "alternative") for v in (TEMPERATURES[i - 1:i] + TEMPERATURES[i + 1:i + 2])]
    # measured: an item bias helped retail and amazon-sports and was level on MovieLens
    bias = [(True, f"a popularity prior (top 1% of items hold {100 * p.top1pct_share:.0f}% of events)"), (False, "alternative")]
    user_id = [(False, f"the history alone (median {p.history_median:g} events; an id embedding overfits short histories)")]
    if p.history_median >= 2 * SPARSE_HISTORY:
        user_id.append((True, "alternative"))
    return {"model.train_history": history, "model.history_decay": decay, "model.temperature": temperature,
            "model.item_bias": bias, "model.user_id": user_id}
