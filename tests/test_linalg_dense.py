"""The damped PSD solve and its fallback chain."""

from __future__ import annotations

import pytest
import torch

from gramopt import NonFiniteError, NumericalWarning, SingularSystemError
from gramopt.linalg import solve_damped_psd


def psd_with_condition(n: int, cond: float, dtype=torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    evals = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return ((q * evals) @ q.T).to(dtype)


@pytest.mark.parametrize("cond", [1e2, 1e8, 1e12])
def test_cholesky_path_matches_dense_solve(cond):
    gram = psd_with_condition(30, cond)
    rhs = torch.randn(30, dtype=torch.float64)
    x, info = solve_damped_psd(gram, rhs, 1e-6)
    expected = torch.linalg.solve(gram + 1e-6 * torch.eye(30, dtype=torch.float64), rhs)
    torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-8)
    assert info.method == "cholesky" and info.fallback is None


def test_jitter_fallback_is_reported():
    """An indefinite 'Gram' (rounding gone wrong) with damping > 0: jitter, reported."""
    gram = psd_with_condition(20, 1e3)
    gram[0, 0] = -1e-3
    rhs = torch.randn(20, dtype=torch.float64)
    with pytest.warns(NumericalWarning, match="jitter|eigen"):
        x, info = solve_damped_psd(gram, rhs, 1e-12)
    assert info.fallback is not None and torch.isfinite(x).all()


def test_eigen_fallback_when_jitter_is_not_enough():
    gram = -torch.eye(5, dtype=torch.float64)  # far from PSD: jitter never rescues it
    with pytest.warns(NumericalWarning, match="eigen-solve"):
        x, info = solve_damped_psd(gram, torch.ones(5, dtype=torch.float64), 0.1)
    assert info.method == "eigh" and torch.isfinite(x).all()


def test_zero_damping_singular_is_an_error():
    v = torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(SingularSystemError, match="damping > 0"):
        solve_damped_psd(v @ v.T, torch.randn(10, dtype=torch.float64), 0.0)


def test_zero_damping_nonsingular_works():
    gram = psd_with_condition(10, 1e4)
    rhs = torch.randn(10, dtype=torch.float64)
    x, _ = solve_damped_psd(gram, rhs, 0.0)
    torch.testing.assert_close(gram @ x, rhs)


def test_non_finite_inputs():
    gram = torch.eye(3)
    gram[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        solve_damped_psd(gram, torch.ones(3), 0.1)
    with pytest.raises(NonFiniteError, match="right-hand side"):
        solve_damped_psd(torch.eye(3), torch.tensor([1.0, float("inf"), 0.0]), 0.1)
