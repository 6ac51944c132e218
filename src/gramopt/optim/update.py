"""The decoration every method's direction goes through, as functions of tensors
(torch.optim's functional form: the optimizer gathers the tensors of a param group,
these functions do the arithmetic).

A method computes a direction d per parameter; with learning rate lr, momentum mu and
weight decay wd of the parameter's group the update is

    p <- p - lr * wd * p                 (decoupled weight decay, if wd > 0)
    m <- mu * m + d;  d <- m             (heavy-ball momentum, if mu > 0; m = d at first)
    p <- p - lr * d

so with momentum and weight decay 0 a step is exactly ``delta = -lr * d``. With
``weight_decay_mode="l2"`` there is no decoupled term: the method preconditions
``g + wd * p`` instead (:meth:`~gramopt.optim.base.SampleSpaceOptimizer.l2_term`).
Multi-tensor (``torch._foreach_*``) kernels: a few calls per param group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def clip_directions(directions: dict[Tensor, Tensor], max_norm: float) -> dict[Tensor, Tensor]:
    """Every direction times ``min(1, max_norm / ||d||)``, with ``||d||`` the 2-norm of all
    directions together (``max_update_norm``). A non-finite norm is left for the step's
    finiteness check to refuse."""
    values = [d for d in directions.values() if d.numel()]
    if not values:
        return directions
    norm = float(torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(values)])))
    if not math.isfinite(norm) or norm <= max_norm:
        return directions
    factor = max_norm / norm
    return {p: d * factor for p, d in directions.items()}


def all_norms_finite(directions: Sequence[Tensor]) -> bool:
    """Whether the sum of the 2-norms of ``directions`` is finite: one multi-tensor norm
    and one host sync for all of them. False when one has a NaN or inf, or when a finite
    norm overflowed (the caller tells them apart with an exact per-tensor check)."""
    norms = torch._foreach_norm(list(directions))
    if len({t.dtype for t in norms}) > 1:
        norms = [t.double() for t in norms]
    total = torch.stack(norms).sum() if len(norms) > 1 else norms[0]
    return math.isfinite(float(total))


def decorated_update(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """Apply the update of the module docstring to ``params`` in place.

    Args:
        params: one param group's parameters that have a direction.
        directions: their directions d, in the parameters' dtype.
        buffers: their momentum buffers (None: none yet; with ``momentum`` > 0 such a
            slot becomes ``d.clone()``, which the caller keeps). Ignored without momentum.
        lr, momentum, weight_decay: the group's hyper-parameters.
        decoupled: whether weight decay is the decoupled term (else the method already
            added ``wd * p`` to the gradient it preconditioned).
    """
    if weight_decay and decoupled:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if momentum:
        old, new = [], []
        for i, d in enumerate(directions):
            if buffers[i] is None:
                buffers[i] = d.clone()
            else:
                old.append(buffers[i])
                new.append(d)
        if old:
            torch._foreach_mul_(old, momentum)
            torch._foreach_add_(old, new)
        directions = buffers
    torch._foreach_add_(params, directions, alpha=-lr)
