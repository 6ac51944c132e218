"""The optimizer contract, for every case of optim_cases.CASES: state_dict round trips bit
for bit, param groups and LR schedulers, frozen and unused parameters, determinism,
hooks' lifetime, failed steps that change nothing, eval mode."""

from __future__ import annotations

import copy
import gc
import io
import math
import weakref

import pytest
import torch
from torch import nn

import gramopt
from optim_cases import (
    CASES,
    assert_same_params,
    first_module_params,
    hook_count,
    ids,
    last_module_params,
    snapshot,
    two_groups,
)

each_case = pytest.mark.parametrize("case", CASES, ids=ids)


def _transport(state: dict, how: str) -> dict:
    if how == "deepcopy":
        return copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@each_case
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_state_dict_round_trip_in_lockstep(case, how):
    """After 2 steps, a fresh optimizer on cloned parameters loads the state and the two run
    10 more steps in lockstep, bitwise equal (curvature caches, shared coefficients, sketch
    generators, momentum: everything is in the state)."""
    model = case.build_model()
    opt = case.make(model)
    data = case.batches(12)
    for x, y in data[:2]:
        case.step(opt, model, x, y)
    state = _transport(opt.state_dict(), how)
    twin = case.build_model()
    twin.load_state_dict(model.state_dict())
    other = case.make(twin)
    other.load_state_dict(state)
    assert other.steps_taken == 2
    for x, y in data[2:]:
        case.step(opt, model, x, y)
        case.step(other, twin, x, y)
        assert_same_params(model, twin)
    assert opt.steps_taken == other.steps_taken == 12


@each_case
def test_param_groups_scale_their_part_of_the_step(case):
    """Two groups (the first layer, the rest) with lr and 3 lr: the first group moves as
    with lr alone, the second three times as far (momentum and weight decay included)."""
    torch.set_default_dtype(torch.float64)
    model = case.build_model(torch.float64)
    twin = copy.deepcopy(model)
    x, y = case.batches(1, dtype=torch.float64)[0]
    lr = case.kwargs["lr"]
    deltas = []
    for m, scale in ((model, 1.0), (twin, 3.0)):
        opt = case.make(m, params=two_groups(m, lr=scale * lr))
        before = snapshot(m)
        case.step(opt, m, x, y)
        deltas.append([p.detach() - b for p, b in zip(m.parameters(), before, strict=True)])
    n_first = len(first_module_params(model))
    for i, (d1, d3) in enumerate(zip(*deltas, strict=True)):
        expected = d1 if i < n_first else 3 * d1
        torch.testing.assert_close(d3, expected, rtol=1e-9, atol=1e-15)
        assert d1.abs().max() > 0


@each_case
def test_group_with_lr_zero_from_a_scheduler_is_unchanged(case):
    """gramopt refuses lr <= 0 when given (almost surely a mistake) but a scheduler may set
    it (a warmup from 0, a cosine down to 0): that group is left exactly unchanged, the
    others move, and the state_dict (lr = 0 in it) loads."""
    model = case.build_model()
    first = first_module_params(model)
    opt = case.make(model, params=two_groups(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [lambda step: 1.0, lambda step: 0.0])
    assert opt.param_groups[1]["lr"] == 0.0
    before = snapshot(model)
    for x, y in case.batches(3):
        case.step(opt, model, x, y)
        scheduler.step()
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert moved[: len(first)] == [True] * len(first)
    assert not any(moved[len(first) :])
    with pytest.raises(ValueError, match="lr must be > 0"):
        case.make(copy.deepcopy(model), lr=0.0)
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    other = case.make(twin, params=two_groups(twin))
    other.load_state_dict(state)
    assert other.param_groups[1]["lr"] == 0.0


@each_case
def test_group_with_tiny_lr_is_unchanged(case):
    """The smallest lr a constructor takes, 1e-30: the group's parameters move by at most
    1e-30 |d| (nothing, in float32, for any entry not exactly 0)."""
    model = case.build_model()
    first = first_module_params(model)
    opt = case.make(model, params=two_groups(model, lr=1e-30))
    before = snapshot(model)
    for x, y in case.batches(3):
        case.step(opt, model, x, y)
    for i, (p, b) in enumerate(zip(model.parameters(), before, strict=True)):
        if i < len(first):
            assert not torch.equal(p, b)
        else:
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-20)


