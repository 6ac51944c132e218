"""Factors of Conv1d / Conv2d layers computed with convolutions, not unfolded patches.

A convolution is a Linear layer shared over output positions (``y_is = W x_is + c`` on
the patches x_is, :mod:`gramopt.capture.shared_weight`), but unfolding the patches
copies the input ``prod(kernel)`` times; on small CPUs that copy costs more than the
convolution itself. :class:`ConvFactors` keeps the layer's input and output-gradients
as they are and computes

- ``per_sample()``: one *grouped* weight-gradient convolution with the b samples as
  groups (sample i's input convolved with its own output-gradients), ``[b k, p]``;
- ``rmatvec(a)``: one ordinary weight-gradient convolution with the output-gradients
  ``sum_c a_(i,c) z_(i,c)`` (what ``loss.backward()`` computes);
- ``matvec(v)``: one forward convolution with weight v, then a dot product with each
  output-gradient;
- ``gram()``: from ``per_sample()`` or by position pairs, whichever is cheaper.

The patches X and positions-major Z of :class:`SharedWeightFactors` are formed only
when asked for (``.inputs`` / ``.grads``: position-pair Grams, row sampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramopt.capture.shared_weight import SharedWeightFactors, gram_strategy


def conv_pads(module: nn.Module) -> list[tuple[int, int]]:
    """(low, high) padding per spatial dim, as torch applies it (also for 'same'/'valid')."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        pads = []
        for ksize, dil in zip(module.kernel_size, module.dilation):
            total = dil * (ksize - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def padded_input(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(x', padding)`` such that ``conv(x', padding=padding)`` is the module's
    convolution: zero padding stays an argument where torch can apply it; asymmetric
    or non-zero padding modes are applied to x here."""
    pads = conv_pads(module)
    if module.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        return x, tuple(lo for lo, _ in pads)
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode), (0,) * len(pads)


def unfold_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Patches ``[b, L, C_in * prod(kernel)]`` in the weight's flattening order."""
    x, padding = padded_input(module, x)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if module.weight.dim() == 3:  # Conv1d: a unit height makes it a Conv2d
        x = x.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)


class ConvFactors(SharedWeightFactors):
    """Factors of a Conv1d/Conv2d (groups = 1) from its inputs and output-gradients.

    Args:
        module: the layer.
        params: trainable parameters covered, a subset of ``(weight, bias)``.
        inputs: one input ``[b, C_in, *spatial]`` per forward call of the layer.
        grads: per call, the output-gradients ``[b, k, C_out, *spatial_out]`` (scaled).
    """

    def __init__(self, module: nn.Module, params: list[nn.Parameter], inputs: list[Tensor], grads: list[Tensor]) -> None:
        self.module = module
        self.params = params
        self.with_weight = any(p is module.weight for p in params)
        self.with_bias = module.bias is not None and any(p is module.bias for p in params)
        self.weight_shape = module.weight.shape
        dtype = grads[0].dtype
        self._raw = [(x.to(dtype), g) for x, g in zip(inputs, grads)]
        b, k = grads[0].shape[:2]
        self.batch_size, self.passes = b, k
        self.positions = sum(g[0, 0, 0].numel() for g in grads)
        self.num_rows = b * k
        self._patches: Tensor | None = None
        self._positions_major: Tensor | None = None

    def _dtype_source(self) -> Tensor:
        return self._raw[0][1]

    @property
    def raw(self) -> list[tuple[Tensor, Tensor]]:
        """Per forward call, the input ``[b, C_in, *spatial]`` and the output-gradients
        ``[b, k, C_out, *spatial_out]`` the factors were built from."""
        return self._raw

    # -- the SharedWeightFactors view, formed on demand ----------------------------------
    @property
    def inputs(self) -> Tensor:
        """X, ``[b, s, d_in]`` (unfolded patches; formed on first use)."""
        if self._patches is None:
            self._patches = torch.cat([unfold_patches(self.module, x) for x, _ in self._raw], dim=1)
        return self._patches

    @property
    def grads(self) -> Tensor:
        """Z, ``[b, k, s, d_out]`` (formed on first use)."""
        if self._positions_major is None:
            b, k, c_out = self.batch_size, self.passes, self.weight_shape[0]
            self._positions_major = torch.cat([g.reshape(b, k, c_out, -1).transpose(2, 3) for _, g in self._raw], dim=2)
        return self._positions_major

    def gram_strategy(self) -> str:
        d_in = self.weight_shape[1:].numel()
        return gram_strategy(d_in, torch.Size((self.batch_size, self.passes, self.positions, self.weight_shape[0])))

    # -- products by convolutions ---------------------------------------------------------
    def _conv_args(self) -> tuple[list[int], list[int]]:
        return list(self.module.stride), list(self.module.dilation)

    def per_sample(self) -> Tensor:
        b, k, c_out = self.batch_size, self.passes, self.weight_shape[0]
        n = b * k
        stride, dilation = self._conv_args()
        weight, bias = None, None
        for x, g in self._raw:
            if self.with_weight:
                xp, padding = padded_input(self.module, x)
                spatial_in, spatial_out = xp.shape[2:], g.shape[3:]
                template = g.new_zeros(()).expand(n * c_out, *self.weight_shape[1:])
                grad_w = torch.ops.aten.convolution_backward(
                    g.reshape(1, n * c_out, *spatial_out),
                    xp.reshape(1, -1, *spatial_in),
                    template,
                    None,
                    stride,
                    list(padding),
                    dilation,
                    False,
                    [0] * len(padding),
                    b,
                    (False, True, False),
                )[1]
                part = grad_w.reshape(n, -1)
                weight = part if weight is None else weight + part
            if self.with_bias:
                part = g.reshape(n, c_out, -1).sum(dim=2)
                bias = part if bias is None else bias + part
        return torch.cat([t for t in (weight, bias) if t is not None], dim=1)

    def _weighted(self, coeffs: Tensor, g: Tensor) -> Tensor:
        """``sum_c a_(i,c) z_(i,c)``, ``[b, C_out, *spatial_out]``."""
        a = coeffs.to(g.dtype).view(self.batch_size, self.passes, *([1] * (g.dim() - 2)))
        return (a * g).sum(dim=1)

    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        stride, dilation = self._conv_args()
        weight, bias = None, None
        for x, g in self._raw:
            zbar = self._weighted(coeffs, g)
            if self.with_weight:
                xp, padding = padded_input(self.module, x)
                template = zbar.new_zeros(()).expand(self.weight_shape)
                grad_w = torch.ops.aten.convolution_backward(
                    zbar, xp, template, None, stride, list(padding), dilation, False, [0] * len(padding), 1, (False, True, False)
                )[1]
                weight = grad_w if weight is None else weight + grad_w
            if self.with_bias:
                part = zbar.reshape(zbar.shape[0], zbar.shape[1], -1).sum(dim=(0, 2))
                bias = part if bias is None else bias + part
        return [t for t in (weight, bias) if t is not None]

    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        b, k = self.batch_size, self.passes
        vectors = [v.to(self._dtype_source().dtype) for v in vectors]
        out = None
        for x, g in self._raw:
            i = 0
            y = None
            if self.with_weight:
                xp, padding = padded_input(self.module, x)
                conv = F.conv1d if self.module.weight.dim() == 3 else F.conv2d
                y = conv(xp, vectors[0].view(self.weight_shape), None, self.module.stride, padding, self.module.dilation)
                i = 1
            if self.with_bias:
                shift = vectors[i].view(1, -1, *([1] * (g.dim() - 3)))
                y = shift.expand(b, *g.shape[2:]) if y is None else y + shift
            part = (g * y.unsqueeze(1)).reshape(b, k, -1).sum(dim=2).reshape(b * k)
            out = part if out is None else out + part
        return out
