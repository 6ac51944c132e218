"""The physics-informed problems of the papers, as plain records.

Each :class:`PINNProblem` holds a PDE ``L u = f`` on the unit cube (or ``(t, x)`` in
``[0, 1]^(1+d)``) with Dirichlet data ``u = g`` on the boundary (and initial data, for the
heat equation), its exact solution, the papers' network and point counts, and samplers
that draw from an explicit ``torch.Generator``.

The loss. :meth:`PINNProblem.residuals` returns the residual groups

    r_interior = (L u(x_n) - f(x_n)) / sqrt(N_interior),   r_boundary = (u(x^b_n) - g(x^b_n)) / sqrt(N_boundary),

so that ``L(theta) = 1/2 sum_g ||r_g||^2 = 1/(2 N_interior) sum_n (L u - f)^2 +
1/(2 N_boundary) sum_n (u - g)^2``: the mean-square PINN loss of Dangel, Müller, Zeinhofer,
"Kronecker-Factored Approximate Curvature for Physics-Informed Neural Networks",
NeurIPS 2024, arXiv:2405.15603, Eq. 1 (and of their code: ``0.5 * mean(residual^2)`` per
group). Their heat-equation appendix writes the same loss without the 1/2; a constant
factor c on L changes no minimizer and turns a Gauss-Newton step with damping lambda into
the one with damping lambda / c.

The error. :meth:`PINNProblem.relative_l2_error` is ``||u_theta - u*||_2 / ||u*||_2`` over
a fixed evaluation set drawn uniformly from the domain (:meth:`PINNProblem.evaluation_set`;
the paper's size, 10 x N_interior). Dangel et al.'s figures say "relative L2 error"; their
code logs the root-mean-square error ``sqrt(mean (u_theta - u*)^2)`` without dividing by
u*'s norm, which for ``poisson2d`` (RMS of u* = 1/2) is half the relative error.

Points. Interior points are uniform in the domain; boundary points are uniform on the cube's
boundary (a face drawn uniformly, then a uniform point on it), as in the authors' code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gramopt.pde.laplacian import Derivatives, forward_laplacian


@dataclass(frozen=True)
class Points:
    """Training points of one step: ``interior [N_interior, d]``, ``boundary [N_boundary, d]``."""

    interior: Tensor
    boundary: Tensor


@dataclass(frozen=True)
class PINNProblem:
    """A PDE problem with its exact solution, network and points (module doc).

    Attributes:
        name: the problem's short name.
        dim: coordinates of a point (``d``, or ``1 + d`` with time first).
        hidden: widths of the tanh MLP's hidden layers (``dim -> hidden... -> 1``).
        interior_points: ``N_interior`` per step.
        boundary_points: ``N_boundary`` per step (boundary and initial points together).
        evaluation_points: size of the fixed evaluation set.
        resample: whether the papers draw new training points every step (else one fixed set).
        laplacian_dims: the coordinates the PDE's Laplacian sums over.
        gradient_dims: the first derivatives the PDE needs besides (``()``: none).
        solution: ``u*(x)``, ``[N, d] -> [N, 1]``.
        pde_residual: ``(u, x) -> L u(x) - f(x)`` ``[N, 1]`` from the model's derivatives.
        boundary_data: ``g(x)`` ``[N, 1]`` at boundary (and initial) points.
        sample_interior: ``(n, generator, dtype) -> [n, d]``.
        sample_boundary: ``(n, generator, dtype) -> [n, d]``.
    """

    name: str
    dim: int
    hidden: tuple[int, ...]
    interior_points: int
    boundary_points: int
    evaluation_points: int
    resample: bool
    laplacian_dims: tuple[int, ...]
    gradient_dims: tuple[int, ...]
    solution: Callable[[Tensor], Tensor]
    pde_residual: Callable[[Derivatives, Tensor], Tensor]
    boundary_data: Callable[[Tensor], Tensor]
    sample_interior: Callable[[int, torch.Generator, torch.dtype], Tensor]
    sample_boundary: Callable[[int, torch.Generator, torch.dtype], Tensor]

    def build_model(
        self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
    ) -> nn.Sequential:
        """The papers' MLP ``dim -> hidden... -> 1``, tanh after every Linear layer but the last.

        Initialization: PyTorch's default for ``nn.Linear`` (weight and bias uniform in
        ``+-1/sqrt(fan_in)``), drawn from ``generator`` when one is given.
        """
        widths = (self.dim, *self.hidden, 1)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out, dtype=dtype))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        model = nn.Sequential(*layers)
        if generator is not None:
            with torch.no_grad():
                for p_layer in model:
                    if isinstance(p_layer, nn.Linear):
                        bound = 1 / math.sqrt(p_layer.in_features)
                        p_layer.weight.uniform_(-bound, bound, generator=generator)
                        p_layer.bias.uniform_(-bound, bound, generator=generator)
        return model

    def sample_points(self, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Points:
        """``interior_points`` interior and ``boundary_points`` boundary points."""
        return Points(
            self.sample_interior(self.interior_points, generator, dtype),
            self.sample_boundary(self.boundary_points, generator, dtype),
        )

    def evaluation_set(self, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
        """``evaluation_points`` points uniform in the domain, ``[N_eval, dim]``."""
        return self.sample_interior(self.evaluation_points, generator, dtype)

    def derivatives(self, model: nn.Module, x: Tensor) -> Derivatives:
        """The model's value and the derivatives the PDE needs, by :func:`forward_laplacian`."""
        return forward_laplacian(model, x, self.laplacian_dims, gradient_dims=self.gradient_dims or None)

    def residuals(self, model: nn.Module, points: Points) -> list[Tensor]:
        """``[r_interior [N_interior, 1], r_boundary [N_boundary, 1]]``, scaled so that
        ``1/2 sum ||r||^2`` is the mean-square loss (module doc)."""
        x, xb = points.interior, points.boundary
        interior = self.pde_residual(self.derivatives(model, x), x) / math.sqrt(x.shape[0])
        boundary = (model(xb) - self.boundary_data(xb)) / math.sqrt(xb.shape[0])
        return [interior, boundary]

    def loss(self, model: nn.Module, points: Points) -> Tensor:
        """``L = 1/2 sum_g ||r_g||^2`` (a scalar tensor)."""
        return 0.5 * sum(r.pow(2).sum() for r in self.residuals(model, points))

    def relative_l2_error(self, model: nn.Module, x: Tensor) -> float:
        """``||u_theta - u*||_2 / ||u*||_2`` over the points ``x`` (the evaluation set)."""
        with torch.no_grad():
            exact = self.solution(x)
            return float((model(x) - exact).norm() / exact.norm())

    @property
    def num_params(self) -> int:
        """Parameters of :meth:`build_model`'s network."""
        widths = (self.dim, *self.hidden, 1)
        return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))


