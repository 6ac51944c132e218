"""Cases of the distributed tests, shared by the worker processes
(``distributed_worker.py``) and the single-process references (``test_distributed.py``).

A case is a model, an optimizer configuration, a policy, per-rank batch sizes (unequal
on purpose) and a number of steps; :func:`batches` gives every rank's part of each
step's global batch, so the single-process reference sees their concatenation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gramopt
from gramopt.losses import get_loss

D_IN = 5


def net(out: int, norm: bool = False, tied: bool = False) -> nn.Module:
    """A small MLP (a LayerNorm in it, optionally: explicit factors for GGN/SENG and a
    plain-gradient parameter for FNGD; ``tied``: a second hidden Linear layer sharing the
    first's weight, one tied block)."""
    layers: list[nn.Module] = [nn.Linear(D_IN, 6), nn.Tanh()]
    if norm:
        layers.append(nn.LayerNorm(6))
    layers += [nn.Linear(6, 6), nn.Tanh()]
    if tied:
        again = nn.Linear(6, 6)
        again.weight = layers[-2].weight
        layers += [again, nn.Tanh()]
    layers.append(nn.Linear(6, out))
    return nn.Sequential(*layers)


class MeanPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def token_net() -> nn.Module:
    """Embedding -> mean over positions -> Linear: sequences of any length."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return nn.Sequential(nn.Embedding(10, 4), MeanPool(), nn.Linear(4, 2)).double()


class AttentionNet(nn.Module):
    """``[b, D_IN]`` -> tokens ``[b, 3, 4]`` and a context ``[b, 2, 3]`` (Linear + tanh) ->
    packed self-attention (its handler saves one input) -> cross-attention to the
    context with ``kdim = vdim = 3`` (separate q/k/v weights; its handler saves query, key
    and value) -> mean over tokens -> Linear: ``nn.MultiheadAttention(batch_first=True)``
    under ``distributed="exact"``."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.tokens = nn.Linear(D_IN, 3 * 4)
        self.context = nn.Linear(D_IN, 2 * 3)
        self.self_attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=3, batch_first=True)
        self.head = nn.Linear(4, out)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        h = torch.tanh(self.tokens(x)).reshape(b, 3, 4)
        c = torch.tanh(self.context(x)).reshape(b, 2, 3)
        h = h + self.self_attn(h, h, h, need_weights=False)[0]
        h = h + self.cross_attn(h, c, c)[0]
        return self.head(h.mean(dim=1))


@dataclass(frozen=True)
class Case:
    name: str
    method: str  # "ggn", "seng" or "fngd"
    policy: str  # "exact" or "local"
    loss: str
    out: int
    sizes: tuple[int, ...]  # per-rank batch sizes
    steps: int
    options: dict[str, Any] = field(default_factory=dict)
    norm: bool = False
    loop: str = "uniform"  # or "ordinary": loss.backward(); opt.step()
    ddp: bool = False  # the worker wraps the model in DistributedDataParallel
    attention: bool = False  # AttentionNet instead of the MLP
    tied: bool = False  # two hidden Linear layers share their weight

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    def model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return (AttentionNet(self.out) if self.attention else net(self.out, self.norm, self.tied)).double()

    def optimizer(self, model: nn.Module, distributed: str | None, **override: Any) -> gramopt.GGN:
        options = {**self.options, **override}
        if self.method == "ggn":
            # damping adaptation is off under distributed=...: the single-process reference too
            options.setdefault("damping_adaptation", None)
        cls = {"ggn": gramopt.GGN, "seng": gramopt.SENG, "fngd": gramopt.FNGD}[self.method]
        return cls(model, loss=self.loss, distributed=distributed, **options)


def batches(case: Case, step: int) -> list[tuple[Tensor, Tensor]]:
    """Every rank's (x, y) of step ``step``, in rank order."""
    generator = torch.Generator().manual_seed(1000 * step + len(case.name))
    total = sum(case.sizes)
    x = torch.randn(total, D_IN, generator=generator, dtype=torch.float64)
    if case.loss == "cross_entropy":
        y = torch.randint(0, case.out, (total,), generator=generator)
    else:
        y = torch.randn(total, case.out, generator=generator, dtype=torch.float64)
    return list(zip(x.split(list(case.sizes)), y.split(list(case.sizes)), strict=True))


def train_step(
    case: Case, model: Callable[[Tensor], Tensor], opt: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> float:
    opt.zero_grad()
    output = model(x)
    if case.loop == "ordinary":
        loss = get_loss(case.loss).value(output, y)
        loss.backward()
    else:
        loss = opt.backward(output, y)
    opt.step()
    return float(loss.detach())


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[Tensor | None]]:
    params = list(model.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "momentum": [opt.state[p].get("momentum_buffer") for p in params],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
    }