class WithSpare(nn.Module):
    """The case's model with a Linear layer that forward never uses."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@each_case
@pytest.mark.parametrize("when", ["frozen, then given explicitly", "frozen after construction"])
def test_frozen_and_unused_parameters_are_untouched(case, when):
    """A frozen bias (of the output layer, whose weight still trains) and a layer without
    gradients keep their values, and the other parameters follow exactly the trajectory of
    an optimizer built without them. (Freezing changes no choice made at construction,
    such as SENG's implicit layers, which are chosen by their trainable size.)"""
    reference = WithSpare(case.build_model())
    model = copy.deepcopy(reference)
    frozen = last_module_params(model.inner)[-1]
    last_module_params(reference.inner)[-1].requires_grad_(False)
    ref_opt = case.make(reference)  # default params: the trainable ones
    if when == "frozen after construction":
        opt = case.make(model)
        frozen.requires_grad_(False)
    else:
        frozen.requires_grad_(False)
        opt = case.make(model, params=list(model.parameters()))  # as torch.optim users do
    frozen_before, spare_before = frozen.detach().clone(), snapshot(model.spare)
    for x, y in case.batches(4):
        case.step(opt, model, x, y)
        case.step(ref_opt, reference, x, y)
        assert_same_params(model, reference)
    assert torch.equal(frozen, frozen_before)
    assert all(torch.equal(p, b) for p, b in zip(model.spare.parameters(), spare_before, strict=True))
    assert frozen.grad is None


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "LambdaLR-warmup": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 3)),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * opt.defaults["lr"], total_steps=7),
}


