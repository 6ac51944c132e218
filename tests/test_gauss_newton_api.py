"""gramopt.GaussNewton's contract around the step: bad input changes nothing, state_dict
round trips exactly, LR schedulers, param groups, the float32 warning."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.reference import params_vector
from tests.test_gn_reference import pinn_closure, small_model
from torch import nn

import gramopt

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def points(n: int, seed: int = 0, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.rand(n, 2, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def unchanged(opt: gramopt.GaussNewton, model: nn.Module, before: torch.Tensor, state: dict) -> None:
    assert torch.equal(params_vector(model), before)
    after = opt.state_dict()
    assert after["gramopt"].keys() == state["gramopt"].keys()
    for key, value in state["gramopt"].items():
        other = after["gramopt"][key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value
    assert after["param_groups"] == state["param_groups"]


def bad_closures(model: nn.Module):
    x, xb = points(6), points(3, 1)
    yield "NaN", lambda: [model(x) * float("nan"), model(xb)], gramopt.NonFiniteError
    yield "does not depend", lambda: [model(x), torch.ones(3, 1, dtype=DT)], ValueError
    yield "does not depend", lambda: [model(x), xb[:, :1].clone().requires_grad_(True) * 2], ValueError
    yield "dtype", lambda: [model(x), model(xb).float()], ValueError
    yield "shape", lambda: [model(x)[:, 0], model(xb)[:, 0]], ValueError  # after a step on [N, 1] groups
    yield "shape", lambda: model(x).unsqueeze(0), ValueError
    yield "must return", lambda: 3.0, TypeError
    yield "must return", lambda: [], TypeError
    yield "not the loss", lambda: [model(x).pow(2).sum(), model(xb)], ValueError


@pytest.mark.parametrize("case", range(9))
def test_bad_residuals_raise_and_change_nothing(case):
    model = small_model()
    opt = gramopt.GaussNewton(model, damping=1e-3, momentum=0.5)
    x, xb = points(6), points(3, 1)
    opt.step(lambda: [model(x), model(xb)])  # a first step: the shapes [6, 1], [3, 1] and a momentum buffer
    match, closure, error = list(bad_closures(model))[case]
    before, state = params_vector(model), copy.deepcopy(opt.state_dict())
    info = opt.last_info
    with pytest.raises(error, match=match):
        opt.step(closure)
    unchanged(opt, model, before, state)
    assert opt.last_info is info


def test_a_shape_change_during_the_line_search_restores_the_parameters():
    model = small_model()
    x = points(6)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return model(x if len(calls) < 3 else x[:4])[:, 0]

    opt = gramopt.GaussNewton(model, damping=1e-3)
    before, state = params_vector(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.step(closure)
    unchanged(opt, model, before, state)


def test_groups_on_another_device_or_dtype_are_refused():
    model = small_model()
    x = points(6)
    opt = gramopt.GaussNewton(model)
    with pytest.raises(ValueError, match="dtype and device"):
        opt.step(lambda: [model(x)[:, 0], model(x.float().double())[:, 0].to(torch.float32)])
    with pytest.raises(ValueError, match="\\[N\\] or \\[N, k\\]"):
        opt.step(lambda: model(x)[:0, 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(damping=-1e-3), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(momentum=1.0), "momentum"),
        (dict(line_search="wolfe"), "line_search"),
        (dict(line_search_trials=0), "line_search_trials"),
        (dict(solver="qr"), "solver"),
        (dict(jacobian="forward"), "jacobian"),
        (dict(unsupported="gradient"), "unsupported"),
        (dict(check_every=0), "check_every"),
        (dict(space="dual"), "space"),
        (dict(max_update_norm=0.0), "max_update_norm"),
        (dict(solver="cg", solver_options={"rank": 3}), "rank"),
        (dict(solver_options={"tol": 1e-6}), "solver_options"),
    ],
)
def test_bad_hyper_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gramopt.GaussNewton(small_model(), **kwargs)


def test_param_groups_must_share_damping_and_a_bad_change_changes_nothing():
    model = small_model()
    rest = list(model[2].parameters()) + list(model[4].parameters())
    groups = [{"params": list(model[0].parameters())}, {"params": rest}]
    opt = gramopt.GaussNewton(model, params=groups, damping=1e-3)
    closure = pinn_closure(model, 8, 4)
    opt.param_groups[1]["damping"] = 1e-2
    before, state = params_vector(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="same damping"):
        opt.step(closure)
    unchanged(opt, model, before, state)


def test_state_dict_round_trip_is_exact():
    def run(model, opt, closure, steps):
        return [float(opt.step(closure)) for _ in range(steps)]

    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    opt = gramopt.GaussNewton(model, damping=1e-3, momentum=0.5, solver="nystrom-pcg", check_every=2)
    run(model, opt, closure, 2)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    first = run(model, opt, closure, 3) + [params_vector(model)]

    twin = small_model(width=6)
    twin.load_state_dict(weights)
    twin_opt = gramopt.GaussNewton(twin, damping=1.0, solver="nystrom-pcg", check_every=2)
    twin_opt.load_state_dict(saved)
    assert twin_opt.steps_taken == 2
    assert torch.equal(twin_opt.state_dict()["gramopt"]["previous"], saved["gramopt"]["previous"])
    second = run(twin, twin_opt, pinn_closure(twin, 8, 4), 3) + [params_vector(twin)]
    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3])


def test_lr_schedulers_scale_the_step():
    model = small_model(width=6)
    twin = copy.deepcopy(model)
    closure, twin_closure = pinn_closure(model, 8, 4), pinn_closure(twin, 8, 4)
    opt = gramopt.GaussNewton(model, lr=1.0, damping=1e-3, line_search=None)
    reference = gramopt.GaussNewton(twin, lr=1.0, damping=1e-3, line_search=None)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        before, twin_before = params_vector(model), params_vector(twin)
        opt.step(closure)
        scheduler.step()
        reference.step(twin_closure)
        assert opt.last_info.lr_taken == 0.5**step
        # the same direction (same point), scaled by the scheduler's lr
        torch.testing.assert_close(params_vector(model) - before, 0.5**step * (params_vector(twin) - twin_before))
        with torch.no_grad():  # move the twin to the model's point for the next comparison
            for p, q in zip(twin.parameters(), model.parameters(), strict=True):
                p.copy_(q)


@pytest.mark.filterwarnings("ignore::gramopt.NumericalWarning")  # (the jitter the undamped float32 Gram needs)
def test_float32_with_a_tiny_damping_warns():
    model = small_model().float()
    with pytest.warns(RuntimeWarning, match="float64"):
        opt = gramopt.GaussNewton(model)  # damping 1e-10
    x = points(6, dtype=torch.float32)
    opt.step(lambda: model(x)[:, 0])
    assert opt.last_info.loss_after is not None
    with pytest.warns(RuntimeWarning, match="float64"):
        gramopt.GaussNewton(small_model().float(), damping=1e-12)


def test_step_needs_a_closure_and_backward_is_not_the_way():
    model = small_model()
    opt = gramopt.GaussNewton(model)
    with pytest.raises(TypeError, match="residuals"):
        opt.step()
    with pytest.raises(TypeError, match="residuals"):
        opt.backward(model(points(3)), torch.zeros(3, 1, dtype=DT))
    opt.close()
    with pytest.raises(gramopt.CaptureError, match="closed"):
        opt.step(lambda: model(points(3))[:, 0])


def test_step_returns_the_loss_before_the_step_as_a_tensor():
    model = small_model()
    x = points(6)
    opt = gramopt.GaussNewton(model, damping=1e-3)
    expected = 0.5 * model(x).detach().pow(2).sum()
    loss = opt.step(lambda: model(x))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    info = opt.last_info
    assert info.step == 1 and info.rows == 6 and info.loss == float(expected) and info.damping == 1e-3
    assert info.loss_after == min(info.trials) and len(info.trials) == opt.line_search_trials == 16
