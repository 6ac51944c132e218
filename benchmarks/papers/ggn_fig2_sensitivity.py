"""GGN Fig. 2b/c: learning rate x damping sensitivity (Cai et al., Section 4.2, Fig. 2b-c).

The paper trains with the update -J^T (lambda G + alpha I)^{-1} (f - y) for a grid of
lambda (x axis) and alpha (y axis) and reports the training loss at the 10th epoch (Fig. 2c)
and some training curves (Fig. 2b, with the best alpha for lambda = 0.25 and 4). Its claims:
the model converges fastest when lambda is close to 1, and given lambda = 1 the training
loss is not sensitive to alpha.

Ours: the teacher task of ``gramopt.tasks`` (2048 unit-norm inputs, d = 16, MLP 16-256-256-1,
batch 128, mse), ``gramopt.GGN`` with lr = 1/lambda and damping = alpha/lambda (the same
update), lambda in {0.25, 0.5, 1, 2, 4} x alpha in {0.01, 0.03, 0.1, 0.3, 1, 3}, 10 epochs,
training loss on the full training set after every epoch.

    PYTHONPATH=src python benchmarks/papers/ggn_fig2_sensitivity.py [--quick]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import gramopt
from common import PAPERS, load_split, parse_args, train_task, write
from gramopt.tasks import Split, get_task

LAMBDAS = [0.25, 0.5, 1.0, 2.0, 4.0]
ALPHAS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def run(task, split: Split, lam: float, alpha: float, epochs: int, seeds: list[int]) -> dict[str, Any]:
    """One grid point: the median over seeds of the train loss per epoch (inf once diverged)."""
    curves, start = [], time.perf_counter()
    for seed in seeds:
        model = task.build_model(seed)
        opt = gramopt.GGN(model, lr=1.0 / lam, damping=alpha / lam, loss="mse")
        records = train_task(model, opt, task, split, epochs, seed)
        opt.close()
        curve = [r.get("train_loss", float("inf")) for r in records]
        curves.append(curve + [float("inf")] * (epochs - len(curve)))
    median = [statistics.median(c[e] for c in curves) for e in range(epochs)]
    return {
        "lambda": lam,
        "alpha": alpha,
        "final_train_loss": median[-1],
        "curve": median,
        "curves": curves,
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    task = get_task("teacher")
    split = load_split(task.name, args.seed)
    lambdas, alphas, epochs, seeds = LAMBDAS, ALPHAS, 10, [args.seed, args.seed + 1]
    if args.quick:
        lambdas, alphas, epochs, seeds = [0.5, 1.0, 2.0], [0.1, 1.0], 1, [args.seed]
        split = Split(split.train_x[:128], split.train_y[:128], split.test_x[:64], split.test_y[:64])
    runs = [run(task, split, lam, alpha, epochs, seeds) for lam in lambdas for alpha in alphas]
    best_by_lambda = {}
    for lam in lambdas:
        row = [r for r in runs if r["lambda"] == lam]
        best = min(row, key=lambda r: r["final_train_loss"])
        best_by_lambda[str(lam)] = {"alpha": best["alpha"], "train_loss": best["final_train_loss"]}
    best_lambda = min(lambdas, key=lambda lam: best_by_lambda[str(lam)]["train_loss"])
    at_one = sorted((r for r in runs if r["lambda"] == 1.0), key=lambda r: r["alpha"])
    best_at_one = min(r["final_train_loss"] for r in at_one)
    within_2x = [r["alpha"] for r in at_one if r["final_train_loss"] <= 2.0 * best_at_one]
    decades_within_2x = math.log10(max(within_2x) / min(within_2x)) if within_2x else 0.0
    fastest_near_one = best_lambda in (0.5, 1.0, 2.0)
    insensitive = decades_within_2x >= 1.0
    payload = {
        "study": "GGN Fig. 2b/c: learning rate x damping sensitivity on the teacher task",
        "paper": PAPERS["ggn"],
        "claim": "training loss at epoch 10 is lowest for lambda (= 1/lr) close to 1, and at lambda = 1 not sensitive "
            "to alpha (= damping/lr) (Section 4.2, Fig. 2b-c)",
        "settings": {
            "task": "teacher",
            "lambdas": lambdas,
            "alphas": alphas,
            "epochs": epochs,
            "batch_size": task.batch_size,
            "seeds": seeds,
            "statistic": "median over seeds",
            "lr": "1/lambda",
            "damping": "alpha/lambda",
        },
        "runs": runs,
        "best_alpha_by_lambda": best_by_lambda,
        "best_lambda": best_lambda,
        "best_at_lambda_1_over_best_overall": best_by_lambda["1.0"]["train_loss"]
        / best_by_lambda[str(best_lambda)]["train_loss"],
        "alphas_within_2x_of_best_at_lambda_1": within_2x,
        "decades_of_alpha_within_2x_at_lambda_1": decades_within_2x,
        "held_fastest_near_lambda_1": fastest_near_one,
        "held_insensitive_to_alpha_at_lambda_1": insensitive,
        "held": fastest_near_one and insensitive,
        "held_criterion": "the best lambda (min over alpha) is in [0.5, 2], and at lambda = 1 the alphas within 2x of "
            "the best loss span at least one decade",
    }
    return write(args.out, "ggn_fig2_sensitivity", payload, _figure(runs, lambdas, alphas, best_by_lambda))


def _figure(runs, lambdas, alphas, best_by_lambda):
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    grid = np.array(
        [
            [next(r["final_train_loss"] for r in runs if r["lambda"] == lam and r["alpha"] == a) for lam in lambdas]
            for a in alphas
        ]
    )
    image = right.imshow(np.log10(np.clip(grid, 1e-12, 1e6)), origin="lower", cmap="gray", aspect="auto")
    right.set_xticks(range(len(lambdas)), [str(v) for v in lambdas])
    right.set_yticks(range(len(alphas)), [str(v) for v in alphas])
    for i in range(len(alphas)):
        for j in range(len(lambdas)):
            right.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", color="red", fontsize=7)
    right.set(
        xlabel="lambda (= 1 / lr)",
        ylabel="alpha (= damping / lr)",
        title="Fig. 2c analog: train loss at the last epoch (log10; lighter = higher)",
    )
    fig.colorbar(image, ax=right)
    for lam in lambdas:
        alpha = best_by_lambda[str(lam)]["alpha"]
        r = next(r for r in runs if r["lambda"] == lam and r["alpha"] == alpha)
        left.semilogy(range(1, len(r["curve"]) + 1), r["curve"], "o-", label=f"lambda={lam}, best alpha={alpha}")
    for r in runs:
        if r["lambda"] == 1.0 and r["alpha"] != best_by_lambda["1.0"]["alpha"]:
            left.semilogy(range(1, len(r["curve"]) + 1), r["curve"], ":", color="gray", alpha=0.7)
    left.set_ylim(top=100.0)  # diverging runs (lambda = 0.25) leave the plot
    left.set(xlabel="epoch", ylabel="train loss", title="Fig. 2b analog (dotted: lambda=1, other alphas)")
    left.legend(fontsize=7)
    return fig


if __name__ == "__main__":
    main(sys.argv[1:])
