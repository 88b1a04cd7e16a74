"""Training loop and callbacks."""

from .callbacks import Callback, Checkpoint, EarlyStopping, atomic_save, load_checkpoint
from .trainer import StepOutput, Trainer

__all__ = ["Callback", "Checkpoint", "EarlyStopping", "StepOutput", "Trainer", "atomic_save", "load_checkpoint"]
