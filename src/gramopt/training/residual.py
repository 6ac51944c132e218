"""The training loop of residual tasks (``Task.kind == "residual"``, :mod:`gramopt.tasks.residual`),
behind ``gramopt train`` and ``gramopt compare`` as :class:`~gramopt.training.loop.Trainer`
is for supervised ones.

Each step takes the step's training points (the task's fixed set, or a new draw where the
problem resamples) and hands the closure of their residual groups to the optimizer, full
batch (``registry.residual_step``): ``L(theta) = 1/2 sum_g ||r_g(theta)||^2``. An epoch is one
step. Evaluation records hold the step, ``train_loss`` (L on the seed's first training
points), ``val_loss`` and ``val_rel_l2`` (the validation points), the task's metric
``test_rel_l2`` (the relative L2 error on the fixed evaluation set) and the clock.

The clock (``seconds``) counts training steps only: drawing the step's points, the
optimizer's step (every evaluation of the residuals it makes, its line search included)
and the schedule. Evaluation, checkpoints and the display are outside it, as in the
supervised loop.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gramopt.tasks import TASKS, Split, get_task
from gramopt.tasks.residual import ResidualData
from gramopt.training.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint
from gramopt.training.loop import TrainConfig, Trainer, TrainResult, checkpoint_config, environment, restore_progress
from gramopt.training.registry import DIVERGENCE_ERRORS, build_optimizer, residual_step
from gramopt.training.schedules import build_scheduler

#: ``gramopt train`` on a residual task without an evaluation schedule evaluates about this
#: many times (and at the start and the end).
TRAIN_EVALUATIONS = 20


class ResidualTrainer:
    """One run of ``config`` on a residual task (fresh, or continued with :meth:`resume`).

    ``progress``: True for a progress bar of its own, False for none, or a rich ``Progress``
    to add this run's bar to. ``verbose``: print a line per evaluation. ``data``: the task's
    points for this seed, if already drawn (the comparison runs many settings on them).
    """

    def __init__(
        self,
        config: TrainConfig,
        console: Console | None = None,
        progress: bool | Progress = True,
        *,
        verbose: bool = True,
        data: ResidualData | None = None,
    ) -> None:
        self.task = get_task(config.task)
        if self.task.kind != "residual":
            raise ValueError(f"task {self.task.name!r} is {self.task.kind}; ResidualTrainer trains residual tasks")
        self.config = config.resolved(self.task)
        if self.config.distributed is not None:
            raise ValueError("residual tasks train in a single process: run gramopt without torchrun")
        self.console = console or Console()
        self.progress = progress
        self.verbose = verbose
        self.out = Path(self.config.out)  # type: ignore[arg-type]
        self.data: ResidualData = data if data is not None else self.task.load(self.config.seed)  # type: ignore[assignment]
        self.problem = self.data.problem
        self.stream = self.data.stream()
        self.model = self.task.build_model(self.config.seed)
        self.optimizer = build_optimizer(self.config.optimizer, self.model, self.task.loss, dict(self.config.hyper))
        self.scheduler = build_scheduler(self.config.schedule, self.optimizer, self.config.epochs, 1)  # type: ignore[arg-type]
        self.epochs: list[dict[str, float]] = []
        self.global_step = 0
        self.seconds = 0.0
        self.diverged = False
        self.diverged_reason = ""
        self.step_seconds: list[float] = []

    @property
    def epoch(self) -> int:
        """Epochs done: one per step."""
        return self.global_step

    # -- the loop -----------------------------------------------------------------------
    def finished(self) -> bool:
        cfg = self.config
        out_of_time = cfg.max_seconds is not None and self.seconds >= cfg.max_seconds
        return self.diverged or self.global_step >= cfg.epochs or out_of_time  # type: ignore[operator]

    def run(self) -> TrainResult:
        cfg = self.config
        if self.verbose:
            self.console.print(
                f"[bold]gramopt train[/]: task={cfg.task} (residual) optimizer={cfg.optimizer} {cfg.hyper} "
                f"steps={cfg.epochs} seed={cfg.seed} -> {self.out}"
            )
        progress, owned = self._progress()
        timed = cfg.max_seconds is not None
        with progress if owned else nullcontext():
            description = f"{cfg.optimizer} seed {cfg.seed}" if not owned else "training"
            total = cfg.max_seconds if timed else cfg.epochs
            bar = progress.add_task(description, total=total, completed=self._done(timed), status="")
            if not self.epochs:
                self._evaluate()  # the starting point of the curves
            shown = 0.0
            while not self.finished():
                loss = self._step()
                if time.perf_counter() - shown > 0.1:
                    shown = time.perf_counter()
                    progress.update(bar, completed=self._done(timed), status=f"step {self.global_step} loss {loss:.4g}")
                if self.diverged:
                    break
                if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                    self.save()
                if self._evaluation_due():
                    self._evaluate()
            if not self.diverged and self.epochs[-1]["step"] != self.global_step:
                self._evaluate()
            progress.update(bar, completed=self._done(timed))
            if not owned:
                progress.remove_task(bar)
        self.write_metrics()
        self.save()
        return TrainResult(cfg, self.epochs, self.diverged, self.model, self.diverged_reason, self.step_seconds)

    def _step(self) -> float:
        """One timed step on the next training points; a non-finite loss or a divergence
        error ends the run."""
        start = time.perf_counter()
        try:
            points = self.stream.next()
            loss = float(residual_step(self.optimizer, lambda: self.problem.residuals(self.model, points)))
            if self.scheduler is not None:
                self.scheduler.step()
        except DIVERGENCE_ERRORS as err:
            loss, self.diverged_reason = math.nan, f"{type(err).__name__} at step {self.global_step}: {err}"
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.step_seconds.append(elapsed)
        self.global_step += 1
        if not math.isfinite(loss):
            self.diverged = True
            self.diverged_reason = self.diverged_reason or f"loss {loss} at step {self.global_step - 1}"
            if self.verbose:
                self.console.print(f"[red]diverged[/]: {self.diverged_reason}")
        return loss

    def _evaluation_due(self) -> bool:
        cfg = self.config
        if cfg.eval_every_steps or cfg.eval_every_seconds:
            if cfg.eval_every_steps and self.global_step % cfg.eval_every_steps == 0:
                return True
            if cfg.eval_every_seconds:
                last = self.epochs[-1]["seconds"] if self.epochs else 0.0
                return math.floor(self.seconds / cfg.eval_every_seconds) > math.floor(last / cfg.eval_every_seconds)
            return False
        return self.global_step % max(1, cfg.epochs // TRAIN_EVALUATIONS) == 0  # type: ignore[operator]

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Append an evaluation record (module doc)."""
        data, problem = self.data, self.problem
        record = {
            "epoch": float(self.global_step),
            "step": self.global_step,
            "train_loss": float(problem.loss(self.model, data.train)),
            "val_loss": float(problem.loss(self.model, data.validation)),
            "val_rel_l2": problem.relative_l2_error(self.model, data.validation_x),
            self.task.metric: problem.relative_l2_error(self.model, data.test_x),
            "seconds": self.seconds,
        }
        self.epochs.append(record)
        if not math.isfinite(record["train_loss"]):
            self.diverged = True
            self.diverged_reason = f"train loss {record['train_loss']} at step {self.global_step}"
        if self.verbose:
            self.console.print(
                f"step {self.global_step:5d}  train loss {record['train_loss']:.4g}  "
                f"{self.task.metric} {record[self.task.metric]:.4g}  {self.seconds:.2f}s"
            )
        return record

    def _done(self, timed: bool) -> float:
        return min(self.seconds, self.config.max_seconds) if timed else self.global_step  # type: ignore[type-var]

    def _progress(self) -> tuple[Progress, bool]:
        if isinstance(self.progress, Progress):
            return self.progress, False
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        return Progress(*columns, console=self.console, disable=not self.progress, transient=True), True

    # -- files --------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def write_metrics(self) -> None:
        if not self.config.save:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "config": asdict(self.config),
            "task": {"name": self.task.name, "kind": self.task.kind, "loss": self.task.loss,
                     "metric": self.task.metric},
            "epochs": self.epochs,
            "diverged": self.diverged,
            "environment": environment(),
        }
        tmp = self.out / "metrics.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.out / "metrics.json")

    def save(self) -> None:
        if not self.config.save:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            self.checkpoint_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "points": self.stream.state_dict(),
                "config": asdict(self.config),
                "epoch": self.global_step,
                "step_in_epoch": 0,
                "global_step": self.global_step,
                "seconds": self.seconds,
                "epochs": self.epochs,
                "diverged": self.diverged,
                "diverged_reason": self.diverged_reason,
                "rng": rng_state(),
            },
        )

    @classmethod
    def resume(
        cls,
        out: str | Path,
        console: Console | None = None,
        progress: bool = True,
        epochs: int | None = None,
        payload: dict[str, Any] | None = None,
    ) -> ResidualTrainer:
        """Continue the run saved in ``out`` (optionally up to a new total of steps);
        ``payload``: its checkpoint, when the caller has read it already."""
        payload = load_checkpoint(Path(out) / "checkpoint.pt") if payload is None else payload
        config = checkpoint_config(payload, out, epochs)
        if "points" not in payload:
            raise CheckpointError(f"{out}/checkpoint.pt holds no state of its training points")
        trainer = cls(config, console, progress)
        trainer.model.load_state_dict(payload["model"])
        trainer.optimizer.load_state_dict(payload["optimizer"])
        trainer.stream.load_state_dict(payload["points"])
        restore_progress(trainer, payload, out)
        return trainer


def make_trainer(
    config: TrainConfig,
    console: Console | None = None,
    progress: bool | Progress = True,
    *,
    verbose: bool = True,
    data: Split | ResidualData | None = None,
) -> Trainer | ResidualTrainer:
    """The trainer of ``config``'s task kind: :class:`Trainer` (supervised, ``data`` a
    Split) or :class:`ResidualTrainer` (residual, ``data`` its ResidualData)."""
    if get_task(config.task).kind == "residual":
        return ResidualTrainer(config, console, progress, verbose=verbose, data=data)  # type: ignore[arg-type]
    return Trainer(config, console, progress, verbose=verbose, split=data)  # type: ignore[arg-type]


def resume_trainer(out: str | Path, console: Console | None = None, progress: bool = True,
                   epochs: int | None = None) -> Trainer | ResidualTrainer:
    """Continue the run saved in ``out`` with the trainer of its task's kind."""
    payload: dict[str, Any] = load_checkpoint(Path(out) / "checkpoint.pt")
    task = (payload.get("config") or {}).get("task")
    if isinstance(task, str) and task in TASKS and TASKS[task].kind == "residual":
        return ResidualTrainer.resume(out, console, progress, epochs, payload)
    return Trainer.resume(out, console, progress, epochs, payload)
