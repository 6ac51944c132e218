"""``gramopt compare``: optimizers head to head on the embedded tasks, fairly timed.

For each task, each optimizer trains every setting of its grid (``config.grid``, the
same size for all) for every seed, under the same budget: seconds of the optimizer
clock (training steps only; evaluation is outside it) or epochs. Runs go in the order
seed, setting, optimizer, so that load changes on a shared machine fall on all
optimizers alike. Each run is evaluated at evenly spaced points of its budget (every
budget/``EVALUATIONS`` seconds of the clock, or every total/``EVALUATIONS`` steps), so a
fast method's time-to-target is as finely resolved as a slow one's.

Then, for each optimizer's winning setting (``config`` module docstring):

- step time: a fresh model and optimizer per method, their steps timed in turns
  (round robin) in this process, reported as the ratio to SGD-momentum in the same
  rounds (``gramopt.compare.timing``), per seed;
- peak memory: ``MEMORY_STEPS`` steps of a fresh model and optimizer, measured with the
  kernel's peak resident-set counter (``gramopt.compare.memory``), per seed;
- flags: every step time far outside what the optimizer's arithmetic predicts, with
  its likely cause where known (``gramopt.compare.flags``); the results record the
  CPU's model and whether its bfloat16 matmul is fast (``gramopt.compare.hardware``).

A diverged setting (NaN, or a divergence error) is reported as such and the comparison
goes on; so is a setting that fails for another reason (with the error).

Residual tasks (``Task.kind == "residual"``, e.g. the PINN problems) run the same way with
the optimizers that train them (``OptimizerSpec.kinds``; by default all of them) through
``training.residual``: their data is the seed's points (``tasks.residual.ResidualData``, with
its own validation points), an epoch is one full-batch step, the step-time reference is
Adam (:data:`REFERENCES`), timed over fewer, longer steps (``config.RESIDUAL_TIMING``), and
step times are not flagged (the expected costs are those of supervised steps).

Under torchrun (``--distributed``), every rank runs every run on its slice of each batch
(``training.parallel``), the step timings and memory are rank 0's, and rank 0 writes.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from gramopt.compare import config as compare_config
from gramopt.compare.config import DIVERGENCE_FACTOR, GRID_SIZES, Target, grid
from gramopt.compare.flags import step_time_flags
from gramopt.compare.hardware import bfloat16_matmul, cpu_bfloat16_flags, cpu_model
from gramopt.compare.memory import peak_memories
from gramopt.compare.plots import plot_curves
from gramopt.compare.report import markdown, reason_line
from gramopt.compare.timing import interleaved_times
from gramopt.distributed import CollectiveError, rank, world_size
from gramopt.tasks import TASKS, Split, Task, get_task, with_validation
from gramopt.tasks.residual import ResidualData
from gramopt.training import OPTIMIZERS, TrainConfig, make_trainer
from gramopt.training.loop import environment, epoch_order
from gramopt.training.parallel import DataParallelRun, check_distributed
from gramopt.training.registry import (
    DIVERGENCE_ERRORS,
    build_optimizer,
    get_optimizer_spec,
    optimizers_for,
    residual_step,
    task_hyper,
    training_step,
    with_epoch_defaults,
)

REFERENCE = "sgd"  # step times are reported as ratios to this optimizer's (task default setting)
#: The step-time reference per task kind.
REFERENCES = {"supervised": REFERENCE, "residual": "adam"}
UNBOUNDED_EPOCHS = 10**9  # a time-budgeted run stops on its clock, not on epochs


@dataclass
class CompareConfig:
    """A comparison. ``optimizers=None``: :func:`default_optimizers` of each task's kind;
    ``("all",)``: every optimizer of each task's kind; ``budget_seconds`` and ``epochs``
    both None: each task's ``Task.budget_seconds``. After :meth:`validated`, ``optimizers``
    lists every optimizer of the comparison; each task runs those of its kind
    (:func:`task_optimizers`)."""

    tasks: tuple[str, ...] = (compare_config.DEFAULT_TASK,)
    optimizers: tuple[str, ...] | None = None
    seeds: int = compare_config.DEFAULT_SEEDS
    budget_seconds: float | None = None
    epochs: int | None = None
    out: str = "runs/compare"
    threads: int | None = 1
    progress: bool = True
    distributed: str | None = None  # under torchrun: "exact" (default) or "local"
    grid: str = compare_config.DEFAULT_COMMAND_GRID  # "quick" (3 settings) or "full" (3 x 3)

    def validated(self) -> CompareConfig:
        """Check every name and number before anything runs (ValueError naming the problem)."""
        tasks = tuple(TASKS) if self.tasks == ("all",) else tuple(self.tasks)
        for name in tasks:
            get_task(name)
        if not tasks:
            raise ValueError(f"no task given; choose from {', '.join(sorted(TASKS))} or all")
        kinds = tuple(dict.fromkeys(get_task(name).kind for name in tasks))
        if self.optimizers is None:
            optimizers = tuple(dict.fromkeys(name for kind in kinds for name in default_optimizers(kind)))
        elif tuple(self.optimizers) == ("all",):
            optimizers = tuple(dict.fromkeys(name for kind in kinds for name in optimizers_for(kind)))
        else:
            optimizers = tuple(dict.fromkeys(self.optimizers))
        for name in optimizers:
            spec = get_optimizer_spec(name)
            if not set(spec.kinds) & set(kinds):
                raise ValueError(
                    f"optimizer {name!r} trains {' and '.join(spec.kinds)} tasks, and task(s) {', '.join(tasks)} "
                    f"are {' and '.join(kinds)}; the optimizers for "
                    + "; for ".join(f"{kind} tasks: {', '.join(optimizers_for(kind))}" for kind in kinds)
                )
        if not optimizers:
            raise ValueError(f"no optimizer given; choose from {', '.join(sorted(OPTIMIZERS))} or all")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.budget_seconds is not None and self.epochs is not None:
            raise ValueError("give one budget: --budget-seconds or --epochs, not both")
        if self.budget_seconds is not None and not (self.budget_seconds > 0 and math.isfinite(self.budget_seconds)):
            raise ValueError(f"budget seconds must be > 0, got {self.budget_seconds}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.grid not in GRID_SIZES:
            raise ValueError(f"unknown grid {self.grid!r}; choose one of {', '.join(GRID_SIZES)}")
        check_distributed(self.distributed)
        distributed = None if world_size() == 1 else self.distributed or "exact"
        for name in tasks:
            for optimizer in task_optimizers(optimizers, get_task(name)):
                grid(optimizer, get_task(name), self.grid)
        return CompareConfig(
            tasks,
            optimizers,
            self.seeds,
            self.budget_seconds,
            self.epochs,
            self.out,
            self.threads,
            self.progress,
            distributed,
            self.grid,
        )


def task_optimizers(optimizers: tuple[str, ...], task: Task) -> tuple[str, ...]:
    """Those of ``optimizers`` that train ``task``'s kind."""
    return tuple(name for name in optimizers if task.kind in get_optimizer_spec(name).kinds)


