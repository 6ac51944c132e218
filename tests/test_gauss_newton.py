"""gramopt.GaussNewton against dense float64 references built with torch.func
(tests/reference.py: residual_jacobian by jacrev, gauss_newton_delta by a dense solve)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gramopt
from gramopt.optim.gauss_newton import jacobian as jac_mod
from gramopt.optim.gauss_newton.residuals import evaluate
from gramopt.pde import forward_laplacian
from tests.reference import flat_residual, gauss_newton_delta, params_vector, residual_jacobian
from tests.test_gn_reference import autograd_closure, pinn_closure, small_model

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def multi_group_closure(model: nn.Module, k: int, n: int = 7):
    """Three groups: a forward-Laplacian interior residual [n, k] ([n] for k = 1), a
    boundary residual [4, k] and a data residual [3] (output 0)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(n, 2, dtype=DT, generator=gen)
    xb = torch.rand(4, 2, dtype=DT, generator=gen).round()
    xd = torch.rand(3, 2, dtype=DT, generator=gen)

    def residuals():
        u = forward_laplacian(model, x)
        interior = -u.laplacian - 1.0
        return [interior[:, 0] if k == 1 else interior, model(xb) - 0.5, model(xd)[:, 0] - 0.25]

    return residuals


def dense_step(model, closure, lr, damping, space="sample"):
    j, r = residual_jacobian(model, closure)
    return gauss_newton_delta(j, r, lr, damping, space), 0.5 * r @ r


# -- the hooks' Jacobian ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_hooks_jacobian_rows_match_jacrev(k):
    model = small_model(k)
    closure = multi_group_closure(model, k)
    expected, r = residual_jacobian(model, closure)
    opt = gramopt.GaussNewton(model, jacobian="hooks")
    params = opt._params()
    res = evaluate(closure, DT, torch.device("cpu"))
    jac, rest = jac_mod.hooks_jacobian(opt.engine, res, params)
    opt.engine.clear()
    assert rest == []
    torch.testing.assert_close(res.flat.detach(), r, rtol=0, atol=0)
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-10)
    assert jac_mod.gradient_mismatch(jac, r, expected.T @ r) is None


def test_functional_jacobian_of_an_autograd_derivative_residual_matches_jacrev():
    model = small_model()
    with_autograd, with_forward_laplacian = autograd_closure(model, 6)
    expected, _ = residual_jacobian(model, with_forward_laplacian)
    opt = gramopt.GaussNewton(model, jacobian="functional")
    res = evaluate(with_autograd, DT, torch.device("cpu"))
    jac, _ = jac_mod.functional_jacobian(opt.engine, res, opt._params())
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)


# -- the step ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("space", ["sample", "parameter"])
@pytest.mark.parametrize("jacobian", ["hooks", "functional"])
def test_step_is_the_dense_gauss_newton_step(k, space, jacobian):
    model = small_model(k, width=6)  # p = 67 + 7 (k - 1)
    closure = multi_group_closure(model, k, n=7 if space == "sample" else 80)  # M = 11 k + 3, 84 k + 3
    delta, loss = dense_step(model, closure, lr=0.5, damping=1e-3, space=space)
    before = params_vector(model)
    opt = gramopt.GaussNewton(model, lr=0.5, damping=1e-3, line_search=None, jacobian=jacobian, space=space)
    value = opt.step(closure)
    assert opt.last_info.space == space and opt.last_info.solver == "cholesky" and opt.last_info.jacobian == jacobian
    rows = opt.last_info.rows
    assert (rows <= before.numel()) == (space == "sample")
    torch.testing.assert_close(value, loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(params_vector(model) - before, delta, rtol=1e-9, atol=1e-12)
    assert set(opt.last_info.seconds) >= {"jacobian", "solve", "line_search", "update"}


def test_grid_line_search_takes_the_argmin_of_its_trials():
    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    delta, loss = dense_step(model, closure, lr=1.0, damping=1e-4)
    theta = params_vector(model)
    expected = []
    for j in range(6):  # L at every trial, evaluated here
        torch.nn.utils.vector_to_parameters((theta + 2.0**-j * delta).clone(), model.parameters())
        with torch.no_grad():
            expected.append(0.5 * float(flat_residual(closure()).pow(2).sum()))
    torch.nn.utils.vector_to_parameters(theta.clone(), model.parameters())  # (it aliases the vector)
    opt = gramopt.GaussNewton(model, damping=1e-4, line_search="grid", line_search_trials=6)
    opt.step(closure)
    best = min(range(6), key=expected.__getitem__)
    info = opt.last_info
    assert info.lr_taken == 2.0**-best
    torch.testing.assert_close(torch.tensor(info.trials), torch.tensor(expected), rtol=1e-9, atol=0)
    torch.testing.assert_close(params_vector(model), theta + 2.0**-best * delta, rtol=1e-9, atol=1e-12)
    assert info.loss_after == min(info.trials)


def test_a_short_poisson_run_lowers_the_error_by_orders_of_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(DT)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 2, dtype=DT, generator=gen)
    xb = torch.rand(40, 2, dtype=DT, generator=gen)
    xb[:20, 0] = xb[:20, 0].round()
    xb[20:, 1] = xb[20:, 1].round()
    f = 2 * math.pi**2 * torch.sin(math.pi * x).prod(dim=1, keepdim=True)
    x_eval = torch.rand(500, 2, dtype=DT, generator=gen)
    exact = torch.sin(math.pi * x_eval).prod(dim=1, keepdim=True)

    def error() -> float:
        with torch.no_grad():
            return float((model(x_eval) - exact).norm() / exact.norm())

    def residuals():
        u = forward_laplacian(model, x)
        return [(-u.laplacian - f) / 10.0, model(xb) / 40**0.5]

    opt = gramopt.GaussNewton(model)
    first = error()
    for _ in range(20):
        opt.step(residuals)
    assert error() < 1e-3 * first
