"""gramopt.GaussNewton as users drive it: closures that differentiate themselves (the line
search's trials), models left in eval mode (the hooks' Jacobian), and solves that need
jitter on every step (one warning, every step's in the step info). References: the dense
float64 step of tests/reference.py (J by autograd rows or jacrev, a dense solve)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.reference import flat_residual, gauss_newton_delta, params_vector, residual_jacobian
from tests.test_gn_reference import pinn_closure, small_model

import gramopt
from gramopt.optim.gauss_newton import jacobian as jac_mod
from gramopt.pde import forward_laplacian

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def autograd_pinn_closure(model: torch.nn.Module, n: int = 6, refuse_without_graph: bool = False):
    """``[-Lap u - 1 [n], u(boundary) [3]]`` with the Laplacian by nested
    ``torch.autograd.grad(create_graph=True)`` at points that require grad (set once, as
    DeepXDE and PINA do), no ``torch.enable_grad()`` anywhere. ``refuse_without_graph``: the
    derivative helper checks its input the way PINN libraries' helpers do, with its own
    error (a ValueError, not torch's RuntimeError)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 2, dtype=DT, generator=gen).requires_grad_()
    xb = torch.rand(3, 2, dtype=DT, generator=gen).round()

    def derivative(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if refuse_without_graph and not u.requires_grad:
            raise ValueError("derivative: u has no autograd graph")
        return torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)[0]

    def residuals():
        u = model(x)
        g = derivative(u, x)
        laplacian = sum(derivative(g[:, j : j + 1], x)[:, j] for j in range(2))
        return [-laplacian - 1.0, model(xb)[:, 0]]

    return residuals


def loss_at(model: torch.nn.Module, closure, theta: torch.Tensor) -> float:
    """L at the parameters ``theta`` (the model is moved there and left there)."""
    torch.nn.utils.vector_to_parameters(theta.clone(), model.parameters())  # (it aliases the vector)
    return 0.5 * float(flat_residual(closure()).detach().pow(2).sum())


# -- the line search's trials of a closure that takes derivatives with torch.autograd.grad -------------
@pytest.mark.parametrize("jacobian", ["auto", "functional"])
@pytest.mark.parametrize("line_search", ["grid", "armijo"])
@pytest.mark.parametrize("refuse_without_graph", [False, True])
def test_trials_of_a_self_differentiating_closure_need_no_enable_grad(jacobian, line_search, refuse_without_graph):
    model = small_model(width=6)
    closure = autograd_pinn_closure(model, refuse_without_graph=refuse_without_graph)
    j, r = residual_jacobian(model, closure, method="autograd")
    delta = gauss_newton_delta(j, r, 1.0, 1e-3, "sample")
    theta = params_vector(model).clone()
    opt = gramopt.GaussNewton(model, damping=1e-3, jacobian=jacobian, line_search=line_search)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "gramopt: GaussNewton switches", RuntimeWarning)  # (auto: the check)
        for _ in range(2):
            opt.step(closure)
            info = opt.last_info
            taken = params_vector(model).clone()
            torch.testing.assert_close(taken, theta + info.lr_taken * delta, rtol=1e-9, atol=1e-12)
            # every trial's L is L at its point, evaluated here with autograd on
            expected = [loss_at(model, closure, theta + 2.0**-i * delta) for i in range(len(info.trials))]
            torch.testing.assert_close(torch.tensor(info.trials), torch.tensor(expected), rtol=1e-10, atol=0)
            if line_search == "grid":
                assert info.lr_taken == 2.0 ** -min(range(len(expected)), key=expected.__getitem__)
            torch.nn.utils.vector_to_parameters(taken.clone(), model.parameters())
            j, r = residual_jacobian(model, closure, method="autograd")
            delta, theta = gauss_newton_delta(j, r, 1.0, 1e-3, "sample"), taken
    assert info.jacobian == "functional"


