"""FNGD Table V analog: test accuracy against the damping alpha of Eq. (14)
(Ou et al., Section VI-E, Table V).

The paper (ResNet-18 on CIFAR-100): alpha in {0.01, 0.008, 0.005, 0.003, 0.001} gives
77.24, 77.09, 77.56, 77.34, 76.86% (range 0.70 points, mean 77.22%); "FNGD is less likely to
require tedious fine-tuning to achieve high accuracy".

Ours: the ``mnist`` task of ``gramopt.tasks`` (4,000 training images, small CNN, batch 128),
``gramopt.FNGD`` at the task's lr 0.3 and momentum 0.9 with the relative damping of Eq. (14)
(gramopt's mode) at the paper's five values, sharing after one epoch of estimation (the
paper's FNGD), 8 epochs with the paper's schedule (lr x0.1 at 50% and 75%), 2 seeds. For
scale, the same protocol with SGD-momentum across its learning rate over the same 10x span
(0.01 to 0.1; the paper compares against K-FAC's damping, which gramopt does not have).

    PYTHONPATH=src python benchmarks/papers/fngd_table5_damping.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

import gramopt
from common import (
    PAPERS,
    load_split,
    parse_args,
    random_images,
    steps_per_epoch,
    train_epoch,
    write,
)
from gramopt.tasks import Split, get_task
from gramopt.training.registry import task_hyper

DAMPINGS = [0.01, 0.008, 0.005, 0.003, 0.001]
SMALLER_LR = 0.1  # a third of the task's FNGD lr
COLLAPSED = 0.2  # a final accuracy below this is a collapsed run (chance is 0.1)
PAPER = {0.01: 0.7724, 0.008: 0.7709, 0.005: 0.7756, 0.003: 0.7734, 0.001: 0.7686}


def train(task, split: Split, build, epochs: int, seed: int) -> float:
    model = task.build_model(seed)
    opt = build(model)
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2, (3 * epochs) // 4], gamma=0.1)
    records = []
    for epoch in range(epochs):
        records.append(train_epoch(model, opt, task, split, epoch, seed))
        schedule.step()
        if records[-1].get("diverged"):
            break
    if hasattr(opt, "close"):
        opt.close()
    return records[-1].get("test_accuracy", 0.0)


def sweep(
    task, split: Split, lr: float, momentum: float, dampings: list[float], share: int, epochs: int, seeds: list[int]
) -> dict[str, Any]:
    """damping -> final test accuracies over seeds, their mean, and how many collapsed."""
    out = {}
    for damping in dampings:
        build = lambda m, d=damping: gramopt.FNGD(  # noqa: E731
            m, lr=lr, damping=d, momentum=momentum, coefficient_steps=share, loss=task.loss
        )
        accuracies = [train(task, split, build, epochs, seed) for seed in seeds]
        out[str(damping)] = {
            "accuracies": accuracies,
            "mean": statistics.fmean(accuracies),
            "collapsed": sum(a < COLLAPSED for a in accuracies),
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    task = get_task("mnist")
    epochs, seeds, dampings = 8, [args.seed, args.seed + 1], DAMPINGS
    if args.quick:
        epochs, seeds, dampings = 1, [args.seed], DAMPINGS[:2]
        split = random_images(128, 64, args.seed)
    else:
        split = load_split(task.name, args.seed)
    hyper = task_hyper(task, "fngd")
    share = steps_per_epoch(split, task.batch_size)
    sweeps = {
        str(lr): sweep(task, split, lr, hyper["momentum"], dampings, share, epochs, seeds)
        for lr in (hyper["lr"], SMALLER_LR)
    }
    ranges = {
        lr: 100 * (max(v["mean"] for v in s.values()) - min(v["mean"] for v in s.values())) for lr, s in sweeps.items()
    }
    fngd = sweeps[str(hyper["lr"])]
    payload = {
        "study": "FNGD Table V analog: damping insensitivity",
        "paper": PAPERS["fngd"],
        "claim": "accuracy varies little with alpha in [0.001, 0.01]: 76.86-77.56% (range 0.70 points) on "
            "ResNet-18/CIFAR-100, other hyper-parameters fixed (Table V)",
        "paper_accuracies": {str(k): v for k, v in PAPER.items()},
        "settings": {
            "task": "mnist",
            "epochs": epochs,
            "seeds": seeds,
            "schedule": "lr x0.1 at 50% and 75% of the epochs",
            "lrs": [hyper["lr"], SMALLER_LR],
            "momentum": hyper["momentum"],
            "damping_mode": "relative (Eq. 14)",
            "coefficient_steps": share,
            "collapsed_below_accuracy": COLLAPSED,
        },
        "fngd": fngd,
        "fngd_range_points": ranges[str(hyper["lr"])],
        "fngd_mean": statistics.fmean(v["mean"] for v in fngd.values()),
        "sweeps_by_lr": sweeps,
        "range_points_by_lr": ranges,
        "held": ranges[str(hyper["lr"])] <= 1.0,
        "held_at_smaller_lr": ranges[str(SMALLER_LR)] <= 1.0,
        "held_criterion": "at the task's FNGD lr, the range of the mean final test accuracy over the five alphas is at "
            "most 1 point (the paper: 0.70)",
    }
    return write(args.out, "fngd_table5_damping", payload, _figure(sweeps))


def _figure(sweeps):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for i, (lr, sweep_) in enumerate(sweeps.items()):
        xs = [float(k) for k in sweep_]
        ax.semilogx(
            xs,
            [100 * v["mean"] for v in sweep_.values()],
            "o-",
            color=f"C{i}",
            label=f"FNGD on mnist, lr {lr} (mean of seeds)",
        )
        for k, v in sweep_.items():
            ax.scatter(
                [float(k)] * len(v["accuracies"]), [100 * a for a in v["accuracies"]], color=f"C{i}", alpha=0.4, s=12
            )
    ax.semilogx(
        list(PAPER), [100 * v for v in PAPER.values()], "s--", color="k", label="FNGD, ResNet-18/CIFAR-100 (paper)"
    )
    ax.set(xlabel="damping alpha (Eq. 14)", ylabel="final test accuracy (%)", title="Table V analog (dots: seeds)")
    ax.legend(fontsize=7)
    return fig


if __name__ == "__main__":
    main(sys.argv[1:])
