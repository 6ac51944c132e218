"""The optimizers, one file per method."""

from gramopt.optim.base import SampleSpaceOptimizer, StepInfo
from gramopt.optim.fngd import FNGD
from gramopt.optim.ggn import GGN, SOLVERS, GaussNewtonSystem

__all__ = ["FNGD", "GGN", "SOLVERS", "GaussNewtonSystem", "SampleSpaceOptimizer", "StepInfo"]
