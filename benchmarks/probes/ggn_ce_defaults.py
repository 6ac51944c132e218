"""Probe: which lr, damping and output curvature GGN uses by default for cross-entropy.

Conclusion (benchmarks/notes.md, "GGN cross-entropy curvature and defaults";
``benchmarks/results/ggn_ce_defaults.json``, 2 seeds, ``gramopt compare``'s runs): lr 0.3,
damping 10 and ``curvature="top"`` (s = 3). At damping 3 "top" diverged on digits (seed 0)
and stalled at 11% test accuracy on mnist (both seeds), "exact" diverged on mnist (seed 0);
at damping 10 "top" trained digits, mnist and recall in every seed and reached mnist's
0.93 / 0.95 rungs in 1.9-2.6 s / 3.8-6.0 s, the fastest of the settings tried ("exact":
0.93 in 3.9-7.9 s at lr 0.1, damping 3; "sampled" s = 1: 4.9-7.1 s at lr 0.1, damping 10).

Part 1 (``curvatures``): on the classification tasks digits, mnist and recall, GGN at the
constructor's defaults (lr, damping from ``DEFAULT_HYPER["cross_entropy"]``, the default
``AdaptiveDamping``) with ``curvature="exact"``, ``"top"`` (s = 3) and ``"sampled"``
(s = 1): the optimizer-clock seconds to the first and second rungs of the task's ladder
(``gramopt.compare.config.LADDERS``), per seed, trained exactly as ``gramopt compare``
trains a setting (``gramopt.compare.run.run_one``: the task's data less a validation
set, the task's batch size, the budget of ``BUDGET_SECONDS`` below, 40 evaluations).

Part 1b (``sweep TASK...``): lr x damping (:data:`SWEEP`) per curvature on a task, to
find defaults that reach the rungs without diverging; ``--candidates``: only the settings
of :data:`CANDIDATES`.

Part 2 (``defaults``): every classification and regression task with the constructor's
defaults only (no lr, damping or curvature given; the task's own GGN hyper-parameters
overridden by None), a short run each: does any diverge?

Writes ggn_ce_defaults.json (each part rewrites its own key). ``--quick`` runs every part
on digits (and teacher), one seed, a fraction of a second per run.

    PYTHONPATH=src python benchmarks/probes/ggn_ce_defaults.py curvatures
    PYTHONPATH=src python benchmarks/probes/ggn_ce_defaults.py defaults
    PYTHONPATH=src python benchmarks/probes/ggn_ce_defaults.py sweep digits   # lr x damping per curvature
    PYTHONPATH=src python benchmarks/probes/ggn_ce_defaults.py sweep --candidates mnist recall
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

import gramopt.optim.ggn.optimizer as ggn_module
from gramopt.compare.config import LADDERS
from gramopt.compare.run import Budget, run_one, to_target_spread
from gramopt.tasks import get_task, with_validation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import arguments, environment, write_json  # noqa: E402

SEEDS = (0, 1)
CURVATURES = {
    "exact": dict(curvature="exact"),
    "top3": dict(curvature="top", samples=3),
    "sampled1": dict(curvature="sampled", samples=1),
}
BUDGET_SECONDS = {"digits": 3.0, "mnist": 15.0, "recall": 15.0}
CHECK_SECONDS = {
    "digits": 3.0,
    "mnist": 10.0,
    "recall": 10.0,
    "fashion-mnist": 20.0,
    "charlm": 20.0,
    "teacher": 3.0,
    "diabetes": 2.0,
}


def run(task_name: str, hyper: dict[str, Any], seed: int, seconds: float) -> dict[str, Any]:
    """One ``gramopt compare`` run of GGN; the record's summary (no history)."""
    task = get_task(task_name)
    split = with_validation(task.load(seed), seed)
    console = Console(quiet=True)
    with Progress(console=console, disable=True) as progress:
        record = run_one(task, "ggn", hyper, split, seed, Budget(seconds, None), console, progress)
    history = record.get("history", [])
    best = max((r.get(task.metric, float("nan")) for r in history), default=None) if task.loss != "mse" else None
    return {
        "seed": seed,
        "status": record["status"],
        "reason": record["reason"][:200],
        "steps": record.get("steps"),
        "seconds": record.get("seconds"),
        "time_to_rungs": record.get("time_to_rungs"),
        "epochs_to_rungs": record.get("epochs_to_rungs"),
        "final_train_loss": record.get("final_train_loss"),
        "final_metric": record.get("final_metric"),
        "best_metric": best,
        "median_step_seconds": record.get("median_step_seconds"),
    }


def median_or_none(values: list[float | None]) -> float | None:
    """The median over seeds, a seed that missed counting as infinitely slow (None: not reached in the median)."""
    return to_target_spread(values)["median_with_misses"]


