"""Step 1 of a Gauss-Newton step: call the closure and check its residual groups.

A closure returns one tensor or a sequence of tensors (groups), each ``[N_g]`` or
``[N_g, k_g]`` with the points first. The rows of the least-squares problem are every
group's entries, groups concatenated and each flattened point-major: ``r[i, c]`` of a
group is its row ``i * k_g + c``. ``L = 1/2 sum_g ||r_g||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gramopt.errors import NonFiniteError

ResidualClosure = Callable[[], "Tensor | Sequence[Tensor]"]


@dataclass(frozen=True)
class GroupShape:
    """The shape of one residual group: ``points`` N_g, ``columns`` k_g (1 for ``[N]``),
    ``matrix`` whether it was given as ``[N, k]``."""

    points: int
    columns: int
    matrix: bool

    @property
    def rows(self) -> int:
        return self.points * self.columns

    def describe(self) -> str:
        if self.points < 0:
            return "not [N] or [N, k]"
        return f"[{self.points}, {self.columns}]" if self.matrix else f"[{self.points}]"


@dataclass
class Residuals:
    """The residual groups of one closure call.

    Attributes:
        groups: the closure's tensors, each ``[N_g, k_g]`` (a ``[N]`` group as ``[N, 1]``),
            attached to the graph.
        shapes: their :class:`GroupShape`.
        flat: every row, ``[M]`` (module doc), attached to the graph.
    """

    groups: list[Tensor]
    shapes: list[GroupShape]
    flat: Tensor

    @property
    def rows(self) -> int:
        return self.flat.shape[0]

    def loss(self) -> Tensor:
        """``L = 1/2 ||r||^2``, a detached 0-dim tensor."""
        r = self.flat.detach()
        return 0.5 * (r @ r)

    def group_rows(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each group's rows in :attr:`flat`."""
        out, start = [], 0
        for shape in self.shapes:
            out.append((start, start + shape.rows))
            start += shape.rows
        return out


def as_groups(value: object) -> list[Tensor]:
    """The closure's return value as a list of tensors (TypeError otherwise)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, Tensor) for t in value):
        return list(value)
    raise TypeError(
        "the residual closure must return a tensor [N] or [N, k], or a non-empty list of them, "
        f"got {type(value).__name__}"
    )


def shape_of(r: Tensor) -> GroupShape:
    """The :class:`GroupShape` of a tensor (a 0-dim or 3-dim one gets an impossible shape
    that no check accepts)."""
    if r.dim() not in (1, 2):
        return GroupShape(-1, -1, False)
    return GroupShape(r.shape[0], 1 if r.dim() == 1 else r.shape[1], r.dim() == 2)


def check_groups(groups: list[Tensor], dtype: torch.dtype, device: torch.device) -> list[GroupShape]:
    """ValueError naming the first group with a bad shape, or a dtype or device other than
    the parameters'; :class:`NonFiniteError` for NaN or inf entries."""
    shapes = []
    for index, r in enumerate(groups):
        name = f"residual group {index}"
        if r.dim() == 0:
            raise ValueError(
                f"{name} is a scalar: GaussNewton needs the residual rows ([N] or [N, k]), not the loss; "
                "return r itself, not r.pow(2).sum() or a mean"
            )
        if r.dim() not in (1, 2) or r.shape[0] == 0 or (r.dim() == 2 and r.shape[1] == 0):
            raise ValueError(f"{name} has shape {tuple(r.shape)}: each group must be [N] or [N, k] with N, k >= 1")
        if r.dtype != dtype or r.device != device:
            raise ValueError(
                f"{name} is {r.dtype} on {r.device}, the parameters are {dtype} on {device}: every residual "
                "group must have the parameters' dtype and device (float64 is what least-squares problems "
                "such as PINNs need)"
            )
        shapes.append(shape_of(r))
    flat_check = torch.stack([r.detach().sum() for r in groups]).sum()
    if not torch.isfinite(flat_check):
        for index, r in enumerate(groups):
            if not torch.isfinite(r.detach()).all():
                raise NonFiniteError(f"residual group {index} has NaN or inf entries; nothing was changed")
    return shapes


def check_same_shapes(shapes: list[GroupShape], first: list[GroupShape] | None) -> None:
    """ValueError when the groups' shapes differ from those of the first call."""
    if first is not None and shapes != first:
        raise ValueError(
            "the residual closure returned groups of shapes "
            f"{[s.describe() for s in shapes]}, the first call returned {[s.describe() for s in first]}: the "
            "number of groups and their shapes must stay the same between calls (a new optimizer for a new "
            "problem)"
        )


def evaluate(closure: ResidualClosure, dtype: torch.dtype, device: torch.device) -> Residuals:
    """Call ``closure`` (autograd on) and check its groups (:func:`check_groups`); each
    group must depend on the parameters (be attached to the graph)."""
    with torch.enable_grad():
        groups = as_groups(closure())
    shapes = check_groups(groups, dtype, device)
    for index, r in enumerate(groups):
        if not r.requires_grad:
            raise ValueError(
                f"residual group {index} does not depend on the parameters (it has no autograd graph): compute "
                "the residuals from the model inside the closure, with autograd enabled"
            )
    matrices = [r if r.dim() == 2 else r.unsqueeze(1) for r in groups]
    flat = torch.cat([r.reshape(-1) for r in matrices])
    return Residuals(matrices, shapes, flat)


def evaluate_loss(closure: ResidualClosure, shapes: list[GroupShape], dtype: torch.dtype, graph: bool = False) -> float:
    """``L`` at the current parameters (a line search's trial); inf when a residual is not
    finite. Shapes must be those of the step's own call. Runs under ``no_grad`` unless
    ``graph`` (a closure that takes derivatives with ``torch.autograd.grad`` needs autograd)."""
    with torch.enable_grad() if graph else torch.no_grad():
        groups = as_groups(closure())
    check_same_shapes([shape_of(r) for r in groups], shapes)
    value = 0.5 * float(sum(r.detach().to(dtype).pow(2).sum() for r in groups))
    return value if math.isfinite(value) else math.inf
