"""The losses gramopt's optimizers compute, with what Gauss-Newton needs of them.

For Gauss-Newton each loss is a sum of per-sample losses ``l_i(f_i)`` of the outputs
``f_i`` (``[k]``). It provides the mean loss (what ``backward`` returns and what
first-order baselines train on), the per-sample residual ``e_i = d l_i / d f_i`` and a
factorization of the per-sample output Hessian ``H_i = Q_i Q_i^T`` with a vector w_i
such that ``e_i = Q_i w_i``. Then

    (H G + damping I)^{-1} e = Q (Q^T G Q + damping I)^{-1} w

(check: ``(Q Q^T G + d I) Q = Q (Q^T G Q + d I)``), a symmetric positive definite
system that a Cholesky factorization or CG can solve. ``Q = None`` means ``Q = I``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor


class GaussNewtonLoss(ABC):
    name: str

    @abstractmethod
    def check(self, output: Tensor, target: Tensor) -> None:
        """Raise ValueError if the target does not fit the output."""

    @abstractmethod
    def value(self, output: Tensor, target: Tensor) -> Tensor:
        """The usual mean loss over the batch (a scalar, differentiable)."""

    @abstractmethod
    def residual_system(self, output: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(Q, w)``: Q ``[b, k, k]`` (or None for identity) and w ``[b, k]``."""

    def residual(self, output: Tensor, target: Tensor) -> Tensor:
        """``e = Q w``, ``[b, k]``: per-sample gradients of the per-sample losses."""
        q, w = self.residual_system(output, target)
        return w if q is None else torch.einsum("bij,bj->bi", q, w)

    def hessian(self, output: Tensor, target: Tensor) -> Tensor | None:
        """``H_i = Q_i Q_i^T``, ``[b, k, k]``, or None for the identity."""
        q, _ = self.residual_system(output, target)
        return None if q is None else q @ q.transpose(1, 2)


class MSELoss(GaussNewtonLoss):
    """``l_i = 0.5 ||f_i - y_i||^2``: e = f - y, H = I. The displayed loss is the usual
    ``F.mse_loss`` (mean over all elements)."""

    name = "mse"

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.dim() == 0:
            raise ValueError("the model output is a scalar: gramopt needs a leading batch dimension")
        if target.shape != output.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match output shape {tuple(output.shape)} "
                "(mse needs them equal: [b] for [b] outputs, [b, k] for [b, k])"
            )
        if target.dtype != output.dtype:
            raise ValueError(
                f"mse needs a target of the output's dtype {output.dtype}, got {target.dtype} "
                "(convert it with target.to(output.dtype))"
            )

    def value(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)

    def residual_system(self, output: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor]:
        b = output.shape[0]
        return None, (output - target).reshape(b, -1)


class CrossEntropyLoss(GaussNewtonLoss):
    """Softmax cross-entropy on logits ``[b, k]`` with class-index targets ``[b]``.

    ``e_i = p_i - onehot(y_i)`` and ``H_i = diag(p_i) - p_i p_i^T``, factored as
    ``Q_i = diag(sqrt p_i) - p_i sqrt(p_i)^T`` with ``w_i = sqrt p_i - onehot(y_i) / sqrt p_i``
    (check: ``Q_i Q_i^T = diag(p) - 2 p p^T + p (sum p) p^T = H_i`` and
    ``Q_i w_i = p - y - p (sum p - sum y) = e_i``). Probabilities are floored at
    ``PROB_FLOOR`` in w, which matters only for a target class with p < 1e-12.
    """

    name = "cross_entropy"
    PROB_FLOOR = 1e-12

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.dim() != 2:
            raise ValueError(
                f"cross_entropy needs logits of shape [b, k], got output shape {tuple(output.shape)}"
            )
        if target.shape != output.shape[:1] or target.dtype not in (torch.long, torch.uint8):
            raise ValueError(
                f"cross_entropy needs integer class targets (torch.long) of shape [{output.shape[0]}], got "
                f"target shape {tuple(target.shape)} ({target.dtype}) for output shape {tuple(output.shape)}"
            )
        if target.numel():
            low, high = (int(t) for t in torch.aminmax(target))
            if low < 0 or high >= output.shape[1]:
                raise ValueError(
                    f"cross_entropy targets must lie in [0, {output.shape[1] - 1}], got [{low}, {high}]"
                )

    def value(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def residual_system(self, output: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor]:
        p = torch.softmax(output.double(), dim=1)
        sqrt_p = p.sqrt()
        onehot = F.one_hot(target, output.shape[1]).to(p.dtype)
        q = torch.diag_embed(sqrt_p) - p.unsqueeze(2) * sqrt_p.unsqueeze(1)
        w = sqrt_p - onehot / p.clamp_min(self.PROB_FLOOR).sqrt()
        return q.to(output.dtype), w.to(output.dtype)


LOSSES: dict[str, GaussNewtonLoss] = {"mse": MSELoss(), "cross_entropy": CrossEntropyLoss()}


def get_loss(name: str) -> GaussNewtonLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
