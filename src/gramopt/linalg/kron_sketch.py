"""Row-sampling sketches (SENG, ``papers/001_*``, Eq. 14) and their Kronecker product
acting on per-sample gradients held as factors (Eq. 17, 19, 21).

**Row sampling (Eq. 14).** ``Omega [q, n]`` keeps q coordinates of an n-vector: row t is
``e_{i_t}^T / sqrt(q p_{i_t})``, so that ``E[Omega^T Omega] = I`` (the paper prints
``e_i^T / p_i``; the ``1 / sqrt(q p_i)`` scaling is the one that makes the sketched
least-squares problem unbiased). Two ways to draw the coordinates:

- ``"uniform"``: q distinct coordinates (without replacement), scale ``sqrt(n / q)``.
  With ``q = n`` this is a permutation and the sketch is exact;
- ``"leverage"``: q draws with replacement, ``p_i`` proportional to the squared norm of
  row i of the sketched matrix (the paper's "leverage score sampling": squared row
  norms of U, not the leverage scores of an orthonormal basis).

**Kronecker sketch of factors (Eq. 17).** A layer whose per-sample gradient is a product
of two factors, ``u_i = vec(G_i^T A_i)`` with ``G_i [r, n_G]`` and ``A_i [r, n_A]``
(layout ``[b, r, n]``: the same as the capture engine's Z ``[b, k, s, d_out]`` with k = 1
and X ``[b, s, d_in]``, r playing the positions s), is sketched by ``Omega_A (x) Omega_G``
through its factors, never forming u_i:

    Xi_G = G Omega_G^T  [b, r, zeta_G],   Xi_A = A Omega_A^T  [b, r, zeta_A]      (Eq. 17)
    (U z)_i   ~ sum_j (Xi_Gi)_j^T Xi_z (Xi_Ai)_j,   Xi_z = Omega_G mat(z) Omega_A^T  (Eq. 19)
    (U U^T)_ij ~ elesum((Xi_Ai Xi_Aj^T) * (Xi_Gi Xi_Gj^T))                         (Eq. 21)

Both are exact products of the sketched vectors ``(Omega_G (x) Omega_A) u_i`` (the paper's
remark after Eq. 24), so they are the explicit sketch of Eq. 12 with
``Omega = Omega_G (x) Omega_A``.

This module is self-contained on purpose: ``gramopt.linalg.sketches.KroneckerSketch``
(issue 5) applies other sketch families (Gaussian, SRHT, sparse sign) the same way to
the capture engine's X and Z. :class:`RowSample` offers the same ``rows``, ``cols``,
``apply(a, dim)`` and ``dense()`` as those sketches, so one Kronecker class can serve both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gramopt.capture.shared_weight import EXPLICIT_MAX_ELEMENTS, position_pair_gram

SAMPLINGS = ("uniform", "leverage")


@dataclass
class RowSample:
    """``Omega [q, n]`` of Eq. 14: ``(Omega a)_t = scale_t * a[index_t]``.

    Attributes:
        index: the sampled coordinates, ``[q]`` (int64).
        scale: ``1 / sqrt(q p_{index_t})``, ``[q]`` (float64).
        cols: n.
    """

    index: Tensor
    scale: Tensor
    cols: int

    @property
    def rows(self) -> int:
        return int(self.index.shape[0])

    @classmethod
    def draw(
        cls,
        n: int,
        q: int,
        sampling: str,
        weights: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> "RowSample":
        """Draw q of n coordinates.

        Args:
            n: the dimension sketched.
            q: the sketch size, ``1 <= q <= n``.
            sampling: ``"uniform"`` or ``"leverage"``.
            weights: for ``"leverage"``, the unnormalized ``p_i``, ``[n]`` (squared row
                norms); all zero falls back to uniform sampling.
            generator: a CPU generator (the draw happens on the CPU).
        """
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not 1 <= q <= n:
            raise ValueError(f"a row sample keeps 1 to {n} of {n} coordinates, got {q}")
        if sampling == "leverage":
            if weights is None or weights.shape != (n,):
                raise ValueError(f"leverage sampling needs weights of shape [{n}]")
            p = weights.detach().to("cpu", torch.float64).clamp_min(0.0)
            total = float(p.sum())
            if total > 0 and math.isfinite(total):
                p = p / total
                index = torch.multinomial(p, q, replacement=True, generator=generator)
                return cls(index, 1.0 / torch.sqrt(q * p[index]), n)
        index = torch.randperm(n, generator=generator)[:q]
        return cls(index, torch.full((q,), math.sqrt(n / q), dtype=torch.float64), n)

    def apply(self, a: Tensor, dim: int = 0) -> Tensor:
        """``Omega`` along ``dim`` of ``a`` (size n there, q in the result)."""
        if a.shape[dim] != self.cols:
            raise ValueError(f"this sketch maps dimension {self.cols}, got {a.shape[dim]} along dim {dim}")
        picked = a.index_select(dim, self.index.to(a.device))
        shape = [1] * a.dim()
        shape[dim] = self.rows
        return picked * self.scale.to(a.device, a.dtype).view(shape)

    def dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Omega as a dense ``[q, n]`` matrix (for tests)."""
        return self.apply(torch.eye(self.cols, dtype=dtype))


