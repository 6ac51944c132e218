"""Where the time of one step goes, per method and model (issue 15).

Same models, methods and batches as ``benchmarks/step_overhead.py`` (MLP 64-256-256-10,
the ``mnist`` CNN, the ``recall`` Transformer; batch 128). Each method runs ``--steps``
steps under ``torch.profiler`` (CPU activity) after a warm-up; the script marks the
forward pass, the backward pass(es) and the step, and inside the step every phase the
optimizer times (``SampleSpaceOptimizer._phase``: its names become profiler ranges).
The self time of the operators is then put in these buckets, per step (ms):

- ``forward``, ``backward passes`` (``opt.backward`` / ``loss.backward()``: the loss,
  the passes down to the layers' outputs, the plain gradients),
- ``Grams`` (GGN's ``gram``, SENG's ``curvature``, the Gram operators of FNGD's
  ``coefficients``), ``solve`` (GGN's and SENG's ``solve``; the Cholesky and triangular
  solves of FNGD's ``coefficients``), ``direction`` (the weighted weight-gradients
  ``U^T a``), ``factors`` (assembling the captured inputs and output-gradients),
  ``update`` (momentum, weight decay, the parameter update),
- ``checks``: finiteness and range checks (``isfinite``, ``all``, ``aminmax``, norms,
  and the host reads ``item`` / ``_local_scalar_dense``) wherever they run,
- ``Python overhead``: the time of the marked regions not spent inside any operator
  (Python, hooks, dispatch).

Each step is profiled on its own and the median over the steps is taken per bucket (a
loaded machine preempts some steps), and of ``operators_per_step``: the operators the
marked regions call directly, a count of the dispatches a step pays for that the load
does not change. Beside it, the peak memory of 3 steps: the resident set and, on CUDA,
``torch.cuda.max_memory_allocated`` (``gramopt.compare.memory.peak_memories``).
The profiler adds a few microseconds per operator, so absolute figures are above the
unprofiled ones (``step_overhead.py`` measures those); the split is what this shows.

    PYTHONPATH=src python benchmarks/step_profile.py     # results/step_profile.{json,png}
"""

from __future__ import annotations

import copy
import os
import statistics
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_common import (
    arguments,
    build_method,
    environment,
    load_model,
    mlp_model,
    pyplot,
    regression_target,
    write_results,
)
from gramopt.compare.memory import peak_memories
from gramopt.losses import get_loss
from gramopt.optim.base import SampleSpaceOptimizer
from step_overhead import METHODS, MODELS

BUCKETS = (
    "forward",
    "backward passes",
    "factors",
    "Grams",
    "solve",
    "direction",
    "update",
    "checks",
    "Python overhead",
)
PHASE_BUCKET = {
    "forward": "forward",
    "backward": "backward passes",
    "jacobian": "backward passes",
    "gradient": "backward passes",
    "factors": "factors",
    "gram": "Grams",
    "curvature": "Grams",
    "coefficients": "Grams",
    "solve": "solve",
    "direction": "direction",
    "update": "update",
    "step": "update",
}
CHECK_OPS = {
    "aten::isfinite", "aten::all", "aten::any", "aten::aminmax", "aten::_foreach_norm",
    "aten::item", "aten::_local_scalar_dense", "aten::linalg_vector_norm", "aten::norm",
}
SOLVE_OPS = ("cholesky", "triangular", "linalg_solve", "eigh", "linalg_matrix_norm")
PREFIX = "gramopt::"


def traced_phases(opt: torch.optim.Optimizer) -> None:
    """Make the optimizer's timed phases profiler ranges (on this instance only)."""
    if not isinstance(opt, SampleSpaceOptimizer):
        return
    original = opt._phase

    @contextmanager
    def phase(name: str):
        with record_function(PREFIX + name), original(name):
            yield

    opt._phase = phase


def one_step(opt, model, loss: str, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    with record_function(PREFIX + "forward"):
        output = model(x)
    with record_function(PREFIX + "backward"):
        if isinstance(opt, SampleSpaceOptimizer):
            opt.backward(output, y)
        else:
            get_loss(loss).value(output, y).backward()
    with record_function(PREFIX + "step"):
        opt.step()


def region(event) -> str | None:
    """The innermost marked region around a profiler event (None: outside all)."""
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX) :]
        e = e.cpu_parent
    return None


def _contents(event) -> tuple[list, list]:
    """The operators (``aten::``) and the marked subregions directly inside ``event``,
    looking through other ranges (``Optimizer.step#...``, autograd's
    ``evaluate_function`` wrappers)."""
    ops, regions = [], []
    for child in event.cpu_children:
        if child.name.startswith(PREFIX):
            regions.append(child)
        elif child.name.startswith("aten::"):
            ops.append(child)
        else:
            more_ops, more_regions = _contents(child)
            ops += more_ops
            regions += more_regions
    return ops, regions


