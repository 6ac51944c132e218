"""Coarse search for each optimizer's per-task default, the same procedure for all.

``gramopt compare`` tunes every optimizer on a 3-point grid around its per-task default
(``Task.tuned`` over its own defaults). So that no optimizer's grid sits in a bad place,
the defaults themselves come from this coarse search: for each task and optimizer, the
grid knob (damping for GGN, the learning rate(s) for everyone else, as in
``gramopt.compare.config.GRIDS``) times {1/10, 1/3, 1, 3, 10} around the current default, on
one seed that the comparison does not use (seed 100), under the task's comparison
budget. The best setting (smallest time-to-target, ties by final train loss) is
reported; the maintainers copy the winners into ``Task.tuned``. Results:
``benchmarks/results/tune_defaults.json``.

    python benchmarks/tune_defaults.py --tasks teacher,diabetes --optimizers ggn,sgd,adamw
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from gramopt.compare import config
from gramopt.compare.run import time_to_target
from gramopt.tasks import get_task
from gramopt.training import OPTIMIZERS, TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "tune_defaults.json"
SCALES = (0.1, 1 / 3, 1.0, 3.0, 10.0)
SEED = 100


def settings(name: str, base: dict) -> list[dict]:
    knobs = [key for grid_point in config.GRIDS.get(name, config.LR_GRID) for key in grid_point]
    out = []
    for scale in SCALES:
        out.append({**base, **{key: base[key] * scale for key in set(knobs)}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="teacher,diabetes,digits,mnist,recall")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for task_name in args.tasks.split(","):
        task = get_task(task_name)
        target = config.TARGETS[task_name]
        budget = task.budget_seconds
        split = task.load(SEED)
        for name in args.optimizers.split(","):
            base = task.hyper[name]
            rows = []
            for hyper in settings(name, base):
                cfg = TrainConfig(
                    task=task_name, optimizer=name, epochs=100_000, seed=SEED, hyper=hyper, max_seconds=budget,
                    eval_every_seconds=budget / config.EVALUATIONS, eval_samples=task.eval_samples or 0,
                    save=False,
                )
                try:
                    result = Trainer(cfg, progress=False, verbose=False, split=split).run()
                except Exception as err:  # a setting that cannot even start is a result too
                    rows.append({"hyper": hyper, "error": f"{type(err).__name__}: {err}"})
                    continue
                reached, _ = time_to_target(result.epochs, target)
                final = result.epochs[-1]["train_loss"] if result.epochs else math.nan
                rows.append({"hyper": hyper, "time_to_target": reached, "final_train_loss": final, "diverged": result.diverged})
                print(f"{task_name:8s} {name:10s} {hyper} ttt={reached} final={final:.4g}{' diverged' if result.diverged else ''}", flush=True)
            scored = [r for r in rows if "error" not in r and not r["diverged"]]
            best = min(
                scored,
                key=lambda r: (r["time_to_target"] if r["time_to_target"] is not None else math.inf, r["final_train_loss"]),
                default=None,
            )
            results.setdefault(task_name, {})[name] = {"base": base, "rows": rows, "best": best and best["hyper"]}
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2, default=str))
            print(f"==> {task_name} {name}: best {best and best['hyper']}", flush=True)


if __name__ == "__main__":
    main()
