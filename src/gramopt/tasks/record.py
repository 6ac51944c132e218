"""The task record and the registry of tasks.

A :class:`Task` holds everything ``gramopt train`` and ``gramopt compare`` need to know
about one task: the model, the data, the loss and the metric, how long to train, the
ladder of targets and the budget of a comparison, how much of the data each evaluation
reads, and the hyper-parameters tuned for it. :func:`register_task` checks that a task
is complete before ``--task`` can name it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from gramopt.losses import LOSSES
from gramopt.tasks.data import Split

if TYPE_CHECKING:
    from gramopt.tasks.residual import ResidualData


@dataclass(frozen=True)
class Target:
    """Reached once ``metric`` (a key of the evaluation records) is <= ``value``
    (``below``) or >= ``value``."""

    metric: str
    value: float
    below: bool

    def reached(self, record: dict[str, float]) -> bool:
        value = record.get(self.metric)
        if value is None or value != value:  # missing or NaN
            return False
        return value <= self.value if self.below else value >= self.value

    def describe(self) -> str:
        return f"{self.metric} {'<=' if self.below else '>='} {self.value:g}"

    def on_validation(self) -> Target:
        """The rung that selects settings: test_X -> val_X (the validation set); a
        train_loss rung is its own (see ``gramopt.compare.config``)."""
        return Target(self.metric.replace("test_", "val_", 1), self.value, self.below)

    @property
    def selection_loss(self) -> str:
        """The final loss that breaks selection ties: train_loss for a train-loss ladder,
        val_loss otherwise."""
        return "train_loss" if self.metric == "train_loss" else "val_loss"


def ladder(metric: str, values: tuple[float, ...], below: bool) -> tuple[Target, ...]:
    """Rungs on ``metric`` from the loosest to the tightest (``below``: lower is better)."""
    return tuple(Target(metric, v, below) for v in values)


#: How a task trains. "supervised": mini-batches of ``(x, y)`` from ``Task.load``, each
#: step forward, the loss, the method's backward pass(es) and the update
#: (``gramopt.training.registry.training_step``); the metric follows the loss
#: (:func:`supervised_metric`). "residual": ``Task.load`` gives the points of a
#: ``gramopt.pde.problems.PINNProblem`` (``gramopt.tasks.residual.ResidualData``); each step
#: hands the residual groups of that step's points full batch to the optimizer
#: (``gramopt.training.residual``); the loss is ``RESIDUAL_LOSS``, the metric
#: ``RESIDUAL_METRIC`` (the relative L2 error, lower is better), an epoch is one step.
#: Which optimizers train which kind: ``OptimizerSpec.kinds`` in ``gramopt.training.registry``.
KINDS = ("supervised", "residual")
#: A residual task's objective, 1/2 sum_g ||r_g||^2, and its metric.
RESIDUAL_LOSS = "least_squares"
RESIDUAL_METRIC = "test_rel_l2"


def supervised_metric(loss: str) -> str:
    """The metric a supervised task's evaluation computes from its loss
    (``gramopt.training.loop.evaluate``): the mean squared error for "mse", the accuracy
    otherwise."""
    return "test_mse" if loss == "mse" else "test_accuracy"


@dataclass
class Task:
    """An embedded task, the whole of it.

    Attributes:
        name: what ``--task`` takes.
        description: one line for ``gramopt tasks``.
        loss: ``"mse"`` or ``"cross_entropy"``; a residual task's ``RESIDUAL_LOSS``.
        build_model: ``seed -> model`` (the seed fixes the initialization).
        load: ``seed -> Split`` (the seed fixes the split); for a residual task
            ``seed -> ResidualData`` (``gramopt.tasks.residual``).
        epochs, batch_size: defaults of ``gramopt train`` (a residual task: its steps, each
            one full batch, and the points of one step).
        ladder: the targets ``gramopt compare`` times, loosest first (:func:`ladder`), on
            ``train_loss`` or on the task's metric; required to register.
        budget_seconds: optimizer-clock seconds per run of ``gramopt compare`` without
            ``--budget-seconds`` or ``--epochs``; required to register.
        eval_samples: each evaluation of a ``gramopt compare`` run reads a fixed random
            subset of at most this many samples of each set; None: the whole sets.
        tuned: per optimizer name, only the hyper-parameters whose value on this task
            differs from the registry's default (``OptimizerSpec.defaults``, or its
            ``per_loss`` values for this loss). :attr:`hyper` fills in the rest.
        metric: the evaluation records' key of the test metric; by default the one the
            loss gives (:func:`supervised_metric`).
        kind: how the task trains (:data:`KINDS`).
    """

    name: str
    description: str
    loss: str
    build_model: Callable[[int], nn.Module]
    load: Callable[[int], Split | ResidualData]
    epochs: int
    batch_size: int
    ladder: tuple[Target, ...] = ()
    budget_seconds: float | None = None
    eval_samples: int | None = None
    tuned: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metric: str = ""
    kind: str = "supervised"

    def __post_init__(self) -> None:
        self.ladder = tuple(self.ladder)
        # a copy of its own: tasks may be built from one shared table
        self.tuned = {name: dict(v) if isinstance(v, Mapping) else v for name, v in self.tuned.items()}
        if not self.metric:
            self.metric = RESIDUAL_METRIC if self.kind == "residual" else supervised_metric(self.loss)

    def problems(self) -> list[str]:
        """What keeps this task from being registered (empty when nothing does)."""
        found = []
        if self.kind not in KINDS:
            found.append(f"kind {self.kind!r} has no training loop; known kinds: {', '.join(KINDS)}")
        if self.kind == "supervised":
            if self.loss not in LOSSES:
                found.append(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
            expected = supervised_metric(self.loss)
            if self.metric != expected:
                found.append(f"a supervised task with loss {self.loss!r} is evaluated on {expected}, "
                             f"not {self.metric!r}")
        if self.kind == "residual":
            if self.loss != RESIDUAL_LOSS:
                found.append(f"a residual task's loss is {RESIDUAL_LOSS!r} (1/2 sum of squared residuals), "
                             f"not {self.loss!r}")
            if self.metric != RESIDUAL_METRIC:
                found.append(f"a residual task is evaluated on {RESIDUAL_METRIC}, not {self.metric!r}")
            if self.ladder and all(isinstance(rung, Target) for rung in self.ladder) and not self.ladder[0].below:
                found.append("a residual task's ladder goes down (below=True): its loss and error fall")
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                found.append(f"{key} must be an int >= 1, got {value!r}")
        found += self._ladder_problems()
        budget = self.budget_seconds
        if budget is None:
            found.append("it has no budget_seconds (the default seconds per run of gramopt compare)")
        elif not isinstance(budget, (int, float)) or not (budget > 0 and math.isfinite(budget)):
            found.append(f"budget_seconds must be a number > 0, got {budget!r}")
        if self.eval_samples is not None and (not isinstance(self.eval_samples, int) or self.eval_samples < 1):
            found.append(f"eval_samples must be None (the whole sets) or an int >= 1, got {self.eval_samples!r}")
        for name, values in self.tuned.items():
            if not isinstance(values, Mapping):
                found.append(f"tuned[{name!r}] must be a dict of hyper-parameters, got {values!r}")
        return found

    def _ladder_problems(self) -> list[str]:
        rungs = self.ladder
        if not rungs:
            return ["it has no ladder (the targets gramopt compare times)"]
        if not all(isinstance(rung, Target) for rung in rungs):
            return [f"its ladder must hold Target rungs (gramopt.tasks.ladder), got {rungs!r}"]
        found = []
        if len({(rung.metric, rung.below) for rung in rungs}) > 1:
            found.append("the rungs of its ladder must share one metric and one direction")
        if rungs[0].metric not in ("train_loss", self.metric):
            found.append(f"its ladder is on {rungs[0].metric!r}; rungs are on train_loss or on the task's metric "
                         f"{self.metric!r}")
        values = [rung.value for rung in rungs]
        tighter = [b < a if rungs[0].below else b > a for a, b in zip(values, values[1:], strict=False)]
        if not all(tighter):
            found.append(f"its rungs must go from the loosest to the tightest, got {values}")
        return found


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` under its name, after checking it is complete (a
    ValueError naming what is missing or wrong, and nothing registered)."""
    problems = task.problems()
    if task.name in TASKS:
        problems.append("a task of that name is already registered")
    if problems:
        raise ValueError(f"task {task.name!r} cannot be registered: {'; '.join(problems)}")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
