"""What the benchmarks share: the command line of every script, where results go, the
environment record, the tasks' batches and models, the optimizers the step-time benchmarks
compare and the interleaved timing loop (synchronized on CUDA).

Command line. Every script under ``benchmarks/`` (``probes/`` and ``papers/`` too) starts
from :func:`arguments`: ``--quick`` is a smoke run of a few seconds (tiny sizes, a few
steps; its figures mean nothing) and ``--out DIR`` the folder its files go to (default
``benchmarks/results``, where the committed results are). ``tests/test_benchmarks.py``
runs every script with ``--quick --out TMP``. A script in a subfolder finds this module by
putting ``benchmarks/`` first on ``sys.path``.

Timing: the compared step functions run in turns, rounds in a rotating order, several
steps per turn; each turn starts and ends with :func:`gramopt.compare.timing.synchronize`
of the device (nothing on CPU, ``torch.cuda.synchronize`` on CUDA), so a turn's time is
that of the work it queued. Ratios to the baseline are taken per round (the machine's
load drifts alike for both), and the median (min, max) over rounds is reported, of the
wall-clock time and of the main thread's CPU time (``time.thread_time``: less sensitive to
other processes; with several threads it misses the other threads' work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gramopt
from gramopt.compare.timing import synchronize
from gramopt.tasks import get_task
from gramopt.training.registry import training_step

RESULTS = Path(__file__).resolve().parent / "results"
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def arguments(doc: str | None, out: Path = RESULTS) -> argparse.ArgumentParser:
    """The parser every benchmark starts from (its description: the first line of
    ``doc``): ``--quick`` and ``--out`` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds: tiny sizes, a few steps")
    parser.add_argument("--out", type=Path, default=out, help="folder of the written files (default: %(default)s)")
    return parser


