"""Step time of gramopt's methods relative to an SGD-momentum step (issue 15).

Models (batch 128 of the tasks' own data): the MLP 64-256-256-10 (ReLU) on scikit-learn's
digits, the ``mnist`` CNN and the ``recall`` Transformer. Methods, each on its own copy of
the model, all through :func:`gramopt.training.training_step` (forward, the method's
backward pass(es), update):

- ``sgd``: ``torch.optim.SGD(momentum=0.9)``, the reference (ratio 1);
- ``ggn-mse``: GGN, exact (Cholesky), mse. On the MLP with a scalar output (64-256-256-1
  against the digit's label as a number: the GGN goal of issue 2 is for one output; with
  k = 10 outputs the Gram is ``[1280, 1280]`` and its Cholesky alone costs tens of SGD
  steps); on the CNN and the Transformer against one-hot targets (k = 10 and 8);
- ``fngd-estimate`` / ``fngd-share``: FNGD's estimation and sharing phases;
- ``seng-every1`` / ``seng-every200``: SENG with ``curvature_every`` 1 and 200 (with 200,
  the timed steps reuse the curvature of the warm-up's refresh: its cost, about one
  ``seng-every1`` step per 200 steps, adds under 1% to the ratio).

The methods are timed in turns (:func:`gramopt.compare.timing.interleaved_times`: rounds
in a rotating order, several steps per turn) in one process; the ratio to SGD is taken
per round and the median (min, max) over rounds is reported, for 1 and 2 threads, of the
wall-clock time (``ratio``) and of the main thread's CPU time (``ratio_thread_cpu``: less
sensitive to other processes on a shared machine; with 2 threads it misses the second
thread's work). On CUDA each turn is bracketed by ``torch.cuda.synchronize``.

    PYTHONPATH=src python benchmarks/step_overhead.py --tag after   # results/step_overhead_after.{json,png}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import gramopt
from gramopt.tasks import get_task
from gramopt.training.registry import training_step

RESULTS = Path(__file__).parent / "results"
MODELS = ("mlp", "mnist", "recall")
METHODS = ("sgd", "ggn-mse", "fngd-estimate", "fngd-share", "seng-every1", "seng-every200")
GOALS = {
    "mlp": {"ggn-mse": 1.5, "fngd-share": 1.10, "fngd-estimate": 1.6, "seng-every200": 1.25, "seng-every1": 1.8},
    "mnist": {"fngd-share": 1.05},
    "recall": {"fngd-share": 1.05},
}


def load_model(name: str, seed: int = 0) -> tuple[nn.Module, str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(model, loss, 16 batches of 128) for ``mlp`` (64-256-256-10 on digits), ``mnist``, ``recall``."""
    task = get_task("digits" if name == "mlp" else name)
    split = task.load(seed)
    if name == "mlp":
        from gramopt.tasks.regression import mlp

        torch.manual_seed(seed)
        model = mlp(64, 256, 10, act=nn.ReLU)
    else:
        model = task.build_model(seed)
    order = torch.randperm(split.train_x.shape[0], generator=torch.Generator().manual_seed(seed))
    batches = [
        (split.train_x[order[i : i + 128]], split.train_y[order[i : i + 128]])
        for i in range(0, split.train_x.shape[0] - 127, 128)
    ][:16]
    return model, task.loss, batches


def scalar_mlp(seed: int = 0) -> nn.Module:
    """The MLP with one output, 64-256-256-1 (GGN's mse variant on the MLP)."""
    from gramopt.tasks.regression import mlp

    torch.manual_seed(seed)
    return mlp(64, 256, 1, act=nn.ReLU)


def target(y: torch.Tensor, loss: str, classes: int, scalar: bool) -> torch.Tensor:
    """Labels for cross-entropy, one-hot rows (or the label as a number) for mse."""
    if loss != "mse":
        return y
    return y.float().unsqueeze(1) if scalar else nn.functional.one_hot(y, classes).float()


