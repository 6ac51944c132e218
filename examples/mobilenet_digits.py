"""A MobileNetV2-style network (inverted residual blocks: 1x1 expansion, 3x3 depthwise
convolution, 1x1 projection, BatchNorm) on scikit-learn's 8x8 digits, trained with a
gramopt optimizer in an ordinary PyTorch loop: DataLoader, learning-rate schedule, update
clipping, checkpoint (state_dict) and resume.

FNGD (default) and SENG precondition the depthwise (grouped) convolutions and train
BatchNorm in training mode, its affine parameters included; they run the ordinary
``loss.backward()``. GGN needs ``opt.backward(model(x), y)`` and refuses BatchNorm in
training mode (its batch statistics couple the samples' Jacobian rows): with
``--method ggn`` the BatchNorm layers run in eval mode (running statistics; their affine
parameters still train).

Clipping: ``clip_grad_norm_`` on ``.grad`` does not reach the preconditioned step;
``--max-update-norm`` passes ``max_update_norm`` to the optimizer, which clips the step's
direction instead. Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn, in
``pip install "gramopt[compare]"``); 20% held out. About 30 s on one CPU thread.

    python examples/mobilenet_digits.py                          # FNGD, 300 steps
    python examples/mobilenet_digits.py --method ggn --steps 100
    python examples/mobilenet_digits.py --steps 100 --checkpoint mobilenet.pt   # then --steps 200: resumes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gramopt
from gramopt.tasks.classification import load_digits


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (x ``expand``), 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def mobilenet(width: int = 16) -> nn.Module:
    """``[b, 1, 8, 8]`` -> stem (8x8) -> blocks (8x8, 4x4, 4x4) -> pool -> logits ``[b, 10]``."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        InvertedResidual(width, width, 1),
        InvertedResidual(width, 2 * width, 2),
        InvertedResidual(2 * width, 2 * width, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


def batchnorm_eval(model: nn.Module) -> None:
    """GGN's way with BatchNorm: running statistics (eval mode), the rest trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def make_optimizer(method: str, model: nn.Module, max_update_norm: float | None) -> torch.optim.Optimizer:
    if method == "fngd":
        return gramopt.FNGD(model, lr=0.1, damping=1e-3, momentum=0.9, max_update_norm=max_update_norm)
    if method == "seng":
        return gramopt.SENG(model, lr=0.1, damping=1.0, momentum=0.9, max_update_norm=max_update_norm)
    if method == "ggn":
        batchnorm_eval(model)
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
    modes = {module: module.training for module in model.modules()}  # (GGN: BatchNorm stays in eval mode)
    model.eval()
    correct = int((model(x).argmax(dim=1) == y).sum())
    for module, training in modes.items():
        module.train(training)
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
    model = mobilenet()
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
    print(f"digits: {len(train_x)} train, {len(test_x)} test images; MobileNet with "
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
