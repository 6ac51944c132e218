"""A small ResNet on Fashion-MNIST: gramopt's FNGD and SENG against SGD-momentum and AdamW.

Each optimizer trains the same ResNet (same initialization, same batches) for the same
number of optimizer seconds; the test accuracy on a fixed 2,000-image subset is printed
as training goes and plotted against seconds (``--plot``, default
resnet_fashion_mnist.png). The network uses BatchNorm in training mode, as the SENG and
FNGD papers' ResNets: both methods only need per-sample rows whose sum is the batch
gradient, which BatchNorm's rows are (GGN refuses it; use ``--norm group`` for GroupNorm).

Data: Debian's ``dataset-fashion-mnist`` package (the IDX files in
/usr/share/datasets/fashion-mnist; ``apt-get install dataset-fashion-mnist``), or the
folder with the four IDX files that ``--data DIR`` or the environment variable
``GRAMOPT_FASHION_MNIST_DIR`` names. Needs matplotlib (``pip install "gramopt[compare]"``).

    python examples/resnet_fashion_mnist.py                       # 4 optimizers x 45 s
    python examples/resnet_fashion_mnist.py --seconds 120 --optimizers fngd,adamw
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import gramopt
from gramopt.tasks.images import FASHION_MNIST_ENV, load_fashion_mnist, norm_layer


class Block(nn.Module):
    """Two 3x3 convolutions with normalization and a (projected) shortcut."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, channels_out)
        self.shortcut = (
            nn.Identity() if stride == 1 and channels_in == channels_out
            else nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def resnet(classes: int = 10, width: int = 8, norm: str = "batch") -> nn.Module:
    """1x28x28 -> stem -> 3 residual blocks (width, 2 width, 4 width; 28, 14, 7 pixels) -> pool -> linear;
    ``norm``: "batch" (BatchNorm2d) or "group" (GroupNorm, 4 groups)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), norm_layer(norm, width), nn.ReLU(),
        Block(width, width, 1, norm), Block(width, 2 * width, 2, norm), Block(2 * width, 4 * width, 2, norm),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )


def make_optimizer(name: str, model: nn.Module, steps_per_epoch: int) -> torch.optim.Optimizer:
    if name == "fngd":
        return gramopt.FNGD(model, lr=0.1, damping=1e-3, momentum=0.9, coefficient_steps=min(100, steps_per_epoch))
    if name == "seng":
        return gramopt.SENG(model, lr=0.1, damping=1.0, momentum=0.9, curvature_every=10)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    raise ValueError(f"unknown optimizer {name!r}; choose from fngd, seng, sgd, adamw")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 500]).argmax(dim=1) == y[i : i + 500]).sum()) for i in range(0, len(x), 500))
    model.train()
    return correct / len(x)


def train(
    name: str, data, seconds: float, batch_size: int, evaluations: int, seed: int, norm: str = "batch"
) -> list[tuple[float, float, float]]:
    """(optimizer seconds, train loss, test accuracy) at ``evaluations`` evenly spaced times."""
    torch.manual_seed(seed)
    model = resnet(norm=norm)
    steps_per_epoch = math.ceil(len(data.train_x) / batch_size)
    opt = make_optimizer(name, model, steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    test = torch.randperm(len(data.test_x), generator=torch.Generator().manual_seed(1))[:2000]
    test_x, test_y = data.test_x[test], data.test_y[test]
    clock, marks, history, step = 0.0, [seconds * (i + 1) / evaluations for i in range(evaluations)], [], 0
    running = None
    while marks:
        for batch in torch.randperm(len(data.train_x), generator=order).split(batch_size):
            x, y = data.train_x[batch], data.train_y[batch]
            start = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            clock += time.perf_counter() - start
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if clock >= marks[0]:
                marks.pop(0)
                history.append((clock, running, accuracy(model, test_x, test_y)))
                print(f"  {name:6s} {clock:6.1f} s  step {step:5d}  train loss {running:.3f}  "
                      f"test accuracy {history[-1][2]:.3f}", flush=True)
                if not marks:
                    break
    if hasattr(opt, "close"):
        opt.close()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="fngd,seng,sgd,adamw")
    parser.add_argument("--seconds", type=float, default=45.0, help="optimizer seconds per optimizer")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--evaluations", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm", choices=["batch", "group"], default="batch", help="BatchNorm2d or GroupNorm layers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--data", type=Path,
        help=f"folder with the Fashion-MNIST IDX files (default: ${FASHION_MNIST_ENV}, "
        "else /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument("--plot", type=Path, default=Path("resnet_fashion_mnist.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data = load_fashion_mnist(args.seed, args.data)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"Fashion-MNIST: {len(data.train_x)} train, {len(data.test_x)} test images; "
          f"ResNet with {sum(p.numel() for p in resnet(norm=args.norm).parameters()):,} parameters")
    histories = {}
    for name in args.optimizers.split(","):
        print(f"{name}: {args.seconds:.0f} s of training")
        histories[name] = train(name, data, args.seconds, args.batch_size, args.evaluations, args.seed, args.norm)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, history in histories.items():
        seconds, losses, accuracies = zip(*history, strict=True)
        left.plot(seconds, losses, marker="o", label=name)
        right.plot(seconds, accuracies, marker="o", label=name)
    left.set(xlabel="optimizer seconds", ylabel="train loss (running mean)", yscale="log")
    right.set(xlabel="optimizer seconds", ylabel="test accuracy (2,000 images)")
    right.legend()
    figure.suptitle(f"ResNet ({args.norm}norm) on Fashion-MNIST, 1 CPU thread")
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
