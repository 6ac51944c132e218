"""Dense solves of the damped sample-space system ``(K + damping I) x = r``.

K is a b x b (or bk x bk) positive semi-definite Gram matrix. The solve is a Cholesky
factorization with a robust fallback chain: if the factorization fails although
damping > 0 (rounding in float32, a nearly rank-deficient K), or succeeds on a system
singular to working precision (estimated condition number above 1/eps, where the
solution would be noise), jitter is added in escalating steps, and as a last resort an
eigen-solve with clamped eigenvalues is used. Every fallback is reported in the
returned :class:`SolveInfo` (``jitter``: the damping actually used is damping + jitter)
and as a warning (unless the caller reports it itself: :func:`fallbacks_reported_by_caller`).
With damping = 0 (the ridgeless Eq. 9 of the GGN paper) a singular
system (estimated condition number above 1/(n eps)) is an error.

:func:`all_finite` is the finiteness check every method shares (gradients, Grams,
directions).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gramopt.errors import NonFiniteError, SingularSystemError

_CALLER_REPORTS: ContextVar[bool] = ContextVar("gramopt_caller_reports_fallbacks", default=False)


@contextmanager
def fallbacks_reported_by_caller() -> Iterator[None]:
    """Inside this block :func:`solve_damped_psd` warns of no fallback: the caller reads
    ``SolveInfo.jitter`` / ``fallback`` and reports them itself (GaussNewton: once per
    optimizer, every step's in its step info)."""
    token = _CALLER_REPORTS.set(True)
    try:
        yield
    finally:
        _CALLER_REPORTS.reset(token)


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN or inf, by one min/max reduction: ``isfinite(t).all()``
    allocates ``t.abs()`` and boolean masks, several times the memory of a wide layer's
    gradient."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) and torch.isfinite(high))


class NumericalWarning(RuntimeWarning):
    """A solve needed a fallback (jitter or eigen-solve); see the optimizer's step info."""


@dataclass
class SolveInfo:
    """What a solver did. ``method`` names the path taken; ``residuals`` holds the
    relative residual ``||rhs - H x_t|| / ||rhs||`` per iteration for iterative solvers
    (``residuals[0]`` at the start, the last one recomputed from scratch);
    ``converged`` says whether it reached its tolerance; ``seconds`` the time per phase."""

    method: str
    jitter: float = 0.0
    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    converged: bool = True


def solve_damped_psd(
    gram: Tensor, rhs: Tensor, damping: float, *, what: str = "Gram matrix"
) -> tuple[Tensor, SolveInfo]:
    """Solve ``(gram + damping I) x = rhs`` for symmetric PSD ``gram``.

    Args:
        gram: ``[n, n]``.
        rhs: ``[n]`` or ``[n, m]``.
        damping: >= 0.
        what: how to name the matrix in errors.

    Returns:
        ``(x, info)`` with x shaped like rhs.
    """
    start = time.perf_counter()
    n = gram.shape[0]
    system = gram.clone()
    system.diagonal().add_(damping)
    column = rhs.unsqueeze(-1) if rhs.dim() == 1 else rhs
    eps = torch.finfo(gram.dtype).eps
    chol, failed = cholesky_lower(system)
    # Happy path: NaN or inf in gram or rhs shows in x ([n], cheap to check), so the
    # [n, n] finiteness check runs only when something went wrong.
    x = None if failed else torch.cholesky_solve(column, chol)
    if x is None or not bool(torch.isfinite(x).all()):
        if not torch.isfinite(gram).all():
            raise NonFiniteError(f"the {what} has NaN or inf entries; nothing was changed")
        if not torch.isfinite(rhs).all():
            raise NonFiniteError(
                f"the right-hand side of the {what} system has NaN or inf entries; nothing was changed"
            )
    reason = f"Cholesky of the damped {what} failed"
    if x is not None and not failed:
        if damping == 0:
            cond = condition_estimate(gram, chol, damping)
            if cond * n * eps > 1:
                raise SingularSystemError(
                    f"the {what} is singular to working precision (damping=0, estimated condition "
                    f"number {cond:.2e}); use damping > 0"
                )
        cond = numerically_singular(gram, chol, damping)
        if cond is None:
            return _shape(x, rhs), SolveInfo("cholesky", seconds={"solve": time.perf_counter() - start})
        reason = f"the damped {what} is singular to working precision (estimated condition number {cond:.2e})"
    if damping == 0:
        raise SingularSystemError(
            f"the {what} is singular (Cholesky failed with damping=0); use damping > 0"
        )
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    scale = float(system.diagonal().abs().max().clamp_min(torch.finfo(gram.dtype).tiny))
    jitter = 10 * n * eps * scale
    for _ in range(5):
        # (the lower layout as before: near 1/eps, rounding differences are amplified)
        chol, failed = torch.linalg.cholesky_ex(system + jitter * eye)
        if not failed:
            message = f"{reason}; added jitter {jitter:.2e}"
            # the warning's text is constant so that Python shows it once per matrix, not
            # once per step; the amount and the reason are in the step info
            if not _CALLER_REPORTS.get():
                warnings.warn(
                    f"the damped {what} could not be factored as it is: added jitter (see the step info)",
                    NumericalWarning,
                    stacklevel=3,
                )
            x = torch.cholesky_solve(column, chol)
            info = SolveInfo("cholesky", jitter=jitter, fallback=message)
            info.seconds["solve"] = time.perf_counter() - start
            return _shape(x, rhs), info
        jitter *= 100
    evals, evecs = torch.linalg.eigh(system)
    floor = max(damping, n * eps * float(evals.abs().max()))
    evals = evals.clamp_min(floor)
    x = evecs @ ((evecs.T @ column) / evals.unsqueeze(-1))
    message = (
        f"Cholesky of the damped {what} failed even with jitter; "
        f"used an eigen-solve (eigenvalues clamped at {floor:.2e})"
    )
    if not _CALLER_REPORTS.get():
        warnings.warn(
            f"Cholesky of the damped {what} failed even with jitter; used an eigen-solve",
            NumericalWarning,
            stacklevel=3,
        )
    info = SolveInfo("eigh", fallback=message)
    info.seconds["solve"] = time.perf_counter() - start
    return _shape(x, rhs), info


#: Up to this size, CPU factorizations use the upper layout (see :func:`cholesky_lower`).
UPPER_LAYOUT_MAX = 128


def cholesky_lower(system: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.cholesky_ex(system)``: the lower factor L ``[n, n]`` and the info
    tensor (> 0: the factorization failed).

    On CPU with n <= :data:`UPPER_LAYOUT_MAX` it is computed as the upper factor
    ``U = L^T`` and returned as its transposed view (equal to the lower factorization up
    to rounding): MKL factors such small matrices unblocked, and faster in that layout.
    Measured with torch 2.13's MKL 2024.2, float32, one thread (us, lower / upper):
    n = 64: 30 / 23, 96: 85 / 65, 128: 149-176 / 103-122; from n = 129 on the lower
    layout is the faster one (129: 88 / 105, 256: 250 / 367), so larger systems and
    other devices keep it."""
    if system.device.type == "cpu" and system.shape[-1] <= UPPER_LAYOUT_MAX:
        upper, info = torch.linalg.cholesky_ex(system, upper=True)
        return upper.mT, info
    return torch.linalg.cholesky_ex(system)


def numerically_singular(gram: Tensor, chol: Tensor, damping: float) -> float | None:
    """The estimated condition number of ``gram + damping I`` (damping > 0, factor
    ``chol``) if it exceeds 1/eps of its dtype, else None. Cholesky can succeed on such a
    system and return noise (measured: float32 GGN steps 20-270% off the float64 ones at
    condition numbers 5e7-5e8, no warning); the callers then add jitter, as for a failed
    factorization. Cheap when ``(trace(gram) + damping) / damping``, an upper bound,
    is below 1/eps (as in every embedded task at its default damping)."""
    eps = torch.finfo(gram.dtype).eps
    if damping <= 0 or (float(gram.diagonal().sum()) + damping) / damping * eps <= 1:
        return None
    cond = condition_estimate(gram, chol, damping)
    return cond if cond * eps > 1 else None


def condition_estimate(gram: Tensor, chol: Tensor, damping: float, iterations: int = 4) -> float:
    """A lower estimate of the 2-norm condition number of ``A = gram + damping I``
    (``gram`` ``[n, n]`` PSD, ``chol`` the Cholesky factor of A): power iterations with
    gram and with A^{-1} (two triangular solves), ``O(n^2)`` each, from a fixed start
    vector. (The ratio of the factor's diagonal entries, squared, can miss a condition
    number of 1e16 by orders of magnitude.)"""
    n = gram.shape[0]
    start = torch.linspace(1.0, 2.0, n, dtype=gram.dtype, device=gram.device).unsqueeze(1)
    top, v = 0.0, start / start.norm()
    for _ in range(iterations):
        w = gram @ v
        top = float(w.norm())
        v = w / top if top > 0 else v
    top += damping
    inverse, v = 0.0, start / start.norm()
    for _ in range(iterations):
        w = torch.cholesky_solve(v, chol)
        inverse = float(w.norm())
        if not math.isfinite(inverse) or inverse == 0:
            return math.inf
        v = w / inverse
    return top * inverse


def _shape(x: Tensor, rhs: Tensor) -> Tensor:
    return x.squeeze(-1) if rhs.dim() == 1 else x
