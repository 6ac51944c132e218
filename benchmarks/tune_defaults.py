"""Coarse search for each optimizer's per-task default, the same procedure for all.

``gramopt compare`` tunes every optimizer on a grid around its per-task default
(``Task.tuned``, else its own defaults for the task's loss). So that no optimizer's grid
sits in a bad place, the defaults themselves come from this coarse search: for each task
and optimizer, the knob(s) of its quick grid (``gramopt.compare.config.axes(name,
"quick")``: the damping for GGN, the learning rate(s) for everyone else) times
{1/10, 1/3, 1, 3, 10} around the current default, on one seed that the comparison does not
use (seed 100), trained as ``gramopt compare`` trains a setting (``run_one``: the task's
data less its validation set, the task's comparison budget) and picked by its rule
(``select``: the validation rungs, then the final selection loss). The maintainers copy
the winners into ``Task.tuned``. Results: ``benchmarks/results/tune_defaults.json``.

    python benchmarks/tune_defaults.py --tasks teacher,diabetes --optimizers ggn,sgd,adamw
"""

from __future__ import annotations

import json
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from bench_common import arguments, write_json
from gramopt.compare import config
from gramopt.compare.run import CompareConfig, run_one, select, task_budget
from gramopt.tasks import get_task, with_validation
from gramopt.training import OPTIMIZERS
from gramopt.training.registry import task_hyper

SCALES = (0.1, 1 / 3, 1.0, 3.0, 10.0)
SEED = 100


def settings(name: str, base: dict[str, Any], scales: tuple[float, ...] = SCALES) -> list[dict[str, Any]]:
    """``base`` with the keys of optimizer ``name``'s quick-grid axes (each axis's key and
    the keys scaled with it) times each of ``scales``."""
    knobs = {key for axis in config.axes(name, "quick") for key in (axis.key, *axis.with_keys)}
    return [{**base, **{key: base[key] * scale for key in knobs}} for scale in scales]


def tune(task_name: str, name: str, budget_seconds: float | None, scales: tuple[float, ...]) -> dict[str, Any]:
    """Every setting of :func:`settings` for one seed; the rows and the winner."""
    task = get_task(task_name)
    split = with_validation(task.load(SEED), SEED)
    budget = task_budget(CompareConfig(budget_seconds=budget_seconds), task)
    base = {**OPTIMIZERS[name].run_defaults_for(task.loss), **task_hyper(task, name)}
    console = Console(quiet=True)
    rows = []
    for hyper in settings(name, base, scales):
        with Progress(console=console, disable=True) as progress:
            record = run_one(task, name, hyper, split, SEED, budget, console, progress)
        rows.append(
            {
                "hyper": hyper,
                "status": record["status"],
                "reason": record["reason"][:200],
                "val_time_to_rungs": record.get("val_time_to_rungs"),
                "final_selection_loss": record.get("final_selection_loss"),
                "final_train_loss": record.get("final_train_loss"),
            }
        )
        rungs = record.get("val_time_to_rungs")
        print(f"{task_name:8s} {name:10s} {hyper} {record['status']} validation rungs {rungs}", flush=True)
    best = select([{"runs": [row]} for row in rows])
    return {"base": base, "budget": budget.describe(), "rows": rows, "best": rows[best]["hyper"]}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--tasks", default="teacher,diabetes,digits,mnist,recall")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()
    budget_seconds, scales = None, SCALES
    if args.quick:  # GGN and SGD on teacher, 0.2 s per run, two scales
        args.tasks, args.optimizers, budget_seconds, scales = "teacher", "ggn,sgd", 0.2, (1 / 3, 1.0)
    torch.set_num_threads(1)
    path = args.out / "tune_defaults.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for task_name in args.tasks.split(","):
        for name in args.optimizers.split(","):
            results.setdefault(task_name, {})[name] = tune(task_name, name, budget_seconds, scales)
            write_json(results, path)
            print(f"==> {task_name} {name}: best {results[task_name][name]['best']}", flush=True)


if __name__ == "__main__":
    main()
