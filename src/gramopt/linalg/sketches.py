"""Random sketches ``S: R^N -> R^m`` (``m`` rows, ``N`` columns), drawn once from an
explicit :class:`torch.Generator`, and the Kronecker sketch of per-sample gradients.

A sketch is a *subspace embedding* for a k-dimensional subspace with orthonormal basis
U ``[N, k]`` when all singular values of ``S U`` lie in ``[1 - delta, 1 + delta]``
(Definition 3.2 and Lemma 3.3 of
Jan van den Brand, Binghui Peng, Zhao Song, Omri Weinstein, "Training
(Overparametrized) Neural Networks in Near-Linear Time", ITCS 2021, arXiv:2006.11648).
Documented sizes (measured in ``tests/test_sketches.py`` for k <= 256):

======================  ===========================  ================  ==============
sketch                  cost of ``S A`` (A [N, c])   rows for delta    notes
======================  ===========================  ================  ==============
``gaussian``            ``2 m N c`` (a matmul)       m = 4k: 0.6       Marchenko-Pastur:
                                                                       ``delta ~ sqrt(k/m)``
``srht``                ``N' c log2 N'`` adds        m = 4k: 0.6       subsampled randomized
                                                                       Hadamard (fast Walsh-
                                                                       Hadamard transform,
                                                                       N' = next power of 2)
``sparse``              ``zeta N c`` (sparse mm)     m = 4k: 0.6       sparse sign, zeta = 8
                                                                       nonzeros per column
``countsketch``         ``N c``                      m = 4k: 0.6 if A  one nonzero per column;
                                                     is incoherent     needs ~k^2 rows for
                                                                       coherent A
======================  ===========================  ================  ==============

All are scaled so that ``E ||S a||^2 = ||a||^2``. :class:`KroneckerSketch` applies
``S_G (x) S_A`` to per-sample gradients ``sum_s z_rs x_is^T`` through the factors X and Z,
never forming them (the structure of Eq. 17 of
Minghan Yang, Dong Xu, Zaiwen Wen, Mengyun Chen, Pengxiang Xu, "Sketchy Empirical
Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020).
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from gramopt.linalg.kernels import shared_weight_gram


class Sketch(ABC):
    """A random linear map ``S`` of shape ``[rows, cols]``.

    Args:
        rows: m, the sketch size (> 0).
        cols: N, the dimension sketched (> 0).
        generator: the source of randomness (a fresh unseeded one if None).
        device: where the sketch's random state lives.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("rows", rows), ("cols", cols)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sketch {name} must be a positive int, got {value!r}")
        self.rows, self.cols = rows, cols
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._draw(generator if generator is not None else torch.Generator(device=self.device))

    @abstractmethod
    def _draw(self, generator: torch.Generator) -> None:
        """Draw the random state."""

    @abstractmethod
    def _apply_last(self, a: Tensor) -> Tensor:
        """``S`` along the last dimension: ``[..., N] -> [..., m]``."""

    def apply(self, a: Tensor, dim: int = 0) -> Tensor:
        """``S`` applied along ``dim`` of ``a`` (size N there, m in the result).

        ``apply(A)`` for A ``[N, k]`` is ``S A`` ``[m, k]``; ``apply(X, dim=-1)`` for X
        ``[..., N]`` is ``X S^T``."""
        if a.shape[dim] != self.cols:
            raise ValueError(
                f"this sketch maps dimension {self.cols}, got a tensor with {a.shape[dim]} along dim {dim}"
            )
        if not a.is_floating_point():
            raise TypeError(f"sketches apply to floating-point tensors, got {a.dtype}")
        return self._apply_last(a.movedim(dim, -1)).movedim(-1, dim)

    def dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """S as a dense ``[m, N]`` matrix (for tests)."""
        return self.apply(torch.eye(self.cols, dtype=dtype, device=self.device)).contiguous()


class GaussianSketch(Sketch):
    """``S_ij ~ N(0, 1/m)``: the best embedding per row, at the cost of a dense matmul."""

    def _draw(self, generator: torch.Generator) -> None:
        self.matrix = torch.randn(
            self.rows, self.cols, generator=generator, dtype=torch.float64, device=self.device
        ) / math.sqrt(self.rows)

    def _apply_last(self, a: Tensor) -> Tensor:
        return a @ self.matrix.to(a.dtype).T


class SRHTSketch(Sketch):
    """Subsampled randomized Hadamard transform ``S = sqrt(1/m) P H D`` (the Fast-JL
    transform of Lemma 3.3): random signs D, the unnormalized Walsh-Hadamard transform H
    of size ``N' = 2^ceil(log2 N)`` (zero padding, applied by the fast transform in
    ``log2 N'`` butterfly passes, never as a matrix), m rows P drawn without replacement."""

    def _draw(self, generator: torch.Generator) -> None:
        self.padded = 1 << max(0, (self.cols - 1).bit_length())
        if self.rows > self.padded:
            raise ValueError(f"srht takes at most {self.padded} rows for dimension {self.cols}, got {self.rows}")
        self.signs = (
            torch.randint(0, 2, (self.cols,), generator=generator, device=self.device).to(torch.float64) * 2 - 1
        )
        self.index = torch.randperm(self.padded, generator=generator, device=self.device)[: self.rows]

    def _apply_last(self, a: Tensor) -> Tensor:
        x = a * self.signs.to(a.dtype)
        if self.padded > self.cols:
            x = torch.nn.functional.pad(x, (0, self.padded - self.cols))
        return fwht(x).index_select(-1, self.index) / math.sqrt(self.rows)


