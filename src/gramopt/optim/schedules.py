"""The schedules of SENG's experiments (Appendix A and Table 7 of
Minghan Yang, Dong Xu, Zaiwen Wen, Mengyun Chen, Pengxiang Xu, "Sketchy Empirical
Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020).

Learning rate (alpha_k at epoch k; use them per epoch, or per step with step counts):

- "cosine": ``alpha_k = 0.001 + 0.5 (alpha_0 - 0.001)(1 + cos(pi k / max_epoch))`` is
  torch's ``CosineAnnealingLR(opt, T_max=max_epoch, eta_min=0.001)``;
- "exp": ``alpha_k = alpha_0 (1 - k / max_epoch)^D`` is
  ``LambdaLR(opt, WarmupPolyDecay(warmup=0, total=max_epoch, power=D))``;
- linear warmup (ImageNet: 5 epochs from alpha_warmup to alpha_0), then "exp":
  ``LambdaLR(opt, WarmupPolyDecay(warmup=5, total=max_epoch, power=D,
  start_factor=alpha_warmup / alpha_0))``. The decay counts from the end of the warmup,
  ``(1 - (k - warmup) / (total - warmup))^D``, so the rate is continuous at alpha_0 (the
  paper does not say which; counting from epoch 0 would drop it by
  ``(1 - warmup / total)^D`` at the switch).

Damping ``lam_k = lam_0 rho^(epoch / 10)`` (Table 7: ``0.17 * 0.9^(epoch/10)``) is not a
learning rate, so it is a callable of the step for ``SENG(damping=...)``:
``DampingDecay(0.17, 0.9, every=10, steps_per_epoch=len(loader))``.

All are frozen dataclasses: picklable, and LambdaLR saves their fields in its state_dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class WarmupPolyDecay:
    """A ``LambdaLR`` factor: linear warmup, then the paper's "exp" (polynomial) decay.

    ``factor(k) = start + (1 - start) k / warmup`` for ``k < warmup``, then
    ``(1 - (k - warmup) / (total - warmup))^power``, and 0 from ``k = total`` on.

    Attributes:
        warmup: warmup length (epochs or steps), >= 0.
        total: max_epoch (or steps), > warmup.
        power: D, the decay rate (4-6 in the paper), >= 0.
        start_factor: alpha_warmup / alpha_0, in [0, 1].
    """

    warmup: int
    total: int
    power: float
    start_factor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("warmup", "total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.total <= self.warmup:
            raise ValueError(f"total must be > warmup, got total={self.total}, warmup={self.warmup}")
        _positive("power", self.power, allow_zero=True)
        _positive("start_factor", self.start_factor, allow_zero=True)
        if self.start_factor > 1:
            raise ValueError(f"start_factor must be <= 1, got {self.start_factor}")

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return self.start_factor + (1.0 - self.start_factor) * k / self.warmup
        left = 1.0 - (k - self.warmup) / (self.total - self.warmup)
        return max(0.0, left) ** self.power


@dataclass(frozen=True)
class DampingDecay:
    """``lam(step) = initial * factor^(epoch / every)``, ``epoch = step // steps_per_epoch``.

    Attributes:
        initial: lam_0 > 0.
        factor: rho in (0, 1] (0.9 or 0.7 in Table 7).
        every: the epochs over which the damping falls by ``factor`` (10), > 0.
        steps_per_epoch: optimizer steps per epoch (1: ``step`` counts epochs).
    """

    initial: float
    factor: float
    every: float = 10.0
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        _positive("initial", self.initial)
        _positive("factor", self.factor)
        if self.factor > 1:
            raise ValueError(f"factor must be <= 1 (a decay), got {self.factor}")
        _positive("every", self.every)
        if (
            isinstance(self.steps_per_epoch, bool)
            or not isinstance(self.steps_per_epoch, int)
            or self.steps_per_epoch < 1
        ):
            raise ValueError(f"steps_per_epoch must be an int >= 1, got {self.steps_per_epoch!r}")

    def __call__(self, step: int) -> float:
        return self.initial * self.factor ** ((step // self.steps_per_epoch) / self.every)
