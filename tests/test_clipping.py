"""Clipping: ``max_update_norm`` clips the direction of every method; clip_grad_norm_ on
``.grad`` takes effect where the step reads ``.grad`` (SENG) and is warned about where
the method ignores it (FNGD, GGN: their step comes from the captured rows; in the
uniform loop their backward fills that ``.grad`` until the first step succeeds, for this
check), in both training loops: never silently nothing."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
from gramopt.errors import CaptureError
from optim_cases import LOSS_FUNCTIONS, REPRESENTATIVE, OptimizerCase


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _make(method: str, model: nn.Module, **kwargs):
    cls = {"ggn": gramopt.GGN, "seng": gramopt.SENG, "fngd": gramopt.FNGD}[method]
    return cls(model, lr=0.5, damping=0.1, loss="cross_entropy", **kwargs)


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (8,), generator=generator)


def _delta(model: nn.Module, before: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(model.parameters(), before, strict=True)])


@pytest.mark.parametrize("method", ["ggn", "seng", "fngd"])
def test_max_update_norm_clips_the_direction(method):
    x, y = _data()
    free, clipped = _model(), _model()
    opt_free, opt_clipped = _make(method, free), _make(method, clipped, max_update_norm=0.01)
    deltas = []
    for model, opt in ((free, opt_free), (clipped, opt_clipped)):
        before = [p.detach().clone() for p in model.parameters()]
        opt.backward(model(x), y)
        opt.step()
        deltas.append(_delta(model, before))
    lr = 0.5
    assert deltas[0].norm() > 0.01 * lr * 1.5  # the free step is longer than the bound
    torch.testing.assert_close(deltas[1].norm(), torch.tensor(0.01 * lr, dtype=torch.float64), rtol=1e-9, atol=0)
    cosine = deltas[0] @ deltas[1] / (deltas[0].norm() * deltas[1].norm())
    assert cosine == pytest.approx(1.0, abs=1e-9)  # same direction, shorter


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "1"])
def test_max_update_norm_is_validated(value):
    with pytest.raises(ValueError, match="max_update_norm"):
        _make("seng", _model(), max_update_norm=value)


def test_clip_grad_norm_takes_effect_for_seng():
    x, y = _data()
    free, clipped = _model(), _model()
    deltas = []
    for model, clip in ((free, False), (clipped, True)):
        opt = _make("seng", model)
        before = [p.detach().clone() for p in model.parameters()]
        F.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        deltas.append(_delta(model, before))
    assert deltas[1].norm() < 0.1 * deltas[0].norm()


def test_clip_grad_norm_where_ignored_is_warned_about():
    """FNGD's ordinary loop fills .grad, but its step comes from the captured rows."""
    x, y = _data()
    model = _model()
    opt = _make("fngd", model)
    F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.warns(RuntimeWarning, match=r"\.grad of 0\.weight.*clip.*max_update_norm"):
        opt.step()
    # unmodified .grad: no warning (zero_grad drops a backward's captures, as its .grad)
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    ("loss", "curvature"), [("cross_entropy", "top"), ("cross_entropy", "sampled"), ("mse", "exact")]
)
def test_ggn_first_step_fills_grad_and_its_clipping_is_warned_about(loss, curvature):
    """GGN's step ignores .grad of the layers it preconditions; until its first step,
    backward fills it (the gradient of the mean loss, checked against torch.func) so that
    clip_grad_norm_ on it is reported; later steps leave it empty (filling it every step
    would cost 10-30% of one)."""
    x, y = _data()
    if loss == "mse":
        y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = _model()
    names = [name for name, _ in model.named_parameters()]
    mean_loss = F.cross_entropy if loss == "cross_entropy" else F.mse_loss

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return mean_loss(torch.func.functional_call(model, params, (x,)), y)

    reference = torch.func.grad(loss_of)({n: p.detach() for n, p in model.named_parameters()})
    opt = gramopt.GGN(
        model, lr=0.5, damping=0.1, loss=loss, curvature=curvature, **({"seed": 0} if curvature == "sampled" else {})
    )
    opt.backward(model(x), y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-10, atol=1e-12)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.warns(RuntimeWarning, match=r"\.grad of 0\.weight.*GGN.*max_update_norm") as record:
        opt.step()
    assert record[0].filename == __file__  # it points at the user's opt.step(), not into torch
    opt.zero_grad()
    opt.backward(model(x), y)
    assert all(p.grad is None for p in model.parameters()), names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_ggn_first_step_grad_under_accumulation_and_unmodified_grad_is_quiet():
    """Micro-batches of the first step: .grad is the mean loss's over their concatenation
    (as plain-gradient parameters'), clipping it is reported; an unmodified one is not."""
    x, y = _data()
    model, whole = _model(), _model()
    F.cross_entropy(whole(x), y).backward()
    opt = gramopt.GGN(model, lr=0.5, damping=0.1, loss="cross_entropy", damping_adaptation=None)
    opt.backward(model(x[:3]), y[:3])
    opt.backward(model(x[3:]), y[3:])
    for p, q in zip(model.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.warns(RuntimeWarning, match=r"\.grad of 0\.weight.*GGN"):
        opt.step()
    quiet = gramopt.GGN(_model(), lr=0.5, damping=0.1, loss="cross_entropy", damping_adaptation=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.backward(quiet.model(x), y)
        quiet.step()


def test_zero_grad_drops_the_captures_of_earlier_backward_passes():
    """A backward, zero_grad, then a forward/backward: the step is that of the last batch."""
    x, y = _data()
    once, twice = _model(), _model()
    opt_once, opt_twice = _make("fngd", once), _make("fngd", twice)
    F.cross_entropy(twice(x[:3]), y[:3]).backward()
    out = twice(x)
    opt_twice.zero_grad()  # between forward and backward: that forward is kept
    F.cross_entropy(out, y).backward()
    opt_twice.step()
    F.cross_entropy(once(x), y).backward()
    opt_once.step()
    for p, q in zip(once.parameters(), twice.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


MODIFIED = r"\.grad of .* was modified after backward"
CONTRACT = [
    dataclasses.replace(case, loop=loop, id=f"{case.id.removesuffix('-ordinary')}-{loop}")
    for case in REPRESENTATIVE
    for loop in ("uniform", "ordinary")
]


def _first_step(
    case: OptimizerCase, clip: bool
) -> tuple[list[torch.Tensor], list[bool], list[warnings.WarningMessage]]:
    """One step of ``case`` in its loop on a fixed float64 batch, ``clip_grad_norm_`` on
    every ``.grad`` between backward and step if ``clip``: the update of each parameter,
    whether the method preconditions it, and the step's warnings."""
    torch.manual_seed(0)
    model = case.build_model(torch.float64)
    opt = case.make(model)
    x, y = case.data(torch.Generator().manual_seed(1), dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    if case.loop == "uniform":
        opt.backward(model(x), y)
    else:
        LOSS_FUNCTIONS[case.loss](model(x), y).backward()
    if clip:
        assert any(p.grad is not None for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    layers = {id(p) for layer in opt.engine.layers for p in layer.params}
    updates = [p.detach() - q for p, q in zip(model.parameters(), before, strict=True)]
    return updates, [id(p) in layers for p in model.parameters()], list(caught)


@pytest.mark.parametrize("case", CONTRACT, ids=lambda c: c.id)
def test_clip_grad_norm_after_backward_changes_the_step_or_is_warned_about(case):
    """The contract of every method in both loops: clipping ``.grad`` between backward and
    step either changes the step (a method whose step reads ``.grad``) or warns that the
    step ignores it, whose preconditioned layers then take the unclipped step; a loop the
    method does not support is refused, changing nothing. Never silently nothing."""
    if case.loop not in case.method.loops:
        torch.manual_seed(0)
        model = case.build_model(torch.float64)
        opt = case.make(model)
        x, y = case.data(torch.Generator().manual_seed(1), dtype=torch.float64)
        before = [p.detach().clone() for p in model.parameters()]
        LOSS_FUNCTIONS[case.loss](model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-4)
        with pytest.raises(CaptureError, match=r"needs opt\.backward"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (GGN also warns that its step would ignore the clipped .grad)
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        return
    free, _, quiet = _first_step(case, clip=False)
    clipped, preconditioned, caught = _first_step(case, clip=True)
    assert not [w for w in quiet if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in quiet]
    warned = [w for w in caught if issubclass(w.category, RuntimeWarning) and re.search(MODIFIED, str(w.message))]
    changed = [
        i for i, (a, b) in enumerate(zip(free, clipped, strict=True)) if not torch.allclose(a, b, rtol=1e-6, atol=1e-12)
    ]
    assert warned or changed, "clipping .grad changed nothing and was not warned about"
    if case.method.reads_grad:
        assert not warned and any(preconditioned[i] for i in changed)
        norm = lambda updates: torch.cat([u.reshape(-1) for u in updates]).norm()  # noqa: E731
        assert norm(clipped) < 0.5 * norm(free)
    else:
        assert len(warned) == 1 and warned[0].filename == __file__  # at the user's opt.step()
        assert case.cls.__name__ in str(warned[0].message) and "max_update_norm" in str(warned[0].message)
        for i, is_layer in enumerate(preconditioned):
            if is_layer:  # the step ignores their .grad: the unclipped step
                torch.testing.assert_close(clipped[i], free[i], rtol=0, atol=0)
