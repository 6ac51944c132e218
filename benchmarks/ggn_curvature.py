"""GGN step time per output curvature, cross-entropy, as a ratio to SGD-momentum (issue 16).

Models (batch b = 128, one thread):

- ``mlp``: MLP 64-256-256-10 (tanh) on random inputs and labels;
- ``mnist``: the ``mnist`` task's CNN (``gramopt.tasks.get_task("mnist").build_model``)
  on the task's images;
- ``recall``: the ``recall`` task's one-block Transformer on the task's sequences.

Optimizers: SGD-momentum (the baseline), GGN ``curvature="exact"`` (one backward pass
per class, a b k system), ``"top"`` with s = 3 (3 passes, b 3 system) and ``"sampled"``
with s = 1 (1 sampled pass + 1 gradient pass, b 1 system). GGN runs with a fixed damping
(``damping_adaptation=None``): the step itself; the default adaptation (one forward pass
after every step, ``AdaptiveDamping.every`` = 1, and a copy of the parameters to undo a
step that raised its batch's loss) is reported separately as ``top3-adaptive``.

Timing: ``bench_common.interleaved`` (rotating order; per round one turn of each step
function, a turn as many steps as make SGD's last about ``TURN_SECONDS``; the ratio to SGD
in the same round; median, min and max over rounds), of the wall-clock time and of the
main thread's CPU time (``time.thread_time``; one thread, so it is the whole step's work
and less sensitive to other processes on a shared machine). Goals (issue 16):
sampled s=1 <= 2.0x on the MLP, top s=3 <= 6x on the MLP and <= 3x on the CNN and the
Transformer. Also records, per GGN variant, the phase seconds of its last step
(``opt.last_info``/``_seconds``: jacobian, gradient, factors, solve, direction) to say
where time goes.

    PYTHONPATH=src python benchmarks/ggn_curvature.py
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import gramopt
from bench_common import arguments, environment, interleaved, pyplot, write_json
from gramopt.compare.timing import ratio_summary
from gramopt.tasks import get_task

ROUNDS, TURN_SECONDS = 15, 0.05
VARIANTS: dict[str, dict] = {
    "exact": dict(curvature="exact"),
    "top3": dict(curvature="top", samples=3),
    "sampled1": dict(curvature="sampled", samples=1, seed=0),
}
GOALS = {("mlp", "sampled1"): 2.0, ("mlp", "top3"): 6.0, ("mnist", "top3"): 3.0, ("recall", "top3"): 3.0}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


def workload(name: str, batch: int) -> tuple[Callable[[], nn.Module], Tensor, Tensor]:
    """``(build_model, x [b, ...], y [b])`` of a workload."""
    if name == "mlp":
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 64, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        return mlp, x, y
    task = get_task(name)
    split = task.load(0)
    return (lambda: task.build_model(0)), split.train_x[:batch], split.train_y[:batch]


def time_workload(name: str, batch: int, rounds: int, turn_seconds: float) -> dict:
    build, x, y = workload(name, batch)
    loss_fn = nn.CrossEntropyLoss()
    steps: dict[str, Callable[[], None]] = {}
    sgd_model = build()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step() -> None:
        sgd.zero_grad()
        loss_fn(sgd_model(x), y).backward()
        sgd.step()

    steps["sgd"] = sgd_step
    optimizers = {}
    settings = {
        **{k: {**v, "damping_adaptation": None} for k, v in VARIANTS.items()},
        "top3-adaptive": dict(VARIANTS["top3"]),
    }
    for variant, options in settings.items():
        model = build()
        # a small lr keeps the timed runs away from divergence (the step's cost does not depend on it)
        opt = gramopt.GGN(model, lr=0.01, damping=3.0, loss="cross_entropy", divergence=None, **options)
        optimizers[variant] = opt

        def step(model: nn.Module = model, opt: gramopt.GGN = opt) -> None:
            opt.zero_grad()
            opt.backward(model(x), y)
            opt.step()

        steps[variant] = step
    wall, cpu, inner = interleaved(steps, rounds=rounds, seconds_per_turn=turn_seconds, device=torch.device("cpu"))
    summary, summary_cpu = ratio_summary(wall, "sgd"), ratio_summary(cpu, "sgd")
    phases = {}
    for variant, opt in optimizers.items():
        info = opt.last_info
        phases[variant] = {k: float(v) for k, v in getattr(opt, "_seconds", {}).items()}
        if info is not None:
            phases[variant]["solve_method"] = str(getattr(info, "method", ""))
    return {
        "steps_per_turn": inner,
        "summary": summary,
        "summary_thread_cpu": summary_cpu,
        "samples": wall,
        "samples_thread_cpu": cpu,
        "phases_last_step_seconds": phases,
    }


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "mnist", "recall"])
    args = parser.parse_args()
    batch, rounds, turn_seconds = (16, 2, 0.0) if args.quick else (128, ROUNDS, TURN_SECONDS)
    if args.quick:
        args.workloads = ["mlp"]
    torch.set_num_threads(1)
    record: dict = {
        "what": f"seconds per step, cross-entropy, batch {batch}; ratio to SGD-momentum per round (median, min, max)",
        "method": (
            f"bench_common.interleaved: {rounds} rounds, rotating order, turns of ~{turn_seconds} s of SGD steps, "
            "5 warm-up steps; wall clock (summary) and main-thread CPU time (summary_thread_cpu)"
        ),
        "ggn": "lr 0.01, damping 3; damping_adaptation=None except top3-adaptive (the default AdaptiveDamping: every "
            "step, reject)",
        "goals": {f"{w}/{v}": g for (w, v), g in GOALS.items()},
        "workloads": {},
        "environment": environment("cpu"),
    }
    for name in args.workloads:
        entry = time_workload(name, batch, rounds, turn_seconds)
        record["workloads"][name] = entry
        for variant, s in entry["summary"].items():
            c = entry["summary_thread_cpu"][variant]
            goal = GOALS.get((name, variant))
            tail = "" if goal is None else f"  goal <= {goal:g}: {'met' if s['ratio_median'] <= goal else 'MISSED'}"
            print(
                f"{name:7s} {variant:14s} {1e3 * s['median_seconds']:8.2f} ms  ratio {s['ratio_median']:6.2f} "
                f"[{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]  thread CPU {c['ratio_median']:6.2f}{tail}",
                flush=True,
            )
    workloads = record["workloads"]
    for key, summary in (("goals_met", "summary"), ("goals_met_thread_cpu", "summary_thread_cpu")):
        record[key] = {
            f"{w}/{v}": workloads[w][summary][v]["ratio_median"] <= g for (w, v), g in GOALS.items() if w in workloads
        }
    write_json(record, args.out / "ggn_curvature.json")
    plot(record, args.out / "ggn_curvature.png", batch)


def plot(record: dict, path: Path, batch: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(record["workloads"]), figsize=(4 * len(record["workloads"]), 3.4), squeeze=False)
    titles = {"mlp": "MLP 64-256-256-10", "mnist": "mnist task CNN", "recall": "recall task Transformer"}
    for ax, (name, entry) in zip(axes[0], record["workloads"].items(), strict=True):
        summary = entry["summary"]
        labels = [n for n in summary if n != "sgd"]
        medians = [summary[n]["ratio_median"] for n in labels]
        low = [m - summary[n]["ratio_min"] for n, m in zip(labels, medians, strict=True)]
        high = [summary[n]["ratio_max"] - m for n, m in zip(labels, medians, strict=True)]
        ax.bar(labels, medians, yerr=[low, high], color=["tab:red", "tab:blue", "tab:green", "tab:cyan"], capsize=3)
        for variant in labels:
            goal = GOALS.get((name, variant))
            if goal is not None:
                i = labels.index(variant)
                ax.hlines(goal, i - 0.4, i + 0.4, colors="k", linestyles="--", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{titles[name]}, b={batch}")
        ax.set_ylabel("step time / SGD-momentum step")
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle("GGN cross-entropy step time by curvature (dashed: issue 16 goals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
