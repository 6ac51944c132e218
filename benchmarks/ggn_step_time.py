"""GGN step time relative to an SGD-momentum step (issue 2's speed goal).

Scalar-output MLP at digits size (64-W-W-1, tanh), batch 128, mse, for the digits width
W = 128 and a wide W = 1024. Timed in turns in one process (gramopt.compare.timing). Also
times a naive GGN that builds J with torch.func (vmap(jacrev)) for context. Writes
benchmarks/results/ggn_step_time.{json,png}.

Flop count per layer with batch b, fan-in d_in, fan-out d_out: forward and each
weight-gradient ``b d_in d_out``; the layer's Gram block ``b^2 (d_in + d_out)``. With
b = 128 = W the Gram alone costs about three forward passes, so GGN cannot be within
1.5x of SGD at digits width; at W = 1024 >> b it costs a fraction of one.

    python benchmarks/ggn_step_time.py
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, jacrev, vmap  # noqa: E402

import gramopt  # noqa: E402
from gramopt.compare.timing import interleaved_times, ratio_summary  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def main() -> None:
    torch.set_num_threads(1)  # steadier on shared 2-core machines; recorded below
    record = {
        "what": "seconds per step, MLP 64-W-W-1 (tanh), batch 128, mse; ratio to SGD-momentum per round",
        "method": "gramopt.compare.timing.interleaved_times: 30 rounds x 5 steps, rotating order, 3 warm-up steps",
        "widths": {},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    for width in (128, 1024):
        summary, samples = time_width(width)
        record["widths"][str(width)] = {"summary": summary, "samples": samples}
        for name, s in summary.items():
            print(f"W={width:5d} {name:16s} {1e3 * s['median_seconds']:8.3f} ms  ratio {s['ratio_median']:.2f} [{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ggn_step_time.json").write_text(json.dumps(record, indent=2))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (width, entry) in zip(axes, record["widths"].items()):
        summary = entry["summary"]
        labels = list(summary)
        ax.bar(labels, [summary[n]["ratio_median"] for n in labels], color=["gray", "tab:blue", "tab:red"])
        ax.axhline(1.5, ls="--", color="k", lw=0.8, label="target 1.5x")
        ax.set_yscale("log")
        ax.set_title(f"MLP 64-{width}-{width}-1, b=128")
        ax.set_ylabel("step time / SGD step (median)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "ggn_step_time.png", dpi=120)


def time_width(width: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    x, y = torch.randn(128, 64), torch.randn(128, 1)
    loss_fn = nn.MSELoss()

    sgd_model = mlp(width)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step() -> None:
        sgd.zero_grad()
        loss_fn(sgd_model(x), y).backward()
        sgd.step()

    ggn_model = mlp(width)
    ggn = gramopt.GGN(ggn_model, lr=0.1, damping=1.0)

    def ggn_step() -> None:
        ggn.zero_grad()
        ggn.backward(ggn_model(x), y)
        ggn.step()

    naive_model = mlp(width)
    names = [n for n, _ in naive_model.named_parameters()]

    def naive_step() -> None:
        params = {n: p.detach() for n, p in naive_model.named_parameters()}
        f = lambda theta, xi: functional_call(naive_model, theta, (xi.unsqueeze(0),)).squeeze(0)  # noqa: E731
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
        j = torch.cat([jac[n].reshape(128, -1) for n in names], dim=1)
        with torch.no_grad():
            e = (naive_model(x) - y).reshape(-1)
            a = torch.linalg.solve(j @ j.T + torch.eye(128), e)
            delta = j.T @ a
            start = 0
            for p in naive_model.parameters():
                p.sub_(0.1 * delta[start : start + p.numel()].view_as(p))
                start += p.numel()

    steps = {"sgd": sgd_step, "ggn": ggn_step}
    if width <= 256:  # the naive Jacobian of the wide model takes seconds per step
        steps["ggn-vmap-jacrev"] = naive_step
    samples = interleaved_times(steps, rounds=30)
    return ratio_summary(samples, "sgd"), samples


if __name__ == "__main__":
    main()
