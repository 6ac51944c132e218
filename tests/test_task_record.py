"""The task record: registration refuses an incomplete task, the tuned table holds only
what differs from the registry, and `gramopt compare` reads everything per task from it."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

import gramopt.tasks
from gramopt.compare.config import LADDERS, TARGETS, grid
from gramopt.compare.run import CompareConfig, run_comparison
from gramopt.tasks import (
    TASKS,
    Split,
    Task,
    get_task,
    ladder,
    random_split,
    register_task,
    standardized,
)
from gramopt.training.registry import MISSING_PEERS, OPTIMIZERS, task_hyper


@pytest.fixture
def registry():
    """TASKS as it was after the test (whatever the test registered is removed)."""
    before = dict(TASKS)
    yield TASKS
    TASKS.clear()
    TASKS.update(before)


def _load(seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 3, generator=generator)
    return random_split(x, x.sum(1, keepdim=True), 0.25, seed)


def toy(**fields) -> Task:
    """A complete regression task; ``fields`` replace its own."""
    record = dict(
        name="toy", description="a linear toy", loss="mse", build_model=lambda seed: nn.Linear(3, 1), load=_load,
        epochs=1, batch_size=16, ladder=ladder("train_loss", (1.0, 0.1), below=True), budget_seconds=0.2,
    )
    return Task(**{**record, **fields})


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(ladder=()), "no ladder"),
        (dict(budget_seconds=None), "no budget_seconds"),
        (dict(budget_seconds=0.0), "budget_seconds must be a number > 0"),
        (dict(budget_seconds=float("inf")), "budget_seconds must be a number > 0"),
        (dict(eval_samples=0), "eval_samples must be None"),
        (dict(epochs=0), "epochs must be an int >= 1"),
        (dict(batch_size=2.5), "batch_size must be an int >= 1"),
        (dict(ladder=(0.1, 0.01)), "must hold Target rungs"),
        (dict(ladder=ladder("train_loss", (0.1, 1.0), below=True)), "from the loosest to the tightest"),
        (dict(ladder=ladder("train_loss", (0.1,), True) + ladder("test_mse", (0.01,), True)), "share one metric"),
        (dict(ladder=ladder("test_accuracy", (0.9,), below=False)), "rungs are on train_loss or on the task's metric"),
        (dict(metric="test_accuracy", ladder=ladder("test_accuracy", (0.9,), False)), "is evaluated on test_mse"),
        (dict(loss="hinge"), "loss 'hinge' is not one of"),
        (dict(kind="variational"), "kind 'variational' has no training loop"),
        (dict(tuned={"sgd": 0.1}), "tuned['sgd'] must be a dict"),
    ],
)
def test_an_incomplete_task_fails_at_registration_and_registers_nothing(registry, fields, message):
    with pytest.raises(ValueError, match="task 'toy' cannot be registered") as caught:
        register_task(toy(**fields))
    assert message in str(caught.value)
    assert "toy" not in TASKS


def test_a_name_registers_once(registry):
    register_task(toy())
    with pytest.raises(ValueError, match="already registered"):
        register_task(toy(description="another"))
    assert get_task("toy").description == "a linear toy"


def test_the_record_expresses_a_residual_task_whose_metric_falls():
    """A physics-informed task (full-batch residuals, relative L2 error, lower is better)
    fits the record (tests/test_residual_tasks.py trains such tasks)."""
    pinn = toy(
        name="poisson", kind="residual", loss="least_squares", metric="test_rel_l2", batch_size=1020,
        ladder=ladder("test_rel_l2", (1e-2, 1e-4, 1e-6), below=True), budget_seconds=120.0,
    )
    assert pinn.problems() == []
    assert replace(pinn, loss="residual").problems() == [
        "a residual task's loss is 'least_squares' (1/2 sum of squared residuals), not 'residual'"
    ]
    assert [rung.reached({"test_rel_l2": 5e-5}) for rung in pinn.ladder] == [True, True, False]


def test_every_registered_task_is_complete():
    for task in TASKS.values():
        assert task.problems() == [], task.name
        assert task.ladder and task.budget_seconds > 0, task.name


def test_tuned_holds_only_what_differs_from_the_registry():
    for task in TASKS.values():
        for name, values in task.tuned.items():
            assert name in OPTIMIZERS or name in MISSING_PEERS, (task.name, name)
            if name not in OPTIMIZERS:
                continue
            defaults = OPTIMIZERS[name].run_defaults_for(task.loss)
            assert set(values) <= set(defaults), (task.name, name)
            same = {key for key, value in values.items() if defaults[key] == value}
            assert not same, f"{task.name} repeats {name}'s defaults {sorted(same)}"


def test_hyper_is_the_registry_defaults_with_the_tuned_values_over_them(registry):
    task = register_task(toy(tuned={"sgd": dict(lr=0.5), "muon": dict(lr=0.3)}))
    assert task_hyper(task, "sgd") == {**OPTIMIZERS["sgd"].defaults, "lr": 0.5}
    assert task_hyper(task, "ggn") == OPTIMIZERS["ggn"].run_defaults_for("mse")  # GGN's per-loss lr and damping
    assert "coefficient_steps" not in task_hyper(task, "fngd")  # one epoch, filled in by each run
    if "muon-f32" in OPTIMIZERS:  # tuned as muon
        assert task_hyper(task, "muon-f32")["lr"] == 0.3
    assert grid("sgd", task)[1] == task_hyper(task, "sgd")
    bad = toy(name="bad", tuned={"sgd": dict(betas=(0.9, 0.99))})
    with pytest.raises(ValueError, match=r"task 'bad' tunes \['betas'\] of sgd"):
        task_hyper(bad, "sgd")


def test_a_shared_table_is_copied_into_each_record():
    table = {"sgd": dict(lr=0.5)}
    first, second = toy(tuned=table), toy(name="toy2", tuned=table)
    first.tuned["sgd"]["lr"] = 1.0
    assert second.tuned["sgd"]["lr"] == 0.5 and table["sgd"]["lr"] == 0.5


def test_compare_reads_the_ladder_budget_and_evaluation_size_from_the_record(registry, tmp_path):
    register_task(toy(eval_samples=10, ladder=ladder("train_loss", (10.0, 1e-9), below=True), budget_seconds=0.1))
    assert [rung.value for rung in LADDERS["toy"]] == [10.0, 1e-9] and TARGETS["toy"].value == 10.0
    config = CompareConfig(tasks=("toy",), optimizers=("sgd",), seeds=1, out=str(tmp_path), progress=False)
    results = run_comparison(config)["tasks"]["toy"]
    assert results["budget"]["seconds"] == 0.1 and results["task"]["eval_samples"] == 10
    assert [rung["value"] for rung in results["rungs"]] == [10.0, 1e-9]
    assert results["target"]["text"] == "train_loss <= 10"


def test_every_module_of_the_package_is_imported_with_it():
    import pkgutil

    for module in pkgutil.iter_modules(gramopt.tasks.__path__):
        assert f"gramopt.tasks.{module.name}" in sys.modules, module.name
    embedded = ["teacher", "diabetes", "digits", "mnist", "fashion-mnist", "fashion-resnet", "recall", "charlm",
                "poisson2d", "poisson5d", "heat"]
    assert list(TASKS)[:11] == embedded  # the order of `gramopt tasks`: FAMILIES first


def test_standardized_uses_the_training_statistics():
    x = torch.randn(100, 2) * 3 + 5
    raw = random_split(x, x[:, :1] * 2, 0.2, 0)
    split = standardized(raw)
    assert torch.allclose(split.train_x.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(split.train_x.std(0), torch.ones(2), atol=1e-5)
    assert torch.allclose(split.train_y.std(0), torch.ones(1), atol=1e-5)
    expected = (raw.test_x - raw.train_x.mean(0)) / raw.train_x.std(0)  # the training set's statistics
    assert split.test_x.shape == (20, 2) and torch.allclose(split.test_x, expected, atol=1e-5)