def fwht(x: Tensor) -> Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dim (a power of 2)."""
    size = x.shape[-1]
    if size & (size - 1):
        raise ValueError(f"fwht needs a power-of-2 length, got {size}")
    lead = x.shape[:-1]
    h = 1
    while h < size:
        y = x.reshape(*lead, size // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, size)


class SparseSignSketch(Sketch):
    """Sparse sign embedding: each column has ``zeta`` entries ``+-1/sqrt(zeta)`` in rows
    drawn uniformly (with replacement; a repeated row adds its signs). Applied as one
    sparse-dense product, ``zeta N`` multiply-adds per sketched vector.

    Args:
        zeta: nonzeros per column (default ``min(8, rows)``).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        zeta: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.zeta = min(8, rows) if zeta is None else zeta
        if isinstance(self.zeta, bool) or not isinstance(self.zeta, int) or self.zeta < 1:
            raise ValueError(f"zeta must be a positive int, got {zeta!r}")
        super().__init__(rows, cols, generator=generator, device=device)

    def _draw(self, generator: torch.Generator) -> None:
        rows = torch.randint(0, self.rows, (self.zeta, self.cols), generator=generator, device=self.device)
        signs = (
            torch.randint(0, 2, (self.zeta, self.cols), generator=generator, device=self.device).to(torch.float64) * 2
            - 1
        )
        self._coo = (
            rows.reshape(-1),
            torch.arange(self.cols, device=self.device).repeat(self.zeta),
            signs.reshape(-1) / math.sqrt(self.zeta),
        )
        self._by_dtype: dict[torch.dtype, Tensor] = {}

    def _matrix(self, dtype: torch.dtype) -> Tensor:
        """S as a sparse CSR ``[m, N]`` in ``dtype`` (built once per dtype)."""
        if dtype not in self._by_dtype:
            r, c, v = self._coo
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                coo = torch.sparse_coo_tensor(torch.stack((r, c)), v.to(dtype), (self.rows, self.cols)).coalesce()
                self._by_dtype[dtype] = coo.to_sparse_csr()
        return self._by_dtype[dtype]

    def _apply_last(self, a: Tensor) -> Tensor:
        lead = a.shape[:-1]
        flat = a.reshape(-1, self.cols)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = torch.sparse.mm(self._matrix(a.dtype), flat.T.contiguous()).T
        return out.reshape(*lead, self.rows)


class CountSketch(Sketch):
    """CountSketch: column j goes to row ``h(j)`` with sign ``s(j)`` (``N`` adds per
    sketched vector). Cheapest, but an embedding at ~4k rows only for incoherent
    subspaces (no coordinate carrying much of the subspace's mass)."""

    def _draw(self, generator: torch.Generator) -> None:
        self.hash = torch.randint(0, self.rows, (self.cols,), generator=generator, device=self.device)
        self.signs = (
            torch.randint(0, 2, (self.cols,), generator=generator, device=self.device).to(torch.float64) * 2 - 1
        )

    def _apply_last(self, a: Tensor) -> Tensor:
        out = a.new_zeros(*a.shape[:-1], self.rows)
        return out.index_add_(-1, self.hash, a * self.signs.to(a.dtype))


#: How :class:`RowSampleSketch` draws its coordinates.
SAMPLINGS = ("uniform", "leverage")


