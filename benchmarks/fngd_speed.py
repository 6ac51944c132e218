"""FNGD step time relative to an SGD-momentum step of the same model.

Models: the ``digits`` MLP, the ``mnist`` CNN and the ``recall`` Transformer, batch 128
of the tasks' own training data. Variants, each on its own copy of the model:

- ``sgd``: ``torch.optim.SGD(momentum=0.9)`` (the reference, ratio 1);
- ``fngd-estimate``: FNGD in its estimation phase (Gram, solve, weighted gradient);
- ``fngd-share``: FNGD in its sharing phase (shared coefficients, no Gram, no solve);
- ``fngd-share-ordinary``: the sharing phase in the ordinary loop
  (``loss.backward(); opt.step()``: the weight gradients of the backward are wasted).

Every variant runs the same :func:`gramopt.training.training_step` (forward, the
method's backward pass(es), update). The variants are timed in turns (``bench_common.interleaved``:
rounds in a rotating order, synchronized on CUDA) in one process: per round each runs
``inner`` steps; the ratio to SGD is taken per round and the median over rounds is reported, for wall-clock time and for the thread's CPU
time (less sensitive to other processes on a shared machine).

    PYTHONPATH=src python benchmarks/fngd_speed.py            # writes benchmarks/results/fngd_speed.{json,png}
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

import gramopt
from bench_common import RESULTS, environment, interleaved, task_batches, write_results
from gramopt.tasks import get_task
from gramopt.training.registry import training_step

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


def bench_model(name: str, batch: int, rounds: int, seconds_per_turn: float, seed: int, device: torch.device) -> dict:
    task = get_task(name)
    batches = [(x.to(device), y.to(device)) for x, y in task_batches(name, batch, seed)]
    model = task.build_model(seed).to(device)
    runs = variants(model, lr=1e-3, damping=1e-3)  # small steps: timing only
    cursor = {k: 0 for k in runs}

    def stepper(key: str):
        m, opt, uniform = runs[key]
        step = training_step if uniform else ordinary_step

        def one() -> None:
            x, y = batches[cursor[key] % len(batches)]
            cursor[key] += 1
            step(opt, m, task.loss, x, y)

        return one

    wall, cpu, inner = interleaved({k: stepper(k) for k in runs}, rounds, seconds_per_turn, device, warmup=3)
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "fngd_speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "benchmark": "FNGD step time / SGD-momentum step time, same model, batch %d" % args.batch,
        "targets": TARGETS,
        "environment": environment(args.device),
        "settings": vars(args),
        "models": {},
    }
    for name in args.models:
        results["models"][name] = bench_model(name, args.batch, args.rounds, args.seconds_per_turn, args.seed, torch.device(args.device))
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
    write_results(results, out, plot)


if __name__ == "__main__":
    main()
