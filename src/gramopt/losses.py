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
    """A loss ``sum_i l_i(f_i)`` with what the Gauss-Newton methods need of it.

    ``output`` is ``[b, ...]``; its k = ``output[0].numel()`` entries per sample are the
    sample's outputs (for cross-entropy: one class dimension, dim 1, at every position).
    ``value`` is the usual mean loss; the Gauss-Newton quantities (e, H, the columns of
    Q) are those of the *sum* of the per-position losses (each position counts like a
    sample), which :meth:`total` returns.
    """

    name: str
    #: the output-curvature estimators this loss defines (see :mod:`gramopt.optim.ggn`)
    curvatures: tuple[str, ...] = ("exact", "sampled")

    @abstractmethod
    def check(self, output: Tensor, target: Tensor) -> None:
        """Raise ValueError if the target does not fit the output."""

    @abstractmethod
    def value(self, output: Tensor, target: Tensor) -> Tensor:
        """The usual mean loss over the batch (a scalar, differentiable)."""

    @abstractmethod
    def total(self, output: Tensor, target: Tensor) -> Tensor:
        """The sum of the per-position losses whose gradient is e (a scalar)."""

    @abstractmethod
    def residual_system(self, output: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(Q, w)``: Q ``[b, k, k]`` (or None for identity) and w ``[b, k]``, rows in the
        order of ``output.reshape(b, k)``."""

    @abstractmethod
    def gradient_direction(self, output: Tensor, target: Tensor) -> Tensor:
        """e, shaped like ``output``: the gradient of :meth:`total` with respect to it."""

    @abstractmethod
    def sampled_directions(
        self, output: Tensor, target: Tensor, samples: int, generator: torch.Generator
    ) -> list[Tensor]:
        """``samples`` random directions shaped like ``output`` with
        ``E[sum_j q_j q_j^T] = H`` per position (independent between positions)."""

    def sampled_rows(self, output: Tensor, target: Tensor, samples: int, generator: torch.Generator) -> list[Tensor]:
        """The directions of a sampled GGN step: :meth:`sampled_directions`, then
        :meth:`gradient_direction` (a loss may share their work, e.g. one softmax)."""
        return self.sampled_directions(output, target, samples, generator) + [self.gradient_direction(output, target)]

    def top_system(self, output: Tensor, target: Tensor, samples: int) -> tuple[list[Tensor], Tensor]:
        """The exact columns of Q for the label and the ``samples - 1`` most probable
        other classes, per position: ``(directions, w)`` with ``e = sum_r w_r q_r``."""
        raise ValueError(f'curvature="top" is not defined for loss={self.name!r}; use curvature="exact" or "sampled"')

    def positions(self, output: Tensor, target: Tensor) -> int:
        """How many positions count in the loss (the divisor of the mean)."""
        return output.numel()

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
    ``F.mse_loss`` (mean over all elements). Sampled columns: ``omega / sqrt(s)`` with
    ``omega ~ N(0, I)``."""

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

    def total(self, output: Tensor, target: Tensor) -> Tensor:
        return 0.5 * (output - target).square().sum()

    def residual_system(self, output: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor]:
        b = output.shape[0]
        return None, (output - target).reshape(b, -1)

    def gradient_direction(self, output: Tensor, target: Tensor) -> Tensor:
        return output - target

    def sampled_directions(
        self, output: Tensor, target: Tensor, samples: int, generator: torch.Generator
    ) -> list[Tensor]:
        scale = samples**-0.5
        return [
            torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device) * scale
            for _ in range(samples)
        ]


