"""The dense Gauss-Newton reference of tests/reference.py (the oracle of gramopt.GaussNewton):
its Jacobian by jacrev and by per-row autograd agree, its parameter-space and sample-space
steps agree, and the step solves the damped least-squares problem it claims to solve."""

from __future__ import annotations

import math

import pytest
import torch
from tests.reference import flat_residual, gauss_newton_delta, gauss_newton_step, residual_jacobian
from torch import nn

from gramopt.pde import forward_laplacian

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def small_model(k: int = 1, width: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, k)).to(DT)


def pinn_closure(model: nn.Module, n_in: int, n_bd: int, k: int = 1):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n_in, 2, dtype=DT, generator=gen)
    xb = torch.rand(n_bd, 2, dtype=DT, generator=gen).round()
    f = 2 * math.pi**2 * torch.sin(math.pi * x).prod(dim=1, keepdim=True)

    def residuals():
        u = forward_laplacian(model, x)
        return [(-u.laplacian - f) / n_in**0.5, model(xb) / n_bd**0.5]

    return residuals


def autograd_closure(model: nn.Module, n: int):
    """The same interior residual with the Laplacian from torch.autograd.grad (create_graph)."""
    x0 = torch.rand(n, 2, dtype=DT, generator=torch.Generator().manual_seed(1))

    def residuals():
        x = x0.clone().requires_grad_(True)
        u = model(x)
        (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, j].sum(), x, create_graph=True)[0][:, j] for j in range(2))
        return -lap / n**0.5

    def functional():
        return -forward_laplacian(model, x0).laplacian[:, 0] / n**0.5

    return residuals, functional


@pytest.mark.parametrize("k", [1, 2])
def test_jacrev_and_per_row_autograd_jacobians_agree(k):
    model = small_model(k)
    closure = pinn_closure(model, 5, 3, k)
    j_rev, r_rev = residual_jacobian(model, closure, method="jacrev")
    j_rows, r_rows = residual_jacobian(model, closure, method="autograd")
    p = sum(q.numel() for q in model.parameters())
    assert j_rev.shape == (8 * k, p)
    torch.testing.assert_close(j_rev, j_rows, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r_rev, r_rows, rtol=0, atol=0)
    torch.testing.assert_close(r_rev, flat_residual(closure()).detach(), rtol=0, atol=0)
    # rows are point-major: row i*k + c is output c of point i; the groups follow each other
    interior, boundary = (t.detach() for t in closure())
    torch.testing.assert_close(r_rev[: 5 * k].view(5, k), interior, rtol=0, atol=0)
    torch.testing.assert_close(r_rev[5 * k :].view(3, k), boundary, rtol=0, atol=0)


def test_autograd_derivative_residuals_take_per_row_jacobians():
    model = small_model()
    with_autograd, with_forward_laplacian = autograd_closure(model, 6)
    j_rows, r_rows = residual_jacobian(model, with_autograd, method="autograd")
    j_rev, r_rev = residual_jacobian(model, with_forward_laplacian, method="jacrev")
    torch.testing.assert_close(r_rows, r_rev, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(j_rows, j_rev, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError):  # such a closure cannot run under torch.func
        residual_jacobian(model, with_autograd, method="jacrev")


@pytest.mark.parametrize("points", [(5, 3), (60, 40)], ids=["N<p", "N>p"])
@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_sample_and_parameter_space_steps_agree(points, damping):
    model = small_model(width=4)  # p = 12 + 20 + 5 = 37
    closure = pinn_closure(model, *points)
    j, r = residual_jacobian(model, closure)
    param = gauss_newton_delta(j, r, lr=0.5, damping=damping, space="parameter")
    sample = gauss_newton_delta(j, r, lr=0.5, damping=damping, space="sample")
    torch.testing.assert_close(param, sample, rtol=1e-8, atol=1e-10)
    # it minimizes 1/2 ||J d + r||^2 + damping/2 ||d||^2 (at lr = 1): J^T (J d + r) + damping d = 0
    d = param / 0.5
    stationarity = j.T @ (j @ d + r) + damping * d
    assert stationarity.abs().max() < 1e-8 * max(1.0, (j.T @ r).abs().max())


def test_undamped_sample_space_step_is_the_minimum_norm_least_squares_step():
    model = small_model(width=6)  # p = 18 + 42 + 7 = 67 > 8 rows
    j, r = residual_jacobian(model, pinn_closure(model, 5, 3))
    delta = gauss_newton_delta(j, r, lr=1.0, damping=1e-13, space="sample")
    torch.testing.assert_close(delta, -torch.linalg.pinv(j) @ r, rtol=1e-6, atol=1e-8)


def test_step_returns_the_loss_and_does_not_move_the_model():
    model = small_model()
    closure = pinn_closure(model, 4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    delta, loss = gauss_newton_step(model, closure, lr=1.0, damping=1e-2, space="sample")
    r = flat_residual(closure()).detach()
    torch.testing.assert_close(loss, 0.5 * r.pow(2).sum())
    assert delta.shape == (sum(p.numel() for p in model.parameters()),)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="space"):
        gauss_newton_delta(torch.eye(2, dtype=DT), torch.ones(2, dtype=DT), 1.0, 0.0, space="dual")
    with pytest.raises(ValueError, match="method"):
        residual_jacobian(model, closure, method="finite-differences")
