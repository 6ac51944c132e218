"""The toy methods of toy_method.py against dense float64 references built with
torch.func (the generic contract tests run them through optim_cases.py): a method
written on the contract gets backward, both loops, gradient accumulation and a residual
closure from the base class."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from reference import jacobian, params_vector, per_sample_grads
from toy_method import DiagonalFisher, DiagonalGaussNewton


def _fisher_delta(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, lr: float, damping: float) -> torch.Tensor:
    """``-lr g / (diag(U^T U) / n + damping)``, U the per-sample loss gradients."""
    u = per_sample_grads(model, x, y, loss)
    n = u.shape[0]
    return -lr * u.mean(0) / (u.square().sum(0) / n + damping)


def _gauss_newton_delta(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, damping: float) -> torch.Tensor:
    """``-lr (J^T e / n) / (diag(J^T J) / n + damping)``, J the output Jacobians' rows."""
    j = jacobian(model, x)
    with torch.no_grad():
        e = (model(x) - y).reshape(-1)
    n = x.shape[0]
    return -lr * (j.T @ e / n) / (j.square().sum(0) / n + damping)


MODELS = {
    "mlp-layernorm": lambda out: models.layernorm_net(d_in=5, out=out),
    "cnn": lambda out: nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, out)),
}


def _inputs(name: str, b: int) -> torch.Tensor:
    return torch.randn(b, 5) if name == "mlp-layernorm" else torch.randn(b, 1, 8, 8)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loop", ["uniform", "ordinary"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_diagonal_fisher_is_the_dense_step(name, loop, loss, float64):
    torch.manual_seed(0)
    model = MODELS[name](3)
    x = _inputs(name, 7)
    y = torch.randint(0, 3, (7,)) if loss == "cross_entropy" else torch.randn(7, 3)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    expected = _fisher_delta(model, x, y, loss_fn, lr=0.3, damping=0.02)
    opt = DiagonalFisher(model, lr=0.3, damping=0.02, loss=loss)
    assert not opt.engine.plain_params  # every layer preconditioned: the reference's assumption
    before = params_vector(model)
    if loop == "uniform":
        value = opt.backward(model(x), y)
        torch.testing.assert_close(value, loss_fn(model(x), y).detach())
    else:
        loss_fn(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-10, atol=1e-12)
    assert opt.last_info.step == 1 and opt.last_info.solve is None


@pytest.mark.parametrize("name", list(MODELS))
def test_diagonal_gauss_newton_is_the_dense_step(name, float64):
    torch.manual_seed(0)
    model = MODELS[name](2)
    x, y = _inputs(name, 6), torch.randn(6, 2)
    expected = _gauss_newton_delta(model, x, y, lr=0.7, damping=0.05)
    opt = DiagonalGaussNewton(model, lr=0.7, damping=0.05)
    before = params_vector(model)
    opt.backward(model(x), y)
    opt.step()
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [DiagonalFisher, DiagonalGaussNewton])
def test_micro_batches_give_the_concatenated_batch(cls, float64):
    """Two backward calls before one step (3 + 5 samples): the step of the 8 samples."""
    torch.manual_seed(0)
    model = MODELS["mlp-layernorm"](2)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    full = float(F.mse_loss(model(x), y).detach())
    opt = cls(model, lr=0.5, damping=0.05, loss="mse")
    opt.backward(model(x[:3]), y[:3])
    opt.backward(model(x[3:]), y[3:])
    opt.step()
    other = cls(twin, lr=0.5, damping=0.05, loss="mse")
    other.backward(twin(x), y)
    other.step()
    torch.testing.assert_close(params_vector(model), params_vector(twin), rtol=1e-10, atol=1e-12)
    assert opt.last_info.loss == pytest.approx(full, rel=1e-12)


def test_a_residual_closure_takes_the_same_step(float64):
    """``step(residuals=fn)``: the method's backward on the residuals of a least-squares
    problem (here r = f(x) - y), the dense reference step, and 0.5 ||r||^2 returned."""
    torch.manual_seed(0)
    model = models.mlp(out=2)
    x, y = torch.randn(9, 5), torch.randn(9, 2)
    expected = _gauss_newton_delta(model, x, y, lr=0.5, damping=0.1)
    with torch.no_grad():
        half_squares = 0.5 * (model(x) - y).square().sum()
    opt = DiagonalGaussNewton(model, lr=0.5, damping=0.1)
    before = params_vector(model)
    returned = opt.step(residuals=lambda: model(x) - y)
    torch.testing.assert_close(returned, half_squares)
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-10, atol=1e-12)
    assert opt.steps_taken == 1
    scalar = models.mlp(out=1)  # [N] residuals: one per point
    expected = _gauss_newton_delta(scalar, x, y[:, :1], lr=0.5, damping=0.1)
    opt = DiagonalGaussNewton(scalar, lr=0.5, damping=0.1)
    before = params_vector(scalar)
    opt.step(residuals=lambda: scalar(x)[:, 0] - y[:, 0])
    torch.testing.assert_close(params_vector(scalar) - before, expected, rtol=1e-10, atol=1e-12)


def test_the_gauss_newton_toy_refuses_the_ordinary_loop_and_other_losses():
    model = models.mlp(out=2)
    opt = DiagonalGaussNewton(model)
    F.mse_loss(model(torch.randn(4, 5)), torch.randn(4, 2)).backward()
    with pytest.raises(Exception, match=r"DiagonalGaussNewton.step\(\) needs opt.backward"):
        opt.step()
    with pytest.raises(ValueError, match="takes loss='mse'"):
        DiagonalGaussNewton(model, loss="cross_entropy")


def test_the_guide_shows_this_code():
    """docs/guides/writing-a-method.md's worked example is this file's code, verbatim."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "writing-a-method.md").read_text()
    for code in (DiagonalFisher, DiagonalGaussNewton.row_directions, DiagonalGaussNewton.directions):
        assert inspect.getsource(code) in guide, code.__qualname__
