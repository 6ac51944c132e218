"""Gauss-Newton solvers compared: dense (Gram through the layers' structure + Cholesky),
plain CG, sketch-preconditioned CG (Algorithm 2 of the near-linear-time paper) and
Nystrom-preconditioned CG. Writes benchmarks/results/gn_solvers.{json,png}.

1. The paper's regime (Algorithm 1): a two-layer ReLU network, d = 16, width m fixed
   at 65536 >= 16 n, fixed +-1 output weights, full batch n = 512 ... 4096, damping 0.
   Per n, the solvers take one GN step from the same weights, in turns (round robin,
   ``ROUNDS`` rounds); step time = ``opt.step()`` (solve + direction + update), the
   backward pass (Jacobian capture, the same for all) is reported apart; cg and
   nystrom-pcg only up to n = 1024 (25-40 s a step at 2048). Iterative
   solvers run to relative residual 1e-4 (the paper's eps_0 <= sqrt(lambda/n)/6 needs
   no more); the error ratio ||f_1 - y|| / ||f_0 - y|| shows the steps agree.
2. The deeper models: the teacher task's MLP 16-256-256-1 (mse, damping 0.1) at batch
   128 / 512 / 2048, and a CNN on 8x8 digits (cross-entropy, k = 10, damping 1) at
   batch 64 / 128 / 256 (n = 10 b rows), default tolerances; which solver wins.
3. CG iterations to relative residual 1e-8 on (A^T A) x = A^T b with prescribed spectra
   (A 16384 x 256, cond(A^T A) = 1e2 ... 1e10): no preconditioner, the sketch (QR)
   preconditioner of fast_regression, and Nystrom of rank 32 and 128.

    python benchmarks/gn_solvers.py            # about 12 minutes on 2 shared cores (728 s measured)
    python benchmarks/gn_solvers.py --medium   # smaller sizes (n <= 1024, m = 16384)
"""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import gramopt
from bench_common import arguments, environment, pyplot, write_json
from gramopt.linalg import fast_regression, nystrom_preconditioner, pcg

ROUNDS = 2
#: (paper sizes n, paper width m, MLP batches, CNN batches, conditioning rows x columns) per size
SIZES = {
    "full": ([512, 1024, 2048, 4096], 65536, [128, 512, 2048], [64, 128, 256], (16384, 256)),
    "medium": ([256, 512, 1024], 16384, [128, 512], [64, 128], (4096, 128)),
    "quick": ([32, 64], 512, [16, 32], [8, 16], (256, 32)),
}


