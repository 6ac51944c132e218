"""Small models covering every supported layer type, used across the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyAttention(nn.Module):
    """Single-head self-attention from nn.Linear layers on ``[b, s, d]`` inputs."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) * self.scale, dim=-1)
        return self.o(att @ self.v(x))


class TinyTransformer(nn.Module):
    """Embedding -> attention block with LayerNorm -> mean pool -> Linear head."""

    def __init__(self, vocab: int = 11, d: int = 8, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.attn = TinyAttention(d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h)
        h = h + self.mlp(self.norm(h))
        return self.head(h.mean(dim=1))


def mlp(d_in: int = 5, hidden: int = 7, out: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
    )


def cnn(out: int = 3, channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, out),
    )


def layernorm_net(d_in: int = 6, out: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, out))


def conv1d_net(out: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="same", dilation=2),
        nn.Tanh(),
        nn.Conv1d(3, 3, 2, padding="valid", padding_mode="zeros"),
        nn.Flatten(),
        nn.Linear(3 * 7, out),
    )