def test_a_closure_that_fails_with_autograd_too_still_raises_and_changes_nothing():
    model = small_model(width=6)
    good = pinn_closure(model, 5, 3)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        if len(calls) > 1:  # (every trial, with or without autograd)
            raise ValueError("the user's own bug")
        return good()

    before = params_vector(model).clone()
    opt = gramopt.GaussNewton(model, damping=1e-3, jacobian="hooks")
    with pytest.raises(ValueError, match="the user's own bug"):
        opt.step(closure)
    assert calls == [True, False, True]  # the step's call, the trial under no_grad, its retry with autograd
    torch.testing.assert_close(params_vector(model), before, rtol=0, atol=0)
    assert opt.steps_taken == 0


# -- a model in eval mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("jacobian", ["hooks", "auto"])
def test_the_hooks_give_every_column_of_a_model_in_eval_mode(jacobian, monkeypatch):
    model = small_model(width=6).eval()
    closure = pinn_closure(model, 5, 3)
    j, r = residual_jacobian(model, closure)
    delta = gauss_newton_delta(j, r, 0.5, 1e-3, "sample")
    before = params_vector(model).clone()
    by_autograd = []
    functional_columns = jac_mod.functional_columns

    def counted(flat: torch.Tensor, params) -> torch.Tensor:
        by_autograd.append(len(params))
        return functional_columns(flat, params)

    monkeypatch.setattr(jac_mod, "functional_columns", counted)
    opt = gramopt.GaussNewton(model, lr=0.5, damping=1e-3, line_search=None, jacobian=jacobian)
    opt.step(closure)
    assert by_autograd == []  # no column from autograd: the hooks recorded the eval-mode forward passes
    assert opt.last_info.jacobian == "hooks" and opt.last_info.checked
    torch.testing.assert_close(params_vector(model) - before, delta, rtol=1e-9, atol=1e-12)
    assert not model.training and not any(m.training for m in model.modules())  # left as it was


def test_the_check_still_catches_an_autograd_residual_in_eval_mode():
    model = small_model(width=6).eval()
    opt = gramopt.GaussNewton(model, damping=1e-3, jacobian="hooks")
    before = params_vector(model).clone()
    with pytest.raises(gramopt.UnsupportedModuleError, match="jacobian='functional'"):
        opt.step(autograd_pinn_closure(model))
    torch.testing.assert_close(params_vector(model), before, rtol=0, atol=0)


# -- jitter in the solve ----------------------------------------------------------------------------------
def singular_closure(model: torch.nn.Module):
    """Every interior point twice: J J^T is singular, and with damping 1e-16 its Cholesky
    needs jitter on every step."""
    x = torch.rand(5, 2, dtype=DT, generator=torch.Generator().manual_seed(1)).repeat(2, 1)

    def residuals():
        return 100 * (-forward_laplacian(model, x).laplacian[:, 0] - 1.0)

    return residuals


def test_jitter_is_warned_once_per_optimizer_and_reported_every_step():
    model = small_model(width=6)
    closure = singular_closure(model)
    opt = gramopt.GaussNewton(model, lr=0.1, damping=1e-16, line_search=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            j, r = residual_jacobian(model, closure)
            before = params_vector(model).clone()
            opt.step(closure)
            solve = opt.last_info.solve
            assert solve.jitter > 0 and f"added jitter {solve.jitter:.2e}" in solve.fallback
            # the step is the dense one with the damping actually used (damping + jitter)
            delta = gauss_newton_delta(j, r, 0.1, 1e-16 + solve.jitter, "sample")
            torch.testing.assert_close(params_vector(model) - before, delta, rtol=1e-6, atol=1e-9)
        other = small_model(width=6)
        gramopt.GaussNewton(other, lr=0.1, damping=1e-16, line_search=None).step(singular_closure(other))
    numerical = [str(w.message) for w in caught if issubclass(w.category, gramopt.NumericalWarning)]
    assert len(numerical) == 2, numerical  # one per optimizer
    assert "added jitter" in numerical[0] and "last_info.solve" in numerical[0]
