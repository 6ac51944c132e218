"""A physics-informed neural network (PINN) for the 2-D Poisson equation, trained with
gramopt.GaussNewton.

The problem (Müller & Zeinhofer, "Achieving High Accuracy with PINNs via Energy Natural
Gradient Descent", ICML 2023, arXiv:2302.13163; Dangel, Müller, Zeinhofer, "Kronecker-Factored
Approximate Curvature for Physics-Informed Neural Networks", NeurIPS 2024, arXiv:2405.15603):

    -Lap u = 2 pi^2 sin(pi x) sin(pi y)  on (0, 1)^2,   u = 0 on the boundary,

whose solution is u* = sin(pi x) sin(pi y). The network is a plain float64 tanh MLP; the loss
is the mean-square PINN loss over fixed collocation points,

    L = 1/(2 N_in) sum_n (-Lap u(x_n) - f(x_n))^2 + 1/(2 N_bd) sum_n u(x^b_n)^2
      = 1/2 (||r_in||^2 + ||r_bd||^2),  r_in = (-Lap u - f) / sqrt(N_in),  r_bd = u / sqrt(N_bd),

and Gauss-Newton needs the residual rows r, not L: ``opt.step(residuals)`` takes a closure that
returns them. Two ways to compute the Laplacian:

- ``gramopt.pde.forward_laplacian`` (the default here): value, gradient and Laplacian in one
  forward pass through the model's own modules, so gramopt's hooks give the Jacobian rows
  (``jacobian="hooks"``, the fast path);
- ``--autograd``: the textbook way, nested ``torch.autograd.grad(..., create_graph=True)``.
  Hooks cannot see through such derivatives; ``jacobian="functional"`` computes the rows by
  batched vector-Jacobian products instead (slower: use it for residuals forward_laplacian
  does not cover). With ``jacobian="auto"`` (the default) the optimizer finds this out
  itself on the first step and switches, with one warning.

    python examples/pinn_poisson.py                          # the papers' sizes: about a minute on one core
    python examples/pinn_poisson.py --steps 100 --hidden 32 32 32 --interior 400 --boundary 80
    python examples/pinn_poisson.py --autograd --hidden 32 32 --interior 200 --boundary 40

The defaults are the papers' network (2-64-64-48-48-1, 9,873 parameters) and points (900
interior, 120 boundary).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor, nn

import gramopt
from gramopt.pde import forward_laplacian


def source(x: Tensor) -> Tensor:
    """f(x, y) = 2 pi^2 sin(pi x) sin(pi y), ``[N, 2] -> [N, 1]``."""
    return 2 * math.pi**2 * exact_solution(x)


def exact_solution(x: Tensor) -> Tensor:
    """u*(x, y) = sin(pi x) sin(pi y), ``[N, 2] -> [N, 1]``."""
    return torch.sin(math.pi * x).prod(dim=1, keepdim=True)


def boundary_points(n: int, generator: torch.Generator) -> Tensor:
    """``n`` points uniform on the boundary of the unit square: a uniform point with one
    coordinate (drawn uniformly) set to 0 or 1."""
    x = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    side = torch.randint(0, 2, (n,), generator=generator).to(torch.float64)
    coordinate = torch.randint(0, 2, (n,), generator=generator)
    x[torch.arange(n), coordinate] = side
    return x


def mlp(hidden: list[int]) -> nn.Sequential:
    """The tanh MLP ``2 -> hidden... -> 1`` in float64."""
    widths = [2, *hidden, 1]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out, dtype=torch.float64), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def laplacian_by_autograd(model: nn.Module, x: Tensor) -> Tensor:
    """``Lap u(x)`` ``[N, 1]`` by nested ``torch.autograd.grad`` (each point's output depends
    on that point only, so the gradient of the sum is every point's gradient)."""
    return _laplacian(model, x.detach().requires_grad_(True))


def _laplacian(model: nn.Module, x: Tensor) -> Tensor:
    (gradient,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    second = [torch.autograd.grad(gradient[:, j].sum(), x, create_graph=True)[0][:, j] for j in range(x.shape[1])]
    return torch.stack(second, dim=1).sum(dim=1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="Gauss-Newton steps")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 48, 48], help="hidden widths")
    parser.add_argument("--interior", type=int, default=900, help="interior collocation points")
    parser.add_argument("--boundary", type=int, default=120, help="boundary points")
    parser.add_argument("--autograd", action="store_true", help="Laplacian by torch.autograd.grad")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    generator = torch.Generator().manual_seed(args.seed)
    x_in = torch.rand(args.interior, 2, generator=generator, dtype=torch.float64)
    x_bd = boundary_points(args.boundary, generator)
    x_eval = torch.rand(10 * args.interior, 2, generator=generator, dtype=torch.float64)
    f_in = source(x_in)
    model = mlp(args.hidden)

    def residuals() -> list[Tensor]:
        if args.autograd:
            laplacian = laplacian_by_autograd(model, x_in)
        else:
            laplacian = forward_laplacian(model, x_in).laplacian  # [N, 1]
        interior = (-laplacian - f_in) / math.sqrt(len(x_in))
        boundary = model(x_bd) / math.sqrt(len(x_bd))  # g = 0 on the boundary
        return [interior, boundary]

    def relative_l2_error() -> float:
        with torch.no_grad():
            exact = exact_solution(x_eval)
            return float((model(x_eval) - exact).norm() / exact.norm())

    jacobian = "functional" if args.autograd else "hooks"
    opt = gramopt.GaussNewton(model, jacobian=jacobian)  # lr 1, damping 1e-10, grid line search
    params = sum(p.numel() for p in model.parameters())
    print(f"{params} parameters, {args.interior} + {args.boundary} points, jacobian={jacobian!r}")
    elapsed = 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = opt.step(residuals)  # L before the step
        elapsed += time.perf_counter() - start
        info = opt.last_info
        print(
            f"step {step:4d}  loss {float(loss):.3e}  relative L2 error {relative_l2_error():.3e}"
            f"  lr taken {info.lr_taken:.3g}  {info.space} space  {elapsed:6.1f} s"
        )


if __name__ == "__main__":
    main()
