"""Wall-clock time to a target test accuracy: FNGD against SGD-momentum and AdamW,
each tuned on a grid of the same size, on the ``digits`` MLP and the ``mnist`` CNN.

Each run trains with :func:`gramopt.training.training_step` (batch 128, the data order
of ``gramopt train`` for its seed, FNGD estimating during the first epoch), times only
the training steps, and evaluates the test accuracy every ``eval_every`` steps
(untimed). A run stops at the target or after ``epochs`` epochs. Per optimizer, the
grid setting with the smallest median time-to-target over the seeds is reported (a
miss counts as infinite time).

Grids (3 settings each; fixed before the benchmark seeds were run):

- SGD, momentum 0.9: lr in {0.03, 0.1, 0.3}
- AdamW, weight decay 0.01: lr in {1e-3, 3e-3, 1e-2}
- FNGD, momentum 0.9, damping 1e-3 (damping * M = 0.128): lr in {0.1, 0.3, 1.0}

    PYTHONPATH=src python benchmarks/fngd_time_to_target.py   # benchmarks/results/fngd_time_to_target.{json,png}
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from gramopt.tasks import get_task
from gramopt.training import build_optimizer, evaluate, training_step, with_epoch_defaults
from gramopt.training.loop import epoch_order

RESULTS = Path(__file__).parent / "results"
GRIDS = {
    "sgd": [dict(lr=lr, momentum=0.9) for lr in (0.03, 0.1, 0.3)],
    "adamw": [dict(lr=lr, weight_decay=0.01) for lr in (1e-3, 3e-3, 1e-2)],
    "fngd": [dict(lr=lr, damping=1e-3, momentum=0.9) for lr in (0.1, 0.3, 1.0)],
}
TASKS = {  # target test accuracy, epoch budget, evaluation interval (steps)
    "digits": dict(target=0.93, epochs=10, eval_every=2),
    "mnist": dict(target=0.95, epochs=8, eval_every=4),
}


def run(task_name: str, optimizer: str, hyper: dict, seed: int, target: float, epochs: int, eval_every: int, batch: int) -> dict:
    task = get_task(task_name)
    split = task.load(seed)
    model = task.build_model(seed)
    n = split.train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch)
    opt = build_optimizer(optimizer, model, task.loss, with_epoch_defaults(optimizer, dict(hyper), steps_per_epoch))
    clock, step, curve = 0.0, 0, []
    reached = None
    model.train()
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            start = time.perf_counter()
            try:
                loss = float(training_step(opt, model, task.loss, split.train_x[idx], split.train_y[idx]))
            except ArithmeticError:
                loss = math.nan
            clock += time.perf_counter() - start
            step += 1
            if not math.isfinite(loss):
                return dict(curve=curve, reached=None, diverged=True, steps=step, seconds=clock)
            if step % eval_every == 0 or i == steps_per_epoch - 1:
                _, accuracy = evaluate(model, task, split.test_x, split.test_y)
                curve.append((clock, step, accuracy))
                if accuracy >= target:
                    reached = dict(seconds=clock, step=step, epoch=epoch + (i + 1) / steps_per_epoch)
                    return dict(curve=curve, reached=reached, diverged=False, steps=step, seconds=clock)
    return dict(curve=curve, reached=None, diverged=False, steps=step, seconds=clock)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    axes = axes[0]
    colors = {"sgd": "tab:blue", "adamw": "tab:orange", "fngd": "tab:green"}
    for ax, name in zip(axes, tasks):
        entry = results["tasks"][name]
        for opt, best in entry["best"].items():
            for k, r in enumerate(entry["runs"][opt][best["setting"]]):
                xs = [c[0] for c in r["curve"]]
                ys = [c[2] for c in r["curve"]]
                label = f"{opt} {entry['grid'][opt][best['setting']]}" if k == 0 else None
                ax.plot(xs, ys, color=colors[opt], alpha=0.8, linewidth=1, label=label)
        ax.axhline(entry["target"], color="gray", linestyle="--", linewidth=0.8)
        ax.set_ylim(max(0.0, entry["target"] - 0.3), 1.0)
        ax.set_xlabel("training time (s, wall clock, 1 thread)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: best grid setting per optimizer, seeds {results['settings']['seeds']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "fngd_time_to_target"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "wall-clock training time to a target test accuracy (evaluation not timed)",
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "settings": {**vars(args), "tasks": {k: TASKS[k] for k in args.tasks}},
        "tasks": {},
    }
    started = time.perf_counter()
    for name in args.tasks:
        spec = TASKS[name]
        entry = {"target": spec["target"], "grid": GRIDS, "runs": {}, "best": {}}
        for opt, grid in GRIDS.items():
            entry["runs"][opt] = []
            for hyper in grid:
                runs = [run(name, opt, hyper, seed, spec["target"], spec["epochs"], spec["eval_every"], args.batch) for seed in args.seeds]
                entry["runs"][opt].append(runs)
                times = [r["reached"]["seconds"] if r["reached"] else math.inf for r in runs]
                print(f"{name:7s} {opt:6s} {hyper}: seconds to {spec['target']:.0%}: {[round(t, 2) for t in times]}", flush=True)
            medians = [statistics.median([r["reached"]["seconds"] if r["reached"] else math.inf for r in runs]) for runs in entry["runs"][opt]]
            best = min(range(len(grid)), key=lambda i: medians[i])
            runs = entry["runs"][opt][best]
            entry["best"][opt] = {
                "setting": best,
                "hyper": grid[best],
                "median_seconds": medians[best] if math.isfinite(medians[best]) else None,
                "reached": sum(r["reached"] is not None for r in runs),
                "median_epochs": statistics.median([r["reached"]["epoch"] for r in runs if r["reached"]]) if any(r["reached"] for r in runs) else None,
            }
        fngd = entry["best"]["fngd"]["median_seconds"]
        entry["fngd_faster_than"] = {
            opt: (fngd is not None and (entry["best"][opt]["median_seconds"] is None or fngd < entry["best"][opt]["median_seconds"]))
            for opt in ("sgd", "adamw")
        }
        results["tasks"][name] = entry
        print(name, {opt: (b["hyper"], b["median_seconds"], b["median_epochs"]) for opt, b in entry["best"].items()}, flush=True)
    results["benchmark_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=lambda o: None if o == math.inf else o))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({results['benchmark_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
