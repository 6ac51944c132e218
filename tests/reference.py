"""Dense float64 references built independently with torch.func (jacrev, vmap(grad)).

Nothing here uses gramopt's capture engine: these are the oracles its fast paths are
checked against (DESIGN.md section 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap


def named_trainable(model: nn.Module, params: Sequence[nn.Parameter] | None = None) -> dict[str, Tensor]:
    chosen = None if params is None else {id(p) for p in params}
    return {
        n: p.detach()
        for n, p in model.named_parameters()
        if p.requires_grad and (chosen is None or id(p) in chosen)
    }


def flatten(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def jacobian(model: nn.Module, x: Tensor, params: Sequence[nn.Parameter] | None = None) -> Tensor:
    """J: per-sample output Jacobians, ``[b * k, p]`` (sample-major rows)."""
    chosen = named_trainable(model, params)

    def f(theta: dict[str, Tensor]) -> Tensor:
        return functional_call(model, theta, (x,))

    jac = jacrev(f)(chosen)
    b = x.shape[0]
    return torch.cat([jac[n].reshape(b, -1, chosen[n].numel()) for n in chosen], dim=2).reshape(
        -1, sum(t.numel() for t in chosen.values())
    )


def per_sample_grads(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
    params: Sequence[nn.Parameter] | None = None,
) -> Tensor:
    """Rows: gradient of ``loss(f(x_i), y_i)`` (a single-sample loss), ``[b, p]``."""
    chosen = named_trainable(model, params)

    def sample_loss(theta: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, theta, (xi.unsqueeze(0),))
        return loss(out, yi.unsqueeze(0))

    g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(chosen, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in chosen], dim=1)


def ggn_delta(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: str,
    lr: float,
    damping: float,
    params: Sequence[nn.Parameter] | None = None,
) -> Tensor:
    """``delta = -lr J^T (H G + damping I)^{-1} e`` with a dense LU solve."""
    j = jacobian(model, x, params)
    with torch.no_grad():
        f = model(x)
    b = f.shape[0]
    if loss == "mse":
        e = (f - y).reshape(-1)
        h = torch.eye(e.numel(), dtype=f.dtype)
    else:
        p = torch.softmax(f, dim=1)
        e = (p - F.one_hot(y, f.shape[1]).to(p.dtype)).reshape(-1)
        h = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])
    g = j @ j.T
    system = h @ g + damping * torch.eye(g.shape[0], dtype=g.dtype)
    return -lr * j.T @ torch.linalg.solve(system, e)


def params_vector(model: nn.Module, params: Sequence[nn.Parameter] | None = None) -> Tensor:
    return flatten(named_trainable(model, params)).clone()
