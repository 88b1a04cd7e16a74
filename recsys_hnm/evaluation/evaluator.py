"""Full-ranking evaluation: every item scored for every user, known items masked, top-K."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data.splits import Split
from ..data.known import KnownPositives
from ..ops.ranking import Scorer, mask_known, top_k
from .metrics import ranking_metrics

# rows with at most this many relevant items are ranked by counting (Evaluator._hits), the others by a top-k
RANKED_BY_COUNT = 4


EXCLUDE = ("history", "train", "none")


class Evaluator:
    """Scores users of ``phase`` in chunks (scores, mask, rank), so memory stays at
    ``chunk_size x n_items`` floats, and at most ``max_cells`` of them, whatever the number of
    users or items. Users without items in the phase are skipped.

    ``exclude``: what is masked before ranking. ``history`` (the default): every item the user
    had before the phase (``Split.known``), so only items new to the user can be recommended;
    ``train``: the training items only (for test, validation items may come back); ``none``:
    nothing, so items the user already had may be recommended again (repeat purchases). Under
    ``train`` and ``none`` the metrics are also reported for the held-out items the user had
    before the phase (``repeat.*``) and for the new ones (``explore.*``) apart, each over the
    users that have such items, on the same ranked list (Li et al., SIGIR 2023)."""

    def __init__(self, split: Split, phase: str = "valid", ks=(10, 20, 50), chunk_size: int = 1024, max_cells: int = 1 << 26,
                 exclude: str = "history"):
        if not ks or min(ks) <= 0:
            raise ValueError(f"ks must be positive integers, not {list(ks)}")
        if exclude not in EXCLUDE:
            raise ValueError(f"exclude must be one of {EXCLUDE}, not {exclude!r}")
        self.ks = sorted(set(int(k) for k in ks))
        self.exclude = exclude
        self.truth = split.matrix(phase)
        history = split.known(phase).tocsr()
        self.known = {"history": history, "train": split.matrix("train").tocsr(), "none": None}[exclude]
        self.parts = {"": self.truth}  # metric prefix -> held-out items it scores
        if exclude != "history":
            repeat = self.truth.multiply(history).tocsr()
            repeat.eliminate_zeros()
            explore = (self.truth - repeat).tocsr()
            explore.eliminate_zeros()
            self.parts.update({"repeat.": repeat, "explore.": explore})
        self.relevant = {name: KnownPositives(m) for name, m in self.parts.items()}
        n_rel = np.diff(self.truth.indptr)
        self.users = torch.from_numpy(np.flatnonzero(n_rel > 0))
        self.n_relevant = torch.from_numpy(n_rel[n_rel > 0])
        self.n_history = np.diff(history.indptr)[n_rel > 0]  # distinct items each had before the phase
        self.chunk_size = max(1, min(chunk_size, max_cells // max(self.truth.shape[1], 1)))
        self.phase = phase

    def _mask(self, scores: torch.Tensor, users: torch.Tensor) -> None:
        if self.known is not None:
            mask_known(scores, self.known, users)

    def top_k(self, scorer: Scorer, users: torch.Tensor, k: int):
        """(items [c, k], scores [c, k]) of ``users`` with their known items masked."""
        items, scores = [], []
        for start in range(0, len(users), self.chunk_size):
            chunk = users[start:start + self.chunk_size]
            s = scorer(chunk)
            self._mask(s, chunk)
            top_items, top_scores = top_k(s, k)
            items.append(top_items)
            scores.append(top_scores)
        return torch.cat(items), torch.cat(scores)

    def per_user(self, scorer: Scorer) -> pd.DataFrame:
        """One row per evaluated user: ``user`` (index), ``history`` (distinct items the user had
        before the phase) and every metric: what paired comparisons between runs (bootstrap over
        users, also by history length) are computed from."""
        return self.per_user_many(("",), lambda users: [("", scorer(users))])[""]

    def evaluate(self, scorer: Scorer, per_user: bool = False) -> dict:
        """Mean metrics (``per_user``: one value per evaluated user, NaN in a part where the
        user has no held-out item of that part)."""
        values = self._values(("",), lambda users: [("", scorer(users))])[""]
        if per_user:
            return values
        # a part no user has (no repeat among the held-out items) reports nothing rather than NaN
        return {name: float(np.nanmean(v.numpy())) for name, v in values.items() if bool((~v.isnan()).any())}

    def per_user_many(self, names, scorers) -> dict[str, pd.DataFrame]:
        """``per_user`` of several scorers in one pass over the users: ``scorers(users)`` yields
        a ``(name, scores)`` pair for each of ``names``, each scores tensor consumed before the
        next is asked for (so blends of shared parts hold one blend at a time)."""
        users = self.users.numpy()
        return {name: pd.DataFrame({"user": users, "history": self.n_history, **{k: v.numpy() for k, v in values.items()}})
                for name, values in self._values(names, scorers).items()}

    def _values(self, names, scorers) -> dict[str, dict[str, torch.Tensor]]:
        kmax = max(self.ks)
        hits = {scorer: {name: torch.zeros(len(self.users), kmax, dtype=torch.bool) for name in self.parts} for scorer in names}
        with torch.no_grad():
            for start in range(0, len(self.users), self.chunk_size):
                chunk = self.users[start:start + self.chunk_size]
                seen = []
                for scorer, s in scorers(chunk):
                    if scorer not in hits or scorer in seen:
                        raise ValueError(f"scorers gave {scorer!r} for a chunk again or unasked: expected each of {list(hits)} once")
                    self._mask(s, chunk)
                    for name, truth in self.parts.items():
                        hits[scorer][name][start:start + len(chunk)] = self._hits(s, chunk, kmax, truth, self.relevant[name])
                    seen.append(scorer)
                if len(seen) != len(hits):
                    raise ValueError(f"scorers gave {seen} for a chunk, not each of {list(hits)} once")
        out = {}
        for scorer_name, found in hits.items():
            values = {}
            for name, truth in self.parts.items():
                n_rel = torch.from_numpy(np.diff(truth.indptr))[self.users]
                has = n_rel > 0
                part = ranking_metrics(found[name][has], n_rel[has], self.ks)
                for metric, v in part.items():
                    full = torch.full((len(self.users),), float("nan"), dtype=v.dtype)
                    full[has] = v
                    values[name + metric] = full
            out[scorer_name] = values
        return out

    def _hits(self, scores: torch.Tensor, users: torch.Tensor, kmax: int, truth, relevant: KnownPositives) -> torch.Tensor:
        """[c, kmax] bool: is the item at rank r of each row relevant (ranked as ``top_k`` does)?

        Metrics need only where the relevant items rank. A row with few of them (leave-last-out:
        one) gets each one's rank by counting the items that score above it, and its ties with
        lower indices: one compare-and-count pass per relevant item, a fraction of a top-k's
        cost. Rows with more relevant items take the top-k. Masked (non-finite) items never hit.
        """
        truth = truth[users.numpy()]
        n_rel = np.diff(truth.indptr)
        hits = torch.zeros(len(users), kmax, dtype=torch.bool)
        many = n_rel > RANKED_BY_COUNT
        if many.any():
            rows = torch.from_numpy(np.flatnonzero(many))
            top, top_scores = top_k(scores[rows], kmax)
            found = relevant.contains(users[rows], top) & torch.isfinite(top_scores)
            hits[rows, :found.shape[1]] = found
        s = scores.numpy()
        for m in range(int(n_rel[~many].max(initial=0))):  # the m-th relevant item of each row that has one
            rows = np.flatnonzero(~many & (n_rel > m))
            items = truth.indices[truth.indptr[rows] + m]
            block = s if len(rows) == len(s) else s[rows]
            target = block[np.arange(len(rows)), items]
            above = np.count_nonzero(block > target[:, None], axis=1)
            near = np.flatnonzero(np.isfinite(target) & (above < kmax))  # may rank within kmax
            # equal scores go to the lower item index
            ties = (block[near] == target[near, None]) & (np.arange(s.shape[1]) < items[near, None])
            rank = above[near] + np.count_nonzero(ties, axis=1)
            inside = rank < kmax
            hits[torch.from_numpy(rows[near[inside]]), torch.from_numpy(rank[inside])] = True
        return hits


def metric_means(per_user: pd.DataFrame) -> dict[str, float]:
    """The mean of each metric column of a ``per_user`` frame (not ``user``, ``history``)."""
    return {k: float(per_user[k].mean()) for k in per_user.columns if k not in ("user", "history")}


def phase_counts(split: Split, phase: str) -> np.ndarray:
    """Per item, the number of users who had it before ``phase`` (train; train + valid for
    test): MostPop's scores from the same information the model has at that phase."""
    return np.asarray(split.known(phase).sum(0)).ravel()


def popularity_scorer(counts: np.ndarray) -> Scorer:
    """MostPop: the same item counts for every user (ties: lower item index first, see
    ``top_k``). Give it the counts of what the model may see at the phase: train for validation,
    train + validation for test."""
    pop = torch.as_tensor(np.asarray(counts, dtype=np.float32))
    return lambda users: pop.expand(len(users), -1).clone()
