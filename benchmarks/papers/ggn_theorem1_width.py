"""GGN Theorem 1: full-batch GGN converges quadratically, ||f_{t+1} - y|| <= C/sqrt(M) ||f_t - y||^2
with C independent of the width M (Cai et al., Theorem 1, Eq. 14; the network of Eq. 12).

Setting (the theorem's): the two-layer network f(x) = a^T tanh(W x) / sqrt(M), W ~ N(0, I)
entrywise, a uniform on {-1, +1} and fixed, only W trained; n unit-norm inputs of the
teacher task (d = 16) and their targets; full-batch GGN with lr = 1 and damping = 0 (the
ridgeless Eq. 9), float64. Per width M and initialization seed we record
e_t = ||f_t - y||_2 and the per-step quadratic ratio q_t = e_{t+1} / e_t^2 over the steps
whose e_{t+1} lies above 1e-12 (float64 round-off is about 1e-14 here), and report the constant C_M = sqrt(M) max_t q_t.

The theorem holds here if max_t q_t falls at least as fast as M^(-1/2), i.e. C_M stays
bounded as M grows: we fit the log-log slope of max_t q_t against M (the bound: -0.5; a
steeper fall means the bound holds with room to spare).

    PYTHONPATH=src python benchmarks/papers/ggn_theorem1_width.py [--quick]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import gramopt
from common import PAPERS, parse_args, write
from gramopt.tasks.regression import load_teacher

FLOOR = 1e-12  # e_{t+1} below this (absolute; e_0 is about 6) is near float64 round-off, not the quadratic regime


class TwoLayer(nn.Module):
    """Eq. (12): f(x) = a^T sigma(W x) / sqrt(M) with a fixed (the output layer is frozen)."""

    def __init__(self, d: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.hidden = nn.Linear(d, width, bias=False)
        self.out = nn.Linear(width, 1, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(width, d, generator=generator))
            signs = torch.randint(0, 2, (1, width), generator=generator) * 2.0 - 1.0
            self.out.weight.copy_(signs / math.sqrt(width))
        self.out.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def run_width(x: torch.Tensor, y: torch.Tensor, width: int, seed: int, steps: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    model = TwoLayer(x.shape[1], width, generator).double()
    opt = gramopt.GGN(model, lr=1.0, damping=0.0, loss="mse", params=[model.hidden.weight])
    with torch.no_grad():
        errors = [float((model(x) - y).norm())]
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
        with torch.no_grad():
            errors.append(float((model(x) - y).norm()))
        if errors[-1] < FLOOR:
            break
    seconds = time.perf_counter() - start
    opt.close()
    ratios = [errors[t + 1] / errors[t] ** 2 for t in range(len(errors) - 1) if errors[t + 1] > FLOOR]
    return {
        "width": width,
        "seed": seed,
        "errors": errors,
        "quadratic_ratios": ratios,
        "max_ratio": max(ratios),
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    n, widths, seeds, steps = (16, [64, 256], 1, 4) if args.quick else (32, [256, 1024, 4096, 16384, 65536], 3, 10)
    split = load_teacher(args.seed)
    x, y = split.train_x[:n].double(), split.train_y[:n].double()
    runs = [run_width(x, y, width, args.seed + s, steps) for width in widths for s in range(seeds)]
    per_width = []
    for width in widths:
        maxima = [r["max_ratio"] for r in runs if r["width"] == width]
        median = statistics.median(maxima)
        by_step = [
            statistics.median(
                r["quadratic_ratios"][t] for r in runs if r["width"] == width and len(r["quadratic_ratios"]) > t
            )
            for t in range(2)
        ]
        per_width.append(
            {
                "width": width,
                "max_ratio_median": median,
                "constant_C_median": median * math.sqrt(width),
                "ratio_step0_median": by_step[0],
                "ratio_step1_median": by_step[1],
            }
        )
    logs_m = [math.log(w["width"]) for w in per_width]
    logs_q = [math.log(w["max_ratio_median"]) for w in per_width]
    slope = _slope(logs_m, logs_q)
    slopes_by_step = [_slope(logs_m, [math.log(w[f"ratio_step{t}_median"]) for w in per_width]) for t in range(2)]
    constants = [w["constant_C_median"] for w in per_width]
    # The bound holds with one C for all widths if the ratio falls at least as fast as
    # M^(-1/2) (a steeper fall is a sharper constant than the theorem's, not a violation).
    held = slope <= -0.4
    payload = {
        "study": "GGN Theorem 1: quadratic-convergence constant against width",
        "paper": PAPERS["ggn"],
        "claim": "||f_{t+1} - y|| <= C / sqrt(M) ||f_t - y||^2 with C independent of M (Theorem 1, Eq. 14)",
        "settings": {
            "n": n,
            "d": x.shape[1],
            "widths": widths,
            "seeds": seeds,
            "max_steps": steps,
            "lr": 1.0,
            "damping": 0.0,
            "activation": "tanh",
            "dtype": "float64",
            "floor": FLOOR,
        },
        "per_width": per_width,
        "slope_log_max_ratio_vs_log_width": slope,
        "slope_by_step": slopes_by_step,
        "constant_C_range": [min(constants), max(constants)],
        "held": held,
        "held_criterion": "log-log slope of max_t q_t against M at most -0.4 (Theorem 1: -0.5 or steeper)",
        "runs": runs,
    }
    return write(args.out, "ggn_theorem1_width", payload, _figure(runs, per_width, slope))


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def _figure(runs: list[dict[str, Any]], per_width: list[dict[str, Any]], slope: float):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colours = plt.cm.viridis([i / max(1, len(per_width) - 1) for i in range(len(per_width))])
    for colour, w in zip(colours, per_width, strict=False):
        for r in (r for r in runs if r["width"] == w["width"]):
            left.semilogy(
                r["errors"], color=colour, alpha=0.7, label=f"M={w['width']}" if r["seed"] == runs[0]["seed"] else None
            )
    left.set(
        xlabel="GGN step (full batch, lr 1, damping 0)",
        ylabel="||f_t - y||_2",
        title="Full-batch GGN on the Eq. 12 network",
    )
    left.legend()
    widths = [w["width"] for w in per_width]
    ratios = [w["max_ratio_median"] for w in per_width]
    right.loglog(widths, ratios, "o-", label=f"measured max_t e_(t+1)/e_t^2 (slope {slope:.2f})")
    right.loglog(widths, [ratios[0] * (m / widths[0]) ** -0.5 for m in widths], "k--", label="Theorem 1: C / sqrt(M)")
    right.set(xlabel="width M", ylabel="quadratic ratio", title="Theorem 1: ratio against width")
    right.legend()
    return fig


if __name__ == "__main__":
    main(sys.argv[1:])
