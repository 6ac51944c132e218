"""Probe: how high the fashion-mnist task's small CNN gets in 120 s. About 0.905: no 0.91 rung.

Conclusion (benchmarks/notes.md, "the comparison's top rungs";
``benchmarks/results/fashion_mnist_ceiling.json``): AdamW (lr 0.0067) peaked at test
accuracy 0.907 and SOAP (lr 0.003) at 0.908 on the 2,000-image evaluation subset, so
fashion-mnist's ladder tops out at 0.90 (``gramopt.compare.config``); the ResNet keeps 0.91.

What it runs: the two optimizers fastest to test accuracy 0.90 in the committed 60-s
comparison, seed 0, through ``gramopt.compare``'s own ``run_one`` for 120 s of optimizer
time with its 40 evaluations. Writes per optimizer a list of (seconds, test accuracy,
validation accuracy). One thread; about 6 minutes.

    PYTHONPATH=src python benchmarks/probes/fashion_mnist_ceiling.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console

from gramopt.compare.run import Budget, load_splits, run_one
from gramopt.tasks import get_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import arguments, write_json  # noqa: E402

SETTINGS = (("adamw", {"lr": 0.006666666666666666}), ("soap", {"lr": 0.003}))


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    task_name, seconds = ("digits", 0.3) if args.quick else ("fashion-mnist", 120.0)  # quick: the plumbing only
    torch.set_num_threads(1)
    task = get_task(task_name)
    split = load_splits(task, 1)[0]
    out = {}
    for name, hyper in SETTINGS:
        record = run_one(task, name, hyper, split, 0, Budget(seconds=seconds, epochs=None), Console(quiet=True), False)
        accuracies = [(round(e["seconds"], 1), e["test_accuracy"], e["val_accuracy"]) for e in record["history"]]
        out[name] = accuracies
        print(name, record["status"], "max test", max((a[1] for a in accuracies), default=None), flush=True)
    write_json(out, args.out / "fashion_mnist_ceiling.json")


if __name__ == "__main__":
    main()
