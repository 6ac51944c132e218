"""Interleaved (round-robin) timing of several step functions in one process.

Absolute times on shared machines drift by up to 50% between runs; timing the
compared functions in turns, many short rounds each, exposes them to the same drift,
so the *ratio* of medians is what to report.

On CUDA, kernels run asynchronously: each timed turn is bracketed by
``torch.cuda.synchronize()`` (as ``torch.utils.benchmark`` does), so that a turn's time
is that of the work it queued, not of the Python that queued it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the queued work of ``device`` (None: of every CUDA device in use, if
    CUDA was initialized); nothing on CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_times(
    steps: dict[str, Callable[[], object]],
    rounds: int = 20,
    steps_per_round: int = 5,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Seconds per step of each function, one sample per round (mean over the round).

    Each round runs every function ``steps_per_round`` times in turn, in a rotating
    order so that no function always follows the same one. Each turn starts and ends
    with :func:`synchronize` of ``device`` (None: every CUDA device in use).
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / steps_per_round)
    return samples


def ratio_summary(samples: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Median seconds per step, and the ratio of each round's time to the baseline's in
    the same round (median, min, max)."""
    base = samples[baseline]
    out = {}
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        out[name] = {
            "median_seconds": statistics.median(values),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return out
