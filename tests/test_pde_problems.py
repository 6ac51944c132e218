"""gramopt.pde.problems: the papers' PINN problems. The exact solutions solve the PDEs (through
forward_laplacian on networks that represent them exactly, and through torch.func), the
boundary data is the solution's, the networks have the papers' parameter counts, the loss is
the mean-square loss, and the samplers depend on their generator only."""

from __future__ import annotations

import math

import pytest
import torch
from tests.reference import input_derivatives
from torch import nn

from gramopt.pde import Derivatives, Sin
from gramopt.pde.problems import HEAT, HEAT_1D, POISSON_2D, POISSON_5D, PROBLEMS

DT = torch.float64
# torch.func.hessian (forward-mode inside) loads a TorchScript decomposition that warns about torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sine_network(weight: list[list[float]], bias: list[float], out: list[float]) -> nn.Sequential:
    """``x -> out . sin(W x + b)``: the exact solutions below as networks."""
    first = nn.Linear(len(weight[0]), len(weight), dtype=DT)
    last = nn.Linear(len(weight), 1, dtype=DT)
    with torch.no_grad():
        first.weight.copy_(torch.tensor(weight, dtype=DT))
        first.bias.copy_(torch.tensor(bias, dtype=DT))
        last.weight.copy_(torch.tensor([out], dtype=DT))
        last.bias.zero_()
    return nn.Sequential(first, Sin(), last)


# sin(pi x) sin(pi y) = 1/2 cos(pi (x - y)) - 1/2 cos(pi (x + y)), cos(a) = sin(a + pi/2)
EXACT_POISSON_2D = sine_network([[math.pi, -math.pi], [math.pi, math.pi]], [math.pi / 2] * 2, [0.5, -0.5])
# sum_i cos(pi x_i)
EXACT_POISSON_5D = sine_network((math.pi * torch.eye(5, dtype=DT)).tolist(), [math.pi / 2] * 5, [1.0] * 5)


def test_papers_networks_and_point_counts():
    counts = {"poisson2d": 9873, "poisson5d": 10065, "heat": 10065, "heat1d": 9873}
    for name, problem in PROBLEMS.items():
        model = problem.build_model(generator())
        assert sum(p.numel() for p in model.parameters()) == counts[name] == problem.num_params
        assert all(p.dtype == DT for p in model.parameters())
        assert [type(m) for m in model] == [nn.Linear, nn.Tanh] * 4 + [nn.Linear]
        assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [64, 64, 48, 48, 1]
    assert (POISSON_2D.interior_points, POISSON_2D.boundary_points, POISSON_2D.resample) == (900, 120, False)
    assert (POISSON_5D.interior_points, POISSON_5D.boundary_points, POISSON_5D.resample) == (3000, 500, True)
    assert (HEAT.interior_points, HEAT.boundary_points, HEAT.resample) == (3000, 500, True)


def test_build_model_is_deterministic_given_a_generator():
    a, b = POISSON_2D.build_model(generator(3)), POISSON_2D.build_model(generator(3))
    c = POISSON_2D.build_model(generator(4))
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q) and not torch.equal(p, r)
        bound = 1 / math.sqrt(p.shape[-1] if p.dim() == 2 else 1)
        if p.dim() == 2:  # PyTorch's default range
            assert p.abs().max() <= bound


@pytest.mark.parametrize(
    "problem, exact", [(POISSON_2D, EXACT_POISSON_2D), (POISSON_5D, EXACT_POISSON_5D)], ids=["2d", "5d"]
)
def test_exact_poisson_solution_has_zero_residuals(problem, exact):
    gen = generator(1)
    x = problem.sample_interior(200, gen, DT)
    torch.testing.assert_close(exact(x), problem.solution(x), rtol=0, atol=1e-13)
    points = problem.sample_points(gen)
    interior, boundary = problem.residuals(exact, points)
    assert interior.shape == (problem.interior_points, 1) and boundary.shape == (problem.boundary_points, 1)
    assert interior.abs().max() < 1e-10 and boundary.abs().max() < 1e-12
    assert problem.loss(exact, points) < 1e-20
    assert problem.relative_l2_error(exact, problem.evaluation_set(gen)) < 1e-13


