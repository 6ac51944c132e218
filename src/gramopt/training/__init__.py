"""Training runs: optimizers by name, the loop behind ``gramopt train``, checkpoints."""

from gramopt.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gramopt.training.loop import TrainConfig, Trainer, TrainResult, evaluate, train
from gramopt.training.optimizers import (
    OPTIMIZERS,
    build_optimizer,
    get_optimizer_spec,
    training_step,
    with_epoch_defaults,
)

__all__ = [
    "CheckpointError",
    "OPTIMIZERS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "evaluate",
    "get_optimizer_spec",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "training_step",
    "with_epoch_defaults",
]
