"""Residual tasks (the PINN problems as `gramopt compare` tasks): registration, their points,
the full-batch loop with every optimizer that applies, compare's report, and the errors for
optimizers that do not apply."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace

import pytest
import torch

import gramopt
from gramopt.cli import main
from gramopt.compare.run import CompareConfig, default_optimizers, run_comparison, write_outputs
from gramopt.pde.problems import HEAT, POISSON_2D, POISSON_5D
from gramopt.tasks import TASKS, Task, get_task, ladder, register_task
from gramopt.tasks.record import RESIDUAL_LOSS, RESIDUAL_METRIC
from gramopt.tasks.residual import ResidualData, residual_task
from gramopt.training import OPTIMIZERS, ResidualTrainer, TrainConfig, Trainer, build_optimizer, make_trainer
from gramopt.training.registry import optimizers_for, task_hyper

RESIDUAL = ("poisson2d", "poisson5d", "heat")
PROBLEMS = {"poisson2d": POISSON_2D, "poisson5d": POISSON_5D, "heat": HEAT}


def tiny(problem, name):
    """``problem`` with a small network and few points: a task that trains in seconds. With
    more parameters than residual rows, the Gauss-Newton steps need a larger damping than
    the tasks' (their first steps raise the error on such a small problem otherwise)."""
    small = replace(problem, hidden=(16, 16), interior_points=60, boundary_points=24, evaluation_points=300)
    damped = dict(damping=0.1)
    return residual_task(small, name=name, description=f"tiny {problem.name}",
                         ladder=ladder(RESIDUAL_METRIC, (0.5, 0.1), below=True), budget_seconds=0.5, steps=5,
                         tuned={"adam": dict(lr=1e-2), "gauss-newton": damped, "engd": damped})


@pytest.fixture
def tiny_tasks():
    """A tiny registered version of each residual task, removed afterwards."""
    before = dict(TASKS)
    names = {}
    for name, problem in PROBLEMS.items():
        names[name] = register_task(tiny(problem, f"tiny-{name}")).name
    yield names
    TASKS.clear()
    TASKS.update(before)


def test_the_pinn_tasks_are_registered_as_residual_tasks():
    for name in RESIDUAL:
        task = get_task(name)
        assert task.kind == "residual" and task.loss == RESIDUAL_LOSS and task.metric == RESIDUAL_METRIC
        assert all(rung.below and rung.metric == RESIDUAL_METRIC for rung in task.ladder)
        assert task.batch_size == PROBLEMS[name].interior_points + PROBLEMS[name].boundary_points
        model = task.build_model(0)
        assert sum(p.numel() for p in model.parameters()) == PROBLEMS[name].num_params
        assert all(p.dtype == torch.float64 for p in model.parameters())
    assert [get_task(name).budget_seconds for name in RESIDUAL] == [120.0, 600.0, 300.0]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(loss="mse"), "residual task's loss is 'least_squares'"),
        (dict(metric="test_mse"), "evaluated on test_rel_l2"),
        (dict(ladder=ladder(RESIDUAL_METRIC, (0.1, 0.5), below=False)), "ladder goes down"),
        (dict(kind="variational"), "kind 'variational' has no training loop"),
    ],
)
def test_an_incomplete_residual_task_is_refused(fields, message):
    task = replace(tiny(POISSON_2D, "refused"), **fields)
    with pytest.raises(ValueError, match=message):
        register_task(task)
    assert "refused" not in TASKS


@pytest.mark.parametrize("name", RESIDUAL)
def test_points_are_fixed_by_the_seed_and_resampled_where_the_problem_says(name):
    task = tiny(PROBLEMS[name], name)
    a, b, c = task.load(0), task.load(0), task.load(1)
    assert isinstance(a, ResidualData)
    assert torch.equal(a.train.interior, b.train.interior) and torch.equal(a.validation_x, b.validation_x)
    assert not torch.equal(a.train.interior, c.train.interior) and not torch.equal(a.validation_x, c.validation_x)
    assert torch.equal(a.test_x, c.test_x)  # the test set is the same for every seed
    assert not torch.equal(a.train.interior, a.validation.interior)
    stream = a.stream()
    first, second = stream.next(), stream.next()
    assert torch.equal(first.interior, a.train.interior) and torch.equal(first.boundary, a.train.boundary)
    assert torch.equal(first.interior, second.interior) == (not PROBLEMS[name].resample)


