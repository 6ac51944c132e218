"""``poisson5d``: the 5-D Poisson problem of the KFAC-for-PINNs and Woodbury-ENGD papers, a
residual task (:mod:`gramopt.tasks.residual`).

    -Lap u(x) = pi^2 sum_i cos(pi x_i)   on (0, 1)^5,     u = u* on the boundary,

with the solution ``u*(x) = sum_i cos(pi x_i)``. Network: the tanh MLP 5-64-64-48-48-1
(10,065 parameters, float64, PyTorch's default initialization drawn from the seed). Points:
3,000 interior points uniform in the cube and 500 boundary points uniform on its faces, drawn
anew every step; the error is measured on 30,000 uniform points.

Dangel, Müller, Zeinhofer, "Kronecker-Factored Approximate Curvature for Physics-Informed
Neural Networks", NeurIPS 2024, arXiv:2405.15603, Eq. 18 and the appendix on the 5-D Poisson
equation; Guzmán-Cordero, Dangel, Goldshlager, Zeinhofer, "Improving Energy Natural Gradient
Descent through Woodbury, Momentum, and Randomization", NeurIPS 2025, arXiv:2505.12149 (the
same problem, network and point counts). The definition lives in
:data:`gramopt.pde.problems.POISSON_5D`.
"""

from __future__ import annotations

from gramopt.pde.problems import POISSON_5D
from gramopt.tasks.record import RESIDUAL_METRIC, ladder, register_task
from gramopt.tasks.residual import residual_task

register_task(
    residual_task(
        POISSON_5D,
        description="5-D Poisson PINN (3000 + 500 points drawn every step), tanh MLP 5-64-64-48-48-1, float64",
        ladder=ladder(RESIDUAL_METRIC, (1e-2, 1e-3, 1e-5), below=True),
        budget_seconds=600.0,
        steps=200,
    )
)
