"""SENG's explicit layers (``papers/001_*``, Section 3.2 and Algorithm 1).

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

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.conv import ConvFactors
from gramopt.capture.engine import Layer
from gramopt.capture.factors import ExplicitFactors, LayerFactors
from gramopt.capture.shared_weight import EmbeddingFactors, SharedWeightFactors
from gramopt.linalg.dense import SolveInfo, solve_damped_psd
from gramopt.linalg.sketches import RowSampleSketch
from gramopt.optim.seng_solve import kept_factor, solve_shifted, with_solve_state

#: Per-sample gradients of at most this many elements are formed at once (leverage weights).
CHUNK_ELEMENTS = 2**24


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
        return with_solve_state(state, self.gram, self.chol, weights=self.weights)

    @classmethod
    def from_state(cls, layer: Layer, state: dict[str, Any]) -> "ExplicitCurvature":
        return cls(layer.name, factors_from_state(layer, state), state.get("gram"), state.get("weights"), kept_factor(state))

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
            omega = RowSampleSketch(rows, self.factors.num_params, sampling=sampling, weights=weights, generator=generator)
            index = omega.index.to(grads[0].device)
            scale = omega.scale.to(grads[0].device, self.factors.dtype)
            xi = sampled_columns(self.factors, index) * scale  # U Omega^T, [b, q]
            gram = xi @ xi.T
            rhs = xi @ (_flat_gather(grads, index).to(xi.dtype) * scale)  # (U Omega^T)(Omega g)
        return solve_damped_psd(gram, rhs, self.batch * damping, what=what)

    def combine(self, coeffs: Tensor) -> list[Tensor]:
        """``U^T beta``, parameter-shaped (fresh tensors)."""
        return self.factors.rmatvec(coeffs)
