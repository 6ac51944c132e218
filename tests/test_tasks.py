"""Embedded tasks: fixed splits, shapes, and a model that trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import EXTERNAL_DATA
from gramopt.cli import main
from gramopt.tasks import TASKS, get_task
from gramopt.training import build_optimizer, training_step
from gramopt.training.registry import optimizers_for, task_hyper

OFFLINE = ["teacher", "diabetes", "digits", "mnist", "recall"]


@pytest.mark.parametrize("name", OFFLINE)
def test_split_is_fixed_by_seed(name):
    task = get_task(name)
    a, b, c = task.load(0), task.load(0), task.load(1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape[0] > a.test_x.shape[0] > 0
    if name not in ("teacher",):
        assert not torch.equal(a.train_y, c.train_y)


@pytest.mark.parametrize("name", OFFLINE)
@pytest.mark.parametrize("optimizer", ["ggn", "sgd", "adamw"])
def test_each_task_trains_a_few_steps(name, optimizer):
    task = get_task(name)
    split = task.load(0)
    model = task.build_model(0)
    opt = build_optimizer(optimizer, model, task.loss, dict(task_hyper(task, optimizer)))
    x, y = split.train_x[:32], split.train_y[:32]
    losses = [float(training_step(opt, model, task.loss, x, y)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_model_init_depends_on_seed_only():
    task = get_task("digits")
    torch.manual_seed(123)
    a = task.build_model(0)
    torch.manual_seed(456)
    b = task.build_model(0)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unknown_task_lists_names():
    with pytest.raises(ValueError, match="choose one of .*digits"):
        get_task("imagenet")


def test_registry_lists_every_task():
    assert set(OFFLINE) <= set(TASKS)


@pytest.mark.parametrize("name", sorted(set(TASKS) - set(EXTERNAL_DATA)))
def test_every_other_task_loads_with_what_pip_installs(name, external_data_hidden):
    """The tasks outside tests/conftest.py's EXTERNAL_DATA read nothing but pip packages'
    files (or generate their data): a task that reads another folder belongs in that list."""
    split = get_task(name).load(0)
    if get_task(name).kind == "residual":  # generated points (tests/test_residual_tasks.py)
        assert split.train.interior.shape[0] > 0 and split.test_x.shape[0] > 0
        return
    assert split.train_x.shape[0] == split.train_y.shape[0] > 0 and split.test_x.shape[0] > 0


@pytest.mark.parametrize("name", sorted(EXTERNAL_DATA))
def test_a_task_whose_data_is_missing_says_how_to_install_it(name, external_data_hidden, tmp_path, capsys):
    data = EXTERNAL_DATA[name]
    with pytest.raises(FileNotFoundError) as caught:
        get_task(name).load(0)
    assert str(external_data_hidden) in str(caught.value) and data.env in str(caught.value)
    assert "apt-get install" in str(caught.value)
    # the command line prints the same as an error, without a traceback
    argv = ["train", "--task", name, "--optimizer", "sgd", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert "error:" in printed and data.env in printed and "Traceback" not in printed


def test_ci_runs_the_suite_with_every_external_data_set_hidden():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert 'no_data=$(mktemp -d)' in ci
    for data in EXTERNAL_DATA.values():
        assert f'export {data.env}="$no_data"' in ci, data.env


@pytest.mark.needs_data("fashion-mnist")
def test_fashion_mnist_is_the_official_split():
    """The installed data set itself (skipped where it is not installed)."""
    split = get_task("fashion-mnist").load(0)
    assert split.train_x.shape == (60_000, 1, 28, 28) and split.test_x.shape == (10_000, 1, 28, 28)
    assert (
        torch.bincount(split.train_y).tolist() == [6000] * 10 and torch.bincount(split.test_y).tolist() == [1000] * 10
    )
    assert 0.0 <= float(split.train_x.min()) and float(split.train_x.max()) <= 1.0


@pytest.mark.parametrize("name", optimizers_for("supervised"))
def test_every_registered_optimizer_builds_and_steps_with_its_defaults(name):
    """Each registry entry for supervised tasks (gramopt's methods, torch's, the installed
    peers) builds from its defaults and the task's settings and takes finite steps: what
    `gramopt compare` relies on (those for residual tasks: tests/test_residual_tasks.py)."""
    from gramopt.training import OPTIMIZERS, with_epoch_defaults

    task = get_task("teacher")
    split = task.load(0)
    model = task.build_model(0)
    hyper = with_epoch_defaults(name, dict(task_hyper(task, name)), 4)
    opt = build_optimizer(name, model, task.loss, hyper)
    sources = ("gramopt", "torch", "gramopt variant of torch", "pytorch-optimizer", "heavyball", "singd")
    assert OPTIMIZERS[name].source in sources
    losses = [float(training_step(opt, model, task.loss, split.train_x[:64], split.train_y[:64])) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "muon", "ikfac"])
def test_the_character_language_model_trains(optimizer):
    task = get_task("charlm")
    split = task.load(0)
    assert split.train_x.shape == split.train_y.shape == (4000, 32)
    assert torch.equal(split.train_x[:, 1:], split.train_y[:, :-1])  # targets: the next character
    model = task.build_model(0)
    logits = model(split.train_x[:4])
    # [b, V, T]: classes in dimension 1, as F.cross_entropy takes them
    assert logits.shape == (4, len(__import__("gramopt.tasks.language", fromlist=["x"]).vocabulary()), 32)
    # causal: changing a later character leaves the earlier positions' logits alone
    changed = split.train_x[:4].clone()
    changed[:, 20] = (changed[:, 20] + 1) % logits.shape[1]
    assert torch.allclose(model(changed)[:, :, :20], logits[:, :, :20], atol=1e-6)
    opt = build_optimizer(optimizer, model, task.loss, dict(task_hyper(task, optimizer)))
    x, y = split.train_x[:64], split.train_y[:64]
    losses = [float(training_step(opt, model, task.loss, x, y)) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_the_resnet_task_uses_batchnorm_and_trains_with_seng():
    from torch import nn

    task = get_task("fashion-resnet")
    model = task.build_model(0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    x = torch.rand(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    opt = build_optimizer("seng", model, task.loss, dict(task_hyper(task, "seng")))
    losses = [float(training_step(opt, model, task.loss, x, y)) for _ in range(4)]
    assert losses[-1] < losses[0]
