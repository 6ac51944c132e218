"""Gram-Gauss-Newton, Algorithm 1 with Eq. (11) of
Tianle Cai, Ruiqi Gao, Jikai Hou, Siyu Chen, Dong Wang, Di He, Zhihua Zhang, Liwei Wang,
"Gram-Gauss-Newton Method: Learning Overparameterized Neural Networks for Regression
Problems", arXiv:1905.11675, 2019:

    1. fetch a mini-batch B_t; forward pass f = f(w_t, x_B)
    2. J: per-sample output Jacobians, b k rows (one backward pass per output, Section 5)
    3. G = J J^T, the b k x b k Gram matrix                         (never p x p)
    4. w_{t+1} = w_t - lr * J^T (H G + damping I)^{-1} e              (Eq. 11)

with lr = 1/lambda and damping = alpha/lambda in the paper's notation; damping = 0,
lr = 1 and the full batch is the ridgeless Eq. (9). ``e_i`` is the gradient of sample
i's own loss with respect to its outputs and H the per-sample output Hessian:
``mse`` (e = f - y, H = I, the paper's setting) or ``cross_entropy`` (generalized
Gauss-Newton, beyond the paper). The non-symmetric system is solved in the symmetric
form of :mod:`gramopt.losses`: ``x = Q (Q^T G Q + damping I)^{-1} w``.

Usage::

    opt = gramopt.GGN(model, lr=1.0, damping=1e-3, loss="mse")
    opt.zero_grad(); loss = opt.backward(model(x), y); opt.step()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.factors import LayerFactors
from gramopt.errors import CaptureError, NonFiniteError
from gramopt.linalg.dense import NumericalWarning, SolveInfo
from gramopt.losses import GaussNewtonLoss, get_loss
from gramopt.optim.base import PendingBatch, SampleSpaceOptimizer, check_hyper
from gramopt.optim.ggn.solvers import SOLVERS, check_solver_options
from gramopt.optim.ggn.system import GaussNewtonSystem


@dataclass
class GaussNewtonBatch(PendingBatch):
    """What GGN's ``backward`` leaves for the step: the factors of J, the residual
    system's Q ``[b, k, k]`` (None: the identity) and w ``[b, k]``, and the parameters
    whose ``.grad`` it filled."""

    factors: dict[str, LayerFactors] = field(default_factory=dict)
    q: Tensor | None = None
    w: Tensor | None = None
    plain: list[nn.Parameter] = field(default_factory=list)


def previous_union(first: list[nn.Parameter], second: list[nn.Parameter]) -> list[nn.Parameter]:
    """``first`` then the parameters of ``second`` not in it (by identity)."""
    return first + [p for p in second if all(p is not q for q in first)]


class GGN(SampleSpaceOptimizer):
    """Gram-Gauss-Newton: ``delta = -lr * J^T (H G + damping I)^{-1} e``, ``G = J J^T``.

    Args:
        model: the network (its supported layers are hooked).
        lr: step size (1/lambda of the paper; 1 is the paper's advice), > 0.
        damping: Levenberg-Marquardt damping (alpha/lambda of the paper; its experiments
            use 0.3), >= 0. 0 is the ridgeless Eq. (9) and needs a nonsingular G;
            ``cross_entropy`` needs damping > 0 (its H is singular: ``H_i 1 = 0``).
        loss: ``"mse"`` or ``"cross_entropy"``.
        solver: name in :data:`SOLVERS`: ``"cholesky"`` (the Gram, then Cholesky),
            ``"cg"``, ``"sketch-pcg"``, ``"nystrom-pcg"`` (matrix-free, never the Gram) or
            ``"auto"`` (see :mod:`gramopt.optim.ggn.solvers`).
        solver_options: the solver's options as a dict (e.g. ``{"tol": 1e-6}``); each
            solver documents those it takes, anything else is a ValueError.
        momentum: heavy-ball momentum on the direction, in [0, 1).
        weight_decay: decoupled weight decay, >= 0.
        params: optional parameters / param groups (default: all trainable parameters).
        unsupported: ``"gradient"`` (default: plain-gradient steps for parameters no
            handler covers, with one warning naming them) or ``"error"`` (refused by name).
        max_update_norm: None or c > 0: clip the direction's norm (see
            :class:`~gramopt.optim.base.SampleSpaceOptimizer`); GGN leaves ``.grad`` of
            its layers empty, so ``clip_grad_norm_`` cannot clip its step.
        distributed: None, ``"exact"`` (the step of all ranks' batches concatenated) or
            ``"local"`` (the mean of the ranks' own steps), see :mod:`gramopt.distributed`.

    ``backward(output, target)`` runs one backward pass per output dimension (down to
    the layers' outputs: no weight gradients) and returns the mean loss; ``.grad`` is
    filled only for plain-gradient parameters (``unsupported="gradient"``), whose step
    uses it. ``step()`` solves and updates. ``last_info`` tells what the solve
    did (method, fallbacks, seconds).

    Gradient accumulation: several ``backward`` calls (micro-batches) before one
    ``step()`` give the step of their concatenated batch: the Jacobian rows, residuals
    and Hessian factors are concatenated, and ``.grad`` of the plain-gradient parameters
    is that of the mean loss over all micro-batches.

    BatchNorm layers in training mode are refused (their batch statistics couple the
    samples' Jacobian rows); in eval mode they are preconditioned like any layer.
    """

    captures_mean_loss = False  # the passes capture Jacobian rows
    #: BatchNorm in training mode is refused: its batch statistics couple the Jacobian rows
    #: of the samples (eval mode, with running statistics, works).
    batchnorm_training = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 0.3,
        loss: str = "mse",
        solver: str = "cholesky",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        params: Iterable[Any] | None = None,
        unsupported: str = "gradient",
        solver_options: dict[str, Any] | None = None,
        distributed: str | None = None,
        max_update_norm: float | None = None,
    ) -> None:
        self.loss: GaussNewtonLoss = get_loss(loss)
        self.solver_options = check_solver_options(solver, solver_options)
        self.solver = solver
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, params, defaults, unsupported, distributed=distributed, max_update_norm=max_update_norm)
        self._pending: GaussNewtonBatch | None = None
        self._strays: list[nn.Parameter] = []

    def stray_params(self) -> list[nn.Parameter]:
        return list(self._strays)  # found by backward, whose Jacobian passes reach no weight

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_hyper("damping", group["damping"])
        if self.loss.name == "cross_entropy" and group["damping"] == 0:
            raise ValueError(
                "damping must be > 0 with loss='cross_entropy': its output Hessian is singular "
                "(each H_i has the null vector 1), so H G + damping I is singular at damping=0"
            )

    @property
    def damping(self) -> float:
        values = {group["damping"] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(
                f"GGN solves one system for all parameters: every param group needs the same damping, got {sorted(values)}"
            )
        return values.pop()

    def _backward(self, output: Tensor, target: Tensor) -> Tensor:
        """Loss and Jacobian passes (``.grad`` only for plain-gradient parameters);
        returns the mean loss (detached)."""
        self._seconds = {}
        previous = self._pending if isinstance(self._pending, GaussNewtonBatch) else None
        with self._phase("jacobian"):
            self._check_batch(output, target)
            detached = output.detach().requires_grad_(True)
            with torch.enable_grad():
                value = self.loss.value(detached, target)
            # one fused check (one host sync) of the output, the target and the loss
            sums = [value.detach(), output.detach().sum()] + ([target.sum()] if target.is_floating_point() else [])
            loss, *rest = torch.stack([t.to(value.dtype) for t in sums]).tolist()
            if not math.isfinite(loss + sum(rest)):  # (a finite sum that overflowed: checked below)
                if not torch.isfinite(output).all():
                    raise NonFiniteError("the model output has NaN or inf; nothing was changed")
                if target.is_floating_point() and not torch.isfinite(target).all():
                    raise NonFiniteError("the target has NaN or inf; nothing was changed")
                if not torch.isfinite(value):
                    raise NonFiniteError(f"the loss is {float(value)}; nothing was changed")
            # the residual system in at least float32 (half-precision models solve in float32)
            wide = output.detach().to(torch.promote_types(output.dtype, torch.float32))
            q, w = self.loss.residual_system(wide, target.to(wide.dtype) if target.is_floating_point() else target)
            b = output.shape[0]
            k = output[0].numel()
            flat = output.reshape(b, k)
            directions = []
            for c in range(k):
                direction = torch.zeros_like(flat)
                direction[:, c] = 1.0
                directions.append(direction.view_as(output))
            self.engine.backward_passes(output, directions)
        with self._phase("gradient"):
            # .grad only where the step uses it: the plain-gradient parameters, from one more
            # pass through the kept graph that no hook records. The preconditioned layers get
            # none: their step comes from the factors, and filling .grad would cost another
            # backward pass (1.8x instead of 1.2x an SGD step, benchmarks/ggn_step_time.py).
            # Hooked layers whose module was not called (weights used functionally) get the
            # plain gradient too when the pass reaches them (never silently frozen).
            uncalled = self.engine.uncalled_params()
            plain = [p for p in self.engine.plain_params if p.requires_grad] + uncalled
            stray: list[nn.Parameter] = []
            weight = self._micro_batch_weight(b)  # gradient accumulation: the mean over all micro-batches
            if plain:
                (grad_output,) = torch.autograd.grad(value, detached)  # only the plain gradient needs it
                with self.engine.paused():
                    grads = torch.autograd.grad(output, plain, grad_outputs=grad_output * weight, allow_unused=True)
                stray_ids = {id(p) for p in uncalled}
                for p, g in zip(plain, grads):
                    if g is not None:
                        g = g.to(p.dtype)
                        p.grad = g if p.grad is None else p.grad + g
                        if id(p) in stray_ids:
                            stray.append(p)
            self._warn_stray(stray, stacklevel=4)  # user -> backward -> _backward
        w = w.reshape(b, -1)
        if previous is not None and previous.samples:
            stray = previous_union(self._strays, stray)
            plain = previous_union(previous.plain, plain)
            w = torch.cat([previous.w, w])
            if q is not None or previous.q is not None:
                if q is None or previous.q is None:
                    raise CaptureError("internal: micro-batches of one loss with and without a Hessian factor")
                q = torch.cat([previous.q, q])
        self._strays = stray
        mean, samples, micro, seconds = self._merged_pending(float(value.detach()), b, self._seconds)
        self._pending = GaussNewtonBatch(mean, seconds, samples, micro, q=q, w=w, plain=plain)
        return value.detach()

    def gradient_params(self) -> list[Tensor]:
        """Those ``backward`` filled ``.grad`` of (and warned about)."""
        return [] if self._pending is None else list(self._pending.plain)

    def directions(self, pending: PendingBatch | None) -> tuple[dict[Tensor, Tensor], SolveInfo | None]:
        """Solve ``(Q^T G Q + damping I) a = w``; the direction is ``J^T Q a``."""
        if not isinstance(pending, GaussNewtonBatch):
            raise CaptureError("GGN.step() needs opt.backward(model(x), y) first")
        with self._phase("factors"):
            # distributed="exact": every rank's rows
            q, w = self._gather_batch(pending.q, pending.w, scaled=(False, False))
            factors = self.engine.factors()  # the micro-batches concatenated
        pending.q, pending.w = q, w.reshape(-1)
        directions: dict[Tensor, Tensor] = {}
        info = None
        if self.solver != "cholesky":  # the matrix-free solvers never see a Gram block to check
            for name, factor in factors.items():
                if not factor.is_finite():
                    raise NonFiniteError(f"the Jacobian of layer {name} has NaN or inf; nothing was changed")
        if factors:
            dtype = next(iter(factors.values())).dtype
            system = GaussNewtonSystem(
                factors,
                None if pending.q is None else pending.q.to(dtype),
                pending.w.to(dtype),
                self.damping,
                self.steps_taken,
            )
            a, info = SOLVERS[self.solver](system, **self.solver_options)
            if not info.converged:
                warnings.warn(f"GGN step {self.steps_taken}: {info.fallback}", NumericalWarning, stacklevel=3)
            self._seconds.update(info.seconds)
            with self._phase("direction"):
                x = system.apply_q(a)
                for factor in factors.values():
                    for p, d in zip(factor.params, factor.rmatvec(x)):
                        directions[p] = d
        return directions, info
