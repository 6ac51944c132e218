"""A tiny model zoo of the architectures people train, for tests and benchmarks: each
builder returns ``(model, x, y, loss)`` with a fixed batch; ``loss`` is ``"cross_entropy"``
(logits ``[b, k]``), ``"token_cross_entropy"`` (per-token logits ``[b, V, T]``, class
dimension 1 as ``F.cross_entropy`` and the optimizers' ``backward`` take them, targets
``[b, T]``) or ``"mse"``.

Sizes are small so that the zoo test (tests/test_zoo.py) and the step-time benchmark
(benchmarks/zoo_step_time.py) run in seconds on a CPU: the architectures are those of the
named families (ResNetTiny is the 32x32-input ResNet-18 layout, fed 16x16 images here)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm and a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetTiny(nn.Module):
    """ResNet-18-style for 32x32 inputs (3x3 stem, stages of basic blocks), tiny widths."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetTiny(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1), InvertedResidual(8, 12, 2))
        self.head = nn.Linear(12, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class ViTTiny(nn.Module):
    """Patch embedding, a cls token and learned positions, nn.TransformerEncoderLayer."""

    def __init__(self, classes: int = 10, dim: int = 16, patch: int = 4, image: int = 16) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patches(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


class GPTMini(nn.Module):
    """Token and position embeddings, causal nn.MultiheadAttention, an MLP, a head.

    ``idx [b, T]`` -> logits ``[b, V, T]`` (class dimension 1, so that GGN's
    ``opt.backward(model(idx), targets)`` gets the model's own output). ``tied``: the
    head is bias-free and its weight is the token embedding's (GPT-2's weight tying)."""

    def __init__(self, vocab: int = 11, dim: int = 16, context: int = 8, tied: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=not tied)
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        h = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, is_causal=True, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h).transpose(1, 2)


class ConvAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(8, 4, 2, 2), nn.ReLU(), nn.ConvTranspose2d(4, 1, 2, 2), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def _images(b: int, size: int, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(b, 3, size, size, generator=generator), torch.randint(0, classes, (b,), generator=generator)


def resnet(generator: torch.Generator):
    return ResNetTiny(), *_images(8, 16, 10, generator), "cross_entropy"


def mobilenet(generator: torch.Generator):
    return MobileNetTiny(), *_images(8, 16, 10, generator), "cross_entropy"


def vit(generator: torch.Generator):
    return ViTTiny(), *_images(8, 16, 10, generator), "cross_entropy"


def gpt(generator: torch.Generator):
    idx = torch.randint(0, 8, (6, 7), generator=generator)
    return GPTMini(vocab=8, context=6), idx[:, :-1], idx[:, 1:], "token_cross_entropy"


def gpt_tied(generator: torch.Generator):
    idx = torch.randint(0, 8, (6, 7), generator=generator)
    return GPTMini(vocab=8, context=6, tied=True), idx[:, :-1], idx[:, 1:], "token_cross_entropy"


def autoencoder(generator: torch.Generator):
    x = torch.rand(4, 1, 8, 8, generator=generator)
    return ConvAutoencoder(), x, x.clone(), "mse"


ZOO: dict[str, Callable[[torch.Generator], tuple[nn.Module, Tensor, Tensor, str]]] = {
    "resnet": resnet,
    "mobilenet": mobilenet,
    "vit": vit,
    "gpt": gpt,
    "gpt-tied": gpt_tied,
    "autoencoder": autoencoder,
}
