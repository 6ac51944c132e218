"""A ViT-tiny (``nn.TransformerEncoderLayer``) on scikit-learn's 8x8 digits, trained with
a gramopt optimizer in an ordinary PyTorch loop: DataLoader, learning-rate schedule,
update clipping, checkpoint (state_dict) and resume.

The 8x8 images are cut into 2x2 patches (16 tokens and a cls token, learned positions),
two encoder layers, a linear head on the cls token. FNGD (default) and SENG run the
ordinary ``loss.backward()``; GGN needs ``opt.backward(model(x), y)``. The cls token and
the positions are ``nn.Parameter`` held by the model itself, which no gramopt handler
covers: they follow the plain gradient, and the optimizer says so once in a warning
(so do the attention projections where ``nn.MultiheadAttention`` has no handler).

Clipping: ``clip_grad_norm_`` on ``.grad`` does not reach the preconditioned step;
``--max-update-norm`` passes ``max_update_norm`` to the optimizer, which clips the step's
direction instead. Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn, in
``pip install "gramopt[compare]"``); 20% held out. About 20 s on one CPU thread.

    python examples/vit_digits.py                          # FNGD, 300 steps
    python examples/vit_digits.py --method seng --steps 600
    python examples/vit_digits.py --steps 100 --checkpoint vit.pt   # then again with --steps 200: resumes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gramopt
from gramopt.tasks.classification import load_digits


class ViT(nn.Module):
    """``[b, 1, 8, 8]`` -> patches ``[b, 16, dim]`` (+ cls token, + positions) -> encoder
    layers -> LayerNorm -> logits ``[b, 10]`` from the cls token."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, patch: int = 2, image: int = 8) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.encoder = nn.Sequential(
            *[nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
              for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patches(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


def make_optimizer(method: str, model: nn.Module, max_update_norm: float | None) -> torch.optim.Optimizer:
    if method == "fngd":
        return gramopt.FNGD(model, lr=0.1, damping=1e-3, momentum=0.9, max_update_norm=max_update_norm)
    if method == "seng":
        return gramopt.SENG(model, lr=0.1, damping=1.0, momentum=0.9, max_update_norm=max_update_norm)
    if method == "ggn":
        return gramopt.GGN(model, lr=0.3, damping=1.0, loss="cross_entropy", max_update_norm=max_update_norm)
    raise ValueError(f"unknown method {method!r}; choose fngd, seng or ggn")


def train_step(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One step; the batch's mean cross-entropy before it."""
    opt.zero_grad()
    if isinstance(opt, gramopt.GGN):
        loss = opt.backward(model(x), y)  # GGN builds its system from the outputs
    else:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = int((model(x).argmax(dim=1) == y).sum())
    model.train()
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="fngd", choices=["fngd", "seng", "ggn"])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps in all (with a resumed checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-update-norm", type=float, default=10.0, help="clip the step's direction (0: off)")
    parser.add_argument("--checkpoint", type=Path, help="resume from it if it exists; written at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = load_digits(args.seed)
    images = lambda flat: flat.view(-1, 1, 8, 8)  # noqa: E731
    train_x, test_x = images(data.train_x), images(data.test_x)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_x, data.train_y), batch_size=args.batch_size, shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(args.seed),
    )
    model = ViT()
    opt = make_optimizer(args.method, model, args.max_update_norm or None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    step = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        saved = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step = saved["step"]
        print(f"resumed from {args.checkpoint} at step {step}")
    print(f"digits: {len(train_x)} train, {len(test_x)} test images; ViT with "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.method}")
    running = None
    while step < args.steps:
        for x, y in loader:
            loss = train_step(opt, model, x, y)
            scheduler.step()
            step += 1
            running = loss if running is None else 0.9 * running + 0.1 * loss
            if step % 50 == 0 or step == args.steps:
                test = accuracy(model, test_x, data.test_y)
                print(f"step {step:4d}  train loss {running:.3f}  test accuracy {test:.3f}")
            if step == args.steps:
                break
    if args.checkpoint is not None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}
        torch.save({**state, "step": step}, args.checkpoint)
        print(f"wrote {args.checkpoint}")
    opt.close()


if __name__ == "__main__":
    main()
