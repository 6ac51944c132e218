"""Linear algebra of the sample-space systems: Gram kernels of per-sample gradients given
by factors, dense solves, sketches, conjugate gradients with sketch and Nystrom
preconditioners, fast regression (Algorithm 2 of the near-linear-time paper) and sketched
Newton (its Algorithm 3). It imports nothing of :mod:`gramopt.capture` or
:mod:`gramopt.optim`, which build on it."""

from gramopt.linalg.dense import NumericalWarning, SolveInfo, all_finite, solve_damped_psd
from gramopt.linalg.kernels import shared_weight_gram, symmetric_gram
from gramopt.linalg.krylov import nystrom_preconditioner, pcg
from gramopt.linalg.newton import NewtonInfo, logistic_loss, newton
from gramopt.linalg.operators import DenseOperator, LinearOperator
from gramopt.linalg.regression import fast_regression
from gramopt.linalg.sketches import (
    SAMPLINGS,
    SKETCHES,
    CountSketch,
    GaussianSketch,
    KroneckerSketch,
    RowSampleSketch,
    Sketch,
    SparseSignSketch,
    SRHTSketch,
    fwht,
    make_sketch,
)

__all__ = [
    "SAMPLINGS",
    "SKETCHES",
    "CountSketch",
    "DenseOperator",
    "GaussianSketch",
    "KroneckerSketch",
    "LinearOperator",
    "NewtonInfo",
    "NumericalWarning",
    "RowSampleSketch",
    "SRHTSketch",
    "Sketch",
    "SolveInfo",
    "SparseSignSketch",
    "all_finite",
    "fast_regression",
    "fwht",
    "logistic_loss",
    "make_sketch",
    "newton",
    "nystrom_preconditioner",
    "pcg",
    "shared_weight_gram",
    "solve_damped_psd",
    "symmetric_gram",
]
