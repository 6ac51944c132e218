"""Per-layer factors of the sample-space matrix U.

For one layer l and one step, U_l is the n x p_l matrix whose rows are per-sample
vectors over the layer's trainable parameters (weight and bias together): output
Jacobian rows for Gauss-Newton, per-sample loss gradients for natural gradient
(every method of :mod:`gramopt.optim` works with ``K_l = U_l U_l^T``, ``[n, n]``). Rows
are ordered sample-major: with k backward passes over a batch of b samples, row
``r = i * k + c`` belongs to sample ``i`` and pass ``c``.

A :class:`LayerFactors` never has to materialize U_l. It offers what every method needs:

- ``gram()``: K_l = U_l U_l^T, ``[n, n]``;
- ``rmatvec(a)``: U_l^T a for coefficients ``a`` of shape ``[n]`` (or ``[n, m]`` for m
  right-hand sides), returned parameter-shaped, one tensor per parameter;
- ``matvec(v)``: U_l v for parameter-shaped ``v``, shape ``[n]``;
- ``per_sample()``: U_l itself, ``[n, p_l]`` (for tests, sketches and small layers);

and what the methods need beyond that, each with a generic default that a factor type
overrides where its structure makes it cheaper (so a new layer type is a new handler and
factor class, and nothing in ``gramopt.optim`` tests a factor's type):

- ``compact()``: U in its smaller exact form (the rows or the factors), ``held_numel()``;
- ``columns(index)``: ``U[:, index]``; ``column_norms()``: ``||U[:, j]||^2``; ``row_block(i0, i1)``;
- ``cross_gram(other, params)``: the cross block with another layer sharing ``params``;
- ``held_rows()``: U when held explicitly; ``kronecker_factors()``: (X, Z) of a layer
  ``y = W x + c`` (bias column appended to X) for Kronecker sketches, and
  ``kronecker_sides()``: their sizes, for cost estimates;
- ``low_rank_factors()``: G and A with rows ``vec(G_r^T A_r)`` (:class:`LowRankFactors`),
  SENG's implicit layers;
- ``state()`` / :meth:`LayerFactors.from_state`: the tensors, for an optimizer's state_dict;
- ``pass_block(b, r, m)``: the factors of the rows of each sample's first m passes (whose
  ``gram()`` is that block of K alone), ``block_product(b, r, m, c)``: those rows times
  ``U^T c`` (GGN's sampled systems use only these, :mod:`gramopt.optim.ggn.system`).

What a method needs to know of a layer before any factors exist (whether FNGD
preconditions it, whether SENG may keep it implicit, which parameter is the bias) its
handler says (:class:`~gramopt.capture.handlers.LayerHandler`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gramopt.linalg.dense import all_finite
from gramopt.linalg.kernels import symmetric_gram


@dataclass(frozen=True)
class LowRankLayout:
    """How a layer ``y_is = W x_is + c`` (a weight shared over kappa positions) writes its
    per-sample gradients as low-rank factors: row r of U is ``vec(G_r^T A_r)`` with
    ``G_r`` ``[kappa, n_G]`` (the output-gradients at the positions) and ``A_r``
    ``[kappa, n_A]`` (the inputs, then the bias's column), the factors of SENG's implicit
    layers (Eq. 15 of Yang et al., "Sketchy Empirical Natural Gradient Methods for Deep
    Learning", arXiv:2006.05924, 2020). Given by a handler
    (:meth:`~gramopt.capture.handlers.LayerHandler.low_rank_layout`) for a layer's covered
    parameters, before any factors exist.

    Attributes:
        output_features: n_G, the weight's first dimension (d_out).
        weight_shape: the weight's shape ``[d_out, *]`` when the weight is covered (the
            first parameter), else None.
        bias: whether the bias is covered (the last parameter).
    """

    output_features: int
    weight_shape: torch.Size | None
    bias: bool

    @property
    def input_features(self) -> int:
        """n_A: the weight's input width ``prod(weight_shape[1:])`` (if covered), plus one
        column for the bias (if covered)."""
        width = 0 if self.weight_shape is None else self.weight_shape[1:].numel()
        return width + int(self.bias)

    def split(self, tensors: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """``(weight's, bias's)`` of parameter-ordered tensors (one per covered parameter,
        e.g. gradients), None for a parameter not covered."""
        weight = tensors[0] if self.weight_shape is not None else None
        bias = tensors[-1] if self.bias else None
        return weight, bias


@dataclass(frozen=True)
class LowRankFactors:
    """The factors of :class:`LowRankLayout` for n rows of U: row r is ``vec(G_r^T A_r)``.

    Attributes:
        layout: which covered parameter is the weight and which the bias.
        g: G ``[n, kappa, n_G]``, the output-gradients of each row at kappa positions.
        a: A ``[n, kappa, n_A]``, the inputs of the row's sample (if the weight is
            covered), then the bias's column (if the bias is covered).
    """

    layout: LowRankLayout
    g: Tensor
    a: Tensor


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
    #: The name of the class's :meth:`state` form (registered for :meth:`from_state`).
    form: ClassVar[str | None] = None
    _forms: ClassVar[dict[str, type[LayerFactors]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("form") is not None:
            LayerFactors._forms[cls.form] = cls

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

    # -- structure the methods use (defaults through the rows of U) ----------------------
    def held_numel(self) -> float:
        """How many numbers the factors hold (inf: only their rows can be kept)."""
        return math.inf

    def compact(self) -> LayerFactors:
        """U in its smaller exact form: the explicit rows ``[n, p]`` or these factors."""
        if self.num_rows * self.num_params <= self.held_numel():
            return ExplicitFactors(self.module, self.params, self.per_sample())
        return self

    def held_rows(self) -> Tensor | None:
        """U ``[n, p]`` when the factors hold it explicitly, else None."""
        return None

    def kronecker_factors(self) -> tuple[Tensor, Tensor] | None:
        """For a layer ``y_is = W x_is + c``: X ``[b, s, d_in (+1 for a covered bias)]``
        and Z ``[b, k, s, d_out]``, the sides a Kronecker sketch ``S_G (x) S_A`` acts
        on; None for other layers."""
        return None

    def low_rank_factors(self) -> LowRankFactors | None:
        """G and A with row r of U equal to ``vec(G_r^T A_r)`` (weight block, then bias;
        :class:`LowRankFactors`), before any truncation; None for factors without that
        structure (the default; a tied block's rows also have cross terms)."""
        return None

    def kronecker_sides(self) -> tuple[int, int, int] | None:
        """``(s, d_in + 1, d_out)`` of :meth:`kronecker_factors` for cost estimates,
        without forming them; None for other layers."""
        return None

    def columns(self, index: Tensor) -> Tensor:
        """``U[:, index]``, ``[n, q]``."""
        return self.per_sample()[:, index]

    def cross_gram(self, other: LayerFactors, params: Sequence[nn.Parameter]) -> Tensor | None:
        """``U[:, S] U'[:, S]^T`` ``[n, n]`` with the factors ``other`` of another layer
        over the parameters S = ``params`` both cover (weight tying,
        :mod:`gramopt.capture.tied`), where the structure of both gives a cheaper form than
        their columns; None otherwise (the default: the block then uses the columns)."""
        return None

    def row_block(self, i0: int, i1: int) -> Tensor:
        """Rows ``i0:i1`` of U, ``[i1 - i0, p]``."""
        return self.per_sample()[i0:i1]

    def column_norms(self) -> Tensor:
        """``||U[:, j]||^2`` for every parameter j, ``[p]``, forming at most
        :data:`CHUNK_ELEMENTS` entries of U at once."""
        total = None
        chunk = max(1, CHUNK_ELEMENTS // max(1, self.num_params))
        for i0 in range(0, self.num_rows, chunk):
            part = self.row_block(i0, min(self.num_rows, i0 + chunk)).pow(2).sum(dim=0)
            total = part if total is None else total + part
        return total

    # -- blocks of rows (sampled Gauss-Newton systems) ---------------------------------------
    def pass_block(self, samples: int, passes: int, keep: int) -> LayerFactors:
        """The factors of the rows of the first ``keep`` of each sample's ``passes`` passes
        (rows are sample-major, ``n = samples * passes``): ``U[S]`` with
        ``S = {i * passes + c : c < keep}``, ``samples * keep`` rows. Its :meth:`gram` is
        the ``[S, S]`` block of this Gram, without the rest of it. Default: through the
        explicit rows; factor types override it with a view of their own tensors."""
        rows = self.per_sample().reshape(samples, passes, -1)[:, :keep].reshape(samples * keep, -1)
        return ExplicitFactors(self.module, self.params, rows)

    def block_product(self, samples: int, passes: int, keep: int, coeffs: Tensor) -> Tensor:
        """``U[S] U^T c`` for coefficients ``c`` ``[n]`` over all rows (S as in
        :meth:`pass_block`), ``[samples * keep]``: the rows of the block times the
        combination ``U^T c`` of all rows, without the ``[S, n]`` block of the Gram.
        Default: ``U^T c`` (one product with all rows), then one with the block's rows."""
        return self.pass_block(samples, passes, keep).matvec(self.rmatvec(coeffs))

    # -- state round trip ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The tensors of the factors with their ``"form"``, for an optimizer's state."""
        raise TypeError(f"cannot cache factors of type {type(self).__name__}")

    @classmethod
    def _from_state(cls, module: nn.Module, params: list[nn.Parameter], state: dict[str, Any]) -> LayerFactors:
        raise NotImplementedError

    @staticmethod
    def from_state(
        module: nn.Module, params: list[nn.Parameter], state: dict[str, Any], name: str = "?"
    ) -> LayerFactors:
        """The factors :meth:`state` saved, for ``module`` (``name``: for messages)."""
        cls = LayerFactors._forms.get(state["form"])
        if cls is None:
            raise ValueError(f"unknown cached form {state['form']!r} for layer {name}")
        return cls._from_state(module, params, state)


#: Per-sample gradients of at most this many elements are formed at once (column norms).
CHUNK_ELEMENTS = 2**24


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
        return symmetric_gram([self.rows])

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

    form = "rows"

    def held_numel(self) -> float:
        return self.rows.numel()

    def compact(self) -> LayerFactors:
        return self

    def held_rows(self) -> Tensor:
        return self.rows

    def columns(self, index: Tensor) -> Tensor:
        return self.rows[:, index]

    def column_norms(self) -> Tensor:
        return self.rows.pow(2).sum(dim=0)

    def pass_block(self, samples: int, passes: int, keep: int) -> LayerFactors:
        rows = self.rows.reshape(samples, passes, -1)[:, :keep].reshape(samples * keep, -1)
        return ExplicitFactors(self.module, self.params, rows)

    def block_product(self, samples: int, passes: int, keep: int, coeffs: Tensor) -> Tensor:
        rows = self.rows.reshape(samples, passes, -1)
        return rows[:, :keep].reshape(samples * keep, -1) @ (coeffs.to(self.rows.dtype) @ self.rows)

    def state(self) -> dict[str, Any]:
        return {"form": "rows", "rows": self.rows}

    @classmethod
    def _from_state(cls, module: nn.Module, params: list[nn.Parameter], state: dict[str, Any]) -> LayerFactors:
        return cls(module, params, state["rows"])


def unflatten(flat: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """Split a flat ``[p]`` vector into parameter-shaped tensors."""
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].view_as(p))
        start += p.numel()
    return out
