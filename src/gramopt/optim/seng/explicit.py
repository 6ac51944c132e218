"""SENG's explicit layers (Section 3.2 and Algorithm 1 of
Minghan Yang, Dong Xu, Zaiwen Wen, Mengyun Chen, Pengxiang Xu, "Sketchy Empirical
Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020).

For a layer with per-sample loss gradients u_i (rows of U ``[b, p]``, from the refresh
step) and the current batch gradient g, SENG moves along

    d = (M + lam I)^{-1} g,     M = U^T U / b                                  (Eq. 2, 5, 7)
      = (g - U^T beta) / lam,   beta = (U U^T + b lam I)^{-1} U g              (Eq. 8-9)

(the paper's ``U_S = U^T / sqrt(b)``, ``a = 1/lam`` and ``b = beta sqrt(b)``); the
optimizer steps by ``-lr d``. An explicit layer holds U in whichever exact form is
smaller: the rows U ``[b, p]``, or the capture engine's factors (for a Linear layer X
and Z, ``b (d_in + d_out)`` numbers instead of ``b d_in d_out``; for a convolution its
inputs and output-gradients): the paper's own criterion ``n > (n_G + n_A) kappa``.
Optionally the least-squares problem behind beta is sketched by row sampling
(Eq. 10-14): ``beta = (Xi Xi^T + b lam I)^{-1} Xi xi`` with ``Xi = U Omega^T``,
``xi = Omega g``, and d keeps the full U (Eq. 13).

Cached between refreshes (``extra_state["curvature"][layer]``): that form of U; when
unsketched, the Gram ``U U^T`` ``[b, b]`` and the Cholesky factor of
``U U^T + b lam I`` with its shift (a non-refresh step at constant damping costs U g,
two triangular solves and U^T beta); with leverage sampling, the weights ``[p]``.
Sketches are drawn anew every step (Algorithm 1) from the optimizer's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.engine import Layer
from gramopt.capture.factors import LayerFactors
from gramopt.linalg.dense import SolveInfo, solve_damped_psd
from gramopt.linalg.sketches import RowSampleSketch
from gramopt.optim.seng.config import SketchConfig, sketch_rows
from gramopt.optim.seng.solve import kept_factor, solve_shifted, with_solve_state


def _flat_gather(tensors: Sequence[Tensor], index: Tensor) -> Tensor:
    """``cat([t.reshape(-1) for t in tensors])[index]`` without the concatenation."""
    out = torch.empty(index.numel(), dtype=tensors[0].dtype, device=tensors[0].device)
    start = 0
    for t in tensors:
        mask = (index >= start) & (index < start + t.numel())
        if mask.any():
            out[mask] = t.reshape(-1)[index[mask] - start]
        start += t.numel()
    return out


class ExplicitCurvature:
    """U of one layer held exactly (rows or factors), with its Gram when unsketched.

    Args:
        name: the layer's name (for messages).
        factors: U, compact (:meth:`LayerFactors.compact`).
        gram: ``U U^T`` ``[b, b]``, or None when the least-squares problem is sketched.
        weights: leverage weights ``[p]`` (:meth:`LayerFactors.column_norms`: Eq. 14's
            weights, the squared row norms of the paper's ``U_S = U^T / sqrt(b)`` up to
            the factor b), or None.
    """

    kind = "explicit"

    def __init__(
        self,
        name: str,
        factors: LayerFactors,
        gram: Tensor | None,
        weights: Tensor | None,
        chol: tuple[Tensor, float] | None = None,
    ) -> None:
        self.name, self.factors, self.gram, self.weights, self.chol = name, factors, gram, weights, chol

    @property
    def params(self) -> list[nn.Parameter]:
        return self.factors.params

    @property
    def batch(self) -> int:
        return self.factors.num_rows

    @classmethod
    def build(cls, name: str, factors: LayerFactors, sketched: bool, leverage: bool) -> ExplicitCurvature:
        u = factors.compact()
        gram = None if sketched else u.gram()
        weights = u.column_norms() if sketched and leverage else None
        return cls(name, u, gram, weights)

    def state(self) -> dict[str, Any]:
        state = {"kind": self.kind, **self.factors.state()}
        return with_solve_state(state, self.gram, self.chol, weights=self.weights)

    @classmethod
    def from_state(cls, layer: Layer, state: dict[str, Any]) -> ExplicitCurvature:
        factors = LayerFactors.from_state(layer.module, layer.params, state, layer.name)
        return cls(layer.name, factors, state.get("gram"), state.get("weights"), kept_factor(state))

    def coefficients(
        self,
        grads: Sequence[Tensor],
        damping: float,
        rows: int | None,
        sampling: str,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolveInfo]:
        """beta of Eq. 9 (``rows=None``) or of the sketched Eq. 12 with q = ``rows``."""
        what = f"SENG Gram matrix of layer {self.name}"
        if rows is None:
            if self.gram is None:
                self.gram = self.factors.gram()  # U U^T
            rhs = self.factors.matvec(grads)  # U g
            beta, info, self.chol = solve_shifted(
                self.gram, rhs.to(self.gram.dtype), self.batch * damping, self.chol, what
            )
            return beta, info
        else:
            weights = self.weights
            if weights is None and sampling == "leverage":
                weights = self.factors.column_norms()
            omega = RowSampleSketch(
                rows, self.factors.num_params, sampling=sampling, weights=weights, generator=generator
            )
            index = omega.index.to(grads[0].device)
            scale = omega.scale.to(grads[0].device, self.factors.dtype)
            xi = self.factors.columns(index) * scale  # U Omega^T, [b, q]
            gram = xi @ xi.T
            rhs = xi @ (_flat_gather(grads, index).to(xi.dtype) * scale)  # (U Omega^T)(Omega g)
        return solve_damped_psd(gram, rhs, self.batch * damping, what=what)

    def sketch_rows(self, sketch: SketchConfig | None) -> int | None:
        """q, the sampled rows of Eq. 11-12, or None when not sketched."""
        if sketch is None or sketch.size is None:
            return None
        return sketch_rows(sketch.size, self.factors.num_params)

    def combine(self, coeffs: Tensor) -> list[Tensor]:
        """``U^T beta``, parameter-shaped (fresh tensors)."""
        return self.factors.rmatvec(coeffs)
