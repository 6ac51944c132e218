"""Factors of ``nn.Conv1d`` / ``nn.Conv2d`` (groups = 1) in the layer's own layout.

A convolution is a Linear layer shared over output positions: with unfolded input
patches x_is (im2col, ``[b, s, C_in * prod(kernel)]``) the per-sample gradient is
``sum_s z_is x_is^T`` (:mod:`gramopt.capture.shared_weight`). Unfolding costs memory
and time (several times the convolution's own weight-gradient routine; benchmarks/notes.md,
"Capture costs"), so :class:`ConvFactors` keeps the raw input and output-gradient and computes

- ``rmatvec(a) = U^T a``: ``aten.convolution_backward`` with the weighted output-gradient
  ``sum_c a_(i,c) z_(i,c)`` (one weight-gradient call, as an ordinary backward makes);
- ``per_sample() = U``: the same routine with the batch as groups (input
  ``[1, b C_in, ...]``, output-gradient ``[1, b k C_out, ...]``, ``groups = b``);
- ``matvec(v) = U v``: the convolution of the input with ``v``, contracted with z;
- the position-pair Gram (large inputs, few channels): from unfolded patches, formed
  only then (:attr:`inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramopt.capture.shared_weight import SharedWeightFactors, weight_inputs, weighted_sum
from gramopt.linalg.kernels import gram_strategy


def conv_pads(module: nn.Module) -> list[tuple[int, int]]:
    """(low, high) padding per spatial dim, as torch applies it (also for 'same'/'valid')."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        pads = []
        for ksize, dil in zip(module.kernel_size, module.dilation, strict=True):
            total = dil * (ksize - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def explicit_padding(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(x', padding)`` such that a zero-padded convolution of x' with ``padding`` is
    the layer's convolution of x: symmetric zero padding stays implicit, anything else
    (reflect / replicate / circular modes, asymmetric 'same') is applied to x."""
    pads = conv_pads(module)
    if module.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        return x, tuple(lo for lo, _ in pads)
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode), (0,) * len(pads)


def unfold(module: nn.Module, x: Tensor, padding: tuple[int, ...]) -> Tensor:
    """Patches ``[b, L, C_in * prod(kernel)]`` of an (explicitly padded) input, in the
    weight's flattening order."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if module.weight.dim() == 3:  # Conv1d: a unit height makes it a Conv2d
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)


class ConvFactors(SharedWeightFactors):
    """Factors of a convolution from its calls' inputs and output-gradients.

    Args:
        module: the Conv1d / Conv2d layer (groups = 1).
        params: trainable parameters covered, a subset of ``(weight, bias)``.
        inputs: per forward call, the input ``[b, C_in, *spatial]`` in the compute dtype.
        grads: per forward call, Z ``[b, k, C_out, *out_spatial]`` (already scaled).

    :attr:`inputs` (unfolded patches ``[b, s, d_in]``) and :attr:`grads`
    (``[b, k, s, C_out]``, positions of all calls concatenated) are the
    :class:`SharedWeightFactors` view, built on first use only.
    """

    def __init__(
        self, module: nn.Module, params: list[nn.Parameter], inputs: list[Tensor], grads: list[Tensor]
    ) -> None:
        self.module = module
        self.params = params
        weight, bias = module.weight, module.bias
        self.with_weight = any(p is weight for p in params)
        self.with_bias = bias is not None and any(p is bias for p in params)
        self.weight_shape = weight.shape
        self.raw_inputs = inputs
        self.calls = [explicit_padding(module, x) for x in inputs]
        self.raw_grads = grads
        b, k = grads[0].shape[:2]
        self.batch_size, self.passes = b, k
        self.positions = sum(math.prod(g.shape[3:]) for g in grads)
        self.d_in, self.d_out = math.prod(weight.shape[1:]), weight.shape[0]
        self.num_rows = b * k

    def _dtype_source(self) -> Tensor:
        return self.raw_grads[0]

    def tensors(self) -> list[Tensor]:
        return [*self.raw_inputs, *self.raw_grads]

    @property
    def raw(self) -> list[tuple[Tensor, Tensor]]:
        """Per forward call, the input ``[b, C_in, *spatial]`` and the output-gradients
        ``[b, k, C_out, *spatial_out]`` the factors were built from."""
        return list(zip(self.raw_inputs, self.raw_grads, strict=True))

    def gram_strategy(self) -> str:
        return gram_strategy(self.d_in, torch.Size((self.batch_size, self.passes, self.positions, self.d_out)))

    def pass_positions(self) -> None:
        """None: a convolution's Gram is formed from its calls' tensors (grouped weight
        gradients), never from the positions view that the one-position Gram of
        :class:`SharedWeightFactors` reads (building it only to check would cost more)."""
        return None

    def _keep_passes(self, keep: int) -> None:
        self.raw_grads = [g[:, :keep] for g in self.raw_grads]
        self.__dict__.pop("grads", None)  # the positions view of the output-gradients, rebuilt on use

    form = "conv"

    def held_numel(self) -> float:
        """The layer's inputs and output-gradients."""
        return sum(x.numel() + g.numel() for x, g in self.raw)

    def state(self) -> dict[str, Any]:
        return {"form": "conv", "inputs": list(self.raw_inputs), "grads": list(self.raw_grads)}

    @classmethod
    def _from_state(cls, module: nn.Module, params: list[nn.Parameter], state: dict[str, Any]) -> ConvFactors:
        return cls(module, params, state["inputs"], state["grads"])

    @cached_property
    def inputs(self) -> Tensor:  # type: ignore[override]
        return torch.cat([unfold(self.module, x, pad) for x, pad in self.calls], dim=1)

    @cached_property
    def grads(self) -> Tensor:  # type: ignore[override]
        b, k, c = self.batch_size, self.passes, self.d_out
        return torch.cat([g.reshape(b, k, c, -1).transpose(2, 3) for g in self.raw_grads], dim=2)

    def _weight(self, dtype: torch.dtype) -> Tensor:
        return self.module.weight.detach().to(dtype)

    def _weight_grads(
        self, grad_out: Tensor, x: Tensor, padding: tuple[int, ...], weight: Tensor, groups: int, bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """(weight gradient, bias gradient) of a convolution with output-gradient ``grad_out``."""
        m = self.module
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if bias else None, list(m.stride), list(padding),
            list(m.dilation), False, [0] * len(padding), groups, [False, self.with_weight, bias],
        )
        return gw, gb

    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        """``U^T a``: the convolution's weight gradient with the coefficients applied to
        the smaller of the input and the output-gradient (U^T a is linear in both), or
        one GEMV per parameter if U was formed this step for the Gram."""
        explicit = self._rmatvec_explicit(coeffs)
        if explicit is not None:
            return explicit
        b = self.batch_size
        dtype = self.raw_grads[0].dtype
        weight = self._weight(dtype)
        coeffs = coeffs.to(dtype)
        gw_total = gb_total = None
        for (x, padding), g in zip(self.calls, self.raw_grads, strict=True):
            if self.passes == 1 and weight_inputs(x.numel(), g.numel(), self.with_weight):
                xw = x * coeffs.view(b, *([1] * (x.dim() - 1)))
                gw, _ = self._weight_grads(g[:, 0], xw, padding, weight, 1, False)
                gb = (coeffs @ g.reshape(b, -1)).view(self.d_out, -1).sum(dim=1) if self.with_bias else None
            else:
                zbar = weighted_sum(g, coeffs, b, self.passes)  # [b, C_out, *out_spatial]
                gw, gb = self._weight_grads(zbar, x, padding, weight, 1, self.with_bias)
            if self.with_weight:
                gw_total = gw if gw_total is None else gw_total + gw
            if self.with_bias:
                gb_total = gb if gb_total is None else gb_total + gb
        return [t for t in (gw_total, gb_total) if t is not None]

    def _form_rows(self) -> list[Tensor]:
        """Per-sample weight gradients with the batch as groups, and bias sums."""
        b, n = self.batch_size, self.num_rows
        rows = []
        if self.with_weight:
            total = None
            for (x, padding), g in zip(self.calls, self.raw_grads, strict=True):
                grouped = g.reshape(1, n * self.d_out, *g.shape[3:])
                xg = x.reshape(1, b * x.shape[1], *x.shape[2:])
                weight = x.new_empty(n * self.d_out, *self.weight_shape[1:])
                gw, _ = self._weight_grads(grouped, xg, padding, weight, b, False)
                gw = gw.reshape(n, -1)
                total = gw if total is None else total + gw
            rows.append(total)
        if self.with_bias:
            rows.append(self._bias_rows())
        return rows

    def _bias_rows(self) -> Tensor:
        n, c = self.num_rows, self.d_out
        total = None
        for g in self.raw_grads:
            part = g.reshape(n, c, -1).sum(dim=2)
            total = part if total is None else total + part
        return total

    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        b, k = self.batch_size, self.passes
        dtype = self.raw_grads[0].dtype
        vectors = [v.to(dtype) for v in vectors]
        weight = vectors[0] if self.with_weight else None
        bias = vectors[-1] if self.with_bias else None
        out = None
        for (x, padding), g in zip(self.calls, self.raw_grads, strict=True):
            if weight is not None:
                m = self.module
                y = torch.convolution(x, weight, bias, m.stride, padding, m.dilation, False, [0] * len(padding), 1)
            else:
                y = bias.view(1, -1, *([1] * (g.dim() - 3))).expand(b, -1, *g.shape[3:])
            part = (g * y.unsqueeze(1)).reshape(b * k, -1).sum(dim=1)
            out = part if out is None else out + part
        return out
