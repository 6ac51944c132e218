"""Gauss-Newton for any least-squares residual (``gramopt.GaussNewton``), one file per
phase of the step: ``residuals`` (the closure and its checks), ``jacobian`` (hooks and
functional Jacobians, the check), ``solve`` (sample or parameter space, GGN's solvers),
``line_search``, and ``optimizer`` (the step, phase by phase)."""

from gramopt.optim.gauss_newton.optimizer import GaussNewton, GaussNewtonStepInfo

__all__ = ["GaussNewton", "GaussNewtonStepInfo"]
