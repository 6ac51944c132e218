"""Model helpers the task files share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model under ``torch.manual_seed(seed)`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp(d_in: int, width: int, d_out: int, depth: int = 2, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    """``depth`` hidden layers of ``width`` units with activation ``act``, then a linear
    output layer of ``d_out`` units."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)