class RowSampleSketch(Sketch):
    """Row sampling, Eq. 14 of Yang et al., arXiv:2006.05924 (SENG): row t of ``Omega [q, n]`` is
    ``e_{i_t}^T / sqrt(q p_{i_t})``, so that ``E[Omega^T Omega] = I`` (the paper prints
    ``e_i^T / p_i``; the ``1 / sqrt(q p_i)`` scaling is the one that makes the sketched
    least-squares problem unbiased).

    - ``"uniform"``: q distinct coordinates (without replacement), scale ``sqrt(n / q)``;
      with ``q = n`` this is a permutation and the sketch is exact;
    - ``"leverage"``: q draws with replacement, ``p_i`` proportional to ``weights`` (the
      squared row norms of the sketched matrix: the paper's "leverage score sampling");
      weights without mass fall back to uniform sampling.

    Attributes:
        index: the sampled coordinates ``[q]`` (int64); ``(Omega a)_t = scale_t a[index_t]``.
        scale: ``[q]`` (float64).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        *,
        sampling: str = "uniform",
        weights: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if isinstance(rows, int) and isinstance(cols, int) and not 1 <= rows <= cols:
            raise ValueError(f"a row sample keeps 1 to {cols} of {cols} coordinates, got {rows}")
        if sampling == "leverage" and (weights is None or weights.shape != (cols,)):
            raise ValueError(f"leverage sampling needs weights of shape [{cols}]")
        self.sampling, self.weights = sampling, weights
        super().__init__(rows, cols, generator=generator, device=device)

    def _draw(self, generator: torch.Generator) -> None:
        q, n = self.rows, self.cols
        if self.sampling == "leverage":
            p = self.weights.detach().to(self.device, torch.float64).clamp_min(0.0)
            total = float(p.sum())
            if total > 0 and math.isfinite(total):
                p = p / total
                self.index = torch.multinomial(p, q, replacement=True, generator=generator)
                self.scale = 1.0 / torch.sqrt(q * p[self.index])
                return
        self.index = torch.randperm(n, generator=generator, device=self.device)[:q]
        self.scale = torch.full((q,), math.sqrt(n / q), dtype=torch.float64, device=self.device)

    def _apply_last(self, a: Tensor) -> Tensor:
        picked = a.index_select(-1, self.index.to(a.device))
        return picked * self.scale.to(a.device, a.dtype)


#: Sketches by name: ``name -> class(rows, cols, generator=..., device=...)``.
SKETCHES: dict[str, type[Sketch]] = {
    "gaussian": GaussianSketch,
    "srht": SRHTSketch,
    "sparse": SparseSignSketch,
    "countsketch": CountSketch,
}


def make_sketch(
    kind: str,
    rows: int,
    cols: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Sketch:
    """The sketch ``kind`` (a key of :data:`SKETCHES`) of shape ``[rows, cols]``."""
    if kind not in SKETCHES:
        raise ValueError(f"unknown sketch {kind!r}; choose one of {sorted(SKETCHES)}")
    return SKETCHES[kind](rows, cols, generator=generator, device=device)


class KroneckerSketch:
    """``S = S_G (x) S_A`` applied to per-sample gradients through their factors.

    A layer ``y_is = W x_is`` (W ``[d_out, d_in]``) with inputs X ``[b, s, d_in]`` and
    output-gradients Z ``[b, k, s, d_out]`` has per-sample gradients (row ``r = i k + c``)
    ``G_r = sum_s z_rs x_is^T`` ``[d_out, d_in]``, flattened row-major into U ``[n, d_out
    d_in]``, n = b k. Since ``(S_G (x) S_A) vec(G) = vec(S_G G S_A^T)``, the sketched rows

        U S^T = [vec(sum_s (S_G z_rs)(S_A x_is)^T)]_r            [n, m_G m_A]

    come from the sketched factors ``Z S_G^T`` and ``X S_A^T`` (cost: the two sketches,
    then ``n s m_G m_A``) and U is never formed (SENG's Eq. 17: ``Xi_G = Omega_G G``, ``Xi_A = Omega_A A``).
    Fold a bias in by appending a column of ones to X.

    ``S`` is a subspace embedding of U's row space when S_G embeds the span of the
    ``z_rs`` and S_A that of the ``x_is`` (then ``||S_G M S_A^T||_F = (1 +- delta)^2 ||M||_F``
    for every M in that span): use ``m >= 4 min(n s, dim)`` rows per side, or no sketch.

    Args:
        grads: S_G ``[m_G, d_out]``, or None for the identity (``m_G = d_out``).
        inputs: S_A ``[m_A, d_in]``, or None for the identity.
    """

    def __init__(self, grads: Sketch | None, inputs: Sketch | None) -> None:
        self.grads, self.inputs = grads, inputs

    def sketch_inputs(self, x: Tensor) -> Tensor:
        """``X S_A^T``: ``[b, s, d_in] -> [b, s, m_A]``."""
        return x if self.inputs is None else self.inputs.apply(x, dim=-1)

    def sketch_grads(self, z: Tensor) -> Tensor:
        """``Z S_G^T``: ``[b, k, s, d_out] -> [b, k, s, m_G]``."""
        return z if self.grads is None else self.grads.apply(z, dim=-1)

    def per_sample(self, x: Tensor, z: Tensor) -> Tensor:
        """Sketched per-sample gradients ``U S^T``, ``[b k, m_G m_A]``."""
        xs, zs = self.sketch_inputs(x), self.sketch_grads(z)
        b, k = zs.shape[:2]
        return torch.einsum("bksg,bsa->bkga", zs, xs).reshape(b * k, -1)

    def sketch_matrix(self, m: Tensor) -> Tensor:
        """``S_G M S_A^T`` for a parameter-shaped ``M`` ``[d_out, d_in] -> [m_G, m_A]``
        (SENG's ``Xi_z``): then ``(U S^T)(S vec M)`` is Eq. 19 on sketched factors."""
        if self.grads is not None:
            m = self.grads.apply(m, dim=0)
        return m if self.inputs is None else self.inputs.apply(m, dim=1)

    def gram(self, x: Tensor, z: Tensor) -> Tensor:
        """``(U S^T)(U S^T)^T``, ``[b k, b k]``, by the cheaper of the Gram's two forms on
        the sketched factors (``(Z~ Z~^T) * (X~ X~^T)`` when s = 1; SENG's Eq. 21)."""
        return shared_weight_gram(self.sketch_inputs(x), self.sketch_grads(z))
