"""Probe: GaussNewton's functional Jacobian for a PINN residual written with torch.autograd.grad.

Conclusion (benchmarks/notes.md, "The functional Jacobian"; ``benchmarks/results/probes/
functional_jacobian.json``; one thread, load average 2.8-2.9 on the 2-core machine shared with
another benchmark): the closure call and J at N = 1,020 took 45.2 s by the former route (M
batched vector-Jacobian products through the whole graph, blocks of 424 rows), 12.3 s by
today's row route (groups apart, blocks of 16), 0.70 s by per-point copies of the Linear
layers' parameters with their check and 0.41 s without (the hooks on forward_laplacian:
0.074 s); J the same to 3e-17 of its largest entry. ``is_grads_batched`` does vectorize: only
``aten::tanh_backward`` lacks a batching rule in the legacy vmap behind it (a loop over the
block's rows there); the time is the O(M N p) work itself, slower per row in big blocks.

The residual, the user's way: the 2-D Poisson problem (``gramopt.pde.problems.POISSON_2D``:
tanh MLP 2-64-64-48-48-1, p = 9,873, float64) at N points (interior and boundary 900 : 120),
the Laplacian by ``torch.autograd.grad(u.sum(), x, create_graph=True)`` and a second
``autograd.grad`` per coordinate, rows ``[(-Lap u - f) / sqrt(N_in), (u(x_bd) - g) /
sqrt(N_bd)]``. Such a closure cannot run under torch.func (``requires_grad_``,
``autograd.grad`` inside), so ``jacobian="functional"`` used to take every row by batched
vector-Jacobian products through its graph.

What it times, interleaved in one process (rounds in a rotating order, one torch thread),
each the closure call and the Jacobian as a step's ``jacobian`` phase has them:

- ``before``: the former route, ``torch.autograd.grad(flat, params, grad_outputs=E,
  is_grads_batched=True)`` with E blocks of ``2**22 // p`` = 424 rows of the identity;
- ``rows``: today's row route (each group through its own graph, blocks of 16 rows);
- ``per_point`` / ``per_point_unchecked``: today's per-point route (per-point copies of the
  Linear layers' parameters), with its random check pass (the first step and every
  ``check_every``-th) and without (the other steps);
- ``hooks``: the same residual on ``gramopt.pde.forward_laplacian`` by the capture engine, for scale.

The slow routes run ``--slow-rounds`` times at the largest N (a minute each). It also
records the routes' largest difference from ``before``'s J, a torch.profiler summary of
``before`` and ``per_point`` at the smallest N, and the operations for which the legacy
vmap behind ``is_grads_batched`` has no batching rule (it loops over the rows there).

    PYTHONPATH=src nice -n 10 python benchmarks/probes/functional_jacobian.py
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import gramopt
from gramopt.optim.gauss_newton import jacobian as jac_mod
from gramopt.optim.gauss_newton.residuals import Residuals, evaluate
from gramopt.pde import forward_laplacian
from gramopt.pde.problems import POISSON_2D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import RESULTS, arguments, environment, write_json  # noqa: E402

DT = torch.float64
SLOW = ("before", "rows")


def closures(model: nn.Module, n: int) -> tuple[Callable[[], list[Tensor]], Callable[[], list[Tensor]]]:
    """``(by autograd, by forward_laplacian)``: the Poisson rows at n points (module doc)."""
    gen = torch.Generator().manual_seed(0)
    n_in = n * POISSON_2D.interior_points // (POISSON_2D.interior_points + POISSON_2D.boundary_points)
    x_in = POISSON_2D.sample_interior(n_in, gen, DT)
    x_bd = POISSON_2D.sample_boundary(n - n_in, gen, DT)
    f = 2 * math.pi**2 * POISSON_2D.solution(x_in)

    def by_autograd() -> list[Tensor]:
        x = x_in.detach().requires_grad_(True)
        (du,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        laplacian = sum(torch.autograd.grad(du[:, j].sum(), x, create_graph=True)[0][:, j : j + 1] for j in range(2))
        return [(-laplacian - f) / math.sqrt(n_in), model(x_bd) / math.sqrt(n - n_in)]

    def by_forward_laplacian() -> list[Tensor]:
        u = forward_laplacian(model, x_in)
        return [(-u.laplacian - f) / math.sqrt(n_in), model(x_bd) / math.sqrt(n - n_in)]

    return by_autograd, by_forward_laplacian


def before_rows(flat: Tensor, params: list[nn.Parameter]) -> Tensor:
    """The former functional route: blocks of ``2**22 // p`` rows, all groups through the whole graph."""
    m, width = flat.shape[0], sum(p.numel() for p in params)
    out = flat.new_zeros(m, width)
    chunk = max(1, min(m, 2**22 // width))
    eye = torch.eye(m, dtype=flat.dtype)
    for i0 in range(0, m, chunk):
        grads = torch.autograd.grad(
            flat, params, grad_outputs=eye[i0 : i0 + chunk], is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        offset = 0
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                out[i0 : i0 + chunk, offset : offset + p.numel()] = g.reshape(g.shape[0], -1)
            offset += p.numel()
    return out


def methods(model: nn.Module, n: int) -> dict[str, Callable[[], Tensor]]:
    by_autograd, by_forward_laplacian = closures(model, n)
    opt = gramopt.GaussNewton(model, jacobian="functional")
    params = opt._params()

    def step_rows(closure: Callable[[], list[Tensor]]) -> Residuals:
        return evaluate(closure, DT, torch.device("cpu"))

    def functional(route: str, check: bool = True) -> Callable[[], Tensor]:
        def run() -> Tensor:
            res = step_rows(by_autograd)
            jac, taken = jac_mod.functional_jacobian(opt.engine, res, params, by_autograd, (route,), check)
            assert taken == route, taken
            opt.engine.clear()
            return jac

        return run

    def before() -> Tensor:
        with opt.engine.paused():
            jac = before_rows(step_rows(by_autograd).flat, params)
        opt.engine.clear()
        return jac

    def hooks() -> Tensor:
        res = step_rows(by_forward_laplacian)
        jac, rest = jac_mod.hooks_jacobian(opt.engine, res, params)
        assert not rest
        opt.engine.clear()
        return jac

    return {
        "before": before,
        "rows": functional("rows"),
        "per_point": functional("per-point"),
        "per_point_unchecked": functional("per-point", check=False),
        "hooks": hooks,
    }


def profile_summary(run: Callable[[], Tensor], rows: int = 6) -> list[dict]:
    """The ``rows`` operations of most self CPU time in one call of ``run``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in top]


def vmap_fallbacks(model: nn.Module) -> list[str]:
    """The operations the legacy vmap of ``is_grads_batched`` has no batching rule for, in
    one batched product through the autograd Laplacian's graph."""
    by_autograd, _ = closures(model, 8)
    flat = torch.cat([r.reshape(-1) for r in by_autograd()])
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eye = torch.eye(flat.shape[0], dtype=DT)
            torch.autograd.grad(flat, list(model.parameters()), eye, is_grads_batched=True, allow_unused=True)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(False)
    messages = [str(w.message) for w in caught]
    return sorted({m.split("batching rule for ")[1].split(".")[0] for m in messages if "batching rule for " in m})


def steps(model: nn.Module, n: int, count: int) -> dict[str, list[dict]]:
    """``count`` whole GaussNewton steps (default settings) on copies of ``model``: the
    autograd closure with ``jacobian="functional"``, the forward_laplacian one with the hooks;
    wall seconds and ``last_info.seconds`` per step."""
    out: dict[str, list[dict]] = {}
    for name, jacobian in (("functional", "functional"), ("hooks", "hooks")):
        twin = copy.deepcopy(model)
        by_autograd, by_forward_laplacian = closures(twin, n)
        opt = gramopt.GaussNewton(twin, jacobian=jacobian)
        out[name] = []
        for _ in range(count):
            start = time.perf_counter()
            opt.step(by_autograd if jacobian == "functional" else by_forward_laplacian)
            elapsed = time.perf_counter() - start
            info = opt.last_info
            phases = {k: round(v, 3) for k, v in info.seconds.items()}
            out[name].append(
                {"seconds": round(elapsed, 3), "phases": phases, "route": info.jacobian_route, "checked": info.checked}
            )
            print(f"N={n} step, {name}: {elapsed:.2f} s {phases} (load average {os.getloadavg()[0]:.2f})", flush=True)
        opt.close()
    return out


def main() -> None:
    parser = arguments(__doc__, out=RESULTS / "probes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 1020])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-rounds", type=int, default=1, help="rounds of the row routes at the largest N")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = [16, 32], 1
    torch.set_num_threads(1)
    model = POISSON_2D.build_model(torch.Generator().manual_seed(0))
    p = sum(q.numel() for q in model.parameters())
    record: dict = {
        "what": "closure call + Jacobian of the 2-D Poisson rows (Laplacian by torch.autograd.grad), seconds",
        "p": p,
        "sizes": {},
        "vmap_fallbacks": vmap_fallbacks(model),
        "note": "2-core machine shared with other processes: the load average is given with each figure",
    }
    print(f"ops the legacy vmap loops over: {record['vmap_fallbacks']}")
    for n in args.sizes:
        runs = methods(model, n)
        names = list(runs)
        rounds = args.slow_rounds if n == max(args.sizes) and not args.quick else args.rounds
        seconds: dict[str, list[dict]] = {name: [] for name in names}
        reference, errors = None, {}
        for k in range(args.rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                if name in SLOW and k >= rounds:
                    continue
                start = time.perf_counter()
                jac = runs[name]()
                elapsed = time.perf_counter() - start
                load = os.getloadavg()[0]
                seconds[name].append({"seconds": round(elapsed, 4), "load_average_1min": round(load, 2)})
                print(f"N={n} {name}: {elapsed:.3f} s (load average {load:.2f})", flush=True)
                if name == "before" and reference is None:
                    reference = jac
                elif name not in ("hooks", "before") and name not in errors:
                    errors[name] = jac
        scale = float(reference.abs().max())
        entry = {
            "rows": n,
            "seconds": seconds,
            "median_seconds": {k: sorted(s["seconds"] for s in v)[len(v) // 2] for k, v in seconds.items() if v},
            "max_abs_difference_from_before_over_max_entry": {
                k: float((j - reference).abs().max()) / scale for k, j in errors.items()
            },
        }
        if n == min(args.sizes):
            entry["profile"] = {name: profile_summary(runs[name]) for name in ("before", "per_point")}
        record["sizes"][str(n)] = entry
    record["steps"] = steps(model, max(args.sizes), 1 if args.quick else 3)
    record["environment"] = environment()
    write_json(record, args.out / "functional_jacobian.json")


if __name__ == "__main__":
    main()
