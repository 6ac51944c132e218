"""torch's Muon with its orthogonalization in float32: the comparison's ``muon-f32`` peer.

``torch.optim.Muon`` (torch 2.13) casts each update to bfloat16 before its Newton-Schulz
iteration and takes no option to do otherwise. On a CPU without a fast bfloat16 matmul
(``gramopt.compare.hardware``) that iteration alone costs dozens of SGD steps, so a
comparison would time the CPU's bfloat16 path, not Muon. :class:`Float32Muon` is torch's
optimizer (its constructor, checks, state and parameter groups) whose step runs the same
update with the iteration in float32 (float64 for float64 parameters):

    B <- mu B + (1 - mu) G                        (momentum buffer, torch's lerp form)
    U <- (1 - mu) G + mu B  (Nesterov)  or  B
    O <- NS_k(U)                                   (k quintic Newton-Schulz steps, below)
    W <- (1 - lr wd) W - lr s(W) O,   s = sqrt(max(1, m/n))  or  0.2 sqrt(max(m, n))

with ``s`` torch's ``adjust_lr_fn`` ("original" or "match_rms_adamw") for an m x n
weight. NS_k (Jordan et al., "Muon: An optimizer for hidden layers in neural networks",
blog post, 2024, kellerjordan.github.io/posts/muon) starts from X = U / max(||U||_F, eps)
on the wide orientation (X X^T the smaller Gram) and repeats X <- a X + (b A + c A^2) X
with A = X X^T: each singular value s of X goes to a s + b s^3 + c s^5, which the
coefficients (a, b, c) = (3.4445, -4.7750, 2.0315) push towards 1 within a few steps.
The learning-rate match to AdamW is from Liu et al., "Muon is Scalable for LLM Training",
arXiv:2502.16982, 2025.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def newton_schulz(
    update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """NS_k of the module docstring for one ``[m, n]`` matrix, computed in ``dtype`` (or
    the update's own dtype where that is wider); ``[m, n]`` in that dtype."""
    a, b, c = coefficients
    x = update.to(torch.promote_types(update.dtype, dtype))
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, polynomial, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if tall else x


def lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """``s(W)`` of the module docstring for a weight of ``shape`` ``[m, n]``."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class Float32Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (same arguments, defaults, checks and state) whose step runs
    the Newton-Schulz orthogonalization in float32 instead of bfloat16 (module docstring)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, params, grads, buffers)
            lr, momentum = float(group["lr"]), group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers, strict=True):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                orthogonal = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(orthogonal, alpha=-lr * lr_scale(group["adjust_lr_fn"], param.shape))
        return loss