@pytest.mark.parametrize("name", RESIDUAL)
@pytest.mark.parametrize("optimizer", ["gauss-newton", "engd", "adam", "lbfgs"])
def test_each_residual_task_trains_a_few_steps_with_each_of_its_optimizers(tiny_tasks, name, optimizer):
    assert optimizer in optimizers_for("residual")
    config = TrainConfig(tiny_tasks[name], optimizer, epochs=5, save=False)
    trainer = make_trainer(config, progress=False, verbose=False)
    assert isinstance(trainer, ResidualTrainer)
    result = trainer.run()
    assert not result.diverged, result.diverged_reason
    first, last = result.epochs[0], result.epochs[-1]
    assert first["step"] == 0 and last["step"] == 5 and first["seconds"] == 0.0 < last["seconds"]
    assert {"train_loss", "val_loss", "val_rel_l2", RESIDUAL_METRIC} <= set(last)
    assert last["train_loss"] < first["train_loss"] and last[RESIDUAL_METRIC] < first[RESIDUAL_METRIC]


def test_the_loop_hands_the_steps_points_to_the_optimizer_and_times_steps_only(tiny_tasks, monkeypatch):
    """Every step gets the stream's next points (new ones where the problem resamples), and
    the clock adds the steps' own durations, not the evaluations'."""
    seen = []
    trainer = make_trainer(TrainConfig(tiny_tasks["heat"], "adam", epochs=3, save=False), progress=False, verbose=False)
    residuals = trainer.problem.residuals

    def spy(model, points):
        if torch.is_grad_enabled():  # a step (the evaluations run under no_grad)
            seen.append(points.interior.clone())
        return residuals(model, points)

    monkeypatch.setattr(trainer, "problem", replace(trainer.problem))
    object.__setattr__(trainer.problem, "residuals", spy)  # frozen record: a spy on this copy only
    result = trainer.run()
    stream = trainer.data.stream()
    assert len(seen) == 3 and all(torch.equal(x, stream.next().interior) for x in seen)
    assert trainer.seconds == pytest.approx(sum(result.step_seconds))


def test_gauss_newton_takes_its_constructors_defaults_and_engd_is_the_parameter_space_step():
    signature = inspect.signature(gramopt.GaussNewton.__init__).parameters
    for key, value in OPTIMIZERS["gauss-newton"].defaults.items():
        assert signature[key].default == value, key
    task = get_task("poisson2d")
    engd = build_optimizer("engd", task.build_model(0), task.loss, task_hyper(task, "engd"))
    assert engd.space == "parameter" and engd.line_search == "grid" and engd.line_search_trials == 31
    gauss_newton = build_optimizer("gauss-newton", task.build_model(0), task.loss, task_hyper(task, "gauss-newton"))
    assert gauss_newton.space == "auto" and gauss_newton.line_search == "grid"


