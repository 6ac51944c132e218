"""GGN Theorem 2: mini-batch GGN with batches taken sequentially and cyclically converges
linearly, per epoch at the rate rho(A) of the block Gauss-Seidel iteration matrix
A = L^T (D - L)^{-1} of the initial Gram matrix G_0 (Cai et al., Theorem 2, Eq. 15-16).

Setting (the theorem's): the two-layer network of Eq. (12) (as in ggn_theorem1_width.py:
tanh, W ~ N(0, I), a in {-1, +1} fixed, only W trained), n unit-norm teacher inputs (d = 16),
batch size b, k = n / b batches in a fixed cyclic order, GGN with lr = 1 and damping = 0
(Eq. 10), float64.

Predicted rate: G_0 in closed form, G_0[i, j] = (x_i . x_j / M) sum_r sigma'(w_r . x_i)
sigma'(w_r . x_j) (independent of gramopt), then rho(A) from Eq. (15), and as a cross-check
the spectral radius of the linearized epoch map prod_i (I - G_0[:, B_i] G_0[B_i, B_i]^{-1}
E_i^T). Measured rate: the per-epoch factor of ||f - y||_2, a least-squares fit of
log ||f_{Tk} - y|| over the second half of the epochs (above the float64 floor). The claim
holds if the measured rate is at most rho(A) plus a width-dependent slack that shrinks as M
grows (we report measured / predicted per width).

    PYTHONPATH=src python benchmarks/papers/ggn_theorem2_minibatch.py [--quick]
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

import gramopt
from common import PAPERS, parse_args, write
from ggn_theorem1_width import TwoLayer
from gramopt.tasks.regression import load_teacher

FLOOR = 1e-11


def initial_gram(model: TwoLayer, x: torch.Tensor) -> torch.Tensor:
    """G_0 = J J^T of Eq. (12) w.r.t. W in closed form, ``[n, n]``."""
    with torch.no_grad():
        pre = x @ model.hidden.weight.T  # [n, M]
        slope = 1.0 - torch.tanh(pre) ** 2  # sigma'
        width = pre.shape[1]
        return (x @ x.T) * (slope @ slope.T) / width


def iteration_matrices(gram: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = L^T (D - L)^{-1} (Eq. 15) and the linearized epoch map, both ``[n, n]``."""
    n = gram.shape[0]
    blocks = range(0, n, batch)
    d = torch.zeros_like(gram)
    for s in blocks:
        d[s : s + batch, s : s + batch] = gram[s : s + batch, s : s + batch]
    lower = -torch.tril(gram - d)  # L = minus the strictly block-lower part
    a = lower.T @ torch.linalg.inv(d - lower)
    epoch = torch.eye(n, dtype=gram.dtype)
    for s in blocks:
        rows = slice(s, s + batch)
        selector = torch.zeros(batch, n, dtype=gram.dtype)
        selector[:, rows] = torch.eye(batch, dtype=gram.dtype)
        step = torch.eye(n, dtype=gram.dtype) - gram[:, rows] @ torch.linalg.solve(gram[rows, rows], selector)
        epoch = step @ epoch
    return a, epoch


def spectral_radius(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvals(m).abs().max())


def condition_of_eigenvectors(m: torch.Tensor) -> float:
    """mu = ||P|| ||P^{-1}|| of a diagonalization (Assumption 2)."""
    _, vectors = torch.linalg.eig(m)
    return float(torch.linalg.cond(vectors))


