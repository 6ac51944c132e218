"""What ``gramopt compare`` compares, as data: tuning grids, selection, divergence, defaults.

Everything that belongs to one task (its ladder of targets, its budget, how much of the
data each evaluation reads, the hyper-parameters tuned for it) is in its record,
:class:`gramopt.tasks.Task`.

Grids. Three sizes, the same for every optimizer: ``full`` (3 x 3 = 9 settings over two
knobs), ``quick`` (3 settings over one knob, the default command's) and ``base`` (the
base setting alone: no tuning, for budgets too long to run a grid). A knob is an
:class:`Axis`: factors applied to the *base* value (the task's defaults for the
optimizer: ``Task.tuned`` over the optimizer's own defaults for the task's loss,
``gramopt.training.registry.task_hyper``) or absolute values. The middle setting is
always the base. The knobs (:data:`FULL_GRIDS`):

- second-order methods (ggn, seng, fngd, ikfac, singd): learning rate x damping;
- shampoo: learning rate x ``matrix_eps`` (its damping); soap: learning rate x eps;
- sgd: learning rate x momentum; muon (both: Muon and its AdamW group's rates move
  together): learning rate x momentum;
- adamw, psgd-kron and any newly registered optimizer with a weight decay: learning
  rate x weight decay; without one: 9 learning rates;
- residual tasks: gauss-newton and engd (Gauss-Newton steps whose grid line search starts
  at lr): damping, and learning rate x damping; adam: learning rate, and learning rate x
  beta2; lbfgs: learning rate (the first trial of its line search), and learning rate x
  history size.

Targets. Per task a ladder of rungs on one metric (``Task.ladder``): train loss for
the regression tasks (targets are standardized, so 0.01 is 1% of the target variance),
test accuracy for classification, the relative L2 error for residual tasks.
Time-to-target is reported per rung.

Selection (never on the reported test figures). Every run trains on the task's
training data less a validation set (:func:`gramopt.tasks.with_validation`, fixed per
task and seed) and is evaluated on both. A test-metric ladder's validation counterpart
(``val_accuracy`` for a test-accuracy one) picks each optimizer's winning setting: the
smallest median (over seeds) time to the highest validation rung; ties (e.g. no seed
reached it) go to the next rung down, then to the smaller median final validation loss.
A train-loss ladder measures optimization speed, the training objective itself, so it
selects on its own rungs and ties go to the smaller final train loss: its held-out
counterpart would measure generalization instead (on teacher, validation loss stays
above 0.02 while the train loss reaches 0.002, so the 0.01 and 0.003 rungs could never
tell two settings apart), and no test data is used either way. A seed that misses a rung
or diverges counts as infinitely slow.

Divergence. A run is diverged if its loss becomes non-finite (or a step raises a
divergence error), or if its final train loss exceeds :data:`DIVERGENCE_FACTOR` times
its initial train loss.

Step-time flags. Each optimizer's step is expected to cost at most
:data:`EXPECTED_STEP_COST` SGD-momentum steps on the same model and batch (optimizers not
listed: :data:`DEFAULT_EXPECTED_STEP_COST`). A step that measures more than
:data:`STEP_COST_MARGIN` times its expectation is flagged (``gramopt.compare.flags``): its
seconds to each rung then measure something other than the method, a slow kernel path
of this machine most likely. The expectations follow the methods' arithmetic on the
embedded tasks (batch b of 64-128, hidden widths up to 256), rounded up to the largest
ratio the committed comparisons measured (the comment at :data:`EXPECTED_STEP_COST`):

- SGD-momentum 1 (the reference); AdamW 1.5: a few elementwise passes over the
  parameters, next to a forward and backward pass of b samples;
- Muon (every implementation) 5: five Newton-Schulz steps per hidden m x n matrix
  (m <= n), at most 30 m^2 n flops against the 6 b m n of that layer's forward and
  backward pass, i.e. up to 5 m / b of that layer's share in flops (less in time: these
  small models' passes are dominated by per-operation overhead), plus a Python loop over
  the parameters that dominates the smallest models;
- SENG, FNGD 4: per-sample gradients or Jacobian rows, a b x b Gram per layer and its
  solve;
- IKFAC, SINGD, Shampoo, SOAP, PSGD-Kron 6: Kronecker factors per layer (side up to
  256), their updates, roots or eigenbases, and a Python loop per parameter;
- GGN 10: Jacobian rows for every output, a second backward pass for the curvature and
  a bk x bk Gram for k outputs.

The margin, 3, leaves room for the load of a shared machine, which moves the
interleaved ratios by less than 3x, and is far below what a slow path costs (torch's
bfloat16 Muon on a CPU without a fast bfloat16 matmul).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gramopt.tasks import TASKS, Target, Task
from gramopt.training.registry import get_optimizer_spec, task_hyper

GRIDS_BY_NAME = ("full", "quick", "base")
DEFAULT_GRID = "full"  # `gramopt compare` without options uses "quick" (see DEFAULT_COMMAND_GRID)
DEFAULT_COMMAND_GRID = "quick"
GRID_SIZES = {"full": 9, "quick": 3, "base": 1}
GRID_SIZE = GRID_SIZES["quick"]  # kept for code that reads the quick grid's size


@dataclass(frozen=True)
class Axis:
    """One knob of a grid: ``key`` scaled by ``factors`` or set to ``values`` (three
    each; the middle is the base). ``with_keys`` are scaled alongside ``key``."""

    key: str
    factors: tuple[float, ...] = ()
    values: tuple[float, ...] = ()
    with_keys: tuple[str, ...] = ()

    def settings(self, base: dict[str, Any]) -> list[dict[str, Any]]:
        keys = (self.key, *self.with_keys)
        missing = [k for k in keys if k not in base]
        if missing:
            raise KeyError(missing)
        if self.values:
            return [{self.key: v} for v in self.values]
        return [{k: base[k] * f for k in keys} for f in self.factors]


LR = Axis("lr", factors=(1 / 3, 1.0, 3.0))
DAMPING = Axis("damping", factors=(0.1, 1.0, 10.0))
WEIGHT_DECAY = Axis("weight_decay", values=(0.0, 0.01, 0.1))
MOMENTUM = Axis("momentum", values=(0.5, 0.9, 0.97))

QUICK_GRIDS: dict[str, tuple[Axis, ...]] = {
    # Gauss-Newton steps are scale-aware (lr = 1 is the undamped Newton step on the
    # linearized model): their one knob is the damping.
    "ggn": (DAMPING,),
    "gauss-newton": (DAMPING,),
    "engd": (DAMPING,),
    "muon": (Axis("lr", factors=(1 / 3, 1.0, 3.0), with_keys=("adamw_lr",)),),
    "muon-po": (Axis("lr", factors=(1 / 3, 1.0, 3.0), with_keys=("adamw_lr",)),),
}

# Second-order methods: learning rate x damping. GGN per-task defaults live in the tasks.
FULL_GRIDS: dict[str, tuple[Axis, ...]] = {
    "ggn": (LR, DAMPING),
    "seng": (LR, DAMPING),
    "fngd": (LR, DAMPING),
    "ikfac": (LR, DAMPING),
    "singd": (LR, DAMPING),
    "shampoo": (LR, Axis("matrix_eps", factors=(0.1, 1.0, 10.0))),
    "soap": (LR, Axis("eps", values=(1e-10, 1e-8, 1e-6))),
    "sgd": (LR, MOMENTUM),
    "adamw": (LR, WEIGHT_DECAY),
    "muon": (
        Axis("lr", factors=(1 / 3, 1.0, 3.0), with_keys=("adamw_lr",)),
        Axis("momentum", values=(0.9, 0.95, 0.98)),
    ),
    "muon-po": (
        Axis("lr", factors=(1 / 3, 1.0, 3.0), with_keys=("adamw_lr",)),
        Axis("momentum", values=(0.9, 0.95, 0.98)),
    ),
    "psgd-kron": (LR, WEIGHT_DECAY),
    "gauss-newton": (LR, DAMPING),
    "engd": (LR, DAMPING),
    "adam": (LR, Axis("beta2", values=(0.99, 0.999, 0.9999))),
    "lbfgs": (LR, Axis("history_size", values=(20, 100, 300))),
}


Field = TypeVar("Field")


class PerTask(Mapping[str, Field], Generic[Field]):
    """Per registered task name, one field of its record, read at each access (so that a
    task registered later is in it too)."""

    def __init__(self, read: Callable[[Task], Field]) -> None:
        self._read = read

    def __getitem__(self, name: str) -> Field:
        return self._read(TASKS[name])

    def __iter__(self) -> Iterator[str]:
        return iter(TASKS)

    def __len__(self) -> int:
        return len(TASKS)


# Each task's ladder (``Task.ladder``) and its loosest rung (what a single target used to be).
LADDERS: Mapping[str, tuple[Target, ...]] = PerTask(lambda task: task.ladder)
TARGETS: Mapping[str, Target] = PerTask(lambda task: task.ladder[0])

DIVERGENCE_FACTOR = 10.0  # final train loss > this x initial train loss: diverged

# The default comparison (`gramopt compare` with no options): every gramopt method,
# torch's SGD-momentum and AdamW, and these peers when installed.
DEFAULT_TASK = "teacher"
DEFAULT_SEEDS = 3
DEFAULT_PEERS = ("soap", "muon", "ikfac", "singd")

# Evaluation points per run, evenly spaced over its budget; each reads the task's
# ``eval_samples`` of each set (where the whole sets, this many times, would cost more than
# the budget itself).
EVALUATIONS = 40
# Expected step cost in SGD-momentum steps (module docstring); a step costing more than
# STEP_COST_MARGIN times its expectation is flagged. Largest ratios (any seed) measured in
# the committed comparisons (benchmarks/results/compare/*/results.json): AdamW 1.41, Muon
# 3.67 (muon-po 3.71; muon-f32 5.59 on teacher at load average 6-10, teacher-muon-bfloat16),
# SENG 2.54, FNGD 3.63, IKFAC 3.92, SINGD 3.78, Shampoo 3.08, SOAP 5.34, GGN 8.31. Load moved
# them by up to 2x (torch's Muon on diabetes: 3.65x committed, 7.0x at load average 7);
# torch's bfloat16 Muon without a fast bfloat16 matmul: medians 64-96x (teacher-muon-bfloat16).
EXPECTED_STEP_COST: dict[str, float] = {
    "sgd": 1.0,
    "adamw": 1.5,
    "muon": 5.0,
    "muon-f32": 5.0,
    "muon-po": 5.0,
    "seng": 4.0,
    "fngd": 4.0,
    "ikfac": 6.0,
    "singd": 6.0,
    "shampoo": 6.0,
    "soap": 6.0,
    "psgd-kron": 6.0,
    "ggn": 10.0,
}
DEFAULT_EXPECTED_STEP_COST = 10.0  # an optimizer registered without an entry above
STEP_COST_MARGIN = 3.0
TIMING_ROUNDS, TIMING_STEPS = 10, 3  # interleaved step timing: rounds x steps per optimizer
MEMORY_STEPS = 10  # steps of a fresh model and optimizer measured for peak memory
# Residual tasks' steps are full batch and alike, and a parameter-space step (engd) takes
# seconds: fewer rounds of one step each, and fewer steps for the peak memory.
RESIDUAL_TIMING = (2, 1, 1)  # rounds, steps per round, warm-up steps
#: Per task kind: (rounds, steps per round, warm-up steps) of the interleaved step timing.
TIMING_BY_KIND: dict[str, tuple[int, int, int]] = {
    "supervised": (TIMING_ROUNDS, TIMING_STEPS, 3),
    "residual": RESIDUAL_TIMING,
}
#: Per task kind: steps of a fresh model and optimizer measured for peak memory.
MEMORY_STEPS_BY_KIND: dict[str, int] = {"supervised": MEMORY_STEPS, "residual": 1}


def axes(name: str, size: str) -> tuple[Axis, ...]:
    """The knobs of optimizer ``name`` in a grid of ``size`` ("full" or "quick")."""
    if size not in GRID_SIZES:
        raise ValueError(f"unknown grid {size!r}; choose one of {', '.join(GRIDS_BY_NAME)}")
    spec = get_optimizer_spec(name)
    name = spec.tuned_as or name
    if size == "base":
        return ()
    if size == "quick":
        return QUICK_GRIDS.get(name, (LR,))
    if name in FULL_GRIDS:
        return FULL_GRIDS[name]
    defaults = spec.defaults
    if "weight_decay" in defaults:
        return (LR, WEIGHT_DECAY)
    return (Axis("lr", factors=(1 / 9, 1 / 5, 1 / 3, 1 / 2, 1.0, 2.0, 3.0, 5.0, 9.0)),)


def grid(name: str, task: Task, size: str = "quick") -> list[dict[str, Any]]:
    """The ``GRID_SIZES[size]`` hyper-parameter settings of optimizer ``name`` on ``task``
    (the middle one is the base setting)."""
    # FNGD's coefficient_steps: one epoch (left out); GGN's lr and damping: its per-loss defaults
    base = task_hyper(task, name)
    settings: list[dict[str, Any]] = [dict(base)]
    for axis in axes(name, size):
        try:
            changes = axis.settings(base)
        except KeyError as err:
            raise ValueError(f"the grid of {name} varies {err.args[0]}, which {name} does not take") from None
        except TypeError:
            raise ValueError(
                f"the grid of {name} scales {axis.key}, whose base on task {task.name} is not a number: "
                f"{base.get(axis.key)!r} (give it in the task's hyper or the optimizer's per_loss defaults)"
            ) from None
        settings = [{**s, **c} for s in settings for c in changes]
    if len(settings) != GRID_SIZES[size]:
        raise ValueError(
            f"the {size} grid of {name} has {len(settings)} settings; every {size} grid has {GRID_SIZES[size]}"
        )
    return settings
