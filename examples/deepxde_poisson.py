"""A DeepXDE problem trained with gramopt.GaussNewton, against DeepXDE's own Adam and L-BFGS.

    pip install deepxde        # not a gramopt dependency; this example sets DDE_BACKEND=pytorch

The problem, written the DeepXDE way (geometry, PDE function with ``dde.grad.hessian``,
Dirichlet condition, ``dde.data.PDE``, ``dde.nn.FNN``, ``dde.Model``):

    -Lap u = 2 pi^2 sin(pi x) sin(pi y)  on (0, 1)^2,   u = 0 on the boundary,   u* = sin(pi x) sin(pi y).

Why an adapter. ``Model.compile`` accepts any ``torch.optim.Optimizer`` instance, but its
PyTorch training step (``Model._compile_pytorch``'s ``train_step`` in deepxde/model.py) calls
``opt.step(closure)`` with a closure that returns one scalar: the sum of the per-term losses,
each already reduced by the loss function in ``PDE.losses`` (deepxde/data/pde.py). Gauss-Newton
needs the residual rows before that reduction. They are one call earlier, and this example takes
them from DeepXDE's own objects: ``data.pde(x, u)`` (the PDE residual at every training point)
and ``bc.error(...)`` (each boundary condition's residual). :func:`residual_closure` builds
``opt.step``'s closure from them, scaled so that ``1/2 sum ||r||^2`` is half DeepXDE's MSE
loss, and :func:`use_gauss_newton` puts a Gauss-Newton step in place of the model's
``train_step`` (an attribute ``compile`` sets; not a public DeepXDE API, checked against
DeepXDE 1.15), so ``model.train`` runs it with DeepXDE's display, callbacks and loss history.

Two ways to the Jacobian (``--jacobian``):

- ``functional``: DeepXDE's PDE function as written, with ``dde.grad.hessian``
  (``torch.autograd.grad`` with ``create_graph``), which gramopt's hooks cannot see through; J's
  rows come without hooks: by per-point copies of the ``Linear`` layers' parameters where each
  row depends on its own point (a few backward passes a step), else by vector-Jacobian products
  through the closure's graph, one per residual row (``opt.last_info.jacobian_route`` says which).
- ``hooks`` (the default): the same points, boundary condition and network, with the PDE's
  Laplacian taken by :func:`gramopt.pde.forward_laplacian` on an ``nn.Sequential`` view of
  DeepXDE's ``FNN`` (its own ``Linear`` modules, so the same parameters): gramopt's hooks give J
  from one backward pass per residual group. This needs the PDE written once more in terms of
  value, gradient and Laplacian (:func:`forward_laplacian_closure`).

    python examples/deepxde_poisson.py                          # each optimizer 30 s, one thread
    python examples/deepxde_poisson.py --seconds 120 --jacobian functional --json results.json

Measured (benchmarks/results/probes/deepxde_poisson*.json; one thread, a shared 2-core machine):
see the PINN guide (docs/guides/pinns.md). ``examples/pina_poisson.py`` does the same for PINA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("DDE_BACKEND", "pytorch")

import deepxde as dde  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import gramopt  # noqa: E402
from gramopt.pde import forward_laplacian  # noqa: E402


def source(x: torch.Tensor) -> torch.Tensor:
    """f(x, y) = 2 pi^2 sin(pi x) sin(pi y), ``[N, 2] -> [N, 1]``."""
    return 2 * math.pi**2 * torch.sin(math.pi * x[:, 0:1]) * torch.sin(math.pi * x[:, 1:2])


def build_model(num_domain: int, num_boundary: int, hidden: list[int], seed: int) -> dde.Model:
    """The Poisson problem as a DeepXDE model (float64, tanh FNN, Glorot-normal weights)."""
    dde.config.set_default_float("float64")
    dde.config.set_random_seed(seed)

    def pde(x, u):
        return -dde.grad.hessian(u, x, i=0, j=0) - dde.grad.hessian(u, x, i=1, j=1) - source(x)

    geometry = dde.geometry.Rectangle([0, 0], [1, 1])
    boundary = dde.icbc.DirichletBC(geometry, lambda x: 0, lambda x, on_boundary: on_boundary)
    data = dde.data.PDE(geometry, pde, boundary, num_domain=num_domain, num_boundary=num_boundary)
    net = dde.nn.FNN([2, *hidden, 1], "tanh", "Glorot normal")
    return dde.Model(data, net)


def residual_closure(model: dde.Model):
    """``() -> [r_pde [n, 1], r_bc1 [n_1, 1], ...]`` at the model's training points, from
    DeepXDE's ``data.pde`` and ``bc.error``, each group divided by the square root of its size:
    ``1/2 sum ||r||^2`` is half of DeepXDE's loss (the sum of the groups' mean squares)."""
    data = model.data

    def residuals() -> list[torch.Tensor]:
        x = torch.as_tensor(data.train_x).requires_grad_()
        u = model.net(x)
        pde = data.pde(x, u)
        pde = pde if isinstance(pde, (list, tuple)) else [pde]
        starts = np.cumsum([0, *data.num_bcs]).tolist()
        rows = [r[starts[-1] :] for r in pde]  # the PDE at the collocation points (after the BC points)
        rows += [bc.error(data.train_x, x, u, starts[i], starts[i + 1]) for i, bc in enumerate(data.bcs)]
        dde.grad.clear()  # DeepXDE caches derivatives per input tensor
        return [r / math.sqrt(r.shape[0]) for r in rows]

    return residuals


def sequential_view(net: dde.nn.FNN) -> nn.Sequential:
    """DeepXDE's tanh ``FNN`` as an ``nn.Sequential`` of its own ``Linear`` modules (shared
    parameters), the form :func:`gramopt.pde.forward_laplacian` pushes derivatives through."""
    if net.activation is not dde.backend.tanh or net._input_transform or net._output_transform:
        raise ValueError("sequential_view covers a tanh FNN without input or output transforms")
    layers: list[nn.Module] = []
    for linear in net.linears[:-1]:
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers, net.linears[-1])


def forward_laplacian_closure(model: dde.Model, view: nn.Sequential):
    """:func:`residual_closure`'s rows with the PDE written on :func:`forward_laplacian`
    (``-Lap u - f``) and the boundary condition DeepXDE's own ``bc.error``."""
    data = model.data
    x = torch.as_tensor(data.train_x)
    starts = np.cumsum([0, *data.num_bcs]).tolist()
    f = source(x[starts[-1] :])

    def residuals() -> list[torch.Tensor]:
        # one forward call per group (the hooks' rows are per point of a call): the collocation
        # points through forward_laplacian, the boundary-condition points (train_x's first rows) plainly
        rows = [-forward_laplacian(view, x[starts[-1] :]).laplacian - f]
        u_bc = view(x[: starts[-1]])
        rows += [bc.error(data.train_x, x, u_bc, starts[i], starts[i + 1]) for i, bc in enumerate(data.bcs)]
        return [r / math.sqrt(r.shape[0]) for r in rows]

    return residuals