def run_width(x: torch.Tensor, y: torch.Tensor, width: int, batch: int, epochs: int, seed: int) -> dict[str, Any]:
    model = TwoLayer(x.shape[1], width, torch.Generator().manual_seed(seed)).double()
    gram = initial_gram(model, x)
    a, epoch_map = iteration_matrices(gram, batch)
    rho, rho_epoch = spectral_radius(a), spectral_radius(epoch_map)
    opt = gramopt.GGN(model, lr=1.0, damping=0.0, loss="mse", params=[model.hidden.weight])
    with torch.no_grad():
        errors = [float((model(x) - y).norm())]
    start = time.perf_counter()
    for _ in range(epochs):
        for s in range(0, x.shape[0], batch):
            opt.zero_grad()
            opt.backward(model(x[s : s + batch]), y[s : s + batch])
            opt.step()
        with torch.no_grad():
            errors.append(float((model(x) - y).norm()))
        if errors[-1] < FLOOR * errors[0]:
            break
    seconds = time.perf_counter() - start
    opt.close()
    usable = [(t, math.log(e)) for t, e in enumerate(errors) if e > FLOOR * errors[0]]
    tail = usable[len(usable) // 2 :] if len(usable) >= 4 else usable
    rate = math.exp(_slope([t for t, _ in tail], [v for _, v in tail])) if len(tail) >= 2 else float("nan")
    mu = condition_of_eigenvectors(a)
    envelope = [mu * math.sqrt(x.shape[0]) * rho**t for t in range(len(errors))]
    return {
        "width": width,
        "seed": seed,
        "rho_A": rho,
        "rho_epoch_map": rho_epoch,
        "mu": mu,
        "within_eq16_envelope_mu_sqrt_n_rho_T": all(e <= b for e, b in zip(errors, envelope, strict=True)),
        "lambda_min_G0": float(torch.linalg.eigvalsh(gram).min()),
        "errors_per_epoch": errors,
        "measured_rate": rate,
        "measured_over_predicted": rate / rho,
        "seconds": seconds,
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    n, batch, widths, epochs = (16, 4, [256, 1024], 4) if args.quick else (64, 16, [1024, 4096, 16384, 65536], 40)
    split = load_teacher(args.seed)
    x, y = split.train_x[:n].double(), split.train_y[:n].double()
    runs = [run_width(x, y, width, batch, epochs, args.seed) for width in widths]
    widest = runs[-1]
    held = widest["measured_rate"] <= widest["rho_A"] * 1.05 + 1e-3
    payload = {
        "study": "GGN Theorem 2: mini-batch linear rate against the predicted rho(A)",
        "paper": PAPERS["ggn"],
        "claim": "||f_{Tk} - y|| <= mu sqrt(n) (1 - Omega(lambda_0^2/n^2))^T, the per-epoch factor being rho(A) of Eq. "
            "(15) (Theorem 2, Eq. 16)",
        "settings": {
            "n": n,
            "batch": batch,
            "batches_per_epoch": n // batch,
            "widths": widths,
            "max_epochs": epochs,
            "lr": 1.0,
            "damping": 0.0,
            "order": "sequential, cyclic",
            "dtype": "float64",
        },
        "runs": runs,
        "held": held,
        "held_criterion": "at the largest width, measured per-epoch rate <= 1.05 rho(A) + 1e-3",
    }
    return write(args.out, "ggn_theorem2_minibatch", payload, _figure(runs))


def _figure(runs: list[dict[str, Any]]):
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for r in runs:
        line = left.semilogy(r["errors_per_epoch"], label=f"M={r['width']} measured")[0]
        epochs = range(len(r["errors_per_epoch"]))
        left.semilogy(
            epochs,
            [r["errors_per_epoch"][0] * r["rho_A"] ** t for t in epochs],
            "--",
            color=line.get_color(),
            alpha=0.6,
        )
    left.set(xlabel="epoch (k cyclic batches)", ylabel="||f - y||_2", title="Mini-batch GGN; dashed: e_0 rho(A)^T")
    left.legend(fontsize=8)
    widths = [r["width"] for r in runs]
    right.semilogx(widths, [r["measured_rate"] for r in runs], "o-", label="measured per-epoch rate")
    right.semilogx(widths, [r["rho_A"] for r in runs], "s--", label="rho(A), Eq. 15")
    right.set(xlabel="width M", ylabel="per-epoch factor", title="Theorem 2: rate against rho(A)")
    right.legend()
    return fig


if __name__ == "__main__":
    main(sys.argv[1:])
