"""The optimizers: the method contract and shared step (``base.py``, with the update
of ``update.py`` and the warnings of ``notices.py``), one module or package per method."""

from gramopt.optim.base import Batch, MethodNeeds, SampleSpaceOptimizer, StepInfo
from gramopt.optim.fngd import FNGD
from gramopt.optim.gauss_newton import GaussNewton, GaussNewtonStepInfo
from gramopt.optim.ggn import (
    GGN,
    SOLVERS,
    AdaptiveDamping,
    GaussNewtonOperator,
    GaussNewtonSystem,
    GGNStepInfo,
    check_solver_options,
    choose_solver,
)
from gramopt.optim.schedules import DampingDecay, WarmupPolyDecay
from gramopt.optim.seng import SENG, ImplicitConfig, SketchConfig

__all__ = [
    "FNGD",
    "GGN",
    "Batch",
    "GGNStepInfo",
    "MethodNeeds",
    "SENG",
    "SOLVERS",
    "AdaptiveDamping",
    "DampingDecay",
    "GaussNewton",
    "GaussNewtonStepInfo",
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
