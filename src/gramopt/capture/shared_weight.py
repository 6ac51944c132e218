"""Factors of layers that apply one weight at several positions.

A Linear layer on ``[b, *, d_in]`` inputs, a Conv2d on unfolded patches and an
Embedding all compute, for sample i at position s, ``y_is = W x_is (+ c)``. With
output-gradients z_rs (row r of U belongs to sample i = r // k), the per-sample
gradient is a sum over positions, ``G_r = sum_s z_rs x_is^T`` (bias: ``sum_s z_rs``),
and the Gram entries are

    K_rq = sum_{s,t} (z_rs . z_qt) (x_is . x_jt)  +  (sum_s z_rs) . (sum_t z_qt)     (*)

(the sample-space kernel ``K = U U^T`` of :mod:`gramopt.capture.factors`), built by
position pairs or from explicit per-sample gradients, whichever costs fewer flops
(:mod:`gramopt.linalg.kernels`, which holds both forms and their cost model).
:class:`SharedWeightFactors` picks per layer (plain Linear layers, s = 1, always use
position pairs, which is the well-known ``(Z Z^T) * (X X^T + 1)``).
Embedding inputs are one-hot, so ``x_is . x_jt`` becomes ``[idx_is == idx_jt]``.

Bias indicator: a layer called on derivative channels (:mod:`gramopt.capture.channels`)
computes ``y_is = W x_is + m_is c`` with ``m_is`` in {0, 1} (the bias reaches the value
channel only). The bias is then the weight of one more input column ``m``: its per-sample
gradient is ``sum_s m_is z_rs`` and the bias term of (*) is
``(sum_s m_is z_rs) . (sum_t m_jt z_qt)``. ``m = 1`` everywhere (no indicator) is the
ordinary layer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.factors import LayerFactors, LowRankFactors, LowRankLayout
from gramopt.linalg.kernels import (
    EXPLICIT_MAX_ELEMENTS,
    PAIR_CHUNK_ELEMENTS,
    bias_sum,
    gram_strategy,
    position_pair_gram,
    shared_weight_gram,
    symmetric_gram,
)


def weighted_sum(grads: Tensor, coeffs: Tensor, b: int, k: int) -> Tensor:
    """``sum_c a_(i,c) g_(i,c)`` for grads ``[b, k, ...]`` and coefficients ``[b k]``:
    ``[b, ...]`` (one multiply when k = 1)."""
    a = coeffs.view(b, k, *([1] * (grads.dim() - 2)))
    if k == 1:
        return grads[:, 0] * a[:, 0]
    return (a * grads).sum(dim=1)


#: Weighting the inputs instead of the output-gradients must save at least this many
#: multiplications to pay for the extra reduction it needs for the bias.
WEIGHT_INPUTS_MIN_SAVING = 2**16


def weight_inputs(input_side: int, output_side: int, with_weight: bool) -> bool:
    """Whether a product with U should put its coefficients on the inputs (a temporary
    of ``input_side`` elements, ``[b, k, s, d_in]``) rather than on the output-gradients
    (``output_side`` elements, ``[b, s, d_out]``): FNGD's "weighted inputs" (its
    Algorithm 1), worth it when the input side is at most half as large and that saves
    enough work (e.g. a wide first layer, or the first convolution of a CNN)."""
    return with_weight and 2 * input_side <= output_side and output_side - input_side >= WEIGHT_INPUTS_MIN_SAVING


class SharedWeightFactors(LayerFactors):
    """Factors of ``y_is = W x_is + c`` with dense inputs.

    Args:
        module: the layer.
        params: trainable parameters covered, a subset of ``(weight, bias)`` in that order.
        weight: the layer's weight (trainable or not); it is viewed as ``[d_out, d_in]``.
        bias: the layer's bias or ``None``.
        inputs: X, ``[b, s, d_in]``.
        grads: Z, ``[b, k, s, d_out]`` (already scaled).
        bias_positions: the bias indicator m ``[b, s]``: the bias enters position s of
            sample i ``m_is`` times (module doc; :mod:`gramopt.capture.channels`). None: at
            every position once, as in an ordinary layer.
    """

    #: m ``[b, s]`` (see the module doc), or None for an ordinary layer.
    bias_positions: Tensor | None = None

    def __init__(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        weight: Tensor,
        bias: Tensor | None,
        inputs: Tensor,
        grads: Tensor,
        bias_positions: Tensor | None = None,
    ) -> None:
        self.module = module
        self.params = params
        self.with_weight = any(p is weight for p in params)
        self.with_bias = bias is not None and any(p is bias for p in params)
        self.weight_shape = weight.shape
        self.inputs = inputs
        self.grads = grads
        b, k, s, d_out = grads.shape
        self.batch_size, self.passes, self.positions = b, k, s
        self.d_in, self.d_out = inputs.shape[-1], d_out
        self.num_rows = b * k
        if bias_positions is not None:
            if bias_positions.shape != (b, s):
                raise ValueError(f"bias_positions must be [b, s] = {[b, s]}, got {list(bias_positions.shape)}")
            self.bias_positions = bias_positions

    def _dtype_source(self) -> Tensor:
        return self.grads

    def tensors(self) -> list[Tensor]:
        return [self.inputs, self.grads]

    def bias_inputs(self) -> Tensor:
        """The bias's input column ``[b, s, 1]``: m (module doc), or ones."""
        x = self.inputs
        if self.bias_positions is None:
            return torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return self.bias_positions.to(x.dtype).unsqueeze(-1)

    def _bias_sum(self, z: Tensor, samples: slice = slice(None)) -> Tensor:
        """``sum_s m_is z_is`` for z ``[c, s, d_out]`` (one pass; the ``samples`` of the batch),
        ``[c, d_out]``."""
        if self.bias_positions is None:
            return z.sum(dim=1)
        return torch.einsum("bsz,bs->bz", z, self.bias_positions[samples].to(z.dtype))

    # -- the Gram ---------------------------------------------------------------------
    def gram(self) -> Tensor:
        where = self.pass_positions()
        if where is not None:
            return self._one_position_gram(where)
        if self.with_weight and self.positions > 1 and self.gram_strategy() == "explicit":
            rows = self.explicit_rows()  # kept: U^T a then needs one GEMV per parameter
            return symmetric_gram(rows)
        input_gram = self.input_gram() if self.with_weight and self.positions == 1 else None
        inputs = self.inputs if self.with_weight else None
        return shared_weight_gram(inputs, self.grads, self.with_bias, "pairs", input_gram, self.bias_positions)

    def pass_positions(self) -> Tensor | None:
        """With several positions: ``[k]``, the one position each pass reaches, when every
        pass's output-gradients are zero at all its other positions in every sample (else
        None). That is the structure of ``curvature="top"`` on sequence outputs ([b, C, T]
        logits, one pass per position and column) in the layers after the last one that
        mixes positions (an LM head, the MLP after the last attention): each row is then
        ``z_(i,c) x_(i,t_c)^T``, one position, and :meth:`gram` costs ``n^2 (d_in + d_out)``
        instead of ``n^2 d_in d_out`` (explicit rows) or ``n^2 s^2 d_out`` (position pairs).
        A pass that is zero everywhere (an ignored position) takes position 0: its rows are zero."""
        if self.positions == 1:
            return None
        # the first sample alone first: most layers fail there, at 1/b of the full check's cost
        # (the full check on the mnist CNN's first convolution costs 70% of its Gram)
        if bool((self.grads[0].ne(0).any(dim=2).sum(dim=1) > 1).any()):
            return None
        active = self.grads.ne(0).any(dim=3).any(dim=0)  # [k, s]
        if bool((active.sum(dim=1) > 1).any()):
            return None
        return active.to(torch.uint8).argmax(dim=1)

    def _one_position_gram(self, where: Tensor) -> Tensor:
        """``K = (Z Z^T) * (X X^T + 1)`` over rows ``(i, c)`` with ``z_(i,c) = Z[i, c, t_c]``
        and ``x_(i,c) = X[i, t_c]`` (:meth:`pass_positions`; the bias adds ``m_(i,c) m_(j,c')``
        with ``m_(i,c) = m[i, t_c]``, 1 without an indicator), ``[n, n]``."""
        b, k, _, d_out = self.grads.shape
        n = b * k
        z = self.grads.gather(2, where.view(1, k, 1, 1).expand(b, k, 1, d_out)).reshape(n, d_out)
        zz = z @ z.T
        m = None if self.bias_positions is None else self.bias_positions[:, where].reshape(n, 1).to(zz.dtype)
        if not self.with_weight:
            return zz if m is None or not self.with_bias else zz.mul_(m @ m.T)
        x = self.inputs[:, where].reshape(n, self.d_in)  # [b, k, d_in]: each pass's position
        xx = x @ x.T
        if self.with_bias:
            xx += 1.0 if m is None else m @ m.T
        return zz.mul_(xx)

    def input_gram(self) -> Tensor:
        """``X X^T`` ``[b, b]`` for one position per sample (formed once; the blocks of
        :meth:`pass_block` share it)."""
        xx = self.__dict__.get("_input_gram")
        if xx is None:
            x = self.inputs.reshape(self.batch_size, -1)
            xx = self._input_gram = x @ x.T
        return xx

    # -- blocks of rows (sampled Gauss-Newton systems) ------------------------------------
    def pass_block(self, samples: int, passes: int, keep: int) -> LayerFactors:
        """The rows of the first ``keep`` passes: the same inputs, Z ``[b, keep, s, d_out]``
        (a view); ``X X^T`` is shared once formed."""
        if (samples, passes) != (self.batch_size, self.passes):
            return super().pass_block(samples, passes, keep)
        block = copy.copy(self)
        block.__dict__.pop("_rows", None)
        block._keep_passes(keep)
        block.passes, block.num_rows = keep, samples * keep
        return block

    def _keep_passes(self, keep: int) -> None:
        """Keep the output-gradients of the first ``keep`` passes (on a copy)."""
        self.grads = self.grads[:, :keep]

    def block_product(self, samples: int, passes: int, keep: int, coeffs: Tensor) -> Tensor:
        """``U[S] U^T c``. With one position per sample (a plain Linear layer), row
        ``(i, c)`` of it is ``z_ic . sum_j (x_i . x_j + 1) zbar_j`` with
        ``zbar_j = sum_c' c_(j,c') z_jc'``: ``b^2 (d_in + d_out)`` multiplications (and
        ``X X^T`` is the one the block's Gram uses) instead of two products with the
        weight's ``2 b d_in d_out``; the default (:class:`LayerFactors`) where that is cheaper."""
        b, d_in, d_out = self.batch_size, self.d_in, self.d_out
        if (
            self.positions != 1
            or self.bias_positions is not None
            or (samples, passes) != (b, self.passes)
            or b * (d_in + d_out) >= 2 * d_in * d_out
        ):
            return super().block_product(samples, passes, keep, coeffs)
        z = self.grads[:, :, 0]  # [b, k, d_out]
        zbar = weighted_sum(z, coeffs.to(z.dtype), b, passes)  # [b, d_out]
        if self.with_weight:
            kernel = self.input_gram() + 1.0 if self.with_bias else self.input_gram()
            y = kernel @ zbar
        else:  # the bias alone: every pair of samples has kernel 1
            y = zbar.sum(dim=0, keepdim=True).expand(b, d_out)
        return (z[:, :keep] * y.unsqueeze(1)).sum(dim=2).reshape(b * keep)

    # -- explicit per-sample gradients ----------------------------------------------------
    def explicit_rows(self) -> list[Tensor]:
        """Per parameter (weight, then bias) its block of U, ``[n, numel]``. Formed once
        per step; once formed, :meth:`rmatvec` uses it (one GEMV per parameter)."""
        rows = self.__dict__.get("_rows")
        if rows is None:
            rows = self._rows = self._form_rows()
        return rows

    def _form_rows(self) -> list[Tensor]:
        rows = []
        if self.with_weight:
            n = self.num_rows
            rows.append(torch.einsum("bksz,bsx->bkzx", self.grads, self.inputs).reshape(n, -1))
        if self.with_bias:
            rows.append(self._bias_rows())
        return rows

    def _bias_rows(self) -> Tensor:
        """Per-sample bias gradients, the output-gradients summed over positions (weighted by
        the bias indicator, if any), ``[n, d_out]``."""
        return bias_sum(self.grads, self.bias_positions)

    def _param_shapes(self) -> list[torch.Size]:
        return ([self.weight_shape] if self.with_weight else []) + (
            [torch.Size([self.d_out])] if self.with_bias else []
        )

    def _rmatvec_explicit(self, coeffs: Tensor) -> list[Tensor] | None:
        """U^T a from the explicit rows if they were formed this step, else None."""
        rows = self.__dict__.get("_rows")
        if rows is None:
            return None
        a = coeffs.to(rows[0].dtype)
        return [(a @ u).view(shape) for u, shape in zip(rows, self._param_shapes(), strict=True)]

    def gram_strategy(self) -> str:
        """``"pairs"`` or ``"explicit"``, whichever costs fewer flops (see module doc)."""
        return gram_strategy(self.d_in, torch.Size((self.batch_size, self.passes, self.positions, self.d_out)))

    # -- products ---------------------------------------------------------------------
    # Both products are one GEMM with the weight. Their temporaries are either
    # output-gradient-sized ``[b, s, d_out]`` or input-sized ``[b, k, s, d_in]``; the
    # input side is used when it is much smaller (:func:`weight_inputs`), so a product
    # streams through Z once (the matrix-free Gauss-Newton solvers apply U U^T many times).
    def _input_side(self) -> bool:
        b, k, s = self.batch_size, self.passes, self.positions
        return weight_inputs(k * b * s * self.d_in, b * s * self.d_out, self.with_weight)

    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        """``U^T a = Z^T diag(a) X``: one weight-gradient matmul, with the coefficients
        applied to the smaller of the inputs and the output-gradients (or one GEMV per
        parameter if U was formed this step for the Gram)."""
        explicit = self._rmatvec_explicit(coeffs)
        if explicit is not None:
            return explicit
        b, k, s, d_in, d_out = self.batch_size, self.passes, self.positions, self.d_in, self.d_out
        if coeffs.dtype != self.grads.dtype:
            coeffs = coeffs.to(self.grads.dtype)
        if self._input_side():
            flat_z = self.grads.reshape(-1, d_out)
            weighted = (coeffs.view(b, k, 1, 1) * self.inputs.unsqueeze(1)).reshape(-1, d_in)  # a_(i,c) x_is
            out = [(flat_z.T @ weighted).view(self.weight_shape)]
            if self.with_bias:
                out.append(flat_z.T @ (coeffs.view(b, k, 1) * self.bias_inputs().reshape(b, 1, s)).reshape(-1))
            return out
        if k == 1:  # (the ordinary backward pass: one multiply, no reduction over passes)
            zbar = self.grads.reshape(b, s * d_out).mul(coeffs.view(b, 1))
            if s > 1:
                zbar = zbar.view(b * s, d_out)
        else:
            zbar = weighted_sum(self.grads, coeffs, b, k).reshape(-1, d_out)
        out = []
        if self.with_weight:
            g = torch.mm(zbar.t(), self.inputs.reshape(-1, d_in))
            out.append(g if g.shape == self.weight_shape else g.view(self.weight_shape))
        if self.with_bias:
            m = self.bias_positions
            out.append(zbar.sum(dim=0) if m is None else self._bias_sum(zbar.view(b, s, d_out)).sum(dim=0))
        return out

    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        b, k, s, d_in, d_out = self.batch_size, self.passes, self.positions, self.d_in, self.d_out
        vectors = [v.to(self.grads.dtype) for v in vectors]
        if self._input_side():
            flat_z = self.grads.reshape(-1, d_out)
            zv = (flat_z @ vectors[0].reshape(d_out, d_in)).view(b, k, s, d_in)
            out = torch.einsum("bksx,bsx->bk", zv, self.inputs)
            if self.with_bias:
                out = out + ((flat_z @ vectors[1]).view(b, k, s) * self.bias_inputs().reshape(b, 1, s)).sum(dim=2)
            return out.reshape(b * k)
        m = self.bias_positions
        if self.with_weight and s == 1 and k == 1 and m is None:  # (one mm, then in place: no temporaries)
            y = torch.mm(self.inputs.reshape(b, d_in), vectors[0].reshape(d_out, -1).t())
            if self.with_bias:
                y += vectors[1]
            return y.mul_(self.grads.reshape(b, d_out)).sum(dim=1)
        v_bias = None
        if self.with_bias:  # m_is v_b: the bias's share of the output
            v_bias = vectors[-1] if m is None else self.bias_inputs() * vectors[-1]
        if self.with_weight:  # y_is = V x_is (+ m_is v_b): the layer's output under weight v
            y = self.inputs @ vectors[0].reshape(d_out, -1).T
            if v_bias is not None:
                y = y + v_bias
        else:
            y = v_bias.expand(b, s, d_out)
        if k == 1:
            return (self.grads[:, 0] * y).sum(dim=(1, 2))
        return torch.einsum("bksz,bsz->bk", self.grads, y).reshape(b * k)

    def per_sample(self) -> Tensor:
        rows = self.explicit_rows()
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)

    # -- structure the methods use ------------------------------------------------------------
    form = "shared"

    def held_numel(self) -> float:
        """X ``[b, s, d_in]`` and Z ``[b, k, s, d_out]``, by their shapes."""
        d_out, d_in = self.weight_shape[0], self.weight_shape[1:].numel()
        return self.batch_size * self.positions * (d_in + self.passes * d_out)

    def kronecker_factors(self) -> tuple[Tensor, Tensor]:
        x = self.inputs
        if not self.with_weight:
            return self.bias_inputs(), self.grads
        return (torch.cat([x, self.bias_inputs()], dim=-1) if self.with_bias else x), self.grads

    def kronecker_sides(self) -> tuple[int, int, int]:
        return self.positions, self.d_in + 1, self.d_out

    def low_rank_factors(self) -> LowRankFactors:
        """G ``[n, s, d_out]``: the output-gradients of each row; A ``[n, s, n_A]``: its
        sample's inputs (if the weight is covered), then the bias's column (if the bias is
        covered: ones, or the bias indicator m), so that row r of U is ``vec(G_r^T A_r)``.
        With one pass (k = 1), G is a view of the output-gradients."""
        b, k, s = self.batch_size, self.passes, self.positions
        g = self.grads[:, 0] if k == 1 else self.grads.reshape(b * k, s, self.d_out)
        parts = [self.inputs] if self.with_weight else []
        if self.with_bias:
            parts.append(self.bias_inputs().to(g.dtype))
        a = torch.cat(parts, dim=2)
        if k > 1:  # each pass's row has its sample's inputs
            a = a.repeat_interleave(k, dim=0)
        layout = LowRankLayout(self.d_out, self.weight_shape if self.with_weight else None, self.with_bias)
        return LowRankFactors(layout, g, a)

    def columns(self, index: Tensor) -> Tensor:
        """``U[:, index]``: ``sum_s z_rs[o] x_is[j]`` for weight entry (o, j), ``sum_s z_rs[o]``
        for bias entry o, never the whole of U."""
        z = self.grads  # [b, k, s, d_out]
        n, d_in = self.num_rows, self.inputs.shape[-1]
        n_weight = self.weight_shape.numel() if self.with_weight else 0
        out = torch.empty(n, index.numel(), dtype=z.dtype, device=z.device)
        is_weight = index < n_weight
        if is_weight.any():
            w = index[is_weight]
            if self.passes == 1:
                out[:, is_weight] = (z[:, 0][:, :, w // d_in] * self.inputs[:, :, w % d_in]).sum(dim=1)
            else:
                per_pass = torch.einsum("bksq,bsq->bkq", z[..., w // d_in], self.inputs[:, :, w % d_in])
                out[:, is_weight] = per_pass.reshape(n, -1)
        if not is_weight.all():
            out[:, ~is_weight] = bias_sum(z, self.bias_positions)[:, index[~is_weight] - n_weight]
        return out

    def cross_gram(self, other: LayerFactors, params: Sequence[nn.Parameter]) -> Tensor | None:
        """The cross block with another layer ``y'_jt = W x'_jt (+ c)`` sharing the weight
        (and/or the bias): ``sum_{s,t} (z_rs . z'_qt) (x_is . x'_jt (+ 1))``, by position
        pairs or the explicit rows, whichever costs fewer flops (as :meth:`gram`)."""
        if not isinstance(other, SharedWeightFactors):
            return None
        if (other.batch_size, other.passes) != (self.batch_size, self.passes):
            return None
        if self.bias_positions is not None or other.bias_positions is not None:
            return None  # (derivative channels: the generic columns form is exact)
        weight = self.with_weight and other.with_weight and self.params[0] is other.params[0]
        bias = self.with_bias and other.with_bias and self.params[-1] is other.params[-1]
        covered = [p for p in (self.params[0] if weight else None, self.params[-1] if bias else None) if p is not None]
        if not covered or len(covered) != len(params) or not all(any(p is q for q in covered) for p in params):
            return None
        b, k, n = self.batch_size, self.passes, self.num_rows
        if not weight:
            return self.grads.sum(dim=2).reshape(n, -1) @ other.grads.sum(dim=2).reshape(n, -1).T
        s1, s2, d_in, d_out = self.positions, other.positions, self.d_in, self.d_out
        if s1 == 1 and s2 == 1:
            xx = self.inputs.reshape(b, d_in) @ other.inputs.reshape(b, d_in).T
            if bias:
                xx += 1.0
            zz = self.grads.reshape(n, d_out) @ other.grads.reshape(n, d_out).T
            return zz.mul_(xx) if k == 1 else (zz.view(b, k, b, k) * xx.view(b, 1, b, 1)).view(n, n)
        pairs = n * n * s1 * s2 * (d_out + 2) + b * b * s1 * s2 * d_in
        formed = sum("_rows" not in f.__dict__ for f in (self, other))
        explicit = formed * n * max(s1, s2) * d_in * d_out + n * n * d_in * d_out
        if explicit < pairs and n * d_in * d_out <= EXPLICIT_MAX_ELEMENTS:
            mine, theirs = self.explicit_rows(), other.explicit_rows()
            out = mine[0] @ theirs[0].T
            return out.addmm_(mine[-1], theirs[-1].T) if bias else out
        flat_x = other.inputs.reshape(-1, d_in)

        def input_kernel(i0: int, i1: int) -> Tensor:
            xx = (self.inputs[i0:i1].reshape(-1, d_in) @ flat_x.T).view(i1 - i0, s1, b, s2)
            return xx + 1.0 if bias else xx

        return position_pair_gram(self.grads, input_kernel, other.grads)

    def row_block(self, i0: int, i1: int) -> Tensor:
        if self.passes != 1:
            return super().row_block(i0, i1)
        z = self.grads[i0:i1, 0]  # [c, s, d_out]
        parts = []
        if self.with_weight:
            parts.append(torch.einsum("bsz,bsx->bzx", z, self.inputs[i0:i1]).reshape(i1 - i0, -1))
        if self.with_bias:
            parts.append(self._bias_sum(z, slice(i0, i1)))
        return torch.cat(parts, dim=1)

    def column_norms(self) -> Tensor:
        if self.positions != 1 or self.passes != 1:
            return super().column_norms()
        z2 = self.grads[:, 0, 0].pow(2)  # [b, d_out]
        parts = []
        if self.with_weight:
            parts.append((z2.T @ self.inputs[:, 0].pow(2)).reshape(-1))
        if self.with_bias:
            m2 = None if self.bias_positions is None else self.bias_inputs()[:, 0].pow(2)
            parts.append(z2.sum(dim=0) if m2 is None else (z2 * m2).sum(dim=0))
        return torch.cat(parts)

    def state(self) -> dict[str, Any]:
        out = {"form": "shared", "inputs": self.inputs, "grads": self.grads}
        if self.bias_positions is not None:
            out["bias_positions"] = self.bias_positions
        return out

    @classmethod
    def _from_state(cls, module: nn.Module, params: list[nn.Parameter], state: dict[str, Any]) -> LayerFactors:
        return cls(
            module, params, module.weight, module.bias, state["inputs"], state["grads"], state.get("bias_positions")
        )


class EmbeddingFactors(LayerFactors):
    """Factors of an Embedding ``y_is = W[idx_is]``: a Linear layer on one-hot inputs.

    Args:
        indices: ``[b, s]`` integer indices.
        grads: Z, ``[b, k, s, d]``; positions at ``padding_idx`` must already be zeroed.
        num_embeddings: V; the weight is ``[V, d]``.
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        indices: Tensor,
        grads: Tensor,
        num_embeddings: int,
    ) -> None:
        self.module = module
        self.params = params
        self.indices = indices
        self.grads = grads
        self.num_embeddings = num_embeddings
        b, k, s, _ = grads.shape
        self.batch_size, self.passes = b, k
        self.num_rows = b * k

    def _dtype_source(self) -> Tensor:
        return self.grads

    def tensors(self) -> list[Tensor]:
        return [self.grads]

    def gram(self) -> Tensor:
        if self.gram_strategy() == "explicit":
            u = self.per_sample()
            return symmetric_gram([u])
        return position_pair_gram(self.grads, self._input_kernel)

    def gram_strategy(self) -> str:
        """``"explicit"`` (scatter into ``[n, V d]``, then U U^T) for small tables,
        else ``"pairs"`` (equal-index position pairs), by flop count."""
        b, k, s, d = self.grads.shape
        n = b * k
        size = self.num_embeddings * d
        if n * size > EXPLICIT_MAX_ELEMENTS:
            return "pairs"
        return "explicit" if n * n * size < n * n * s * s * (d + 1) else "pairs"

    def _input_kernel(self, i0: int, i1: int) -> Tensor:
        idx = self.indices
        return (idx[i0:i1, :, None, None] == idx[None, None, :, :]).to(self.grads.dtype)

    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        d = self.grads.shape[-1]
        zbar = weighted_sum(self.grads, coeffs.to(self.grads.dtype), self.batch_size, self.passes)
        gw = torch.zeros(self.num_embeddings, d, dtype=zbar.dtype, device=zbar.device)
        gw.index_add_(0, self.indices.reshape(-1), zbar.reshape(-1, d))
        return [gw]

    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        b, k = self.batch_size, self.passes
        y = vectors[0].to(self.grads.dtype)[self.indices]  # [b, s, d]
        return torch.einsum("bksd,bsd->bk", self.grads, y).reshape(b * k)

    def pass_block(self, samples: int, passes: int, keep: int) -> LayerFactors:
        if (samples, passes) != (self.batch_size, self.passes):
            return super().pass_block(samples, passes, keep)
        return EmbeddingFactors(self.module, self.params, self.indices, self.grads[:, :keep], self.num_embeddings)

    def columns(self, index: Tensor) -> Tensor:
        """``U[:, index]``: entry (v, c) of the table is ``sum_s [idx_is = v] z_rs[c]``."""
        b, k, s, d = self.grads.shape
        hit = (self.indices.unsqueeze(2) == (index // d)).unsqueeze(1)  # [b, 1, s, q]
        return (self.grads[..., index % d] * hit).sum(dim=2).reshape(b * k, -1)

    def cross_gram(self, other: LayerFactors, params: Sequence[nn.Parameter]) -> Tensor | None:
        """The cross block with a Linear layer ``y'_jt = W x'_jt`` whose weight is this
        table (GPT weight tying, ``W`` ``[V, d]``): ``sum_{s,t} z'_qt[idx_is] (z_rs . x'_jt)``,
        ``n^2 s t`` multiplications in chunks of samples, never the ``[n, V d]`` rows."""
        if (
            not isinstance(other, SharedWeightFactors)
            or not other.with_weight
            or len(params) != 1
            or params[0] is not self.params[0]
            or other.params[0] is not params[0]
            or (other.batch_size, other.passes) != (self.batch_size, self.passes)
        ):
            return None
        b, k, s, d = self.grads.shape
        n, t = self.num_rows, other.positions
        x = other.inputs.to(self.grads.dtype)  # [b, t, d]
        z = other.grads.to(self.grads.dtype)  # [b, k, t, V]
        chunk = max(1, PAIR_CHUNK_ELEMENTS // max(1, k * s * b * k * t))
        blocks = []
        for i0 in range(0, b, chunk):
            i1 = min(b, i0 + chunk)
            dots = torch.einsum("iksd,jtd->iksjt", self.grads[i0:i1], x)  # z_rs . x'_jt
            picked = z[:, :, :, self.indices[i0:i1]].permute(3, 4, 0, 1, 2)  # z'_qt[idx_is], [c, s, b, k, t]
            blocks.append(torch.einsum("iksjt,isjlt->ikjl", dots, picked).reshape((i1 - i0) * k, n))
        return torch.cat(blocks, dim=0)

    def per_sample(self) -> Tensor:
        b, k, s, d = self.grads.shape
        u = torch.zeros(b, k, self.num_embeddings, d, dtype=self.grads.dtype, device=self.grads.device)
        index = self.indices.view(b, 1, s, 1).expand(b, k, s, d)
        u.scatter_add_(2, index, self.grads)
        return u.reshape(b * k, -1)

    form = "embedding"

    def held_numel(self) -> float:
        return self.indices.numel() + self.grads.numel()

    def state(self) -> dict[str, Any]:
        return {"form": "embedding", "indices": self.indices, "grads": self.grads}

    @classmethod
    def _from_state(cls, module: nn.Module, params: list[nn.Parameter], state: dict[str, Any]) -> LayerFactors:
        return cls(module, params, state["indices"], state["grads"], module.num_embeddings)
