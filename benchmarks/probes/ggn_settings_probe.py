"""Probe: can GGN catch SGD-momentum on classification with another setting? No setting did.

Conclusion (benchmarks/notes.md, "can GGN catch SGD-momentum on a second classification
task?" and "last probes of GGN against SGD-momentum"; ``benchmarks/results/
ggn_settings_probe*.json``, one file per ``--tag``): on digits no GGN setting beat
SGD-momentum, and heavy-ball momentum made GGN's cross-entropy step unstable; on mnist
"top" s = 3 stays the default (s = 2 was not faster) and lr 0.5 beat lr 0.3 in 6 of 6
seeds but SGD-momentum in only 3, so the defaults stayed; on the recall Transformer
"sampled" s = 1 reached the rungs sooner than "top" (a "top" step there costs ~8x SGD's),
so recall's grid centre is "sampled" (``gramopt/tasks/sequence.py``), while on the CNN and
the MLPs "top" was ahead.

What it runs: settings trained exactly as ``gramopt compare`` trains a setting
(``gramopt.compare.run.run_one``: the task's data less its validation set, the task's batch
size, a time budget, 40 evaluations), interleaved per seed in one process: by default
SGD-momentum's digits winner and GGN with heavy-ball momentum, larger learning rates, less
damping and s = 2 columns; ``--settings`` takes others. Records the validation and test
seconds to each rung.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/probes/ggn_settings_probe.py \\
        [--task digits --seconds 3 --seeds 3]
    # other settings: a JSON list of [optimizer, hyper-parameters] pairs
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/probes/ggn_settings_probe.py \\
        --task mnist --seconds 15 --tag mnist \\
        --settings '[["sgd", {"lr": 0.05, "momentum": 0.9}], ["ggn", {"samples": 2}]]'
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

from gramopt.compare.config import LADDERS
from gramopt.compare.run import Budget, run_one, to_target_spread
from gramopt.tasks import get_task, with_validation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import arguments, environment, write_json  # noqa: E402

#: (optimizer, hyper-parameters): SGD-momentum's digits winner, then GGN variants.
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sgd", {"lr": 0.3, "momentum": 0.9}),
    ("ggn", {"lr": 0.3, "damping": 10.0, "momentum": 0.0}),
    ("ggn", {"lr": 0.3, "damping": 10.0, "momentum": 0.5}),
    ("ggn", {"lr": 0.3, "damping": 10.0, "momentum": 0.9}),
    ("ggn", {"lr": 0.3, "damping": 30.0, "momentum": 0.9}),
    ("ggn", {"lr": 0.1, "damping": 10.0, "momentum": 0.9}),
    ("ggn", {"lr": 0.6, "damping": 10.0}),
    ("ggn", {"lr": 1.0, "damping": 10.0}),
    ("ggn", {"lr": 1.0, "damping": 30.0}),
    ("ggn", {"lr": 0.3, "damping": 3.0}),
    ("ggn", {"lr": 0.3, "damping": 10.0, "curvature": "top", "samples": 2}),
)


def median_seconds(values: list[float | None]) -> float | None:
    """Median over seeds, a seed that missed counting as infinitely slow (None: the median missed)."""
    return to_target_spread(values)["median_with_misses"]


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--seconds", type=float, default=3.0, help="optimizer-clock budget per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed ... first-seed + seeds - 1")
    parser.add_argument("--settings", type=json.loads, default=None, help="JSON list of [optimizer, hyper] pairs")
    parser.add_argument("--tag", default="", help="results/ggn_settings_probe_TAG.json")
    args = parser.parse_args()
    settings = SETTINGS if args.settings is None else tuple((name, dict(hyper)) for name, hyper in args.settings)
    if args.quick:  # the first two settings, one seed, 0.2 s each
        settings, args.seeds, args.seconds = settings[:2], 1, 0.2
    results = args.out / (f"ggn_settings_probe_{args.tag}.json" if args.tag else "ggn_settings_probe.json")
    torch.set_num_threads(1)
    task = get_task(args.task)
    console = Console(quiet=True)
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(settings))}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        split = with_validation(task.load(seed), seed)
        for i, (name, hyper) in enumerate(settings):  # settings interleaved within a seed
            with Progress(console=console, disable=True) as progress:
                record = run_one(task, name, dict(hyper), split, seed, Budget(args.seconds, None), console, progress)
            summary = {
                "seed": seed,
                "status": record["status"],
                "reason": record["reason"][:200],
                "val_seconds_to_rungs": record.get("val_time_to_rungs"),
                "test_seconds_to_rungs": record.get("time_to_rungs"),
                "final_metric": record.get("final_metric"),
                "final_train_loss": record.get("final_train_loss"),
                "median_step_seconds": record.get("median_step_seconds"),
            }
            runs[i].append(summary)
            print(
                f"seed {seed} {name} {hyper}: {summary['status']} val {summary['val_seconds_to_rungs']} test "
                f"{summary['test_seconds_to_rungs']}",
                flush=True,
            )
    rungs = LADDERS[args.task]
    out = {
        "what": "SGD-momentum's winning setting and GGN variants, trained as gramopt compare trains a setting",
        "task": args.task,
        "rungs": [r.describe() for r in rungs],
        "budget_seconds": args.seconds,
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": [
            {
                "optimizer": name,
                "hyper": hyper,
                "diverged": sum(r["status"] != "ok" for r in runs[i]),
                "median_val_seconds_to_rungs": [
                    median_seconds([r["val_seconds_to_rungs"][j] for r in runs[i]]) for j in range(len(rungs))
                ],
                "median_test_seconds_to_rungs": [
                    median_seconds([r["test_seconds_to_rungs"][j] for r in runs[i]]) for j in range(len(rungs))
                ],
                "runs": runs[i],
            }
            for i, (name, hyper) in enumerate(settings)
        ],
    }
    write_json(out, results)


if __name__ == "__main__":
    main()
