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


# -- FNGD (papers/003_*) ----------------------------------------------------------------
FNGD_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def fngd_blocks(model: nn.Module) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    """(per Linear/Conv layer its trainable parameters, the other trainable parameters)."""
    blocks, plain = [], []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        (blocks.append(own) if isinstance(module, FNGD_LAYERS) else plain.extend(own))
    return blocks, plain


def sample_loss_fn(loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss of one sample such that the batch's mean loss is their mean."""
    return F.cross_entropy if loss == "cross_entropy" else F.mse_loss


def fngd_v(u: Tensor, damping: float) -> Tensor:
    """Eq. (9), (14) literally: v = (1/M)(1 - (lam I + K/M)^{-1} K 1 / M), lam = damping ||K||_F."""
    m = u.shape[0]
    k = u @ u.T
    lam = damping * torch.linalg.matrix_norm(k)
    ones = torch.ones(m, dtype=u.dtype)
    return (ones - torch.linalg.solve(lam * torch.eye(m, dtype=u.dtype) + k / m, k @ ones / m)) / m


def fngd_directions(
    model: nn.Module, x: Tensor, y: Tensor, loss: str, damping: float, shared: list[Tensor] | None = None
) -> tuple[dict[int, Tensor], list[Tensor]]:
    """Per parameter (by id) the FNGD direction U_l^T v_l (plain gradient for others), and
    the v_l used. ``shared``: coefficients per layer to use instead of Eq. (9), adapted
    to the batch size by (M / M') v[i mod M]."""
    blocks, plain = fngd_blocks(model)
    fn = sample_loss_fn(loss)
    out: dict[int, Tensor] = {}
    used = []
    for index, params in enumerate(blocks):
        u = per_sample_grads(model, x, y, fn, params=params)
        m = u.shape[0]
        if shared is None:
            v = fngd_v(u, damping)
        else:
            mean = shared[index]
            v = torch.stack([mean[i % mean.shape[0]] for i in range(m)]) * (mean.shape[0] / m)
        used.append(v)
        flat, start = u.T @ v, 0
        for p in params:
            out[id(p)] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
    if plain:
        g = per_sample_grads(model, x, y, fn, params=plain).mean(dim=0)
        start = 0
        for p in plain:
            out[id(p)] = g[start : start + p.numel()].view_as(p)
            start += p.numel()
    return out, used


def fngd_trajectory(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], loss: str, lr: float, damping: float, steps: int | None
) -> list[Tensor]:
    """Algorithm 1 on ``model`` (updated in place, no momentum): estimation for the first
    ``steps`` batches (running mean over batches of the first batch's size), then sharing.
    Returns the parameter vector after each step."""
    history, estimates = [], []
    for t, (x, y) in enumerate(batches):
        sharing = steps is not None and t >= steps
        mean = None
        if sharing:
            mean = [torch.stack(vs).mean(dim=0) for vs in zip(*estimates, strict=True)]
        directions, used = fngd_directions(model, x, y, loss, damping, shared=mean)
        if not sharing and used and used[0].shape[0] == batches[0][0].shape[0]:
            estimates.append(used)
        with torch.no_grad():
            for p in model.parameters():
                if id(p) in directions:
                    p.sub_(lr * directions[id(p)])
        history.append(params_vector(model))
    return history


# -- Gauss-Newton for a least-squares residual (gramopt.GaussNewton's oracle) -------------------
ResidualClosure = Callable[[], "Tensor | Sequence[Tensor]"]


def flat_residual(residuals: Tensor | Sequence[Tensor]) -> Tensor:
    """Every residual row concatenated, ``[M]``: a tensor ``[N]`` / ``[N, k]`` or a list of them
    (rows point-major within each group: ``r[i, c]`` is row ``i * k + c`` of its group)."""
    groups = [residuals] if isinstance(residuals, Tensor) else list(residuals)
    return torch.cat([r.reshape(-1) for r in groups])