def build(method: str, model: nn.Module) -> tuple[torch.optim.Optimizer, str | None]:
    """The optimizer of ``method`` on ``model`` and the loss it trains (None: the task's)."""
    lr = 1e-3  # small steps: timing only
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), None
    if method == "ggn-mse":
        return gramopt.GGN(model, lr=lr, damping=1.0, loss="mse", momentum=0.9), "mse"
    if method == "fngd-estimate":
        # coefficient_steps=None: estimate on every step (explicit: newer FNGD shares by default)
        return gramopt.FNGD(model, lr=lr, damping=1e-3, momentum=0.9, coefficient_steps=None), None
    if method == "fngd-share":
        return gramopt.FNGD(model, lr=lr, damping=1e-3, momentum=0.9, coefficient_steps=1), None
    if method.startswith("seng-every"):
        every = int(method[len("seng-every") :])
        return gramopt.SENG(model, lr=lr, damping=1.0, momentum=0.9, curvature_every=every), None
    raise ValueError(method)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, threads: int, rounds: int, seconds_per_turn: float, device: torch.device, methods: list[str]) -> dict:
    torch.set_num_threads(threads)
    model, task_loss, batches = load_model(name)
    model = model.to(device)
    classes = int(max(int(y.max()) for _, y in batches)) + 1
    runs = {}
    for method in methods:
        scalar = name == "mlp" and method == "ggn-mse"
        m = copy.deepcopy(model) if not scalar else scalar_mlp().to(device)
        opt, loss = build(method, m)
        loss = loss or task_loss
        data = [(x.to(device), target(y, loss, classes, scalar).to(device)) for x, y in batches]
        runs[method] = (m, opt, loss, data)
    cursor = dict.fromkeys(runs, 0)

    def one(key: str) -> None:
        m, opt, loss, data = runs[key]
        x, y = data[cursor[key] % len(data)]
        cursor[key] += 1
        training_step(opt, m, loss, x, y)

    for key in runs:  # warm-up (SENG every 200 refreshes at its first step here)
        for _ in range(5):
            one(key)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        one("sgd")
    synchronize(device)
    inner = max(1, round(seconds_per_turn / ((time.perf_counter() - start) / 5)))
    samples = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for r in range(rounds):
        keys = list(runs)
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for key in order:
            synchronize(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                one(key)
            synchronize(device)
            samples[key].append((time.perf_counter() - t0) / inner)
            cpu[key].append((time.thread_time() - c0) / inner)
    out = {"steps_per_turn": inner, "rounds": rounds, "ms_per_step": {}, "ratio": {}, "ratio_thread_cpu": {}}
    for key, values in samples.items():
        out["ms_per_step"][key] = 1e3 * statistics.median(values)
        if key != "sgd":
            for field, series in (("ratio", samples), ("ratio_thread_cpu", cpu)):
                ratios = [a / b for a, b in zip(series[key], series["sgd"])]
                out[field][key] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    for key in runs:
        info = getattr(runs[key][1], "last_info", None)
        if info is not None:
            out.setdefault("last_step_phases_ms", {})[key] = {k: 1e3 * v for k, v in info.seconds.items()}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, (label, models) in zip(axes[0], runs.items()):
        methods = [m for m in METHODS if m != "sgd"]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs, med, lo, hi = [], [], [], []
            for j, model in enumerate(models):
                r = models[model]["ratio"].get(method)
                if r:
                    xs.append(j + (i - len(methods) / 2 + 0.5) * width)
                    med.append(r["median"])
                    lo.append(r["median"] - r["min"])
                    hi.append(r["max"] - r["median"])
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=method)
        for j, model in enumerate(models):
            for method, goal in GOALS.get(model, {}).items():
                if method in methods:
                    i = methods.index(method)
                    x = j + (i - len(methods) / 2 + 0.5) * width
                    ax.plot([x - width / 2, x + width / 2], [goal, goal], color="black", linewidth=1.5)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_yscale("log")  # GGN with k = 10 or 8 outputs costs tens of SGD steps
        ax.set_xticks(range(len(models)), list(models))
        ax.set_title(f"{results['tag']}: {label} (bars: goals)", fontsize=9)
    axes[0][0].set_ylabel("step time / SGD-momentum step (median, min-max)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seconds-per-turn", type=float, default=0.04)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="after")
    parser.add_argument("--out", default=None)
    parser.add_argument("--replot", default=None, help="redraw the PNG of this JSON and exit")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return
    device = torch.device(args.device)
    methods = ["sgd"] + [m for m in args.methods if m != "sgd"]
    results = {
        "benchmark": "step time / SGD-momentum step time, same model, batch 128, interleaved in one process",
        "tag": args.tag,
        "goals": GOALS,
        "environment": {
            "torch": torch.__version__,
            "gramopt": gramopt.__file__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_before": os.getloadavg(),
            "device": str(device),
        },
        "settings": vars(args),
        "runs": {},
    }
    for threads in args.threads:
        label = f"{threads} thread{'s' if threads > 1 else ''}"
        results["runs"][label] = {}
        for name in args.models:
            r = bench(name, threads, args.rounds, args.seconds_per_turn, device, methods)
            results["runs"][label][name] = r
            print(
                f"{label} {name:6s} sgd {r['ms_per_step']['sgd']:.2f} ms  "
                + "  ".join(
                    f"{k} {v['median']:.2f}x ({r['ratio_thread_cpu'][k]['median']:.2f}x cpu)" for k, v in r["ratio"].items()
                ),
                flush=True,
            )
    results["environment"]["load_average_after"] = os.getloadavg()
    out = Path(args.out) if args.out else RESULTS / f"step_overhead_{args.tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
