"""Step time of each method on the model zoo (tests/zoo.py) as a ratio to SGD-momentum.

For each zoo model: SGD-momentum, SENG, FNGD (estimation every step, and sharing) and GGN,
each on its own copy of the model and the zoo's fixed batch, timed in turns in one process
(gramopt.compare.timing.interleaved_times). GGN refuses BatchNorm in training mode, so on
the ResNet and the MobileNet its copy runs the BatchNorm layers in eval mode (the others
train them); the GPT's logits are [b, V, T], which GGN's backward takes. The papers report FNGD at 1.03-1.06x and
SENG at 1.10-1.20x an SGD step on ResNets (GPU, large batches); these are tiny models on
a shared CPU, where per-step overhead weighs more. Writes
benchmarks/results/zoo_step_time.{json,png}.

    python benchmarks/zoo_step_time.py [--rounds 20] [--models resnet,gpt] [--tag after-attention]

(about a minute with the defaults on one thread; ``--tag`` writes
zoo_step_time-TAG.{json,png}, so a re-run keeps the earlier results.)
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import gramopt
from bench_common import arguments, environment, pyplot, write_json
from gramopt.compare.timing import interleaved_times, ratio_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import ZOO  # noqa: E402


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The zoo's losses; per-token logits are ``[b, V, T]`` (class dimension 1)."""
    return F.mse_loss(out, y) if kind == "mse" else F.cross_entropy(out, y)


def _batchnorm_eval(model: torch.nn.Module) -> torch.nn.Module:
    """GGN's documented way with BatchNorm: running statistics (eval mode), the rest trains."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def steps_for(name: str) -> dict:
    def fresh():
        torch.manual_seed(0)
        return ZOO[name](torch.Generator().manual_seed(1))

    model, x, y, kind = fresh()
    loss = "cross_entropy" if "cross_entropy" in kind else "mse"
    makers = {
        "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        "seng": lambda m: gramopt.SENG(m, lr=0.01, damping=1.0, loss=loss, momentum=0.9),
        "fngd": lambda m: gramopt.FNGD(m, lr=0.01, damping=0.1, loss=loss, momentum=0.9),
        "fngd-sharing": lambda m: gramopt.FNGD(m, lr=0.01, damping=0.1, loss=loss, momentum=0.9, coefficient_steps=1),
        "ggn": lambda m: gramopt.GGN(_batchnorm_eval(m), lr=0.1, damping=1.0, loss=loss),
    }
    steps = {}
    for label, make in makers.items():
        model = fresh()[0]
        opt = make(model)

        def step(model=model, opt=opt, label=label) -> None:
            opt.zero_grad()
            if label == "ggn":
                opt.backward(model(x), y)
            else:  # the ordinary loop for every other method
                _loss(kind, model(x), y).backward()
            opt.step()

        steps[label] = step
    return steps


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--models", default=",".join(ZOO), help=f"comma-separated, of {list(ZOO)}")
    parser.add_argument("--tag", default="", help="suffix of the output files (zoo_step_time-TAG.json)")
    args = parser.parse_args()
    if args.quick:  # two zoo models, one round
        args.rounds, args.models = 1, "vit,gpt"
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in ZOO]
    if unknown or not models:
        parser.error(f"unknown zoo models {unknown}; choose from {list(ZOO)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*cannot precondition.*")
    record = {
        "what": "seconds per step on the zoo's fixed batch (size per model below), ordinary loop (GGN: opt.backward); "
            "ratio to SGD-momentum per round",
        "method": f"gramopt.compare.timing.interleaved_times: {args.rounds} rounds x 5 steps, rotating order, 3 "
            "warm-up steps",
        "ggn_note": "GGN's copies of the ResNet and the MobileNet run BatchNorm in eval mode (GGN refuses training "
            "mode)",
        "models": {},
        "commit": _commit(),
        "environment": environment(),
    }
    for name in models:
        samples = interleaved_times(steps_for(name), rounds=args.rounds)
        summary = ratio_summary(samples, "sgd-momentum")
        batch = ZOO[name](torch.Generator().manual_seed(1))[1].shape[0]
        record["models"][name] = {"batch": batch, "summary": summary, "samples": samples}
        for label, s in summary.items():
            print(f"{name:12s} {label:14s} {1e3 * s['median_seconds']:8.2f} ms  ratio {s['ratio_median']:.2f}")
    stem = "zoo_step_time" + (f"-{args.tag}" if args.tag else "")
    write_json(record, args.out / f"{stem}.json")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    labels = ["seng", "fngd", "fngd-sharing", "ggn"]
    width = 0.2
    for i, label in enumerate(labels):
        values = [record["models"][m]["summary"][label]["ratio_median"] for m in models]
        ax.bar([j + i * width for j in range(len(models))], values, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 1.5 * width for j in range(len(models))], models)
    ax.set_yscale("log")
    ax.set_ylabel("step time / SGD-momentum step\n(median of interleaved rounds)")
    ax.set_title("zoo (tests/zoo.py sizes), 1 CPU thread; GGN: BatchNorm in eval mode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)


if __name__ == "__main__":
    main()
