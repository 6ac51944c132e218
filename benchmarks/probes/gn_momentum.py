"""Probe: does SPRING momentum get gramopt.GaussNewton to 1e-6 on poisson2d within 120 s?

Conclusion: see benchmarks/notes.md, "GaussNewton with SPRING momentum on poisson2d"
(``benchmarks/results/probes/gn_momentum.json``).

What runs: ``poisson2d`` of gramopt.pde.problems (the 2-64-64-48-48-1 tanh MLP, 900 + 120 fixed
points per seed, float64), ``gramopt.GaussNewton(model, momentum=mu)`` at its other defaults, for
each seed and each mu, ``--budget`` seconds of step time (one torch thread; the error evaluation
on a fixed set of 9,000 points is outside the clock). Recorded per run: the relative L2 error
after every step with the clock, the first time below 1e-6, the final error, the machine's
load average before and after.

    PYTHONPATH=src python benchmarks/probes/gn_momentum.py [--budget 120] [--seeds 0 1 2]
        [--momentum 0 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import gramopt
from gramopt.pde.problems import PROBLEMS, PINNProblem

RESULTS = Path(__file__).resolve().parents[1] / "results" / "probes"
TARGET = 1e-6


def run(seed: int, momentum: float, budget: float, problem: PINNProblem) -> dict:
    """One run: the error after every step against the step clock."""
    generator = torch.Generator().manual_seed(seed)
    model = problem.build_model(generator)
    points = problem.sample_points(generator)
    evaluation = problem.evaluation_set(torch.Generator().manual_seed(12345))
    opt = gramopt.GaussNewton(model, momentum=momentum)
    clock, history, reached = 0.0, [], None
    while clock < budget:
        start = time.perf_counter()
        opt.step(lambda: problem.residuals(model, points))
        clock += time.perf_counter() - start
        error = problem.relative_l2_error(model, evaluation)
        history.append((round(clock, 3), error))
        if reached is None and error <= TARGET:
            reached = clock
    return {"seed": seed, "momentum": momentum, "steps": len(history), "seconds_to_1e-6": reached,
            "final_error": history[-1][1], "history": history}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--momentum", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--problem", default="poisson2d")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="gn_momentum", help="the JSON file's name, without .json")
    parser.add_argument("--quick", action="store_true", help="seconds: two short runs on a small network")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = PROBLEMS[args.problem]
    if args.quick:
        problem = dataclasses.replace(problem, hidden=(8, 8), interior_points=30, boundary_points=10,
                                      evaluation_points=100)
        args.budget, args.seeds = 0.5, [0]
    load_before = os.getloadavg()
    runs = [run(seed, mu, args.budget, problem) for seed in args.seeds for mu in args.momentum]
    out = {"problem": args.problem, "quick": args.quick, "budget_seconds": args.budget, "threads": 1, "target": TARGET,
           "load_before": load_before, "load_after": os.getloadavg(), "torch": torch.__version__, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(out, indent=1))
    for r in runs:
        print(f"seed {r['seed']} momentum {r['momentum']}: {r['steps']} steps, final {r['final_error']:.2e}, "
              f"1e-6 at {r['seconds_to_1e-6']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
