"""FNGD step time relative to an SGD-momentum step of the same model.

Models: the ``digits`` MLP, the ``mnist`` CNN and the ``recall`` Transformer, batch 128
of the tasks' own training data. Variants, each on its own copy of the model:

- ``sgd``: ``torch.optim.SGD(momentum=0.9)`` (the reference, ratio 1);
- ``fngd-estimate``: FNGD in its estimation phase (Gram, solve, weighted gradient);
- ``fngd-share``: FNGD in its sharing phase (shared coefficients, no Gram, no solve);
- ``fngd-share-ordinary``: the sharing phase in the ordinary loop
  (``loss.backward(); opt.step()``: the weight gradients of the backward are wasted).

Every variant runs the same :func:`gramopt.training.training_step` (forward, the
method's backward pass(es), update). The variants are timed in turns (round robin) in
one process: per round each runs ``inner`` steps; the ratio to SGD is taken per round
and the median over rounds is reported, for wall-clock time and for the thread's CPU
time (less sensitive to other processes on a shared machine).

    PYTHONPATH=src python benchmarks/fngd_speed.py            # writes benchmarks/results/fngd_speed.{json,png}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import gramopt
from gramopt.tasks import get_task
from gramopt.training.registry import training_step

RESULTS = Path(__file__).parent / "results"
MODELS = ("digits", "mnist", "recall")
TARGETS = {"fngd-share": 1.10, "fngd-estimate": 1.6}


def variants(model: torch.nn.Module, lr: float, damping: float) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, bool]]:
    """name -> (model copy, optimizer, uniform loop?)."""
    out = {}
    m = copy.deepcopy(model)
    out["sgd"] = (m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), True)
    m = copy.deepcopy(model)
    out["fngd-estimate"] = (m, gramopt.FNGD(m, lr=lr, damping=damping, momentum=0.9, coefficient_steps=None), True)
    m = copy.deepcopy(model)
    out["fngd-share"] = (m, gramopt.FNGD(m, lr=lr, damping=damping, momentum=0.9, coefficient_steps=1), True)
    m = copy.deepcopy(model)
    out["fngd-share-ordinary"] = (m, gramopt.FNGD(m, lr=lr, damping=damping, momentum=0.9, coefficient_steps=1), False)
    return out


def ordinary_step(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    gramopt.losses.get_loss(loss).value(model(x), y).backward()
    opt.step()


def bench_model(name: str, batch: int, rounds: int, seconds_per_turn: float, seed: int) -> dict:
    task = get_task(name)
    split = task.load(seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(split.train_x.shape[0], generator=generator)
    batches = [
        (split.train_x[order[i : i + batch]], split.train_y[order[i : i + batch]])
        for i in range(0, split.train_x.shape[0] - batch + 1, batch)
    ][:16]
    model = task.build_model(seed)
    runs = variants(model, lr=1e-3, damping=1e-3)  # small steps: timing only
    cursor = {k: 0 for k in runs}

    def one(key: str) -> None:
        m, opt, uniform = runs[key]
        x, y = batches[cursor[key] % len(batches)]
        cursor[key] += 1
        if uniform:
            training_step(opt, m, task.loss, x, y)
        else:
            ordinary_step(opt, m, task.loss, x, y)

    # warm-up, and the estimate of a step's time to size the turns
    for key in runs:
        for _ in range(3):
            one(key)
    start = time.perf_counter()
    for _ in range(3):
        one("sgd")
    sgd_step = (time.perf_counter() - start) / 3
    inner = max(1, round(seconds_per_turn / sgd_step))
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for _ in range(rounds):
        for key in runs:
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                one(key)
            wall[key].append((time.perf_counter() - w0) / inner)
            cpu[key].append((time.thread_time() - c0) / inner)
    phases = {}
    for key in ("fngd-estimate", "fngd-share"):
        info = runs[key][1].last_info
        phases[key] = {k: v * 1e3 for k, v in info.seconds.items()}
    result = {"steps_per_turn": inner, "rounds": rounds, "ms_per_step": {}, "ratio_wall": {}, "ratio_cpu": {}, "last_step_phases_ms": phases}
    for key in runs:
        result["ms_per_step"][key] = {"wall": 1e3 * statistics.median(wall[key]), "cpu": 1e3 * statistics.median(cpu[key])}
        if key != "sgd":
            rw = [a / b for a, b in zip(wall[key], wall["sgd"])]
            rc = [a / b for a, b in zip(cpu[key], cpu["sgd"])]
            result["ratio_wall"][key] = {"median": statistics.median(rw), "quartiles": statistics.quantiles(rw, n=4)}
            result["ratio_cpu"][key] = {"median": statistics.median(rc), "quartiles": statistics.quantiles(rc, n=4)}
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["fngd-share", "fngd-share-ordinary", "fngd-estimate"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, kind in zip(axes, ("ratio_wall", "ratio_cpu")):
        width = 0.25
        for i, key in enumerate(keys):
            values = [results["models"][m][kind][key]["median"] for m in results["models"]]
            ax.bar([j + (i - 1) * width for j in range(len(values))], values, width, label=key)
        for key, target in TARGETS.items():
            ax.axhline(target, linestyle="--", linewidth=0.8, color="gray")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(results["models"])), list(results["models"]))
        ax.set_title(f"step time / SGD-momentum step ({'wall' if kind == 'ratio_wall' else 'thread CPU'})")
    axes[0].set_ylabel("ratio (median over rounds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds-per-turn", type=float, default=0.15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "fngd_speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "FNGD step time / SGD-momentum step time, same model, batch %d" % args.batch,
        "targets": TARGETS,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
        },
        "settings": vars(args),
        "models": {},
    }
    for name in args.models:
        results["models"][name] = bench_model(name, args.batch, args.rounds, args.seconds_per_turn, args.seed)
        r = results["models"][name]
        print(
            f"{name:7s} "
            + "  ".join(
                f"{k}: {r['ratio_wall'][k]['median']:.2f}x wall / {r['ratio_cpu'][k]['median']:.2f}x cpu"
                for k in r["ratio_wall"]
            )
            + f"   (sgd {r['ms_per_step']['sgd']['wall']:.2f} ms)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
