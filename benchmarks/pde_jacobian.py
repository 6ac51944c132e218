"""The Jacobian of a PINN residual by hooks (forward_laplacian + one backward pass per residual
group + the capture engine's per-layer rows) against ``torch.func``.

Problem: ``poisson2d`` of :mod:`gramopt.pde.problems` (the deep-wide tanh MLP 2-64-64-48-48-1,
9,873 parameters, float64), interior residual ``(-Lap u - f) / sqrt(N_in)`` and boundary residual
``(u - g) / sqrt(N_bd)``; J is ``[N_in + N_bd, 9873]``. Timed, in interleaved rounds
(:func:`gramopt.compare.timing.interleaved_times`):

- ``gradient``: forward_laplacian + backward of ``L = 1/2 ||r||^2`` (one SGD step's work; the baseline);
- ``hooks_rows``: J by hooks (two captures: the interior group, then the boundary group; each
  layer's rows written into J's columns);
- ``hooks_gram``: the sample-space Gram ``J J^T`` by hooks from ONE capture (the boundary points
  pushed through forward_laplacian too, their residual read off the value channel), as the
  per-layer sum of the factors' Grams (each layer's own choice between position pairs and explicit
  rows), without forming J;
- ``hooks_rows_gram``: the same capture, J written from the layers' rows, then one ``J J^T``;
- ``vmap_jacrev_forward_laplacian``: ``vmap`` over the points of ``torch.func.jacrev`` over the
  parameters of one point's residual, built with forward_laplacian;
- ``vmap_jacrev_hessian``: the usual torch.func PINN Jacobian, the same with the point's Laplacian
  the trace of ``torch.func.hessian``.

The torch.func variants run on a deep copy of the model (the hooks of the capture engine would fire
inside the transforms). Every J is checked against ``vmap_jacrev_hessian`` (max abs difference in
the JSON), the Gram against ``J J^T`` (relative to its largest entry).

    python benchmarks/pde_jacobian.py --rounds 5  # about a minute on 2 cores
    python benchmarks/pde_jacobian.py             # 20 rounds

Both use the paper's points, N_in = 900 and N_bd = 120 (``--quick``: 30 and 8, one round).

Writes ``benchmarks/results/pde_jacobian.json``. Times on shared machines drift; the ratios to
``gradient`` in the same round are the figures to read.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
from pathlib import Path

import torch
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import arguments, environment, write_json  # noqa: E402
from gramopt.capture import CaptureEngine  # noqa: E402
from gramopt.capture.factors import symmetric_gram  # noqa: E402
from gramopt.compare.timing import interleaved_times, ratio_summary  # noqa: E402
from gramopt.pde import forward_laplacian  # noqa: E402
from gramopt.pde.problems import POISSON_2D  # noqa: E402


def setup(n_interior: int, n_boundary: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = POISSON_2D.build_model(gen).train()
    x = POISSON_2D.sample_interior(n_interior, gen, torch.float64)
    xb = POISSON_2D.sample_boundary(n_boundary, gen, torch.float64)
    return model, x, xb


def interior_residual(model, x):
    u = forward_laplacian(model, x)
    return POISSON_2D.pde_residual(u, x)[:, 0] / math.sqrt(x.shape[0])


def boundary_residual(model, xb):
    return (model(xb) - POISSON_2D.boundary_data(xb))[:, 0] / math.sqrt(xb.shape[0])


def make_steps(model, x, xb):
    engine = CaptureEngine(model, list(model.parameters()))
    reference_model = copy.deepcopy(model)  # no hooks fire on it (they check their module)
    theta = {n: p.detach() for n, p in reference_model.named_parameters()}
    both = torch.cat([x, xb])
    is_boundary = (torch.arange(both.shape[0]) >= x.shape[0]).view(-1, 1)
    scale = torch.tensor([x.shape[0] ** -0.5, xb.shape[0] ** -0.5], dtype=torch.float64)
    weights = scale[is_boundary.long()]  # (float64: torch.where with Python floats would round them to float32)
    plain_params = list(reference_model.parameters())

    def gradient():  # on the copy: no hooks
        residuals = [interior_residual(reference_model, x), boundary_residual(reference_model, xb)]
        return torch.autograd.grad(0.5 * sum(r.pow(2).sum() for r in residuals), plain_params)

    num_params = sum(t.numel() for t in theta.values())

    def capture(residual):
        engine.backward_passes(residual, [torch.ones_like(residual)], retain_graph=False)
        factors = engine.factors()
        engine.clear()
        return factors

    def write_rows(out, factors):
        """Each layer's explicit rows (weight, then bias) into its columns of ``out`` (no concatenation)."""
        col = 0
        for layer in engine.layers:
            for part in factors[layer.name].explicit_rows():
                out[:, col : col + part.shape[1]] = part
                col += part.shape[1]
        return out

    def one_capture():
        u = forward_laplacian(model, both)
        residual = torch.where(is_boundary, u.value - POISSON_2D.boundary_data(both), POISSON_2D.pde_residual(u, both))
        return capture((residual * weights)[:, 0])

    def hooks_rows():
        j = torch.empty(both.shape[0], num_params, dtype=torch.float64)
        write_rows(j[: x.shape[0]], capture(interior_residual(model, x)))
        write_rows(j[x.shape[0] :], capture(boundary_residual(model, xb)))
        return j

    def hooks_gram():
        factors = one_capture()
        return sum(factors[layer.name].gram() for layer in engine.layers)

    def hooks_rows_gram():
        j = write_rows(torch.empty(both.shape[0], num_params, dtype=torch.float64), one_capture())
        return symmetric_gram([j])

    def rows(per_point, points):
        """J of a per-point residual ``(theta, x_i) -> scalar``, vmapped over the points."""
        jac = vmap(jacrev(per_point), in_dims=(None, 0))(theta, points)
        return torch.cat([jac[n].reshape(points.shape[0], -1) for n in theta], dim=1)

    wrapper = _Residuals(reference_model)

    def interior_forward_laplacian(th, point):
        return functional_call(wrapper, {f"model.{n}": t for n, t in th.items()}, (point.unsqueeze(0), x.shape[0]))

    def interior_hessian(th, point):
        def u(z):
            return functional_call(reference_model, th, (z.unsqueeze(0),)).squeeze()

        lap = torch.func.hessian(u)(point).diagonal().sum()
        return (-lap - 2 * math.pi**2 * torch.sin(math.pi * point).prod()) / math.sqrt(x.shape[0])

    def boundary(th, point):
        z = point.unsqueeze(0)
        return (functional_call(reference_model, th, (z,)) - POISSON_2D.boundary_data(z))[0, 0] / math.sqrt(xb.shape[0])

    def vmap_jacrev_forward_laplacian():
        return torch.cat([rows(interior_forward_laplacian, x), rows(boundary, xb)])

    def vmap_jacrev_hessian():
        return torch.cat([rows(interior_hessian, x), rows(boundary, xb)])

    steps = {
        "gradient": gradient,
        "hooks_rows": hooks_rows,
        "hooks_gram": hooks_gram,
        "hooks_rows_gram": hooks_rows_gram,
        "vmap_jacrev_forward_laplacian": vmap_jacrev_forward_laplacian,
        "vmap_jacrev_hessian": vmap_jacrev_hessian,
    }
    return steps, engine


