"""Learning-rate schedules of ``gramopt train --schedule``, per optimizer step over the
run's ``epochs * steps_per_epoch`` steps (T), as ``LambdaLR`` factors of the base lr:

- ``constant``: no scheduler;
- ``cosine``: ``0.5 (1 + cos(pi t / T))``, down to 0 after the last step;
- ``warmup-poly``: the SENG paper's schedule (:class:`~gramopt.optim.WarmupPolyDecay`):
  a linear warmup over the first epoch from 0.1 of the base lr, then
  ``(1 - (t - warmup) / (T - warmup))^2``.

The factor functions are rebuilt from the run's configuration (``LambdaLR`` saves the
step count and base lrs, not functions): a run resumed with another ``--epochs`` follows
the schedule of its new length from the step it reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gramopt.optim.schedules import WarmupPolyDecay

SCHEDULES = ("constant", "cosine", "warmup-poly")


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def lr_factor(name: str, total_steps: int, steps_per_epoch: int) -> Callable[[int], float] | None:
    """The factor of the base lr at step t, or None for a constant lr."""
    check_schedule(name)
    if name == "constant":
        return None
    if name == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))
    schedule = WarmupPolyDecay(
        warmup=min(steps_per_epoch, total_steps - 1), total=total_steps, power=2.0, start_factor=0.1
    )
    return lambda t: schedule(t)


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The run's scheduler (None for ``constant``); call its ``step()`` after each step."""
    factor = lr_factor(name, total_steps, steps_per_epoch)
    return None if factor is None else torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