@each_case
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers(case, name, recwarn):
    """A scheduler's lr (and OneCycleLR's momentum) is what each step uses: the run equals
    a twin whose groups are set by hand; optimizer and scheduler states together resume
    the run exactly; torch sees every step (no 'lr_scheduler.step() before
    optimizer.step()' warning)."""
    model = case.build_model()
    twin, resumed_model = copy.deepcopy(model), copy.deepcopy(model)
    opt, other = case.make(model), case.make(twin)
    scheduler = SCHEDULERS[name](opt)
    data = case.batches(6)
    lrs = []
    for t, (x, y) in enumerate(data):
        for group, mine in zip(other.param_groups, opt.param_groups, strict=True):
            group["lr"], group["momentum"] = mine["lr"], mine["momentum"]
        lrs.append(opt.param_groups[0]["lr"])
        case.step(opt, model, x, y)
        case.step(other, twin, x, y)
        scheduler.step()
        assert_same_params(model, twin)
        if t == 2:
            states = copy.deepcopy((opt.state_dict(), scheduler.state_dict()))
            resumed_model.load_state_dict(model.state_dict())
    resumed = case.make(resumed_model)
    resumed_scheduler = SCHEDULERS[name](resumed)
    resumed.load_state_dict(states[0])
    resumed_scheduler.load_state_dict(states[1])
    for x, y in data[3:]:
        case.step(resumed, resumed_model, x, y)
        resumed_scheduler.step()
    assert_same_params(model, resumed_model)
    assert len(set(lrs)) > 1
    if name == "StepLR":
        assert lrs == [case.kwargs["lr"] * 0.5 ** (t // 2) for t in range(6)]
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]


def _losses(case, seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = case.build_model()
    opt = case.make(model)
    return [case.step(opt, model, x, y) for x, y in case.batches(4, seed=seed)]


@each_case
def test_determinism(case):
    """The same seed twice gives identical losses; another seed different ones."""
    first = _losses(case, 0)
    assert _losses(case, 0) == first
    assert _losses(case, 1) != first
    assert all(math.isfinite(v) for v in first)


@each_case
def test_close_removes_every_hook(case):
    model = case.build_model()
    base = hook_count(model)
    opt = case.make(model)
    assert hook_count(model) > base
    x, y = case.batches(1)[0]
    case.step(opt, model, x, y)
    opt.close()
    assert hook_count(model) == base
    with pytest.raises(gramopt.CaptureError, match="closed"):
        case.step(opt, model, x, y)


@each_case
def test_deletion_removes_every_hook(case):
    """Garbage collection of the optimizer (with a scheduler attached) removes its hooks;
    nothing keeps it alive."""
    model = case.build_model()
    base = hook_count(model)
    opt = case.make(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    for x, y in case.batches(2):
        case.step(opt, model, x, y)
        scheduler.step()
    alive = weakref.ref(opt)
    del opt, scheduler
    gc.collect()
    assert alive() is None
    assert hook_count(model) == base


class Bomb(nn.Module):
    """Raises in the forward pass while armed: an exception after the first layers'
    hooks have run."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.armed:
            raise RuntimeError("boom in the forward pass")
        return out


def _failures(case):
    yield "forward raises", RuntimeError, "boom"
    if case.float_inputs:
        yield "nan input", gramopt.NonFiniteError, "NaN or inf|loss is nan"
        yield "inf input", gramopt.NonFiniteError, "NaN or inf|loss is nan"


FAILURES = [(case, name, error, match) for case in CASES for name, error, match in _failures(case)]


@pytest.mark.parametrize("case, failure, error, match", FAILURES, ids=[f"{c.id}-{n}" for c, n, _, _ in FAILURES])
def test_failed_step_changes_nothing_and_leaves_no_hooks(failure, case, error, match):
    """An exception in the middle of a step (a forward that raises, a NaN or inf input:
    non-finite loss, output, Gram or direction) leaves parameters and state as they were:
    the following steps are bitwise those of a twin that never saw the bad batch (in the
    sharing phase too); close() then removes every hook."""
    model = Bomb(case.build_model())
    base = hook_count(model)
    twin = copy.deepcopy(model)
    opt, other = case.make(model), case.make(twin)
    data = case.batches(5)
    for x, y in data[:2]:
        case.step(opt, model, x, y)
        case.step(other, twin, x, y)
    x, y = data[2]
    if failure == "forward raises":
        model.armed = True
    else:
        x = x.clone()
        x.view(x.shape[0], -1)[0, 0] = float("nan") if failure == "nan input" else float("inf")
    with pytest.raises(error, match=match):
        case.step(opt, model, x, y)
    model.armed = False
    assert opt.steps_taken == 2
    for x, y in data[2:]:
        case.step(opt, model, x, y)
        case.step(other, twin, x, y)
        assert_same_params(model, twin)
    opt.close()
    assert hook_count(model) == base


@each_case
def test_eval_mode_and_no_grad_capture_nothing(case):
    """Forward passes in eval mode or under no_grad record nothing; a step after an eval
    forward is a clear CaptureError that changes nothing."""
    model = case.build_model()
    opt = case.make(model)
    x, y = case.batches(1)[0]
    with torch.no_grad():
        model(x)
    assert not any(opt.engine._calls.values())
    model.eval()
    before = snapshot(model)
    with pytest.raises(gramopt.CaptureError):
        case.step(opt, model, x, y)
    assert not any(opt.engine._calls.values())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.steps_taken == 0
    model.train()
    case.step(opt, model, x, y)
    assert opt.steps_taken == 1


@pytest.mark.parametrize(
    "cls, lr, damping",
    [(gramopt.SENG, 0.1, 1.0), (gramopt.FNGD, 0.1, 1e-3), (gramopt.GGN, 0.3, 10.0)],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_constructor_defaults_train_a_classifier(cls, lr, damping):
    """``cls(model, loss=...)`` needs no lr or damping (as torch.optim's optimizers): the
    documented defaults (docs/guides/tuning.md's "a good start"), and 60 steps of them
    lower a small classifier's loss (labels of a linear teacher)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(64, 8)
    y = (x @ torch.randn(8, 3)).argmax(1)
    opt = cls(model, loss="cross_entropy")
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["damping"] == damping
    first = float(nn.functional.cross_entropy(model(x), y))
    for _ in range(60):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    assert float(nn.functional.cross_entropy(model(x), y)) < 0.8 * first
