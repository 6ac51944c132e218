"""Per-layer factors of the sample-space matrix U.

For one layer l and one step, U_l is the n x p_l matrix whose rows are per-sample
vectors over the layer's trainable parameters (weight and bias together): output
Jacobian rows for Gauss-Newton, per-sample loss gradients for natural gradient
(DESIGN.md section 1). Rows are ordered sample-major: with k backward passes over a
batch of b samples, row ``r = i * k + c`` belongs to sample ``i`` and pass ``c``.

A :class:`LayerFactors` never has to materialize U_l. It offers what every method needs:

- ``gram()``: K_l = U_l U_l^T, ``[n, n]``;
- ``rmatvec(a)``: U_l^T a for coefficients ``a`` of shape ``[n]`` (or ``[n, m]`` for m
  right-hand sides), returned parameter-shaped, one tensor per parameter;
- ``matvec(v)``: U_l v for parameter-shaped ``v``, shape ``[n]``;
- ``per_sample()``: U_l itself, ``[n, p_l]`` (for tests, sketches and small layers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN or inf, by one min/max reduction: ``isfinite(t).all()``
    allocates ``t.abs()`` and boolean masks, several times the memory of a wide layer's
    gradient."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) and torch.isfinite(high))



class LayerFactors(ABC):
    """The factors of one layer's block of U for one step.

    Attributes:
        module: the layer.
        params: its trainable parameters covered by the block, in a fixed order
            (weight, then bias, where present and trainable).
        num_rows: n, the number of rows of U_l.
    """

    module: nn.Module
    params: list[nn.Parameter]
    num_rows: int

    @abstractmethod
    def gram(self) -> Tensor:
        """K_l = U_l U_l^T, shape ``[n, n]``."""

    @abstractmethod
    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        """U_l^T a for ``a`` of shape ``[n]``; one parameter-shaped tensor per parameter."""

    @abstractmethod
    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        """U_l v for parameter-shaped ``v`` (one tensor per parameter); shape ``[n]``."""

    @abstractmethod
    def per_sample(self) -> Tensor:
        """U_l explicitly, shape ``[n, p_l]`` (parameters flattened and concatenated in
        the order of ``params``)."""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the factors (at least float32)."""
        return self._dtype_source().dtype

    @abstractmethod
    def _dtype_source(self) -> Tensor:
        """A tensor of the factors whose dtype is the compute dtype."""

    def tensors(self) -> list[Tensor]:
        """The tensors the factors are built from (default: U itself)."""
        return [self.per_sample()]

    def is_finite(self) -> bool:
        """Whether every entry of U is finite (checked on :meth:`tensors`)."""
        return all(all_finite(t) for t in self.tensors() if t.is_floating_point())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


class ExplicitFactors(LayerFactors):
    """Factors held as the explicit matrix U_l ``[n, p_l]``.

    Used for layers whose per-sample gradients are small (norm layers' affine
    parameters) and as the simplest way for users to support their own module types:
    a handler only has to produce per-sample gradients.
    """

    def __init__(self, module: nn.Module, params: list[nn.Parameter], rows: Tensor) -> None:
        self.module = module
        self.params = params
        self.rows = rows
        self.num_rows = rows.shape[0]

    def gram(self) -> Tensor:
        return self.rows @ self.rows.T

    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        flat = coeffs.to(self.rows.dtype) @ self.rows
        return unflatten(flat, self.params)

    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        flat = torch.cat([v.reshape(-1).to(self.rows.dtype) for v in vectors])
        return self.rows @ flat

    def per_sample(self) -> Tensor:
        return self.rows

    def _dtype_source(self) -> Tensor:
        return self.rows

    def tensors(self) -> list[Tensor]:
        return [self.rows]


def unflatten(flat: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """Split a flat ``[p]`` vector into parameter-shaped tensors."""
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out
