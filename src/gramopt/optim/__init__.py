"""The optimizers: the shared step (``base.py``), one module or package per method."""

from gramopt.optim.base import SampleSpaceOptimizer, StepInfo
from gramopt.optim.fngd import FNGD
from gramopt.optim.ggn import GGN, AdaptiveDamping, SOLVERS, GaussNewtonOperator, GaussNewtonSystem, check_solver_options, choose_solver
from gramopt.optim.schedules import DampingDecay, WarmupPolyDecay
from gramopt.optim.seng import SENG, ImplicitConfig, SketchConfig

__all__ = [
    "FNGD",
    "GGN",
    "SENG",
    "SOLVERS",
    "AdaptiveDamping",
    "DampingDecay",
    "GaussNewtonOperator",
    "GaussNewtonSystem",
    "ImplicitConfig",
    "SampleSpaceOptimizer",
    "SketchConfig",
    "StepInfo",
    "WarmupPolyDecay",
    "check_solver_options",
    "choose_solver",
]