def factor_gram(a: Tensor, g: Tensor) -> Tensor:
    """``K_ij = elesum((A_i A_j^T) * (G_i G_j^T))`` (Eq. 21 on given factors), ``[b, b]``.

    Args:
        a: ``[b, r, n_A]``.
        g: ``[b, r, n_G]``.

    The cheaper of two forms by flop count: rank pairs (``b^2 r^2 (n_A + n_G)``; for
    r = 1 the Khatri-Rao form ``(G G^T) * (A A^T)``) or the explicit vectors
    ``vec(G_i^T A_i)`` (``b r n_G n_A + b^2 n_G n_A``, never above
    ``EXPLICIT_MAX_ELEMENTS`` elements).
    """
    b, r, n_a = a.shape
    n_g = g.shape[2]
    if r == 1:
        a2, g2 = a.reshape(b, n_a), g.reshape(b, n_g)
        return (a2 @ a2.T) * (g2 @ g2.T)
    pairs = b * b * r * r * (n_a + n_g)
    explicit = b * r * n_g * n_a + b * b * n_g * n_a
    if explicit < pairs and b * n_g * n_a <= EXPLICIT_MAX_ELEMENTS:
        u = torch.einsum("brg,bra->bga", g, a).reshape(b, -1)
        return u @ u.T
    flat_a = a.reshape(b * r, n_a)

    def kernel(i0: int, i1: int) -> Tensor:
        return (a[i0:i1].reshape(-1, n_a) @ flat_a.T).view(i1 - i0, r, b, r)

    return position_pair_gram(g.unsqueeze(1), kernel)


def factor_inner(a: Tensor, g: Tensor, m: Tensor) -> Tensor:
    """``(U z)_i = sum_j (G_i)_j^T mat(z) (A_i)_j`` (Eq. 18-19), ``[b]``.

    Args:
        a: ``[b, r, n_A]``.
        g: ``[b, r, n_G]``.
        m: ``mat(z)``, ``[n_G, n_A]``.
    """
    return ((a @ m.T) * g).sum(dim=(1, 2))


class KroneckerRowSketch:
    """``Omega_G (x) Omega_A`` of Eq. 17, applied to factors ``[b, r, n]``.

    Args:
        grads: ``Omega_G`` on the n_G side, or None (no sketch there).
        inputs: ``Omega_A`` on the n_A side, or None.
    """

    def __init__(self, grads: RowSample | None, inputs: RowSample | None) -> None:
        self.grads, self.inputs = grads, inputs

    def sketch_grads(self, g: Tensor) -> Tensor:
        """``Xi_G``: ``[b, r, n_G] -> [b, r, zeta_G]``."""
        return g if self.grads is None else self.grads.apply(g, dim=-1)

    def sketch_inputs(self, a: Tensor) -> Tensor:
        """``Xi_A``: ``[b, r, n_A] -> [b, r, zeta_A]``."""
        return a if self.inputs is None else self.inputs.apply(a, dim=-1)

    def sketch_matrix(self, m: Tensor) -> Tensor:
        """``Xi_z = Omega_G mat(z) Omega_A^T``: ``[n_G, n_A] -> [zeta_G, zeta_A]``."""
        if self.grads is not None:
            m = self.grads.apply(m, dim=0)
        return m if self.inputs is None else self.inputs.apply(m, dim=1)

    def inner(self, a: Tensor, g: Tensor, m: Tensor) -> Tensor:
        """Eq. 19: ``((Omega_A (x) Omega_G) u_i)^T ((Omega_A (x) Omega_G) z)``, ``[b]``,
        for ``m = mat(z)`` ``[n_G, n_A]``."""
        return factor_inner(self.sketch_inputs(a), self.sketch_grads(g), self.sketch_matrix(m))

    def gram(self, a: Tensor, g: Tensor) -> Tensor:
        """Eq. 21: the Gram of the sketched per-sample gradients, ``[b, b]``."""
        return factor_gram(self.sketch_inputs(a), self.sketch_grads(g))
