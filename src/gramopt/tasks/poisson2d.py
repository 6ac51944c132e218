"""``poisson2d``: the 2-D Poisson problem of the energy natural gradient and KFAC-for-PINNs
papers, a residual task (:mod:`gramopt.tasks.residual`).

    -Lap u(x, y) = 2 pi^2 sin(pi x) sin(pi y)   on (0, 1)^2,     u = 0 on the boundary,

with the solution ``u*(x, y) = sin(pi x) sin(pi y)``. Network: the "deep-wide" tanh MLP
2-64-64-48-48-1 (9,873 parameters, float64, PyTorch's default initialization drawn from the
seed). Points: one fixed set of 900 interior points uniform in the square and 120 boundary
points uniform on its edges, per seed; the error is measured on 9,000 uniform points.

Müller & Zeinhofer, "Achieving High Accuracy with PINNs via Energy Natural Gradient Descent",
ICML 2023, arXiv:2302.13163 (the problem and the parameter-space ENGD step); Dangel, Müller,
Zeinhofer, "Kronecker-Factored Approximate Curvature for Physics-Informed Neural Networks",
NeurIPS 2024, arXiv:2405.15603, Eq. 16 and the appendix on the 2-D Poisson equation (this
network and these point counts). The definition lives in
:data:`gramopt.pde.problems.POISSON_2D`.
"""

from __future__ import annotations

from gramopt.pde.problems import POISSON_2D
from gramopt.tasks.record import RESIDUAL_METRIC, ladder, register_task
from gramopt.tasks.residual import residual_task

register_task(
    residual_task(
        POISSON_2D,
        description="2-D Poisson PINN (900 + 120 fixed points), tanh MLP 2-64-64-48-48-1, float64",
        ladder=ladder(RESIDUAL_METRIC, (1e-2, 1e-4, 1e-6), below=True),
        budget_seconds=120.0,
        steps=200,
    )
)
