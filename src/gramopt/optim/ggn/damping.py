"""Adaptive Levenberg-Marquardt damping for GGN: the reduction-ratio rule.

Every ``every`` steps, the step ``delta`` is checked against the quadratic model it
minimized, ``m(delta) = g^T delta + 0.5 delta^T B delta`` (B the undamped curvature the
step used, g the gradient of the summed loss), on the same batch:

    rho = (L(w + delta) - L(w)) / m(delta)

and the damping is raised when the model was too optimistic, lowered when it was good:

    rho < low   ->  damping *= increase        (Levenberg-Marquardt, Jorge J. More,
    rho > high  ->  damping *= decrease         "The Levenberg-Marquardt algorithm:
                                                 implementation and theory", 1978;
                                                 James Martens, "Deep learning via
                                                 Hessian-free optimization", ICML 2010,
                                                 Section 4.1: 1/4, 3/4, factors 3/2, 2/3)

clamped to ``[min_damping, max_damping]``. A step that raised the loss of its own batch
(``L(w + delta) > L(w)``, or a non-finite loss) is also undone (``reject``, the acceptance
test of More's Levenberg-Marquardt algorithm): the parameters and momentum buffers return
to their values before it, so one bad step cannot start a cascade. Checking every step
catches a cascade at its first step but costs a forward pass per step; checking every
``every``-th step alone lets a cascade start between two checks. So checks stay every
``every``-th step, except in a warm-up, and two signals that cost nothing call one in between
(:meth:`AdaptiveDamping.due`):

- the *warm-up*: each of the first ``warmup`` steps is checked. The first steps are the
  dangerous ones: one unchecked early step can leave a network that predicts chance for
  good, with no error (the loss does not grow);
- a *surge*: the batch loss the step starts from (computed anyway, for the step) is more
  than ``surge`` times the running mean of the recent batches' losses (an exponential
  mean, weight 0.1 on the newest). A cascade shows there one step after it starts: the
  step that raised its own batch's loss left the next batch's loss high too;
- a *failed check*: the last check found ``rho < low``; checks continue every step until
  the quadratic model holds again (rejection and the damping rise act within the cascade,
  as with ``every=1``).

By default ``min_damping`` is the damping given to the optimizer. That floor matters for
mini-batches: the ratio is measured on the batch the step was fitted to, where a
Gauss-Newton step almost always keeps its promise (rho near 1), so a rule free to lower the
damping drives it towards the per-batch Newton step, which over-fits each batch and
diverges across batches. With the floor, adaptation is a safety net: it raises the damping
where the quadratic model fails and lowers it back to the floor once the model is trusted
again. Cost: one extra forward pass (no backward) on the step's batch every ``every`` steps
(and on the warm-up's steps and those the two signals call), after the update, and a copy
of the parameters before it (``reject``).

The measurements behind these choices (a cascade on the ``recall`` Transformer, the
warm-up probe on the mnist CNN, the floor on a memorisation task) are in
``benchmarks/notes.md``, "GGN's adaptive damping" and "GGN's damping warm-up".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdaptiveDamping:
    """How GGN adapts its damping (``GGN(..., damping_adaptation=AdaptiveDamping(...))``).

    Attributes:
        every: adapt after every ``every``-th step (the first step is one), >= 1; the
            warm-up, a surge and a failed check call checks in between. Each check costs a
            forward pass, so the default is 5 (``every=1`` made GGN markedly slower to the
            targets of ``gramopt compare``: ``benchmarks/notes.md``).
        warmup: check each of the first ``warmup`` steps, >= 0 (module doc).
        surge: also check a step whose batch loss (before it) exceeds ``surge`` times the
            running mean of recent batch losses, > 1 (None: only every ``every``-th step and
            after a failed check). Costs nothing when it does not fire.
        low, high: the reduction-ratio thresholds, ``0 <= low < high``; after a check with
            ``rho < low`` every step is checked until one has ``rho >= low``.
        increase: factor > 1 applied when ``rho < low`` (also when the loss rose).
        decrease: factor in (0, 1) applied when ``rho > high``.
        min_damping: the lowest damping (None: the damping given to the optimizer); the
            floor in force is the optimizer's ``extra_state["damping_adaptation"]["min_damping"]``
            (:meth:`initial_state`), which ``load_state_dict`` restores like ``lr``.
        max_damping: the highest damping.
        reject: undo a step that raised the loss of its own batch (module doc); the step
            still counts (``steps_taken``), ``opt.last_info.rejected`` says so and
            ``opt.extra_state["damping_adaptation"]["rejected_steps"]`` counts them. Costs a copy of the
            parameters (and momentum buffers) on every adapted step.
    """

    every: int = 5
    warmup: int = 20
    surge: float | None = 2.0
    low: float = 0.25
    high: float = 0.75
    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    min_damping: float | None = None
    max_damping: float = 1e6
    reject: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"AdaptiveDamping.every must be an int >= 1, got {self.every!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"AdaptiveDamping.warmup must be an int >= 0, got {self.warmup!r}")
        if self.surge is not None and not (
            isinstance(self.surge, (int, float)) and not isinstance(self.surge, bool) and 1 < self.surge < math.inf
        ):
            raise ValueError(f"AdaptiveDamping.surge must be a finite number > 1 or None, got {self.surge!r}")
        if not (0 <= self.low < self.high):
            raise ValueError(f"AdaptiveDamping needs 0 <= low < high, got low={self.low!r}, high={self.high!r}")
        if not (self.increase > 1 and math.isfinite(self.increase)):
            raise ValueError(f"AdaptiveDamping.increase must be a finite number > 1, got {self.increase!r}")
        if not (0 < self.decrease < 1):
            raise ValueError(f"AdaptiveDamping.decrease must lie in (0, 1), got {self.decrease!r}")
        if not (0 < (self.min_damping or 1e-300) <= self.max_damping < math.inf):
            raise ValueError(
                f"AdaptiveDamping needs 0 < min_damping <= max_damping < inf, got {self.min_damping!r}, "
                f"{self.max_damping!r}"
            )
        if not isinstance(self.reject, bool):
            raise ValueError(f"AdaptiveDamping.reject must be a bool, got {self.reject!r}")

    def due(self, step: int, loss: float, loss_average: float | None, last_ratio: float | None) -> bool:
        """Whether step ``step`` (0 for the first) is checked: each of the first ``warmup``
        steps, every ``every``-th step, after a check that found ``rho < low``, and when the
        step's batch loss ``loss`` surged above ``surge`` times the running mean
        ``loss_average`` of earlier batch losses."""
        if step < self.warmup or step % self.every == 0:
            return True
        if last_ratio is not None and not last_ratio >= self.low:  # (-inf and nan included)
            return True
        return self.surge is not None and loss_average is not None and loss > self.surge * loss_average

    @staticmethod
    def averaged(loss_average: float | None, loss: float) -> float:
        """The running mean of batch losses after one more batch (weight 0.1 on the newest)."""
        return loss if loss_average is None or not math.isfinite(loss_average) else 0.9 * loss_average + 0.1 * loss

    def keeps(self, actual: float) -> bool:
        """Whether a step whose batch loss changed by ``actual`` is kept: always without
        ``reject``, else only when the loss did not rise and is finite."""
        return not self.reject or (math.isfinite(actual) and actual <= 0.0)

    def ratio(self, actual: float, predicted: float) -> float:
        """rho = actual / predicted reduction; -inf when the model predicts no decrease
        or the loss is not finite (both mean: trust the model less)."""
        if not (math.isfinite(actual) and math.isfinite(predicted)) or predicted >= 0:
            return -math.inf
        return actual / predicted

    def initial_state(self, damping: float) -> dict[str, Any]:
        """The adaptation's state for an optimizer whose damping starts at ``damping``
        (GGN keeps it as ``extra_state["damping_adaptation"]``, saved by ``state_dict()``):
        ``min_damping``, the floor of :meth:`update` (:attr:`min_damping`, or ``damping``
        when that is None), and the running signals of :meth:`due`: ``loss_average``,
        ``last_ratio``, and ``rejected_steps``, the steps undone so far."""
        floor = damping if self.min_damping is None else self.min_damping
        return {"min_damping": float(floor), "loss_average": None, "last_ratio": None, "rejected_steps": 0}

    def update(self, damping: float, rho: float, min_damping: float) -> float:
        """The damping after a step whose reduction ratio was ``rho``, within
        ``[min_damping, max_damping]`` (``min_damping``: the state's, :meth:`initial_state`).
        A damping of 0 (the ridgeless step) that fails becomes ``max(min_damping, 1e-4)``."""
        if rho < self.low:
            damping = max(damping * self.increase, 1e-4)
        elif rho > self.high:
            damping *= self.decrease
        return min(max(damping, min_damping), self.max_damping)
