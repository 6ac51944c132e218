"""The functional Jacobian's fast route: per-point copies of the Linear layers' parameters.

A residual row that depends on its own point only (the usual PINN residual, also when its
derivatives are taken with ``torch.autograd.grad(create_graph=True)``) needs no backward pass
of its own. :func:`~gramopt.capture.per_point.per_point_copies` runs the closure once more with every call of an
``nn.Linear`` layer (whose weight or bias is optimized) on inputs ``x [n, ..., in]`` computing

    y_m = x_m (W + Z_m)^T + (b + z_m),    Z = 0 [n, out, in],  z = 0 [n, out],

``m`` the call's first index (its points): the value is unchanged, and ``W`` and ``b`` enter
the call detached, so each of their uses inside the call goes through point m's copies
``Z_m``, ``z_m``. If row ``(i, c)`` of a residual group of N points depends on point i's
copies only, ``d r_{i,c} / d Z_m = 0`` for ``m != i``, and one backward pass of
``sum_i r_{i,c}`` gives at copy m ``d r_{m,c} / d W``: a group's rows in one pass per column
c (:func:`per_point_jacobian`), against one pass per row by vector-Jacobian products. Every
operation in between, derivatives of derivatives included, is differentiated by autograd as
it is; rows of a layer called several times for a group (the same points) add up.

Whether the rows are per point is checked exactly (when asked: the optimizer does on the
first step and every ``check_every`` steps, as for its hooks): a second pass with
random weights ``w_i`` on the rows gives ``sum_i w_i d r_{i,c} / d Z_m``, which equals
``w_m`` times the first pass at every m for every random ``w`` only when no row depends on
another point's copy (the difference is ``sum_{i != m} (w_i - w_m) d r_{i,c} / d Z_m``, a
nonzero linear function of ``w`` otherwise, so it vanishes with probability zero). Refused
with the reason instead of a Jacobian: rows that depend on another point's copy, on a call
of another size, a layer parameter used outside its layer's calls (it receives a gradient
of its own, which the copies miss), a Linear layer called on one unbatched point.
Parameters of no Linear call get no columns here (the caller's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gramopt.capture import CopiedCall, CopiedCalls, copied_layers, per_point_copies
from gramopt.optim.gauss_newton.residuals import Residuals

__all__ = ["NotPerPoint", "copied_layers", "per_point_copies", "per_point_jacobian"]


class NotPerPoint(Exception):
    """The closure's rows cannot be taken from per-point copies (the reason in the message)."""


def per_point_jacobian(
    record: CopiedCalls,
    residuals: Residuals,
    params: Sequence[nn.Parameter],
    starts: dict[int, int],
    check: bool = True,
) -> tuple[Tensor, set[int]]:
    """``(J [M, p], ids of the parameters whose columns it holds)`` from the residuals of a
    closure run inside :func:`per_point_copies` (its graph kept); the other columns are zero.
    ``starts``: id(p) -> p's first column; ``check``: whether to run the second, random pass
    (module doc; the other refusals cost nothing and always apply). Raises
    :class:`NotPerPoint` (module doc)."""
    if record.refusal is not None:
        raise NotPerPoint(record.refusal)
    pairs = [(call, p, z) for call in record.calls for _, p, z in call.copies]
    if not pairs:
        raise NotPerPoint("the closure called no Linear layer of the optimized parameters")
    copies = [z for _, _, z in pairs]
    names = {id(p): label for call in record.calls for label, p, _ in call.copies}
    owners = list({id(p): p for _, p, _ in pairs}.values())
    width = sum(p.numel() for p in params)
    jac = residuals.flat.new_zeros(residuals.rows, width)
    generator = torch.Generator(device=residuals.flat.device).manual_seed(0)
    groups = zip(residuals.group_rows(), residuals.groups, residuals.shapes, strict=True)
    for g, ((start, end), r, shape) in enumerate(groups):
        for c in range(shape.columns):
            ones = torch.zeros_like(r)
            ones[:, c] = 1
            weights = torch.zeros_like(r)
            weights[:, c] = torch.randn(shape.points, generator=generator, dtype=r.dtype, device=r.device)
            first = torch.autograd.grad(r, copies + owners, ones, retain_graph=True, allow_unused=True)
            used = [names[id(p)] for p, d in zip(owners, first[len(copies) :], strict=True) if d is not None]
            if used:
                raise NotPerPoint(f"parameter {used[0]} is used outside its layer's calls")
            second = (
                torch.autograd.grad(r, copies, weights, retain_graph=True, allow_unused=True)
                if check
                else [None] * len(copies)
            )
            for (call, p, _), d1, d2 in zip(pairs, first[: len(copies)], second, strict=True):
                if d1 is None:
                    continue
                _check_per_point(call, g, shape.points, d1, d2, weights[:, c])
                if call.points == shape.points:
                    block = jac[start:end].view(shape.points, shape.columns, width)[:, c]
                    block[:, starts[id(p)] : starts[id(p)] + p.numel()] += d1.reshape(shape.points, -1)
    return jac, {id(p) for p in owners}


def _check_per_point(
    call: CopiedCall, g: int, points: int, first: Tensor, second: Tensor | None, weights: Tensor
) -> None:
    """NotPerPoint unless ``second == weights * first`` at every point of the call (to
    ``sqrt(eps)`` of their size; module doc; not checked without ``second``), or, for a call
    of another size than group g's ``points``, unless neither reaches it."""
    if call.points != points:
        if bool(first.any()) or (second is not None and bool(second.any())):
            raise NotPerPoint(
                f"the rows of residual group {g} ({points} points) depend on a call of layer {call.name} on "
                f"{call.points} points"
            )
        return
    if second is None:
        return
    expected = weights.view(-1, *([1] * (first.dim() - 1))) * first
    scale = max(float(expected.abs().max()), float(second.abs().max()), torch.finfo(first.dtype).tiny)
    if float((second - expected).abs().max()) > math.sqrt(torch.finfo(first.dtype).eps) * scale:
        raise NotPerPoint(
            f"a row of residual group {g} depends on another point's call of layer {call.name} (rows that couple "
            "points)"
        )
