"""FNGD (papers/003_*) against dense float64 references built with torch.func
(tests/reference.py): one step, trajectories from estimation into sharing (with short
batches), both training loops, state, validation and failure handling."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
import models
from gramopt.capture.conv import ConvFactors
from gramopt.capture.shared_weight import SharedWeightFactors
from gramopt.optim.fngd import fngd_coefficients, share_coefficients
from reference import fngd_directions, fngd_trajectory, fngd_v, params_vector

CASES = {
    "mlp": (lambda: models.mlp(out=3), lambda b: torch.randn(b, 5)),
    "cnn": (lambda: models.cnn(out=3), lambda b: torch.randn(b, 1, 8, 8)),
    "transformer": (lambda: models.TinyTransformer(out=3), lambda b: torch.randint(0, 11, (b, 5))),
}


def batch(name: str, b: int, loss: str = "cross_entropy") -> tuple[torch.Tensor, torch.Tensor]:
    x = CASES[name][1](b)
    return x, torch.randint(0, 3, (b,)) if loss == "cross_entropy" else torch.randn(b, 3)


def expected_delta(model: nn.Module, x, y, loss: str, lr: float, damping: float) -> torch.Tensor:
    model = copy.deepcopy(model)  # the reference never runs the optimizer's hooks
    directions, _ = fngd_directions(model, x, y, loss, damping)
    return -lr * torch.cat([directions[id(p)].reshape(-1) for p in model.parameters() if p.requires_grad])


def uniform_step(opt: gramopt.FNGD, model: nn.Module, x, y) -> torch.Tensor:
    opt.zero_grad()
    loss = opt.backward(model(x), y)
    opt.step()
    return loss


def ordinary_step(opt: gramopt.FNGD, model: nn.Module, x, y, loss: str = "cross_entropy") -> None:
    opt.zero_grad()
    fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    fn(model(x), y).backward()
    opt.step()


# -- the coefficients ---------------------------------------------------------------------
def test_coefficients_follow_eq9_and_are_scale_invariant(float64):
    u = torch.randn(7, 30)
    expected = fngd_v(u, 0.02)
    torch.testing.assert_close(fngd_coefficients(u @ u.T, 0.02), expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fngd_coefficients(1e-6 * u @ u.T, 0.02), expected, rtol=1e-10, atol=1e-14)
    # strong damping: the plain mean gradient's weights 1/M; a zero Gram gives that limit
    torch.testing.assert_close(fngd_coefficients(u @ u.T, 1e6), torch.full((7,), 1 / 7), rtol=1e-6, atol=0)
    torch.testing.assert_close(fngd_coefficients(torch.zeros(7, 7), 0.02), torch.full((7,), 1 / 7))


def test_shared_coefficients_for_other_batch_sizes(float64):
    """v = (1 - c)/M becomes (1 - c[i mod M])/M': first M' entries (short batch) or
    repeated entries (longer batch), rescaled by M/M'."""
    mean = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert share_coefficients(mean, 4) is mean
    torch.testing.assert_close(share_coefficients(mean, 2), torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(share_coefficients(mean, 6), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.1, 0.2]) * 4 / 6)
    c = 1 - 4 * mean  # the corrections
    torch.testing.assert_close(share_coefficients(mean, 3), (1 - c[:3]) / 3)


# -- steps against the dense reference ------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_one_step_matches_dense_reference(name, loss, float64):
    model = CASES[name][0]()
    x, y = batch(name, 6, loss)
    expected = expected_delta(model, x, y, loss, lr=0.3, damping=0.05)
    before = params_vector(model)
    opt = gramopt.FNGD(model, lr=0.3, damping=0.05, loss=loss)
    uniform_step(opt, model, x, y)
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-9, atol=1e-12)
    assert opt.last_info.step == 1 and math.isfinite(opt.last_info.loss)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_from_estimation_into_sharing(name, float64):
    """T = 3 estimation steps (one of them a short batch: applied, not averaged), then
    sharing, with short and long batches in the sharing phase."""
    model = CASES[name][0]()
    reference = copy.deepcopy(model)
    sizes = [6, 6, 4, 6, 4, 8, 6]
    batches = [batch(name, b) for b in sizes]
    history = fngd_trajectory(reference, batches, "cross_entropy", lr=0.4, damping=0.03, steps=3)
    opt = gramopt.FNGD(model, lr=0.4, damping=0.03, coefficient_steps=3)
    phases = []
    for (x, y), expected in zip(batches, history, strict=True):
        phases.append(opt.phase)
        uniform_step(opt, model, x, y)
        torch.testing.assert_close(params_vector(model), expected, rtol=1e-9, atol=1e-12)
    assert phases == ["estimate"] * 3 + ["share"] * 4
    assert opt.extra_state["coefficient_batch"] == 6
    assert set(opt.extra_state["coefficient_counts"].values()) == {2}


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_loops_give_identical_steps(name, float64):
    """opt.backward(model(x), y) and loss.backward() (mean loss) give bit-identical steps,
    through estimation and sharing, with momentum and weight decay."""
    uniform_model = CASES[name][0]()
    ordinary_model = copy.deepcopy(uniform_model)
    settings = dict(lr=0.2, damping=0.02, momentum=0.9, weight_decay=0.01, coefficient_steps=2)
    uniform = gramopt.FNGD(uniform_model, **settings)
    ordinary = gramopt.FNGD(ordinary_model, **settings)
    for b in (5, 5, 5, 3):
        x, y = batch(name, b)
        uniform_step(uniform, uniform_model, x, y)
        ordinary_step(ordinary, ordinary_model, x, y)
        for p, q in zip(uniform_model.parameters(), ordinary_model.parameters(), strict=True):
            assert torch.equal(p, q)


