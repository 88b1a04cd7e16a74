"""Training loop and callbacks."""

from .callbacks import Callback, Checkpoint, CheckpointError, EarlyStopping, atomic_save, load_checkpoint, load_torch_file
from .trainer import StepOutput, Trainer

__all__ = ["Callback", "Checkpoint", "CheckpointError", "EarlyStopping", "StepOutput", "Trainer", "atomic_save", "load_checkpoint", "load_torch_file"]