@pytest.mark.parametrize("problem", [HEAT, HEAT_1D], ids=lambda p: p.name)
def test_exact_heat_solution_has_zero_residuals(problem):
    gen = generator(2)
    x = problem.sample_interior(300, gen, DT)
    value, jac, hess = input_derivatives(problem.solution, x)
    space = list(problem.laplacian_dims)
    exact = Derivatives(value, jac, hess[:, :, space, space].sum(dim=2))
    assert problem.pde_residual(exact, x).abs().max() < 1e-10
    xb = problem.sample_boundary(problem.boundary_points, gen, DT)
    torch.testing.assert_close(problem.boundary_data(xb), problem.solution(xb), rtol=0, atol=0)


def test_boundary_data():
    gen = generator(5)
    xb = POISSON_2D.sample_boundary(120, gen, DT)
    assert torch.equal(POISSON_2D.boundary_data(xb), torch.zeros(120, 1, dtype=DT))
    assert POISSON_2D.solution(xb).abs().max() < 1e-15  # u* vanishes there
    # heat: u(0, x) = sum_i sin(2 x_i); u = exp(-t) sum_i sin(2 x_i) on the spatial boundary
    xc = HEAT.sample_boundary(500, gen, DT)
    initial, spatial = xc[250:], xc[:250]
    torch.testing.assert_close(HEAT.boundary_data(initial), torch.sin(2 * initial[:, 1:]).sum(1, keepdim=True))
    expected = torch.exp(-spatial[:, :1]) * torch.sin(2 * spatial[:, 1:]).sum(1, keepdim=True)
    torch.testing.assert_close(HEAT.boundary_data(spatial), expected)


@pytest.mark.parametrize("problem", list(PROBLEMS.values()), ids=list(PROBLEMS))
def test_samplers_are_deterministic_and_in_the_domain(problem):
    a, b = problem.sample_points(generator(7)), problem.sample_points(generator(7))
    c = problem.sample_points(generator(8))
    assert torch.equal(a.interior, b.interior) and torch.equal(a.boundary, b.boundary)
    assert not torch.equal(a.interior, c.interior) and not torch.equal(a.boundary, c.boundary)
    assert a.interior.shape == (problem.interior_points, problem.dim)
    assert a.boundary.shape == (problem.boundary_points, problem.dim)
    assert a.interior.dtype == DT and ((a.interior >= 0) & (a.interior <= 1)).all()
    assert ((a.boundary >= 0) & (a.boundary <= 1)).all()
    spatial = a.boundary if problem.gradient_dims == () else a.boundary[:, 1:]
    on_face = ((spatial == 0) | (spatial == 1)).any(dim=1)
    if problem.gradient_dims == ():
        assert on_face.all()
    else:  # heat: first half on the spatial boundary, second half at t = 0
        half = problem.boundary_points // 2
        assert on_face[:half].all() and (a.boundary[half:, 0] == 0).all()
    faces = (spatial == 0).sum(0) + (spatial == 1).sum(0)  # every face is used
    assert (faces > 0).all()
    assert problem.evaluation_set(generator(9)).shape == (problem.evaluation_points, problem.dim)


def test_loss_is_the_papers_mean_square_loss():
    gen = generator(11)
    model = HEAT.build_model(gen)
    points = HEAT.sample_points(gen)
    x, xb = points.interior, points.boundary
    value, jac, hess = input_derivatives(model, x)
    pde = jac[:, 0, 0] - 0.25 * hess[:, 0, 1:, 1:].diagonal(dim1=1, dim2=2).sum(dim=1)
    with torch.no_grad():
        boundary = model(xb)[:, 0] - HEAT.solution(xb)[:, 0]
    expected = 0.5 * pde.pow(2).mean() + 0.5 * boundary.pow(2).mean()
    torch.testing.assert_close(HEAT.loss(model, points).detach(), expected.detach(), rtol=1e-12, atol=0)


def test_relative_l2_error():
    gen = generator(12)
    x = POISSON_5D.evaluation_set(gen)
    zero = nn.Sequential(nn.Linear(5, 1)).to(DT)
    with torch.no_grad():
        zero[0].weight.zero_()
        zero[0].bias.zero_()
    assert POISSON_5D.relative_l2_error(zero, x) == pytest.approx(1.0)
    assert POISSON_5D.relative_l2_error(EXACT_POISSON_5D, x) < 1e-14
