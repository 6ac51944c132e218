"""Solvers of the Gauss-Newton system ``(Q^T J J^T Q + damping I) a = w`` of one GGN step.

Every solver takes a :class:`~gramopt.optim.ggn.system.GaussNewtonSystem` and keyword options
(``GGN(..., solver=name, solver_options={...})``) and returns ``(a, SolveInfo)``:

==============  ==========================================================  ====================
solver          what it does                                                options (default)
==============  ==========================================================  ====================
``cholesky``    the Gram through the layers' structure, then Cholesky       none
``cg``          conjugate gradients, matrix-free (products with J, J^T)     tol, max_iter (1000)
``sketch-pcg``  fast regression (Algorithm 2 of [vdB]) on        tol, max_iter (200),
                ``A = J^T Q`` [p, n]: CG preconditioned by the Cholesky     sketch ("sparse"),
                factor of a *sketched* Gram, never the Gram itself          oversampling (4), seed (0)
``nystrom-pcg`` CG preconditioned by a randomized Nystrom approximation     tol, max_iter (200),
                of rank r built from r products with the Gram               rank (64), seed (0)
``auto``        ``cholesky`` or ``sketch-pcg`` by estimated cost (below)    the union of both
==============  ==========================================================  ====================

``tol`` is the relative residual ``||w - H a|| / ||w||`` (default 1e-8 in float64, 1e-4
otherwise: in float32 the residual of a product with H is itself only accurate to about
``eps ||H|| ||a||``, see benchmarks/notes.md). A solver that runs out of iterations
returns its last iterate with ``info.converged = False`` (GGN warns).

[vdB]: Jan van den Brand, Binghui Peng, Zhao Song, Omri Weinstein, "Training
(Overparametrized) Neural Networks in Near-Linear Time", ITCS 2021, arXiv:2006.11648.

The sketch of ``A = J^T Q`` (Lemma 3.3) needs a subspace embedding over the parameter
dimension p. Forming ``S J^T`` with a dense or fast transform over p costs at least
``n p`` per layer and would leave an ``[s, n]`` matrix to factor per layer. What is
cheapest is to sketch each layer through its factors with a :class:`KroneckerSketch`
``S_l = S_G (x) S_A`` and to factor the *sketched Gram* ``(S A)^T (S A) = Q^T (sum_l
(U_l S_l^T)(U_l S_l^T)^T) Q`` (the normal equations of the QR of S A: the same R). For a
layer ``y = W x + c`` applied at s positions, the rows of U_l are sums of ``z_rs x_is^T``;
a side of dimension D (d_out for the output-gradients z, d_in + 1 for the inputs with
the bias folded in) is sketched down to ``m = ceil(oversampling n s)`` rows when m < D,
and left exact otherwise. The sketched block is then the structured Gram of the
sketched factors, e.g. ``(Z S_G^T S_G Z^T) * (X X^T + 1)`` for s = 1, at cost
``zeta n d_out + n^2 (m + d_in)`` instead of ``n^2 (d_out + d_in)``. Because S_G embeds
the span of the z's with distortion delta (``||S_G v||`` within ``(1 +- delta) ||v||``,
Definition 3.2 of [vdB]), ``(1 - delta)^2 Z Z^T <= Z S_G^T S_G Z^T <= (1 + delta)^2 Z Z^T``
and, by the Schur product theorem, the same bounds hold for the layer's block, the sum
and the sandwich with Q: the preconditioned system has condition number at most
``((1 + delta) / (1 - delta))^2`` (as in :mod:`gramopt.linalg.regression`); with both
sides sketched the factors of S_G and S_A multiply. Layers too small to gain (most of a deep MLP at a batch
larger than its width) keep their exact block: sketch-pcg then costs more than
cholesky, which is what ``auto`` weighs.

``auto`` estimates the cost of both in flops of the Gram's large matmul: cholesky = exact
Gram + n^3/3; sketch-pcg = sketched Gram + n^3/3 + the sketch's application and
``AUTO_PCG_ITERATIONS`` products with the Gram (each ~4 times the flops of a weight
gradient), the last two weighted by how much slower per flop they run than one large
matmul (``PRODUCT_PENALTY``, ``SKETCH_PENALTY``: measured by benchmarks/gn_solvers.py
on 2 CPU cores, where a product is a matmul with a narrow side of d_in columns and the
sparse sketch a sparse-dense product). It takes the cheaper estimate.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gramopt.capture.factors import LayerFactors, unflatten
from gramopt.linalg.dense import SolveInfo, solve_damped_psd
from gramopt.linalg.kernels import shared_weight_gram_flops
from gramopt.linalg.krylov import nystrom_preconditioner, pcg
from gramopt.linalg.operators import LinearOperator
from gramopt.linalg.regression import fast_regression
from gramopt.linalg.sketches import SKETCHES, KroneckerSketch, make_sketch
from gramopt.optim.ggn.system import GaussNewtonSystem

#: CG iterations auto budgets for sketch-pcg (about what its solves take at float32's
#: default tol in benchmarks/gn_solvers.py).
AUTO_PCG_ITERATIONS = 8
#: Flop-rate ratios (large matmul / narrow matrix-free product, / sparse sketch).
PRODUCT_PENALTY = 8.0
SKETCH_PENALTY = 50.0
#: nonzeros per column of the sparse sketch (for the cost model).
SPARSE_ZETA = 8


def default_tol(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-4


class GaussNewtonOperator(LinearOperator):
    """``A = J^T Q`` ``[p, n]`` of a Gauss-Newton system, by products through the factors.

    ``matmul(a)`` = ``J^T Q a`` (one weighted weight-gradient per layer, flattened and
    concatenated in the factors' order), ``rmatmul(v)`` = ``Q^T J v``,
    ``normal_matvec(a)`` = ``Q^T J J^T Q a`` (no flattening) and :meth:`sketch_gram` the
    per-layer Kronecker sketch of the module doc.
    """

    def __init__(self, system: GaussNewtonSystem) -> None:
        self.system = system
        self.factors = list(system.factors.values())
        p = sum(f.num_params for f in self.factors)
        self.shape = (p, system.size)
        self.dtype, self.device = system.rhs.dtype, system.rhs.device

    def matmul(self, v: Tensor) -> Tensor:
        qa = self.system.apply_q(v)
        return torch.cat([g.reshape(-1) for f in self.factors for g in f.rmatvec(qa)])

    def rmatmul(self, u: Tensor) -> Tensor:
        out, start = self.system.rhs.new_zeros(self.system.rows), 0
        for f in self.factors:
            out = out + f.matvec(unflatten(u[start : start + f.num_params], f.params))
            start += f.num_params
        return self.system.apply_qt(out)

    def normal_matvec(self, v: Tensor) -> Tensor:
        return self.system.matvec(v)

    def sketch_gram(self, kind: str, oversampling: float, generator: torch.Generator | None) -> Tensor:
        gram = None
        for f in self.factors:
            block = sketched_layer_gram(f, kind, oversampling, generator)
            gram = block if gram is None else gram + block
        return self.system.sandwich(gram)


def _side_sketch(kind: str, target: int, dim: int, generator, device) -> Any:
    return make_sketch(kind, target, dim, generator=generator, device=device) if target < dim else None


def sketched_layer_gram(f: LayerFactors, kind: str, oversampling: float, generator: torch.Generator | None) -> Tensor:
    """``(U_l S_l^T)(U_l S_l^T)^T`` ``[n, n]`` for the layer's sketch S_l (module doc);
    the exact ``U_l U_l^T`` where sketching would not make it smaller."""
    n = f.num_rows
    kronecker = f.kronecker_factors()
    if kronecker is not None:
        x, z = kronecker
        target = math.ceil(oversampling * n * z.shape[2])
        s_g = _side_sketch(kind, target, z.shape[-1], generator, z.device)
        s_a = _side_sketch(kind, target, x.shape[-1], generator, z.device)
        if s_g is None and s_a is None:
            return f.gram()
        return KroneckerSketch(s_g, s_a).gram(x, z)
    rows = f.held_rows()
    if rows is not None:
        target = math.ceil(oversampling * n)
        if target < f.num_params:
            rows = make_sketch(kind, target, f.num_params, generator=generator, device=rows.device).apply(rows, dim=1)
            return rows @ rows.T
    return f.gram()


def _generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


# -- the solvers -----------------------------------------------------------------------


def cholesky_solver(system: GaussNewtonSystem) -> tuple[Tensor, SolveInfo]:
    """Build the Gram through the layers' structure, then a Cholesky solve (with the
    jitter / eigen-solve fallbacks of :func:`~gramopt.linalg.solve_damped_psd`)."""
    start = time.perf_counter()
    gram = system.dense()
    built = time.perf_counter()
    a, info = solve_damped_psd(gram, system.rhs.to(gram.dtype), system.damping, what="GGN Gram matrix")
    info.seconds["gram"] = built - start
    return a, info


def _damped(system: GaussNewtonSystem) -> Callable[[Tensor], Tensor]:
    d = system.damping
    return (lambda a: system.matvec(a) + d * a) if d else system.matvec


def cg_solver(system: GaussNewtonSystem, *, tol: float | None = None, max_iter: int = 1000) -> tuple[Tensor, SolveInfo]:
    """Unpreconditioned conjugate gradients with ``Q^T J J^T Q + damping I``."""
    tol = default_tol(system.rhs.dtype) if tol is None else tol
    return pcg(_damped(system), system.rhs, tol=tol, max_iter=max_iter, method="cg")


def sketch_pcg_solver(
    system: GaussNewtonSystem,
    *,
    tol: float | None = None,
    max_iter: int = 200,
    sketch: str = "sparse",
    oversampling: float = 4.0,
    seed: int = 0,
) -> tuple[Tensor, SolveInfo]:
    """:func:`~gramopt.linalg.fast_regression` on ``A = J^T Q`` with the per-layer
    Kronecker sketch (module doc); the sketch is drawn from ``(seed, step)``."""
    tol = default_tol(system.rhs.dtype) if tol is None else tol
    operator = GaussNewtonOperator(system)
    return fast_regression(
        operator,
        system.rhs,
        damping=system.damping,
        tol=tol,
        sketch=sketch,
        oversampling=oversampling,
        generator=_generator(seed, system.step, operator.device),
        max_iter=max_iter,
    )


def nystrom_pcg_solver(
    system: GaussNewtonSystem, *, tol: float | None = None, max_iter: int = 200, rank: int = 64, seed: int = 0
) -> tuple[Tensor, SolveInfo]:
    """CG preconditioned by the rank-r randomized Nystrom approximation of the Gram
    (r products with the Gram, :func:`~gramopt.linalg.krylov.nystrom_preconditioner`)."""
    tol = default_tol(system.rhs.dtype) if tol is None else tol
    n = system.size
    start = time.perf_counter()
    precond = nystrom_preconditioner(
        system.matvec,
        n,
        min(rank, n),
        system.damping,
        generator=_generator(seed, system.step, system.rhs.device),
        dtype=system.rhs.dtype,
        device=system.rhs.device,
    )
    built = time.perf_counter() - start
    a, info = pcg(_damped(system), system.rhs, precond=precond, tol=tol, max_iter=max_iter, method="nystrom-pcg")
    info.seconds = {"sketch": built, **info.seconds}
    return a, info


# -- auto --------------------------------------------------------------------------------


def estimated_flops(system: GaussNewtonSystem, oversampling: float = 4.0) -> dict[str, float]:
    """Flop estimates of one solve: ``{"cholesky", "sketch-pcg", "gram_product"}``."""
    n = system.size
    exact = sketched = product = 0.0
    for f in system.factors.values():
        e, s_, p_ = _layer_flops(f, n, oversampling)
        exact, sketched, product = exact + e, sketched + s_, product + p_
    factor = n**3 / 3
    return {
        "cholesky": exact + factor,
        "sketch-pcg": sketched + factor + PRODUCT_PENALTY * AUTO_PCG_ITERATIONS * product,
        "gram_product": product,
    }


def _layer_flops(f: LayerFactors, n: int, oversampling: float) -> tuple[float, float, float]:
    """(exact Gram, sketched Gram incl. the sketch, one product ``U U^T a``) flops."""
    sides = f.kronecker_sides()
    if sides is not None:
        s, d_in, d_out = sides
        product = 4.0 * n * s * d_in * d_out
        target = math.ceil(oversampling * n * s)
        exact = shared_weight_gram_flops(n, s, d_in, d_out)
        m_g, m_a = min(target, d_out), min(target, d_in)
        sketch = (
            SKETCH_PENALTY * 2.0 * SPARSE_ZETA * n * s * ((d_out if m_g < d_out else 0) + (d_in if m_a < d_in else 0))
        )
        sketched = exact if (m_g, m_a) == (d_out, d_in) else sketch + shared_weight_gram_flops(n, s, m_a, m_g)
        return exact, sketched, product
    p = f.num_params
    exact = 2.0 * n * n * p
    target = math.ceil(oversampling * n)
    sketched = exact if target >= p else SKETCH_PENALTY * 2.0 * SPARSE_ZETA * n * p + 2.0 * n * n * target
    return exact, sketched, 4.0 * n * p


def choose_solver(system: GaussNewtonSystem, oversampling: float = 4.0) -> str:
    """``"sketch-pcg"`` if its estimated cost is lower than cholesky's, else ``"cholesky"``."""
    cost = estimated_flops(system, oversampling)
    return "sketch-pcg" if cost["sketch-pcg"] < cost["cholesky"] else "cholesky"


