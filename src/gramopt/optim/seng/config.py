"""SENG's options, grouped (Section 3.2-3.3 and Algorithm 1 of
Minghan Yang, Dong Xu, Zaiwen Wen, Mengyun Chen, Pengxiang Xu, "Sketchy Empirical
Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020).

``SketchConfig`` says how the curvature is sketched; ``ImplicitConfig`` which layers keep
per-sample low-rank factors instead of U and how those are used. Each validates its own
fields with a ValueError naming the field; what depends on the model (a sketch larger
than a layer) is checked by :class:`~gramopt.optim.seng.SENG` when it sees the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gramopt.linalg.sketches import SAMPLINGS


def _check_size(name: str, value: int | float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int (rows) or a float fraction in (0, 1], got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{name} must be >= 1 rows, got {value}")
    if isinstance(value, float) and not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} as a fraction must lie in (0, 1], got {value}")


def sketch_rows(size: int | float, n: int) -> int:
    """The number of rows a sketch ``size`` keeps of an n-dimensional side: ``size`` itself
    (an int) or ``ceil(size * n)`` (a fraction)."""
    if isinstance(size, float):
        return max(1, math.ceil(size * n))
    return size


@dataclass(frozen=True)
class SketchConfig:
    """Row-sampling sketches (Eq. 11-14 and 17); at least one size must be given.

    Attributes:
        size: explicit layers: q, the rows of Omega in the sketched least-squares
            problem (Eq. 11); an int (at most the layer's number of parameters) or a
            fraction of it; None: explicit layers are not sketched.
        sampling: ``"uniform"`` (without replacement) or ``"leverage"`` (squared row
            norms of U, with replacement), Eq. 14.
        factor_size: implicit layers: zeta_G and zeta_A, the rows kept of each factor
            side (Eq. 17); an int (at most n_G and n_A) or a fraction of each side;
            None: the factors are not sketched (the paper's choice for small n_G, n_A).
        seed: seed of the optimizer's sketch generator (its state is saved in
            ``state_dict()``); None draws one from torch's global generator.
    """

    size: int | float | None = None
    sampling: str = "leverage"
    factor_size: int | float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_size("SketchConfig.size", self.size)
        _check_size("SketchConfig.factor_size", self.factor_size)
        if self.size is None and self.factor_size is None:
            raise ValueError(
                "SketchConfig needs size (explicit layers) and/or factor_size (implicit layers); use sketch=None for "
                "no sketching"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"SketchConfig.sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SketchConfig.seed must be an int or None, got {self.seed!r}")


@dataclass(frozen=True)
class ImplicitConfig:
    """Implicit layers (Section 3.3): Linear and Conv layers with at least ``threshold``
    parameters (weight and bias) keep per-sample factors ``G_i [r, n_G]``, ``A_i [r, n_A]``
    (Eq. 15) instead of U and compute U g, U U^T and U^T c from them (Eq. 19, 21, 23).

    Attributes:
        threshold: the size from which a layer is implicit (Algorithm 1's threshold);
            None: no layer is implicit.
        rank: r of Eq. 15; a layer that shares its weight over kappa > r positions
            keeps the r leading singular directions of the smaller factor (footnote 1);
            None: no truncation (r = kappa).
        exact_product: False: U^T c by Eq. 23, the product of two weighted factor sums
            (an approximation, see :func:`~gramopt.optim.seng.implicit.eq23_product`);
            True: the exact ``sum_i c_i G_i^T A_i`` (one matmul, for checking).
    """

    threshold: int | None = 2**20
    rank: int | None = None
    exact_product: bool = False

    def __post_init__(self) -> None:
        for name in ("threshold", "rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ImplicitConfig.{name} must be an int >= 1 or None, got {value!r}")
        if not isinstance(self.exact_product, bool):
            raise ValueError(f"ImplicitConfig.exact_product must be a bool, got {self.exact_product!r}")