class _Residuals(torch.nn.Module):
    """``forward(x, n)``: the interior residual of ``model`` (its submodule) at ``x`` for a group of
    ``n`` points, so that ``functional_call`` on this wrapper swaps the parameters forward_laplacian sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        u = forward_laplacian(self.model, x)
        return POISSON_2D.pde_residual(u, x)[0, 0] / math.sqrt(n)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a loaded 2-core machine two OpenMP threads made small ops 10-70x slower)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    points = (30, 8) if args.quick else (POISSON_2D.interior_points, POISSON_2D.boundary_points)
    model, x, xb = setup(*points)
    steps, engine = make_steps(model, x, xb)

    reference = steps["vmap_jacrev_hessian"]()
    checks = {
        "hooks_rows": float((steps["hooks_rows"]() - reference).abs().max()),
        "vmap_jacrev_forward_laplacian": float((steps["vmap_jacrev_forward_laplacian"]() - reference).abs().max()),
    }
    gram = reference @ reference.T
    for name in ("hooks_gram", "hooks_rows_gram"):
        checks[f"{name}_relative"] = float((steps[name]() - gram).abs().max() / gram.abs().max())
    print("max abs difference to vmap_jacrev_hessian (Gram: relative to its largest entry):", checks)
    samples = interleaved_times(steps, rounds=rounds, steps_per_round=1, warmup=1)
    summary = ratio_summary(samples, "gradient")
    for name, row in summary.items():
        print(f"{name:26s} {row['median_seconds']:8.3f} s   x{row['ratio_median']:6.1f} of gradient")
    results = {
        "benchmark": "pde_jacobian",
        "problem": "poisson2d (2-64-64-48-48-1 tanh, 9873 parameters, float64)",
        "points": {"interior": x.shape[0], "boundary": xb.shape[0]},
        "quick": args.quick,
        "rounds": rounds,
        "threads": args.threads,
        "note": "shared 2-core machine: other processes ran at the same time; read the ratios",
        "max_abs_difference_to_vmap_jacrev_hessian": checks,
        "seconds": {name: samples[name] for name in steps},
        "summary": summary,
        "speedup_of_hooks_rows": {
            "over_vmap_jacrev_hessian": statistics.median(
                [a / b for a, b in zip(samples["vmap_jacrev_hessian"], samples["hooks_rows"], strict=True)]
            ),
            "over_vmap_jacrev_forward_laplacian": statistics.median(
                [a / b for a, b in zip(samples["vmap_jacrev_forward_laplacian"], samples["hooks_rows"], strict=True)]
            ),
        },
        "environment": environment("cpu"),
    }
    engine.close()
    write_json(results, args.out / "pde_jacobian.json")


if __name__ == "__main__":
    main()
