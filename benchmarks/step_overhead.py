"""Step time of gramopt's methods relative to an SGD-momentum step (issue 15).

Models (batch 128 of the tasks' own data): the MLP 64-256-256-10 (ReLU) on scikit-learn's
digits, the ``mnist`` CNN and the ``recall`` Transformer. Methods, each on its own copy of
the model, all through :func:`gramopt.training.training_step` (forward, the method's
backward pass(es), update):

- ``sgd``: ``torch.optim.SGD(momentum=0.9)``, the reference (ratio 1);
- ``ggn-mse``: GGN, exact (Cholesky), mse. On the MLP with a scalar output (64-256-256-1
  against the digit's label as a number: the GGN goal of issue 2 is for one output; with
  k = 10 outputs the Gram is ``[1280, 1280]`` and its Cholesky alone costs tens of SGD
  steps); on the CNN and the Transformer against one-hot targets (k = 10 and 8);
- ``fngd-estimate`` / ``fngd-share``: FNGD's estimation and sharing phases (on request also
  ``fngd-share-ordinary``: the sharing phase in the ordinary loop, ``loss.backward();
  opt.step()``, whose backward computes weight gradients the step does not use);
- ``seng-every1`` / ``seng-every200``: SENG with ``curvature_every`` 1 and 200 (with 200,
  the timed steps reuse the curvature of the warm-up's refresh: its cost, about one
  ``seng-every1`` step per 200 steps, adds under 1% to the ratio).

The methods are timed in turns (``bench_common.interleaved``: rounds in a rotating
order, several steps per turn) in one process; the ratio to SGD is taken
per round and the median (min, max) over rounds is reported, for 1 and 2 threads, of the
wall-clock time (``ratio``) and of the main thread's CPU time (``ratio_thread_cpu``: less
sensitive to other processes on a shared machine; with 2 threads it misses the second
thread's work). On CUDA each turn is bracketed by ``torch.cuda.synchronize``.

    PYTHONPATH=src python benchmarks/step_overhead.py --tag after   # results/step_overhead_after.{json,png}
    PYTHONPATH=src python benchmarks/step_overhead.py --quick --out /tmp/bench   # a smoke run
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from pathlib import Path

import torch

from bench_common import (
    arguments,
    build_method,
    cycling_step,
    environment,
    interleaved,
    load_model,
    mlp_model,
    pyplot,
    ratios,
    regression_target,
    write_results,
)

MODELS = ("mlp", "mnist", "recall")
METHODS = ("sgd", "ggn-mse", "fngd-estimate", "fngd-share", "seng-every1", "seng-every200")
GOALS = {
    "mlp": {"ggn-mse": 1.5, "fngd-share": 1.10, "fngd-estimate": 1.6, "seng-every200": 1.25, "seng-every1": 1.8},
    "mnist": {"fngd-share": 1.05},
    "recall": {"fngd-share": 1.05},
}


def bench(
    name: str,
    threads: int,
    rounds: int,
    seconds_per_turn: float,
    device: torch.device,
    methods: list[str],
    batch: int = 128,
) -> dict:
    torch.set_num_threads(threads)
    model, task_loss, batches = load_model(name, batch=batch)
    model = model.to(device)
    classes = int(max(int(y.max()) for _, y in batches)) + 1
    runs = {}
    for method in methods:
        scalar = name == "mlp" and method == "ggn-mse"
        m = copy.deepcopy(model) if not scalar else mlp_model(1).to(device)
        opt, loss = build_method(method, m)
        loss = loss or task_loss
        data = [(x.to(device), regression_target(y, loss, classes, scalar).to(device)) for x, y in batches]
        runs[method] = (m, opt, loss, data)
    steps = {
        k: cycling_step(opt, m, loss, data, ordinary=k.endswith("-ordinary"))
        for k, (m, opt, loss, data) in runs.items()
    }
    # (the warm-up's first step is SENG every 200's curvature refresh)
    wall, cpu, inner = interleaved(steps, rounds, seconds_per_turn, device)
    out = {
        "steps_per_turn": inner,
        "rounds": rounds,
        "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in wall.items()},
        "ratio": ratios(wall),
        "ratio_thread_cpu": ratios(cpu),
    }
    for key in runs:
        info = getattr(runs[key][1], "last_info", None)
        if info is not None:
            out.setdefault("last_step_phases_ms", {})[key] = {k: 1e3 * v for k, v in info.seconds.items()}
    return out


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, (label, models) in zip(axes[0], runs.items(), strict=True):
        methods = [m for m in results["settings"].get("methods", METHODS) if m != "sgd"]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs, med, lo, hi = [], [], [], []
            for j, model in enumerate(models):
                r = models[model]["ratio"].get(method)
                if r:
                    xs.append(j + (i - len(methods) / 2 + 0.5) * width)
                    med.append(r["median"])
                    lo.append(r["median"] - r["min"])
                    hi.append(r["max"] - r["median"])
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=method)
        for j, model in enumerate(models):
            for method, goal in GOALS.get(model, {}).items():
                if method in methods:
                    i = methods.index(method)
                    x = j + (i - len(methods) / 2 + 0.5) * width
                    ax.plot([x - width / 2, x + width / 2], [goal, goal], color="black", linewidth=1.5)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_yscale("log")  # GGN with k = 10 or 8 outputs costs tens of SGD steps
        ax.set_xticks(range(len(models)), list(models))
        ax.set_title(f"{results['tag']}: {label} (bars: goals)", fontsize=9)
    axes[0][0].set_ylabel("step time / SGD-momentum step (median, min-max)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seconds-per-turn", type=float, default=0.04)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tag", default="after", help="results step_overhead_TAG.{json,png}")
    parser.add_argument("--replot", default=None, help="redraw the PNG of this JSON and exit")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return
    if args.quick:  # the MLP at batch 16, one thread, two rounds of one step per method
        args.models, args.threads, args.rounds, args.seconds_per_turn, args.batch = ["mlp"], [1], 2, 0.0, 16
    device = torch.device(args.device)
    methods = ["sgd"] + [m for m in args.methods if m != "sgd"]
    results = {
        "benchmark": f"step time / SGD-momentum step time, same model, batch {args.batch}, interleaved in one process",
        "tag": args.tag,
        "goals": GOALS,
        "environment": environment(device),
        "settings": vars(args),
        "runs": {},
    }
    for threads in args.threads:
        label = f"{threads} thread{'s' if threads > 1 else ''}"
        results["runs"][label] = {}
        for name in args.models:
            r = bench(name, threads, args.rounds, args.seconds_per_turn, device, methods, args.batch)
            results["runs"][label][name] = r
            print(
                f"{label} {name:6s} sgd {r['ms_per_step']['sgd']:.2f} ms  "
                + "  ".join(
                    f"{k} {v['median']:.2f}x ({r['ratio_thread_cpu'][k]['median']:.2f}x cpu)"
                    for k, v in r["ratio"].items()
                ),
                flush=True,
            )
    results["environment"]["load_average_after"] = os.getloadavg()
    write_results(results, args.out / f"step_overhead_{args.tag}", plot)


if __name__ == "__main__":
    main()
