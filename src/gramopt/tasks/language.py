"""Character-level language modelling: a small causal Transformer predicts each next
character of text that ships with scikit-learn (its data sets' descriptions, about 43 kB
of English prose and tables).

Task ``charlm``: inputs ``[b, T]`` character ids, targets ``[b, T]`` (the input shifted
by one), logits ``[b, V, T]`` (classes in dimension 1, as ``F.cross_entropy`` takes
them); the loss is the cross-entropy averaged over the ``b * T``
positions and the metric the next-character accuracy over them. The first 90% of the
text gives the training windows, the last 10% the test windows.

An optimizer that cannot take a step on this task is skipped by ``gramopt compare``
with the reason (``gramopt.compare.run.supports``).
"""

from __future__ import annotations

import importlib.resources

import torch
from torch import Tensor, nn

from gramopt.tasks import Split, Task, ladder, register_task, seeded
from gramopt.tasks.sequence import SelfAttention

CONTEXT = 32


def corpus() -> str:
    """scikit-learn's data set descriptions (``sklearn/datasets/descr/*.rst``), sorted by name."""
    folder = importlib.resources.files("sklearn.datasets") / "descr"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst"))
    return "\n".join((folder / name).read_text(encoding="utf-8") for name in names)


def vocabulary() -> list[str]:
    return sorted(set(corpus()))


class CausalSelfAttention(SelfAttention):
    """:class:`SelfAttention` where position t attends to positions <= t only."""

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(2, 3) / (d // self.heads) ** 0.5
        future = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        att = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-norm causal attention and MLP, each with a residual connection."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class CharTransformer(nn.Module):
    """``[b, T]`` ids -> ``[b, V, T]`` next-character logits: token and position
    embeddings, ``depth`` blocks, a final LayerNorm and a linear head."""

    def __init__(self, vocab: int, length: int = CONTEXT, d: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(length, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        b, s = ids.shape
        positions = torch.arange(s, device=ids.device).expand(b, s)
        logits = self.head(self.norm(self.blocks(self.tokens(ids) + self.positions(positions))))
        return logits.transpose(1, 2)  # [b, V, T]: classes in dimension 1


def load_charlm(seed: int, n_train: int = 4000, n_test: int = 500) -> Split:
    """Random windows of ``CONTEXT + 1`` characters (the seed picks them): training
    windows from the first 90% of the text, test windows from the last 10%."""
    text = corpus()
    index = {c: i for i, c in enumerate(vocabulary())}
    ids = torch.tensor([index[c] for c in text])
    cut = int(0.9 * ids.numel())
    generator = torch.Generator().manual_seed(40_000 + seed)

    def windows(part: Tensor, n: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, part.numel() - CONTEXT - 1, (n,), generator=generator)
        rows = part[starts.unsqueeze(1) + torch.arange(CONTEXT + 1)]
        return rows[:, :-1], rows[:, 1:]

    train_x, train_y = windows(ids[:cut], n_train)
    test_x, test_y = windows(ids[cut:], n_test)
    return Split(train_x, train_y, test_x, test_y)


register_task(
    Task(
        name="charlm",
        description="next-character prediction on scikit-learn's data set descriptions (43 kB), "
        "causal Transformer (2 blocks, d=64, context 32)",
        loss="cross_entropy",
        build_model=lambda seed: seeded(seed, lambda: CharTransformer(len(vocabulary()))),
        load=load_charlm,
        epochs=5,
        batch_size=64,
        ladder=ladder("test_accuracy", (0.3, 0.4, 0.5), below=False),
        budget_seconds=30.0,
        eval_samples=1000,
        # every other optimizer (SENG, SOAP, Shampoo, Muon, IKFAC, SINGD, PSGD-Kron) at its defaults
        tuned={
            "fngd": dict(lr=0.03, damping=1e-2),
            "sgd": dict(lr=0.3),
            "adamw": dict(lr=3e-3),
        },
    )
)
