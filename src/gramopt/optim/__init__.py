"""The optimizers, one file per method."""

from gramopt.optim.base import SampleSpaceOptimizer, StepInfo
from gramopt.optim.ggn import GGN, SOLVERS, GaussNewtonSystem
from gramopt.optim.gn_solvers import GaussNewtonOperator, check_solver_options, choose_solver

__all__ = [
    "GGN",
    "SOLVERS",
    "GaussNewtonOperator",
    "GaussNewtonSystem",
    "SampleSpaceOptimizer",
    "StepInfo",
    "check_solver_options",
    "choose_solver",
]
