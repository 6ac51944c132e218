"""Step 3 of a Gauss-Newton step: the direction ``d = (J^T J + damping I)^{-1} J^T w``
for the right-hand side w ``[M]`` (the residual r, or SPRING's ``r + mu J delta_{k-1}``).

Two spaces, one answer (the push-through identity ``(J^T J + l I)^{-1} J^T = J^T (J J^T + l I)^{-1}``):

- **sample** space, ``d = J^T a`` with ``(J J^T + damping I) a = w``: an ``M x M`` system
  (the sample-space form of Gauss-Newton and of energy natural gradient descent;
  Guzmán-Cordero, Dangel, Goldshlager, Zeinhofer, "Improving Energy Natural Gradient
  Descent through Woodbury, Momentum, and Randomization", NeurIPS 2025, arXiv:2505.12149);
- **parameter** space, ``(J^T J + damping I) d = J^T w``: a ``p x p`` system (Müller &
  Zeinhofer's ENGD, ICML 2023, arXiv:2302.13163).

Both are GGN's systems (:class:`~gramopt.optim.ggn.system.GaussNewtonSystem`) with explicit
rows (J in sample space, J^T in parameter space), solved by GGN's solvers
(:data:`~gramopt.optim.ggn.solvers.SOLVERS`: ``cholesky``, ``cg``, ``sketch-pcg``,
``nystrom-pcg``). ``space="auto"`` takes the smaller system (sample space when M <= p);
``solver="auto"`` takes ``cholesky`` there: with the small damping PINNs need, the
systems are too ill-conditioned for the iterative solvers to gain (plain CG needs
hundreds of iterations; the figures are in benchmarks/notes.md, "PINN Gauss-Newton probe").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gramopt.capture.factors import LayerFactors
from gramopt.linalg.dense import SolveInfo, solve_damped_psd
from gramopt.linalg.kernels import symmetric_gram
from gramopt.optim.ggn.solvers import SOLVERS
from gramopt.optim.ggn.system import GaussNewtonSystem

SPACES = ("auto", "sample", "parameter")


def choose_space(space: str, rows: int, params: int) -> str:
    """``"sample"`` or ``"parameter"``: ``space`` itself, or for ``"auto"`` the smaller
    system (sample space when ``rows <= params``)."""
    if space != "auto":
        return space
    return "sample" if rows <= params else "parameter"


def choose_solver(solver: str) -> str:
    """The solver ``solver="auto"`` takes (module doc): ``cholesky``."""
    return "cholesky" if solver == "auto" else solver


def solve_direction(
    jac: Tensor, w: Tensor, damping: float, space: str, solver: str, options: dict[str, Any], step: int
) -> tuple[Tensor, SolveInfo]:
    """``(d [p], info)`` with ``d = (J^T J + damping I)^{-1} J^T w`` (module doc) in
    ``space`` (``"sample"`` or ``"parameter"``) by ``solver`` (a name of
    :data:`~gramopt.optim.ggn.solvers.SOLVERS` other than ``auto``); ``step`` seeds the
    randomized solvers' sketches. ``info.seconds["gram"]`` is the Gram's share (cholesky)."""
    if space == "sample":
        rows, rhs = jac, w
    else:
        rows, rhs = jac.T, w @ jac
    system = GaussNewtonSystem({"J": MatrixRows(rows)}, None, rhs, damping, step=step)
    if solver == "cholesky":  # (GGN's cholesky_solver, with this system's name in its messages)
        start = time.perf_counter()
        gram = system.dense()
        built = time.perf_counter()
        what = "Gauss-Newton Gram matrix J J^T" if space == "sample" else "Gauss-Newton matrix J^T J"
        solution, info = solve_damped_psd(gram, rhs, damping, what=what)
        info.seconds["gram"] = built - start
    else:
        solution, info = SOLVERS[solver](system, **options)
    return (solution @ jac if space == "sample" else solution), info


class MatrixRows(LayerFactors):
    """A matrix ``[n, q]`` as the rows of a Gauss-Newton system (GGN's systems take
    per-layer factors; here one block holds every column, ``params`` a flat stand-in)."""

    def __init__(self, rows: Tensor) -> None:
        self.module = None  # type: ignore[assignment]
        self.rows = rows
        self.params = [rows.new_empty(rows.shape[1])]  # type: ignore[list-item]
        self.num_rows = rows.shape[0]

    def gram(self) -> Tensor:
        return symmetric_gram([self.rows])

    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        return [coeffs.to(self.rows.dtype) @ self.rows]

    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        return self.rows @ torch.cat([v.reshape(-1) for v in vectors]).to(self.rows.dtype)

    def per_sample(self) -> Tensor:
        return self.rows

    def _dtype_source(self) -> Tensor:
        return self.rows

    def held_numel(self) -> float:
        return self.rows.numel()

    def held_rows(self) -> Tensor:
        return self.rows
