"""Linear algebra of the sample-space systems: dense solves, sketches, conjugate
gradients with sketch and Nystrom preconditioners, fast regression (Algorithm 2 of the
near-linear-time paper) and sketched Newton (its Algorithm 3)."""

from gramopt.linalg.dense import NumericalWarning, SolveInfo, solve_damped_psd
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
    "fast_regression",
    "fwht",
    "logistic_loss",
    "make_sketch",
    "newton",
    "nystrom_preconditioner",
    "pcg",
    "solve_damped_psd",
]
