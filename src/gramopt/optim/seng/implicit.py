"""SENG's implicit layers (Section 3.3 and Algorithm 1 of
Minghan Yang, Dong Xu, Zaiwen Wen, Mengyun Chen, Pengxiang Xu, "Sketchy Empirical
Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020).

A layer whose factors have that form (its handler's
:meth:`~gramopt.capture.handlers.LayerHandler.low_rank_layout`: Linear, ungrouped Conv1d
and Conv2d) keeps per-sample factors ``G_i [r, n_G]`` and ``A_i [r, n_A]`` with
``u_i = vec(G_i^T A_i)`` (Eq. 15: G from the output-gradients, A from the inputs with a
last column of ones for the bias; :meth:`~gramopt.capture.factors.LayerFactors.low_rank_factors`),
truncated to rank r by an SVD when the layer
shares its weight over kappa > r positions. From them (the direction is that of
:mod:`gramopt.optim.seng.explicit`, ``d = (g - U^T beta) / lam``):

    U g      by Eq. 18, or sketched by Eq. 19        (Omega_G, Omega_A of Eq. 17)
    U U^T    by Eq. 20, or sketched by Eq. 21
    U^T beta by Eq. 23 (an approximation, :func:`eq23_product`) or exactly

Cached between refreshes: G and A (``b r (n_G + n_A)`` numbers); when unsketched, the
Gram and the kept Cholesky factor; with leverage sampling, the weights ``[n_G]``,
``[n_A]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.engine import Layer
from gramopt.capture.factors import LayerFactors, LowRankLayout
from gramopt.errors import NonFiniteError
from gramopt.linalg.dense import SolveInfo, all_finite, solve_damped_psd
from gramopt.linalg.kernels import shared_weight_gram
from gramopt.linalg.sketches import KroneckerSketch, RowSampleSketch
from gramopt.optim.seng.config import SketchConfig, sketch_rows
from gramopt.optim.seng.solve import kept_factor, solve_shifted, with_solve_state


def truncate(g: Tensor, a: Tensor, rank: int | None) -> tuple[Tensor, Tensor]:
    """Rank-r factors by an SVD of the smaller factor (Eq. 15 and its footnote 1).

    With ``G_i = P S Q^T`` (``[kappa, n_G]``), ``G_i^T A_i = Q S P^T A_i``: keeping the r
    leading singular triplets gives ``G_i' = S_r Q_r^T`` ``[r, n_G]`` and
    ``A_i' = P_r^T A_i`` ``[r, n_A]`` (symmetrically if A is the smaller factor). Exact
    when r >= that factor's rank. Signs are fixed (each row of the SVD'd factor has a
    positive entry of largest magnitude) so that Eq. 23, which pairs the factors' rows
    across samples, does not depend on the SVD's sign choice.
    """
    kappa = g.shape[1]
    if rank is None or kappa <= rank:
        return g, a
    swap = a.shape[2] < g.shape[2]
    left, right = (a, g) if swap else (g, a)
    p, s, qh = torch.linalg.svd(left, full_matrices=False)
    r = min(rank, s.shape[1])
    kept = s[:, :r, None] * qh[:, :r, :]  # [b, r, n_left]
    other = p[:, :, :r].transpose(1, 2) @ right  # [b, r, n_right]
    peak = kept.gather(2, kept.abs().argmax(dim=2, keepdim=True))
    sign = torch.where(peak < 0, -1.0, 1.0).to(kept.dtype)
    kept, other = kept * sign, other * sign
    return (other, kept) if swap else (kept, other)


def eq23_factors(coeffs: Tensor, g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """The two weighted factor sums of Eq. 23, ``[r, n_G]`` and ``[r, n_A]``:
    ``(sum_i sqrt|c_i| G_i, sum_i c_i / (sum_j sqrt|c_j|) A_i)`` (zeros if c = 0)."""
    root = coeffs.abs().sqrt()
    total = root.sum()
    if total == 0:
        return torch.zeros_like(g[0]), torch.zeros_like(a[0])
    return torch.einsum("b,brg->rg", root, g), torch.einsum("b,bra->ra", coeffs / total, a)


def eq23_product(coeffs: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """Eq. 23: ``U^T c ~ (sum_i sqrt|c_i| G_i)^T (sum_i c_i / (sum_j sqrt|c_j|) A_i)``.

    The exact ``U^T c = sum_i c_i G_i^T A_i`` needs b products of size ``n_G x n_A``
    (or one matmul of inner size b r); Eq. 23 replaces it by one product of inner size
    r, treating the G_i and A_i "as independent". It is exact when all G_i are equal
    (or all A_i are, up to the weights), and an approximation otherwise: the cross
    terms ``sqrt|c_i| c_k / S G_i^T A_k`` (i != k) do not vanish.

    Args:
        coeffs: c, ``[b]``.
        g: ``[b, r, n_G]``.
        a: ``[b, r, n_A]``.

    Returns:
        ``[n_G, n_A]``.
    """
    g_sum, a_sum = eq23_factors(coeffs, g, a)
    return g_sum.T @ a_sum


def exact_product(coeffs: Tensor, g: Tensor, a: Tensor) -> Tensor:
    """``U^T c = sum_i c_i G_i^T A_i``, ``[n_G, n_A]`` (one matmul of inner size b r)."""
    left, right = _exact_factors(coeffs, g, a)
    return left.T @ right


def _exact_factors(coeffs: Tensor, g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    b, r, n_g = g.shape
    return (coeffs.view(b, 1, 1) * g).reshape(b * r, n_g), a.reshape(b * r, -1)


class GradientMatrix:
    """``mat(g) = [weight gradient as [n_G, d_in] | bias gradient]`` ``[n_G, n_A]``,
    kept in its parts (never concatenated: for a wide layer that is a p-sized copy)."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None) -> None:
        self.weight = None if weight is None else weight.reshape(weight.shape[0], -1)
        self.bias = bias
        self.d_in = 0 if self.weight is None else self.weight.shape[1]

    def times_factor(self, a: Tensor) -> Tensor:
        """``A_i mat(g)^T`` for all i: ``[b, r, n_A] -> [b, r, n_G]``."""
        out = None
        if self.weight is not None:
            out = a[..., : self.d_in] @ self.weight.to(a.dtype).T
        if self.bias is not None:
            term = a[..., self.d_in :] * self.bias.to(a.dtype)
            out = term if out is None else out + term
        return out

    def columns(self, index: Tensor, dtype: torch.dtype) -> Tensor:
        """``mat(g)[:, index]``, ``[n_G, q]``."""
        n_g = (self.weight if self.weight is not None else self.bias).shape[0]
        out = torch.empty(n_g, index.numel(), dtype=dtype, device=index.device)
        in_weight = index < self.d_in
        if in_weight.any():
            out[:, in_weight] = self.weight[:, index[in_weight]].to(dtype)
        if not in_weight.all():
            out[:, ~in_weight] = self.bias.to(dtype).unsqueeze(1)
        return out


