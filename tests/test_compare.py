"""`gramopt compare`: outputs, grids, selection, divergence, bad input, the loop's schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gramopt.cli import _parser, main
from gramopt.compare import config as compare_config
from gramopt.compare.config import GRID_SIZE, GRID_SIZES, LADDERS, TARGETS, Target, grid
from gramopt.compare.memory import AVAILABLE, peak_memory
from gramopt.compare.plots import STYLES, _on_grid, style
from gramopt.compare.run import (
    CompareConfig,
    default_optimizers,
    run_comparison,
    select,
    time_to_target,
    write_outputs,
)
from gramopt.errors import SingularSystemError
from gramopt.tasks import TASKS, Task, get_task
from gramopt.training import OPTIMIZERS, TrainConfig, Trainer
from gramopt.training.registry import OptimizerSpec, build_optimizer, task_hyper

TINY = dict(tasks=("diabetes",), seeds=2, budget_seconds=0.15, progress=False)


def test_outputs_have_the_promised_contents(tmp_path):
    results = run_comparison(CompareConfig(optimizers=("ggn", "sgd"), out=str(tmp_path), **TINY))
    paths = write_outputs(results, tmp_path)

    saved = json.loads(paths["results"].read_text())
    task = saved["tasks"]["diabetes"]
    assert task["target"]["text"] == TARGETS["diabetes"].describe()
    assert task["budget"]["seconds"] == 0.15 and "0.15 s of optimizer time" in task["budget"]["text"]
    for name in ("ggn", "sgd"):
        method = task["optimizers"][name]
        assert len(method["settings"]) == GRID_SIZE
        assert all(len(s["runs"]) == 2 for s in method["settings"])
        run = method["settings"][method["winner"]]["runs"][0]
        history = run["history"]
        assert history[0]["step"] == 0 and history[0]["seconds"] == 0.0  # the starting point
        assert {"epoch", "step", "seconds", "train_loss", "test_loss", "test_mse"} <= set(history[-1])
        seconds = [r["seconds"] for r in history]
        assert seconds == sorted(seconds) and seconds[-1] == run["seconds"] >= 0.15  # the budget was used
        summary = method["summary"]
        for key in ("time_to_target", "final_train_loss", "final_metric", "step_time_ratio", "peak_memory_bytes"):
            assert {"median", "min", "max", "n", "of"} <= set(summary[key]) and summary[key]["of"] == 2
        assert (
            summary["final_train_loss"]["min"]
            <= summary["final_train_loss"]["median"]
            <= summary["final_train_loss"]["max"]
        )
    # SGD is the timing reference: its ratio to itself is 1 in every round.
    assert task["optimizers"]["sgd"]["summary"]["step_time_ratio"]["median"] == 1.0
    assert saved["environment"]["versions"]["torch"] == torch.__version__ and saved["environment"]["threads"] == "1"

    report = paths["report"].read_text()
    assert "## diabetes" in report and TARGETS["diabetes"].describe() in report
    for rung in LADDERS["diabetes"]:
        assert f"s to train loss <= {rung.value:g}" in report
    for header in ("final train loss", "final test_mse", "step time / SGD", "peak memory (MiB)"):
        assert header in report
    assert "validation set of" in report and "Diverged:" in report
    assert "First per rung" in report and "fastest gramopt method" in report
    winner = task["optimizers"]["ggn"]["settings"][task["optimizers"]["ggn"]["winner"]]["hyper"]
    assert f"damping={winner['damping']:.3g}" in report and "ggn (winner)" in report

    png = paths["curves"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(paths["curves"]).shape
    assert 1.5 * height < width < 3 * height  # a 2 x 3 block of panels per task, not one long row


def test_every_optimizer_gets_a_grid_of_the_same_size_around_its_defaults():
    for task in TASKS.values():
        for name in (name for name, spec in OPTIMIZERS.items() if task.kind in spec.kinds):
            settings = grid(name, task)
            assert len(settings) == GRID_SIZE
            assert len({json.dumps(s, sort_keys=True) for s in settings}) == GRID_SIZE
            tuned_as = OPTIMIZERS[name].tuned_as or name  # muon-f32 takes muon's settings
            base = {**OPTIMIZERS[name].run_defaults_for(task.loss), **task_hyper(task, tuned_as)}
            assert settings[GRID_SIZE // 2] == base  # the middle setting is the default
            full = grid(name, task, "full")
            assert len(full) == GRID_SIZES["full"] == 9
            assert len({json.dumps(s, sort_keys=True) for s in full}) == 9
            # two knobs: exactly two hyper-parameters (lr moving with adamw_lr counts as one) vary
            varied = {k for k in base if len({repr(s[k]) for s in full}) > 1} - {"adamw_lr"}
            assert len(varied) == 2 and "lr" in varied, (name, varied)
            assert any(s["lr"] == base["lr"] for s in full)


def test_ggn_grids_centre_on_the_constructors_per_loss_defaults(monkeypatch):
    """The registry leaves GGN's lr and damping to its constructor (None); the grids take
    the same per-loss numbers (DEFAULT_HYPER), so a task without GGN settings of its own
    is tuned around what ``gramopt.GGN(model, loss=...)`` does."""
    from gramopt.optim.ggn.optimizer import DEFAULT_HYPER

    spec = OPTIMIZERS["ggn"]
    assert spec.defaults["lr"] is None and spec.defaults["damping"] is None
    for loss in ("mse", "cross_entropy"):
        task = Task("t", "", loss, lambda seed: None, lambda seed: None, 1, 8)
        settings = grid("ggn", task)
        middle = settings[GRID_SIZE // 2]
        assert (middle["lr"], middle["damping"]) == (DEFAULT_HYPER[loss]["lr"], DEFAULT_HYPER[loss]["damping"])
        assert [s["damping"] for s in settings] == pytest.approx(
            [DEFAULT_HYPER[loss]["damping"] * f for f in (0.1, 1, 10)]
        )
        model = torch.nn.Linear(3, 2)
        opt = build_optimizer("ggn", model, loss, {})
        assert (opt.param_groups[0]["lr"], opt.damping) == (DEFAULT_HYPER[loss]["lr"], DEFAULT_HYPER[loss]["damping"])
        opt.close()
    # a loss the spec has no numbers for: the grid cannot scale None, and says so
    task = Task("u", "", "hinge", lambda seed: None, lambda seed: None, 1, 8)
    with pytest.raises(ValueError, match="damping, whose base on task u is not a number"):
        grid("ggn", task)


def test_second_order_methods_get_lr_times_damping_and_first_order_their_own_knob():
    task = get_task("teacher")
    for name in ("ggn", "seng", "fngd", "ikfac", "singd"):
        full = grid(name, task, "full")
        assert {(round(s["lr"], 12), round(s["damping"], 12)) for s in full} == {
            (round(lr, 12), round(d, 12)) for lr in (full[4]["lr"] / 3, full[4]["lr"], full[4]["lr"] * 3)
            for d in (full[4]["damping"] / 10, full[4]["damping"], full[4]["damping"] * 10)
        }
    assert {s["weight_decay"] for s in grid("adamw", task, "full")} == {0.0, 0.01, 0.1}
    assert {s["momentum"] for s in grid("sgd", task, "full")} == {0.5, 0.9, 0.97}
    with pytest.raises(ValueError, match="unknown grid"):
        CompareConfig(grid="huge").validated()


def test_newly_registered_methods_are_picked_up(monkeypatch):
    spec = OptimizerSpec("newton", "a new gramopt method", OPTIMIZERS["sgd"].build, dict(lr=0.5, momentum=0.0))
    monkeypatch.setitem(OPTIMIZERS, "newton", spec)
    assert "newton" in default_optimizers()
    assert [s["lr"] for s in grid("newton", get_task("teacher"))] == pytest.approx([0.5 / 3, 0.5, 1.5])
    supervised = tuple(name for name, spec in OPTIMIZERS.items() if "supervised" in spec.kinds)
    assert CompareConfig(optimizers=("all",)).validated().optimizers == supervised  # the default task's kind


class _Singular(torch.optim.SGD):
    def step(self, closure=None):
        raise SingularSystemError("the damped system is singular")


def _broken(model, loss, hyper):
    raise TypeError("this optimizer cannot be built")


def test_diverging_and_failing_optimizers_are_reported_and_the_comparison_goes_on(monkeypatch, tmp_path):
    monkeypatch.setitem(
        OPTIMIZERS, "sgd-huge", OptimizerSpec("sgd-huge", "SGD, huge lr", OPTIMIZERS["sgd"].build, dict(lr=1e6))
    )
    singular = OptimizerSpec("singular", "raises", lambda m, loss, h: _Singular(m.parameters(), **h), dict(lr=0.1))
    monkeypatch.setitem(OPTIMIZERS, "singular", singular)
    monkeypatch.setitem(OPTIMIZERS, "broken", OptimizerSpec("broken", "fails", _broken, dict(lr=0.1)))
    config = CompareConfig(optimizers=("sgd-huge", "singular", "broken", "sgd"), out=str(tmp_path), **TINY)
    results = run_comparison(config)
    methods = results["tasks"]["diabetes"]["optimizers"]
    huge = [r for s in methods["sgd-huge"]["settings"] for r in s["runs"]]
    assert all(r["status"] == "diverged" and r["final_train_loss"] is None for r in huge)
    assert all(r["time_to_target"] is None and r["time_to_rungs"] == [None] * 3 for r in huge)
    singular_runs = [r for s in methods["singular"]["settings"] for r in s["runs"]]
    assert all(r["status"] == "diverged" and "SingularSystemError" in r["reason"] for r in singular_runs)
    broken = [r for s in methods["broken"]["settings"] for r in s["runs"]]
    assert all(r["status"] == "failed" and "cannot be built" in r["reason"] for r in broken)
    sgd = methods["sgd"]["settings"][methods["sgd"]["winner"]]["runs"]
    assert all(r["status"] == "ok" and math.isfinite(r["final_train_loss"]) for r in sgd)
    assert methods["singular"]["summary"]["step_time_ratio"]["n"] == 0  # diverged while timed: no ratio
    paths = write_outputs(results, tmp_path)
    report = paths["report"].read_text()
    assert "sgd-huge (2/2 diverged)" in report and "broken (2/2 failed)" in report
    json.loads(paths["results"].read_text())  # strict JSON despite the infinities


def test_unknown_names_list_the_valid_ones(tmp_path, capsys):
    assert main(["compare", "--task", "imagenet", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "unknown task 'imagenet'" in out and "digits" in out and "Traceback" not in out
    assert main(["compare", "--optimizers", "ggn,bfgs", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "unknown optimizer 'bfgs'" in out and "adamw" in out and "Traceback" not in out
    assert main(["compare", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "seeds must be >= 1" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # nothing ran


def test_default_arguments_parse_to_the_default_comparison():
    args = _parser().parse_args(["compare"])
    assert (args.task, args.optimizers, args.seeds, args.budget_seconds, args.epochs) == (
        "teacher",
        None,
        3,
        None,
        None,
    )
    assert (args.out, args.threads, args.no_progress) == ("runs/compare", 1, False)
    config = CompareConfig().validated()
    assert config.tasks == ("teacher",) and config.seeds == compare_config.DEFAULT_SEEDS
    assert {"ggn", "sgd", "adamw"} <= set(config.optimizers)
    supervised = [name for name, spec in OPTIMIZERS.items() if "supervised" in spec.kinds]  # the default task's kind
    assert all(OPTIMIZERS[name].source != "gramopt" or name in config.optimizers for name in supervised)
    with pytest.raises(SystemExit):
        _parser().parse_args(["compare", "--budget-seconds", "1", "--epochs", "2"])


def test_cli_runs_a_tiny_comparison_and_prints_the_table(tmp_path, capsys):
    argv = ["compare", "--task", "diabetes", "--optimizers", "sgd,adamw", "--seeds", "1", "--epochs", "1",
            "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "diabetes: seconds to each rung" in out and "adamw" in out and "1 epochs per run" in out
    assert "| optimizer |" in out and "winning setting |" in out  # not a terminal: the whole table, uncut
    assert "…" not in out
    assert "diabetes: first per rung" in out and "| rung | first |" in out  # and who is first, as report.md has it
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "curves.png", "results.json"}
    history = json.loads((tmp_path / "results.json").read_text())["tasks"]["diabetes"]["optimizers"]["sgd"]["settings"][
        0
    ]["runs"][0]["history"]
    assert history[-1]["epoch"] == 1 and len(history) > 3  # evaluated inside the epoch, not only at its end


def test_time_to_target_and_selection():
    target = Target("train_loss", 0.5, below=True)
    history = [{"seconds": 0.0, "epoch": 0, "train_loss": 1.0}, {"seconds": 0.2, "epoch": 0.5, "train_loss": 0.6},
               {"seconds": 0.4, "epoch": 1.0, "train_loss": 0.5}, {"seconds": 0.6, "epoch": 1.5, "train_loss": 0.1}]
    assert time_to_target(history, target) == (0.4, 1.0)
    assert time_to_target(history[:2], target) == (None, None)
    assert Target("test_accuracy", 0.9, below=False).reached({"test_accuracy": 0.95})

    def setting(ttts, losses, low=(1.0, 1.0, 1.0)):
        """Validation times to two rungs (the loose one at ``low``, the tight one ``ttts``)."""
        return {"runs": [{"val_time_to_rungs": [a, t], "final_val_loss": x, "time_to_target": 0.0}
                         for a, t, x in zip(low, ttts, losses, strict=True)]}

    # median validation time to the tightest rung wins (a missed seed is infinitely slow) ...
    assert select([setting([1.0, None, None], [0.1] * 3), setting([3.0, 3.0, None], [0.9] * 3)]) == 1
    # ... the test figures play no part ...
    test_fast = setting([3.0, 3.0, None], [0.9] * 3)
    assert select([setting([1.0, 1.0, 2.0], [0.9] * 3), test_fast]) == 0
    # ... none reaches the tight rung: the looser rung decides, then the final validation loss.
    assert select([setting([None] * 3, [0.1] * 3, low=(2.0, 2.0, 2.0)), setting([None] * 3, [0.9] * 3)]) == 1
    assert select([setting([None] * 3, [0.3, 0.2, 9.0]), setting([None] * 3, [0.1, 0.15, None])]) == 1


def test_train_loss_ladders_select_on_the_train_loss_and_test_ladders_on_validation():
    """A train-loss rung selects on the train loss (optimization speed; its held-out
    counterpart measures generalization), ties by the final train loss; a test rung on
    its validation counterpart, ties by the final validation loss."""
    assert Target("train_loss", 0.01, below=True).on_validation() == Target("train_loss", 0.01, below=True)
    assert Target("train_loss", 0.01, below=True).selection_loss == "train_loss"
    assert Target("test_accuracy", 0.9, below=False).on_validation() == Target("val_accuracy", 0.9, below=False)
    assert Target("test_accuracy", 0.9, below=False).selection_loss == "val_loss"

    def setting(selection_loss, val_loss):
        return {"runs": [{"val_time_to_rungs": [1.0, None], "final_selection_loss": selection_loss,
                          "final_val_loss": val_loss}] * 3}

    # the selection loss decides a tie, whatever the validation loss says
    assert select([setting(0.5, 0.01), setting(0.1, 0.9)]) == 1


def test_a_run_whose_loss_ends_far_above_its_start_is_diverged():
    from gramopt.compare.run import blew_up

    start = {"train_loss": 1.0}
    assert blew_up([start, {"train_loss": 1.1e8}])[0]
    assert blew_up([start, {"train_loss": float("inf")}])[0]
    assert not blew_up([start, {"train_loss": 9.0}])[0]
    assert "10 x initial" in blew_up([start, {"train_loss": 11.0}])[1]


def test_validation_is_carved_from_the_training_data_fixed_per_seed():
    from gramopt.compare.run import load_splits

    task = get_task("digits")
    splits, again = load_splits(task, 2), load_splits(task, 2)
    whole = task.load(0)
    for seed in (0, 1):
        split = splits[seed]
        assert torch.equal(split.val_x, again[seed].val_x)  # fixed per seed
        assert split.val_x.shape[0] + split.train_x.shape[0] == whole.train_x.shape[0]
        assert torch.equal(split.test_x, task.load(seed).test_x)  # the test set is untouched
        rows = {tuple(r.tolist()) for r in split.train_x}
        assert not any(tuple(r.tolist()) in rows for r in split.val_x[:50])  # disjoint from training
    assert not torch.equal(splits[0].val_y, splits[1].val_y)


def test_piped_output_gets_plain_progress_lines(tmp_path, capsys):
    config = CompareConfig(optimizers=("sgd",), out=str(tmp_path), **{**TINY, "progress": True, "seeds": 1})
    run_comparison(config)
    out = capsys.readouterr().out
    assert "runs: 1 optimizers x 3 settings (quick grid)" in out and "[3/3 runs" in out


def test_every_registered_optimizer_has_its_own_colour_and_marker():
    """curves.png tells every optimizer apart: the style mapping covers the registry (the
    installed optimizers, and the peers whose package is missing) and no two share a
    colour or a marker."""
    from gramopt.training.peers import PEERS
    from gramopt.training.registry import MISSING_PEERS

    names = set(OPTIMIZERS) | set(MISSING_PEERS) | {spec.name for _, spec in PEERS}
    assert names <= set(STYLES), names - set(STYLES)
    looks = {name: style(name) for name in names}
    colours = [look["color"].lower() for look in looks.values()]
    markers = [look["marker"] for look in looks.values()]
    assert len(set(colours)) == len(names), sorted(looks.items(), key=lambda item: item[1]["color"])
    assert len(set(markers)) == len(names), sorted(looks.items(), key=lambda item: item[1]["marker"])


def test_curves_are_step_functions_that_stop_with_the_run():
    histories = [
        [{"seconds": 0.0, "y": 4.0}, {"seconds": 1.0, "y": 2.0}],
        [{"seconds": 0.0, "y": 3.0}, {"seconds": 2.0, "y": 1.0}],
    ]
    values = _on_grid(histories, "seconds", "y", torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]).numpy())
    assert values[0].tolist()[:3] == [4.0, 4.0, 2.0] and all(math.isnan(v) for v in values[0].tolist()[3:])
    assert values[1].tolist() == [3.0, 3.0, 3.0, 3.0, 1.0]


def test_trainer_evaluates_on_a_step_or_clock_schedule_and_stops_on_its_clock():
    base = dict(task="diabetes", optimizer="sgd", save=False)
    by_steps = Trainer(TrainConfig(epochs=2, eval_every_steps=2, **base), progress=False, verbose=False).run()
    assert [r["step"] for r in by_steps.epochs] == [0, 2, 4, 6, 8, 10, 12]  # 6 steps per epoch
    assert by_steps.epochs[-1]["epoch"] == 2
    timed = Trainer(
        TrainConfig(epochs=10**6, max_seconds=0.05, eval_every_seconds=0.01, **base), progress=False, verbose=False
    )
    result = timed.run()
    assert 0.05 <= timed.seconds and timed.seconds - result.step_seconds[-1] < 0.05  # stopped on the step that crossed
    # At most one evaluation per 0.01 s of the clock (a slow step may cross several marks),
    # each right after the step that crossed a mark, and one at the end.
    marks = [math.floor(r["seconds"] / 0.01) for r in result.epochs]
    assert marks == sorted(set(marks)) and result.epochs[0]["step"] == 0
    for record in result.epochs[1:-1]:
        before = record["seconds"] - result.step_seconds[record["step"] - 1]
        assert math.floor(before / 0.01) < math.floor(record["seconds"] / 0.01)
    assert result.epochs[-1]["step"] == timed.global_step
    # A capped evaluation set is a fixed random subset per seed.
    a, b = (Trainer(TrainConfig(eval_samples=50, **base), progress=False, verbose=False) for _ in range(2))
    assert a.eval_train[0].shape[0] == 50 and torch.equal(a.eval_train[0], b.eval_train[0])
    assert a.eval_test[0].shape[0] == 50 and not torch.equal(a.eval_train[0], a.split.train_x[:50])


def test_peak_memory_sees_an_allocation_of_known_size():
    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        return float(x[-1])

    assert AVAILABLE  # Linux: the project's machines
    assert 60 * 2**20 <= peak_memory(allocate) <= 80 * 2**20
    assert peak_memory(lambda: None) < 8 * 2**20


def test_fngd_in_a_comparison_shares_its_coefficients_after_one_epoch():
    """The grid leaves FNGD's coefficient_steps to the run, which sets it to one epoch
    (an explicit None from the registry defaults would mean: never share)."""
    import math

    from gramopt.compare.config import grid
    from gramopt.tasks import get_task
    from gramopt.training import TrainConfig, Trainer

    task = get_task("digits")
    for setting in grid("fngd", task):
        assert "coefficient_steps" not in setting
        trainer = Trainer(
            TrainConfig(task="digits", optimizer="fngd", hyper=setting, save=False, epochs=1),
            progress=False,
            verbose=False,
        )
        assert trainer.config.hyper["coefficient_steps"] == math.ceil(
            trainer.split.train_x.shape[0] / trainer.config.batch_size
        )


def _synthetic_task(times: dict[str, list[float | None]]) -> dict:
    """A results-task dict with one rung and per-seed seconds to it per optimizer."""
    from gramopt.compare.run import to_target_spread

    optimizers = {}
    for name, per_seed in times.items():
        runs = [{"seed": seed, "time_to_rungs": [t]} for seed, t in enumerate(per_seed)]
        summary = {"time_to_rungs": [to_target_spread(per_seed)]}
        optimizers[name] = {"settings": [{"runs": runs}], "winner": 0, "summary": summary}
    return {"seeds": [0, 1, 2], "rungs": [{"text": "test_accuracy >= 0.9"}], "optimizers": optimizers}


def test_the_report_names_the_first_per_rung_its_margin_and_gramopts_best():
    from gramopt.compare.report import leader_rows

    task = _synthetic_task(
        {"sgd": [2.0, 4.0, 3.0], "adamw": [1.0, 5.0, 1.5], "seng": [6.0, 3.5, None], "ggn": [None, None, None]}
    )
    (row,) = leader_rows(task)
    # medians: adamw 1.5, sgd 3.0, seng 6.0 (a missed seed counts as infinitely slow), ggn misses
    assert row == [
        "test_accuracy >= 0.9",
        "adamw (1.5 s)",
        "sgd (3 s, 2.00x)",
        "adamw 2/3, seng 1/3",
        "seng (6 s, 4.00x the first)",
    ]
    first_is_ours = _synthetic_task({"sgd": [2.0, 2.0, 2.0], "fngd": [1.0, 1.0, 3.0]})
    assert leader_rows(first_is_ours)[0][1:] == ["fngd (1 s)", "sgd (2 s, 2.00x)", "fngd 2/3, sgd 1/3", "fngd (first)"]
    nobody = _synthetic_task({"sgd": [None, None, 2.0], "ggn": [None, None, None]})
    assert leader_rows(nobody)[0] == ["test_accuracy >= 0.9", "nobody (median seed)", "-", "sgd 1/3", "-"]


def test_the_printed_first_per_rung_table_on_a_terminal():
    """A terminal gets the first-per-rung table too (rich), with the report's rows."""
    from rich.console import Console

    from gramopt.compare.report import leader_rows, rich_leaders

    task = _synthetic_task({"sgd": [2.0, 4.0, 3.0], "adamw": [1.0, 5.0, 1.5]})
    task["task"] = {"name": "synthetic"}
    console = Console(record=True, width=200, force_terminal=True)
    console.print(rich_leaders(task))
    text = console.export_text()
    assert "synthetic: first per rung" in text
    assert all(cell in text for cell in leader_rows(task)[0])


