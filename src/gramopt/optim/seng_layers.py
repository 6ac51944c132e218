"""One layer's part of SENG's direction (``papers/001_*``, Algorithm 1).

For a layer with per-sample loss gradients u_i (rows of U ``[b, p]``, from the refresh
step) and the current batch gradient g, SENG moves along

    d = (M + lam I)^{-1} g,     M = U^T U / b                                  (Eq. 2, 5, 7)
      = (g - U^T beta) / lam,   beta = (U U^T + b lam I)^{-1} U g              (Eq. 8-9)

(the paper's ``U_S = U^T / sqrt(b)``, ``a = 1/lam`` and ``b = beta sqrt(b)``). The
optimizer steps by ``-lr d``. A layer's curvature is one of:

- :class:`ExplicitCurvature` (Section 3.2): U in whichever exact form is smaller: the
  rows U ``[b, p]`` or the capture engine's factors (for a Linear layer, X and Z:
  ``b (d_in + d_out)`` numbers instead of ``b d_in d_out``; the paper's own criterion
  ``n > (n_G + n_A) kappa``). Optionally the least-squares problem behind beta is
  sketched by row sampling (Eq. 10-14): ``beta = (Xi Xi^T + b lam I)^{-1} Xi xi`` with
  ``Xi = U Omega^T``, ``xi = Omega g``, and d keeps the full U (Eq. 13).
- :class:`ImplicitCurvature` (Section 3.3): per-sample factors ``G_i [r, n_G]``,
  ``A_i [r, n_A]`` with ``u_i = vec(G_i^T A_i)`` (Eq. 15; the bias is a last column of
  ones in A), optionally truncated to rank r by an SVD, optionally sketched
  (Eq. 17, 19, 21), and U^T beta by Eq. 23 or exactly.

What is cached between refreshes (``extra_state["curvature"][layer]``): the form of U
above (the smaller of the rows, ``b p`` numbers, and the layer's captured inputs and
output-gradients; implicit: ``b r (n_G + n_A)``); when
nothing is sketched, the Gram ``U U^T`` ``[b, b]`` and the Cholesky factor of
``U U^T + b lam I`` with its shift (so a non-refresh step at constant damping costs U g,
two triangular solves and U^T beta); the sampling weights ``[p]`` (or ``[n_G]``,
``[n_A]``) when leverage sampling is used. Sketches are drawn anew every step
(Algorithm 1), from the optimizer's generator (``extra_state["sketch_rng"]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.conv import ConvFactors
from gramopt.capture.engine import Layer
from gramopt.capture.factors import ExplicitFactors, LayerFactors
from gramopt.capture.shared_weight import EmbeddingFactors, SharedWeightFactors
from gramopt.errors import NonFiniteError
from gramopt.linalg.dense import SolveInfo, solve_damped_psd
from gramopt.linalg.kron_sketch import KroneckerRowSketch, RowSample, factor_gram, factor_inner

#: Per-sample gradients of at most this many elements are formed at once (leverage weights).
CHUNK_ELEMENTS = 2**24


def solve_shifted(
    gram: Tensor, rhs: Tensor, shift: float, cached: tuple[Tensor, float] | None, what: str
) -> tuple[Tensor, SolveInfo, tuple[Tensor, float] | None]:
    """``(gram + shift I)^{-1} rhs`` and the Cholesky factor to keep for the next step.

    ``cached`` is ``(L, shift')`` from an earlier step with the same gram: reused when
    ``shift' == shift`` (one triangular solve pair), so steps between curvature refreshes
    with a constant damping cost no factorization. A failed factorization goes to
    :func:`~gramopt.linalg.solve_damped_psd`'s fallbacks (jitter, eigen-solve) and is
    not kept.
    """
    if not torch.isfinite(rhs).all():
        raise NonFiniteError(
            f"U g for the {what} has NaN or inf entries (is the loss, hence the gradient, finite?); nothing was changed"
        )
    if cached is not None and cached[1] == shift:
        return torch.cholesky_solve(rhs.unsqueeze(1), cached[0]).squeeze(1), SolveInfo("cholesky (kept)"), cached
    if not torch.isfinite(gram).all():
        raise NonFiniteError(f"the {what} has NaN or inf entries; nothing was changed")
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, failed = torch.linalg.cholesky_ex(gram + shift * eye)
    if not failed:
        return torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1), SolveInfo("cholesky"), (chol, shift)
    beta, info = solve_damped_psd(gram, rhs, shift, what=what)
    return beta, info, None


# -- explicit layers ------------------------------------------------------------------
def compact(factors: LayerFactors) -> LayerFactors:
    """U in its smaller exact form: the explicit rows ``[b, p]`` or the factors."""
    if isinstance(factors, ExplicitFactors):
        return factors
    if isinstance(factors, ConvFactors):  # the layer's inputs and output-gradients
        held = sum(x.numel() + g.numel() for x, g in factors.raw)
    elif isinstance(factors, SharedWeightFactors):  # X [b, s, d_in] and Z [b, k, s, d_out], by their shapes
        d_out, d_in = factors.weight_shape[0], factors.weight_shape[1:].numel()
        held = factors.batch_size * factors.positions * (d_in + factors.passes * d_out)
    elif isinstance(factors, EmbeddingFactors):
        held = factors.indices.numel() + factors.grads.numel()
    else:  # a user's factor type: only its rows can be cached
        held = math.inf
    if factors.num_rows * factors.num_params <= held:
        return ExplicitFactors(factors.module, factors.params, factors.per_sample())
    return factors


def sampled_columns(factors: LayerFactors, index: Tensor) -> Tensor:
    """``U[:, index]``, ``[b, q]``, without forming U where the factors allow it."""
    if isinstance(factors, ExplicitFactors):
        return factors.rows[:, index]
    if isinstance(factors, SharedWeightFactors) and factors.passes == 1:
        z = factors.grads[:, 0]  # [b, s, d_out]
        d_in = factors.inputs.shape[-1]
        n_weight = factors.weight_shape.numel() if factors.with_weight else 0
        out = torch.empty(factors.batch_size, index.numel(), dtype=z.dtype, device=z.device)
        is_weight = index < n_weight
        if is_weight.any():
            w = index[is_weight]
            out[:, is_weight] = (z[:, :, w // d_in] * factors.inputs[:, :, w % d_in]).sum(dim=1)
        if not is_weight.all():
            out[:, ~is_weight] = z.sum(dim=1)[:, index[~is_weight] - n_weight]
        return out
    return factors.per_sample()[:, index]


def column_weights(factors: LayerFactors) -> Tensor:
    """``||U[:, j]||^2`` for every parameter j, ``[p]``: Eq. 14's leverage weights (the
    squared row norms of the paper's ``U_S = U^T / sqrt(b)``, up to the factor b)."""
    if isinstance(factors, ExplicitFactors):
        return factors.rows.pow(2).sum(dim=0)
    if isinstance(factors, SharedWeightFactors) and factors.positions == 1 and factors.passes == 1:
        z2 = factors.grads[:, 0, 0].pow(2)  # [b, d_out]
        parts = []
        if factors.with_weight:
            parts.append((z2.T @ factors.inputs[:, 0].pow(2)).reshape(-1))
        if factors.with_bias:
            parts.append(z2.sum(dim=0))
        return torch.cat(parts)
    total = None
    chunk = max(1, CHUNK_ELEMENTS // max(1, factors.num_params))
    for i0 in range(0, factors.num_rows, chunk):
        rows = _row_chunk(factors, i0, min(factors.num_rows, i0 + chunk))
        part = rows.pow(2).sum(dim=0)
        total = part if total is None else total + part
    return total


def _row_chunk(factors: LayerFactors, i0: int, i1: int) -> Tensor:
    """Rows ``i0:i1`` of U (one row per sample)."""
    if isinstance(factors, SharedWeightFactors) and factors.passes == 1:
        z = factors.grads[i0:i1, 0]  # [c, s, d_out]
        parts = []
        if factors.with_weight:
            parts.append(torch.einsum("bsz,bsx->bzx", z, factors.inputs[i0:i1]).reshape(i1 - i0, -1))
        if factors.with_bias:
            parts.append(z.sum(dim=1))
        return torch.cat(parts, dim=1)
    return factors.per_sample()[i0:i1]


def factors_state(factors: LayerFactors) -> dict[str, Any]:
    """The tensors of a compact U, for ``extra_state``."""
    if isinstance(factors, ExplicitFactors):
        return {"form": "rows", "rows": factors.rows}
    if isinstance(factors, ConvFactors):
        return {"form": "conv", "inputs": [x for x, _ in factors.raw], "grads": [g for _, g in factors.raw]}
    if isinstance(factors, SharedWeightFactors):
        return {"form": "shared", "inputs": factors.inputs, "grads": factors.grads}
    if isinstance(factors, EmbeddingFactors):
        return {"form": "embedding", "indices": factors.indices, "grads": factors.grads}
    raise TypeError(f"cannot cache factors of type {type(factors).__name__}")


def factors_from_state(layer: Layer, state: dict[str, Any]) -> LayerFactors:
    module, params = layer.module, layer.params
    if state["form"] == "rows":
        return ExplicitFactors(module, params, state["rows"])
    if state["form"] == "conv":
        return ConvFactors(module, params, state["inputs"], state["grads"])
    if state["form"] == "shared":
        return SharedWeightFactors(module, params, module.weight, module.bias, state["inputs"], state["grads"])
    if state["form"] == "embedding":
        return EmbeddingFactors(module, params, state["indices"], state["grads"], module.num_embeddings)
    raise ValueError(f"unknown cached form {state['form']!r} for layer {layer.name}")


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
        factors: U, compact (:func:`compact`).
        gram: ``U U^T`` ``[b, b]``, or None when the least-squares problem is sketched.
        weights: leverage weights ``[p]`` (:func:`column_weights`), or None.
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
    def build(cls, name: str, factors: LayerFactors, sketched: bool, leverage: bool) -> "ExplicitCurvature":
        u = compact(factors)
        gram = None if sketched else u.gram()
        weights = column_weights(u) if sketched and leverage else None
        return cls(name, u, gram, weights)

    def state(self) -> dict[str, Any]:
        state = {"kind": self.kind, **factors_state(self.factors)}
        return _with_solve_state(state, self.gram, self.chol, weights=self.weights)

    @classmethod
    def from_state(cls, layer: Layer, state: dict[str, Any]) -> "ExplicitCurvature":
        return cls(layer.name, factors_from_state(layer, state), state.get("gram"), state.get("weights"), _chol(state))

    def coefficients(
        self, grads: Sequence[Tensor], damping: float, rows: int | None, sampling: str, generator: torch.Generator | None
    ) -> tuple[Tensor, SolveInfo]:
        """beta of Eq. 9 (``rows=None``) or of the sketched Eq. 12 with q = ``rows``."""
        what = f"SENG Gram matrix of layer {self.name}"
        if rows is None:
            if self.gram is None:
                self.gram = self.factors.gram()  # U U^T
            rhs = self.factors.matvec(grads)  # U g
            beta, info, self.chol = solve_shifted(self.gram, rhs.to(self.gram.dtype), self.batch * damping, self.chol, what)
            return beta, info
        else:
            weights = self.weights
            if weights is None and sampling == "leverage":
                weights = column_weights(self.factors)
            omega = RowSample.draw(self.factors.num_params, rows, sampling, weights, generator)
            index = omega.index.to(grads[0].device)
            scale = omega.scale.to(grads[0].device, self.factors.dtype)
            xi = sampled_columns(self.factors, index) * scale  # U Omega^T, [b, q]
            gram = xi @ xi.T
            rhs = xi @ (_flat_gather(grads, index).to(xi.dtype) * scale)  # (U Omega^T)(Omega g)
        return solve_damped_psd(gram, rhs, self.batch * damping, what=what)

    def combine(self, coeffs: Tensor) -> list[Tensor]:
        """``U^T beta``, parameter-shaped (fresh tensors)."""
        return self.factors.rmatvec(coeffs)


# -- implicit layers ------------------------------------------------------------------
def layer_factors(factors: SharedWeightFactors) -> tuple[Tensor, Tensor]:
    """``(G, A)`` of Eq. 15 before truncation: ``G [b, kappa, n_G]`` (the output-gradients
    z_is) and ``A [b, kappa, n_A]`` (the inputs x_is, then a column of ones for the
    bias), so that ``u_i = vec(G_i^T A_i) = vec([weight gradient | bias gradient])``."""
    if factors.passes != 1:
        raise ValueError("SENG's per-sample gradients come from one backward pass (k = 1)")
    g = factors.grads[:, 0]
    parts = [factors.inputs] if factors.with_weight else []
    if factors.with_bias:
        parts.append(torch.ones(*factors.inputs.shape[:2], 1, dtype=g.dtype, device=g.device))
    return g, torch.cat(parts, dim=2)


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


class ImplicitCurvature:
    """Per-sample factors of a Linear or Conv layer (Section 3.3).

    Args:
        name: the layer's name.
        params: the layer's parameters covered (weight and/or bias, in that order).
        weight_shape: the weight's shape (``[n_G, *]``).
        g: ``[b, r, n_G]``; a: ``[b, r, n_A]`` (Eq. 15, see :func:`layer_factors`).
        gram: Eq. 21 unsketched ``[b, b]``, or None when the factors are sketched.
        weights: ``(weights_G [n_G], weights_A [n_A])`` for leverage sampling, or None.
        exact: U^T beta exactly (True) or by Eq. 23 (False).
    """

    kind = "implicit"

    def __init__(
        self,
        name: str,
        params: list[nn.Parameter],
        weight_shape: torch.Size,
        g: Tensor,
        a: Tensor,
        gram: Tensor | None,
        weights: tuple[Tensor, Tensor] | None,
        exact: bool,
        chol: tuple[Tensor, float] | None = None,
    ) -> None:
        self.name, self.params, self.weight_shape = name, params, weight_shape
        self.g, self.a, self.gram, self.weights, self.exact, self.chol = g, a, gram, weights, exact, chol

    @property
    def batch(self) -> int:
        return self.g.shape[0]

    @classmethod
    def build(
        cls, name: str, factors: SharedWeightFactors, rank: int | None, sketched: bool, leverage: bool, exact: bool
    ) -> "ImplicitCurvature":
        g, a = truncate(*layer_factors(factors), rank)
        gram = None if sketched else factor_gram(a, g)
        weights = (g.pow(2).sum(dim=(0, 1)), a.pow(2).sum(dim=(0, 1))) if sketched and leverage else None
        return cls(name, factors.params, factors.weight_shape, g, a, gram, weights, exact)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": self.kind, "g": self.g, "a": self.a}
        weights = {} if self.weights is None else {"weights_g": self.weights[0], "weights_a": self.weights[1]}
        return _with_solve_state(state, self.gram, self.chol, **weights)

    @classmethod
    def from_state(cls, layer: Layer, state: dict[str, Any], exact: bool) -> "ImplicitCurvature":
        weights = (state["weights_g"], state["weights_a"]) if "weights_g" in state else None
        return cls(
            layer.name, layer.params, layer.module.weight.shape, state["g"], state["a"], state.get("gram"), weights, exact, _chol(state)
        )

    def _matrix(self, grads: Sequence[Tensor]) -> GradientMatrix:
        weight = grads[0] if self.params[0].dim() > 1 else None
        bias = grads[-1] if self.params[-1].dim() == 1 else None
        return GradientMatrix(weight, bias)

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
            beta, info, self.chol = solve_shifted(self.gram, rhs.to(self.gram.dtype), self.batch * damping, self.chol, what)
            return beta, info
        else:
            w_g, w_a = self.weights if self.weights is not None else (None, None)
            if w_g is None and sampling == "leverage":
                w_g, w_a = self.g.pow(2).sum(dim=(0, 1)), self.a.pow(2).sum(dim=(0, 1))
            sketch = KroneckerRowSketch(
                RowSample.draw(self.g.shape[2], rows[0], sampling, w_g, generator),
                RowSample.draw(self.a.shape[2], rows[1], sampling, w_a, generator),
            )
            device = self.g.device
            cols = m.columns(sketch.inputs.index.to(device), self.g.dtype)  # mat(g) Omega_A^T, unscaled
            xi_z = sketch.grads.apply(cols, dim=0) * sketch.inputs.scale.to(device, self.g.dtype)
            xi_g, xi_a = sketch.sketch_grads(self.g), sketch.sketch_inputs(self.a)
            rhs = factor_inner(xi_a, xi_g, xi_z)  # Eq. 19
            gram = factor_gram(xi_a, xi_g)  # Eq. 21
        return solve_damped_psd(gram, rhs, self.batch * damping, what=what)

    def combine(self, coeffs: Tensor) -> list[Tensor]:
        """``U^T beta = left^T right`` (exact, or Eq. 23), parameter-shaped fresh
        contiguous tensors: the weight and bias blocks are separate products, so no
        ``[n_G, n_A]`` tensor is sliced or copied."""
        coeffs = coeffs.to(self.g.dtype)
        left, right = (_exact_factors if self.exact else eq23_factors)(coeffs, self.g, self.a)
        out = []
        d_in = 0
        if self.params[0].dim() > 1:
            d_in = self.weight_shape[1:].numel()
            out.append((left.T @ right[:, :d_in]).view(self.weight_shape))
        if self.params[-1].dim() == 1:
            out.append(left.T @ right[:, d_in])
        return out


def _with_solve_state(state: dict[str, Any], gram: Tensor | None, chol: tuple[Tensor, float] | None, **extra: Tensor) -> dict[str, Any]:
    if gram is not None:
        state["gram"] = gram
    if chol is not None:
        state["chol"], state["chol_shift"] = chol
    state.update(extra)
    return state


def _chol(state: dict[str, Any]) -> tuple[Tensor, float] | None:
    return (state["chol"], state["chol_shift"]) if "chol" in state else None
