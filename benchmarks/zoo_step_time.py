"""Step time of each method on the model zoo (tests/zoo.py) as a ratio to SGD-momentum.

For each zoo model: SGD-momentum, SENG, FNGD (estimation every step, and sharing) and GGN
where it is defined (not with BatchNorm in training mode, not per-token outputs), each on
its own copy of the model and the zoo's fixed batch, timed in turns in one process
(gramopt.compare.timing.interleaved_times). The papers report FNGD at 1.03-1.06x and
SENG at 1.10-1.20x an SGD step on ResNets (GPU, large batches); these are tiny models on
a shared CPU, where per-step overhead weighs more. Writes
benchmarks/results/zoo_step_time.{json,png}.

    python benchmarks/zoo_step_time.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gramopt  # noqa: E402
from gramopt.compare.timing import interleaved_times, ratio_summary  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from zoo import ZOO  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GGN_UNDEFINED = {"resnet", "mobilenet", "gpt"}


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "token_cross_entropy":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y) if kind == "cross_entropy" else F.mse_loss(out, y)


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
    }
    if name not in GGN_UNDEFINED:
        makers["ggn"] = lambda m: gramopt.GGN(m, lr=0.1, damping=1.0, loss=loss)
    steps = {}
    for label, make in makers.items():
        model = fresh()[0]
        opt = make(model)

        def step(model=model, opt=opt, label=label) -> None:
            opt.zero_grad()
            if label == "ggn":
                opt.backward(model(x), y)
            else:  # the ordinary loop for every method (per-token losses need it)
                _loss(kind, model(x), y).backward()
            opt.step()

        steps[label] = step
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore", message=".*cannot precondition.*")
    record = {
        "what": "seconds per step on the zoo's fixed batch (batch 8), ordinary loop; ratio to SGD-momentum per round",
        "method": f"gramopt.compare.timing.interleaved_times: {args.rounds} rounds x 5 steps, rotating order, 3 warm-up steps",
        "models": {},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1, "machine": platform.machine()},
    }
    for name in ZOO:
        samples = interleaved_times(steps_for(name), rounds=args.rounds)
        summary = ratio_summary(samples, "sgd-momentum")
        record["models"][name] = {"summary": summary, "samples": samples}
        for label, s in summary.items():
            print(f"{name:12s} {label:14s} {1e3 * s['median_seconds']:8.2f} ms  ratio {s['ratio_median']:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zoo_step_time.json").write_text(json.dumps(record, indent=2))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    labels = ["seng", "fngd", "fngd-sharing", "ggn"]
    width = 0.2
    for i, label in enumerate(labels):
        values = [record["models"][m]["summary"].get(label, {}).get("ratio_median", 0.0) for m in ZOO]
        ax.bar([j + i * width for j in range(len(ZOO))], values, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 1.5 * width for j in range(len(ZOO))], list(ZOO))
    ax.set_ylabel("step time / SGD-momentum step (median)")
    ax.set_title("zoo, batch 8, 1 CPU thread (GGN only where defined)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "zoo_step_time.png", dpi=120)


if __name__ == "__main__":
    main()