def breakdown(events, steps: int) -> dict[str, float]:
    """ms per step in each bucket (see the module docstring)."""
    out = defaultdict(float)
    for r in (e for e in events if e.name.startswith(PREFIX)):
        phase = r.name[len(PREFIX) :]
        ops, regions = _contents(r)
        inner = sum(c.cpu_time_total for c in regions)
        for op in ops:  # top-level operators of the region (their children are inside them)
            if op.name in CHECK_OPS:
                bucket = "checks"
            elif phase in ("coefficients", "gram", "step") and any(s in op.name for s in SOLVE_OPS):
                bucket = "solve"
            elif phase == "step" and op.name in ("aten::mm", "aten::mul", "aten::add", "aten::matmul"):
                bucket = "Grams"  # GGN's Gram and its solve time themselves (no phase)
            else:
                bucket = PHASE_BUCKET.get(phase, "update")
            out[bucket] += op.cpu_time_total
        out["Python overhead"] += max(0.0, r.cpu_time_total - inner - sum(op.cpu_time_total for op in ops))
    return {k: out.get(k, 0.0) / 1e3 / steps for k in BUCKETS}


def operator_count(events) -> int:
    """How many operators (``aten::``) the marked regions of one step call directly (not
    those an operator calls inside itself): the dispatches a step pays for, a measure of
    its per-operator overhead that the machine's load does not change."""
    return sum(len(_contents(r)[0]) for r in events if r.name.startswith(PREFIX))


def profile_method(name: str, method: str, steps: int, device: torch.device, batch: int = 128) -> dict:
    model, task_loss, batches = load_model(name, batch=batch)
    scalar = name == "mlp" and method == "ggn-mse"
    model = (mlp_model(1) if scalar else copy.deepcopy(model)).to(device)
    opt, loss = build_method(method, model)
    loss = loss or task_loss
    classes = int(max(int(y.max()) for _, y in batches)) + 1
    data = [(x.to(device), regression_target(y, loss, classes, scalar).to(device)) for x, y in batches]
    traced_phases(opt)
    for i in range(5):
        one_step(opt, model, loss, *data[i % len(data)])
    per_step, operators = [], []
    for i in range(steps):  # one profile per step: the median per bucket resists preemption
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(opt, model, loss, *data[i % len(data)])
        per_step.append(breakdown(prof.events(), 1))
        operators.append(operator_count(prof.events()))
    parts = {k: statistics.median(p[k] for p in per_step) for k in BUCKETS}
    totals = [sum(p.values()) for p in per_step]
    cursor = iter(range(10**9))
    peaks = peak_memories(lambda: [one_step(opt, model, loss, *data[next(cursor) % len(data)]) for _ in range(3)])
    return {
        "ms_per_step": parts,
        "total_ms": sum(parts.values()),
        "total_ms_min_max": [min(totals), max(totals)],
        "operators_per_step": statistics.median(operators),
        "peak_memory_bytes": peaks,  # 3 steps: resident set and (on CUDA) max_memory_allocated
    }


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (model, methods) in zip(axes[0], models.items(), strict=True):
        names = list(methods)
        bottom = [0.0] * len(names)
        sgd = methods["sgd"]["total_ms"]
        for i, bucket in enumerate(BUCKETS):
            values = [methods[m]["ms_per_step"][bucket] / sgd for m in names]
            ax.bar(range(len(names)), values, bottom=bottom, color=colors[i % 10], label=bucket)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{model}: one step (profiled), in SGD steps", fontsize=9)
        ax.axhline(1.0, color="black", linewidth=0.8)
    axes[0][0].set_ylabel("time / profiled SGD-momentum step")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    if args.quick:  # the MLP at batch 16, one profiled step per method
        args.models, args.steps, args.batch = ["mlp"], 1, 16
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = ["sgd"] + [m for m in args.methods if m != "sgd"]
    results = {
        "benchmark": f"one step's time split by phase (torch.profiler, CPU activity), batch {args.batch}, ms per step",
        "buckets": BUCKETS,
        "environment": environment(device),
        "settings": vars(args),
        "models": {},
    }
    for name in args.models:
        results["models"][name] = {}
        for method in methods:
            r = profile_method(name, method, args.steps, device, args.batch)
            results["models"][name][method] = r
            print(f"{name:6s} {method:14s} {r['total_ms']:7.2f} ms  {r['operators_per_step']:5.0f} operators  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in r["ms_per_step"].items() if v >= 0.01), flush=True)
    results["environment"]["load_average_after"] = os.getloadavg()
    write_results(results, args.out / "step_profile", plot)


if __name__ == "__main__":
    main()
