"""The b x b solve of SENG's Eq. 9 (and 12), shared by explicit and implicit layers,
with the Cholesky factor kept between curvature refreshes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gramopt.errors import NonFiniteError
from gramopt.linalg.dense import SolveInfo, cholesky_lower, numerically_singular, solve_damped_psd


def solve_shifted(
    gram: Tensor, rhs: Tensor, shift: float, cached: tuple[Tensor, float] | None, what: str
) -> tuple[Tensor, SolveInfo, tuple[Tensor, float] | None]:
    """``(gram + shift I)^{-1} rhs`` and the Cholesky factor to keep for the next step.

    ``cached`` is ``(L, shift')`` from an earlier step with the same gram: reused when
    ``shift' == shift`` (one triangular solve pair), so steps between curvature refreshes
    with a constant damping cost no factorization. A failed factorization, or one of a
    system singular to working precision (:func:`~gramopt.linalg.dense.numerically_singular`),
    goes to :func:`~gramopt.linalg.solve_damped_psd`'s fallbacks (jitter, eigen-solve)
    and is not kept.
    """
    if cached is not None and cached[1] == shift:
        # no check here: a NaN or inf in U g reaches the direction, which the step's one
        # fused finiteness check refuses (SampleSpaceOptimizer.apply_directions)
        return torch.cholesky_solve(rhs.unsqueeze(1), cached[0]).squeeze(1), SolveInfo("cholesky (kept)"), cached
    system = gram.clone()
    system.diagonal().add_(shift)
    chol, failed = cholesky_lower(system)
    if not failed:
        # Happy path: NaN or inf in gram or rhs shows in beta ([b], one cheap check), so
        # the [b, b] checks below run only when something went wrong (a NaN that beta
        # hides still reaches the direction, which the step's finiteness check refuses).
        beta = torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)
        if bool(torch.isfinite(beta).all()) and numerically_singular(gram, chol, shift) is None:
            return beta, SolveInfo("cholesky"), (chol, shift)
    if not torch.isfinite(rhs).all():
        raise NonFiniteError(
            f"U g for the {what} has NaN or inf entries (is the loss, hence the gradient, finite?); nothing was changed"
        )
    if not torch.isfinite(gram).all():
        raise NonFiniteError(f"the {what} has NaN or inf entries; nothing was changed")
    beta, info = solve_damped_psd(gram, rhs, shift, what=what)
    return beta, info, None


def with_solve_state(
    state: dict[str, Any], gram: Tensor | None, chol: tuple[Tensor, float] | None, **extra: Tensor
) -> dict[str, Any]:
    """Add the Gram, the kept Cholesky factor (``chol``, ``chol_shift``) and ``extra``
    tensors to a layer's cached state."""
    if gram is not None:
        state["gram"] = gram
    if chol is not None:
        state["chol"], state["chol_shift"] = chol
    state.update(extra)
    return state


def kept_factor(state: dict[str, Any]) -> tuple[Tensor, float] | None:
    """The ``(L, shift)`` kept in a layer's cached state, if any."""
    return (state["chol"], state["chol_shift"]) if "chol" in state else None
