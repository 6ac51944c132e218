"""The system of one GGN step, ``(Q^T J J^T Q + damping I) a = w``, given by the
per-layer factors of J: what every solver of :mod:`gramopt.optim.ggn.solvers` takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gramopt.capture.factors import LayerFactors, all_finite
from gramopt.errors import NonFiniteError


@dataclass
class GaussNewtonSystem:
    """The symmetric system ``(Q^T J J^T Q + damping I) a = w`` of one GGN step.

    ``J`` is given by per-layer factors (``J = [U_1, U_2, ...]`` column blocks), so
    solvers can either build the Gram (:meth:`dense`) or work matrix-free
    (:meth:`matvec`: two passes over the factors, never a b k x b k matrix).

    Attributes:
        factors: layer name -> factors of J (``n = b k`` rows).
        q: per-sample Hessian factors ``[b, k, k]``, or None for the identity.
        rhs: w, ``[n]``.
        damping: >= 0.
        step: the optimizer's step number (randomized solvers seed their sketches with it,
            so a step is reproducible and ``state_dict()`` round-trips).
    """

    factors: dict[str, LayerFactors]
    q: Tensor | None
    rhs: Tensor
    damping: float
    step: int = 0

    @property
    def size(self) -> int:
        return self.rhs.shape[0]

    def apply_q(self, a: Tensor) -> Tensor:
        """Q a for ``a`` ``[n]``."""
        if self.q is None:
            return a
        b, k, _ = self.q.shape
        return torch.einsum("bij,bj->bi", self.q, a.view(b, k)).reshape(-1)

    def apply_qt(self, a: Tensor) -> Tensor:
        """Q^T a for ``a`` ``[n]``."""
        if self.q is None:
            return a
        b, k, _ = self.q.shape
        return torch.einsum("bji,bj->bi", self.q, a.view(b, k)).reshape(-1)

    def dense(self) -> Tensor:
        """``Q^T G Q`` with ``G = sum_l K_l``, ``[n, n]``; raises on a non-finite block."""
        gram = None
        blocks = {}
        for name, factor in self.factors.items():
            blocks[name] = block = factor.gram()
            gram = block if gram is None else gram + block
        # one check of the sum (a NaN or inf in a block shows in it); the blocks are
        # checked one by one only to name the culprit
        if gram is not None and not all_finite(gram):
            for name, block in blocks.items():
                if not all_finite(block):
                    raise NonFiniteError(f"the Gram block of layer {name} has NaN or inf; nothing was changed")
            raise NonFiniteError("the Gram matrix (the sum of the layers' blocks) overflowed; nothing was changed")
        return self.sandwich(gram)

    def sandwich(self, gram: Tensor) -> Tensor:
        """``Q^T K Q`` for an ``[n, n]`` matrix K (K itself when Q is the identity)."""
        if self.q is None:
            return gram
        b, k, _ = self.q.shape
        g4 = gram.view(b, k, b, k)
        g4 = torch.einsum("iac,iajd->icjd", self.q, g4)
        g4 = torch.einsum("icje,jed->icjd", g4, self.q)
        return g4.reshape(b * k, b * k)

    def matvec(self, a: Tensor) -> Tensor:
        """``Q^T J J^T Q a`` without forming the Gram, ``[n]``."""
        qa = self.apply_q(a)
        out = torch.zeros_like(a)
        for factor in self.factors.values():
            out = out + factor.matvec(factor.rmatvec(qa))
        return self.apply_qt(out)