# -- samplers -----------------------------------------------------------------------------------
def unit_cube(d: int) -> Callable[[int, torch.Generator, torch.dtype], Tensor]:
    """Uniform points in ``[0, 1]^d``."""

    def sample(n: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        return torch.rand(n, d, generator=generator, dtype=dtype, device=generator.device)

    return sample


def cube_boundary(d: int) -> Callable[[int, torch.Generator, torch.dtype], Tensor]:
    """Uniform points on the boundary of ``[0, 1]^d``: a uniform point of the cube with one
    coordinate, drawn uniformly, set to 0 or 1 (drawn uniformly)."""

    def sample(n: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        x = torch.rand(n, d, generator=generator, dtype=dtype, device=generator.device)
        face = torch.randint(0, d, (n, 1), generator=generator, device=generator.device)
        side = torch.randint(0, 2, (n, 1), generator=generator, device=generator.device).to(dtype)
        return x.scatter(1, face, side)

    return sample


def time_and_cube_conditions(d: int) -> Callable[[int, torch.Generator, torch.dtype], Tensor]:
    """Points ``(t, x)`` for a heat equation's boundary and initial conditions: the first
    ``n // 2`` on the spatial boundary at uniform times, the rest at ``t = 0`` uniform in the cube."""
    boundary, cube = cube_boundary(d), unit_cube(d)

    def sample(n: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        m = n // 2
        t = torch.rand(m, 1, generator=generator, dtype=dtype, device=generator.device)
        on_boundary = torch.cat([t, boundary(m, generator, dtype)], dim=1)
        t0 = torch.zeros(n - m, 1, dtype=dtype, device=generator.device)
        at_start = torch.cat([t0, cube(n - m, generator, dtype)], dim=1)
        return torch.cat([on_boundary, at_start], dim=0)

    return sample


# -- the problems ---------------------------------------------------------------------------------
def _poisson_residual(f: Callable[[Tensor], Tensor]) -> Callable[[Derivatives, Tensor], Tensor]:
    """``-Lap u - f``."""
    return lambda u, x: -u.laplacian - f(x)


def _sin_product(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x).prod(dim=1, keepdim=True)


POISSON_2D = PINNProblem(
    name="poisson2d",
    dim=2,
    hidden=(64, 64, 48, 48),
    interior_points=900,
    boundary_points=120,
    evaluation_points=9000,
    resample=False,
    laplacian_dims=(0, 1),
    gradient_dims=(),
    solution=_sin_product,
    pde_residual=_poisson_residual(lambda x: 2 * math.pi**2 * _sin_product(x)),
    boundary_data=lambda x: x.new_zeros(x.shape[0], 1),
    sample_interior=unit_cube(2),
    sample_boundary=cube_boundary(2),
)
"""2-D Poisson: ``-Lap u = 2 pi^2 sin(pi x) sin(pi y)`` on ``[0, 1]^2``, ``u = 0`` on the boundary,
``u* = sin(pi x) sin(pi y)``.

Dangel et al. 2024 (module doc), Eq. 16 and Appendix "2d Poisson Equation", after Müller &
Zeinhofer, "Achieving High Accuracy with PINNs via Energy Natural Gradient Descent",
ICML 2023, arXiv:2302.13163: one fixed set of 900 interior and 120 boundary points, 9,000
evaluation points, the "deep-wide" tanh MLP 2-64-64-48-48-1 (9,873 parameters).
"""

POISSON_5D = PINNProblem(
    name="poisson5d",
    dim=5,
    hidden=(64, 64, 48, 48),
    interior_points=3000,
    boundary_points=500,
    evaluation_points=30000,
    resample=True,
    laplacian_dims=(0, 1, 2, 3, 4),
    gradient_dims=(),
    solution=lambda x: torch.cos(math.pi * x).sum(dim=1, keepdim=True),
    pde_residual=_poisson_residual(lambda x: math.pi**2 * torch.cos(math.pi * x).sum(dim=1, keepdim=True)),
    boundary_data=lambda x: torch.cos(math.pi * x).sum(dim=1, keepdim=True),
    sample_interior=unit_cube(5),
    sample_boundary=cube_boundary(5),
)
"""5-D Poisson: ``-Lap u = pi^2 sum_i cos(pi x_i)`` on ``[0, 1]^5``, ``u = u*`` on the boundary,
``u* = sum_i cos(pi x_i)``.

Dangel et al. 2024, Eq. 18 (first line) and Appendix "5d Poisson Equation": 3,000 interior
and 500 boundary points drawn anew every step, 30,000 evaluation points, the tanh MLP
5-64-64-48-48-1 (10,065 parameters). Guzmán-Cordero, Dangel, Goldshlager, Zeinhofer,
"Improving Energy Natural Gradient Descent through Woodbury, Momentum, and Randomization",
NeurIPS 2025, arXiv:2505.12149, report their 5-D Poisson results with this network and these
point counts (their text itself was not available to us).
"""

_KAPPA = 0.25


def _heat_solution(x: Tensor) -> Tensor:
    t, space = x[:, :1], x[:, 1:]
    return torch.exp(-t) * torch.sin(2 * space).sum(dim=1, keepdim=True)


HEAT = PINNProblem(
    name="heat",
    dim=5,
    hidden=(64, 64, 48, 48),
    interior_points=3000,
    boundary_points=500,
    evaluation_points=30000,
    resample=True,
    laplacian_dims=(1, 2, 3, 4),
    gradient_dims=(0, 1, 2, 3, 4),
    solution=_heat_solution,
    pde_residual=lambda u, x: u.gradient[:, :, 0] - _KAPPA * u.laplacian,
    boundary_data=_heat_solution,
    sample_interior=unit_cube(5),
    sample_boundary=time_and_cube_conditions(4),
)
"""(4+1)-D heat equation: ``d_t u - 1/4 Lap_x u = 0`` for ``(t, x)`` in ``[0, 1] x [0, 1]^4``,
``u(0, x) = sum_i sin(2 x_i)``, ``u(t, x) = exp(-t) sum_i sin(2 x_i)`` on the spatial
boundary; ``u* = exp(-t) sum_i sin(2 x_i)``. Points are ``(t, x)``, time first.

Dangel et al. 2024, Eq. 17 (kappa = 1/4) and Appendix "4+1d Heat Equation": 3,000 interior
and 500 condition points (250 on the spatial boundary at uniform times, 250 at t = 0; one
residual group, as in their appendix on the heat equation's loss), drawn anew every step,
30,000 evaluation points. Of their three networks we take the tanh MLP 5-64-64-48-48-1
(10,065 parameters), the one ENGD still fits.
"""

HEAT_1D = PINNProblem(
    name="heat1d",
    dim=2,
    hidden=(64, 64, 48, 48),
    interior_points=900,
    boundary_points=120,
    evaluation_points=9000,
    resample=False,
    laplacian_dims=(1,),
    gradient_dims=(0, 1),
    solution=lambda x: torch.exp(-(math.pi**2) * x[:, :1] / 4) * torch.sin(math.pi * x[:, 1:]),
    pde_residual=lambda u, x: u.gradient[:, :, 0] - _KAPPA * u.laplacian,
    boundary_data=lambda x: torch.exp(-(math.pi**2) * x[:, :1] / 4) * torch.sin(math.pi * x[:, 1:]),
    sample_interior=unit_cube(2),
    sample_boundary=time_and_cube_conditions(1),
)
"""(1+1)-D heat equation: ``d_t u - 1/4 d_xx u = 0`` on ``[0, 1]^2``, ``u(0, x) = sin(pi x)``,
``u = 0`` at ``x`` in {0, 1}; ``u* = exp(-pi^2 t / 4) sin(pi x)``.

Dangel et al. 2024, Appendix "1+1d Heat Equation": one fixed set of 900 interior and 120
condition points (60 boundary, 60 initial), 9,000 evaluation points, the tanh MLP
2-64-64-48-48-1 (9,873 parameters).
"""

#: The problems by name.
PROBLEMS: dict[str, PINNProblem] = {p.name: p for p in (POISSON_2D, POISSON_5D, HEAT, HEAT_1D)}