def test_residual_and_supervised_optimizers_are_kept_apart(capsys, tmp_path):
    assert set(optimizers_for("residual")) == {"gauss-newton", "engd", "adam", "lbfgs"}
    assert not set(optimizers_for("residual")) & set(optimizers_for("supervised"))
    assert CompareConfig(tasks=("poisson2d",)).validated().optimizers == default_optimizers("residual")
    assert set(default_optimizers("residual")) == set(optimizers_for("residual"))
    assert CompareConfig(tasks=("poisson2d",), optimizers=("all",)).validated().optimizers == optimizers_for("residual")
    with pytest.raises(ValueError, match="optimizer 'ggn' trains supervised tasks.*residual tasks: gauss-newton"):
        CompareConfig(tasks=("poisson2d",), optimizers=("ggn", "adam")).validated()
    with pytest.raises(ValueError, match="optimizer 'adam' trains residual tasks"):
        CompareConfig(tasks=("teacher",), optimizers=("adam",)).validated()
    with pytest.raises(ValueError, match="optimizer 'sgd' trains supervised tasks, not task 'poisson2d'"):
        make_trainer(TrainConfig("poisson2d", "sgd", save=False))
    with pytest.raises(ValueError, match="train it with gramopt.training.make_trainer"):
        Trainer(TrainConfig("poisson2d", "adam", save=False))
    assert main(["compare", "--task", "poisson2d", "--optimizers", "sgd", "--out", str(tmp_path)]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert "error:" in printed and "gauss-newton, engd, adam, lbfgs" in printed and "Traceback" not in printed


def test_gramopt_tasks_lists_each_tasks_kind(capsys):
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in RESIDUAL:
        assert any(line.startswith(f"| {name} | residual | {RESIDUAL_LOSS} | {RESIDUAL_METRIC} |") for line in lines)
    assert any(line.startswith("| teacher | supervised |") for line in lines)


def test_train_writes_metrics_and_resumes_a_residual_run_bit_for_bit(tiny_tasks, tmp_path, capsys):
    name = tiny_tasks["poisson5d"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    base = ["train", "--task", name, "--optimizer", "adam", "--no-progress"]
    assert main([*base, "--epochs", "4", "--out", str(whole)]) == 0
    assert main([*base, "--epochs", "2", "--out", str(part)]) == 0
    assert main(["train", "--resume", str(part), "--epochs", "4", "--no-progress"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, part))
    assert a["task"]["kind"] == "residual" and [r["step"] for r in a["epochs"]] == [0, 1, 2, 3, 4]
    for x, y in zip(a["epochs"], b["epochs"], strict=True):
        assert x["step"] == y["step"] and x[RESIDUAL_METRIC] == y[RESIDUAL_METRIC]
    assert main(["train", "--task", name, "--epochs", "1", "--no-progress", "--out", str(tmp_path / "gn")]) == 0
    metrics = json.loads((tmp_path / "gn" / "metrics.json").read_text())
    assert metrics["config"]["optimizer"] == "gauss-newton"  # the default for residual tasks


def test_compare_runs_a_residual_task_and_its_report_renders(tiny_tasks, tmp_path):
    name = tiny_tasks["poisson2d"]
    config = CompareConfig(tasks=(name,), optimizers=("gauss-newton", "adam"), seeds=2, budget_seconds=0.3,
                           progress=False, out=str(tmp_path))
    results = run_comparison(config)
    paths = write_outputs(results, tmp_path)
    task = json.loads(paths["results"].read_text())["tasks"][name]
    assert task["task"]["kind"] == "residual" and task["timing_reference"] == "adam" and task["flags"] == []
    assert task["optimizers"]["adam"]["summary"]["step_time_ratio"]["median"] == 1.0
    for method in task["optimizers"].values():
        run = method["settings"][method["winner"]]["runs"][0]
        assert run["status"] == "ok" and run["seconds"] >= 0.3 and len(run["load_average"]) == 3
        assert all(record[RESIDUAL_METRIC] > 0 and "val_rel_l2" in record for record in run["history"])
    report = paths["report"].read_text()
    assert f"## {name}" in report and "Residual task" in report and "step time / Adam" in report
    assert "s to test rel l2 <= 0.5" in report and "Load average" in report
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_mixed_comparison_runs_each_task_with_the_optimizers_of_its_kind(tiny_tasks):
    config = CompareConfig(tasks=(tiny_tasks["poisson2d"], "diabetes"), optimizers=("adam", "sgd"), seeds=1,
                           budget_seconds=0.1, progress=False, grid="base").validated()
    results = run_comparison(config)
    residual, supervised = results["tasks"][tiny_tasks["poisson2d"]], results["tasks"]["diabetes"]
    assert list(residual["optimizers"]) == ["adam"] and "sgd" in residual["skipped"]
    assert list(supervised["optimizers"]) == ["sgd"] and "adam" in supervised["skipped"]


def test_task_records_say_their_kind():
    assert all(isinstance(task, Task) and task.kind in ("supervised", "residual") for task in TASKS.values())
