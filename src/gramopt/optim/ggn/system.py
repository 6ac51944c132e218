"""The system of one GGN step, ``(Q^T J J^T Q + damping I) a = w``, given by the
per-layer factors of J: what every solver of :mod:`gramopt.optim.ggn.solvers` takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gramopt.capture.factors import LayerFactors
from gramopt.errors import NonFiniteError
from gramopt.linalg.dense import all_finite


@dataclass
class GaussNewtonSystem:
    """The symmetric system ``(Q^T R R^T Q + damping I) a = w`` of one GGN step.

    ``R^T = [U_1, U_2, ...]`` holds the captured rows (one per sample and backward pass,
    ``n = b r`` of them) given by per-layer factors, so solvers can either build the Gram
    (:meth:`dense`) or work matrix-free (:meth:`matvec`: two passes over the factors,
    never an ``n x n`` matrix). Q is per-sample ``[b, r, m]``, so the system has size
    ``b m``. The step direction is ``R^T x`` with x from :meth:`coefficients`:

    - in-span systems (``outside`` None; exact, top): ``x = Q a``. With rows
      ``R = J`` and ``Q = Q_i`` this is ``J^T (H G + damping I)^{-1} e``; with rows
      ``R = Q~^T J`` (``Q`` None) it is ``M (M^T M + damping I)^{-1} w`` for ``M = R^T``.
    - sampled systems (``outside`` = c, the coefficients of the gradient ``g = R^T c``,
      whose span the sampled rows need not contain): with M = R^T Q the sampled rows,
      Sherman-Morrison-Woodbury gives
      ``(M M^T + d I)^{-1} g = (g - M (M^T M + d I)^{-1} M^T g) / d``, i.e. the right
      side is ``w = Q^T R R^T c`` (:meth:`sampled_rhs`) and ``x = (c - Q a) / d``.

    When Q only *selects* rows (``selected``: Q_i = [I_m; 0], the first m of each sample's
    r rows, as the sampled curvature's rows come before the gradient's), ``Q^T G Q`` is the
    ``[b m, b m]`` block of G on those rows: :meth:`dense` and :meth:`matvec` use the
    layers' :meth:`~gramopt.capture.factors.LayerFactors.pass_block` and never the rest of
    the ``[b r, b r]`` Gram (at s = 1 a quarter of it), and :meth:`sampled_rhs` the layers'
    :meth:`~gramopt.capture.factors.LayerFactors.block_product`.

    Attributes:
        factors: layer name -> factors of R (``n = b r`` rows).
        q: per-sample ``[b, r, m]`` (None: the identity, m = r).
        rhs: w, ``[b m]``.
        damping: >= 0 (> 0 for sampled systems).
        step: the optimizer's step number (randomized solvers seed their sketches with it,
            so a step is reproducible and ``state_dict()`` round-trips).
        outside: c ``[n]`` for sampled systems, else None.
        selected: m when ``q`` is the selection ``[I_m; 0]`` of every sample (checked), else None.
    """

    factors: dict[str, LayerFactors]
    q: Tensor | None
    rhs: Tensor
    damping: float
    step: int = 0
    outside: Tensor | None = None
    selected: int | None = None
    _blocks: dict[str, LayerFactors] | None = field(default=None, init=False, repr=False)
    #: ``R R^T`` ``[n, n]`` once :meth:`dense` formed it (all rows), for :meth:`gram_product`
    _gram: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.selected is not None and not is_selection(self.q, self.selected):
            raise ValueError(f"internal: selected={self.selected} but q is not [I; 0] for every sample")

    def block_factors(self) -> dict[str, LayerFactors]:
        """The factors of the selected rows (``selected``), or of all rows."""
        if self.selected is None or self.q is None:
            return self.factors
        if self._blocks is None:
            b, r, m = self.q.shape
            self._blocks = {name: f.pass_block(b, r, m) for name, f in self.factors.items()}
        return self._blocks

    @property
    def size(self) -> int:
        return self.rhs.shape[0]

    @property
    def rows(self) -> int:
        """n, the number of captured rows."""
        return self.size if self.q is None else self.q.shape[0] * self.q.shape[1]

    def apply_q(self, a: Tensor) -> Tensor:
        """Q a for ``a`` ``[b m]``, ``[n]``."""
        if self.q is None:
            return a
        b, _, m = self.q.shape
        return torch.einsum("bij,bj->bi", self.q, a.view(b, m)).reshape(-1)

    def apply_qt(self, v: Tensor) -> Tensor:
        """Q^T v for ``v`` ``[n]``, ``[b m]``."""
        if self.q is None:
            return v
        b, r, _ = self.q.shape
        return torch.einsum("bji,bj->bi", self.q, v.view(b, r)).reshape(-1)

    def gram_product(self, x: Tensor) -> Tensor:
        """``R R^T x`` for ``x`` ``[n]``, ``[n]``: one product with the Gram if :meth:`dense`
        formed it (damping adaptation's predicted reduction after a Cholesky solve, where two
        passes over the factors would cost a sizeable part of the step: benchmarks/notes.md),
        else two passes over the factors, never forming it."""
        if self._gram is not None:
            return self._gram @ x.to(self._gram.dtype)
        out = torch.zeros_like(x)
        for factor in self.factors.values():
            out = out + factor.matvec(factor.rmatvec(x))
        return out

    def dense(self) -> Tensor:
        """``Q^T G Q`` with ``G = sum_l K_l``, ``[b m, b m]``; raises on a non-finite block.
        With ``selected``, the block of G on the selected rows, formed alone."""
        gram = None
        blocks = {}
        selecting = self.selected is not None and self.q is not None
        for name, factor in self.block_factors().items():
            blocks[name] = block = factor.gram()
            gram = block if gram is None else gram + block
        # one check of the sum (a NaN or inf in a block shows in it); the blocks are
        # checked one by one only to name the culprit
        if gram is not None and not all_finite(gram):
            for name, block in blocks.items():
                if not all_finite(block):
                    raise NonFiniteError(f"the Gram block of layer {name} has NaN or inf; nothing was changed")
            raise NonFiniteError("the Gram matrix (the sum of the layers' blocks) overflowed; nothing was changed")
        if selecting:
            return gram
        self._gram = gram
        return self.sandwich(gram)

    def sandwich(self, gram: Tensor) -> Tensor:
        """``Q^T K Q`` for an ``[n, n]`` matrix K (K itself when Q is the identity)."""
        if self.q is None:
            return gram
        b, r, m = self.q.shape
        g4 = gram.view(b, r, b, r)
        g4 = torch.einsum("iac,iajd->icjd", self.q, g4)
        g4 = torch.einsum("icje,jed->icjd", g4, self.q)
        return g4.reshape(b * m, b * m)

    def matvec(self, a: Tensor) -> Tensor:
        """``Q^T R R^T Q a`` without forming the Gram, ``[b m]`` (with ``selected``:
        through the selected rows' factors only)."""
        if self.selected is not None and self.q is not None:
            out = torch.zeros_like(a)
            for factor in self.block_factors().values():
                out = out + factor.matvec(factor.rmatvec(a))
            return out
        return self.apply_qt(self.gram_product(self.apply_q(a)))

    def coefficients(self, a: Tensor) -> Tensor:
        """x ``[n]`` of the direction ``R^T x`` for the solution a (class doc)."""
        if self.outside is None:
            return self.apply_q(a)
        return (self.outside - self.apply_q(a)) / self.damping

    def gradient_coefficients(self, w: Tensor | None = None) -> Tensor:
        """c ``[n]`` with ``g = R^T c``: ``outside``, or ``Q w`` for in-span systems."""
        return self.outside if self.outside is not None else self.apply_q(self.rhs if w is None else w)

    @staticmethod
    def sampled_rhs(
        factors: dict[str, LayerFactors], q: Tensor, outside: Tensor, selected: int | None = None
    ) -> Tensor:
        """``w = Q^T R R^T c`` ``[b m]`` of a sampled system (class doc); with ``selected``
        (``q`` = [I; 0]), the layers' ``U[S] U^T c`` (:meth:`LayerFactors.block_product`)."""
        if selected is not None:
            if not is_selection(q, selected):
                raise ValueError(f"internal: selected={selected} but q is not [I; 0] for every sample")
            b, r, m = q.shape
            w = None
            for factor in factors.values():
                part = factor.block_product(b, r, m, outside)
                w = part if w is None else w + part
            return w if w is not None else torch.zeros(b * m, dtype=outside.dtype, device=outside.device)
        probe = GaussNewtonSystem(
            factors, q, torch.zeros(q.shape[0] * q.shape[2], dtype=outside.dtype, device=outside.device), 0.0
        )
        return probe.apply_qt(probe.gram_product(outside))


def is_selection(q: Tensor | None, selected: int) -> bool:
    """Whether ``q`` ``[b, r, m]`` is ``[I_m; 0]`` for every sample with ``m = selected``."""
    if q is None or q.dim() != 3 or q.shape[2] != selected or q.shape[1] < selected:
        return False
    eye = torch.eye(selected, dtype=q.dtype, device=q.device)
    return bool(torch.equal(q[:, :selected], eye.expand_as(q[:, :selected])) and not q[:, selected:].any())
