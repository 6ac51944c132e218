"""Models with tied parameters and their dense float64 references, built with torch.func
(``reference.jacobian`` and ``reference.per_sample_grads``, through ``functional_call``,
which ties the weights given under one name) and dense p x p solves; nothing here uses
gramopt's capture engine. Shared by tests/test_tied.py and benchmarks/tied_parameters.py.

Each case: a model (weights shared between modules, or one module called twice), a batch
for mse and one for cross-entropy, and its *blocks*: the parameters a method
preconditions together (every layer's own parameters, the layers that share a parameter
joined into one block), so that SENG and FNGD references are block-diagonal over them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference import jacobian, per_sample_grads


class TiedLinears(nn.Module):
    """``b(tanh(a(x)))`` with ``b.weight = a.weight`` (two d x d Linear layers, own biases)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class TiedEmbeddingHead(nn.Module):
    """GPT-style weight tying: tokens ``[b, T]`` -> Embedding -> a per-position Linear ->
    a bias-free head whose weight is the embedding table -> logits ``[b, V, T]`` (the
    class dimension 1, as ``F.cross_entropy`` and the optimizers take them)."""

    def __init__(self, vocab: int = 7, d: int = 5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.tok(idx)))).transpose(1, 2)


class TiedConvs(nn.Module):
    """Two 3x3 convolutions sharing their weight (own biases), then a Linear head."""

    def __init__(self, channels: int = 2, size: int = 4, out: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.head = nn.Linear(channels * size * size, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


class CalledTwice(nn.Module):
    """One Linear layer applied twice (its calls are positions of one sample), then a head."""

    def __init__(self, d: int = 5, out: int = 4) -> None:
        super().__init__()
        self.layer = nn.Linear(d, d)
        self.head = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


@dataclass
class TiedCase:
    name: str
    model: nn.Module
    x: Tensor
    y_mse: Tensor
    y_ce: Tensor
    blocks: list[list[nn.Parameter]]

    @property
    def classes(self) -> int:
        with torch.no_grad():
            return self.model(self.x).shape[1]


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return build().double()


def linear_linear(b: int = 5) -> TiedCase:
    model = _seeded(TiedLinears)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(b, 6, generator=g, dtype=torch.float64)
    blocks = [[model.a.weight, model.a.bias, model.b.bias]]
    return TiedCase("linear-linear", model, x, torch.randn(b, 6, generator=g, dtype=torch.float64),
                    torch.randint(0, 6, (b,), generator=g), blocks)


def embedding_linear(b: int = 3, t: int = 4) -> TiedCase:
    model = _seeded(TiedEmbeddingHead)
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(0, 7, (b, t), generator=g)
    blocks = [[model.tok.weight], [model.mix.weight, model.mix.bias]]
    return TiedCase("embedding-linear", model, idx, torch.randn(b, 7, t, generator=g, dtype=torch.float64),
                    torch.randint(0, 7, (b, t), generator=g), blocks)


def conv_conv(b: int = 4) -> TiedCase:
    model = _seeded(TiedConvs)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(b, 2, 4, 4, generator=g, dtype=torch.float64)
    blocks = [[model.c1.weight, model.c1.bias, model.c2.bias], [model.head.weight, model.head.bias]]
    return TiedCase("conv-conv", model, x, torch.randn(b, 3, generator=g, dtype=torch.float64),
                    torch.randint(0, 3, (b,), generator=g), blocks)


def called_twice(b: int = 5) -> TiedCase:
    model = _seeded(CalledTwice)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(b, 5, generator=g, dtype=torch.float64)
    blocks = [[model.layer.weight, model.layer.bias], [model.head.weight, model.head.bias]]
    return TiedCase("called-twice", model, x, torch.randn(b, 4, generator=g, dtype=torch.float64),
                    torch.randint(0, 4, (b,), generator=g), blocks)


CASES: dict[str, Callable[[], TiedCase]] = {
    "linear-linear": linear_linear,
    "embedding-linear": embedding_linear,
    "conv-conv": conv_conv,
    "called-twice": called_twice,
}


# -- GGN ---------------------------------------------------------------------------------
def _flat_positions(f: Tensor) -> tuple[Tensor, int, int]:
    """Logits ``[b, C, *rest]`` -> probabilities ``[b, C, P]``, C and P."""
    b, c = f.shape[:2]
    return torch.softmax(f.reshape(b, c, -1), dim=1), c, f[0].numel() // c


def output_gradient(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """e ``[b, k]``: the gradient of the summed per-position losses with respect to the
    outputs (flattened per sample in ``f.reshape(b, k)`` order)."""
    b = f.shape[0]
    if loss == "mse":
        return (f - y).reshape(b, -1)
    p, c, _ = _flat_positions(f)
    return (p - F.one_hot(y.reshape(b, -1), c).transpose(1, 2).to(p.dtype)).reshape(b, -1)


def exact_curvature(f: Tensor, loss: str) -> Tensor:
    """H ``[b k, b k]``: I (mse) or per position ``diag(p) - p p^T`` (cross-entropy)."""
    b, k = f.shape[0], f[0].numel()
    if loss == "mse":
        return torch.eye(b * k, dtype=f.dtype)
    p, c, positions = _flat_positions(f)
    h = torch.zeros(b * k, b * k, dtype=f.dtype)
    for i in range(b):
        for t in range(positions):
            index = torch.tensor([i * k + cls * positions + t for cls in range(c)])
            pi = p[i, :, t]
            h[index.unsqueeze(1), index.unsqueeze(0)] = torch.diag(pi) - torch.outer(pi, pi)
    return h


def top_curvature(f: Tensor, y: Tensor, s: int) -> Tensor:
    """``Q~ Q~^T`` ``[b k, b k]`` for the label's and the s-1 most probable other classes'
    columns ``sqrt(p_c) (1_c - p)`` of each sample's ``[b, C]`` logits."""
    p = torch.softmax(f, dim=1)
    b, k = p.shape
    h = torch.zeros(b * k, b * k, dtype=f.dtype)
    for i in range(b):
        order = [int(c) for c in torch.argsort(p[i], descending=True) if int(c) != int(y[i])]
        eye = torch.eye(k, dtype=p.dtype)
        for c in [int(y[i])] + order[: s - 1]:
            q = p[i, c].sqrt() * (eye[c] - p[i])
            h[i * k : (i + 1) * k, i * k : (i + 1) * k] += torch.outer(q, q)
    return h


def column_curvature(directions: Sequence[Tensor]) -> Tensor:
    """``sum_j blockdiag_i(d_ij d_ij^T)`` ``[b k, b k]`` for per-sample directions
    ``d_j`` shaped like the output (the sampled columns of a GGN step)."""
    b = directions[0].shape[0]
    k = directions[0][0].numel()
    h = torch.zeros(b * k, b * k, dtype=directions[0].dtype)
    for d in directions:
        flat = d.reshape(b, k)
        for i in range(b):
            h[i * k : (i + 1) * k, i * k : (i + 1) * k] += torch.outer(flat[i], flat[i])
    return h


def ggn_step(model: nn.Module, x: Tensor, h: Tensor, e: Tensor, lr: float, damping: float) -> Tensor:
    """``-lr (J^T H J + damping I)^{-1} J^T e``, ``[p]`` over ``model.named_parameters()``
    (each tied parameter once): the GGN step in parameter space (equal to the sample-space
    form by the push-through identity), J from ``reference.jacobian``."""
    j = jacobian(model, x)
    system = j.T @ h @ j + damping * torch.eye(j.shape[1], dtype=j.dtype)
    return -lr * torch.linalg.solve(system, j.T @ e.reshape(-1))


# -- SENG and FNGD -----------------------------------------------------------------------
def sample_loss(loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    """One sample's loss, such that the batch's mean loss is the mean of them (for
    ``[1, V, T]`` logits: the mean over the sample's positions)."""
    return F.cross_entropy if loss == "cross_entropy" else F.mse_loss


def block_rows(model: nn.Module, x: Tensor, y: Tensor, loss: str, block: Sequence[nn.Parameter]) -> Tensor:
    """U ``[b, p_block]``: the per-sample loss gradients over the block's parameters."""
    return per_sample_grads(model, x, y, sample_loss(loss), params=block)


def seng_step(model: nn.Module, x: Tensor, y: Tensor, loss: str, blocks: Sequence[Sequence[nn.Parameter]], lr: float,
              damping: float) -> dict[int, Tensor]:
    """SENG's exact step per block (Eq. 2, 5, 7): ``-lr (U^T U / b + lam I)^{-1} g``, g
    the mean of U's rows; per parameter (by id)."""
    out = {}
    for block in blocks:
        u = block_rows(model, x, y, loss, block)
        b, p = u.shape
        d = torch.linalg.solve(u.T @ u / b + damping * torch.eye(p, dtype=u.dtype), u.mean(dim=0))
        out.update(_split(-lr * d, block))
    return out


def fngd_weights(u: Tensor, damping: float) -> Tensor:
    """Eq. (9), (14): v = (1/M)(1 - (lam I + K/M)^{-1} K 1 / M), lam = damping ||K||_F."""
    m = u.shape[0]
    k = u @ u.T
    lam = damping * torch.linalg.matrix_norm(k)
    ones = torch.ones(m, dtype=u.dtype)
    return (ones - torch.linalg.solve(lam * torch.eye(m, dtype=u.dtype) + k / m, k @ ones / m)) / m


def fngd_step(model: nn.Module, x: Tensor, y: Tensor, loss: str, blocks: Sequence[Sequence[nn.Parameter]], lr: float,
              damping: float, shared: Sequence[Tensor] | None = None) -> tuple[dict[int, Tensor], list[Tensor]]:
    """FNGD's step per block, ``-lr U^T v`` (v of Eq. 9, or ``shared[i]`` for block i),
    per parameter (by id), and the v used."""
    out, used = {}, []
    for index, block in enumerate(blocks):
        u = block_rows(model, x, y, loss, block)
        v = fngd_weights(u, damping) if shared is None else shared[index]
        used.append(v)
        out.update(_split(-lr * (u.T @ v), block))
    return out, used


def _split(flat: Tensor, params: Sequence[nn.Parameter]) -> dict[int, Tensor]:
    out, start = {}, 0
    for p in params:
        out[id(p)] = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def as_vector(model: nn.Module, per_param: dict[int, Tensor]) -> Tensor:
    """Per-parameter tensors (by id) in ``model.named_parameters()`` order, flattened."""
    return torch.cat([per_param[id(p)].reshape(-1) for _, p in model.named_parameters()])
