"""A PINA problem trained with gramopt.GaussNewton.

    pip install pina-mathlab        # not a gramopt dependency

The problem is PINA's own ``Poisson2DSquareProblem`` (``pina.problem.zoo``): Lap u = 2 pi^2
sin(pi x) sin(pi y) on the unit square, u = 0 on the boundary, u* = -sin(pi x) sin(pi y).

Why an adapter. PINA trains through PyTorch Lightning: the solver builds its optimizer from a
``TorchOptimizer(optimizer_class, **kwargs)`` as ``optimizer_class(model.parameters(), ...)``
(pina/_src/optim/torch_optimizer.py), and Lightning's automatic optimization calls
``optimizer.step(closure)`` with a closure that returns the scalar loss of ``training_step``, each
condition's residual already reduced in ``BaseSolver._compute_condition_loss``. Gauss-Newton
needs the rows. They are what each condition's ``evaluate(batch, solver)`` returns (the
per-point residual of its equation), so this example samples the problem's domains, builds a
``PINN`` solver around a plain ``nn.Sequential``, and drives ``GaussNewton`` with a closure over
the conditions' ``evaluate``, outside Lightning's loop.

Two ways to the Jacobian (``--jacobian``):

- ``functional``: PINA's equations as written (their derivatives go through
  ``torch.autograd.grad``); J's rows by per-point copies of the ``Linear`` layers' parameters
  where each row depends on its own point, else by vector-Jacobian products, one per row.
- ``hooks`` (the default): the same points and network with the interior residual written on
  :func:`gramopt.pde.forward_laplacian` (``Lap u - f``, PINA's sign), the boundary residual the
  plain forward; one backward pass per residual group.

    python examples/pina_poisson.py                      # 100 steps, seconds
    python examples/pina_poisson.py --jacobian functional --steps 20
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from pina import LabelTensor
from pina.problem.zoo import Poisson2DSquareProblem
from pina.solver import PINN
from torch import nn

import gramopt
from gramopt.pde import forward_laplacian


def conditions_closure(problem, solver):
    """``() -> [one residual [n_c, 1] per condition]`` from PINA's own ``condition.evaluate``,
    each divided by the square root of its size (``1/2 sum ||r||^2``: half of PINA's default
    loss, the sum over conditions of the mean squares)."""

    def residuals() -> list[torch.Tensor]:
        rows = []
        for condition in problem.conditions.values():
            r = condition.evaluate({"input": condition.input.clone()}, solver).as_subclass(torch.Tensor)
            rows.append(r / math.sqrt(r.shape[0]))
        return rows

    return residuals


def forward_laplacian_closure(problem, model: nn.Sequential):
    """The same residuals with the interior's Laplacian by :func:`forward_laplacian`."""
    interior = problem.conditions["D"].input.as_subclass(torch.Tensor).detach()
    boundary = problem.conditions["boundary"].input.as_subclass(torch.Tensor).detach()
    f = 2 * math.pi**2 * torch.sin(math.pi * interior).prod(dim=1, keepdim=True)

    def residuals() -> list[torch.Tensor]:
        rows = [model(boundary), forward_laplacian(model, interior).laplacian - f]  # PINA's order
        return [r / math.sqrt(r.shape[0]) for r in rows]

    return residuals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--interior", type=int, default=400)
    parser.add_argument("--boundary", type=int, default=80)
    parser.add_argument("--hidden", type=int, nargs="+", default=[20, 20, 20])
    parser.add_argument("--jacobian", choices=["hooks", "functional"], default="hooks", help="module doc")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # PINA samples its domains in the default dtype
    torch.manual_seed(args.seed)

    problem = Poisson2DSquareProblem()
    problem.discretise_domain(args.interior, "random", domains=["D"])
    problem.discretise_domain(args.boundary, "random", domains=["boundary"])
    problem.move_discretisation_into_conditions()
    widths = [2, *args.hidden, 1]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out, dtype=torch.float64), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    solver = PINN(problem=problem, model=model)
    if args.jacobian == "hooks":
        residuals = forward_laplacian_closure(problem, model)
    else:
        residuals = conditions_closure(problem, solver)
    opt = gramopt.GaussNewton(model, jacobian=args.jacobian)

    points = LabelTensor(torch.rand(5000, 2, dtype=torch.float64), ["x", "y"])

    def relative_l2_error() -> float:
        with torch.no_grad():
            u = solver.forward(points).as_subclass(torch.Tensor)
            exact = problem.solution(points).as_subclass(torch.Tensor)
            return float((u - exact).norm() / exact.norm())

    elapsed = 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = opt.step(residuals)
        elapsed += time.perf_counter() - start
        print(f"step {step:4d}  loss {float(loss):.3e}  relative L2 error {relative_l2_error():.3e}  {elapsed:6.1f} s")


if __name__ == "__main__":
    main()
