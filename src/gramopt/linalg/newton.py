"""Newton's method for ``f(x) = sum_i g_i(a_i^T x) + (l2/2) ||x||^2`` with the sketched
solve of Algorithm 3 (FASTNEWTONUPDATE, Appendix D of
Jan van den Brand, Binghui Peng, Zhao Song, Omri Weinstein, "Training
(Overparametrized) Neural Networks in Near-Linear Time", ITCS 2021, arXiv:2006.11648), or a dense one.

The Hessian has the square root of Appendix D: ``grad^2 f = (D A)^T (D A) + l2 I`` with
``D = diag(sqrt(g_i''(a_i^T x)))``, so each step solves the regression (28)

    ((D A)^T (D A) + l2 I) g = grad f(x),        x <- x - g,

with :func:`~gramopt.linalg.fast_regression` (``solver="sketch"``: sketch, QR, PCG, at
``O(N d log(kappa) + d^3)`` per step) or by forming the d x d Hessian and a Cholesky
solve (``solver="dense"``: ``O(N d^2)``, the baseline). Like the paper's algorithm it
takes full steps (no line search): start it close enough to the minimizer (Theorem
D.4), which L2-regularized logistic regression from x = 0 usually is.

None of the optimizers uses it: it is the near-linear-time paper's Algorithm 3 as a
public solver beside :func:`~gramopt.linalg.fast_regression` (its inner solve), kept in
``gramopt.linalg`` because it is that paper's linear algebra, not a training method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from gramopt.errors import NonFiniteError
from gramopt.linalg.dense import SolveInfo, solve_damped_psd
from gramopt.linalg.regression import fast_regression

#: ``t [N] -> (g_i(t_i), g_i'(t_i), g_i''(t_i))``, each ``[N]``, with ``g_i'' >= 0``.
SeparableLoss = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def logistic_loss(labels: Tensor) -> SeparableLoss:
    """``g_i(t) = log(1 + exp(-y_i t))`` for labels ``y_i`` in {-1, +1}, ``[N]``."""
    if not bool(((labels == 1) | (labels == -1)).all()):
        raise ValueError("logistic_loss needs labels in {-1, +1}")

    def loss(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y = labels.to(t.dtype)
        margin = y * t
        return F.softplus(-margin), -y * torch.sigmoid(-margin), torch.sigmoid(margin) * torch.sigmoid(-margin)

    return loss


@dataclass
class NewtonInfo:
    """Per iteration: ``values`` f(x_t), ``grad_norms`` ||grad f(x_t)||, ``solves`` what
    each inner solve did; ``seconds`` in total; ``converged`` if the gradient norm
    reached ``tol``."""

    iterations: int = 0
    values: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    solves: list[SolveInfo] = field(default_factory=list)
    seconds: float = 0.0
    converged: bool = False


def newton(
    A: Tensor,
    loss: SeparableLoss,
    *,
    l2: float = 0.0,
    x0: Tensor | None = None,
    tol: float = 1e-8,
    max_iter: int = 50,
    solver: str = "sketch",
    solve_tol: float = 1e-6,
    sketch: str = "sparse",
    oversampling: float = 4.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, NewtonInfo]:
    """Minimize ``sum_i g_i(a_i^T x) + (l2/2)||x||^2`` by full Newton steps.

    Args:
        A: ``[N, d]`` data (rows ``a_i``).
        loss: a :data:`SeparableLoss`, e.g. :func:`logistic_loss`.
        l2: ridge weight, >= 0 (> 0 makes f strongly convex).
        x0: start ``[d]`` (default 0).
        tol: stop when ``||grad f(x)|| <= tol``.
        max_iter: Newton steps at most.
        solver: ``"sketch"`` (Algorithm 3) or ``"dense"``.
        solve_tol: relative residual of each sketched solve (the paper's ``1/(4 kappa)``).
        sketch, oversampling, generator: of :func:`~gramopt.linalg.fast_regression`.

    Returns:
        ``(x, info)``.
    """
    if solver not in ("sketch", "dense"):
        raise ValueError(f"unknown solver {solver!r}; choose 'sketch' or 'dense'")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    if not torch.isfinite(A).all():
        raise NonFiniteError("A has NaN or inf entries")
    start = time.perf_counter()
    x = torch.zeros(A.shape[1], dtype=A.dtype, device=A.device) if x0 is None else x0.to(A.dtype).clone()
    info = NewtonInfo()
    while True:
        values, first, second = loss(A @ x)
        grad = A.T @ first + l2 * x
        info.values.append(float(values.sum() + 0.5 * l2 * x.dot(x)))
        info.grad_norms.append(float(torch.linalg.vector_norm(grad)))
        if info.grad_norms[-1] <= tol or info.iterations >= max_iter:
            break
        root = second.clamp_min(0).sqrt().unsqueeze(1) * A  # grad^2 f = root^T root + l2 I
        if solver == "sketch":
            step, solve = fast_regression(
                root, grad, damping=l2, tol=solve_tol, sketch=sketch, oversampling=oversampling, generator=generator
            )
        else:
            t0 = time.perf_counter()
            step, solve = solve_damped_psd(root.T @ root, grad, l2, what="Hessian")
            solve.seconds["hessian_and_solve"] = time.perf_counter() - t0
        info.solves.append(solve)
        x = x - step
        info.iterations += 1
    info.converged = info.grad_norms[-1] <= tol
    info.seconds = time.perf_counter() - start
    return x, info
