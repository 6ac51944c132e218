"""Embedded tasks: a model, data with a fixed split, the loss and the test metric.

Every task's data is generated or ships with an installed package, so nothing is
downloaded at run time. ``gramopt tasks`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Split:
    """Train and test tensors; inputs ``[n, ...]``, targets ``[n]`` or ``[n, k]``;
    optionally a validation set carved from the training data (:func:`with_validation`)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    val_x: Tensor | None = None
    val_y: Tensor | None = None


VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 5000


def with_validation(split: Split, seed: int, fraction: float = VALIDATION_FRACTION, most: int = VALIDATION_MAX) -> Split:
    """``split`` with ``min(round(fraction * n_train), most)`` training samples moved to a
    validation set: a random choice fixed by ``seed`` (the same for every optimizer and
    setting of that seed). The test set is unchanged."""
    if split.val_x is not None:
        raise ValueError("this split already has a validation set")
    n = split.train_x.shape[0]
    n_val = min(int(round(fraction * n)), most)
    if not 0 < n_val < n:
        raise ValueError(f"cannot carve {n_val} validation samples out of {n} training samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(30_000 + seed))
    val, train = order[:n_val], order[n_val:]
    return Split(split.train_x[train], split.train_y[train], split.test_x, split.test_y, split.train_x[val], split.train_y[val])


@dataclass
class Task:
    """An embedded task.

    Attributes:
        name: what ``--task`` takes.
        description: one line for ``gramopt tasks``.
        loss: ``"mse"`` or ``"cross_entropy"``.
        build_model: ``seed -> model`` (the seed fixes the initialization).
        load: ``seed -> Split`` (the seed fixes the split).
        epochs, batch_size: defaults of ``gramopt train``.
        hyper: per optimizer name, its default hyper-parameters on this task (the
            classification tasks give GGN none: its constructor's cross-entropy defaults,
            chosen by benchmarks/results/ggn_ce_defaults.json, are the centre of its grids).
    """

    name: str
    description: str
    loss: str
    build_model: Callable[[int], nn.Module]
    load: Callable[[int], Split]
    epochs: int
    batch_size: int
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "test_mse" if self.loss == "mse" else "test_accuracy"


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model under ``torch.manual_seed(seed)`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# Registration: importing the task modules adds them to TASKS.
from gramopt.tasks import classification, images, language, regression, sequence  # noqa: E402,F401

__all__ = ["Split", "TASKS", "Task", "get_task", "register_task", "seeded", "with_validation"]
