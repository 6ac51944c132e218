"""Probe: is gramopt.GaussNewton's step as fast as the research probe's step of the same algorithm?

Conclusion (benchmarks/notes.md, "GaussNewton step parity"; ``benchmarks/results/probes/
gn_step_parity_{before,after}_{1,2,3}.json``, one thread, load average 8-9 on 2 cores): it is now.
Before, the library's step took 1.35 / 1.35 / 1.52x the reference's (median of 8 interleaved
rounds each), all of it in the Jacobian (0.54-0.68 s against 0.17-0.23 s): every backward pass
ran through every residual group and every layer call built rows for every pass, the other
groups' all-zero ones included. With one pass per group's column through that group's graph and
rows for the passes that reach a call, 1.04 / 1.04 / 1.04x (Jacobian 0.19-0.26 s against
0.16-0.20 s; Gram 0.53-0.64 s, solve 0.04-0.05 s, line search 0.13-0.15 s: the same as the
reference's). The Gram J J^T (symmetric_gram, 10/16 of one matmul's products; one matmul took
0.93 s against 0.75 s here) is now most of the step.

What is compared, on ``poisson2d`` (gramopt.pde.problems: the 2-64-64-48-48-1 tanh MLP, p = 9,873,
900 interior + 120 boundary points, float64): one full step of

- ``library``: ``gramopt.GaussNewton(model)`` at its defaults (hooks Jacobian, sample space,
  Cholesky, grid line search of 8 trials), phases from ``opt.last_info.seconds``;
- ``reference``: the pinn_gauss_newton probe's step, copied here (:class:`ReferenceStep`): per
  residual group one forward, one backward pass of ``sum r`` through the capture engine, each
  layer's explicit rows written into J's columns; ``J J^T`` by ``symmetric_gram``; the damped
  Cholesky solve; the same 8-trial grid line search on flat parameter vectors.

Both start every step from the same parameters (restored after each step) on their own copy of
the model (each engine hooks only its copy), in turns in one process with a rotating order, one
torch thread. The library's first (checked) step is a warm-up, not timed. The machine's load
average (2 shared cores, other work running) is recorded before and after.

    PYTHONPATH=src python benchmarks/probes/gn_step_parity.py [--rounds 15] [--name NAME]
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import gramopt
from gramopt.capture import CaptureEngine
from gramopt.linalg.dense import solve_damped_psd
from gramopt.linalg.kernels import symmetric_gram
from gramopt.pde.problems import PROBLEMS, PINNProblem, Points

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import RESULTS, arguments, environment, write_json  # noqa: E402

DAMPING = 1e-10
TRIALS = 8


def flat_params(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_params(params: list[nn.Parameter], theta: Tensor) -> None:
    with torch.no_grad():
        for p, chunk in zip(params, theta.split([p.numel() for p in params]), strict=True):
            p.copy_(chunk.view_as(p))


class ReferenceStep:
    """The research probe's Gauss-Newton step (sample space, Cholesky, grid line search), the
    phases timed as it times them."""

    def __init__(self, problem: PINNProblem, model: nn.Sequential, points: Points) -> None:
        self.problem, self.model, self.points = problem, model, points
        self.params = list(model.parameters())
        self.engine = CaptureEngine(model, self.params)

    def groups(self) -> list:
        problem, x, xb = self.problem, self.points.interior, self.points.boundary
        return [
            lambda m: problem.pde_residual(problem.derivatives(m, x), x)[:, 0] / math.sqrt(x.shape[0]),
            lambda m: (m(xb) - problem.boundary_data(xb))[:, 0] / math.sqrt(xb.shape[0]),
        ]

    def jacobian(self) -> tuple[Tensor, Tensor]:
        n = self.points.interior.shape[0] + self.points.boundary.shape[0]
        jac = torch.empty(n, sum(p.numel() for p in self.params), dtype=torch.float64)
        residuals, row = [], 0
        for group in self.groups():
            r = group(self.model)
            self.engine.backward_passes(r, [torch.ones_like(r)], retain_graph=False)
            factors = self.engine.factors()
            self.engine.clear()
            col = 0
            for layer in self.engine.layers:
                for part in factors[layer.name].explicit_rows():
                    jac[row : row + r.shape[0], col : col + part.shape[1]] = part
                    col += part.shape[1]
            residuals.append(r.detach())
            row += r.shape[0]
        return jac, torch.cat(residuals)

    def loss(self) -> float:
        with torch.no_grad():
            value = float(self.problem.loss(self.model, self.points))
        return value if math.isfinite(value) else math.inf

    def __call__(self) -> dict[str, float]:
        seconds: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[name] = now - clock
            clock = now

        jac, r = self.jacobian()
        lap("jacobian")
        gram = symmetric_gram([jac])
        lap("gram")
        alpha, _ = solve_damped_psd(gram, r, DAMPING)
        delta = -(jac.T @ alpha)
        lap("solve")
        theta0 = flat_params(self.params)
        steps = [2.0**-j for j in range(TRIALS)]
        values = []
        for t in steps:
            set_params(self.params, theta0 + t * delta)
            values.append(self.loss())
        best = min(range(TRIALS), key=values.__getitem__)
        set_params(self.params, theta0 + steps[best] * delta)
        lap("line_search")
        return seconds


def library_step(opt: gramopt.GaussNewton, closure) -> dict[str, float]:
    opt.step(closure)
    return dict(opt.last_info.seconds)


def summary(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in samples for k in s})
    return {k: statistics.median(s.get(k, 0.0) for s in samples) for k in keys}


def main() -> None:
    parser = arguments(__doc__, out=RESULTS / "probes")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps of each (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="gn_step_parity", help="the results file's name (no suffix)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = PROBLEMS["poisson2d"]
    if args.quick:
        import dataclasses

        problem = dataclasses.replace(problem, hidden=(16, 16), interior_points=60, boundary_points=20)
        args.rounds = 2
    generator = torch.Generator().manual_seed(0)
    base = problem.build_model(generator)
    points = problem.sample_points(generator)
    lib_model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
    reference = ReferenceStep(problem, ref_model, points)
    opt = gramopt.GaussNewton(lib_model)
    lib_params = list(lib_model.parameters())
    theta0 = flat_params(lib_params)

    def closure() -> list[Tensor]:
        return problem.residuals(lib_model, points)

    def run(name: str) -> dict[str, float]:
        start = time.perf_counter()
        phases = library_step(opt, closure) if name == "library" else reference()
        phases["step"] = time.perf_counter() - start
        set_params(lib_params if name == "library" else reference.params, theta0)
        return phases

    first = run("library")  # the checked step (J^T r against autograd's gradient)
    run("reference")
    samples: dict[str, list[dict[str, float]]] = {"library": [], "reference": []}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in (("library", "reference") if r % 2 == 0 else ("reference", "library")):
            samples[name].append(run(name))
    load_after = os.getloadavg()
    medians = {name: summary(s) for name, s in samples.items()}
    ratio = [a["step"] / b["step"] for a, b in zip(samples["library"], samples["reference"], strict=True)]
    record = {
        "probe": "gn_step_parity",
        "problem": problem.name,
        "N": problem.interior_points + problem.boundary_points,
        "p": sum(p.numel() for p in lib_params),
        "threads": args.threads,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": load_after,
        "median_seconds": medians,
        "median_step_ratio_library_to_reference": statistics.median(ratio),
        "library_first_step_seconds (checked)": first,
        "samples": samples,
        "environment": environment(),
    }
    for name, med in medians.items():
        print(name, {k: round(v, 4) for k, v in med.items()})
    print("library / reference step, median of rounds:", round(statistics.median(ratio), 3))
    write_json(record, args.out / f"{args.name}.json")


if __name__ == "__main__":
    main()
