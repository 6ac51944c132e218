"""Training runs: optimizers by name (gramopt's, torch's and installed peers'), the loop
behind ``gramopt train`` and ``gramopt compare``, checkpoints."""

from gramopt.training import peers  # noqa: F401 - registers the installed peers in OPTIMIZERS
from gramopt.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gramopt.training.loop import TrainConfig, Trainer, TrainResult, evaluate, train
from gramopt.training.registry import (
    OPTIMIZERS,
    build_optimizer,
    get_optimizer_spec,
    training_step,
    with_epoch_defaults,
)
from gramopt.training.residual import ResidualTrainer, make_trainer, resume_trainer

__all__ = [
    "CheckpointError",
    "OPTIMIZERS",
    "ResidualTrainer",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "evaluate",
    "get_optimizer_spec",
    "load_checkpoint",
    "make_trainer",
    "resume_trainer",
    "save_checkpoint",
    "train",
    "training_step",
    "with_epoch_defaults",
]
