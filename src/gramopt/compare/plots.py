"""``curves.png``: per task, training curves and time to each rung of the ladder.

Per task, a 2 x 3 block of panels: train loss and the test metric against the optimizer
clock (top) and against epochs (bottom), the seconds to each rung of the task's ladder
(top right; a missing point: the rung was not reached by the median seed), and one
legend shared by all panels (bottom right). One line per optimizer (its winning
setting): the median over seeds, with a band from the seeds' minimum to maximum. A
seed's curve is a step function of its evaluations (the last value at or before x) and
stops where its run stopped. Losses and the test MSE are drawn on a log scale,
accuracies linearly; the rungs are light grey lines (the loosest thicker).

Each optimizer keeps its colour, line style and marker in every panel and every figure
(:func:`style`); no two registered optimizers share a colour or a marker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

POINTS = 200

# Every registered optimizer has its own colour and its own marker (tests/test_compare.py
# checks that both are one-to-one over the registry). Colours: the Okabe-Ito palette
# (Okabe & Ito, "Color Universal Design", 2008; distinguishable under the common
# colour-vision deficiencies; its yellow, too pale on white, left out) with its grey,
# extended by nine of Paul Tol's "muted" colours (Tol, "Colour Schemes", SRON technical
# note SRON/EPS/TN/09-002, issue 3.2, 2021). gramopt's methods are solid and thicker, torch's dashed, the other peers
# dotted or dash-dotted.
STYLES: dict[str, tuple[str, str, str]] = {
    "ggn": ("#0072B2", "-", "o"),  # blue
    "seng": ("#009E73", "-", "s"),  # bluish green
    "fngd": ("#CC79A7", "-", "D"),  # reddish purple
    "sgd": ("#000000", "--", "v"),  # black
    "adamw": ("#E69F00", "--", "^"),  # orange
    "muon": ("#D55E00", "--", "P"),  # vermillion
    "ikfac": ("#56B4E9", ":", "X"),  # sky blue
    "singd": ("#999999", "-.", "*"),  # grey
    "soap": ("#332288", "--", "p"),  # indigo (Tol)
    "shampoo": ("#999933", ":", "h"),  # olive (Tol)
    "muon-po": ("#882255", ":", "<"),  # wine (Tol)
    "psgd-kron": ("#44AA99", ":", ">"),  # teal (Tol)
    "muon-f32": ("#AA4499", "-.", "8"),  # purple (Tol)
    "gauss-newton": ("#117733", "-", "H"),  # green (Tol)
    "engd": ("#CC6677", ":", "1"),  # rose (Tol)
    "adam": ("#DDCC77", "--", "x"),  # sand (Tol)
    "lbfgs": ("#88CCEE", "--", "+"),  # cyan (Tol)
}
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#999999")
RUNG_COLOUR = "#BBBBBB"


def style(name: str) -> dict[str, Any]:
    """Colour, line style, marker and width of optimizer ``name``, the same in every plot
    (other names: a slot from a stable sum of the name's bytes)."""
    if name in STYLES:
        colour, linestyle, marker = STYLES[name]
    else:
        slot = sum(name.encode())
        colour, linestyle, marker = PALETTE[slot % len(PALETTE)], ("-.", (0, (3, 1, 1, 1)))[slot % 2], "d"
    thick = name in ("ggn", "seng", "fngd", "gauss-newton")
    return {"color": colour, "linestyle": linestyle, "marker": marker, "linewidth": 2.0 if thick else 1.4}


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
        look = style(name)
        ax.plot(grid, median, label=name, color=look["color"], linestyle=look["linestyle"], linewidth=look["linewidth"])
        ax.fill_between(grid, low, high, color=look["color"], alpha=0.15, linewidth=0)
    target = task.get("target")
    for rung in task.get("rungs", [])[1:]:
        if rung["metric"] == y_key:
            ax.axhline(rung["value"], color=RUNG_COLOUR, linewidth=0.8, zorder=0)
    if target and target["metric"] == y_key:
        ax.axhline(target["value"], color=RUNG_COLOUR, linewidth=1.6, zorder=0)
    if log_y:
        ax.set_yscale("log")
    steps = task["task"].get("kind") == "residual"  # an epoch is one full-batch step
    ax.set_xlabel("optimizer seconds" if x_key == "seconds" else ("steps" if steps else "epochs"))
    ax.set_ylabel(y_key.replace("_", " "))
    ax.set_title(f"{task['task']['name']}: {y_key.replace('_', ' ')}", fontsize=9)
    ax.grid(alpha=0.3)


def _ladder_panel(ax: Any, task: dict[str, Any]) -> None:
    """Median seconds to each rung per optimizer (winning setting), with min-max bars."""
    rungs = task.get("rungs", [])
    x = np.arange(len(rungs))
    for name, method in task["optimizers"].items():
        look = style(name)
        spreads = method["summary"].get("time_to_rungs", [])
        median = np.array([np.nan if s.get("median_with_misses") is None else s["median_with_misses"] for s in spreads])
        low = np.array([np.nan if s["min"] is None else s["min"] for s in spreads])
        high = np.array([np.nan if s["max"] is None or s["n"] < s["of"] else s["max"] for s in spreads])
        if median.size == 0 or np.all(np.isnan(median)):
            continue
        ax.errorbar(
            x,
            median,
            yerr=[np.clip(median - low, 0, None), np.clip(high - median, 0, None)],
            label=name,
            color=look["color"],
            linestyle=look["linestyle"],
            marker=look["marker"],
            linewidth=look["linewidth"],
            capsize=2,
            markersize=4,
        )
    ax.set_xticks(x, [f"{r['value']:g}" for r in rungs])
    ax.set_xlabel(f"rung ({rungs[0]['metric'].replace('_', ' ')})" if rungs else "rung")
    ax.set_ylabel("optimizer seconds to reach it")
    ax.set_yscale("log")
    ax.set_title(f"{task['task']['name']}: time to each rung (median seed; none = not reached)", fontsize=9)
    ax.grid(alpha=0.3)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Write the figure for every task in ``results`` to ``path`` (PNG)."""
    tasks = list(results["tasks"].values())
    fig = plt.figure(figsize=(15, 7.2 * len(tasks)), layout="constrained")
    blocks = fig.subfigures(len(tasks), 1, squeeze=False)[:, 0]
    for block, task in zip(blocks, tasks, strict=True):
        axes = block.subplots(2, 3)
        metric = task["task"]["metric"]
        metric_log = task["task"]["loss"] == "mse" or task["task"].get("kind") == "residual"
        _panel(axes[0, 0], task, "seconds", "train_loss", True)
        _panel(axes[0, 1], task, "seconds", metric, metric_log)
        _ladder_panel(axes[0, 2], task)
        _panel(axes[1, 0], task, "epoch", "train_loss", True)
        _panel(axes[1, 1], task, "epoch", metric, metric_log)
        legend = axes[1, 2]
        legend.axis("off")
        handles = [
            plt.Line2D([], [], color=style(n)["color"], linestyle=style(n)["linestyle"], marker=style(n)["marker"],
                       linewidth=style(n)["linewidth"], label=f"{n} ({m['source']})")
            for n, m in task["optimizers"].items()
        ]
        handles.append(plt.Line2D([], [], color=RUNG_COLOUR, linewidth=1.6, label="rungs (thick: the loosest)"))
        legend.legend(handles=handles, loc="center", fontsize=8, frameon=False, title="optimizer (winning setting)")
        block.suptitle(f"{task['task']['name']}: median over seeds, band = min-max over seeds", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
