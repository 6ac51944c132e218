"""`gramopt tasks` and `gramopt train`: outputs, resume, errors."""

from __future__ import annotations

import json
import re

import torch
from rich.console import Console

from gramopt.cli import _tasks, main
from gramopt.tasks import TASKS
from gramopt.training import load_checkpoint


def train(tmp_path, *extra):
    return main(["train", "--task", "diabetes", "--no-progress", "--out", str(tmp_path), *extra])


def test_tasks_lists_the_tasks_uncut_when_piped(capsys):
    """Piped (not a terminal, rich's 80 columns): one whole line per task, name and
    description uncut."""
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "…" not in "".join(lines)
    for task in TASKS.values():
        row = [line for line in lines if line.startswith(f"| {task.name} |")]
        assert len(row) == 1 and row[0].endswith(f"| {task.description} |"), (task.name, row)


def test_tasks_on_a_narrow_terminal_keep_the_names_whole():
    console = Console(force_terminal=True, width=60, record=True)
    _tasks(console)
    text = console.export_text()
    assert "…" not in text
    for task in TASKS.values():
        assert re.search(rf"│ {re.escape(task.name)} +│", text), task.name


def test_train_writes_metrics_and_checkpoint(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert "epoch   2" in out and "test_mse" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert {"train_loss", "test_loss", "test_mse", "seconds"} <= set(metrics["epochs"][0])
    assert metrics["config"]["optimizer"] == "ggn" and metrics["environment"]["torch"] == torch.__version__
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(checkpoint["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}


def test_resume_continues_bit_for_bit(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(full, "--epochs", "3", "--optimizer", "sgd") == 0
    assert train(part, "--epochs", "1", "--optimizer", "sgd") == 0
    assert main(["train", "--resume", str(part), "--epochs", "3", "--no-progress"]) == 0
    a = load_checkpoint(full / "checkpoint.pt")["model"]
    b = load_checkpoint(part / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = json.loads((part / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    assert main(["train", "--task", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().out
    assert main(["train", "--optimizer", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown optimizer 'nope'" in capsys.readouterr().out
    assert main(["train", "--lr", "-1", "--task", "diabetes", "--out", str(tmp_path)]) == 2
    assert "lr must be > 0" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().out


def test_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1") == 0
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().out


def test_resume_of_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1", "--optimizer", "sgd") == 0
    capsys.readouterr()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert "already trained its 1 epoch(s)" in out and "--epochs" in out and "wrote" not in out
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_refuses_options_of_another_run(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1", "--optimizer", "sgd") == 0
    capsys.readouterr()
    for flags, named in ((["--optimizer", "ggn"], "--optimizer"), (["--task", "teacher"], "--task")):
        assert main(["train", "--resume", str(tmp_path), "--epochs", "2", *flags]) == 2
        assert named in capsys.readouterr().out


def test_a_peer_whose_package_is_missing_names_the_extra(monkeypatch, tmp_path, capsys):
    from gramopt.training import OPTIMIZERS
    from gramopt.training.registry import MISSING_PEERS

    monkeypatch.delitem(OPTIMIZERS, "psgd-kron", raising=False)
    monkeypatch.setitem(MISSING_PEERS, "psgd-kron", "it comes from the package heavyball, not installed; "
                        "install it with `pip install 'gramopt[bench]'`")
    assert main(["compare", "--optimizers", "psgd-kron", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "heavyball" in out and "gramopt[bench]" in out and "unknown optimizer" not in out