def curvatures(budgets: dict[str, float], seeds: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": "GGN at the constructor's cross-entropy defaults per curvature: optimizer seconds to the first and "
            "second rungs",
        "defaults": dict(ggn_module.DEFAULT_HYPER["cross_entropy"]),
        "seeds": list(seeds),
        "tasks": {},
    }
    for task_name, seconds in budgets.items():
        rungs = [r.describe() for r in LADDERS[task_name][:2]]
        entry: dict[str, Any] = {"rungs": rungs, "budget_seconds": seconds, "curvatures": {}}
        for label, options in CURVATURES.items():
            runs = []
            for seed in seeds:
                started = time.perf_counter()
                hyper = {"lr": None, "damping": None, **options}
                record = run(task_name, hyper, seed, seconds)
                runs.append(record)
                print(
                    f"{task_name:8s} {label:9s} seed {seed}: {record['status']:8s} rungs {record['time_to_rungs'][:2]} "
                    f"final {record['final_metric']} best {record['best_metric']} ({time.perf_counter() - started:.0f} "
                    "s wall)",
                    flush=True,
                )
            entry["curvatures"][label] = {
                "runs": runs,
                "median_seconds_to_rungs": [median_or_none([r["time_to_rungs"][i] for r in runs]) for i in range(2)],
                "reached_all_seeds": [all(r["time_to_rungs"][i] is not None for r in runs) for i in range(2)],
            }
        out["tasks"][task_name] = entry
    return out


SWEEP = {"lr": (0.1, 0.3), "damping": (3.0, 10.0, 30.0)}
#: The settings tried on the larger tasks (``sweep --candidates TASK...``): those the digits
#: sweep left standing (no divergence, highest accuracy) per curvature.
CANDIDATES = (
    ("exact", 0.1, 3.0),
    ("top3", 0.1, 3.0),
    ("top3", 0.3, 10.0),
    ("sampled1", 0.1, 10.0),
    ("sampled1", 0.3, 30.0),
)


def sweep_settings(candidates: bool) -> list[tuple[str, float, float]]:
    if candidates:
        return list(CANDIDATES)
    return [(label, lr, damping) for label in CURVATURES for lr in SWEEP["lr"] for damping in SWEEP["damping"]]


def sweep(
    tasks: tuple[str, ...], candidates: bool, budgets: dict[str, float], seeds: tuple[int, ...]
) -> dict[str, Any]:
    """lr x damping per curvature (the defaults of part 1 diverged for top and sampled)."""
    out: dict[str, Any] = {
        "what": "GGN lr x damping per curvature, seconds to the first two rungs",
        "seeds": list(seeds),
        "tasks": {},
    }
    for task_name in tasks:
        seconds = budgets[task_name]
        entry: dict[str, Any] = {
            "rungs": [r.describe() for r in LADDERS[task_name][:2]],
            "budget_seconds": seconds,
            "settings": [],
        }
        for label, lr, damping in sweep_settings(candidates):
            options = CURVATURES[label]
            runs = [run(task_name, {"lr": lr, "damping": damping, **options}, seed, seconds) for seed in seeds]
            medians = [median_or_none([r["time_to_rungs"][i] for r in runs]) for i in range(2)]
            statuses = [r["status"] for r in runs]
            entry["settings"].append(
                {"curvature": label, "lr": lr, "damping": damping, "runs": runs, "median_seconds_to_rungs": medians}
            )
            per_seed = [r["time_to_rungs"][:2] for r in runs]
            best = [r["best_metric"] for r in runs]
            print(
                f"{task_name:8s} {label:9s} lr {lr:<4g} damping {damping:<4g}: {statuses} rungs per seed {per_seed} "
                f"best {best}",
                flush=True,
            )
        out["tasks"][task_name] = entry
    return out


def defaults(budgets: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "what": "GGN with the constructor's defaults only (lr, damping, curvature None) on every task, "
        "a short run each",
        "default_curvature": dict(ggn_module.DEFAULT_CURVATURE),
        "default_hyper": {k: dict(v) for k, v in ggn_module.DEFAULT_HYPER.items()},
        "tasks": {},
    }
    for task_name, seconds in budgets.items():
        record = run(task_name, {"lr": None, "damping": None, "curvature": None, "samples": None}, 0, seconds)
        record["budget_seconds"] = seconds
        out["tasks"][task_name] = record
        print(
            f"{task_name:14s} {record['status']:8s} final loss {record['final_train_loss']} metric "
            f"{record['final_metric']} "
            f"rungs {record['time_to_rungs']} {record['reason'][:80]}",
            flush=True,
        )
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("part", nargs="?", choices=("curvatures", "sweep", "defaults"), default=None)
    parser.add_argument("tasks", nargs="*", help="sweep: the tasks (default digits)")
    parser.add_argument("--candidates", action="store_true", help="sweep: only the CANDIDATES settings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.out / "ggn_ce_defaults.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if args.quick:  # every part on digits (defaults: and teacher), one seed, 0.2 s per run
        budgets, seeds = {"digits": 0.2}, (0,)
        parts = {
            "curvatures": lambda: curvatures(budgets, seeds),
            "sweep": lambda: sweep(("digits",), True, budgets, seeds),
            "defaults": lambda: defaults({"digits": 0.2, "teacher": 0.2}),
        }
    else:
        part = args.part or "curvatures"
        parts = {
            "curvatures": lambda: curvatures(BUDGET_SECONDS, SEEDS),
            "sweep": lambda: sweep(tuple(args.tasks) or ("digits",), args.candidates, BUDGET_SECONDS, SEEDS),
            "defaults": lambda: defaults(CHECK_SECONDS),
        }
        parts = {part: parts[part]}
    for part, compute in parts.items():
        result = compute()
        if part == "sweep":
            record.setdefault("sweep", {"what": result["what"], "seeds": result["seeds"], "tasks": {}})["tasks"].update(
                result["tasks"]
            )
        else:
            record[part] = result
    record["environment"] = environment()
    write_json(record, path)


if __name__ == "__main__":
    main()
