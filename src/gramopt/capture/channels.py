"""Derivative channels as positions: which positions of a Linear layer's input its bias reaches.

Taylor-mode forward passes (:func:`gramopt.pde.forward_laplacian`) push a sample's value,
its first derivatives and its Laplacian through each ``nn.Linear`` as *channels*: the
layer is called once on ``[N, C, d_in]`` (channel c of point i at position c), so the
capture engine's hooks see every use of the weight. The weight acts on every channel, but
the bias belongs to the value channel only (a derivative of ``W h + c`` is ``W dh``): the
caller calls the module on all channels and subtracts the bias from the other channels
outside it. The gradient that reaches the bias is then ``sum_c m_c z_c`` with the
*bias indicator* ``m = (1, 0, ..., 0)``, not the sum over positions that an ordinary
sequence input gives.

This module carries ``m`` from the caller to the Linear handler:

- the caller wraps its module calls in ``with bias_positions(m):``;
- :meth:`gramopt.capture.handlers.LinearHandler.save` then keeps ``[x, m]``: the input with
  one more column, ``m_c`` at position c (:func:`append_bias_indicator`);
- :func:`gramopt.capture.handlers.linear_factors` splits it off again
  (:func:`split_bias_indicator`) and hands it to
  :class:`~gramopt.capture.shared_weight.SharedWeightFactors` as ``bias_positions``, where it
  takes the place of the constant 1 that multiplies the bias at every position:
  ``y_is = W x_is + m_is c``.

The indicator travels inside the saved tensor, so gradient accumulation (saved tensors
concatenated along the batch) and ``distributed="exact"`` (saved tensors gathered) carry it
unchanged. Only layers called inside the block are affected; the context is local to the
thread (a :class:`contextvars.ContextVar`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from gramopt.errors import CaptureError

_BIAS_POSITIONS: ContextVar[tuple[float, ...] | None] = ContextVar("gramopt_bias_positions", default=None)


@contextmanager
def bias_positions(indicator: Sequence[float]) -> Iterator[None]:
    """Inside the block, every hooked ``nn.Linear`` is called on ``[N, C, d_in]`` inputs whose
    C positions receive the bias ``indicator[c]`` times (the caller removes it from the others).

    Args:
        indicator: ``m``, one number per position (``(1, 0, ..., 0)``: the value channel only).
    """
    values = tuple(float(v) for v in indicator)
    if not values:
        raise ValueError("bias_positions needs one indicator per position, got none")
    token = _BIAS_POSITIONS.set(values)
    try:
        yield
    finally:
        _BIAS_POSITIONS.reset(token)


def active_bias_positions() -> tuple[float, ...] | None:
    """The indicator of the innermost :func:`bias_positions` block, or None outside one."""
    return _BIAS_POSITIONS.get()


def append_bias_indicator(x: Tensor, indicator: Sequence[float], name: str = "Linear") -> Tensor:
    """``[x, m]``: the input ``[N, C, d_in]`` with the indicator as one more column, ``[N, C, d_in + 1]``."""
    if x.dim() != 3 or x.shape[1] != len(indicator):
        raise CaptureError(
            f"{name} was called inside gramopt.capture.channels.bias_positions with {len(indicator)} positions "
            f"on an input of shape {tuple(x.shape)}: expected [N, {len(indicator)}, d_in]"
        )
    m = torch.tensor(indicator, dtype=x.dtype, device=x.device).view(1, -1, 1).expand(x.shape[0], -1, 1)
    return torch.cat([x, m], dim=2)


def split_bias_indicator(saved: Tensor, d_in: int) -> tuple[Tensor, Tensor | None]:
    """``(x, m)`` from what the Linear handler saved for a layer of input width ``d_in``:
    ``m`` ``[N, *]`` when the saved tensor carries the indicator column
    (:func:`append_bias_indicator`; width ``d_in + 1``), else None (an ordinary call)."""
    if saved.shape[-1] == d_in + 1:
        return saved[..., :d_in].contiguous(), saved[..., d_in].contiguous()
    return saved, None
