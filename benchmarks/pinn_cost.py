"""Where a gramopt.GaussNewton step's time goes on a PINN, and how each phase grows with the
number of residual rows N and of parameters p.

Problem: ``poisson2d`` of :mod:`gramopt.pde.problems` (-Lap u = f on the unit square, tanh MLP,
float64), trained with ``gramopt.GaussNewton(model)`` at its defaults (sample space while
N <= p, Cholesky, grid line search). The phases are the optimizer's own timers,
``opt.last_info.seconds``: ``jacobian`` (the residual closure and J, ``[N, p]``), ``gram``
(``J J^T``, ``[N, N]``), ``solve`` (the damped system), ``line_search`` (the trial losses under
``no_grad``) and ``update``. Two sweeps:

- N: 510, 1020, 2040 rows (interior and boundary points in the paper's ratio 900 : 120) on the
  paper's "deep-wide" MLP 2-64-64-48-48-1 (p = 9,873);
- p: the MLP's widths halved and doubled (2-32-32-24-24-1, p = 2,569; 2-128-128-96-96-1,
  p = 38,689) at N = 1020.

Expected growth: Jacobian ~ N p (one backward pass per group, per-layer rows), Gram ~ N^2 p,
Cholesky ~ N^3 (independent of p), line search ~ N p per trial. The JSON holds each phase's
median seconds per configuration (wall clock, the optimizer's timers; the whole step also in the
main thread's CPU time, ``time.thread_time``, which other processes disturb less) and the log-log
slopes of each phase against N (at fixed p) and against p (at fixed N). The configurations'
steps are interleaved (round k takes step k of each), so the load's drift falls on all alike.

    python benchmarks/pinn_cost.py                 # a few minutes on one core
    python benchmarks/pinn_cost.py --quick --out /tmp/bench

Writes ``benchmarks/results/pinn_cost/pinn_cost.json`` and ``.png``. The machine's load average
is recorded with every configuration: on a shared machine the absolute seconds drift, the
slopes less so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gramopt  # noqa: E402
from bench_common import arguments, environment, pyplot, write_results  # noqa: E402
from gramopt.pde.problems import POISSON_2D, PINNProblem  # noqa: E402

PAPER_N = POISSON_2D.interior_points + POISSON_2D.boundary_points  # 1020
PAPER_HIDDEN = POISSON_2D.hidden  # (64, 64, 48, 48)


def configurations(quick: bool) -> list[dict]:
    """The (rows, hidden widths) measured: the N sweep at the paper's widths, then the p sweep
    at the paper's N."""
    if quick:
        return [
            {"sweep": "N", "rows": 40, "hidden": (8, 8)},
            {"sweep": "N", "rows": 80, "hidden": (8, 8)},
            {"sweep": "p", "rows": 40, "hidden": (16, 16)},
        ]
    by_rows = [{"sweep": "N", "rows": n, "hidden": PAPER_HIDDEN} for n in (PAPER_N // 2, PAPER_N, 2 * PAPER_N)]
    by_width = [
        {"sweep": "p", "rows": PAPER_N, "hidden": tuple(w * factor // 2 for w in PAPER_HIDDEN)} for factor in (1, 4)
    ]
    return by_rows + by_width


def problem_with(rows: int, hidden: tuple[int, ...]) -> PINNProblem:
    """poisson2d with ``rows`` points split as the paper's 900 : 120 and the given widths."""
    interior = round(rows * POISSON_2D.interior_points / PAPER_N)
    return dataclasses.replace(POISSON_2D, hidden=hidden, interior_points=interior, boundary_points=rows - interior)


class Run:
    """One configuration: poisson2d with ``rows`` points and the given widths, its model, points
    and optimizer (GaussNewton at its defaults), and the phases' seconds of each timed step."""

    def __init__(self, sweep: str, rows: int, hidden: tuple[int, ...], seed: int = 0) -> None:
        self.sweep, self.rows, self.hidden = sweep, rows, hidden
        self.problem = problem_with(rows, hidden)
        generator = torch.Generator().manual_seed(seed)
        self.model = self.problem.build_model(generator)
        self.points = self.problem.sample_points(generator)
        self.opt = gramopt.GaussNewton(self.model)
        self.phases: list[dict[str, float]] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.loads: list[float] = []

    def step(self, timed: bool = True) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.opt.step(lambda: self.problem.residuals(self.model, self.points))
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        if timed:
            self.phases.append(dict(self.opt.last_info.seconds))
            self.wall.append(wall)
            self.cpu.append(cpu)
            self.loads.append(os.getloadavg()[0])

    def record(self) -> dict:
        info = self.opt.last_info
        names = sorted({key for seconds in self.phases for key in seconds})
        return {
            "sweep": self.sweep,
            "rows": self.rows,
            "interior_points": self.problem.interior_points,
            "boundary_points": self.problem.boundary_points,
            "hidden": list(self.hidden),
            "params": self.problem.num_params,
            "steps_timed": len(self.wall),
            "space": info.space,
            "solver": info.solver,
            "jacobian": info.jacobian,
            "median_seconds": {key: statistics.median(s.get(key, 0.0) for s in self.phases) for key in names},
            "median_step_seconds": statistics.median(self.wall),
            "median_step_cpu_seconds": statistics.median(self.cpu),
            "seconds": {key: [s.get(key, 0.0) for s in self.phases] for key in names},
            "step_seconds": self.wall,
            "step_cpu_seconds": self.cpu,
            "load_average_1min": self.loads,
            "final_loss": info.loss_after,
        }


def measure(configs: list[dict], steps: int) -> list[dict]:
    """Each configuration's phases over ``steps`` Gauss-Newton steps after one warm-up step (it pays
    one-time costs, the auto Jacobian check among them), interleaved: round k takes step k of every
    configuration, so a change in the machine's load falls on all of them alike."""
    runs = [Run(c["sweep"], c["rows"], c["hidden"]) for c in configs]
    for run in runs:
        run.step(timed=False)
    for _ in range(steps):
        for run in runs:
            run.step()
    return [run.record() for run in runs]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than two positive points)."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    mx = statistics.fmean(a for a, _ in pairs)
    my = statistics.fmean(b for _, b in pairs)
    den = sum((a - mx) ** 2 for a, _ in pairs)
    return sum((a - mx) * (b - my) for a, b in pairs) / den if den > 0 else None


def growth(runs: list[dict]) -> dict:
    """Per phase, the log-log slope against N (runs of the N sweep) and against p (the p sweep's
    runs with the N sweep's run at the same N and widths)."""
    by_rows = [r for r in runs if r["sweep"] == "N"]
    reference = next((r for r in by_rows if r["rows"] == runs[-1]["rows"]), None)
    by_params = [r for r in runs if r["sweep"] == "p"] + ([reference] if reference else [])
    by_params.sort(key=lambda r: r["params"])
    phases = sorted({key for r in runs for key in r["median_seconds"]}) + ["step", "step_cpu"]

    def seconds(run: dict, phase: str) -> float:
        if phase in ("step", "step_cpu"):
            return run["median_step_seconds" if phase == "step" else "median_step_cpu_seconds"]
        return run["median_seconds"].get(phase, 0.0)

    return {
        phase: {
            "slope_vs_rows": slope([r["rows"] for r in by_rows], [seconds(r, phase) for r in by_rows]),
            "slope_vs_params": slope([r["params"] for r in by_params], [seconds(r, phase) for r in by_params]),
        }
        for phase in phases
    }


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    runs = results["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sweep, key, label in ((axes[0], "N", "rows", "residual rows N"), (axes[1], "p", "params", "parameters p")):
        chosen = [r for r in runs if r["sweep"] == sweep]
        if sweep == "p":
            chosen += [r for r in runs if r["sweep"] == "N" and r["rows"] == chosen[0]["rows"]] if chosen else []
        chosen.sort(key=lambda r: r[key])
        xs = [r[key] for r in chosen]
        phases = sorted({k for r in chosen for k in r["median_seconds"]})
        for phase in phases:
            ax.plot(xs, [max(r["median_seconds"].get(phase, 0.0), 1e-6) for r in chosen], marker="o", label=phase)
        ax.plot(xs, [r["median_step_seconds"] for r in chosen], "k--", marker="s", label="whole step")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("median seconds per step")
        fixed = ""
        if chosen:
            fixed = f"p = {chosen[0]['params']}" if sweep == "N" else f"N = {chosen[0]['rows']}"
        ax.set_title(f"GaussNewton on poisson2d, {fixed}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--steps", type=int, default=7, help="steps timed per configuration (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 1 if args.quick else args.steps
    load_before = os.getloadavg()
    runs = measure(configurations(args.quick), steps)
    for run in runs:
        phases = "  ".join(f"{k} {v:.3f}" for k, v in run["median_seconds"].items())
        step = run["median_step_seconds"]
        print(f"N {run['rows']:5d}  p {run['params']:6d}  {run['space']} space  step {step:.3f} s  {phases}")
    results = {
        "benchmark": "pinn_cost",
        "problem": POISSON_2D.name,
        "quick": args.quick,
        "runs": runs,
        "growth": growth(runs),
        "expected": {"jacobian": "N p", "gram": "N^2 p", "solve": "N^3 (Cholesky)", "line_search": "N p per trial"},
        "load_average_before": load_before,
        "environment": environment(),
    }
    for phase, fit in results["growth"].items():
        print(f"{phase:12s} slope vs N {fit['slope_vs_rows']}  vs p {fit['slope_vs_params']}")
    write_results(results, args.out / "pinn_cost" / "pinn_cost", plot)


if __name__ == "__main__":
    main()
