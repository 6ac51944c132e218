"""Kill and resume: ``gramopt train`` killed with SIGKILL at a random point and continued
with ``--resume`` ends bitwise where an uninterrupted run ends, for every optimizer; a
crash while a checkpoint is written leaves the previous one; a damaged checkpoint is a
clear error."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gramopt.training.checkpoint as checkpoint_module
from gramopt.cli import main
from gramopt.tasks import get_task
from gramopt.training import CheckpointError, TrainConfig, Trainer, load_checkpoint, save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
OPTIMIZERS = ["ggn", "sgd", "adamw", "fngd", "seng"]
EPOCHS, BATCH = 4, 32  # diabetes: 353 training samples, 12 steps per epoch, 48 steps
TOTAL_STEPS = EPOCHS * 12


def train_args(optimizer: str, out: Path) -> list[str]:
    """A short run with a checkpoint after every step and a schedule (whose state the
    checkpoint must carry)."""
    return [
        "train", "--task", "diabetes", "--optimizer", optimizer, "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
        "--checkpoint-every", "1", "--schedule", "cosine", "--no-progress", "--out", str(out),
    ]


@pytest.fixture
def one_thread():
    """The subprocesses run with one thread (OMP_NUM_THREADS=1); so does this process
    while it trains, so that every run does the same arithmetic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _start(optimizer: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gramopt", *train_args(optimizer, out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _saved_step(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["global_step"])
    except CheckpointError:
        return -1


def _kill_all(runs: dict[str, tuple[subprocess.Popen, Path, int, float]]) -> dict[str, int]:
    """SIGKILL each process ``delay`` seconds after its checkpoint reached ``step`` (a
    random point inside a later step or checkpoint write); all are watched at once.
    Returns, per run, the step of the checkpoint left, or -1 if the run ended first."""
    left: dict[str, int] = {}
    reached: dict[str, float] = {}
    deadline = time.monotonic() + 180
    while len(left) < len(runs):
        assert time.monotonic() < deadline, "runs never reached their kill steps"
        for name, (process, out, step, delay) in runs.items():
            if name in left:
                continue
            if process.poll() is not None:
                left[name] = -1
            elif name not in reached and _saved_step(out / "checkpoint.pt") >= step:
                reached[name] = time.monotonic()
            elif name in reached and time.monotonic() >= reached[name] + delay:
                process.send_signal(signal.SIGKILL)
                process.wait()
                assert process.returncode == -signal.SIGKILL
                left[name] = _saved_step(out / "checkpoint.pt")
        time.sleep(0.002)
    return left


def test_killed_runs_resume_bit_for_bit(tmp_path, one_thread):
    """Each optimizer's run (``--checkpoint-every 1``, a cosine schedule) is killed with
    SIGKILL once its checkpoint passed a random step, after a further random delay (inside
    a step or a checkpoint write), then continued with ``gramopt train --resume``: the
    final parameters, the final checkpoint's model and the per-epoch losses equal those
    of an uninterrupted run, bit for bit."""
    rng = random.Random(8)
    todo, plans = list(OPTIMIZERS), {}
    for attempt in range(3):
        plan = {name: (rng.randint(1, TOTAL_STEPS // (2 + 2 * attempt)), rng.uniform(0.0, 0.05)) for name in todo}
        outs = {name: tmp_path / f"killed-{name}-{attempt}" for name in todo}
        runs = {name: (_start(name, outs[name]), outs[name], *plan[name]) for name in todo}
        left = _kill_all(runs)
        # a run that ended, or was killed after its last checkpoint, is started again
        killed_inside = {name for name in todo if 0 <= left[name] < TOTAL_STEPS}
        for name in killed_inside:
            plans[name] = (outs[name], plan[name], left[name])
        todo = [name for name in todo if name not in killed_inside]
        if not todo:
            break
    assert not todo, f"{todo} always finished before the kill"
    for name, (out, plan, step) in plans.items():
        assert 0 < step < TOTAL_STEPS, (name, plan, step)  # killed in the middle of the run
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
        full_out = tmp_path / f"full-{name}"
        args = train_args(name, full_out)
        args[args.index("--checkpoint-every") + 1] = "0"  # uninterrupted: only the final checkpoint
        assert main(args) == 0
        full, resumed = load_checkpoint(full_out / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
        assert resumed["global_step"] == full["global_step"] == TOTAL_STEPS
        for key, value in full["model"].items():
            assert torch.equal(value, resumed["model"][key]), (name, key, plan, step)
        assert resumed["scheduler"]["last_epoch"] == TOTAL_STEPS
        losses = [json.loads((d / "metrics.json").read_text())["epochs"] for d in (full_out, out)]
        assert [e["train_loss"] for e in losses[0]] == [e["train_loss"] for e in losses[1]], name


def test_finished_run_checkpoint_holds_its_final_parameters(tmp_path, one_thread):
    """``checkpoint.pt`` is a torch.save dict (weights_only loads it) whose "model" entry
    is the model's state_dict(); a finished run's holds its final parameters, and a
    resumed finished run changes nothing (its lr is 0 after the cosine schedule: the
    state still loads)."""
    config = TrainConfig("diabetes", "seng", epochs=2, batch_size=BATCH, out=str(tmp_path), schedule="cosine")
    result = Trainer(config, progress=False, verbose=False).run()
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    final = result.model.state_dict()
    assert payload["model"].keys() == final.keys()
    assert all(torch.equal(payload["model"][k], final[k]) for k in final)
    assert payload["optimizer"]["param_groups"][0]["lr"] == 0.0
    fresh = get_task("diabetes").build_model(1)
    fresh.load_state_dict(payload["model"])
    again = Trainer.resume(tmp_path, progress=False)
    again.verbose = False
    again.run()
    assert all(torch.equal(again.model.state_dict()[k], final[k]) for k in final)


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch, one_thread):
    """A crash after the temporary file is written but before the rename (here: the
    rename raises at the 5th checkpoint) leaves the 4th checkpoint, intact; resuming
    from it ends where an uninterrupted run ends."""
    args = train_args("ggn", tmp_path / "crashed")
    rename = os.replace
    calls = []

    def crash_on_fifth(src, dst):
        calls.append(dst)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed between write and rename")
        rename(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(checkpoint_module.os, "replace", rename)
    left = load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")
    assert left["global_step"] == 4
    assert (tmp_path / "crashed" / "checkpoint.pt.tmp").exists()
    assert main(["train", "--resume", str(tmp_path / "crashed"), "--no-progress"]) == 0
    assert main(train_args("ggn", tmp_path / "full")) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    resumed = load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A process that dies half-way through writing (here: torch.save writes half the
    bytes, then the process 'dies') leaves the previous checkpoint untouched."""
    path = tmp_path / "checkpoint.pt"
    first = {"model": {"w": torch.arange(4.0)}, "n": 1}
    save_checkpoint(path, first)
    before = path.read_bytes()
    save = torch.save

    def half_then_die(obj, handle):
        import io

        buffer = io.BytesIO()
        save(obj, buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint_module.torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(10_000)}, "n": 2})
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], first["model"]["w"])


def _damaged(kind: str, good: bytes) -> bytes:
    import io

    if kind == "empty":
        return b""
    if kind == "truncated to half":
        return good[: len(good) // 2]
    if kind == "last byte missing":
        return good[:-1]
    if kind == "random bytes":
        return random.Random(0).randbytes(len(good))
    buffer = io.BytesIO()
    torch.save([1, 2, 3] if kind == "not a dict" else {"model": {}, "optimizer": {}}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "kind, match",
    [
        ("empty", "truncated or corrupt"),
        ("truncated to half", "truncated or corrupt"),
        ("last byte missing", "truncated or corrupt"),
        ("random bytes", "truncated or corrupt"),
        ("not a dict", "holds a list"),
        ("missing entries", "no config, epoch"),
    ],
)
def test_damaged_checkpoint_is_a_clear_error(tmp_path, kind, match, capsys):
    assert main(["train", "--task", "diabetes", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_damaged(kind, path.read_bytes()))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert match.split(",")[0] in capsys.readouterr().out


def test_schedules_of_gramopt_train():
    """The factors of ``--schedule`` over T = 40 steps (10 per epoch)."""
    from gramopt.training.schedules import lr_factor

    assert lr_factor("constant", 40, 10) is None
    cosine = lr_factor("cosine", 40, 10)
    assert [cosine(t) for t in (0, 20, 40, 50)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    warm = lr_factor("warmup-poly", 40, 10)
    assert [warm(t) for t in (0, 5, 10, 25, 40)] == pytest.approx([0.1, 0.55, 1.0, 0.25, 0.0])
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor("linear", 40, 10)
