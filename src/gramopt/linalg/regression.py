"""Fast regression (Algorithm 2 and Lemma B.1 of Jan van den Brand, Binghui Peng, Zhao
Song, Omri Weinstein, "Training (Overparametrized) Neural Networks in Near-Linear Time",
ITCS 2021, arXiv:2006.11648): solve

    (A^T A + damping I) x = y,        A [N, k], N >> k,

to relative residual ``||(A^T A + damping I) x - y|| / ||y|| <= tol`` by

    3: a subspace embedding S A (S [s, N], s = ceil(oversampling k) << N),
    4: R with S A R^{-1} orthonormal: the QR factorization [S A; sqrt(damping) I] = Q R
       (the augmented matrix embeds [A; sqrt(damping) I]: its identity block is kept),
    5-8: iterate on the preconditioned system R^{-T} (A^T A + damping I) R^{-1} z = R^{-T} y
       and return x = R^{-1} z.

(The paper's R is our R^{-1}.) Since S embeds range(A) with distortion delta, the
singular values of A R^{-1} lie in ``[1/(1 + delta), 1/(1 - delta)]`` and the
preconditioned matrix has condition number at most ``((1 + delta)/(1 - delta))^2``
whatever the conditioning of A: the sketch sets how fast the iteration converges, never
how precisely (the tolerance alone does). Iterations:

- ``"cg"`` (default): conjugate gradients on the preconditioned system (PCG);
- ``"gradient"``: the paper's line 7, ``z <- z - B (B z - R^{-T} y)`` with
  ``B = R^{-T} (A^T A + damping I) R^{-1}`` (gradient descent on ``||B z - R^{-T} y||^2``
  with step 1, Lemma B.2). It converges only when ``(1 - delta)^{-4} < 2``, i.e. delta
  below about 0.159: use ``oversampling >= 64`` with it.

A is a dense tensor or a :class:`LinearOperator` (products with A and A^T). An operator
may provide :meth:`LinearOperator.sketch_gram`, the Gram ``(S A)^T (S A)`` of a sketch
computed through its own structure; R is then its Cholesky factor with the damping
added (the same R as the QR, from the normal equations of the sketch; used where S A
would be tall, as for the per-layer Kronecker sketches of a Gauss-Newton system).
Without it S A is formed from k products with A, one column at a time.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from gramopt.errors import NonFiniteError, SingularSystemError
from gramopt.linalg.dense import SolveInfo
from gramopt.linalg.krylov import pcg
from gramopt.linalg.operators import DenseOperator, LinearOperator
from gramopt.linalg.sketches import SKETCHES, make_sketch

METHODS = ("cg", "gradient")
DEFAULT_MAX_ITER = {"cg": 200, "gradient": 1000}


def fast_regression(
    A: Tensor | LinearOperator,
    y: Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-8,
    sketch: str = "sparse",
    oversampling: float = 4.0,
    generator: torch.Generator | None = None,
    method: str = "cg",
    max_iter: int | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``(A^T A + damping I) x = y`` (module doc) to relative residual ``tol``.

    Args:
        A: ``[N, k]`` dense tensor or :class:`LinearOperator`, N >> k.
        y: ``[k]``.
        damping: >= 0.
        tol: target relative residual ``||(A^T A + damping I) x - y|| / ||y||``, in (0, 1).
        sketch: a key of :data:`~gramopt.linalg.sketches.SKETCHES`.
        oversampling: sketch rows per column of A (s = ceil(oversampling k)), >= 1.
        generator: randomness of the sketch (same seed, same sketch, same x).
        method: ``"cg"`` or ``"gradient"``.
        max_iter: iteration budget (default 200 for cg, 1000 for gradient).

    Returns:
        ``(x, info)``: x ``[k]``; ``info.seconds`` has ``sketch``, ``factorize`` and
        ``iterate``; ``info.residuals`` the relative residual per iteration.

    Raises:
        ValueError: bad arguments, or N smaller than the sketch size (no reduction).
        NonFiniteError: NaN or inf in A (or S A) or y.
        SingularSystemError: ``A^T A + damping I`` is singular (damping 0, rank-deficient A).
    """
    op = A if isinstance(A, LinearOperator) else _dense(A)
    n_rows, k = op.shape
    _check_arguments(y, k, damping, tol, sketch, oversampling, method, max_iter, op)
    if not torch.isfinite(y).all():
        raise NonFiniteError("y has NaN or inf entries")
    y = y.to(op.dtype)
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER[method]
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    gram = op.sketch_gram(sketch, oversampling, generator)
    if gram is None:
        rows = math.ceil(oversampling * k)
        if n_rows < rows:
            raise ValueError(
                f"fast_regression needs A with N >> k rows: A is {n_rows} x {k} and the sketch has "
                f"{rows} rows (oversampling {oversampling}), so sketching would not reduce it"
                + ("; with N < k, A^T A is also singular" if n_rows < k else "")
                + ". Solve the k x k system directly, or lower the oversampling."
            )
        sa = op.sketch(make_sketch(sketch, rows, n_rows, generator=generator, device=op.device))
        seconds["sketch"] = time.perf_counter() - start
        if not torch.isfinite(sa).all():
            raise NonFiniteError("the sketch S A has NaN or inf entries: A has NaN or inf entries")
        start = time.perf_counter()
        r = _qr_factor(sa, damping)
    else:
        seconds["sketch"] = time.perf_counter() - start
        if not torch.isfinite(gram).all():
            raise NonFiniteError("the sketched Gram (S A)^T (S A) has NaN or inf entries")
        start = time.perf_counter()
        r = _cholesky_factor(gram, damping)
    seconds["factorize"] = time.perf_counter() - start

    def matvec(v: Tensor) -> Tensor:
        out = op.normal_matvec(v)
        return out + damping * v if damping else out

    if method == "cg":
        x, info = pcg(
            matvec,
            y,
            precond=lambda v: _solve_r(r, _solve_rt(r, v)),
            tol=tol,
            max_iter=max_iter,
            method="fast-regression-cg",
        )
    else:
        x, info = _gradient_iteration(matvec, y, r, tol, max_iter)
    info.seconds = {**seconds, "iterate": info.seconds.get("iterate", 0.0)}
    return x, info