CASES_2 = [
    Case("ggn-mse-exact", "ggn", "exact", "mse", 2, (5, 3), 2, dict(lr=0.7, damping=0.1, momentum=0.5), norm=True),
    Case("ggn-ce-exact-ddp", "ggn", "exact", "cross_entropy", 3, (4, 6), 2,
         dict(lr=0.5, damping=0.3, weight_decay=0.01), ddp=True),
    Case("seng-exact", "seng", "exact", "cross_entropy", 3, (6, 2), 3,
         dict(lr=0.2, damping=0.5, momentum=0.9, curvature_every=2), norm=True),
    Case("seng-sketch-exact", "seng", "exact", "cross_entropy", 3, (5, 4), 2,
         dict(lr=0.2, damping=0.5, sketch=gramopt.SketchConfig(size=20, sampling="leverage", seed=5))),
    Case("seng-implicit-exact-ddp", "seng", "exact", "mse", 2, (3, 5), 3,
         dict(lr=0.2, damping=0.5, curvature_every=2, implicit=gramopt.ImplicitConfig(threshold=30)),
         loop="ordinary", ddp=True),
    Case("fngd-exact", "fngd", "exact", "mse", 2, (5, 4), 4,
         dict(lr=0.1, damping=1e-2, momentum=0.9, coefficient_steps=2), norm=True),
    Case("fngd-exact-ddp", "fngd", "exact", "cross_entropy", 3, (4, 4), 4,
         dict(lr=0.1, damping=1e-2, coefficient_steps=2), loop="ordinary", ddp=True),
    # nn.MultiheadAttention: handlers that save several tensors (query, key, value)
    Case("ggn-attention-exact", "ggn", "exact", "mse", 2, (3, 2), 2, dict(lr=0.5, damping=0.1), attention=True),
    Case("seng-attention-exact", "seng", "exact", "cross_entropy", 3, (2, 3), 2, dict(lr=0.2, damping=0.5),
         loop="ordinary", attention=True),
    Case("fngd-attention-exact", "fngd", "exact", "mse", 2, (3, 3), 3, dict(lr=0.1, damping=1e-2, coefficient_steps=2),
         attention=True),
    Case("ggn-tied-exact", "ggn", "exact", "cross_entropy", 3, (4, 3), 2, dict(lr=0.5, damping=0.3), tied=True),
    Case("seng-tied-exact", "seng", "exact", "mse", 2, (3, 5), 3, dict(lr=0.2, damping=0.5, curvature_every=2),
         loop="ordinary", tied=True),
    Case("fngd-tied-exact", "fngd", "exact", "cross_entropy", 3, (5, 3), 3,
         dict(lr=0.1, damping=1e-2, coefficient_steps=2), tied=True),
    Case("ggn-local", "ggn", "local", "mse", 2, (5, 3), 2, dict(lr=0.7, damping=0.1), norm=True),
    Case("seng-local-ddp", "seng", "local", "cross_entropy", 3, (6, 2), 3,
         dict(lr=0.2, damping=0.5, curvature_every=2, local_gradient="own"), ddp=True),
    # Eq. (26): each rank's block applied to the global gradient (the default)
    Case("seng-local-global", "seng", "local", "cross_entropy", 3, (6, 2), 3,
         dict(lr=0.2, damping=0.5, curvature_every=2, weight_decay=0.01), norm=True),
    Case("seng-local-global-ordinary", "seng", "local", "mse", 2, (3, 5), 2,
         dict(lr=0.2, damping=0.5, implicit=gramopt.ImplicitConfig(threshold=30)), loop="ordinary", ddp=True),
    Case("fngd-local", "fngd", "local", "mse", 2, (5, 4), 4,
         dict(lr=0.1, damping=1e-2, coefficient_steps=2), norm=True),
]

CASES_4 = [
    Case("ggn-exact-4", "ggn", "exact", "mse", 2, (3, 2, 4, 1), 2, dict(lr=0.7, damping=0.1)),
    Case("seng-exact-4", "seng", "exact", "cross_entropy", 3, (2, 3, 2, 3), 2,
         dict(lr=0.2, damping=0.5, curvature_every=2)),
    Case("fngd-local-4", "fngd", "local", "mse", 2, (3, 2, 4, 1), 3,
         dict(lr=0.1, damping=1e-2, coefficient_steps=2), ddp=True),
]
