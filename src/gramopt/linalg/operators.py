"""Matrices given by their products: the :class:`LinearOperator` interface that
:func:`~gramopt.linalg.fast_regression` solves with, and its dense case."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from gramopt.linalg.sketches import Sketch


class LinearOperator(ABC):
    """A matrix A ``[N, k]`` given by its products.

    Subclasses set ``shape = (N, k)``, ``dtype`` and ``device`` and implement
    :meth:`matmul` and :meth:`rmatmul`.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def matmul(self, v: Tensor) -> Tensor:
        """``A v``: ``[k] -> [N]``."""

    @abstractmethod
    def rmatmul(self, u: Tensor) -> Tensor:
        """``A^T u``: ``[N] -> [k]``."""

    def normal_matvec(self, v: Tensor) -> Tensor:
        """``A^T A v``, ``[k] -> [k]`` (override when there is a cheaper way)."""
        return self.rmatmul(self.matmul(v))

    def sketch_gram(self, kind: str, oversampling: float, generator: torch.Generator | None) -> Tensor | None:
        """``(S A)^T (S A)`` ``[k, k]`` for a subspace embedding S of range(A) built
        through the operator's structure, or None (then S A is formed from products)."""
        return None

    def sketch(self, sketch: Sketch) -> Tensor:
        """``S A`` ``[s, k]`` from k products with A (override with a cheaper way)."""
        n, k = self.shape
        eye = torch.eye(k, dtype=self.dtype, device=self.device)
        return torch.stack([sketch.apply(self.matmul(eye[:, j])) for j in range(k)], dim=1)


class DenseOperator(LinearOperator):
    """A dense ``[N, k]`` tensor as a :class:`LinearOperator`."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype, self.device = matrix.dtype, matrix.device

    def matmul(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def rmatmul(self, u: Tensor) -> Tensor:
        return self.matrix.T @ u

    def sketch(self, sketch: Sketch) -> Tensor:
        return sketch.apply(self.matrix)