def use_gauss_newton(model: dde.Model, jacobian: str = "hooks", **options) -> gramopt.GaussNewton:
    """Compile ``model`` with a GaussNewton optimizer and make ``model.train`` take its steps
    (``jacobian``: module doc)."""
    if jacobian == "hooks":
        view = sequential_view(model.net)
        opt = gramopt.GaussNewton(view, jacobian="hooks", **options)
        residuals = forward_laplacian_closure(model, view)
    else:
        opt = gramopt.GaussNewton(model.net, jacobian="functional", **options)
        residuals = residual_closure(model)
    model.compile(opt)

    def train_step(inputs, targets, auxiliary_vars):
        return opt.step(residuals)

    model.train_step = train_step
    return opt


class StopAfter(dde.callbacks.Callback):
    """Stops ``model.train`` once ``seconds`` of training have passed (checked after each
    DeepXDE step: an L-BFGS step is ``iter_per_step`` iterations)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self) -> None:
        self.start = time.perf_counter()

    def on_batch_end(self) -> None:
        if time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = True


def relative_l2_error(model: dde.Model, points: np.ndarray) -> float:
    exact = np.sin(np.pi * points[:, 0:1]) * np.sin(np.pi * points[:, 1:2])
    return float(np.linalg.norm(model.predict(points) - exact) / np.linalg.norm(exact))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="training time per optimizer")
    parser.add_argument("--hidden", type=int, nargs="+", default=[20, 20, 20])
    parser.add_argument("--num-domain", type=int, default=400)
    parser.add_argument("--num-boundary", type=int, default=80)
    parser.add_argument("--optimizers", nargs="+", default=["gauss-newton", "adam", "lbfgs"],
                        choices=["gauss-newton", "adam", "lbfgs"])
    parser.add_argument("--jacobian", choices=["hooks", "functional"], default="hooks", help="module doc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    points = np.random.default_rng(1).random((10_000, 2))
    shape = (args.num_domain, args.num_boundary, args.hidden, args.seed)

    results = {}
    for name in args.optimizers:
        model = build_model(*shape)  # the same points and initial weights for every optimizer
        if name == "gauss-newton":
            use_gauss_newton(model, args.jacobian)
            iterations, display = 100_000, 10
        elif name == "adam":
            model.compile("adam", lr=1e-3)
            iterations, display = 1_000_000, 1000
        else:
            dde.optimizers.set_LBFGS_options(maxiter=1_000_000)
            dde.optimizers.config.LBFGS_options["iter_per_step"] = 50  # so that StopAfter is checked often
            model.compile("L-BFGS")
            iterations, display = None, 1
        start = time.perf_counter()
        model.train(iterations=iterations, display_every=display, callbacks=[StopAfter(args.seconds)], verbose=0)
        seconds = time.perf_counter() - start
        error = relative_l2_error(model, points)
        results[name] = {"relative_l2_error": error, "seconds": seconds, "steps": model.train_state.step}
        print(f"{name:13s} relative L2 error {error:.3e} after {seconds:.1f} s ({model.train_state.step} steps)")
    if args.json:
        record = {"settings": vars(args), "deepxde": dde.__version__, "torch": torch.__version__,
                  "load_average": os.getloadavg(), "results": results}
        with open(args.json, "w") as file:
            json.dump(record, file, indent=1)


if __name__ == "__main__":
    main()
