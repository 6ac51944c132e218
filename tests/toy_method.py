"""Two toy methods written on gramopt's method contract (docs/guides/writing-a-method.md),
kept as tests: a new method is one small file like this one, plus its registration
(here: its cases in optim_cases.py, which run it through the generic contract tests).

``DiagonalFisher`` (rows of the mean loss's per-sample gradients, both training loops):

    d = g / (diag(U^T U) / n + damping),    g = U^T 1 / n,

with U ``[n, p]`` the per-sample loss gradients of a layer's parameters (its rows), i.e. a
diagonal empirical-Fisher step (the diagonal of the matrix SENG and FNGD invert).

``DiagonalGaussNewton`` (Jacobian rows, ``loss="mse"``): with J ``[n k, p]`` the rows of the
per-sample output Jacobians and e ``[n k]`` the residuals f - y,

    d = (J^T e / n) / (diag(J^T J) / n + damping),

the diagonal of Gauss-Newton on the mean of the per-sample losses 0.5 ||f_i - y_i||^2.
Its ``step(residuals)`` also takes a residual closure instead of ``backward(output, target)``
(least-squares problems given as residuals, e.g. physics-informed networks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.factors import LayerFactors
from gramopt.losses import GaussNewtonLoss, get_loss
from gramopt.optim.base import Batch, MethodNeeds, SampleSpaceOptimizer, check_hyper


class DiagonalFisher(SampleSpaceOptimizer):
    """``d = g / (diag(U^T U) / n + damping)`` per preconditioned parameter."""

    needs = MethodNeeds(rows="loss_gradients")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1e-3,
        *,
        loss: str | GaussNewtonLoss = "cross_entropy",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        params: Iterable[Any] | None = None,
        unsupported: str = "gradient",
        max_update_norm: float | None = None,
    ) -> None:
        self.loss = get_loss(loss)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, params, defaults, unsupported, max_update_norm=max_update_norm)

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        check_hyper("damping", group["damping"], inclusive=False)

    def directions(self, batch: Batch) -> dict[Tensor, Tensor]:
        n = batch.captured_samples()
        if n is None:
            raise batch.missing_captures("DiagonalFisher.step() needs opt.backward(model(x), y) or loss.backward()")
        directions: dict[Tensor, Tensor] = {}
        for factors in batch.factors(scale=n).values():  # rows: the per-sample loss gradients u_i
            mean = torch.full((n,), 1.0 / n, dtype=factors.dtype, device=factors.params[0].device)
            gradient = factors.rmatvec(mean)  # g = U^T 1 / n, per parameter
            directions.update(self._divide(factors, gradient, factors.column_norms() / n))
        return directions

    def _divide(self, factors: LayerFactors, gradient: list[Tensor], diagonal: Tensor) -> dict[Tensor, Tensor]:
        """``g / (diagonal + damping)`` per parameter (``diagonal``: ``[p]``, the
        parameters flattened in the order of ``factors.params``)."""
        out, start = {}, 0
        for p, g in zip(factors.params, gradient, strict=True):
            d = diagonal[start : start + p.numel()].view_as(g)
            out[p] = g / (d + self.group_of(p)["damping"])
            start += p.numel()
        return out


class DiagonalGaussNewton(DiagonalFisher):
    """``d = (J^T e / n) / (diag(J^T J) / n + damping)``, mse only."""

    needs = MethodNeeds(rows="jacobian", batchnorm_training=False)

    def __init__(self, model: nn.Module, lr: float = 1.0, damping: float = 1e-3, *, loss: str = "mse", **options: Any):
        if get_loss(loss).name != "mse":
            raise ValueError(f"DiagonalGaussNewton takes loss='mse' (output Hessian I), got {loss!r}")
        super().__init__(model, lr, damping, loss=loss, **options)

    def row_directions(self, output: Tensor, target: Tensor, batch: Batch) -> list[Tensor]:
        """One pass per output: the rows of each sample's output Jacobian, and e."""
        b, k = output.shape[0], output[0].numel()
        batch.per_sample["residual"] = (output.detach() - target).reshape(b, k)
        unit = torch.eye(k, dtype=output.dtype, device=output.device)
        return [unit[j].expand(b, k).reshape(output.shape) for j in range(k)]

    def directions(self, batch: Batch) -> dict[Tensor, Tensor]:
        residual = batch.per_sample["residual"]  # [n, k], all micro-batches (and ranks)
        n = residual.shape[0]
        directions: dict[Tensor, Tensor] = {}
        for factors in batch.factors().values():  # rows: J, sample by sample, k rows each
            gradient = factors.rmatvec(residual.reshape(-1).to(factors.dtype) / n)  # J^T e / n
            directions.update(self._divide(factors, gradient, factors.column_norms() / n))
        return directions

    def step(self, closure: Callable[[], Any] | None = None, *, residuals: Callable[[], Tensor] | None = None) -> Any:
        """``step(residuals=fn)``: ``fn()`` returns the residuals ``[N]`` or ``[N, k]`` of
        a least-squares problem computed through the model (one row per point); the step
        is that of ``backward(r, 0)``. Returns ``0.5 * ||r||^2`` before the step. Without
        ``residuals``, torch's ``step(closure)``."""
        if residuals is None:
            return super().step(closure)
        with torch.enable_grad():
            r = residuals()
        r = r.reshape(r.shape[0], -1)
        self.zero_grad()
        self.backward(r, torch.zeros_like(r))
        super().step()
        return 0.5 * r.detach().square().sum()
