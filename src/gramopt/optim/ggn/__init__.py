"""Gram-Gauss-Newton: the optimizer (``optimizer.py``, the paper's algorithm), the
system of one step (``system.py``) and its solvers (``solvers.py``: dense Cholesky,
CG, sketch- and Nystrom-preconditioned CG, ``auto``)."""

from gramopt.optim.ggn.damping import AdaptiveDamping
from gramopt.optim.ggn.optimizer import GGN, GaussNewtonBatch, GGNStepInfo
from gramopt.optim.ggn.solvers import SOLVERS, GaussNewtonOperator, check_solver_options, choose_solver
from gramopt.optim.ggn.system import GaussNewtonSystem

__all__ = [
    "AdaptiveDamping",
    "GGN",
    "SOLVERS",
    "GaussNewtonBatch",
    "GaussNewtonOperator",
    "GaussNewtonSystem",
    "GGNStepInfo",
    "check_solver_options",
    "choose_solver",
]
