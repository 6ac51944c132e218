"""``heat``: the (4+1)-D heat equation of the KFAC-for-PINNs paper, a residual task
(:mod:`gramopt.tasks.residual`).

    d_t u(t, x) - 1/4 Lap_x u(t, x) = 0   for (t, x) in (0, 1) x (0, 1)^4,
    u(0, x) = sum_i sin(2 x_i),   u(t, x) = exp(-t) sum_i sin(2 x_i) on the spatial boundary,

with the solution ``u*(t, x) = exp(-t) sum_i sin(2 x_i)`` (points are ``(t, x)``, time first).
Network: the tanh MLP 5-64-64-48-48-1 (10,065 parameters, float64, PyTorch's default
initialization drawn from the seed). Points: 3,000 interior points uniform in the space-time
cylinder and 500 condition points (250 on the spatial boundary at uniform times, 250 at
t = 0; one residual group), drawn anew every step; the error is measured on 30,000 uniform
points.

Dangel, Müller, Zeinhofer, "Kronecker-Factored Approximate Curvature for Physics-Informed
Neural Networks", NeurIPS 2024, arXiv:2405.15603, Eq. 17 (kappa = 1/4) and the appendix on
the 4+1-D heat equation (of their networks, the one parameter-space ENGD still fits). The
definition lives in :data:`gramopt.pde.problems.HEAT`.
"""

from __future__ import annotations

from gramopt.pde.problems import HEAT
from gramopt.tasks.record import RESIDUAL_METRIC, ladder, register_task
from gramopt.tasks.residual import residual_task

register_task(
    residual_task(
        HEAT,
        description="(4+1)-D heat equation PINN (3000 + 500 points drawn every step), "
        "tanh MLP 5-64-64-48-48-1, float64",
        ladder=ladder(RESIDUAL_METRIC, (1e-2, 1e-3, 1e-5), below=True),
        budget_seconds=300.0,
        steps=200,
    )
)