def test_the_printed_setting_column_shows_what_the_grid_varies_or_the_whole_setting_of_a_single_one():
    """The console names the winning values of the knobs the grid varies; under
    ``--grid base`` (one setting, nothing varies) it shows that setting whole, not an empty cell."""
    from gramopt.compare.report import _varied

    base = {"lr": 0.1, "momentum": 0.9}
    assert _varied({"settings": [{"hyper": base}], "winner": 0}) == "lr=0.1, momentum=0.9"
    grid = [{"hyper": {**base, "lr": lr}} for lr in (0.01, 0.1, 1.0)]
    assert _varied({"settings": grid, "winner": 1}) == "lr=0.1"


# -- step times far outside the optimizers' arithmetic ------------------------------------
FAST_BF16 = {"fast": True, "bfloat16_ms": 0.2, "float32_ms": 0.4, "decided_by": "measured",
             "text": "fast bfloat16 matmul"}
SLOW_BF16 = {"fast": False, "bfloat16_ms": 37.0, "float32_ms": 0.6, "decided_by": "measured",
             "text": "no fast bfloat16 matmul (256x256: 37 ms in bfloat16, 0.6 ms in float32)"}


def test_step_times_beyond_the_margin_over_the_expected_cost_are_flagged_with_their_likely_cause(monkeypatch):
    from gramopt.compare.flags import expected_step_cost, step_time_flags

    monkeypatch.setattr(compare_config, "STEP_COST_MARGIN", 3.0)
    expected = {"sgd": 1.0, "adamw": 1.5, "ggn": 10.0, "muon": 5.0, "muon-f32": 5.0}
    monkeypatch.setattr(compare_config, "EXPECTED_STEP_COST", expected)
    monkeypatch.setattr(compare_config, "DEFAULT_EXPECTED_STEP_COST", 10.0)
    assert expected_step_cost("ggn") == 10.0 and expected_step_cost("newly-registered") == 10.0
    ratios = {"sgd": 1.0, "adamw": 4.5, "ggn": 29.0, "muon": 141.0, "muon-f32": 3.1, "seng": None,
              "newly-registered": 31.0}
    flags = {f["optimizer"]: f for f in step_time_flags(ratios, SLOW_BF16)}
    # adamw at its limit (3 x 1.5) and ggn under its own (3 x 10) pass; nothing measured, nothing flagged
    assert set(flags) == {"muon", "newly-registered"}
    muon = flags["muon"]
    assert (muon["ratio"], muon["expected"], muon["limit"]) == (141.0, 5.0, 15.0)
    assert "bfloat16" in muon["cause"] and "37 ms in bfloat16" in muon["cause"] and "muon-f32" in muon["cause"]
    assert muon["text"].startswith("muon's step took 141x SGD-momentum's, over 15x") and "Likely cause" in muon["text"]
    assert flags["newly-registered"]["cause"] == "" and "No known cause" in flags["newly-registered"]["text"]
    # on a CPU with a fast bfloat16 matmul the same ratio is flagged, with no cause claimed
    (fast,) = [f for f in step_time_flags({"muon": 141.0}, FAST_BF16)]
    assert fast["cause"] == ""
    assert step_time_flags({"adamw": 4.51}, FAST_BF16)[0]["limit"] == 4.5


