"""What ``gramopt compare`` compares, as data: tuning grids, targets, budgets, defaults.

Grids. Every optimizer gets the same number of settings (:data:`GRID_SIZE`), each a set
of multiplicative factors applied to its *base* setting: the task's defaults for it
(``Task.hyper``) over the optimizer's own defaults (``OptimizerSpec.defaults``; for the
peers, their packages' documented defaults). An optimizer without an entry in
:data:`GRIDS` (a newly registered one) gets :data:`LR_GRID`.

Targets. One per task: the train loss for regression tasks (targets are standardized,
so 0.05 is 5% of the target variance), the test accuracy for classification.

Selection. For each optimizer the winning setting is the one with the smallest median
(over seeds) time-to-target, a seed that misses the target or diverges (even after
passing the target) counting as infinitely slow; ties (e.g. no seed reached the target) go to the smaller median final
train loss. The setting is chosen on the reported metric itself (the tasks have no
separate validation split); every optimizer gets the same number of tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gramopt.tasks import Task
from gramopt.training.registry import get_optimizer_spec

GRID_SIZE = 3

LR_GRID: tuple[dict[str, float], ...] = ({"lr": 1 / 3}, {}, {"lr": 3.0})
DAMPING_GRID: tuple[dict[str, float], ...] = ({"damping": 0.1}, {}, {"damping": 10.0})

GRIDS: dict[str, tuple[dict[str, float], ...]] = {
    # Gauss-Newton steps are scale-aware (lr = 1 is the undamped Newton step on the
    # linearized model): their knob is the damping.
    "ggn": DAMPING_GRID,
    # Muon's two learning rates (Muon group, AdamW group) move together.
    "muon": ({"lr": 1 / 3, "adamw_lr": 1 / 3}, {}, {"lr": 3.0, "adamw_lr": 3.0}),
}


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


TARGETS: dict[str, Target] = {
    "teacher": Target("train_loss", 0.05, below=True),
    "diabetes": Target("train_loss", 0.1, below=True),
    "digits": Target("test_accuracy", 0.97, below=False),
    "mnist": Target("test_accuracy", 0.95, below=False),
    "fashion-mnist": Target("test_accuracy", 0.85, below=False),
    "recall": Target("test_accuracy", 0.9, below=False),
}

# Optimizer-clock seconds per run when neither --budget-seconds nor --epochs is given.
BUDGET_SECONDS: dict[str, float] = {
    "teacher": 3.0,
    "diabetes": 1.0,
    "digits": 3.0,
    "mnist": 15.0,
    "fashion-mnist": 60.0,
    "recall": 15.0,
}
FALLBACK_BUDGET_SECONDS = 10.0

# The default comparison (`gramopt compare` with no options): every gramopt method,
# torch's SGD-momentum and AdamW, and these peers when installed.
DEFAULT_TASK = "teacher"
DEFAULT_SEEDS = 3
DEFAULT_PEERS = ("soap", "muon")

EVALUATIONS = 40  # evaluation points per run, evenly spaced over its budget
# Where evaluating the whole sets 40 times would cost more than the budget itself, each
# evaluation uses a fixed random subset of at most this many samples of each set.
EVAL_SAMPLES: dict[str, int] = {"mnist": 1000, "fashion-mnist": 2000, "recall": 1000}
TIMING_ROUNDS, TIMING_STEPS = 10, 3  # interleaved step timing: rounds x steps per optimizer
MEMORY_STEPS = 10  # steps of a fresh model and optimizer measured for peak memory


def grid(name: str, task: Task) -> list[dict[str, Any]]:
    """The :data:`GRID_SIZE` hyper-parameter settings of optimizer ``name`` on ``task``."""
    spec = get_optimizer_spec(name)
    base = {**spec.run_defaults, **task.hyper.get(name, {})}  # FNGD's coefficient_steps: one epoch
    factors = GRIDS.get(name, LR_GRID)
    if len(factors) != GRID_SIZE:
        raise ValueError(f"the grid of {name} has {len(factors)} settings; every grid has {GRID_SIZE}")
    settings = []
    for scale in factors:
        missing = set(scale) - set(base)
        if missing:
            raise ValueError(f"the grid of {name} scales {sorted(missing)}, which {name} does not take")
        settings.append({**base, **{key: base[key] * f for key, f in scale.items()}})
    return settings