def test_momentum_and_weight_decay_decorate_the_direction(float64):
    model = models.mlp(out=3)
    lr, momentum, decay = 0.3, 0.9, 0.1
    opt = gramopt.FNGD(model, lr=lr, damping=0.05, momentum=momentum, weight_decay=decay, weight_decay_mode="decoupled")
    buffer = None
    for _ in range(3):
        x, y = batch("mlp", 6)
        direction = -expected_delta(model, x, y, "cross_entropy", lr=1.0, damping=0.05)
        before = params_vector(model)
        buffer = direction if buffer is None else momentum * buffer + direction
        uniform_step(opt, model, x, y)
        torch.testing.assert_close(params_vector(model), before * (1 - lr * decay) - lr * buffer, rtol=1e-9, atol=1e-12)


def test_float32_model_matches_float64_reference():
    model = models.cnn(out=3)
    x, y = batch("cnn", 16)
    reference = copy.deepcopy(model).double()
    expected = expected_delta(reference, x.double(), y, "cross_entropy", lr=0.5, damping=0.01)
    before = params_vector(model)
    opt = gramopt.FNGD(model, lr=0.5, damping=0.01)
    uniform_step(opt, model, x, y)
    torch.testing.assert_close((params_vector(model) - before).double(), expected, rtol=1e-4, atol=1e-6)


# -- what the two phases compute ------------------------------------------------------------
def test_sharing_phase_builds_no_gram_no_solve_no_per_sample_gradients(float64, monkeypatch):
    model = models.cnn(out=3)
    opt = gramopt.FNGD(model, lr=0.1, damping=0.05, coefficient_steps=1)
    uniform_step(opt, model, *batch("cnn", 4))

    def forbidden(*args, **kwargs):
        raise AssertionError("the sharing phase must not build a Gram, solve, form U or unfold")

    monkeypatch.setattr(SharedWeightFactors, "gram", forbidden)
    monkeypatch.setattr(SharedWeightFactors, "_form_rows", forbidden)
    monkeypatch.setattr(ConvFactors, "_form_rows", forbidden)
    monkeypatch.setattr(ConvFactors, "inputs", property(forbidden))
    monkeypatch.setattr("gramopt.optim.fngd.solve_damped_psd", forbidden)
    before = params_vector(model)
    uniform_step(opt, model, *batch("cnn", 4))
    assert not torch.equal(params_vector(model), before)


def test_backward_fills_grad_of_plain_parameters_and_of_the_layers_until_the_first_step(float64):
    """Norm and embedding parameters get the mean-loss gradient in .grad (what their
    step uses); Linear/Conv layers get it until the first step succeeds (so that the step
    warns when it was clipped, as in the ordinary loop), no weight gradients after it."""
    model = models.TinyTransformer(out=3)
    x, y = batch("transformer", 5)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    opt = gramopt.FNGD(model, lr=0.1, damping=0.05)
    opt.zero_grad()
    opt.backward(model(x), y)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    opt.step()
    reference.load_state_dict(model.state_dict())  # the parameters after the step
    reference.zero_grad()
    F.cross_entropy(reference(x), y).backward()
    opt.zero_grad()
    opt.backward(model(x), y)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if name.startswith(("embed", "norm")):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        else:
            assert p.grad is None, name


def test_layers_not_hooked_take_plain_gradient_without_unsupported_flag(float64):
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    expected = expected_delta(model, x, y, "cross_entropy", lr=0.5, damping=0.1)
    before = params_vector(model)
    opt = gramopt.FNGD(model, lr=0.5, damping=0.1)
    uniform_step(opt, model, x, y)
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-9, atol=1e-12)


# -- state ----------------------------------------------------------------------------------
@pytest.mark.parametrize("save_at", [1, 3])
def test_state_dict_round_trip_bit_for_bit(save_at, float64):
    """Saved mid-estimation (1) or in the sharing phase (3), a fresh optimizer continues
    exactly as the original."""
    model = models.TinyTransformer(out=3)
    settings = dict(lr=0.2, damping=0.02, momentum=0.9, coefficient_steps=2)
    opt = gramopt.FNGD(model, **settings)
    batches = [batch("transformer", b) for b in (6, 6, 4, 6, 6)]
    for x, y in batches[:save_at]:
        uniform_step(opt, model, x, y)
    state = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    other = gramopt.FNGD(clone, **settings)
    other.load_state_dict(state)
    assert other.steps_taken == save_at and other.phase == opt.phase
    for x, y in batches[save_at:]:
        uniform_step(opt, model, x, y)
        uniform_step(other, clone, x, y)
        for p, q in zip(model.parameters(), clone.parameters(), strict=True):
            assert torch.equal(p, q)
    saved = opt.state_dict()["gramopt"]
    assert saved["coefficient_counts"] == {name: 2 for name in saved["coefficients"]}