def factor_gram(a: Tensor, g: Tensor) -> Tensor:
    """``K_ij = elesum((A_i A_j^T) * (G_i G_j^T))`` (Eq. 20-21) for factors ``[b, r, n]``:
    the shared-weight Gram with the rank r as positions (:func:`shared_weight_gram`
    picks the cheaper of rank pairs and explicit vectors)."""
    return shared_weight_gram(a, g.unsqueeze(1))


class ImplicitCurvature:
    """Per-sample factors of a Linear or Conv layer (Section 3.3).

    Args:
        name: the layer's name.
        params: the layer's parameters covered (weight and/or bias, in that order).
        layout: which of them is the weight (and its shape ``[n_G, *]``) and which the
            bias (:class:`~gramopt.capture.factors.LowRankLayout`).
        g: ``[b, r, n_G]``; a: ``[b, r, n_A]`` (Eq. 15, the factors'
            :meth:`~gramopt.capture.factors.LayerFactors.low_rank_factors`).
        gram: Eq. 21 unsketched ``[b, b]``, or None when the factors are sketched.
        weights: ``(weights_G [n_G], weights_A [n_A])`` for leverage sampling, or None.
        exact: U^T beta exactly (True) or by Eq. 23 (False).
    """

    kind = "implicit"

    def __init__(
        self,
        name: str,
        params: list[nn.Parameter],
        layout: LowRankLayout,
        g: Tensor,
        a: Tensor,
        gram: Tensor | None,
        weights: tuple[Tensor, Tensor] | None,
        exact: bool,
        chol: tuple[Tensor, float] | None = None,
    ) -> None:
        self.name, self.params, self.layout = name, params, layout
        self.g, self.a, self.gram, self.weights, self.exact, self.chol = g, a, gram, weights, exact, chol

    @property
    def batch(self) -> int:
        return self.g.shape[0]

    @classmethod
    def build(
        cls, name: str, factors: LayerFactors, rank: int | None, sketched: bool, leverage: bool, exact: bool
    ) -> ImplicitCurvature:
        low_rank = factors.low_rank_factors()
        if low_rank is None:
            raise ValueError(f"internal: layer {name} has no low-rank factors; it cannot be implicit")
        layout, g, a = low_rank.layout, low_rank.g, low_rank.a
        if not (all_finite(g) and all_finite(a)):
            raise NonFiniteError(
                f"the per-sample gradients of layer {name} have NaN or inf entries; nothing was changed"
            )
        g, a = truncate(g, a, rank)
        gram = None if sketched else factor_gram(a, g)  # Eq. 20
        weights = (g.pow(2).sum(dim=(0, 1)), a.pow(2).sum(dim=(0, 1))) if sketched and leverage else None
        return cls(name, factors.params, layout, g, a, gram, weights, exact)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": self.kind, "g": self.g, "a": self.a}
        weights = {} if self.weights is None else {"weights_g": self.weights[0], "weights_a": self.weights[1]}
        return with_solve_state(state, self.gram, self.chol, **weights)

    @classmethod
    def from_state(cls, layer: Layer, state: dict[str, Any], exact: bool) -> ImplicitCurvature:
        weights = (state["weights_g"], state["weights_a"]) if "weights_g" in state else None
        layout = layer.low_rank_layout()
        if layout is None:
            raise ValueError(f"internal: layer {layer.name} has no low-rank layout; its cache cannot be implicit")
        g, a, gram = state["g"], state["a"], state.get("gram")
        return cls(layer.name, layer.params, layout, g, a, gram, weights, exact, kept_factor(state))

    def _matrix(self, grads: Sequence[Tensor]) -> GradientMatrix:
        return GradientMatrix(*self.layout.split(grads))

    def coefficients(
        self,
        grads: Sequence[Tensor],
        damping: float,
        rows: tuple[int, int] | None,
        sampling: str,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolveInfo]:
        """beta from Eq. 19 and 21, unsketched (``rows=None``) or with
        ``(zeta_G, zeta_A) = rows`` (Eq. 17)."""
        m = self._matrix(grads)
        what = f"SENG Gram matrix of layer {self.name}"
        if rows is None:
            if self.gram is None:
                self.gram = factor_gram(self.a, self.g)  # Eq. 20
            rhs = (m.times_factor(self.a) * self.g).sum(dim=(1, 2))  # Eq. 18: exact U g
            beta, info, self.chol = solve_shifted(
                self.gram, rhs.to(self.gram.dtype), self.batch * damping, self.chol, what
            )
            return beta, info
        else:
            w_g, w_a = self.weights if self.weights is not None else (None, None)
            if w_g is None and sampling == "leverage":
                w_g, w_a = self.g.pow(2).sum(dim=(0, 1)), self.a.pow(2).sum(dim=(0, 1))
            sketch = KroneckerSketch(
                RowSampleSketch(rows[0], self.g.shape[2], sampling=sampling, weights=w_g, generator=generator),
                RowSampleSketch(rows[1], self.a.shape[2], sampling=sampling, weights=w_a, generator=generator),
            )
            device = self.g.device
            cols = m.columns(sketch.inputs.index.to(device), self.g.dtype)  # mat(g) Omega_A^T, unscaled
            xi_z = sketch.grads.apply(cols, dim=0) * sketch.inputs.scale.to(device, self.g.dtype)
            xi_g, xi_a = sketch.sketch_grads(self.g), sketch.sketch_inputs(self.a)
            rhs = ((xi_a @ xi_z.T) * xi_g).sum(dim=(1, 2))  # Eq. 19
            gram = factor_gram(xi_a, xi_g)  # Eq. 21
        return solve_damped_psd(gram, rhs, self.batch * damping, what=what)

    def sketch_rows(self, sketch: SketchConfig | None) -> tuple[int, int] | None:
        """(zeta_G, zeta_A), the factor sketches' sizes of Eq. 17, or None when not sketched."""
        if sketch is None or sketch.factor_size is None:
            return None
        return sketch_rows(sketch.factor_size, self.g.shape[2]), sketch_rows(sketch.factor_size, self.a.shape[2])

    def combine(self, coeffs: Tensor) -> list[Tensor]:
        """``U^T beta = left^T right`` (exact, or Eq. 23), parameter-shaped fresh
        contiguous tensors: the weight and bias blocks are separate products, so no
        ``[n_G, n_A]`` tensor is sliced or copied."""
        coeffs = coeffs.to(self.g.dtype)
        left, right = (_exact_factors if self.exact else eq23_factors)(coeffs, self.g, self.a)
        out = []
        d_in = 0
        shape = self.layout.weight_shape
        if shape is not None:
            d_in = shape[1:].numel()
            out.append((left.T @ right[:, :d_in]).view(shape))
        if self.layout.bias:
            out.append(left.T @ right[:, d_in])
        return out