def _synthetic_step_times(slow: str, factor: float):
    """interleaved_times with made-up samples: every optimizer as fast as SGD but ``slow``."""

    def times(steps, rounds=20, steps_per_round=5, warmup=3, device=None):
        return {name: [(factor if name == slow else 1.0) * 1e-3] * rounds for name in steps}

    return times


def test_a_slow_optimizer_is_flagged_in_the_console_the_report_and_the_json(monkeypatch, tmp_path, capsys):
    import gramopt.compare.run as compare_run

    monkeypatch.setitem(OPTIMIZERS, "slow-sgd", OptimizerSpec("slow-sgd", "SGD, timed as slow", OPTIMIZERS["sgd"].build,
                                                              dict(OPTIMIZERS["sgd"].defaults)))
    monkeypatch.setitem(compare_config.EXPECTED_STEP_COST, "slow-sgd", 2.0)
    monkeypatch.setattr(compare_run, "interleaved_times", _synthetic_step_times("slow-sgd", 50.0))
    monkeypatch.setenv("GRAMOPT_FAST_BFLOAT16", "1")
    argv = ["compare", "--task", "diabetes", "--optimizers", "slow-sgd,sgd,adamw", "--seeds", "1", "--epochs", "1",
            "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    expected = "slow-sgd's step took 50x SGD-momentum's, over 6x (3 x the 2x its arithmetic predicts)"
    assert f"flagged (diabetes): {expected}" in out
    assert "adamw's step" not in out and "sgd's step took 1x" not in out
    report = (tmp_path / "report.md").read_text()
    assert "| slow-sgd (step time flagged) |" in report and "| adamw |" in report
    assert "Flagged step times:" in report and "- slow-sgd's step took 50x" in report
    assert "Step time flagged: the median step time over SGD-momentum's exceeds 3 times" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert [f["optimizer"] for f in results["tasks"]["diabetes"]["flags"]] == ["slow-sgd"]
    env = results["environment"]
    assert env["cpu_model"] and env["bfloat16_matmul"]["decided_by"] == "GRAMOPT_FAST_BFLOAT16=1"
    assert f"CPU {env['cpu_model']}" in report


def test_the_bfloat16_probe_measures_once_follows_its_rule_and_can_be_overridden(monkeypatch):
    from gramopt.compare import hardware

    monkeypatch.delenv(hardware.OVERRIDE_VARIABLE, raising=False)
    measured = hardware.bfloat16_matmul()
    assert measured.decided_by == "measured" and measured.bfloat16_ms > 0 and measured.float32_ms > 0
    assert measured.fast == (measured.bfloat16_ms <= hardware.SLOW_FACTOR * measured.float32_ms)
    assert hardware.bfloat16_matmul() == measured  # cached: measured once per process
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hardware._measured.__wrapped__()  # measured on one thread, the caller's count restored
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(hardware, "_measured", lambda: (37.0, 0.6))  # the AMD EPYC without AVX-512
    assert not hardware.bfloat16_matmul().fast and "37 ms in bfloat16" in hardware.bfloat16_matmul().describe()
    monkeypatch.setattr(hardware, "_measured", lambda: (0.2, 0.4))
    assert hardware.bfloat16_matmul().fast
    monkeypatch.setenv(hardware.OVERRIDE_VARIABLE, "0")
    assert hardware.bfloat16_matmul() == hardware.BFloat16Matmul(False, None, None, "GRAMOPT_FAST_BFLOAT16=0")
    monkeypatch.setenv(hardware.OVERRIDE_VARIABLE, "yes")
    assert hardware.bfloat16_matmul().fast
    monkeypatch.setenv(hardware.OVERRIDE_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="GRAMOPT_FAST_BFLOAT16='sometimes'"):
        hardware.bfloat16_matmul()
    assert isinstance(hardware.cpu_model(), str)
    assert set(hardware.cpu_bfloat16_flags()) <= set(hardware.BFLOAT16_CPU_FLAGS)


def test_the_default_comparison_adds_the_float32_muon_where_bfloat16_is_slow(monkeypatch):
    monkeypatch.setenv("GRAMOPT_FAST_BFLOAT16", "0")
    slow = default_optimizers()
    assert slow.index("muon-f32") == slow.index("muon") + 1  # beside torch's Muon, not instead of it
    monkeypatch.setenv("GRAMOPT_FAST_BFLOAT16", "1")
    assert "muon-f32" not in default_optimizers() and "muon" in default_optimizers()
