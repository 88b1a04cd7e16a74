"""Callbacks: one signature for every hook, and state that a checkpoint carries."""

from __future__ import annotations

import pickle
import logging
from pathlib import Path

import torch

from ..ops.io import atomic_write

log = logging.getLogger(__name__)


class Callback:
    def on_fit_start(self, trainer) -> None: ...

    def on_epoch_start(self, trainer, epoch: int) -> None: ...

    def on_epoch_end(self, trainer, epoch: int, logs: dict[str, float]) -> None: ...

    def on_fit_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class EarlyStopping(Callback):
    """Stops when ``monitor`` (a validation metric, higher is better) has not improved for
    ``patience`` epochs (0: never stops), and restores the best epoch's weights at the end."""

    def __init__(self, monitor: str = "valid.ndcg@10", patience: int = 3):
        self.monitor = monitor
        self.patience = patience
        self.best = float("-inf")
        self.best_epoch = -1
        self.best_weights: dict | None = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = logs[self.monitor]
        if value > self.best:
            self.best, self.best_epoch = value, epoch
            self.best_weights = trainer.weights()
        elif self.patience and epoch - self.best_epoch >= self.patience:
            log.info("early stop at epoch %d: best %s=%.4f at epoch %d", epoch, self.monitor, self.best, self.best_epoch)
            trainer.should_stop = True

    def on_fit_end(self, trainer):
        if self.best_weights is not None:
            trainer.load_weights(self.best_weights)

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "best_weights": self.best_weights}

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.best_weights = state["best"], state["best_epoch"], state["best_weights"]


def atomic_save(obj, path: str | Path) -> None:
    """torch.save, whole or not at all (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class Checkpoint(Callback):
    """Writes the whole trainer state (model, optimizer, random state, callbacks) after every
    epoch, atomically, to ``path``; ``extra`` (e.g. the MLflow run id) rides along."""

    def __init__(self, path: str | Path, extra: dict | None = None):
        self.path = Path(path)
        self.extra = dict(extra or {})

    def on_epoch_end(self, trainer, epoch, logs):
        atomic_save({"trainer": trainer.state_dict(), "extra": self.extra}, self.path)


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be read (empty, truncated, not torch's)."""


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = load_torch_file(path)
    if not isinstance(state, dict) or not {"trainer", "extra"} <= state.keys():
        raise CheckpointError(f"{path}: not a recsys-hnm checkpoint")
    return state


def load_torch_file(path: str | Path):
    """``torch.load`` of tensors only (no arbitrary pickles), with an error naming the file and
    saying what is wrong: empty, not a torch file, truncated, or holding other objects."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e
    if not head:
        raise CheckpointError(f"{path}: empty")
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"{path}: not a torch file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: holds objects other than tensors, refused (weights_only load)") from e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as e:  # KeyError: bytes that look like a pickle opcode
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: truncated or damaged torch file ({reason})") from e