def two_layer(n: int, m: int, d: int = 16, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """f(x) = a^T relu(W x) / sqrt(m), a in {-1, +1}^m fixed, unit-norm inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1, generator=g)
    model = nn.Sequential(nn.Linear(d, m, bias=False), nn.ReLU(), nn.Linear(m, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(m, d, generator=g))
        model[2].weight.copy_((torch.randint(0, 2, (1, m), generator=g) * 2.0 - 1) / math.sqrt(m))
    model[2].weight.requires_grad_(False)
    return model, x, y


def teacher_mlp(b: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    x = torch.randn(b, 16, generator=g)
    return model, x / x.norm(dim=1, keepdim=True), torch.randn(b, 1, generator=g)


def digits_cnn(b: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 10),
    )
    x = torch.tensor(data.data[:b], dtype=torch.float32).view(b, 1, 8, 8) / 16.0
    return model, x, torch.tensor(data.target[:b], dtype=torch.long)


def time_solvers(build, configs: dict, *, loss: str, damping: float, rounds: int) -> dict:
    """One GN step per solver from the same weights, in turns (a garbage collection before
    each but in a one-round smoke run); seconds and solve info."""
    model, x, y = build()
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    out: dict = {name: {"step": [], "backward": []} for name in configs}
    names = list(configs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            solver, options = configs[name]
            model.load_state_dict(start_state)
            if rounds > 1:
                gc.collect()
            opt = gramopt.GGN(model, lr=1.0, damping=damping, loss=loss, solver=solver, solver_options=options)
            t0 = time.perf_counter()
            output = model(x)
            opt.backward(output, y)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            with torch.no_grad():
                after = float(fn(model(x), y))
            info = opt.last_info
            opt.close()
            rec = out[name]
            rec["step"].append(t2 - t1)
            rec["backward"].append(t1 - t0)
            rec["loss_before"], rec["loss_after"] = float(info.loss), after
            rec["iterations"] = info.solve.iterations
            rec["residual"] = info.solve.residuals[-1] if info.solve.residuals else None
            rec["converged"] = info.solve.converged
            rec["method"] = info.solve.method
            rec["phases"] = {k: round(v, 4) for k, v in info.seconds.items()}
            del opt, output
    model.load_state_dict(start_state)
    for rec in out.values():
        rec["step_median"] = statistics.median(rec["step"])
        rec["backward_median"] = statistics.median(rec["backward"])
    return out


def auto_choice(build, loss: str, damping: float) -> str:
    """The path ``solver="auto"`` takes for this model and batch (``SolveInfo.method`` of
    one step: ``cholesky``, or ``fast-regression-cg`` for sketch-pcg)."""
    model, x, y = build()
    opt = gramopt.GGN(model, damping=damping, loss=loss, solver="auto")
    opt.backward(model(x), y)
    opt.step()
    choice = opt.last_info.solve.method
    opt.close()
    return choice


def paper_regime(sizes: list[int], width: int, rounds: int) -> dict:
    tol = {"tol": 1e-4}
    results = {}
    for n in sizes:
        configs = {
            "dense": ("cholesky", None),
            "sketch-pcg": ("sketch-pcg", tol),
            "sketch-pcg countsketch x1": ("sketch-pcg", {**tol, "sketch": "countsketch", "oversampling": 1.0}),
        }
        if n <= 1024:  # their trend is clear by then; at 2048 they take 25-40 s a step
            configs["cg"] = ("cg", tol)
            configs["nystrom-pcg r32"] = ("nystrom-pcg", {**tol, "rank": 32})
        print(f"[paper] n={n} m={width}", flush=True)
        res = time_solvers(functools.partial(two_layer, n, width), configs, loss="mse", damping=0.0, rounds=rounds)
        res["auto_choice"] = auto_choice(functools.partial(two_layer, n, width), "mse", 0.0)
        for name, rec in res.items():
            if isinstance(rec, dict):
                print(
                    f"  {name:28s} step {rec['step_median']:7.2f}s  backward {rec['backward_median']:6.2f}s  it "
                    f"{rec['iterations']:4d}  "
                    f"loss {rec['loss_before']:.3f}->{rec['loss_after']:.4f}",
                    flush=True,
                )
        results[n] = res
    return results


def deeper(rounds: int, mlp_batches: list[int], cnn_batches: list[int]) -> dict:
    configs = {
        "dense": ("cholesky", None),
        "cg": ("cg", None),
        "sketch-pcg": ("sketch-pcg", None),
        "nystrom-pcg r64": ("nystrom-pcg", {"rank": 64}),
    }
    results: dict = {"mlp": {}, "cnn": {}}
    for b in mlp_batches:
        print(f"[mlp] b={b}", flush=True)
        res = time_solvers(functools.partial(teacher_mlp, b), configs, loss="mse", damping=0.1, rounds=rounds)
        res["auto_choice"] = auto_choice(functools.partial(teacher_mlp, b), "mse", 0.1)
        results["mlp"][b] = res
    for b in cnn_batches:
        print(f"[cnn] b={b}", flush=True)
        res = time_solvers(functools.partial(digits_cnn, b), configs, loss="cross_entropy", damping=1.0, rounds=rounds)
        res["auto_choice"] = auto_choice(functools.partial(digits_cnn, b), "cross_entropy", 1.0)
        results["cnn"][b] = res
    for kind, by_b in results.items():
        for b, res in by_b.items():
            line = "  ".join(
                f"{name} {rec['step_median']:.3f}s/{rec['iterations']}it"
                for name, rec in res.items()
                if isinstance(rec, dict)
            )
            print(f"  {kind} b={b}: {line}  auto->{res['auto_choice']}", flush=True)
    return results


def conditioning(rows: int, k: int) -> dict:
    """CG iterations to 1e-8 against cond(A^T A), float64, ``A`` ``[rows, k]``."""
    torch.manual_seed(0)
    conds = [1e2, 1e4, 1e6, 1e8, 1e10]
    out: dict = {"rows": rows, "cols": k, "conds": conds, "iterations": {}}
    for cond in conds:
        g = torch.Generator().manual_seed(int(math.log10(cond)))
        u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q
        a = u * torch.logspace(0, -0.5 * math.log10(cond), k, dtype=torch.float64) @ v.T
        y = a.T @ torch.randn(rows, generator=g, dtype=torch.float64)
        matvec = functools.partial(normal_product, a)
        runs = {"none": pcg(matvec, y, tol=1e-8, max_iter=5000)[1]}
        runs["sketch (QR)"] = fast_regression(a, y, tol=1e-8, generator=torch.Generator().manual_seed(0))[1]
        for rank in (32, 128) if k > 128 else (k // 4, k // 2):
            pre = nystrom_preconditioner(matvec, k, rank, 0.0, generator=torch.Generator().manual_seed(0))
            runs[f"nystrom r{rank}"] = pcg(matvec, y, precond=pre, tol=1e-8, max_iter=5000)[1]
        for name, info in runs.items():
            out["iterations"].setdefault(name, []).append(info.iterations if info.converged else None)
        print(
            f"[cond] {cond:.0e}: "
            + "  ".join(f"{n} {i.iterations}{'' if i.converged else '(no)'}" for n, i in runs.items()),
            flush=True,
        )
    return out


def normal_product(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``A^T A z``."""
    return a.T @ (a @ z)


def slope(ns: list[int], ts: list[float]) -> float:
    lx, ly = [math.log(v) for v in ns], [math.log(v) for v in ts]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--medium", action="store_true", help="smaller sizes (n <= 1024, m = 16384)")
    args = parser.parse_args()
    torch.manual_seed(0)
    began = time.perf_counter()
    sizes, width, mlp_batches, cnn_batches, (rows, cols) = SIZES[
        "quick" if args.quick else "medium" if args.medium else "full"
    ]
    rounds = 1 if args.quick else ROUNDS
    partial = args.out / "gn_solvers.partial.json"
    paper = paper_regime(sizes, width, rounds)
    write_json({"paper_regime": paper}, partial)
    deep = deeper(rounds, mlp_batches, cnn_batches)
    write_json({"paper_regime": paper, "deeper_models": deep}, partial)
    cond = conditioning(rows, cols)
    partial.unlink()
    ns = sorted(paper)
    summary = {}
    for name in ("dense", "sketch-pcg", "sketch-pcg countsketch x1"):
        times = [paper[n][name]["step_median"] for n in ns]
        summary[name] = {"slope": slope(ns, times), "seconds": times}
    largest = ns[-1]
    for name in ("sketch-pcg", "sketch-pcg countsketch x1"):
        ratios = [d / s for d, s in zip(paper[largest]["dense"]["step"], paper[largest][name]["step"], strict=True)]
        summary[name]["speedup_vs_dense_at_largest_n"] = statistics.median(ratios)
        summary[name]["speedup_per_round"] = ratios
    record = {
        "what": "GN step time (opt.step: solve + direction + update) per solver; see the module docstring",
        "paper_regime": {"width": width, "d": 16, "by_n": paper, "summary": summary},
        "deeper_models": deep,
        "conditioning": cond,
        "seconds_total": time.perf_counter() - began,
        "environment": environment(),
    }
    write_json(record, args.out / "gn_solvers.json")
    plot(record, args.out / "gn_solvers.png")
    for name, s in summary.items():
        print(
            f"{name}: slope {s['slope']:.2f}"
            + (
                f", speedup at n={largest}: {s['speedup_vs_dense_at_largest_n']:.2f}x"
                if "speedup_vs_dense_at_largest_n" in s
                else ""
            )
        )
    print(f"total {record['seconds_total']:.0f}s")


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    paper = record["paper_regime"]["by_n"]
    ns = sorted(paper)
    ax = axes[0]
    for name in ("dense", "cg", "sketch-pcg", "sketch-pcg countsketch x1", "nystrom-pcg r32"):
        pts = [(n, paper[n][name]["step_median"]) for n in ns if name in paper[n]]
        if pts:
            ax.loglog(*zip(*pts, strict=True), "o-", label=name)
    ax.set_xlabel("n (batch)")
    ax.set_ylabel("GN step seconds (median)")
    ax.set_title(f"two-layer ReLU, m={record['paper_regime']['width']}, d=16")
    ax.legend(fontsize=7)
    ax = axes[1]
    deep = record["deeper_models"]
    for kind, marker in (("mlp", "o-"), ("cnn", "s--")):
        bs = sorted(deep[kind])
        for name in ("dense", "cg", "sketch-pcg", "nystrom-pcg r64"):
            ax.loglog(bs, [deep[kind][b][name]["step_median"] for b in bs], marker, label=f"{kind} {name}")
    ax.set_xlabel("batch b")
    ax.set_ylabel("GN step seconds (median)")
    ax.set_title("MLP 16-256-256-1 (mse), CNN digits (CE, n=10b)")
    ax.legend(fontsize=6)
    ax = axes[2]
    cond = record["conditioning"]
    for name, its in cond["iterations"].items():
        pts = [(c, i) for c, i in zip(cond["conds"], its, strict=True) if i is not None]
        ax.loglog(*zip(*pts, strict=True), "o-", label=name)
    ax.set_xlabel("cond(A^T A)")
    ax.set_ylabel("CG iterations to 1e-8")
    ax.set_title(f"A {cond['rows']} x {cond['cols']}, prescribed spectrum")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
