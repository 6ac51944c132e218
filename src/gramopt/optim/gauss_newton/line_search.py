"""Step 4 of a Gauss-Newton step: how far along the direction, ``theta + t delta``.

``trial(t)`` sets the parameters to ``theta + t delta`` and returns ``L`` there (inf where
a residual is not finite); the searches return ``(t, L(theta + t delta))`` and leave the
parameters at the t they return (the caller moves them there again to be sure).

- ``"grid"`` (Müller & Zeinhofer, "Achieving High Accuracy with PINNs via Energy Natural
  Gradient Descent", ICML 2023, arXiv:2302.13163, Section 3: the best of a logarithmic
  grid): ``t = argmin_j L(theta + lr 2^-j delta)``, ``j = 0..trials-1``, taken even when
  every trial raises L (a search that keeps the current point then stalls at once, as
  measured on the 2-D Poisson problem);
- ``"armijo"`` (backtracking; Nocedal & Wright, "Numerical Optimization", 2nd ed. 2006,
  Algorithm 3.1): ``t = lr 2^-j`` for the first j with
  ``L(theta + t delta) <= L + c t g^T delta`` (``c = 1e-4``, g = J^T r the gradient of L);
  after :data:`ARMIJO_HALVINGS` halvings without it, no step (t = 0);
- None: ``t = lr`` (no trial).
"""

from __future__ import annotations

import math
from collections.abc import Callable

#: Armijo's sufficient-decrease constant c.
ARMIJO_C = 1e-4
#: How often the Armijo search halves t before it gives up (t = 0: no step).
ARMIJO_HALVINGS = 40

LINE_SEARCHES = ("grid", "armijo", None)


def grid_search(trial: Callable[[float], float], lr: float, trials: int) -> tuple[float, float, list[float]]:
    """``(t, L(t), every trial's L)`` for ``t`` in ``lr * 2^-j``, ``j < trials`` (module doc)."""
    steps = [lr * 2.0**-j for j in range(trials)]
    values = [trial(t) for t in steps]
    best = min(range(trials), key=values.__getitem__)
    return steps[best], values[best], values


def armijo_search(
    trial: Callable[[float], float], lr: float, loss: float, slope: float
) -> tuple[float, float, list[float]]:
    """``(t, L(t), the trials' L)`` of backtracking from ``lr`` (module doc); ``slope`` is
    ``g^T delta`` (< 0 for a descent direction). ``(0, loss)`` when no trial decreases enough."""
    values = []
    t = lr
    for _ in range(ARMIJO_HALVINGS):
        value = trial(t)
        values.append(value)
        if math.isfinite(value) and value <= loss + ARMIJO_C * t * slope:
            return t, value, values
        t *= 0.5
    return 0.0, loss, values
