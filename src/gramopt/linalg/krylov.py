"""Preconditioned conjugate gradients for symmetric positive definite systems given by
products only, and the randomized Nystrom preconditioner.

Convergence is measured by the relative residual ``||rhs - H x|| / ||rhs||`` (the
criterion of Lemma B.1 in Jan van den Brand, Binghui Peng, Zhao Song, Omri Weinstein,
"Training (Overparametrized) Neural Networks in Near-Linear Time", ITCS 2021,
arXiv:2006.11648: ``||A^T A x - y|| <= eps ||y||``). CG updates its residual
recursively, which can drift from the true one; when the recursive residual reaches the
tolerance, the true residual is recomputed and, if it is still too large, CG restarts
from there (at most ``MAX_RESTARTS`` times). Out of iterations, it returns the iterate
with the smallest true residual among the last one, the one of smallest recursive
residual and x = 0: rounding (a float32 system with condition number beyond 1/eps) can
make later iterates diverge, and a step is never worse than no step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from gramopt.errors import NonFiniteError
from gramopt.linalg.dense import SolveInfo

Operator = Callable[[Tensor], Tensor]
MAX_RESTARTS = 3


def pcg(
    matvec: Operator,
    rhs: Tensor,
    *,
    precond: Operator | None = None,
    tol: float = 1e-8,
    max_iter: int = 200,
    method: str = "pcg",
) -> tuple[Tensor, SolveInfo]:
    """Solve ``H x = rhs`` for SPD H given by ``matvec`` (``[k] -> [k]``), from x = 0.

    Args:
        matvec: ``v -> H v``.
        rhs: ``[k]``.
        precond: ``v -> M^{-1} v`` for an SPD preconditioner M (None: plain CG).
        tol: target relative residual.
        max_iter: iteration budget (one product with H each).
        method: the name recorded in the returned info.

    Returns:
        ``(x, info)``; ``info.converged`` is False if the budget ran out (x is then the
        best iterate, module doc) and ``info.seconds["iterate"]`` the time spent.
    """
    start = time.perf_counter()
    norm_rhs = float(torch.linalg.vector_norm(rhs))
    x = torch.zeros_like(rhs)
    info = SolveInfo(method, residuals=[1.0])
    if norm_rhs == 0.0:
        info.seconds["iterate"] = time.perf_counter() - start
        return x, info
    apply_m = precond if precond is not None else (lambda v: v)
    r = rhs.clone()
    restarts = 0
    best_x, best = None, 1.0  # the iterate of smallest recursive residual (None: x = 0, residual 1)
    while True:
        z = apply_m(r)
        p = z
        rz = torch.dot(r, z)
        relative = float(torch.linalg.vector_norm(r)) / norm_rhs
        while relative > tol and info.iterations < max_iter:
            hp = matvec(p)
            curvature = torch.dot(p, hp)
            if not (torch.isfinite(curvature) and curvature > 0):
                if not torch.isfinite(curvature):
                    raise NonFiniteError("CG met NaN or inf in a product with the system matrix; nothing was changed")
                break  # p^T H p <= 0 in rounding: no further progress possible
            alpha = rz / curvature
            x = x + alpha * p
            r = r - alpha * hp
            z = apply_m(r)
            rz_next = torch.dot(r, z)
            p = z + (rz_next / rz) * p
            rz = rz_next
            info.iterations += 1
            relative = float(torch.linalg.vector_norm(r)) / norm_rhs
            info.residuals.append(relative)
            if relative < best:
                best_x, best = x, relative
        true_r = rhs - matvec(x)
        relative = float(torch.linalg.vector_norm(true_r)) / norm_rhs
        info.residuals[-1] = relative
        if relative <= tol or info.iterations >= max_iter or restarts >= MAX_RESTARTS:
            break
        r = true_r
        restarts += 1
    info.converged = relative <= tol
    if not info.converged:
        kept = "the last iterate"
        if best_x is not None and best_x is not x:
            candidate = float(torch.linalg.vector_norm(rhs - matvec(best_x))) / norm_rhs
            if candidate < relative:
                relative, kept, x = candidate, "the iterate of smallest recursive residual", best_x
        if relative > 1.0:
            relative, kept, x = 1.0, "x = 0", torch.zeros_like(rhs)
        info.residuals[-1] = relative
        info.fallback = (
            f"{method} stopped at relative residual {relative:.2e} > tol {tol:.1e} after "
            f"{info.iterations} iterations (returned {kept})"
        )
    info.seconds["iterate"] = time.perf_counter() - start
    return x, info


def nystrom_preconditioner(
    gram_matvec: Operator,
    size: int,
    rank: int,
    damping: float,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Operator:
    """The randomized Nystrom preconditioner of ``H = K + damping I`` from ``rank``
    products with the PSD matrix K only (Frangella, Tropp & Udell's RandNysAppx):

        Y = K Omega (Omega [k, r] orthonormal Gaussian), shift nu = sqrt(k) eps ||Y||,
        C = chol(Omega^T (Y + nu Omega)),  B = (Y + nu Omega) C^{-1} = U Sigma V^T,
        Lambda = max(Sigma^2 - nu, 0)      (K ~ U Lambda U^T),
        M^{-1} = (lambda_r + damping) U (Lambda + damping I)^{-1} U^T + (I - U U^T),

    with ``lambda_r`` the smallest kept eigenvalue. If K's spectrum beyond rank r lies
    below ``lambda_r``, ``M^{-1} H`` has condition number about ``(lambda_r + damping) /
    (lambda_min + damping)``.

    Returns:
        ``v -> M^{-1} v`` for ``v`` ``[k]``.
    """
    omega = torch.randn(size, rank, generator=generator, dtype=dtype, device=device)
    omega = torch.linalg.qr(omega).Q
    y = torch.stack([gram_matvec(omega[:, j]) for j in range(rank)], dim=1)
    if not torch.isfinite(y).all():
        raise NonFiniteError("the Nystrom sketch of the Gram matrix has NaN or inf; nothing was changed")
    nu = math.sqrt(size) * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(y, ord=2))
    y_nu = y + nu * omega
    core = omega.T @ y_nu
    chol, failed = torch.linalg.cholesky_ex(0.5 * (core + core.T))
    if failed:  # rounding: add the smallest shift that makes it factor
        jitter = 10 * torch.finfo(dtype).eps * float(core.diagonal().abs().max()) + nu
        chol = torch.linalg.cholesky(0.5 * (core + core.T) + jitter * torch.eye(rank, dtype=dtype, device=device))
    b = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # Y_nu L^{-T}
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    lam = (sigma**2 - nu).clamp_min(0.0)
    floor = float(lam[-1]) + damping
    if floor <= 0:
        return lambda v: v
    scale = floor / (lam + damping)

    def apply(v: Tensor) -> Tensor:
        coeffs = u.T @ v
        return v + u @ ((scale - 1.0) * coeffs)

    return apply
