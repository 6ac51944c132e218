"""Per-point copies of the Linear layers' parameters, for the functional Jacobian's fast
route (:mod:`gramopt.optim.gauss_newton.per_point`).

Inside :func:`per_point_copies`, every call of an ``nn.Linear`` layer (whose weight or bias is
optimized) on inputs ``x [n, ..., in]`` computes

    y_m = x_m (W + Z_m)^T + (b + z_m),    Z = 0 [n, out, in],  z = 0 [n, out],

``m`` the call's first index (its points): the value is unchanged, and ``W`` and ``b`` enter
the call detached, so each of their uses inside the call goes through point m's copies
``Z_m``, ``z_m``, whose gradients are then per-point rows (:class:`CopiedCalls` records them).
A call without a batch of points is recorded as the reason the route cannot be taken.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class CopiedCall:
    """One call of a Linear layer ``name``: ``points`` n (its input's first size) and, per
    optimized parameter of the layer, ``(its name, it, its per-point copies [n, *shape])``
    (the copies zeros, leaves)."""

    name: str
    points: int
    copies: list[tuple[str, nn.Parameter, Tensor]]


@dataclass
class CopiedCalls:
    """What :func:`per_point_copies` recorded: the calls in order and the first reason a call
    could not be copied (None: every call was)."""

    calls: list[CopiedCall] = field(default_factory=list)
    refusal: str | None = None


def copied_layers(model: nn.Module, params: Sequence[nn.Parameter]) -> list[tuple[str, nn.Linear]]:
    """``(name, layer)`` of the model's plain ``nn.Linear`` layers (``forward`` not
    overridden) that hold an optimized parameter."""
    wanted = {id(p) for p in params}
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and type(m).forward is nn.Linear.forward
        and any(id(p) in wanted for p in m.parameters(recurse=False))
    ]


@contextmanager
def per_point_copies(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[CopiedCalls]:
    """Inside, every call of a :func:`copied_layers` layer uses per-point copies of its
    optimized parameters (module doc), recorded in the yielded :class:`CopiedCalls`."""
    wanted = {id(p) for p in params}
    record = CopiedCalls()

    def hook_for(name: str):
        def hook(module: nn.Linear, args: tuple, output: Tensor) -> Tensor | None:
            x = args[0] if args else None
            if not isinstance(x, Tensor) or x.dim() < 2:
                record.refusal = record.refusal or f"layer {name} was called without a batch of points"
                return None
            return _copied_call(module, name, x, wanted, record)

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in copied_layers(model, params)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _copied_call(module: nn.Linear, name: str, x: Tensor, wanted: set[int], record: CopiedCalls) -> Tensor:
    """``x [n, ..., in] -> y [n, ..., out]`` with per-point copies of the optimized weight and bias."""
    n = x.shape[0]
    weight, bias = module.weight, module.bias
    copy_weight, copy_bias = id(weight) in wanted, bias is not None and id(bias) in wanted
    y = F.linear(x, weight.detach() if copy_weight else weight, bias.detach() if copy_bias else bias)
    copies = []
    if copy_weight:
        z = torch.zeros((n, *weight.shape), dtype=weight.dtype, device=weight.device, requires_grad=True)
        y = y + torch.einsum("n...i,noi->n...o", x, z)
        copies.append((f"{name}.weight", weight, z))
    if copy_bias:
        z = torch.zeros((n, *bias.shape), dtype=bias.dtype, device=bias.device, requires_grad=True)
        y = y + z.view(n, *([1] * (y.dim() - 2)), -1)
        copies.append((f"{name}.bias", bias, z))
    record.calls.append(CopiedCall(name, n, copies))
    return y
