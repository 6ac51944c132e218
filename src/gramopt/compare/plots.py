"""``curves.png``: train loss and the test metric against optimizer seconds and epochs.

One row per task, four panels: train loss and test metric against the optimizer clock,
then against epochs. One line per optimizer (its winning setting): the median over
seeds, with a band from the seeds' minimum to maximum. A seed's curve is a step
function of its evaluations (the last value at or before x) and stops where its run
stopped. Losses and the test MSE are drawn on a log scale, accuracies linearly; the
target is a dashed line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

POINTS = 200


def _on_grid(histories: list[list[dict[str, float]]], x_key: str, y_key: str, grid: np.ndarray) -> np.ndarray:
    """[seeds, points]: each seed's last value at or before each grid point (NaN after its run)."""
    out = np.full((len(histories), grid.size), np.nan)
    for i, history in enumerate(histories):
        if not history:
            continue
        xs = np.array([r[x_key] for r in history], dtype=float)
        ys = np.array([r.get(y_key, np.nan) for r in history], dtype=float)
        ys[~np.isfinite(ys)] = np.nan
        index = np.searchsorted(xs, grid, side="right") - 1
        inside = (index >= 0) & (grid <= xs[-1])
        out[i, inside] = ys[index[inside]]
    return out


def _panel(ax: Any, task: dict[str, Any], x_key: str, y_key: str, log_y: bool) -> None:
    curves = []
    for name, method in task["optimizers"].items():
        histories = [run["history"] for run in method["settings"][method["winner"]]["runs"]]
        end = max((h[-1][x_key] for h in histories if h), default=0.0)
        if end > 0:
            curves.append((name, histories, end))
    end = max((c[2] for c in curves), default=1.0)
    grid = np.linspace(0.0, end, POINTS)
    for name, histories, _ in curves:
        values = _on_grid(histories, x_key, y_key, grid)
        seen = ~np.all(np.isnan(values), axis=0)
        if not seen.any():
            continue
        median = np.full(grid.size, np.nan)
        low, high = median.copy(), median.copy()
        median[seen] = np.nanmedian(values[:, seen], axis=0)
        low[seen], high[seen] = np.nanmin(values[:, seen], axis=0), np.nanmax(values[:, seen], axis=0)
        (line,) = ax.plot(grid, median, label=name, linewidth=1.4)
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    target = task.get("target")
    if target and target["metric"] == y_key:
        ax.axhline(target["value"], color="black", linestyle="--", linewidth=0.8, label="target")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer seconds" if x_key == "seconds" else "epochs")
    ax.set_ylabel(y_key.replace("_", " "))
    ax.set_title(f"{task['task']['name']}: {y_key.replace('_', ' ')}", fontsize=9)
    ax.grid(alpha=0.3)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Write the figure for every task in ``results`` to ``path`` (PNG)."""
    tasks = list(results["tasks"].values())
    fig, axes = plt.subplots(len(tasks), 4, figsize=(18, 3.8 * len(tasks)), squeeze=False, layout="constrained")
    for row, task in zip(axes, tasks):
        metric = task["task"]["metric"]
        metric_log = task["task"]["loss"] == "mse"
        _panel(row[0], task, "seconds", "train_loss", True)
        _panel(row[1], task, "seconds", metric, metric_log)
        _panel(row[2], task, "epoch", "train_loss", True)
        _panel(row[3], task, "epoch", metric, metric_log)
        row[0].legend(fontsize=7)
    fig.suptitle("gramopt compare: median over seeds, band = min-max over seeds (winning settings)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
