"""Shared pieces changed for FNGD's speed: the multi-tensor update of
SampleSpaceOptimizer.apply_directions and the Cholesky happy path of solve_damped_psd."""

from __future__ import annotations

import pytest
import torch

import gramopt
import models
from gramopt.linalg.dense import solve_damped_psd


def _opt(model, **kwargs):
    return gramopt.FNGD(model, lr=0.5, damping=0.1, **kwargs)


def test_apply_directions_matches_the_per_tensor_formulas(float64):
    model = models.mlp(out=3)
    params = list(model.parameters())
    opt = _opt(model, momentum=0.9, weight_decay=0.1, weight_decay_mode="decoupled")
    first = {p: torch.randn_like(p) for p in params}
    second = {p: torch.randn_like(p) for p in params[:3]}  # a step that leaves some out
    expected = [p.detach().clone() for p in params]
    buffers = [None] * len(params)
    for directions in (first, second):
        for i, p in enumerate(params):
            if p not in directions:
                continue
            d = directions[p]
            expected[i] = expected[i] * (1 - 0.5 * 0.1)
            buffers[i] = d.clone() if buffers[i] is None else 0.9 * buffers[i] + d
            expected[i] = expected[i] - 0.5 * buffers[i]
        with torch.no_grad():
            opt.apply_directions(directions)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    assert opt.steps_taken == 2


def test_apply_directions_refuses_nan_and_accepts_huge_finite():
    """A NaN anywhere: error, nothing changed. Finite entries whose 2-norm overflows
    (the fast check) are told apart by the exact check and applied."""
    model = models.mlp(out=3)
    params = list(model.parameters())
    opt = _opt(model, momentum=0.9)
    before = [p.detach().clone() for p in params]
    bad = {p: torch.zeros_like(p) for p in params}
    bad[params[2]][0, 0] = float("nan")
    with torch.no_grad(), pytest.raises(gramopt.NonFiniteError, match=r"shape \(7, 7\)"):
        opt.apply_directions(bad)
    for p, q in zip(params, before, strict=True):
        assert torch.equal(p, q)
    assert opt.steps_taken == 0 and not opt.state
    huge = {params[0]: torch.full_like(params[0], 1e30)}
    assert not torch.isfinite(torch.linalg.vector_norm(huge[params[0]]))
    with torch.no_grad():
        opt.apply_directions(huge)
    torch.testing.assert_close(params[0].detach(), before[0] - 0.5e30)


@pytest.mark.parametrize("where", ["gram", "rhs"])
def test_solve_reports_non_finite_input(where, float64):
    u = torch.randn(6, 9)
    gram, rhs = u @ u.T, torch.ones(6)
    (gram if where == "gram" else rhs)[2:3].fill_(float("nan"))
    with pytest.raises(gramopt.NonFiniteError, match="right-hand side" if where == "rhs" else "has NaN"):
        solve_damped_psd(gram, rhs, 0.1)


def test_solve_happy_path_is_exact(float64):
    u = torch.randn(6, 9)
    gram, rhs = u @ u.T, torch.randn(6, 2)
    x, info = solve_damped_psd(gram, rhs, 0.3)
    torch.testing.assert_close(x, torch.linalg.solve(gram + 0.3 * torch.eye(6), rhs))
    assert info.method == "cholesky" and info.fallback is None
