"""The two-tower model as a plain Python object, without MLflow, in the shape of ``implicit``'s
models: ``TwoTowerRecommender(config).fit(data)``, then ``recommend``, ``score`` and
``evaluate``. It runs the same pieces as ``train`` (the "auto" settings checked on validation,
early stopping, the refit on train + valid when the config asks for it); ``train`` adds the
tracked run: MLflow, checkpoints and resume, torchrun, the logged artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import ExperimentConfig, load_config
from ..data import Interactions, Split
from ..evaluation import EXCLUDE, Evaluator
from ..models import model_scorer
from ..training import EarlyStopping
from ..tracking.pyfunc import lookup_ids
from .run import (
    blended, build_sampler, build_trainer, check_item_item, check_memory, choose_item_item, choose_settings, fit_head, load_data, refit_split, split_data,
    top_k_frame,
)


class TwoTowerRecommender:
    """``config``: an ExperimentConfig, or the path of a YAML config (``overrides`` as
    ``--set`` takes them). After ``fit``: ``config`` holds the settings as trained ("auto"
    resolved), ``selection`` how they were chosen, ``history`` the per-epoch logs, ``head`` the
    item-item head blended with the towers (None: the towers alone) and ``head_choice`` why."""

    def __init__(self, config: ExperimentConfig | str | Path, overrides: list[str] | tuple[str, ...] = ()):
        self.config = config if isinstance(config, ExperimentConfig) else load_config(config, list(overrides))
        self.model = self.features = self.data = self.split = self.selection = self.head = self.head_choice = None
        self.history: list[dict[str, float]] = []

    def fit(self, data: Interactions | None = None, split: Split | None = None) -> "TwoTowerRecommender":
        """Train on ``split`` (default: ``data`` split as the config says; neither: the config's data)."""
        if split is None:
            data, split = load_data(self.config) if data is None else (data, split_data(self.config, data))
        elif data is None:
            raise ValueError("fit: give the Interactions that the split was made from")
        torch.set_num_threads(self.config.train.num_threads)  # as train(): float sums, hence results, follow the thread count
        sampler = build_sampler(self.config, data, split)  # as train() does: built and checked before the work
        check_memory(self.config, sampler, data)
        check_item_item(self.config, data)
        config, self.selection = choose_settings(self.config, data, split)
        t = config.train
        early = EarlyStopping(f"valid.{t.monitor}", t.patience)
        with tempfile.TemporaryDirectory(prefix="recsys-hnm-") as tmp:  # the ANN index, if the mix has one
            index = Path(tmp) / "items.index"
            trainer, _ = build_trainer(config, data, split, sampler, [early], index)
            self.history = trainer.fit()
            spec = None
            if config.item_item.weight != 0:
                spec, _, self.head_choice = choose_item_item(config, data, split, model_scorer(trainer.model, trainer.features),
                                                             early.best)
            if t.refit:  # selection is done: afresh on train + valid for the selected epochs
                refit = refit_split(split)
                epochs = early.best_epoch + 1 if early.best_epoch >= 0 else t.epochs
                trainer, _ = build_trainer(config, data, refit, build_sampler(config, data, refit), [], index,
                                           epochs=epochs, validate=False)
                trainer.fit()
        self.config, self.data, self.split = config, data, split
        self.model, self.features = trainer.model.eval(), trainer.features
        self.head = fit_head(config, *spec, split) if spec else None
        return self

    def recommend(self, users=None, k: int = 10, exclude: str = "history") -> pd.DataFrame:
        """Top ``k`` items per raw user id (default: every user), as ``user_id, item_id, rank,
        score``. The user tower reads every known event of the user (train, valid and test);
        ``exclude``: ``history`` never returns those items, ``train`` only the training ones,
        ``none`` returns anything (repeat purchases)."""
        if exclude not in EXCLUDE:
            raise ValueError(f"exclude must be one of {EXCLUDE}, not {exclude!r}")
        if k <= 0:
            raise ValueError(f"k must be > 0, not {k}")
        idx = torch.arange(self._fitted().n_users) if users is None else torch.from_numpy(self._indices(users, "user"))
        masked = {"history": self.split.known_all(), "train": self.split.matrix("train"), "none": None}[exclude]
        return top_k_frame(self._serving_scorer(), idx, masked, k, self.data, self.config.eval.chunk_size)

    def score(self, users, items) -> np.ndarray:
        """[len(users), len(items)] scores of raw user ids against raw item ids (the serving view):
        the towers' logits, or their blend with the item-item head."""
        rows = torch.from_numpy(self._indices(users, "user"))
        cols = torch.from_numpy(self._indices(items, "item"))
        return self._serving_scorer()(rows)[:, cols].numpy()

    def _serving_scorer(self):
        towers = model_scorer(self.model, self.features.with_history(self.split.history_all()))
        return blended(towers, self.head, self.split.known_all())

    def evaluate(self, phase: str = "test") -> dict[str, float]:
        """Full-ranking metrics on ``valid`` or ``test``, as ``train`` reports them (the tower
        reads the events before the phase; what the config's ``eval.exclude`` says is masked)."""
        if phase not in ("valid", "test"):
            raise ValueError(f"phase must be 'valid' or 'test', not {phase!r}")
        self._fitted()
        e = self.config.eval
        evaluator = Evaluator(self.split, phase, e.ks, e.chunk_size, exclude=e.exclude)
        towers = model_scorer(self.model, self.features.with_history(self.split.history(phase)))
        return evaluator.evaluate(blended(towers, self.head, self.split.known(phase)))

    def _fitted(self) -> Interactions:
        if self.model is None:
            raise RuntimeError("TwoTowerRecommender: call fit() first")
        return self.data

    def _indices(self, raw, kind: str) -> np.ndarray:
        ids = self._fitted().users if kind == "user" else self.data.items
        wanted = pd.Series(list(raw) if not isinstance(raw, pd.Series) else raw)
        found = lookup_ids(pd.Index(ids.raw), wanted)
        if (found < 0).any():
            raise KeyError(f"{kind} ids unknown to the fitted data: {wanted[found < 0].tolist()[:5]}")
        return found
