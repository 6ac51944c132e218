"""Physics-informed residuals: derivatives of a network with respect to its inputs, pushed
forward through the model's own modules (so that gramopt's hooks see every weight use).

    forward_laplacian   value, gradient and Laplacian in one forward pass (Derivatives)
    register_activation derivatives of another elementwise activation module
    Sin                 the sine as a module
    problems            the PINN problems of the papers (Poisson 2-D and 5-D, heat), as records
                        (gramopt.pde.problems.PROBLEMS)
"""

from gramopt.pde.activations import Sin, register_activation
from gramopt.pde.laplacian import Derivatives, forward_laplacian

__all__ = ["Derivatives", "Sin", "forward_laplacian", "register_activation"]
