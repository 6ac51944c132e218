"""fast_regression (Algorithm 2 / Lemma B.1) on matrices with prescribed spectra, against
dense solves and plain CG; bad input; sketched Newton (Algorithm 3) against dense Newton."""

from __future__ import annotations

import math

import pytest
import torch

import gramopt
from gramopt.linalg import DenseOperator, LinearOperator, fast_regression, logistic_loss, newton, pcg

CONDS = [1e2, 1e4, 1e6, 1e8, 1e10]


def prescribed(rows: int, cols: int, cond: float, seed: int = 0) -> torch.Tensor:
    """A = U diag(s) V^T with cond(A^T A) = cond (singular values log-spaced)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64)).Q
    return u * torch.logspace(0, -0.5 * math.log10(cond), cols, dtype=torch.float64) @ v.T


def relative_residual(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor, damping: float = 0.0) -> float:
    return float(torch.linalg.vector_norm(a.T @ (a @ x) + damping * x - y) / torch.linalg.vector_norm(y))


def test_iterations_bounded_as_the_condition_number_grows(float64):
    """The regression right-hand side y = A^T b: fast_regression reaches 1e-8 in <= 30
    iterations for cond(A^T A) up to 1e10, while plain CG's count grows with cond.
    (For an arbitrary y at cond 1e10 the residual of the exact solution evaluated in
    float64 is itself ~ eps cond ||x|| / ||y|| ~ 1e-6: no solver can show 1e-8 there.)"""
    rows, cols = 4096, 96
    fast, plain = [], []
    for cond in CONDS:
        a = prescribed(rows, cols, cond)
        y = a.T @ torch.randn(rows, generator=torch.Generator().manual_seed(1))
        for kind in ("sparse", "srht", "gaussian"):
            x, info = fast_regression(a, y, tol=1e-8, sketch=kind, generator=torch.Generator().manual_seed(2))
            assert info.converged and info.iterations <= 30, (cond, kind, info.iterations)
            assert relative_residual(a, x, y) <= 1e-8
            assert info.residuals[-1] == pytest.approx(relative_residual(a, x, y), rel=1e-3, abs=1e-12)
            assert set(info.seconds) == {"sketch", "factorize", "iterate"}
            fast.append(info.iterations)
        if cond <= 1e6:  # plain CG: hundreds to thousands of iterations already
            _, info = pcg(lambda v, a=a: a.T @ (a @ v), y, tol=1e-8, max_iter=3000)
            plain.append(info.iterations if info.converged else math.inf)
    assert plain == sorted(plain) and plain[0] > 40 and plain[2] > 10 * max(fast), (plain, fast)


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_damped_solution_matches_a_dense_solve(damping, float64):
    a = prescribed(4096, 64, 1e8, seed=3)
    y = torch.randn(64, generator=torch.Generator().manual_seed(4))
    expected = torch.linalg.solve(a.T @ a + damping * torch.eye(64), y)
    x, info = fast_regression(a, y, damping=damping, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert info.converged
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-12)


def test_gradient_iteration_of_the_paper(float64):
    """Algorithm 2, line 7, with a sketch accurate enough for its step size 1."""
    a = prescribed(16384, 48, 1e6, seed=5)
    y = a.T @ torch.randn(16384, generator=torch.Generator().manual_seed(6))
    x, info = fast_regression(
        a, y, method="gradient", sketch="gaussian", oversampling=64, generator=torch.Generator().manual_seed(0)
    )
    assert info.converged and info.method == "fast-regression-gradient"
    assert relative_residual(a, x, y) <= 1e-8
    # the error contracts geometrically (Lemma B.2: by a constant factor per iteration)
    assert info.iterations <= 60
    # with a poor sketch, step 1 diverges; it says so instead of returning garbage silently
    x, info = fast_regression(a, y, method="gradient", oversampling=1.5, generator=torch.Generator().manual_seed(0))
    assert not info.converged and "distortion" in info.fallback


class Columns(LinearOperator):
    """A dense matrix seen only through products (the generic matrix-free path)."""

    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.shape, self.dtype, self.device = a, tuple(a.shape), a.dtype, a.device

    def matmul(self, v):
        return self.a @ v

    def rmatmul(self, u):
        return self.a.T @ u


def test_matrix_free_operator_gives_the_same_solution(float64):
    a = prescribed(4096, 40, 1e6, seed=7)
    y = torch.randn(40, generator=torch.Generator().manual_seed(8))
    x1, i1 = fast_regression(Columns(a), y, damping=1e-4, generator=torch.Generator().manual_seed(0))
    x2, i2 = fast_regression(DenseOperator(a), y, damping=1e-4, generator=torch.Generator().manual_seed(0))
    x3, _ = fast_regression(a, y, damping=1e-4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x1, x2, rtol=1e-9, atol=0)
    assert torch.equal(x2, x3) and i1.iterations == i2.iterations


def test_deterministic_for_a_fixed_generator(float64):
    a = prescribed(4096, 32, 1e6, seed=9)
    y = torch.randn(32, generator=torch.Generator().manual_seed(10))
    runs = [fast_regression(a, y, generator=torch.Generator().manual_seed(s)) for s in (11, 11, 12)]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1].residuals == runs[1][1].residuals
    assert runs[0][1].residuals != runs[2][1].residuals  # another sketch, another path...
    torch.testing.assert_close(runs[0][0], runs[2][0], rtol=1e-6, atol=0)  # ...to the same x


def test_bad_input():
    a, y = torch.randn(400, 20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    with pytest.raises(ValueError, match="N >> k"):
        fast_regression(torch.randn(10, 20, dtype=torch.float64), y, damping=1.0)
    with pytest.raises(ValueError, match="N >> k rows: A is 50 x 20"):
        fast_regression(torch.randn(50, 20, dtype=torch.float64), y)  # sketch of 80 rows
    with pytest.raises(gramopt.SingularSystemError, match="fewer rows than columns"):
        fast_regression(Columns(torch.randn(10, 20, dtype=torch.float64)), y)
    bad = a.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(gramopt.NonFiniteError, match="A has NaN"):
        fast_regression(bad, y)
    with pytest.raises(gramopt.NonFiniteError, match="y has NaN"):
        fast_regression(a, torch.full_like(y, float("inf")))
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        fast_regression(a, y, damping=-1e-3)
    with pytest.raises(ValueError, match=r"y must be a tensor of shape \[20\]"):
        fast_regression(a, y[:5])
    with pytest.raises(ValueError, match="tol must lie in"):
        fast_regression(a, y, tol=0.0)
    with pytest.raises(ValueError, match="unknown method"):
        fast_regression(a, y, method="newton")
    with pytest.raises(ValueError, match="oversampling"):
        fast_regression(a, y, oversampling=0.5)
    rank_deficient = a.clone()
    rank_deficient[:, 7] = rank_deficient[:, 3]
    with pytest.raises(gramopt.SingularSystemError, match="use damping > 0"):
        fast_regression(rank_deficient, y)
    x, info = fast_regression(rank_deficient, y, damping=1e-2)  # damped: fine
    assert info.converged


def logistic_problem(rows: int = 6000, cols: int = 40):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, cols, dtype=torch.float64)
    w = torch.randn(cols, generator=g, dtype=torch.float64)
    labels = torch.where(torch.rand(rows, generator=g, dtype=torch.float64) < torch.sigmoid(3 * a @ w), 1.0, -1.0)
    return a, labels


def test_sketched_newton_reaches_gradient_norm_1e8_like_dense_newton(float64):
    """Algorithm 3 on L2-regularized logistic regression: each step's regression (28) by
    fast_regression; the iterates follow dense Newton's and the gradient norm falls
    below 1e-8 in the same number of steps (+-1)."""
    a, labels = logistic_problem()
    loss = logistic_loss(labels)
    x_s, info_s = newton(a, loss, l2=1.0, solver="sketch", generator=torch.Generator().manual_seed(0))
    x_d, info_d = newton(a, loss, l2=1.0, solver="dense")
    assert info_s.converged and info_d.converged
    assert info_s.grad_norms[-1] <= 1e-8 and info_d.grad_norms[-1] <= 1e-8
    assert abs(info_s.iterations - info_d.iterations) <= 1 and info_s.iterations <= 15
    torch.testing.assert_close(x_s, x_d, rtol=1e-9, atol=1e-10)
    assert all(s.converged and s.iterations <= 30 for s in info_s.solves)
    # an independent check of optimality: the gradient by autograd at x_s
    x = x_s.clone().requires_grad_(True)
    f = torch.nn.functional.softplus(-labels * (a @ x)).sum() + 0.5 * x.dot(x)
    (grad,) = torch.autograd.grad(f, x)
    assert float(grad.norm()) <= 1e-8
    assert all(later <= earlier for earlier, later in zip(info_s.values, info_s.values[1:], strict=False))


def test_newton_bad_input():
    a, labels = logistic_problem(200, 5)
    with pytest.raises(ValueError, match="labels in"):
        logistic_loss(torch.zeros(200))
    with pytest.raises(ValueError, match="unknown solver"):
        newton(a, logistic_loss(labels), solver="lbfgs")
    with pytest.raises(ValueError, match="l2 must be"):
        newton(a, logistic_loss(labels), l2=-1.0)
