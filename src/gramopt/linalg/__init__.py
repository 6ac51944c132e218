"""Linear algebra of the sample-space systems: dense solves (and, later, sketches and
sketch-preconditioned iterative solvers)."""

from gramopt.linalg.dense import NumericalWarning, SolveInfo, solve_damped_psd

__all__ = ["NumericalWarning", "SolveInfo", "solve_damped_psd"]