class CrossEntropyLoss(GaussNewtonLoss):
    """Softmax cross-entropy on logits ``[b, C, ...]`` with class-index targets ``[b, ...]``
    (as :func:`torch.nn.functional.cross_entropy` takes them; targets equal to
    ``ignore_index`` count nowhere). The displayed loss is the mean over the counted
    positions.

    Per position, ``e = p - onehot(y)`` and ``H = diag(p) - p p^T``, factored as
    ``Q = diag(sqrt p) - p sqrt(p)^T`` with ``w = sqrt p - onehot(y) / sqrt p``
    (check: ``Q Q^T = diag(p) - 2 p p^T + p (sum p) p^T = H`` and
    ``Q w = p - y - p (sum p - sum y) = e``). Column c of Q is ``sqrt(p_c) (1_c - p)``,
    so ``e = -Q[:, y] / sqrt(p_y)``: the label's column spans the gradient.
    Probabilities are floored at ``PROB_FLOOR`` in w, which matters only for a target
    class with p < 1e-12.
    """

    name = "cross_entropy"
    curvatures = ("exact", "top", "sampled")
    PROB_FLOOR = 1e-12

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.dim() < 2:
            raise ValueError(
                f"cross_entropy needs logits of shape [b, C, ...], got output shape {tuple(output.shape)}"
            )
        expected = (output.shape[0], *output.shape[2:])
        if tuple(target.shape) != expected or target.dtype not in (torch.long, torch.uint8):
            raise ValueError(
                f"cross_entropy needs integer class targets (torch.long) of shape {list(expected)}, got "
                f"target shape {tuple(target.shape)} ({target.dtype}) for output shape {tuple(output.shape)}"
                + self._classes_last_hint(output, target)
            )
        classes = output.shape[1]
        if not target.numel():
            return
        # The common case in one reduction and one host read: every target a class (an
        # ignore_index outside [0, C) is then absent); otherwise the masked check below.
        low, high = torch.stack(torch.aminmax(target)).tolist()
        if 0 <= low and high < classes and not 0 <= self.ignore_index < classes:
            return
        counted = target[target != self.ignore_index]
        if not counted.numel():
            raise ValueError(
                f"every target equals ignore_index={self.ignore_index}: no position is left to train on"
            )
        low, high = (int(t) for t in torch.aminmax(counted))
        if low < 0 or high >= classes:
            raise ValueError(
                f"cross_entropy targets must lie in [0, {classes - 1}] (or equal "
                f"ignore_index={self.ignore_index}), got [{low}, {high}]"
            )

    @staticmethod
    def _classes_last_hint(output: Tensor, target: Tensor) -> str:
        """For a target shaped as the output without its last dimension (``[b, T, C]``
        logits, classes last, with ``[b, T]`` targets): where the classes go and the fix."""
        if output.dim() < 3 or tuple(target.shape) != tuple(output.shape[:-1]):
            return ""
        return (
            ". The classes go in dim 1 of the logits ([b, C, ...], as F.cross_entropy takes them); these look "
            "like [b, T, C] logits with the classes last (the target's shape is the output's without its last "
            "dim): pass logits.transpose(1, 2) or logits.permute(0, 2, 1) (logits.movedim(-1, 1) for more dims), "
            f"of shape {[output.shape[0], output.shape[-1], *output.shape[1:-1]]}"
        )

    def value(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, ignore_index=self.ignore_index)

    def total(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, ignore_index=self.ignore_index, reduction="sum")

    def positions(self, output: Tensor, target: Tensor) -> int:
        return int((target != self.ignore_index).sum())

    # -- layout: [b, C, *rest] <-> [b, P, C] ----------------------------------------------
    def _probabilities(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(p [b, P, C] float64, labels [b, P] (0 where ignored), mask [b, P, 1])``."""
        b, c = output.shape[:2]
        logits = output.detach().reshape(b, c, -1).transpose(1, 2).double()
        labels = target.reshape(b, -1).long()
        counted = labels != self.ignore_index
        return torch.softmax(logits, dim=2), labels.where(counted, 0), counted.unsqueeze(2).double()

    @staticmethod
    def _to_output(x: Tensor, output: Tensor) -> Tensor:
        """``[b, P, C]`` -> the layout and dtype of ``output``."""
        return x.transpose(1, 2).reshape(output.shape).to(output.dtype)

    def residual_system(self, output: Tensor, target: Tensor) -> tuple[Tensor | None, Tensor]:
        p, labels, mask = self._probabilities(output, target)
        b, positions, c = p.shape
        sqrt_p = p.sqrt()
        onehot = F.one_hot(labels, c).to(p.dtype)
        q = (torch.diag_embed(sqrt_p) - p.unsqueeze(3) * sqrt_p.unsqueeze(2)) * mask.unsqueeze(3)  # [b, P, C, C]
        w = (sqrt_p - onehot / p.clamp_min(self.PROB_FLOOR).sqrt()) * mask  # [b, P, C]
        if positions == 1:
            return q[:, 0].to(output.dtype), w[:, 0].to(output.dtype)
        # block-diagonal over positions, in the flat order (class, position) of output.reshape(b, k)
        eye = torch.eye(positions, dtype=p.dtype, device=p.device)
        full = torch.einsum("bpij,pq->bipjq", q, eye).reshape(b, c * positions, c * positions)
        return full.to(output.dtype), w.transpose(1, 2).reshape(b, -1).to(output.dtype)

    def gradient_direction(self, output: Tensor, target: Tensor) -> Tensor:
        p, labels, mask = self._probabilities(output, target)
        return self._to_output((p - F.one_hot(labels, p.shape[2]).to(p.dtype)) * mask, output)

    def top_system(self, output: Tensor, target: Tensor, samples: int) -> tuple[list[Tensor], Tensor]:
        """Per position t and rank j < s, the direction ``sqrt(p_c) (1_c - p)`` at t
        (zero elsewhere) for c = the label (j = 0) or the j-th most probable other class;
        w is ``-1 / sqrt(p_y)`` on each label's row, 0 elsewhere, ``[b, P s]``."""
        p, labels, mask = self._probabilities(output, target)
        b, positions, c = p.shape
        if samples > c:
            raise ValueError(f'curvature="top" takes samples <= the number of classes {c}, got {samples}')
        others = p.scatter(2, labels.unsqueeze(2), -1.0)  # the label sorts last
        classes = torch.cat([labels.unsqueeze(2), others.topk(samples - 1, dim=2).indices], dim=2)  # [b, P, s]
        chosen = p.gather(2, classes)  # p_c, [b, P, s]
        columns = chosen.sqrt().unsqueeze(3) * (F.one_hot(classes, c).to(p.dtype) - p.unsqueeze(2))  # [b, P, s, C]
        columns = columns * mask.unsqueeze(3)
        directions = []
        for t in range(positions):
            for j in range(samples):
                if positions == 1:
                    directions.append(self._to_output(columns[:, :, j], output))
                else:
                    at_t = torch.zeros_like(p)
                    at_t[:, t] = columns[:, t, j]
                    directions.append(self._to_output(at_t, output))
        w = torch.zeros(b, positions, samples, dtype=p.dtype, device=p.device)
        w[:, :, 0] = -chosen[:, :, 0].clamp_min(self.PROB_FLOOR).rsqrt() * mask[:, :, 0]
        return directions, w.reshape(b, -1).to(output.dtype)

    def sampled_directions(
        self, output: Tensor, target: Tensor, samples: int, generator: torch.Generator
    ) -> list[Tensor]:
        """``(onehot(y^) - p) / sqrt(s)``, ``y^ ~ Categorical(p)`` at every position (the
        Monte-Carlo Fisher: ``E[(1_y^ - p)(1_y^ - p)^T] = diag(p) - p p^T``), drawn by
        :meth:`draw_classes`."""
        return self.sampled_rows(output, target, samples, generator)[:-1]

    def sampled_rows(self, output: Tensor, target: Tensor, samples: int, generator: torch.Generator) -> list[Tensor]:
        """:meth:`sampled_directions` then :meth:`gradient_direction`, from one softmax."""
        p, labels, mask = self._probabilities(output, target)
        c = p.shape[2]
        scale = mask * samples**-0.5
        directions = [
            self._to_output((F.one_hot(drawn, c).to(p.dtype) - p) * scale, output)
            for drawn in self.draw_classes(p, samples, generator)
        ]
        directions.append(self._to_output((p - F.one_hot(labels, c).to(p.dtype)) * mask, output))
        return directions

    @staticmethod
    def draw_classes(p: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """``samples`` independent draws ``y^ ~ Categorical(p)`` at every position of p
        ``[b, P, C]``, ``[samples, b, P]``: one uniform u per draw from ``generator``
        (``torch.rand(samples, b, P, 1)``, p's dtype) and the inverse CDF, y^ = the number
        of cumulative probabilities ``<= u * sum(p)`` (one pass over p; ``torch.multinomial``
        costs about ten times as much on ``[128, 10]``)."""
        cdf = p.cumsum(dim=2)
        u = torch.rand(samples, *p.shape[:2], 1, generator=generator, dtype=p.dtype, device=generator.device)
        u = u.to(p.device) * cdf[:, :, -1:]
        return (cdf.unsqueeze(0) <= u).sum(dim=3).clamp_max(p.shape[2] - 1)


LOSSES: dict[str, GaussNewtonLoss] = {"mse": MSELoss(), "cross_entropy": CrossEntropyLoss()}


def get_loss(name: str | GaussNewtonLoss) -> GaussNewtonLoss:
    """The loss called ``name`` (``"mse"``, ``"cross_entropy"``), or ``name`` itself if it
    is a :class:`GaussNewtonLoss` (e.g. ``CrossEntropyLoss(ignore_index=0)``)."""
    if isinstance(name, GaussNewtonLoss):
        return name
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]