# -- bad input ------------------------------------------------------------------------------
def _snapshot(model: nn.Module, opt: gramopt.FNGD):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snapshot):
    params, state = snapshot
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["gramopt"].keys() == state["gramopt"].keys()
    assert now["gramopt"]["step"] == state["gramopt"]["step"]
    for name, v in state["gramopt"]["coefficients"].items():
        assert torch.equal(now["gramopt"]["coefficients"][name], v)
    assert now["gramopt"]["coefficient_counts"] == state["gramopt"]["coefficient_counts"]
    for key, value in state["state"].items():
        assert torch.equal(now["state"][key]["momentum_buffer"], value["momentum_buffer"])


@pytest.mark.parametrize("phase_steps", [0, 2])
def test_non_finite_loss_changes_nothing(phase_steps, float64):
    """In estimation (0 steps before) and sharing (2 steps before, T = 1): a NaN input
    gives a clear error in both loops, and parameters and state stay as they were."""
    model = models.cnn(out=3)
    opt = gramopt.FNGD(model, lr=0.1, damping=0.05, momentum=0.9, coefficient_steps=1)
    for _ in range(phase_steps):
        uniform_step(opt, model, *batch("cnn", 4))
    snapshot = _snapshot(model, opt)
    x, y = batch("cnn", 4)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(gramopt.NonFiniteError, match="loss"):
        uniform_step(opt, model, x, y)
    _assert_unchanged(model, opt, snapshot)
    with pytest.raises(gramopt.NonFiniteError, match="NaN or inf"):
        ordinary_step(opt, model, x, y)
    _assert_unchanged(model, opt, snapshot)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stale factors left behind
        uniform_step(opt, model, *batch("cnn", 4))
    assert opt.steps_taken == phase_steps + 1


def test_step_without_backward_is_a_clear_error():
    model = models.mlp(out=3)
    opt = gramopt.FNGD(model, lr=0.1, damping=0.01)
    with pytest.raises(gramopt.CaptureError, match="backward"):
        opt.step()


def test_frozen_weight_and_param_groups(float64):
    """A layer with a frozen weight is a bias-only block; param groups scale their part."""
    model = models.mlp(out=3)
    model[0].weight.requires_grad_(False)
    x, y = batch("mlp", 6)
    expected = expected_delta(model, x, y, "cross_entropy", lr=1.0, damping=0.05)
    trainable = [p for p in model.parameters() if p.requires_grad]
    first, rest = trainable[:1], trainable[1:]
    before = params_vector(model)
    opt = gramopt.FNGD(model, lr=1.0, damping=0.05, params=[{"params": first, "lr": 0.5}, {"params": rest, "lr": 2.0}])
    uniform_step(opt, model, x, y)
    delta = params_vector(model) - before
    n_first = first[0].numel()
    torch.testing.assert_close(delta[:n_first], 0.5 * expected[:n_first], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(delta[n_first:], 2.0 * expected[n_first:], rtol=1e-9, atol=1e-12)


def test_step_with_closure(float64):
    model = models.mlp(out=3)
    x, y = batch("mlp", 6)
    expected = expected_delta(model, x, y, "cross_entropy", lr=0.3, damping=0.05)
    opt = gramopt.FNGD(model, lr=0.3, damping=0.05)
    before = params_vector(model)

    def closure():
        opt.zero_grad()
        return opt.backward(model(x), y)

    loss = opt.step(closure)
    assert math.isfinite(float(loss))
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-9, atol=1e-12)


def test_layer_first_used_in_the_sharing_phase_takes_the_plain_gradient(float64):
    """A layer that took no part in estimation has no shared coefficients: its step in
    the sharing phase is the plain mean gradient (weights 1/M)."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(5, 6)
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)
            self.use_b = False

        def forward(self, x):
            h = torch.tanh(self.body(x))
            return self.b(h) if self.use_b else self.a(h)

    model = TwoHeads()
    opt = gramopt.FNGD(model, lr=0.3, damping=0.05, coefficient_steps=1)
    uniform_step(opt, model, torch.randn(6, 5), torch.randint(0, 3, (6,)))
    assert set(opt.extra_state["coefficients"]) == {"body", "a"}
    model.use_b = True
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    reference = copy.deepcopy(model)
    expected = torch.autograd.grad(F.cross_entropy(reference(x), y), [reference.b.weight, reference.b.bias])
    before = [model.b.weight.detach().clone(), model.b.bias.detach().clone()]
    uniform_step(opt, model, x, y)
    torch.testing.assert_close(model.b.weight.detach(), before[0] - 0.3 * expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.b.bias.detach(), before[1] - 0.3 * expected[1], rtol=1e-10, atol=1e-12)