def _dense(a: Tensor) -> DenseOperator:
    if not isinstance(a, Tensor) or a.dim() != 2:
        raise ValueError(
            f"A must be a [N, k] tensor or a LinearOperator, got {type(a).__name__} {getattr(a, 'shape', '')}"
        )
    if not a.is_floating_point():
        raise TypeError(f"A must be floating point, got {a.dtype}")
    if not torch.isfinite(a).all():
        raise NonFiniteError("A has NaN or inf entries")
    return DenseOperator(a)


def _check_arguments(y, k, damping, tol, sketch, oversampling, method, max_iter, op) -> None:
    if not isinstance(y, Tensor) or y.shape != (k,):
        raise ValueError(
            f"y must be a tensor of shape [{k}] (A has {k} columns), got {getattr(y, 'shape', type(y).__name__)}"
        )
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    if sketch not in SKETCHES:
        raise ValueError(f"unknown sketch {sketch!r}; choose one of {sorted(SKETCHES)}")
    if isinstance(oversampling, bool) or not isinstance(oversampling, (int, float)) or not oversampling >= 1:
        raise ValueError(f"oversampling must be a number >= 1, got {oversampling!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if op.shape[0] < k and damping == 0:
        raise SingularSystemError(
            f"A is {op.shape[0]} x {k} with fewer rows than columns, so A^T A is singular; use damping > 0"
        )


def _qr_factor(sa: Tensor, damping: float) -> Tensor:
    """Upper-triangular R of ``[S A; sqrt(damping) I] = Q R``, ``[k, k]``."""
    k = sa.shape[1]
    if damping > 0:
        sa = torch.cat([sa, math.sqrt(damping) * torch.eye(k, dtype=sa.dtype, device=sa.device)])
    r = torch.linalg.qr(sa, mode="r").R
    _check_triangular(r, damping)
    return r


def _cholesky_factor(gram: Tensor, damping: float) -> Tensor:
    """Upper-triangular R with ``R^T R = gram + damping I``, ``[k, k]``."""
    k = gram.shape[0]
    system = 0.5 * (gram + gram.T) + damping * torch.eye(k, dtype=gram.dtype, device=gram.device)
    chol, failed = torch.linalg.cholesky_ex(system)
    if failed:
        if damping == 0:
            raise SingularSystemError(
                "the sketched Gram (S A)^T (S A) is singular: A is rank-deficient; use damping > 0"
            )
        jitter = 10 * k * torch.finfo(gram.dtype).eps * float(system.diagonal().max())
        chol = torch.linalg.cholesky(system + jitter * torch.eye(k, dtype=gram.dtype, device=gram.device))
    r = chol.mT
    _check_triangular(r, damping)
    return r


def _check_triangular(r: Tensor, damping: float) -> None:
    diag = r.diagonal().abs()
    if damping == 0 and float(diag.min()) <= r.shape[0] * torch.finfo(r.dtype).eps * float(diag.max()):
        raise SingularSystemError(
            "the sketch S A is rank-deficient, so A^T A is singular to working precision; use damping > 0"
        )


def _solve_rt(r: Tensor, v: Tensor) -> Tensor:
    """``R^{-T} v``."""
    return torch.linalg.solve_triangular(r.mT, v.unsqueeze(1), upper=False).squeeze(1)


def _solve_r(r: Tensor, v: Tensor) -> Tensor:
    """``R^{-1} v``."""
    return torch.linalg.solve_triangular(r, v.unsqueeze(1), upper=True).squeeze(1)


def _gradient_iteration(matvec, y: Tensor, r: Tensor, tol: float, max_iter: int) -> tuple[Tensor, SolveInfo]:
    """Algorithm 2, lines 5-8: ``z <- z - B (B z - c)``, B = R^{-T} H R^{-1}, c = R^{-T} y;
    stops when ``||H R^{-1} z - y|| <= tol ||y||`` (Lemma B.1's criterion)."""
    start = time.perf_counter()
    info = SolveInfo("fast-regression-gradient", residuals=[1.0])
    norm_y = float(torch.linalg.vector_norm(y))
    c = _solve_rt(r, y)
    z = torch.zeros_like(y)

    def apply_b(v: Tensor) -> Tensor:
        return _solve_rt(r, matvec(_solve_r(r, v)))

    bz = torch.zeros_like(y)
    relative = 1.0 if norm_y else 0.0
    while relative > tol and info.iterations < max_iter:
        z = z - apply_b(bz - c)
        bz = apply_b(z)
        relative = float(torch.linalg.vector_norm(r.mT @ (bz - c))) / norm_y  # ||H x - y|| / ||y||
        info.iterations += 1
        info.residuals.append(relative)
        if not math.isfinite(relative) or relative > 1e6:
            break
    x = _solve_r(r, z)
    info.converged = relative <= tol
    if not info.converged:
        info.fallback = (
            f"the gradient iteration stopped at relative residual {relative:.2e} after {info.iterations} "
            "iterations (it needs a sketch with distortion below ~0.18: raise oversampling, or use method='cg')"
        )
    info.seconds["iterate"] = time.perf_counter() - start
    return x, info