def auto_solver(
    system: GaussNewtonSystem,
    *,
    tol: float | None = None,
    max_iter: int = 200,
    sketch: str = "sparse",
    oversampling: float = 4.0,
    seed: int = 0,
) -> tuple[Tensor, SolveInfo]:
    """``cholesky`` or ``sketch-pcg``, whichever :func:`choose_solver` picks."""
    if choose_solver(system, oversampling) == "cholesky":
        return cholesky_solver(system)
    return sketch_pcg_solver(system, tol=tol, max_iter=max_iter, sketch=sketch, oversampling=oversampling, seed=seed)


Solver = Callable[..., tuple[Tensor, SolveInfo]]

#: Solvers by name; ``GGN(solver=...)`` picks one, ``solver_options`` sets its keyword options.
SOLVERS: dict[str, Solver] = {
    "cholesky": cholesky_solver,
    "cg": cg_solver,
    "sketch-pcg": sketch_pcg_solver,
    "nystrom-pcg": nystrom_pcg_solver,
    "auto": auto_solver,
}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tol": (lambda v: v is None or (_number(v) and 0 < v < 1), "None or a number in (0, 1)"),
    "max_iter": (_positive_int, "a positive int"),
    "sketch": (lambda v: v in SKETCHES, f"one of {sorted(SKETCHES)}"),
    "oversampling": (lambda v: _number(v) and v >= 1, "a number >= 1"),
    "rank": (_positive_int, "a positive int"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
}


def check_solver_options(solver: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``options`` for ``solver``; returns a copy. ValueError names each problem."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    options = dict(options or {})
    accepted = [p.name for p in inspect.signature(SOLVERS[solver]).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"solver {solver!r} takes no option {unknown}; it takes {accepted}")
    for name, value in options.items():
        check, expected = _OPTION_CHECKS[name]
        if not check(value):
            raise ValueError(f"solver option {name} must be {expected}, got {value!r}")
    return options
