"""A physics-informed inverse problem: identify an unknown PDE coefficient from noisy
observations, trained with gramopt.GaussNewton.

The setting is the "data-driven discovery" of Raissi, Perdikaris, Karniadakis
("Physics-informed neural networks: A deep learning framework for solving forward and inverse
problems involving nonlinear partial differential equations", J. Comput. Phys. 378, 686-707,
2019; arXiv:1711.10566): a network u and the unknown coefficients of the PDE are learned
together from scattered observations of the solution, the PDE acting on the network through
its derivatives. Here on the 2-D Poisson problem of examples/pinn_poisson.py with an unknown
diffusion coefficient kappa > 0:

    -kappa Lap u = f  on (0, 1)^2,   u = 0 on the boundary,   f = 2 pi^2 kappa* sin(pi x) sin(pi y),

with kappa* = 0.7, so that u* = sin(pi x) sin(pi y); f is known, kappa is not (it starts at
2.0). The observations are u_obs = u*(x_obs) + eps at N_obs random interior points, eps
Gaussian of standard deviation ``--noise``. The loss is the mean-square PINN loss of three
residual groups,

    L = 1/2 (||r_pde||^2 + ||r_bd||^2 + ||r_data||^2),
    r_pde  = (-kappa Lap u(x_n) - f(x_n)) / sqrt(N_in),
    r_bd   = u(x^b_n) / sqrt(N_bd),
    r_data = sqrt(w) (u(x^o_n) - u_obs_n) / sqrt(N_obs),

each group divided by the square root of its size (a group's weight does not change with its
number of points) and the data group weighted by w = ``--data-weight`` (1 by default: the
observations are as trusted as the equation).

The unknown is ``log_kappa``, an ``nn.Parameter`` registered on the same module as the network
(``GaussNewton`` takes the parameters of the model it is given), and kappa = exp(log_kappa):
kappa stays positive whatever step the optimizer takes, and a step changes kappa by a factor,
the natural scale of a coefficient that may be off by orders of magnitude.

What the optimizer does with log_kappa: it lies outside every ``nn.Linear`` layer, so the hooks
give the network's Jacobian columns and autograd gives log_kappa's (one column,
``d r / d log_kappa = -kappa Lap u / sqrt(N_in)`` on the PDE rows, zero elsewhere), exact;
``GaussNewton`` says so once, with a RuntimeWarning naming ``log_kappa``.

Damping: the default here is 1e-6, not GaussNewton's 1e-10. While kappa is wrong the groups
disagree (the equation with the wrong kappa and the data ask for different functions); with
fewer rows than parameters a nearly undamped step lets the network interpolate that
disagreement point by point instead of moving kappa, and the line search then finds only
tiny steps. A damping of 1e-6 (relative to Gram entries of order one) favours the few
directions that lower every group at once, kappa's among them.

- ``--autograd``: the Laplacian by nested ``torch.autograd.grad(..., create_graph=True)``, the
  textbook way; ``jacobian="functional"`` then takes the network's rows through per-point copies
  of the Linear layers' parameters (``last_info.jacobian_route == "per-point"``) and
  log_kappa's column through autograd.
- ``--optimizer adam`` / ``lbfgs``: ``torch.optim.Adam`` or ``torch.optim.LBFGS`` (strong Wolfe
  line search, ``max_iter`` iterations per step) on the same closure's L, for comparison.

    python examples/pinn_inverse.py                                  # a few seconds on one core
    python examples/pinn_inverse.py --noise 0 --steps 40
    python examples/pinn_inverse.py --optimizer adam --steps 100000 --seconds 30 --log-every 1000
    python examples/pinn_inverse.py --optimizer lbfgs --steps 1000 --seconds 30 --log-every 10
    python examples/pinn_inverse.py --autograd
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import gramopt
from gramopt.pde import forward_laplacian


def exact_solution(x: Tensor) -> Tensor:
    """u*(x, y) = sin(pi x) sin(pi y), ``[N, 2] -> [N, 1]``."""
    return torch.sin(math.pi * x).prod(dim=1, keepdim=True)


def source(x: Tensor, kappa: float) -> Tensor:
    """f = -kappa Lap u* = 2 pi^2 kappa sin(pi x) sin(pi y), ``[N, 2] -> [N, 1]``."""
    return 2 * math.pi**2 * kappa * exact_solution(x)


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


class InversePINN(nn.Module):
    """The unknowns: the network ``u`` and the coefficient kappa = exp(``log_kappa``)."""

    def __init__(self, hidden: list[int], kappa: float) -> None:
        super().__init__()
        self.u = mlp(hidden)
        self.log_kappa = nn.Parameter(torch.tensor(math.log(kappa), dtype=torch.float64))

    @property
    def kappa(self) -> Tensor:
        return self.log_kappa.exp()


def laplacian_by_autograd(model: nn.Module, x: Tensor) -> Tensor:
    """``Lap u(x)`` ``[N, 1]`` by nested ``torch.autograd.grad`` (each point's output depends
    on that point only, so the gradient of the sum is every point's gradient)."""
    x = x.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    second = [torch.autograd.grad(gradient[:, j].sum(), x, create_graph=True)[0][:, j] for j in range(x.shape[1])]
    return torch.stack(second, dim=1).sum(dim=1, keepdim=True)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=["gauss-newton", "adam", "lbfgs"], default="gauss-newton")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (at most)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this many seconds of steps")
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 32, 32], help="hidden widths")
    parser.add_argument("--interior", type=int, default=400, help="interior collocation points")
    parser.add_argument("--boundary", type=int, default=80, help="boundary points")
    parser.add_argument("--observations", type=int, default=200, help="observed interior points")
    parser.add_argument("--noise", type=float, default=1e-2, help="standard deviation of the observation noise")
    parser.add_argument("--kappa-true", type=float, default=0.7, help="kappa* (generates f and the data)")
    parser.add_argument("--kappa-init", type=float, default=2.0, help="kappa's starting value")
    parser.add_argument("--data-weight", type=float, default=1.0, help="w, the weight of the data group")
    parser.add_argument("--damping", type=float, default=1e-6, help="GaussNewton's damping")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (Adam 1e-3, L-BFGS 1, Gauss-Newton 1)")
    parser.add_argument("--max-iter", type=int, default=20, help="L-BFGS iterations per step")
    parser.add_argument("--autograd", action="store_true", help="Laplacian by torch.autograd.grad")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="report when |kappa/kappa* - 1| first <= this")
    parser.add_argument("--log-every", type=int, default=1, help="print every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="also write the settings and the printed steps to this JSON file")
    return parser.parse_args()


def optimizer_step(
    args: argparse.Namespace, model: InversePINN, residuals: Callable[[], list[Tensor]]
) -> tuple[Callable[[], float], torch.optim.Optimizer]:
    """``(a function that takes one step of args.optimizer and returns L before it, the optimizer)``:
    Adam and L-BFGS minimize the same ``L = 1/2 sum ||r||^2`` of the residual closure."""
    if args.optimizer == "gauss-newton":
        jacobian = "functional" if args.autograd else "hooks"
        opt = gramopt.GaussNewton(model, lr=args.lr or 1.0, damping=args.damping, jacobian=jacobian)
        return lambda: float(opt.step(residuals)), opt

    def loss() -> Tensor:
        return 0.5 * sum(r.pow(2).sum() for r in residuals())

    if args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=args.lr or 1e-3)

        def adam_step() -> float:
            opt.zero_grad()
            value = loss()
            value.backward()
            opt.step()
            return float(value.detach())

        return adam_step, opt
    opt = torch.optim.LBFGS(
        model.parameters(), lr=args.lr or 1.0, max_iter=args.max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    return lambda: float(opt.step(closure).detach()), opt


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    generator = torch.Generator().manual_seed(args.seed)
    x_in = torch.rand(args.interior, 2, generator=generator, dtype=torch.float64)
    x_bd = boundary_points(args.boundary, generator)
    x_obs = torch.rand(args.observations, 2, generator=generator, dtype=torch.float64)
    u_obs = exact_solution(x_obs) + args.noise * torch.randn(
        args.observations, 1, generator=generator, dtype=torch.float64
    )
    x_eval = torch.rand(10 * args.interior, 2, generator=generator, dtype=torch.float64)
    f_in = source(x_in, args.kappa_true)
    model = InversePINN(args.hidden, args.kappa_init)

    def residuals() -> list[Tensor]:
        if args.autograd:
            laplacian = laplacian_by_autograd(model.u, x_in)
        else:
            laplacian = forward_laplacian(model.u, x_in).laplacian  # [N_in, 1]
        pde = (-model.kappa * laplacian - f_in) / math.sqrt(len(x_in))
        boundary = model.u(x_bd) / math.sqrt(len(x_bd))  # u = 0 on the boundary
        data = math.sqrt(args.data_weight) * (model.u(x_obs) - u_obs) / math.sqrt(len(x_obs))
        return [pde, boundary, data]

    def relative_l2_error() -> float:
        with torch.no_grad():
            exact = exact_solution(x_eval)
            return float((model.u(x_eval) - exact).norm() / exact.norm())

    step, opt = optimizer_step(args, model, residuals)
    params = sum(p.numel() for p in model.parameters())
    points = f"{args.interior} + {args.boundary} + {args.observations}"
    print(f"{params} parameters (the network's and log_kappa), {points} points, noise {args.noise:g}, {args.optimizer}")
    records, reached, elapsed = [], None, 0.0
    for index in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = step()  # L before the step
        elapsed += time.perf_counter() - start
        kappa = model.kappa.item()
        kappa_error = abs(kappa / args.kappa_true - 1)
        if reached is None and kappa_error <= args.tolerance:
            reached = (index, elapsed)
        last = index == args.steps or (args.seconds is not None and elapsed >= args.seconds)
        if index % args.log_every == 0 or last:
            record = {"step": index, "seconds": elapsed, "loss": loss, "kappa": kappa, "error": relative_l2_error()}
            records.append(record)
            extra = ""
            if isinstance(opt, gramopt.GaussNewton):
                info = opt.last_info
                route = f" ({info.jacobian_route})" if info.jacobian_route else ""
                extra = f"  lr taken {info.lr_taken:.3g}  J by {info.jacobian}{route}"
            print(
                f"step {index:5d}  loss {loss:.3e}  kappa {kappa:.6f}  relative L2 error {record['error']:.3e}"
                f"{extra}  {elapsed:6.2f} s"
            )
        if last:
            break
    final = abs(model.kappa.item() / args.kappa_true - 1)
    print(f"at the end: kappa = {model.kappa.item():.6f}, truth {args.kappa_true:g}, relative error {final:.2e}")
    if reached is None:
        print(f"|kappa / kappa* - 1| <= {args.tolerance:g}: never")
    else:
        print(f"|kappa / kappa* - 1| <= {args.tolerance:g}: first at step {reached[0]}, {reached[1]:.2f} s")
    if args.json:
        record = {
            "settings": vars(args),
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "kappa_relative_error": final,
            "within_tolerance_at": None if reached is None else {"step": reached[0], "seconds": reached[1]},
            "steps": records,
        }
        with open(args.json, "w") as file:
            json.dump(record, file, indent=1)


if __name__ == "__main__":
    main()
