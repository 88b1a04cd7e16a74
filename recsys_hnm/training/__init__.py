"""Training: the loop, its losses, callbacks and checkpoints, the ANN index refresh, and the
sharded (TorchRec) backend in ``training.distributed``."""

from .callbacks import Callback, Checkpoint, CheckpointError, EarlyStopping, atomic_save, load_checkpoint, load_torch_file
from .refresh import IndexRefresh
from .trainer import Objective, StepOutput, Trainer, TrainOptions

__all__ = [
    "Callback", "Checkpoint", "CheckpointError", "EarlyStopping", "IndexRefresh", "Objective", "StepOutput", "TrainOptions", "Trainer",
    "atomic_save",
    "load_checkpoint", "load_torch_file",
]
