"""SENG's step time and peak memory relative to SGD with momentum (issue 4).

**Step time.** For each model (the ``digits`` MLP 64-128-128-10 and the ``mnist`` CNN,
batch 128 of real training images) every configuration gets its own copy of the model
and its own optimizer; the configurations then run in turns (round robin) in one
process (``bench_common.interleaved``, in a rotating order, synchronized on CUDA):
each round runs ``window`` steps of each (``training_step``: zero_grad,
forward, the method's backward, step), timed by ``time.perf_counter``. We report the
median over rounds of the time per step; the *paired ratio*, the median over rounds of
(this configuration's time / SGD's time in the same round), which cancels the load
drift of the shared machine best; the ratio of medians; and the amortized ratio (total
time / total steps, which includes the curvature refreshes of ``curvature_every=200``).
One thread (``torch.set_num_threads(1)``): the machine's two cores are shared with other
jobs, and one thread gives the steadiest ratios.

**Peak memory.** ``tracemalloc`` does not see torch's allocations, so each
configuration runs in a fresh subprocess that builds a ``Linear(4096, 4096) -> ReLU ->
Linear(4096, 10)`` model (16.8 M + 41 k parameters), reads its resident set size
(``/proc/self/statm``) just before training, runs 5 steps on a batch of 128, and
reads the kernel's peak RSS of the process (read as ``VmHWM`` from ``/proc/self/status``,
since ``ru_maxrss`` carries the forked parent's peak through exec). We report the peak and the increment ``peak - RSS
before training`` (what the optimizer and its passes add beyond the imports, the model
and the data), each as a ratio to SGD's.

Writes ``benchmarks/results/seng_speed.json`` and ``seng_speed.png``.

    PYTHONPATH=src python benchmarks/seng_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gramopt
from bench_common import arguments, environment, interleaved, pyplot, task_batches, write_json
from gramopt.tasks import get_task
from gramopt.training.registry import training_step

SEED = 0
TARGETS = {"curvature_every=200": 1.25, "curvature_every=1": 1.8, "memory": 1.5}


def time_configs() -> dict[str, callable]:
    """name -> (model, loss) -> optimizer; all with momentum 0.9."""
    implicit_sketched = dict(
        implicit=gramopt.ImplicitConfig(threshold=1, rank=4),
        sketch=gramopt.SketchConfig(factor_size=0.25, sampling="uniform", seed=SEED),
    )
    return {
        "sgd": lambda m, loss: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        "seng T=200": lambda m, loss: gramopt.SENG(m, 0.1, 1.0, momentum=0.9, curvature_every=200, loss=loss),
        "seng T=1": lambda m, loss: gramopt.SENG(m, 0.1, 1.0, momentum=0.9, curvature_every=1, loss=loss),
        "seng T=1 implicit+sketch": lambda m, loss: gramopt.SENG(
            m, 0.1, 1.0, momentum=0.9, curvature_every=1, loss=loss, **implicit_sketched
        ),
        "seng T=200 implicit+sketch": lambda m, loss: gramopt.SENG(
            m, 0.1, 1.0, momentum=0.9, curvature_every=200, loss=loss, **implicit_sketched
        ),
    }


def time_model(task_name: str, rounds: int, window: int, warmup: int, device: torch.device, batch: int = 128) -> dict:
    task = get_task(task_name)
    x, y = task_batches(task_name, batch, SEED, count=1)[0]
    x, y = x.to(device), y.to(device)
    runs = {}
    for name, build in time_configs().items():
        model = task.build_model(SEED).to(device)
        runs[name] = (model, build(model, task.loss))

    def stepper(name: str):
        model, opt = runs[name]
        return lambda: training_step(opt, model, task.loss, x, y)

    windows, _, _ = interleaved(
        {name: stepper(name) for name in runs}, rounds, 0.0, device, warmup=warmup, steps_per_turn=window
    )
    sgd_median = statistics.median(windows["sgd"])
    sgd_mean = statistics.fmean(windows["sgd"])
    out = {"batch": batch, "rounds": rounds, "window": window, "warmup": warmup, "configs": {}}
    for name, times in windows.items():
        median, mean = statistics.median(times), statistics.fmean(times)
        paired = [t / base for t, base in zip(times, windows["sgd"], strict=True)]
        out["configs"][name] = {
            "median_ms": 1e3 * median,
            "amortized_ms": 1e3 * mean,
            "ratio_paired": statistics.median(paired),
            "ratio_median": median / sgd_median,
            "ratio_amortized": mean / sgd_mean,
            "windows_ms": [round(1e3 * t, 4) for t in times],
        }
    return out


# -- memory ---------------------------------------------------------------------------
def memory_configs() -> dict[str, callable]:
    return {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        "seng implicit (Eq. 23)": lambda m: gramopt.SENG(m, 0.1, 1.0, momentum=0.9),
        "seng implicit exact product": lambda m: gramopt.SENG(
            m, 0.1, 1.0, momentum=0.9, implicit=gramopt.ImplicitConfig(exact_product=True)
        ),
        "seng implicit + factor sketch 1/4": lambda m: gramopt.SENG(
            m, 0.1, 1.0, momentum=0.9, sketch=gramopt.SketchConfig(factor_size=0.25, seed=SEED)
        ),
        "seng explicit (threshold=None)": lambda m: gramopt.SENG(
            m, 0.1, 1.0, momentum=0.9, implicit=gramopt.ImplicitConfig(threshold=None)
        ),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM, the peak RSS of this process's address space. (``ru_maxrss`` would do,
    but Linux carries it over from the forked parent through exec: a child of a large
    benchmark process would report the parent's peak.)"""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(name: str, width: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    x, y = torch.randn(128, width), torch.randint(0, 10, (128,))
    opt = memory_configs()[name](model)
    before = rss_bytes()
    for _ in range(5):
        training_step(opt, model, "cross_entropy", x, y)
    peak = peak_rss_bytes()
    kinds = {}
    if isinstance(opt, gramopt.SENG):
        kinds = {layer: state["kind"] for layer, state in opt.extra_state["curvature"].items()}
    print(json.dumps({"peak_bytes": peak, "rss_before_bytes": before, "kinds": kinds}))


def measure_memory(names: list[str], width: int, parallel: bool = False) -> dict:
    """Each configuration's peak in a fresh subprocess, one after the other (``parallel``:
    all at once, for a smoke run; each process's peak is its own either way)."""
    out = {}
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    children = []
    for name in names:
        command = [sys.executable, __file__, "--memory-child", name, "--memory-width", str(width)]
        children.append((name, subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)))
        if not parallel:
            children[-1][1].wait()
    for name, child in children:
        stdout, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"the memory run of {name!r} failed with exit code {child.returncode}")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    base = out["sgd"]
    for record in out.values():
        record["increment_bytes"] = record["peak_bytes"] - record["rss_before_bytes"]
        record["ratio_peak"] = record["peak_bytes"] / base["peak_bytes"]
        record["ratio_increment"] = record["increment_bytes"] / (base["peak_bytes"] - base["rss_before_bytes"])
    return out


