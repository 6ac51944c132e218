"""Algorithm 1 (FASTERTWOLAYER) of "Training (Overparametrized) Neural Networks in
Near-Linear Time" with gramopt.

A two-layer ReLU network f(x) = a^T relu(W x) / sqrt(m) with fixed output weights
a in {-1, +1}^m and Gaussian W_0 (Section 3.1) is trained on the full batch by
Gauss-Newton steps W <- W - J^T g, where g is an eps_0-approximate solution of
min_g ||J J^T g - (f - y)|| found by the sketch-preconditioned solver (Algorithm 2):
``GGN(lr=1, damping=0, solver="sketch-pcg")``. Theorem 4.1: ||f - y|| at least halves
at every step. The same steps with the exact (Cholesky) solve are shown for comparison.

    python examples/faster_two_layer.py [--n 512] [--width 8192] [--dim 16] [--steps 8] [--dtype float64]

In float32 the error stops falling near 1e-5 (the outputs' own rounding), so the
halving is checked only above 1e3 * eps * ||f_0 - y||.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import gramopt


def two_layer_relu(n: int, m: int, d: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True)  # ||x_i|| = 1 (Section 3.1)
    y = torch.randn(n, 1, generator=g)
    model = nn.Sequential(nn.Linear(d, m, bias=False), nn.ReLU(), nn.Linear(m, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(m, d, generator=g))  # W_0 Gaussian
        model[2].weight.copy_((torch.randint(0, 2, (1, m), generator=g) * 2.0 - 1) / math.sqrt(m))
    model[2].weight.requires_grad_(False)  # a is fixed over all iterations
    return model, x, y


def train(solver: str, options: dict | None, args: argparse.Namespace) -> list[float]:
    model, x, y = two_layer_relu(args.n, args.width, args.dim)
    opt = gramopt.GGN(model, lr=1.0, damping=0.0, loss="mse", solver=solver, solver_options=options)
    errors = []
    print(f"\n{solver} {options or ''}")
    for t in range(args.steps):
        out = model(x)
        errors.append(float((out.detach() - y).norm()))
        start = time.perf_counter()
        opt.backward(out, y)
        opt.step()
        seconds = time.perf_counter() - start
        info = opt.last_info.solve
        ratio = "" if t == 0 else f"  ratio {errors[t] / errors[t - 1]:.3f}"
        print(f"  step {t}: ||f - y|| = {errors[t]:.3e}{ratio}  solve iterations {info.iterations:3d}  {seconds:.2f}s")
    with torch.no_grad():
        errors.append(float((model(x) - y).norm()))
    print(f"  final ||f - y|| = {errors[-1]:.3e}  ratio {errors[-1] / errors[-2]:.3f}")
    opt.close()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512, help="training points (full batch)")
    parser.add_argument("--width", type=int, default=8192, help="hidden width m (>= 16 n)")
    parser.add_argument("--dim", type=int, default=16, help="input dimension d")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.manual_seed(0)
    fast = train("sketch-pcg", {"tol": 1e-4}, args)
    exact = train("cholesky", None, args)
    floor = 1e3 * torch.finfo(torch.get_default_dtype()).eps * fast[0]
    halved = all(b <= 0.5 * a for a, b in zip(fast, fast[1:], strict=False) if a > floor)
    print(f"\nTheorem 4.1 (each step at least halves ||f - y||): {'holds' if halved else 'VIOLATED'}")
    print(f"final error sketch-pcg {fast[-1]:.2e}, cholesky {exact[-1]:.2e}")


if __name__ == "__main__":
    main()
