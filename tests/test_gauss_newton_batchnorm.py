"""gramopt.GaussNewton with BatchNorm layers, against dense float64 steps built with torch.func.

In eval mode BatchNorm is a fixed affine map per point: the hooks' Jacobian. In training
mode its batch statistics couple the points, so the hooks' per-point rows are not J, but
the residual is still a least-squares residual whose J autograd gives exactly:
``jacobian="auto"`` takes the functional Jacobian for good (one warning naming the layer),
``"hooks"`` and ``unsupported="error"`` refuse, changing nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.reference import gauss_newton_delta, params_vector, residual_jacobian
from torch import nn
from torch.func import functional_call, jacrev

import gramopt

DT = torch.float64
DAMPING = 1e-3
_gen = torch.Generator().manual_seed(4)
X = torch.rand(8, 2, dtype=DT, generator=_gen)
TARGET = torch.rand(8, 2, dtype=DT, generator=_gen)
SWITCHES = r"switches to jacobian='functional' for good: 1 \(BatchNorm1d\) is in training mode"


def batchnorm_model() -> nn.Sequential:
    """2 -> 5 -> BatchNorm -> tanh -> 2, with BatchNorm's affine parameters and running
    statistics away from their initial values (so that every column and mode shows)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model[1].weight.copy_(0.5 + torch.rand(5, dtype=DT, generator=gen))
        model[1].bias.copy_(torch.randn(5, dtype=DT, generator=gen))
        model[1].running_mean.copy_(torch.randn(5, dtype=DT, generator=gen))
        model[1].running_var.copy_(0.5 + torch.rand(5, dtype=DT, generator=gen))
    return model


def closure_of(model: nn.Module):
    return lambda: model(X) - TARGET  # [8, 2]


def training_mode_step(model: nn.Module) -> torch.Tensor:
    """``delta = -J^T (J J^T + damping I)^{-1} r`` for ``r(theta) = f(X; theta) - TARGET``
    with BatchNorm in training mode (normalized by X's batch statistics), J by jacrev through
    ``functional_call`` on copies of the buffers (the running statistics it updates are the
    copies'). Call it before an optimizer hooks the model."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def residual(th: dict[str, torch.Tensor]) -> torch.Tensor:
        copies = {n: b.clone() for n, b in buffers.items()}
        return (functional_call(model, {**th, **copies}, (X,)) - TARGET).reshape(-1)

    r = residual(theta)
    jac = jacrev(residual)(theta)
    j = torch.cat([jac[n].reshape(r.shape[0], -1) for n in theta], dim=1)
    return gauss_newton_delta(j, r, 1.0, DAMPING, "sample")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = snapshot(model)
    assert all(torch.equal(now[n], before[n]) for n in before)


@pytest.mark.parametrize("jacobian", ["auto", "functional"])
def test_training_mode_takes_the_functional_jacobian_and_the_dense_step(jacobian):
    model = batchnorm_model()
    delta = training_mode_step(model)
    before = params_vector(model)
    opt = gramopt.GaussNewton(model, damping=DAMPING, line_search=None, jacobian=jacobian)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure_of(model))
        step = params_vector(model) - before
        opt.step(closure_of(model))
    switched = [str(w.message) for w in caught if "switches to jacobian='functional'" in str(w.message)]
    assert len(switched) == (1 if jacobian == "auto" else 0), [str(w.message) for w in caught]
    if switched:
        assert "batch statistics couple the points" in switched[0] and "eval mode" in switched[0]
    assert opt.last_info.jacobian == "functional"
    assert opt.state_dict()["gramopt"]["jacobian"] == "functional"
    torch.testing.assert_close(step, delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(jacobian="hooks"), {"jacobian='functional'"}),
        (dict(unsupported="error"), {"unsupported='warn'"}),
        (dict(unsupported="error", jacobian="hooks"), {"unsupported='warn'", "jacobian='functional'"}),
    ],
)
def test_training_mode_is_refused_under_hooks_or_error_at_construction(kwargs, names):
    """The refusal names the layer and the values that take it (the caller's own:
    never ``unsupported='gradient'``, which GaussNewton does not take); the model is as it was."""
    model = batchnorm_model()
    before = snapshot(model)
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"1 \(BatchNorm1d\) is in training mode") as refused:
        gramopt.GaussNewton(model, **kwargs)
    message = str(refused.value)
    assert all(name in message for name in names), message
    assert "unsupported='gradient'" not in message
    assert_same(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kwargs", [dict(), dict(jacobian="hooks"), dict(unsupported="error")])
def test_training_mode_switched_on_after_construction(kwargs):
    """Built with BatchNorm in eval mode (hooks), then ``model.train()``: at the next step
    "auto" switches to the functional Jacobian (the dense training-mode step), "hooks" and
    ``unsupported="error"`` refuse before the closure runs (parameters, running statistics
    and state unchanged)."""
    model = batchnorm_model()
    model[1].eval()
    opt = gramopt.GaussNewton(model, damping=DAMPING, line_search=None, **kwargs)
    opt.step(closure_of(model))
    assert opt.last_info.jacobian == "hooks"
    model.train()
    if not kwargs:
        with opt.engine.paused():
            delta = training_mode_step(model)
        opt.engine.clear()
        before = params_vector(model)
        with pytest.warns(RuntimeWarning, match=SWITCHES):
            opt.step(closure_of(model))
        assert opt.last_info.jacobian == "functional"
        step = params_vector(model) - before
        torch.testing.assert_close(step, delta, rtol=1e-9, atol=1e-12)
        return
    before, state = snapshot(model), opt.state_dict()
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"1 \(BatchNorm1d\) is in training mode") as refused:
        opt.step(closure_of(model))
    assert "unsupported='gradient'" not in str(refused.value)
    assert_same(model, before)
    assert opt.state_dict()["gramopt"] == state["gramopt"] and opt.last_info.step == 1


def test_eval_mode_takes_the_hooks_jacobian_and_the_dense_step():
    """Eval mode: a fixed affine map per point, so the hooks' rows are J (checked against
    autograd on the first step, no warning) and the step is the dense one."""
    model = batchnorm_model()
    model[1].eval()
    closure = closure_of(model)
    j, r = residual_jacobian(model, closure)
    delta = gauss_newton_delta(j, r, 1.0, DAMPING, "sample")
    before = params_vector(model)
    opt = gramopt.GaussNewton(model, damping=DAMPING, line_search=None, jacobian="hooks")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step(closure)
    assert (opt.last_info.jacobian, opt.last_info.checked) == ("hooks", True)
    step = params_vector(model) - before
    torch.testing.assert_close(step, delta, rtol=1e-9, atol=1e-12)
