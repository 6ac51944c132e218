"""FNGD Table IV analog: accuracy and time per epoch with and without coefficient sharing,
and with the relative damping of Eq. (14) against a constant one (Ou et al., Section VI-D,
Table IV).

The paper (ResNet-32 on CIFAR-10 / ResNet-18 on CIFAR-100, 100 epochs, batch 128): FNGD
93.10% / 77.37%; without sharing 92.75% / 77.06% at 2.0x / 2.1x the time per epoch; without
the damping rule (a constant damping 0.3 for every layer) 92.63% / 75.51%. "Coefficient-sharing
can reduce the training time by half with a small increase in accuracy"; without the damping
rule "there will be an accuracy degeneration".

Ours: the ``mnist`` task of ``gramopt.tasks`` (4,000 training images, small CNN, batch 128:
31 steps per epoch), ``gramopt.FNGD`` at the task's defaults (lr 0.3, relative damping 1e-3,
momentum 0.9), 8 epochs with the paper's schedule (lr x0.1 at 50% and 75% of the epochs),
2 seeds. Arms: FNGD (sharing after one epoch of estimation, ``coefficient_steps`` = the steps
of one epoch, as the paper), w/o sharing (``coefficient_steps=None``: a solve every step) and,
where ``gramopt.FNGD`` offers an absolute damping (detected from its signature, see
``common.ABSOLUTE_DAMPING_OPTIONS``: ``damping_mode="absolute"``), the constant-damping
arms with lambda = 0.3 with and without sharing (1/lambda folded into lr as in the relative
mode); without such an option those arms are reported as not available. The paper's "w/o
acceleration" (hooks instead of autograd on module outputs) has no counterpart: gramopt has
one implementation.

The arms are trained in turns, one epoch each per round, in one process; time per epoch is
the training steps' time, reported relative to the FNGD arm of the same round, over the epochs
after the first (where sharing differs) and over all; time is the training steps' thread CPU
time (one torch thread), less sensitive than wall time to other processes.

    PYTHONPATH=src python benchmarks/papers/fngd_table4_ablation.py [--quick]
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
    fngd_absolute_damping,
    load_split,
    parse_args,
    random_images,
    steps_per_epoch,
    train_epoch,
    write,
)
from gramopt.tasks import Split, get_task
from gramopt.training.registry import task_hyper

CONSTANT_DAMPING = 0.3  # the paper's "w/o damping" value


def arms(task, split: Split, absolute: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """name -> FNGD keyword arguments."""
    hyper = dict(task_hyper(task, "fngd"))
    share = steps_per_epoch(split, task.batch_size)
    out = {
        "FNGD (sharing, relative damping)": dict(hyper, coefficient_steps=share),
        "w/o sharing (relative damping)": dict(hyper, coefficient_steps=None),
    }
    if absolute is not None:
        out["w/o damping rule (sharing, constant 0.3)"] = dict(
            hyper, damping=CONSTANT_DAMPING, coefficient_steps=share, **absolute
        )
        out["w/o sharing, constant 0.3"] = dict(hyper, damping=CONSTANT_DAMPING, coefficient_steps=None, **absolute)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    task = get_task("mnist")
    epochs, seeds = 8, 2
    if args.quick:
        epochs, seeds = 2, 1
        split = random_images(256, 128, args.seed)
    else:
        split = load_split(task.name, args.seed)
    absolute = fngd_absolute_damping()
    settings = arms(task, split, absolute)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for s in range(seeds):
        seed = args.seed + s
        live = {}
        for name, kwargs in settings.items():
            model = task.build_model(seed)
            opt = gramopt.FNGD(model, loss=task.loss, **kwargs)
            schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2, (3 * epochs) // 4], gamma=0.1)
            live[name] = (model, opt, schedule, [])
        for epoch in range(epochs):
            for model, opt, schedule, records in live.values():
                records.append(train_epoch(model, opt, task, split, epoch, seed))
                schedule.step()
        reference = live["FNGD (sharing, relative damping)"][3]
        for name, (_, opt, _, records) in live.items():
            opt.close()
            ratios = [
                r["cpu_seconds"] / ref["cpu_seconds"]
                for r, ref in zip(records, reference, strict=True)
                if "cpu_seconds" in r and "cpu_seconds" in ref
            ]
            runs[name].append(
                {
                    "seed": seed,
                    "records": records,
                    "time_ratio_per_epoch": ratios,
                    "final_test_accuracy": records[-1].get("test_accuracy", float("nan")),
                }
            )
    summary = {}
    for name, mine in runs.items():
        after_first = [x for r in mine for x in r["time_ratio_per_epoch"][1:]] or [
            x for r in mine for x in r["time_ratio_per_epoch"]
        ]
        summary[name] = {
            "final_test_accuracy": [r["final_test_accuracy"] for r in mine],
            "mean_final_test_accuracy": statistics.fmean(r["final_test_accuracy"] for r in mine),
            "time_per_epoch_ratio_after_first_epoch": statistics.median(after_first),
            "time_per_epoch_ratio_all_epochs": statistics.median(x for r in mine for x in r["time_ratio_per_epoch"]),
        }
    fngd, plain = summary["FNGD (sharing, relative damping)"], summary["w/o sharing (relative damping)"]
    sharing_faster = plain["time_per_epoch_ratio_after_first_epoch"] >= 1.8  # the paper: 2.0-2.1x
    sharing_accuracy_kept = fngd["mean_final_test_accuracy"] >= plain["mean_final_test_accuracy"] - 0.005
    constant = summary.get("w/o damping rule (sharing, constant 0.3)")
    damping_rule_helps = (
        None if constant is None else constant["mean_final_test_accuracy"] < fngd["mean_final_test_accuracy"]
    )
    payload = {
        "study": "FNGD Table IV analog: sharing and damping-rule ablation",
        "paper": PAPERS["fngd"],
        "claim": "coefficient sharing halves the time per epoch (w/o sharing 2.0-2.1x) with equal or slightly better "
            "accuracy; a constant damping 0.3 instead of Eq. (14) loses accuracy (Table IV)",
        "settings": {
            "task": "mnist",
            "epochs": epochs,
            "seeds": seeds,
            "schedule": "lr x0.1 at 50% and 75% of the epochs",
            "hyper": task_hyper(task, "fngd"),
            "coefficient_steps": steps_per_epoch(split, task.batch_size),
            "constant_damping": CONSTANT_DAMPING,
        },
        "absolute_damping_option": absolute,
        "constant_damping_arms": "run"
        if absolute is not None
        else "not available: gramopt.FNGD has no absolute damping mode yet (the study runs these arms once it has one)",
        "summary": summary,
        "runs": runs,
        "held_sharing_saves_time": sharing_faster,
        "held_sharing_keeps_accuracy": sharing_accuracy_kept,
        "held_damping_rule_helps": damping_rule_helps,
        "held": sharing_faster and sharing_accuracy_kept and damping_rule_helps is not False,
        "held_criterion": "w/o sharing costs at least 1.8x FNGD's time per epoch after the first epoch (the paper: "
            "2.0-2.1x, 'by half'), FNGD's mean final accuracy at most 0.5 points below w/o sharing's, and (when run) "
            "constant damping below FNGD's accuracy",
    }
    return write(args.out, "fngd_table4_ablation", payload, _figure(runs, summary))


def _figure(runs, summary):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for i, (name, mine) in enumerate(runs.items()):
        for j, r in enumerate(mine):
            acc = [rec.get("test_accuracy", float("nan")) for rec in r["records"]]
            left.plot(
                range(1, len(acc) + 1), acc, "-o" if j == 0 else ":", color=f"C{i}", label=name if j == 0 else None
            )
    left.set(xlabel="epoch", ylabel="test accuracy", title="FNGD ablation on mnist (CNN)")
    left.legend(fontsize=7)
    names = list(summary)
    right.bar(
        range(len(names)),
        [summary[n]["time_per_epoch_ratio_after_first_epoch"] for n in names],
        color=[f"C{i}" for i in range(len(names))],
    )
    for i, n in enumerate(names):
        right.text(
            i,
            summary[n]["time_per_epoch_ratio_after_first_epoch"],
            f"acc {summary[n]['mean_final_test_accuracy']:.4f}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    right.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    right.set(ylabel="time per epoch / FNGD (epochs 2+)", title="Table IV analog")
    return fig


if __name__ == "__main__":
    main(sys.argv[1:])
