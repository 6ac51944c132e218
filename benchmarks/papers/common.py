"""What every paper study shares: arguments, one torch thread, training epochs of an
embedded task, and writing the JSON + PNG under ``benchmarks/results/papers/``.

Every study is a script with ``main(argv) -> dict`` (the JSON it wrote); like every
benchmark it runs with ``--quick`` (a smoke run) and ``--out DIR`` (``bench_common``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gramopt import NonFiniteError, SingularSystemError  # noqa: E402
from gramopt.tasks import Split, Task, get_task  # noqa: E402
from gramopt.training.loop import epoch_order, evaluate  # noqa: E402
from gramopt.training.registry import training_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
import bench_common  # noqa: E402

RESULTS = bench_common.RESULTS / "papers"

PAPERS = {
    "ggn": (
        "Tianle Cai, Ruiqi Gao, Jikai Hou, Siyu Chen, Dong Wang, Di He, Zhihua Zhang, Liwei Wang, "
        '"Gram-Gauss-Newton Method: Learning Overparameterized Neural Networks for Regression Problems", '
        "arXiv:1905.11675, 2019"
    ),
    "seng": (
        "Minghan Yang, Dong Xu, Zaiwen Wen, Mengyun Chen, Pengxiang Xu, "
        '"Sketchy Empirical Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020'
    ),
    "vdb": (
        "Jan van den Brand, Binghui Peng, Zhao Song, Omri Weinstein, "
        '"Training (Overparametrized) Neural Networks in Near-Linear Time", ITCS 2021, arXiv:2006.11648'
    ),
    "fngd": (
        "Xinwei Ou, Ce Zhu, Xiaolin Huang, Yipeng Liu, "
        '"Inverse-Free Fast Natural Gradient Descent Method for Deep Learning", arXiv:2403.03473, 2024'
    ),
}


def parse_args(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """``--quick``, ``--out`` (default ``benchmarks/results/papers``) and ``--seed``; one
    torch thread, the global seed set."""
    parser = bench_common.arguments(description, out=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    return args


def environment() -> dict[str, Any]:
    return {**bench_common.environment(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write(out: Path, name: str, payload: dict[str, Any], figure: Any) -> dict[str, Any]:
    """Write ``name.json`` (payload + environment; NaN and inf as null) and ``name.png``
    under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "environment": environment()}
    (out / f"{name}.json").write_text(json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")
    figure.savefig(out / f"{name}.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    print(f"wrote {out / name}.json and .png")
    return payload


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None (strict JSON: a diverged run, a
    vacuous bound), containers recursed."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    task: Task,
    split: Split,
    epoch: int,
    seed: int,
    batch_size: int | None = None,
) -> dict[str, float]:
    """One epoch (shuffled by ``(seed, epoch)``, the last partial batch dropped), then the
    train loss (full training set), test loss and test metric. ``seconds`` is the time of
    the training steps only. A non-finite loss (or gramopt's refusal of one, or of a
    singular system) returns ``{"epoch": epoch + 1, "diverged": 1.0}``."""
    batch_size = batch_size or task.batch_size
    n = split.train_x.shape[0]
    order = epoch_order(n, seed, epoch)
    start, cpu_start = time.perf_counter(), time.thread_time()
    for i in range(0, n - batch_size + 1, batch_size):
        rows = order[i : i + batch_size]
        try:
            value = training_step(opt, model, task.loss, split.train_x[rows], split.train_y[rows])
        except (NonFiniteError, SingularSystemError):
            value = torch.tensor(float("nan"))
        if not torch.isfinite(value):
            return {"epoch": epoch + 1, "diverged": 1.0}
    seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu_start
    train_loss, _ = evaluate(model, task, split.train_x, split.train_y)
    test_loss, metric = evaluate(model, task, split.test_x, split.test_y)
    return {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "test_loss": test_loss,
        task.metric: metric,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def train_task(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    task: Task,
    split: Split,
    epochs: int,
    seed: int,
    batch_size: int | None = None,
) -> list[dict[str, float]]:
    """``epochs`` epochs of :func:`train_epoch`, stopping after a diverged one."""
    records: list[dict[str, float]] = []
    for epoch in range(epochs):
        records.append(train_epoch(model, opt, task, split, epoch, seed, batch_size))
        if records[-1].get("diverged"):
            break
    return records


def steps_per_epoch(split: Split, batch_size: int) -> int:
    return split.train_x.shape[0] // batch_size


#: Constructor arguments a later gramopt may use to select FNGD's absolute damping (Theorem 1's
#: lambda) instead of the relative lambda = damping ||K||_F of Eq. (14), with the value that
#: selects it. The first one ``gramopt.FNGD`` accepts is used.
ABSOLUTE_DAMPING_OPTIONS = (
    ("damping_mode", "absolute"),
    ("damping_kind", "absolute"),
    ("damping_type", "absolute"),
    ("relative_damping", False),
)


def fngd_absolute_damping() -> dict[str, Any] | None:
    """The keyword that makes ``gramopt.FNGD``'s damping absolute, or None if it has none."""
    import inspect

    import gramopt

    accepted = inspect.signature(gramopt.FNGD).parameters
    for name, value in ABSOLUTE_DAMPING_OPTIONS:
        if name in accepted:
            return {name: value}
    return None


@functools.cache
def load_split(task_name: str, seed: int) -> Split:
    """The task's split, loaded once per process (the smoke test runs several studies)."""
    return get_task(task_name).load(seed)


def random_images(train: int, test: int, seed: int, classes: int = 10) -> Split:
    """Random ``[n, 1, 28, 28]`` images with random labels: the ``--quick`` stand-in for the
    mnist split (the smoke test checks the plumbing; loading mnist costs seconds)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(train + test, 1, 28, 28, generator=generator)
    y = torch.randint(0, classes, (train + test,), generator=generator)
    return Split(x[:train], y[:train], x[train:], y[train:])