def write_json(record: dict[str, Any], path: Path) -> Path:
    """``record`` as indented JSON at ``path`` (folders made; what JSON cannot hold as
    its ``str``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def task_batches(task_name: str, batch: int = 128, seed: int = 0, count: int = 16) -> Batches:
    """Up to ``count`` batches of ``batch`` samples of the task's training split, in a
    seeded random order: ``[(x [batch, ...], y [batch, ...]), ...]``."""
    split = get_task(task_name).load(seed)
    n = split.train_x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [
        (split.train_x[order[i : i + batch]], split.train_y[order[i : i + batch]])
        for i in range(0, n - batch + 1, batch)
    ][:count]


def mlp_model(outputs: int = 10, seed: int = 0) -> nn.Module:
    """The MLP 64-256-256-``outputs`` (ReLU) of the step-overhead benchmarks."""
    from gramopt.tasks.regression import mlp

    torch.manual_seed(seed)
    return mlp(64, 256, outputs, act=nn.ReLU)


def load_model(name: str, seed: int = 0, batch: int = 128) -> tuple[nn.Module, str, Batches]:
    """(model, the task's loss, 16 batches) for ``mlp`` (64-256-256-10 on scikit-learn's
    digits), ``mnist`` (the task's CNN) or ``recall`` (the task's Transformer)."""
    task_name = "digits" if name == "mlp" else name
    task = get_task(task_name)
    model = mlp_model(10, seed) if name == "mlp" else task.build_model(seed)
    return model, task.loss, task_batches(task_name, batch, seed)


def regression_target(y: torch.Tensor, loss: str, classes: int, scalar: bool) -> torch.Tensor:
    """Labels for cross-entropy; for mse one-hot rows, or (``scalar``) the label as a number ``[b, 1]``."""
    if loss != "mse":
        return y
    return y.float().unsqueeze(1) if scalar else nn.functional.one_hot(y, classes).float()


def build_method(method: str, model: nn.Module, lr: float = 1e-3) -> tuple[torch.optim.Optimizer, str | None]:
    """The optimizer of ``method`` on ``model`` and the loss it trains (None: the task's):
    ``sgd`` (momentum 0.9, the reference), ``ggn-mse`` (exact, Cholesky), ``fngd-estimate``
    (FNGD estimating on every step), ``fngd-share`` (sharing from the second step),
    ``seng-every<T>`` (SENG with ``curvature_every=T``). All with momentum 0.9 and small
    steps (timing only). A ``-ordinary`` suffix (``fngd-share-ordinary``) builds the same
    optimizer, for :func:`cycling_step` to run in the ordinary loop."""
    method = method.removesuffix("-ordinary")
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), None
    if method == "ggn-mse":
        return gramopt.GGN(model, lr=lr, damping=1.0, loss="mse", momentum=0.9), "mse"
    if method == "fngd-estimate":
        return gramopt.FNGD(model, lr=lr, damping=1e-3, momentum=0.9, coefficient_steps=None), None
    if method == "fngd-share":
        return gramopt.FNGD(model, lr=lr, damping=1e-3, momentum=0.9, coefficient_steps=1), None
    if method.startswith("seng-every"):
        every = int(method[len("seng-every") :])
        return gramopt.SENG(model, lr=lr, damping=1.0, momentum=0.9, curvature_every=every), None
    raise ValueError(f"unknown method {method!r}")


def ordinary_step(opt: torch.optim.Optimizer, model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of the ordinary loop, ``loss.backward(); opt.step()`` (a gramopt method
    then reads the ``.grad`` that backward filled)."""
    opt.zero_grad(set_to_none=True)
    gramopt.losses.get_loss(loss).value(model(x), y).backward()
    opt.step()


def cycling_step(
    opt: torch.optim.Optimizer, model: nn.Module, loss: str, batches: Batches, ordinary: bool = False
) -> Callable[[], None]:
    """A no-argument training step (:func:`gramopt.training.registry.training_step`, or
    :func:`ordinary_step`) on the next of ``batches``, cycling."""
    step = ordinary_step if ordinary else training_step
    cursor = [0]

    def one() -> None:
        x, y = batches[cursor[0] % len(batches)]
        cursor[0] += 1
        step(opt, model, loss, x, y)

    return one


def interleaved(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    seconds_per_turn: float,
    device: torch.device,
    baseline: str = "sgd",
    warmup: int = 5,
    steps_per_turn: int | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """Seconds per step of each function, one sample per round: ``(wall, thread_cpu,
    steps_per_turn)``. Unless given, ``steps_per_turn`` is sized so that a turn of
    ``baseline`` lasts about ``seconds_per_turn``."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    inner = steps_per_turn
    if inner is None:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(warmup):
            steps[baseline]()
        synchronize(device)
        inner = max(1, round(seconds_per_turn / ((time.perf_counter() - start) / warmup)))
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    keys = list(steps)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            synchronize(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                steps[key]()
            synchronize(device)
            wall[key].append((time.perf_counter() - t0) / inner)
            cpu[key].append((time.thread_time() - c0) / inner)
    return wall, cpu, inner


def ratio_spread(values: list[float], base: list[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios ``values[i] / base[i]``."""
    r = [a / b for a, b in zip(values, base, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def ratios(samples: dict[str, list[float]], baseline: str = "sgd") -> dict[str, dict[str, float]]:
    """Per function but the baseline: the per-round ratio to the baseline, median, min, max."""
    return {key: ratio_spread(values, samples[baseline]) for key, values in samples.items() if key != baseline}


def environment(device: torch.device | str = "cpu") -> dict:
    """Where the benchmark ran (torch, platform, cores, threads, load, device)."""
    device = torch.device(device)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gramopt": gramopt.__file__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
    return env


def write_results(results: dict, out: Path, plot: Callable[[dict, Path], None]) -> None:
    """``out``.json (the results) and ``out``.png (``plot(results, path)``), folders made."""
    write_json(results, out.with_suffix(".json"))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