# -- report ---------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    models = list(result["time"])
    names = [n for n in time_configs() if n != "sgd"]
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        ratios = [result["time"][model]["configs"][n]["ratio_paired"] for n in names]
        axes[0].bar([j + i * width for j in range(len(names))], ratios, width, label=model)
    axes[0].axhline(TARGETS["curvature_every=200"], color="green", linestyle="--", label="target T=200 (1.25)")
    axes[0].axhline(TARGETS["curvature_every=1"], color="red", linestyle="--", label="target T=1 (1.8)")
    axes[0].set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(names))], names, fontsize=7, rotation=15)
    axes[0].set_ylabel("step time / SGD-momentum step time (paired median)")
    axes[0].set_title("step time, batch 128, 1 thread")
    axes[0].legend(fontsize=8)
    mem = result["memory"]
    labels = list(mem)
    axes[1].bar(range(len(labels)), [mem[n]["ratio_peak"] for n in labels], 0.4, label="peak RSS")
    axes[1].bar(
        [j + 0.4 for j in range(len(labels))],
        [mem[n]["ratio_increment"] for n in labels],
        0.4,
        label="peak - RSS before training",
    )
    axes[1].axhline(TARGETS["memory"], color="red", linestyle="--", label="target (1.5)")
    axes[1].set_xticks([j + 0.2 for j in range(len(labels))], labels, fontsize=7, rotation=15)
    axes[1].set_ylabel("ratio to SGD-momentum")
    width = result["memory_width"]
    axes[1].set_title(f"peak memory, Linear {width}x{width}, batch 128")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-width", type=int, default=4096, help="width of the memory runs' Linear layers")
    parser.add_argument("--device", default="cpu", help="device of the step-time runs (the memory runs: CPU)")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.memory_width)
        return
    torch.set_num_threads(1)
    device = torch.device(args.device)
    started = time.perf_counter()
    if args.quick:  # the MLP at batch 16, 2 rounds of one step; memory of two configurations at width 256
        times = {"digits-mlp": time_model("digits", 2, 1, 1, device, batch=16)}
        memory = measure_memory(["sgd", "seng implicit (Eq. 23)"], 256, parallel=True)
        args.memory_width = 256
    else:
        times = {
            "digits-mlp": time_model("digits", 30, 20, 10, device),
            "mnist-cnn": time_model("mnist", 40, 10, 5, device),
        }
        memory = measure_memory(list(memory_configs()), args.memory_width)
    result = {
        "environment": environment(args.device),
        "targets": TARGETS,
        "seed": SEED,
        "time": times,
        "memory": memory,
        "memory_width": args.memory_width,
    }
    result["environment"]["load_average_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    write_json(result, args.out / "seng_speed.json")
    plot(result, args.out / "seng_speed.png")
    for model, record in result["time"].items():
        for name, c in record["configs"].items():
            print(
                f"{model:11s} {name:26s} {c['median_ms']:8.2f} ms  paired x{c['ratio_paired']:.2f}  medians "
                f"x{c['ratio_median']:.2f}  amortized x{c['ratio_amortized']:.2f}"
            )
    for name, m in result["memory"].items():
        print(
            f"memory {name:34s} peak {m['peak_bytes'] / 2**20:7.0f} MiB x{m['ratio_peak']:.2f}  increment "
            f"{m['increment_bytes'] / 2**20:6.0f} MiB x{m['ratio_increment']:.2f}"
        )
    print(f"{result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
