"""A GPT-mini (character-level causal Transformer) trained with gramopt's SENG and FNGD
against AdamW, on text that ships with Python itself.

Corpus: the help topics of the Python documentation in the standard library's
``pydoc_data.topics`` (about 0.8 MB of English and code, no download). The last 10% of
the text is held out. Each optimizer trains the same model (same initialization, same
batches) for the same number of optimizer seconds; the held-out loss (nats per
character) is printed as training goes and plotted against seconds (``--plot``, default
gpt_mini_chars.png), and each model writes a short sample. Needs matplotlib
(``pip install "gramopt[compare]"``).

The attention is written with ``nn.Linear`` projections (preconditioned by all three
methods; ``nn.MultiheadAttention`` would be left to the plain gradient), and position ids
are given per sample (``[b, s]``): a ``[1, s]`` lookup shared by the batch is refused by
SENG's per-sample capture.

    python examples/gpt_mini_chars.py                        # 3 optimizers x 50 s
    python examples/gpt_mini_chars.py --seconds 120 --optimizers seng,adamw
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import gramopt


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention and an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class GPTMini(nn.Module):
    def __init__(self, vocab: int, context: int, width: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``[b, s]`` -> logits ``[b, s, vocab]``."""
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # per sample: [b, s]
        x = self.tokens(ids) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)))


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "seng":
        return gramopt.SENG(model, lr=0.3, damping=1.0, momentum=0.9, curvature_every=10)
    if name == "fngd":
        return gramopt.FNGD(model, lr=0.1, damping=1e-2, momentum=0.9, coefficient_steps=100)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    raise ValueError(f"unknown optimizer {name!r}; choose from seng, fngd, adamw")


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(context + 1)
    chunk = data[starts[:, None] + offsets]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def held_out_loss(model: nn.Module, data: torch.Tensor, context: int) -> float:
    model.eval()
    starts = torch.arange(0, len(data) - context - 1, max(1, (len(data) - context - 1) // 256))[:256]
    x, y = windows(data, starts, context)
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train()
    return loss


@torch.no_grad()
def sample(model: nn.Module, prompt: torch.Tensor, context: int, length: int = 120) -> torch.Tensor:
    model.eval()
    ids = prompt[None]
    generator = torch.Generator().manual_seed(0)
    for _ in range(length):
        logits = model(ids[:, -context:])[0, -1]
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], dim=1)
    model.train()
    return ids[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="seng,fngd,adamw")
    parser.add_argument("--seconds", type=float, default=50.0, help="optimizer seconds per optimizer")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--evaluations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=Path("gpt_mini_chars.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    text = corpus()
    alphabet = sorted(set(text))
    encode = {c: i for i, c in enumerate(alphabet)}
    data = torch.tensor([encode[c] for c in text])
    split = int(0.9 * len(data))
    train_data, test_data = data[:split], data[split:]
    print(f"corpus: {len(text):,} characters, {len(alphabet)} distinct; "
          f"GPT-mini with {sum(p.numel() for p in GPTMini(len(alphabet), args.context).parameters()):,} parameters")

    histories = {}
    for name in args.optimizers.split(","):
        torch.manual_seed(args.seed)
        model = GPTMini(len(alphabet), args.context)
        opt = make_optimizer(name, model)
        batches = torch.Generator().manual_seed(args.seed)
        clock, history, step, running = 0.0, [], 0, None
        marks = [args.seconds * (i + 1) / args.evaluations for i in range(args.evaluations)]
        print(f"{name}: {args.seconds:.0f} s of training")
        while marks:
            starts = torch.randint(0, len(train_data) - args.context - 1, (args.batch_size,), generator=batches)
            x, y = windows(train_data, starts, args.context)
            start = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())  # mean over the batch's characters
            loss.backward()
            opt.step()
            clock += time.perf_counter() - start
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if clock >= marks[0]:
                marks.pop(0)
                history.append((clock, running, held_out_loss(model, test_data, args.context)))
                print(f"  {name:6s} {clock:6.1f} s  step {step:5d}  train loss {running:.3f}  "
                      f"held-out loss {history[-1][2]:.3f}", flush=True)
        text_out = "".join(alphabet[i] for i in sample(model, test_data[: args.context], args.context))
        print(f"  sample: {text_out!r}")
        histories[name] = history
        if hasattr(opt, "close"):
            opt.close()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for name, history in histories.items():
        seconds, _, losses = zip(*history, strict=True)
        axis.plot(seconds, losses, marker="o", label=name)
    axis.set(xlabel="optimizer seconds", ylabel="held-out loss (nats per character)",
             title="GPT-mini on Python's help topics, 1 CPU thread")
    axis.legend()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
