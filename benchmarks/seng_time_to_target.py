"""Time to a target test accuracy: SENG against SGD with momentum and AdamW (issue 4).

Tasks: ``digits`` (MLP 64-128-128-10, target 95% test accuracy, at most 10 epochs) and
``mnist`` (the 5,000-image subset, small CNN, target 93%, at most 5 epochs), batch 128,
the tasks' fixed splits and data order (``gramopt.training.loop.epoch_order``).

Each optimizer gets a grid of the same size (3 learning rates; the rest at the task's
defaults: SGD momentum 0.9, AdamW weight decay 0.01, SENG damping and
``curvature_every`` from ``Task.hyper["seng"]``, momentum 0.9). All runs of a task
advance in lockstep, one step each per turn, so that load changes on the shared
machine hit every run alike; each run's clock counts only its own training steps
(forward, backward, step), not the evaluations. A run is evaluated on the test split
every ``eval_every`` steps and stops when it reaches the target (or its epochs run out).
The grid is run for seed 0; the best configuration of each optimizer is then rerun for
seeds 1 and 2 (seed = split, initialization and data order).

Writes ``benchmarks/results/seng_time_to_target.json`` and ``.png``.

    PYTHONPATH=src python benchmarks/seng_time_to_target.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gramopt.tasks import get_task
from gramopt.training.loop import epoch_order, evaluate
from gramopt.training.optimizers import build_optimizer, training_step

RESULTS = Path(__file__).parent / "results"
SETUPS = {
    "digits": dict(target=0.95, epochs=10, eval_every=4),
    "mnist": dict(target=0.93, epochs=5, eval_every=8),
}


def grids(task_name: str) -> dict[str, list[dict]]:
    seng = get_task(task_name).hyper["seng"]
    return {
        "sgd": [dict(lr=lr, momentum=0.9) for lr in (0.03, 0.1, 0.3)],
        "adamw": [dict(lr=lr, weight_decay=0.01) for lr in (1e-3, 3e-3, 1e-2)],
        "seng": [dict(seng, lr=seng["lr"] * f, momentum=0.9) for f in (1 / 3, 1.0, 3.0)],
    }


@dataclass
class Run:
    optimizer: str
    hyper: dict
    seed: int
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: int = 0
    seconds: float = 0.0
    done: bool = False
    reached: dict | None = None
    curve: list = field(default_factory=list)
    diverged: bool = False


def race(task_name: str, configs: list[tuple[str, dict, int]], setup: dict) -> list[Run]:
    task = get_task(task_name)
    splits = {seed: task.load(seed) for seed in {c[2] for c in configs}}
    runs = []
    for name, hyper, seed in configs:
        model = task.build_model(seed)
        runs.append(Run(name, hyper, seed, model, build_optimizer(name, model, task.loss, dict(hyper))))
    n = next(iter(splits.values())).train_x.shape[0]
    steps_per_epoch = math.ceil(n / task.batch_size)
    total = setup["epochs"] * steps_per_epoch
    for step in range(total):
        epoch, within = divmod(step, steps_per_epoch)
        for run in runs:
            if run.done:
                continue
            split = splits[run.seed]
            idx = epoch_order(n, run.seed, epoch)[within * task.batch_size : (within + 1) * task.batch_size]
            start = time.perf_counter()
            try:
                loss = float(training_step(run.opt, run.model, task.loss, split.train_x[idx], split.train_y[idx]))
            except ArithmeticError:
                loss = math.nan
            run.seconds += time.perf_counter() - start
            run.step += 1
            if not math.isfinite(loss):
                run.done, run.diverged = True, True
                continue
            if run.step % setup["eval_every"] == 0 or run.step == total:
                _, accuracy = evaluate(run.model, task, split.test_x, split.test_y)
                run.model.train()
                run.curve.append((run.step, run.seconds, accuracy))
                if accuracy >= setup["target"]:
                    run.done = True
                    run.reached = {"step": run.step, "epoch": run.step / steps_per_epoch, "seconds": run.seconds, "accuracy": accuracy}
    return runs


def record(run: Run) -> dict:
    return {
        "optimizer": run.optimizer,
        "hyper": run.hyper,
        "seed": run.seed,
        "reached": run.reached,
        "diverged": run.diverged,
        "steps": run.step,
        "seconds": run.seconds,
        "seconds_per_step": run.seconds / max(1, run.step),
        "final_accuracy": run.curve[-1][2] if run.curve else None,
        "curve": run.curve,
    }


def best(records: list[dict], optimizer: str) -> dict | None:
    reached = [r for r in records if r["optimizer"] == optimizer and r["reached"]]
    if reached:
        return min(reached, key=lambda r: r["reached"]["seconds"])
    mine = [r for r in records if r["optimizer"] == optimizer and r["final_accuracy"] is not None]
    return max(mine, key=lambda r: r["final_accuracy"]) if mine else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["tasks"]), figsize=(6 * len(result["tasks"]), 4.5), squeeze=False)
    axes = axes[0]
    colors = {"sgd": "tab:blue", "adamw": "tab:orange", "seng": "tab:green"}
    for ax, (task_name, task) in zip(axes, result["tasks"].items()):
        for r in task["grid"]:
            if not r["curve"]:
                continue
            steps, seconds, acc = zip(*r["curve"])
            lr = r["hyper"]["lr"]
            is_best = task["best"][r["optimizer"]] and task["best"][r["optimizer"]]["hyper"] == r["hyper"]
            ax.plot(seconds, acc, color=colors[r["optimizer"]], alpha=1.0 if is_best else 0.3,
                    linewidth=2 if is_best else 1, label=f"{r['optimizer']} lr={lr:g}" if is_best else None)
        ax.axhline(task["target"], color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(max(0.0, task["target"] - 0.3), 1.0)
        ax.set_xlabel("training seconds (steps only, 1 thread)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task_name}: time to {task['target']:.0%} (seed 0 grid; best bold)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, no reruns (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = {
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg(),
        },
        "tasks": {},
    }
    for task_name, setup in SETUPS.items():
        if args.quick and task_name != "digits":
            continue
        configs = [(name, hyper, 0) for name, grid in grids(task_name).items() for hyper in grid]
        grid_records = [record(r) for r in race(task_name, configs, setup)]
        winners = {name: best(grid_records, name) for name in grids(task_name)}
        reruns = []
        if not args.quick:
            again = [(name, w["hyper"], seed) for name, w in winners.items() if w for seed in (1, 2)]
            reruns = [record(r) for r in race(task_name, again, setup)]
        summary = {}
        for name, w in winners.items():
            runs = [w] + [r for r in reruns if r["optimizer"] == name] if w else []
            times = [r["reached"]["seconds"] for r in runs if r["reached"]]
            summary[name] = {
                "hyper": w["hyper"] if w else None,
                "reached": f"{len(times)}/{len(runs)} seeds",
                "seconds_median": statistics.median(times) if times else None,
                "seconds": times,
                "epochs": [r["reached"]["epoch"] for r in runs if r["reached"]],
                "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs) if runs else None,
            }
        result["tasks"][task_name] = {**setup, "grids": grids(task_name), "grid": grid_records, "best": winners,
                                      "reruns": reruns, "summary": summary}
    result["environment"]["load_average_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "seng_time_to_target_quick" if args.quick else "seng_time_to_target"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{name}.png")
    for task_name, task in result["tasks"].items():
        for opt, s in task["summary"].items():
            med = "n/a" if s["seconds_median"] is None else f"{s['seconds_median']:.2f} s"
            print(f"{task_name:7s} {opt:6s} {s['hyper']} reached {s['reached']}  median {med}  epochs {s['epochs']}  {1e3 * (s['seconds_per_step'] or 0):.2f} ms/step")
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
