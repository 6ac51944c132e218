"""Tasks and training with FNGD: the IDX reader and the Fashion-MNIST loader on
synthetic files, a few FNGD steps on every task's model, and the one-epoch default of
``coefficient_steps`` in ``gramopt train`` (with an exact resume across the switch
from estimation to sharing)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from conftest import fashion_folder, task_batch, write_idx
from gramopt.cli import main
from gramopt.losses import get_loss
from gramopt.tasks import TASKS, get_task
from gramopt.tasks.images import FASHION_MNIST_ENV, load_fashion_mnist, read_idx
from gramopt.training import TrainConfig, Trainer, build_optimizer, with_epoch_defaults
from gramopt.training.registry import task_hyper


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    "dtype, code",
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)],
)
def test_read_idx_round_trip(tmp_path, dtype, code, compress):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, code, compress)
    out = read_idx(path)
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    unknown = tmp_path / "unknown"
    unknown.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="element type"):
        read_idx(unknown)
    short = tmp_path / "short"
    write_idx(short, np.arange(10, dtype=np.uint8), 0x08)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


def test_load_fashion_mnist_from_idx_folder(tmp_path):
    files = fashion_folder(tmp_path)
    split = load_fashion_mnist(0, directory=tmp_path)
    assert split.train_x.shape == (6, 1, 28, 28) and split.train_x.dtype == torch.float32
    assert split.test_x.shape == (4, 1, 28, 28)
    torch.testing.assert_close(
        split.train_x[:, 0], torch.tensor(files["train-images-idx3-ubyte"], dtype=torch.float32) / 255
    )
    assert split.train_y.dtype == torch.int64
    assert split.test_y.tolist() == files["t10k-labels-idx1-ubyte"].tolist()


@pytest.mark.parametrize("name", ["fashion-mnist", "fashion-resnet"])
def test_fashion_tasks_read_the_folder_the_environment_names_at_call_time(name, tmp_path, monkeypatch, capsys):
    """GRAMOPT_FASHION_MNIST_DIR, set after gramopt is imported, is where the tasks, and
    ``gramopt train``, read the IDX files."""
    files = fashion_folder(tmp_path, n_train=8, n_test=4)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    split = get_task(name).load(0)
    assert split.train_y.tolist() == files["train-labels-idx1-ubyte"].tolist()
    out = tmp_path / "run"
    assert (
        main(["train", "--task", name, "--optimizer", "sgd", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    )
    assert json.loads((out / "metrics.json").read_text())["config"]["task"] == name


def test_load_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"apt-get install dataset-fashion-mnist.*{FASHION_MNIST_ENV}"):
        load_fashion_mnist(0, directory=tmp_path)
    fashion_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(0, directory=tmp_path)


@pytest.mark.parametrize("name", sorted(name for name, task in TASKS.items() if task.kind == "supervised"))
def test_every_task_trains_with_fngd(name):
    """A few steps of FNGD with the task's defaults, from estimation into sharing,
    lower the loss of a fixed batch (the supervised tasks: residual tasks refuse the supervised optimizers,
    tests/test_residual_tasks.py)."""
    task = get_task(name)
    model = task.build_model(0)
    x, y = task_batch(name)  # a synthetic batch for the tasks whose data is outside pip
    hyper = with_epoch_defaults("fngd", dict(task_hyper(task, "fngd")), steps_per_epoch=2)
    opt = build_optimizer("fngd", model, task.loss, hyper)
    loss_fn = get_loss(task.loss)
    with torch.no_grad():
        before = float(loss_fn.value(model(x), y))
    for _ in range(4):
        opt.zero_grad()
        loss = opt.backward(model(x), y)
        opt.step()
        assert math.isfinite(float(loss))
    assert opt.phase == "share"
    with torch.no_grad():
        after = float(loss_fn.value(model(x), y))
    assert after < before, (name, before, after)


@pytest.fixture
def one_thread():
    """Training runs on one thread (two threads on a busy 2-core machine crawl)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _train_cli(tmp_path, *args: str) -> dict:
    out = tmp_path / "run"
    code = main(["train", "--task", "digits", "--epochs", "1", "--no-progress", "--out", str(out), *args])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())["config"]["hyper"]


def test_cli_estimates_fngd_coefficients_during_the_first_epoch(tmp_path, one_thread):
    steps = math.ceil(get_task("digits").load(0).train_x.shape[0] / 128)
    assert _train_cli(tmp_path, "--optimizer", "fngd")["coefficient_steps"] == steps
    assert _train_cli(tmp_path, "--optimizer", "fngd", "--coefficient-steps", "5")["coefficient_steps"] == 5
    assert _train_cli(tmp_path, "--optimizer", "fngd", "--coefficient-steps", "none")["coefficient_steps"] is None
    assert "coefficient_steps" not in _train_cli(tmp_path, "--optimizer", "sgd")
    assert (
        main(
            [
                "train",
                "--task",
                "digits",
                "--optimizer",
                "sgd",
                "--coefficient-steps",
                "3",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "--task",
                "digits",
                "--optimizer",
                "fngd",
                "--coefficient-steps",
                "0",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )


class _Interrupted(Exception):
    pass


class _StopAfterCheckpoint(Trainer):
    """A run killed right after its checkpoint at step 9."""

    def save(self) -> None:
        super().save()
        if self.global_step == 9:
            raise _Interrupted


def test_resume_across_the_switch_to_sharing_is_exact(tmp_path, one_thread):
    """Killed after step 9 of the 12 estimation steps, resumed to 2 epochs: the same
    model as an uninterrupted run, bit for bit (running means and counters travel in
    the optimizer's state_dict)."""
    common = dict(task="digits", optimizer="fngd", batch_size=128, seed=3, epochs=2)
    full = Trainer(TrainConfig(**common, out=str(tmp_path / "full")), progress=False).run()
    with pytest.raises(_Interrupted):
        _StopAfterCheckpoint(
            TrainConfig(**common, checkpoint_every=9, out=str(tmp_path / "part")), progress=False
        ).run()
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 9 and state["optimizer"]["gramopt"]["coefficient_counts"]
    resumed = Trainer.resume(tmp_path / "part", progress=False).run()
    assert resumed.epochs[-1]["step"] == full.epochs[-1]["step"] == 24
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
