"""Gram matrices ``K = U U^T`` of per-sample gradients given by their factors.

Every method of :mod:`gramopt.optim` works with ``K = U U^T`` ``[n, n]`` for a matrix U
of n per-sample rows. When a weight W ``[d_out, d_in]`` acts at s positions of a sample
(a sequence, a convolution's patches, SENG's rank-r factors), row r of U (sample i = r // k,
one of k rows per sample) is ``G_r = sum_s z_rs x_is^T`` for inputs X ``[b, s, d_in]`` and
output-gradients Z ``[b, k, s, d_out]``, plus ``sum_s m_is z_rs`` for a bias that reaches
position s of sample i ``m_is`` times (m = 1 everywhere for an ordinary layer). Then

    K_rq = sum_{s,t} (z_rs . z_qt) (x_is . x_jt)  +  (sum_s m_is z_rs) . (sum_t m_jt z_qt)     (*)

and there are two ways to build it:

- *position pairs*: evaluate (*) directly, ``~ (n s)^2 (d_in + d_out)`` flops
  (:func:`position_pair_gram`);
- *explicit*: form U ``[n, d_out d_in]`` with one batched matmul, then ``U U^T``,
  ``~ n s d_in d_out + n^2 d_in d_out`` flops (:func:`symmetric_gram`).

:func:`shared_weight_gram` picks the cheaper (:func:`gram_strategy`); with one position per
sample it is the well-known ``(Z Z^T) * (X X^T + m m^T)``. :func:`shared_weight_gram_flops`
is the cost model, for solvers that weigh a Gram against other work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: Upper bound on the number of elements of one temporary of the position-pair Gram.
PAIR_CHUNK_ELEMENTS = 2**24
#: Explicit per-sample gradients larger than this (elements) are never formed.
EXPLICIT_MAX_ELEMENTS = 2**27

#: :func:`symmetric_gram` splits the rows into at most this many blocks ...
SYMMETRIC_PARTS = 4
#: ... of at least this many rows (smaller Grams: one product) ...
SYMMETRIC_MIN_ROWS = 96
#: ... when the rows are at least this long in all (thinner: the copies cost more than the
#: multiplications saved; benchmarks/notes.md).
SYMMETRIC_MIN_COLUMNS = 512


def symmetric_gram(rows: Sequence[Tensor]) -> Tensor:
    """``sum_l U_l U_l^T`` ``[n, n]`` for row blocks ``U_l`` ``[n, p_l]`` (one layer's
    parameters): only the blocks on and below the diagonal of a partition of the rows
    into up to :data:`SYMMETRIC_PARTS` parts are multiplied, the rest is their mirror
    (torch has no SYRK): 10/16 of the multiplications at 4 parts (timings in
    benchmarks/notes.md)."""
    n = rows[0].shape[0]
    parts = min(SYMMETRIC_PARTS, n // SYMMETRIC_MIN_ROWS)
    if parts < 2 or sum(u.shape[1] for u in rows) < SYMMETRIC_MIN_COLUMNS:
        gram = rows[0] @ rows[0].T
        for u in rows[1:]:
            gram = gram.addmm_(u, u.T)
        return gram
    gram = torch.empty(n, n, dtype=rows[0].dtype, device=rows[0].device)
    edges = [round(i * n / parts) for i in range(parts + 1)]
    for i0, i1 in zip(edges[:-1], edges[1:], strict=True):
        block = rows[0][i0:i1] @ rows[0][:i1].T  # rows i0:i1 against rows 0:i1
        for u in rows[1:]:
            block = block.addmm_(u[i0:i1], u[:i1].T)
        gram[i0:i1, :i1] = block
        gram[:i0, i0:i1] = block[:, :i0].T
    return gram


def position_pair_gram(
    grads: Tensor, input_kernel: Callable[[int, int], Tensor], other: Tensor | None = None
) -> Tensor:
    """Evaluate ``K_rq = sum_{s,t} (z_rs . z_qt) A_{i s j t}`` in chunks of samples.

    Args:
        grads: Z, ``[b, k, s, d_out]``.
        input_kernel: ``(i0, i1) -> A[i0:i1]``, the input kernel over position pairs
            for samples ``i0 <= i < i1`` against all samples, ``[i1 - i0, s, b, s']``.
        other: None (K of one layer, s' = s), or Z' ``[b, k, s', d_out]`` of a second layer
            sharing the weight: the cross block ``sum_{s,t} (z_rs . z'_qt) A_{i s j t}``.

    Returns:
        K without the bias term, ``[b k, b k]``.
    """
    b, k, s, d_out = grads.shape
    right = grads if other is None else other
    s2 = right.shape[2]
    n = b * k
    flat = grads.reshape(n * s, d_out)
    flat_right = right.reshape(n * s2, d_out)
    per_sample = k * s * n * s2
    chunk = max(1, PAIR_CHUNK_ELEMENTS // max(per_sample, 1))
    blocks = []
    for i0 in range(0, b, chunk):
        i1 = min(b, i0 + chunk)
        c = i1 - i0
        zz = flat[i0 * k * s : i1 * k * s] @ flat_right.T  # [c k s, n s']
        zz = zz.view(c, k, s, b, k, s2)
        xx = input_kernel(i0, i1).view(c, 1, s, b, 1, s2)
        blocks.append((zz * xx).sum(dim=(2, 5)).reshape(c * k, n))
    return torch.cat(blocks, dim=0)


def gram_strategy(d_in: int, grads_shape: torch.Size | tuple[int, int, int, int]) -> str:
    """``"pairs"`` or ``"explicit"`` for the weight part of (*) with inputs of width
    ``d_in`` and Z of shape ``[b, k, s, d_out]``: whichever costs fewer flops (module doc);
    never an explicit U above :data:`EXPLICIT_MAX_ELEMENTS`."""
    b, k, s, d_out = grads_shape
    n = b * k
    pairs = b * b * s * s * d_in + n * n * s * s * (d_out + 2)
    explicit = n * s * d_in * d_out + n * n * d_in * d_out
    if n * d_in * d_out > EXPLICIT_MAX_ELEMENTS:
        return "pairs"
    return "explicit" if explicit < pairs else "pairs"


def shared_weight_gram_flops(n: int, s: int, d_in: int, d_out: int) -> float:
    """Flops of :func:`shared_weight_gram` for n rows of one pass each, s positions and
    sides ``d_in``, ``d_out``, by the strategy it would pick (module doc)."""
    if s == 1:
        return 2.0 * n * n * (d_in + d_out)
    if gram_strategy(d_in, (n, 1, s, d_out)) == "explicit":
        return 2.0 * (n * s * d_in * d_out + n * n * d_in * d_out)
    return 2.0 * (n * n * s * s * (d_in + d_out + 2))


def bias_sum(grads: Tensor, bias_positions: Tensor | None = None) -> Tensor:
    """Per-sample bias gradients ``sum_s m_is z_rs`` for Z ``[b, k, s, d_out]`` and the
    bias indicator m ``[b, s]`` (None: 1 everywhere), ``[b k, d_out]``."""
    b, k, s, d_out = grads.shape
    if bias_positions is None:
        return grads.sum(dim=2).reshape(b * k, d_out) if s > 1 else grads.reshape(b * k, d_out)
    return torch.einsum("bksz,bs->bkz", grads, bias_positions.to(grads.dtype)).reshape(b * k, d_out)


def shared_weight_gram(
    inputs: Tensor | None,
    grads: Tensor,
    bias: bool = False,
    strategy: str | None = None,
    input_gram: Tensor | None = None,
    bias_positions: Tensor | None = None,
) -> Tensor:
    """K = U U^T of (*) for per-sample gradients ``G_r = sum_s z_rs x_is^T`` (weight) and,
    if ``bias``, ``sum_s m_is z_rs`` (bias), ``[b k, b k]``.

    Args:
        inputs: X ``[b, s, d_in]``, or None when the weight is not covered.
        grads: Z ``[b, k, s, d_out]``.
        bias: whether the bias is covered.
        strategy: ``"pairs"`` or ``"explicit"`` for s > 1 (default: :func:`gram_strategy`).
        input_gram: for s = 1, ``X X^T`` ``[b, b]`` if already formed (not modified).
        bias_positions: the bias indicator m ``[b, s]`` (module doc); None: 1 everywhere.
    """
    b, k, s, d_out = grads.shape
    n = b * k
    if inputs is None:
        zsum = bias_sum(grads, bias_positions)
        return zsum @ zsum.T
    if s == 1:  # (the bias block z z^T is folded into the weight block: (x x^T + m m^T))
        z = grads.reshape(n, d_out)
        if input_gram is None:
            x = inputs.reshape(b, -1)
            xx = x @ x.T
            if bias:
                xx += _bias_kernel(bias_positions, b, xx)
        else:
            xx = input_gram + _bias_kernel(bias_positions, b, input_gram) if bias else input_gram
        zz = z @ z.T
        if k == 1:
            return zz.mul_(xx)
        return (zz.view(b, k, b, k) * xx.view(b, 1, b, 1)).view(n, n)
    d_in = inputs.shape[-1]
    if (strategy or gram_strategy(d_in, grads.shape)) == "explicit":
        u = torch.einsum("bksz,bsx->bkzx", grads, inputs).reshape(n, -1)
        gram = symmetric_gram([u])
    else:
        flat_x = inputs.reshape(-1, d_in)

        def input_kernel(i0: int, i1: int) -> Tensor:
            return (inputs[i0:i1].reshape(-1, d_in) @ flat_x.T).view(i1 - i0, s, b, s)

        gram = position_pair_gram(grads, input_kernel)
    if bias:
        zsum = bias_sum(grads, bias_positions)
        gram = gram + zsum @ zsum.T
    return gram


def _bias_kernel(bias_positions: Tensor | None, b: int, like: Tensor) -> Tensor | float:
    """``m m^T`` ``[b, b]`` for one position per sample (1 without an indicator)."""
    if bias_positions is None:
        return 1.0
    m = bias_positions.reshape(b, 1).to(like.dtype)
    return m @ m.T
