"""Probe: GGN's mse step time against SGD-momentum's, at digits width and on a wide MLP.

Conclusion (benchmarks/notes.md, "GGN mse step time by width"; ``benchmarks/results/
ggn_step_time.{json,png}``): on the scalar-output MLP 64-W-W-1 (tanh), batch 128, one
thread, GGN's step cost 2.29x SGD-momentum's at W = 128 and 1.27x at W = 1024, so issue 2's
1.5x goal holds only where the layers are wider than the batch; a GGN that builds J by
``torch.func`` (``vmap(jacrev)``) cost 18.9x at W = 128. Filling ``.grad`` of the
preconditioned layers by one more backward pass took an earlier GGN from 1.2x to 1.8x on
the wide model, which is why GGN fills it only until its first step succeeds.

Why: per layer with batch b, fan-in d_in, fan-out d_out, the forward pass and each weight
gradient cost ``b d_in d_out`` multiply-adds, the layer's Gram block ``b^2 (d_in + d_out)``.
With b = 128 = W the Gram alone costs about three forward passes; at W = 1024 >> b a
fraction of one. Timed in turns in one process (``gramopt.compare.timing``).

    PYTHONPATH=src python benchmarks/probes/ggn_step_time.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import gramopt
from gramopt.compare.timing import interleaved_times, ratio_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import arguments, environment, pyplot, write_json  # noqa: E402


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def main() -> None:
    args = arguments(__doc__).parse_args()
    widths, batch, rounds = ((16, 32), 16, 2) if args.quick else ((128, 1024), 128, 30)
    torch.set_num_threads(1)  # steadier on shared 2-core machines; recorded below
    record = {
        "what": f"seconds per step, MLP 64-W-W-1 (tanh), batch {batch}, mse; ratio to SGD-momentum per round",
        "method": f"gramopt.compare.timing.interleaved_times: {rounds} rounds x 5 steps, rotating order, 3 warm-up "
            "steps",
        "widths": {},
        "environment": environment(),
    }
    for width in widths:
        summary, samples = time_width(width, batch, rounds, naive=width <= 256)
        record["widths"][str(width)] = {"summary": summary, "samples": samples}
        for name, s in summary.items():
            print(
                f"W={width:5d} {name:16s} {1e3 * s['median_seconds']:8.3f} ms  ratio {s['ratio_median']:.2f} "
                f"[{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]"
            )
    write_json(record, args.out / "ggn_step_time.json")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(widths), figsize=(9, 3.2))
    for ax, (width, entry) in zip(axes, record["widths"].items(), strict=True):
        summary = entry["summary"]
        labels = list(summary)
        ax.bar(
            labels, [summary[n]["ratio_median"] for n in labels], color=["gray", "tab:blue", "tab:red"][: len(labels)]
        )
        ax.axhline(1.5, ls="--", color="k", lw=0.8, label="target 1.5x")
        ax.set_yscale("log")
        ax.set_title(f"MLP 64-{width}-{width}-1, b={batch}")
        ax.set_ylabel("step time / SGD step (median)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "ggn_step_time.png", dpi=120)


def time_width(width: int, batch: int, rounds: int, naive: bool) -> tuple[dict, dict]:
    """Step functions of SGD-momentum, GGN and (``naive``) a vmap(jacrev) GGN, timed in turns."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 64), torch.randn(batch, 1)
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
        j = torch.cat([jac[n].reshape(batch, -1) for n in names], dim=1)
        with torch.no_grad():
            e = (naive_model(x) - y).reshape(-1)
            a = torch.linalg.solve(j @ j.T + torch.eye(batch), e)
            delta = j.T @ a
            start = 0
            for p in naive_model.parameters():
                p.sub_(0.1 * delta[start : start + p.numel()].view_as(p))
                start += p.numel()

    steps = {"sgd": sgd_step, "ggn": ggn_step}
    if naive:  # the naive Jacobian of the wide model takes seconds per step
        steps["ggn-vmap-jacrev"] = naive_step
    samples = interleaved_times(steps, rounds=rounds)
    return ratio_summary(samples, "sgd"), samples


if __name__ == "__main__":
    main()
