import gzip
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from gramopt.tasks.images import FASHION_MNIST_ENV, FASHION_MNIST_INSTALL, fashion_mnist_installed

# Property tests draw the same examples on every run ("deterministic", the default: CI and
# `main` stay reproducible); HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from seed 0 in float32 default dtype; float64 tests opt in."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield


# -- data sets that no pip package installs ----------------------------------------------
# The README's test command installs pip packages only. A task whose data comes from
# elsewhere is listed in EXTERNAL_DATA with how to install it. A test that only needs a
# batch of the data's shape takes the synthetic stand-in (on every machine, so it tests the
# same thing everywhere: ``task_batch``); a test that needs the data itself is marked
# ``@pytest.mark.needs_data(task)`` and is skipped, with the reason and the install command,
# without it.
# tests/test_tasks.py checks that every other task loads with these folders hidden.


@dataclass(frozen=True)
class ExternalData:
    """A data set outside pip: its name, the command that installs it, the environment
    variable that names its folder, whether it is installed now, and a synthetic
    ``n -> (inputs, targets)`` batch of its shapes."""

    name: str
    install: str
    env: str
    installed: Callable[[], bool]
    stand_in: Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _fashion_stand_in(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


FASHION_MNIST = ExternalData(
    "Fashion-MNIST",
    f"install it with `{FASHION_MNIST_INSTALL}` (Debian/Ubuntu), "
    f"or set {FASHION_MNIST_ENV} to a folder with its IDX files",
    FASHION_MNIST_ENV,
    fashion_mnist_installed,
    _fashion_stand_in,
)
EXTERNAL_DATA: dict[str, ExternalData] = {"fashion-mnist": FASHION_MNIST, "fashion-resnet": FASHION_MNIST}


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool = False) -> None:
    """IDX: two zero bytes, the element-type code, the number of dims, big-endian
    uint32 dims, then the big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def fashion_folder(tmp_path: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """Writes a synthetic Fashion-MNIST folder (the four IDX files, random pixels and
    labels, every other file gzip-compressed) into ``tmp_path``; the arrays by file name."""
    rng = np.random.default_rng(1)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for i, (name, array) in enumerate(files.items()):
        compress = i % 2 == 0  # both .gz and plain files are found
        write_idx(tmp_path / (name + (".gz" if compress else "")), array, 0x08, compress)
    return files


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_data(task): needs the task's data set, which may be outside pip")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``needs_data(task)`` is skipped, with the reason and the install
    command, when that task's data is outside pip and not installed."""
    for item in items:
        for mark in item.iter_markers("needs_data"):
            (task_name,) = mark.args
            data = EXTERNAL_DATA.get(task_name)
            if data is not None and not data.installed():
                reason = f"task {task_name} needs {data.name}, which the README's test command does not install"
                item.add_marker(pytest.mark.skip(reason=f"{reason}: {data.install}"))


@pytest.fixture
def external_data_hidden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every EXTERNAL_DATA folder pointed at one empty folder (returned), as on a machine
    that has only what the README installs."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    for data in EXTERNAL_DATA.values():
        monkeypatch.setenv(data.env, str(empty))
    return empty


def task_batch(task_name: str, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training samples of ``task_name``: the synthetic stand-in when its data is
    outside pip, else the first ``n`` of its seed-0 split."""
    if task_name in EXTERNAL_DATA:
        return EXTERNAL_DATA[task_name].stand_in(n)
    from gramopt.tasks import get_task

    split = get_task(task_name).load(0)
    return split.train_x[:n], split.train_y[:n]