class _ClosureModule(nn.Module):
    """``forward()`` runs the closure: ``functional_call`` on this wrapper swaps the parameters
    of ``model`` (its submodule, the module the closure uses) for the ones given."""

    def __init__(self, model: nn.Module, closure: ResidualClosure) -> None:
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> Tensor:
        return flat_residual(self.closure())


def residual_jacobian(
    model: nn.Module,
    closure: ResidualClosure,
    params: Sequence[nn.Parameter] | None = None,
    method: str = "jacrev",
) -> tuple[Tensor, Tensor]:
    """``(J [M, p], r [M])`` of the residual rows that ``closure()`` returns (:func:`flat_residual`),
    J with respect to the model's trainable parameters (columns in ``named_parameters`` order).

    ``method="jacrev"``: ``torch.func.jacrev`` through ``functional_call`` (the closure must run
    under torch.func: no ``requires_grad_`` or ``torch.autograd.grad`` inside);
    ``"autograd"``: one ``torch.autograd.grad`` per row (any closure, e.g. derivatives taken
    with ``torch.autograd.grad(create_graph=True)``; slow, for small tests)."""
    chosen = named_trainable(model, params)
    if method == "jacrev":
        wrapper = _ClosureModule(model, closure)
        theta = {f"model.{n}": t for n, t in chosen.items()}
        r = wrapper().detach()
        jac = jacrev(lambda th: functional_call(wrapper, th, ()))(theta)
        return torch.cat([jac[n].reshape(r.shape[0], -1) for n in theta], dim=1), r
    if method == "autograd":
        named = dict(model.named_parameters())
        targets = [named[n] for n in chosen]
        r = flat_residual(closure())
        rows = []
        for i in range(r.shape[0]):
            grads = torch.autograd.grad(r[i], targets, retain_graph=True, allow_unused=True)
            full = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets, strict=True)]
            rows.append(torch.cat([g.reshape(-1) for g in full]))
        return torch.stack(rows), r.detach()
    raise ValueError(f"method must be 'jacrev' or 'autograd', got {method!r}")


def gauss_newton_delta(j: Tensor, r: Tensor, lr: float, damping: float, space: str = "parameter") -> Tensor:
    """``delta = -lr (J^T J + damping I)^{-1} J^T r`` ``[p]``, by a dense solve in
    ``"parameter"`` space (p x p) or, equivalently (push-through identity), in ``"sample"``
    space, ``-lr J^T (J J^T + damping I)^{-1} r`` (M x M)."""
    if space == "parameter":
        system = j.T @ j + damping * torch.eye(j.shape[1], dtype=j.dtype)
        return -lr * torch.linalg.solve(system, j.T @ r)
    if space == "sample":
        system = j @ j.T + damping * torch.eye(j.shape[0], dtype=j.dtype)
        return -lr * j.T @ torch.linalg.solve(system, r)
    raise ValueError(f"space must be 'parameter' or 'sample', got {space!r}")


def gauss_newton_step(
    model: nn.Module,
    closure: ResidualClosure,
    lr: float,
    damping: float,
    params: Sequence[nn.Parameter] | None = None,
    method: str = "jacrev",
    space: str = "parameter",
) -> tuple[Tensor, Tensor]:
    """``(delta [p], L)``: the Gauss-Newton step of ``L = 1/2 ||r||^2`` at the model's current
    parameters (:func:`residual_jacobian`, :func:`gauss_newton_delta`), not applied."""
    j, r = residual_jacobian(model, closure, params, method)
    return gauss_newton_delta(j, r, lr, damping, space), 0.5 * r.pow(2).sum()


def input_derivatives(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(u [N, k], du/dx [N, k, d], d2u/dx2 [N, k, d, d])`` of ``fn: [n, d] -> [n, k]`` at the
    points ``x [N, d]``, point by point with ``torch.func`` (vmap of jacrev / hessian)."""

    def one(xi: Tensor) -> Tensor:
        return fn(xi.unsqueeze(0)).squeeze(0)

    return vmap(one)(x), vmap(jacrev(one))(x), vmap(torch.func.hessian(one))(x)