def default_optimizers(kind: str = "supervised") -> tuple[str, ...]:
    """Supervised tasks: every gramopt method, torch's SGD-momentum and AdamW, and the
    installed default peers; on a CPU without a fast bfloat16 matmul
    (``hardware.bfloat16_matmul``) also ``muon-f32`` beside torch's ``muon``, whose
    orthogonalization runs in bfloat16. Other kinds: every optimizer of the kind."""
    if kind != "supervised":
        return optimizers_for(kind)
    gramopt_methods = [
        name for name, spec in OPTIMIZERS.items() if spec.source == "gramopt" and "supervised" in spec.kinds
    ]
    peers = [name for name in compare_config.DEFAULT_PEERS if name in OPTIMIZERS]
    if "muon" in peers and "muon-f32" in OPTIMIZERS and not bfloat16_matmul().fast:
        peers.insert(peers.index("muon") + 1, "muon-f32")
    return tuple(gramopt_methods + ["sgd", "adamw"] + peers)


@dataclass(frozen=True)
class Budget:
    """Per run: ``seconds`` of the optimizer clock, or ``epochs``."""

    seconds: float | None
    epochs: int | None

    def describe(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:g} s of optimizer time per run (training steps only)"
        return f"{self.epochs} epochs per run"


def task_budget(config: CompareConfig, task: Task) -> Budget:
    if config.epochs is not None:
        return Budget(None, config.epochs)
    seconds = config.budget_seconds or task.budget_seconds
    if seconds is None:
        raise ValueError(f"task {task.name!r} has no budget_seconds; give --budget-seconds or --epochs")
    return Budget(seconds, None)


