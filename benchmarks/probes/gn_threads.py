"""Probe: how much does a second torch thread speed up a gramopt.GaussNewton step on a PINN?

Conclusion: see benchmarks/notes.md, "GaussNewton step time against torch threads"
(``benchmarks/results/probes/gn_threads.json``).

What runs: ``poisson5d`` of gramopt.pde.problems by default (the 5-64-64-48-48-1 tanh MLP,
p = 10,065, 3,000 + 500 points drawn every step, float64), ``gramopt.GaussNewton(model)`` at its
defaults; one model and optimizer per thread count, their steps interleaved (round k takes
step k under each thread count, torch.set_num_threads switched between them), so the load's
drift falls on all alike. Recorded per thread count: each step's wall seconds and the
optimizer's phases (``opt.last_info.seconds``: jacobian, gram, solve, line_search), their
medians over the steps after the first, and the machine's load average before and after.

    PYTHONPATH=src python benchmarks/probes/gn_threads.py [--steps 6] [--threads 1 2]
        [--problem poisson5d] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch

import gramopt
from gramopt.pde.problems import PROBLEMS

RESULTS = Path(__file__).resolve().parents[1] / "results" / "probes"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--problem", default="poisson5d")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="seconds: a small network, two steps")
    args = parser.parse_args(argv)
    problem = PROBLEMS[args.problem]
    if args.quick:
        problem = dataclasses.replace(problem, hidden=(8, 8), interior_points=30, boundary_points=10)
        args.steps, args.threads = 2, [1]
    previous = torch.get_num_threads()
    runs = {}
    for threads in args.threads:  # the same initial weights and points for every thread count
        model = problem.build_model(torch.Generator().manual_seed(0))
        runs[threads] = {"model": model, "opt": gramopt.GaussNewton(model), "points": torch.Generator().manual_seed(1),
                         "steps": []}
    load_before = os.getloadavg()
    try:
        for _ in range(args.steps):
            for threads, run in runs.items():
                torch.set_num_threads(threads)
                points = problem.sample_points(run["points"])
                model = run["model"]
                start = time.perf_counter()
                run["opt"].step(lambda model=model, points=points: problem.residuals(model, points))
                seconds = time.perf_counter() - start
                run["steps"].append({"seconds": seconds, **run["opt"].last_info.seconds})
    finally:
        torch.set_num_threads(previous)
    summary = {}
    for threads, run in runs.items():
        later = run["steps"][1:] or run["steps"]
        summary[threads] = {key: statistics.median(step[key] for step in later) for key in later[0]}
    base = summary[args.threads[0]]["seconds"]
    out = {
        "problem": args.problem, "quick": args.quick, "rows": problem.interior_points + problem.boundary_points,
        "params": problem.num_params, "steps": args.steps, "cpu_count": os.cpu_count(),
        "load_before": load_before, "load_after": os.getloadavg(), "torch": torch.__version__,
        "median_after_first_step": summary,
        "speedup_over_first_thread_count": {t: base / s["seconds"] for t, s in summary.items()},
        "steps_by_threads": {t: run["steps"] for t, run in runs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gn_threads.json"
    path.write_text(json.dumps(out, indent=1))
    for threads, s in summary.items():
        print(f"{threads} thread(s): step {s['seconds']:.2f} s (" + ", ".join(
            f"{k} {v:.2f}" for k, v in s.items() if k != "seconds") + ")")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