# -- one run ------------------------------------------------------------------------------
def time_to_target(history: list[dict[str, float]], target: Target | None) -> tuple[float | None, float | None]:
    """(seconds, epochs) at the first evaluation that meets ``target``, or (None, None)."""
    if target is not None:
        for record in history:
            if target.reached(record):
                return record["seconds"], record["epoch"]
    return None, None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def steps_per_epoch(task: Task, split: Split | ResidualData) -> int:
    """Optimizer steps in one epoch: the training set in batches, or one (a residual task's full batch)."""
    if task.kind == "residual":
        return 1
    return math.ceil(split.train_x.shape[0] / task.batch_size)  # type: ignore[union-attr]


def run_one(
    task: Task,
    optimizer: str,
    hyper: dict[str, Any],
    split: Split | ResidualData,
    seed: int,
    budget: Budget,
    console: Console,
    progress: Progress,
    distributed: str | None = None,
) -> dict[str, Any]:
    """Train one setting for one seed on ``split`` (the task's data for ``seed``); a
    record of what happened (never raises for a diverging or failing optimizer; a
    failed collective of a data-parallel run ends the comparison)."""
    epoch_steps = steps_per_epoch(task, split)
    config = TrainConfig(
        task.name,
        optimizer,
        epochs=budget.epochs or UNBOUNDED_EPOCHS,
        seed=seed,
        hyper=dict(hyper),
        max_seconds=budget.seconds,
        eval_every_seconds=budget.seconds / compare_config.EVALUATIONS if budget.seconds else 0.0,
        eval_every_steps=max(1, budget.epochs * epoch_steps // compare_config.EVALUATIONS) if budget.epochs else 0,
        eval_samples=task.eval_samples or 0,
        save=False,
        distributed=distributed,
    )
    record: dict[str, Any] = {"seed": seed, "status": "ok", "reason": "", "history": [], "steps": 0}
    try:
        trainer = make_trainer(config, console, progress, verbose=False, data=split)
        result = trainer.run()
    except CollectiveError:
        raise
    except Exception as err:  # noqa: BLE001 - a peer may fail in its own way; the comparison goes on
        record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        return record
    history = result.epochs
    diverged, reason = result.diverged, result.diverged_reason
    if not diverged:
        diverged, reason = blew_up(history)
    rungs = task.ladder
    # A run that diverges counts as not having reached any rung, even if it passed it first.
    reached = [(None, None) if diverged else time_to_target(history, rung) for rung in rungs]
    reached_val = [None if diverged else time_to_target(history, rung.on_validation())[0] for rung in rungs]
    last = history[-1] if history else {}
    record.update(
        status="diverged" if diverged else "ok",
        reason=reason,
        history=history,
        steps=trainer.global_step,
        seconds=trainer.seconds,
        time_to_target=reached[0][0] if reached else None,
        epochs_to_target=reached[0][1] if reached else None,
        time_to_rungs=[r[0] for r in reached],
        epochs_to_rungs=[r[1] for r in reached],
        val_time_to_rungs=reached_val,
        final_train_loss=None if diverged else _finite(last.get("train_loss")),
        final_val_loss=None if diverged else _finite(last.get("val_loss")),
        final_selection_loss=None if diverged or not rungs else _finite(last.get(rungs[0].selection_loss)),
        final_metric=None if diverged else _finite(last.get(task.metric)),
        median_step_seconds=statistics.median(result.step_seconds) if result.step_seconds else None,
        load_average=_load_average(),
    )
    return record


def _load_average() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes (None where the system has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def blew_up(history: list[dict[str, float]]) -> tuple[bool, str]:
    """(True, why) if the last train loss is non-finite or above ``DIVERGENCE_FACTOR``
    times the first (the rule of the ``config`` module docstring)."""
    if not history:
        return False, ""
    first, last = history[0].get("train_loss"), history[-1].get("train_loss")
    if last is None or first is None:
        return False, ""
    if not math.isfinite(last):
        return True, f"final train loss {last}"
    if last > DIVERGENCE_FACTOR * first:
        return True, f"final train loss {last:.3g} > {DIVERGENCE_FACTOR:g} x initial {first:.3g}"
    return False, ""


# -- selection ----------------------------------------------------------------------------
def _median(values: list[float | None]) -> float:
    """Median with None (missed, diverged) counted as +inf."""
    return statistics.median([math.inf if v is None else v for v in values])


def setting_score(runs: list[dict[str, Any]]) -> tuple[float, ...]:
    """Smaller wins: the median (over seeds) time to each selection rung, tightest rung
    first, then the median final selection loss (validation loss; train loss for a
    train-loss ladder; the ``config`` module docstring)."""
    rungs = max((len(r.get("val_time_to_rungs", [])) for r in runs), default=0)
    times = [_median([(r.get("val_time_to_rungs") or [None] * rungs)[k] for r in runs]) for k in reversed(range(rungs))]
    return (*times, _median([r.get("final_selection_loss", r.get("final_val_loss")) for r in runs]))


def select(settings: list[dict[str, Any]]) -> int:
    """Index of the winning setting (the smallest score; the first on exact ties)."""
    scores = [setting_score(s["runs"]) for s in settings]
    return min(range(len(settings)), key=lambda i: scores[i])


def spread(values: list[float | None]) -> dict[str, Any]:
    """Median, min and max of the known values, and how many there are out of all."""
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None, "n": 0, "of": len(values)}
    return {
        "median": statistics.median(known),
        "min": min(known),
        "max": max(known),
        "n": len(known),
        "of": len(values),
    }


def to_target_spread(values: list[float | None]) -> dict[str, Any]:
    """:func:`spread`, plus the median counting a missed seed as infinitely slow
    (``None`` when that median is a miss)."""
    return {**spread(values), "median_with_misses": _finite(_median(values))}


# -- measurements of the winners ----------------------------------------------------------
def _stepper(
    task: Task, name: str, hyper: dict[str, Any], split: Split, seed: int, distributed: str | None = None
) -> tuple[Callable[[], None], list[str]]:
    """A step function of a fresh model and optimizer cycling through the epoch-0 batches
    (a residual task: its training points, drawn anew per step where it resamples); the
    list collects a divergence error's message if one happens."""
    if task.kind == "residual":
        return _residual_stepper(task, name, hyper, split, seed)  # type: ignore[arg-type]
    run = DataParallelRun.current(distributed)
    if run is not None:
        run.check_batches(split.train_x.shape[0], task.batch_size)
    model = task.build_model(seed)
    optimizer = build_optimizer(name, model, task.loss, dict(hyper), None if run is None else run.policy)
    forward = model if run is None else run.model_for(model, optimizer)
    order = epoch_order(split.train_x.shape[0], seed, 0)
    batches = [order[i : i + task.batch_size] for i in range(0, len(order), task.batch_size)]
    errors: list[str] = []
    position = [0]

    def step() -> None:
        idx = batches[position[0] % len(batches)]
        position[0] += 1
        try:
            if run is None:
                training_step(optimizer, model, task.loss, split.train_x[idx], split.train_y[idx])
            else:
                run.step(optimizer, forward, task.loss, split.train_x, split.train_y, idx)
        except DIVERGENCE_ERRORS as err:
            errors.append(f"{type(err).__name__}: {err}")

    return step, errors


def _residual_stepper(
    task: Task, name: str, hyper: dict[str, Any], data: ResidualData, seed: int
) -> tuple[Callable[[], None], list[str]]:
    model = task.build_model(seed)
    optimizer = build_optimizer(name, model, task.loss, dict(hyper))
    stream = data.stream()
    errors: list[str] = []

    def step() -> None:
        points = stream.next()
        try:
            residual_step(optimizer, lambda: data.problem.residuals(model, points))
        except DIVERGENCE_ERRORS as err:
            errors.append(f"{type(err).__name__}: {err}")

    return step, errors


def _try_stepper(
    task: Task, name: str, hyper: dict[str, Any], split: Split, seed: int, distributed: str | None = None
) -> tuple[Callable[[], None], list[str]] | None:
    try:
        return _stepper(task, name, hyper, split, seed, distributed)
    except CollectiveError:
        raise
    except Exception:  # noqa: BLE001 - reported as failed by its runs already
        return None


def step_time_ratios(
    task: Task, winners: dict[str, dict[str, Any]], split: Split, seed: int, distributed: str | None = None
) -> dict[str, float | None]:
    """Per method, median over rounds of (its seconds per step / the reference's in the same
    round: SGD's, or Adam's on a residual task, :data:`REFERENCES`); None for a method that
    cannot be built or diverges while timed."""
    reference = REFERENCES[task.kind]
    built = {name: _try_stepper(task, name, hyper, split, seed, distributed) for name, hyper in winners.items()}
    steppers = {name: stepper for name, stepper in built.items() if stepper is not None}
    if reference not in steppers:
        middle = grid(reference, task)[GRID_SIZES["quick"] // 2]
        steppers[reference] = _stepper(task, reference, middle, split, seed, distributed)
    rounds, steps, warmup = compare_config.TIMING_BY_KIND[task.kind]
    samples = interleaved_times(
        {name: step for name, (step, _) in steppers.items()}, rounds=rounds, steps_per_round=steps, warmup=warmup
    )
    ratios: dict[str, float | None] = {}
    for name in winners:
        if name not in steppers or steppers[name][1]:
            ratios[name] = None  # cannot be built, or diverged while being timed
        else:
            ratios[name] = statistics.median(t / b for t, b in zip(samples[name], samples[reference], strict=True))
    return ratios


def peak_step_memory(
    task: Task, name: str, hyper: dict[str, Any], split: Split, seed: int, distributed: str | None = None
) -> dict[str, int | None] | None:
    """Peak memory of ``MEMORY_STEPS`` steps of a fresh model and optimizer, resident and
    CUDA-allocated (:func:`~gramopt.compare.memory.peak_memories`; None if it cannot be
    built or diverges)."""
    stepper = _try_stepper(task, name, hyper, split, seed, distributed)
    if stepper is None:
        return None
    step, errors = stepper
    peaks = peak_memories(lambda: [step() for _ in range(compare_config.MEMORY_STEPS_BY_KIND[task.kind])])
    return None if errors else peaks


# -- a task -------------------------------------------------------------------------------
def load_splits(task: Task, seeds: int) -> dict[int, Split | ResidualData]:
    """The task's data for each seed, loaded once for all runs, with its validation set
    carved from the training data (``with_validation``; a missing data set is a
    ValueError saying how to install it, raised before anything runs). A residual task's
    points come with validation points of their own."""
    try:
        if task.kind == "residual":
            return {seed: task.load(seed) for seed in range(seeds)}
        return {seed: with_validation(task.load(seed), seed) for seed in range(seeds)}
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err


def supports(task: Task, name: str, split: Split) -> str | None:
    """None if optimizer ``name`` can take a step on ``task`` (two training samples, a
    fresh model), else why not: the ValueError or NotImplementedError it raises (e.g. a
    peer that refuses the model's layers, or an output shape a method does not take).
    Other errors are left to the runs, which report them as failed. On a residual task the
    optimizer is only built (a step of a parameter-space method costs seconds)."""
    model = task.build_model(0)
    if task.kind == "residual":
        try:
            build_optimizer(name, model, task.loss, task_hyper(task, name))
        except (ValueError, NotImplementedError) as err:
            return f"{type(err).__name__}: {err}"
        except Exception:  # noqa: BLE001 - reported by the runs
            return None
        return None
    try:
        optimizer = build_optimizer(name, model, task.loss, with_epoch_defaults(name, task_hyper(task, name), 1))
        training_step(optimizer, model, task.loss, split.train_x[:2], split.train_y[:2])
    except (ValueError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001 - reported by the runs
        return None
    return None


class PlainProgress:
    """Progress lines for a reader without a terminal (output piped to a log): one line
    at most every ``every`` seconds, after a run ends, with runs done, elapsed time and
    what just finished."""

    def __init__(self, console: Console, total: int, enabled: bool, every: float = 10.0) -> None:
        self.console, self.total, self.enabled, self.every = console, total, enabled, every
        self.done, self.started, self.last = 0, time.perf_counter(), -math.inf

    def ran(self, text: str) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            self.console.print(f"[{self.done}/{self.total} runs, {now - self.started:.0f} s] {text}", highlight=False,
                               markup=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[{self.done}/{self.total} runs, {time.perf_counter() - self.started:.0f} s] {text}",
                               highlight=False, markup=False, soft_wrap=True)


def _run_text(record: dict[str, Any]) -> str:
    if record["status"] == "failed":
        return f"failed ({record['reason'][:80]})"
    loss = record.get("final_train_loss")
    text = record["status"] + ("" if loss is None else f", final train loss {loss:.3g}")
    return text + (f" ({record['reason'][:80]})" if record["status"] == "diverged" else "")


def compare_task(
    config: CompareConfig, task: Task, splits: dict[int, Split], console: Console, progress: Progress, overall: Any,
    plain: PlainProgress | None = None, bfloat16: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every run of ``task``, the winners' step times and memory, and the step times
    flagged as far outside their arithmetic (``compare.flags``; ``bfloat16``: the
    machine's ``hardware.BFloat16Matmul.as_dict()``, measured if None)."""
    budget = task_budget(config, task)
    seeds = sorted(splits)
    size = GRID_SIZES[config.grid]
    methods: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in config.optimizers:
        if name not in task_optimizers(config.optimizers, task):
            kinds = " and ".join(get_optimizer_spec(name).kinds)
            skipped[name] = f"it trains {kinds} tasks; {task.name} is a {task.kind} task"
            continue
        reason = supports(task, name, splits[seeds[0]])
        if reason is not None:
            skipped[name] = reason
            progress.update(overall, total=progress.tasks[0].total - size * len(seeds)) if progress.tasks else None
            if plain is not None:
                plain.total -= size * len(seeds)
                plain.note(f"{task.name}: skipping {name}, which cannot train this task: {reason_line(reason, 160)}")
            continue
        spec = get_optimizer_spec(name)
        methods[name] = {
            "description": spec.description,
            "source": spec.source,
            "knobs": [axis.key for axis in compare_config.axes(name, config.grid)],
            "settings": [{"hyper": hyper, "runs": []} for hyper in grid(name, task, config.grid)],
        }
    for seed in seeds:
        for k in range(size):
            for name, method in methods.items():
                setting = method["settings"][k]
                status = f"{task.name}: {name} setting {k + 1}/{size} seed {seed}"
                progress.update(overall, status=status)
                record = run_one(
                    task, name, setting["hyper"], splits[seed], seed, budget, console, progress, config.distributed
                )
                setting["runs"].append(record)
                progress.advance(overall)
                if plain is not None:
                    plain.ran(f"{status}: {_run_text(record)}")
    for method in methods.values():
        method["winner"] = select(method["settings"])
        for setting in method["settings"]:
            score = setting_score(setting["runs"])
            runs = setting["runs"]
            setting["score"] = {
                "median_val_time_to_rungs": [_finite(v) for v in reversed(score[:-1])],
                "median_final_val_loss": _finite(score[-1]),
                "median_time_to_target": _finite(_median([r.get("time_to_target") for r in runs])),
                "median_final_train_loss": _finite(_median([r.get("final_train_loss") for r in runs])),
            }

    winners = {name: m["settings"][m["winner"]]["hyper"] for name, m in methods.items()}
    progress.update(overall, status=f"{task.name}: interleaved step timing and peak memory of the winners")
    if plain is not None:
        plain.note(f"{task.name}: interleaved step timing and peak memory of the winners")
    ratios = [step_time_ratios(task, winners, splits[seed], seed, config.distributed) for seed in seeds]
    rungs = task.ladder
    for name, method in methods.items():
        runs = method["settings"][method["winner"]]["runs"]
        memory = [peak_step_memory(task, name, winners[name], splits[seed], seed, config.distributed) for seed in seeds]
        method["summary"] = {
            "time_to_target": to_target_spread([r.get("time_to_target") for r in runs]),
            "epochs_to_target": to_target_spread([r.get("epochs_to_target") for r in runs]),
            "time_to_rungs": [
                to_target_spread([(r.get("time_to_rungs") or [None] * len(rungs))[k] for r in runs])
                for k in range(len(rungs))
            ],
            "final_train_loss": spread([r.get("final_train_loss") for r in runs]),
            "final_val_loss": spread([r.get("final_val_loss") for r in runs]),
            "final_metric": spread([r.get("final_metric") for r in runs]),
            "step_time_ratio": spread([r[name] for r in ratios]),
            "median_step_seconds": spread([r.get("median_step_seconds") for r in runs]),
            "peak_memory_bytes": spread([None if m is None else m["resident"] for m in memory]),
            "peak_cuda_memory_bytes": spread([None if m is None else m["cuda_allocated"] for m in memory]),
            "diverged": sum(r["status"] == "diverged" for r in runs),
            "failed": sum(r["status"] == "failed" for r in runs),
        }
    target = rungs[0] if rungs else None
    # The expected step costs are those of supervised steps: residual tasks are not flagged.
    flags = [] if task.kind != "supervised" else step_time_flags(
        {name: method["summary"]["step_time_ratio"]["median"] for name, method in methods.items()},
        bfloat16 if bfloat16 is not None else bfloat16_matmul().as_dict(),
    )
    first = next(iter(splits.values()))
    if isinstance(first, ResidualData):
        sizes = {"train_samples": first.points_per_step, "val_samples": first.validation_x.shape[0],
                 "points": first.describe()}
    else:
        sizes = {"train_samples": int(first.train_x.shape[0]), "val_samples": int(first.val_x.shape[0])}  # type: ignore[union-attr]
    return {
        "task": {"name": task.name, "description": task.description, "kind": task.kind, "loss": task.loss,
                 "metric": task.metric, "batch_size": task.batch_size, "eval_samples": task.eval_samples or 0, **sizes},
        "timing_reference": REFERENCES[task.kind],
        "target": None if target is None else {**asdict(target), "text": target.describe()},
        "rungs": [{**asdict(rung), "text": rung.describe()} for rung in rungs],
        "budget": {"seconds": budget.seconds, "epochs": budget.epochs, "text": budget.describe()},
        "seeds": seeds,
        "optimizers": methods,
        "skipped": skipped,
        "flags": flags,
    }


# -- everything ---------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    versions = {}
    for package in ("gramopt", "torch", "numpy", "pytorch_optimizer", "singd", "heavyball", "rich", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def run_comparison(config: CompareConfig, console: Console | None = None) -> dict[str, Any]:
    """Run ``config`` (validated first) and return the results (what results.json holds)."""
    config = config.validated()
    console = console or Console()
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    bfloat16 = bfloat16_matmul().as_dict()
    started, started_at = (
        time.perf_counter(),
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not config.progress or rank() != 0 or not console.is_terminal,
            transient=True,
        )
        data = {name: load_splits(get_task(name), config.seeds) for name in config.tasks}
        load_at_start = _load_average()
        per_task = [len(task_optimizers(config.optimizers, get_task(name))) for name in config.tasks]
        total = sum(per_task) * GRID_SIZES[config.grid] * config.seeds
        plain = PlainProgress(console, total, config.progress and rank() == 0 and not console.is_terminal)
        plain.note(f"{total} runs: {len(config.optimizers)} optimizers x {GRID_SIZES[config.grid]} settings "
                   f"({config.grid} grid) x {config.seeds} seeds x {len(config.tasks)} task(s)")
        tasks = {}
        with progress:
            overall = progress.add_task("runs", total=total, status="")
            for name in config.tasks:
                tasks[name] = compare_task(
                    config, get_task(name), data.pop(name), console, progress, overall, plain, bfloat16
                )
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "config": asdict(config),
        "grid": config.grid,
        "grid_size": GRID_SIZES[config.grid],
        "divergence_rule": f"non-finite loss, a divergence error, or final train loss > {DIVERGENCE_FACTOR:g} x the "
        "initial",
        "evaluations_per_run": compare_config.EVALUATIONS,
        "timing": {"reference": REFERENCE, "rounds": compare_config.TIMING_ROUNDS,
                   "steps_per_round": compare_config.TIMING_STEPS,
                   "by_kind": {kind: {"reference": REFERENCES[kind], "rounds": rounds, "steps_per_round": steps,
                                      "warmup": warmup, "memory_steps": compare_config.MEMORY_STEPS_BY_KIND[kind]}
                               for kind, (rounds, steps, warmup) in compare_config.TIMING_BY_KIND.items()}},
        "step_time_flags": {"expected_step_cost": dict(compare_config.EXPECTED_STEP_COST),
                            "default_expected_step_cost": compare_config.DEFAULT_EXPECTED_STEP_COST,
                            "margin": compare_config.STEP_COST_MARGIN},
        "memory_steps": compare_config.MEMORY_STEPS,
        "selection": "test-accuracy ladders: on the validation set carved from the training data, smallest median "
        "(over seeds) validation time to the highest rung (missed or diverged = infinite), ties by the next rung "
        "down, then by the smallest median final validation loss; train-loss ladders (optimization speed): the "
        "same on the train loss itself, ties by the smallest median final train loss; never on test figures",
        "tasks": tasks,
        "wall_seconds": time.perf_counter() - started,
        "started_at": started_at,
        "environment": {
            **environment(),
            "threads": str(torch.get_num_threads() if config.threads is None else config.threads),
            "platform": platform.platform(),
            "cpu_model": cpu_model(),
            "cpu_bfloat16_flags": cpu_bfloat16_flags(),
            "bfloat16_matmul": bfloat16,
            "cpu_count": str(os.cpu_count()),
            "load_average": {"start": load_at_start, "end": _load_average()},
            "versions": _versions(),
        },
    }


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged run's losses) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write report.md, curves.png and results.json to ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md", "curves": out / "curves.png"}
    results = _json_safe(results)
    paths["results"].write_text(json.dumps(results, indent=1, allow_nan=False))
    paths["report"].write_text(markdown(results))
    plot_curves(results, paths["curves"])
    return paths
