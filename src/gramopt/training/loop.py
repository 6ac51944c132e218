"""The training loop behind ``gramopt train`` and ``gramopt compare``: fixed data order
per (seed, epoch), evaluation at each epoch's end (and, if asked, every N steps or every
S seconds of optimizer time), ``metrics.json`` and an atomic ``checkpoint.pt`` from
which a run continues bit for bit (``--resume``).

The clock (``seconds``) counts training steps only: forward, backward pass(es) and the
update. Evaluation, checkpoints and the progress display are outside it.

Under torchrun (``training.parallel``) every rank runs this loop on its slice of each
global batch; rank 0 alone prints and writes.
"""

from __future__ import annotations

import json
import math
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from gramopt.distributed import world_size
from gramopt.tasks import Split, Task, get_task
from gramopt.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gramopt.training.parallel import DataParallelRun, check_distributed
from gramopt.training.registry import (
    DIVERGENCE_ERRORS,
    build_optimizer,
    check_applies,
    get_optimizer_spec,
    loss_value,
    task_hyper,
    training_step,
    with_epoch_defaults,
)
from gramopt.training.schedules import build_scheduler, check_schedule


@dataclass
class TrainConfig:
    """A run. ``None`` means the task's default (epochs, batch size, hyper-parameters)."""

    task: str = "teacher"
    optimizer: str = "ggn"
    epochs: int | None = None
    batch_size: int | None = None
    seed: int = 0
    hyper: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    checkpoint_every: int = 0  # steps between extra checkpoints (0: at the end of each epoch only)
    max_seconds: float | None = None  # also stop once the clock (training steps only) reaches this
    # Evaluation: at the end of each epoch, or, if either is set, every N steps / each time
    # the clock passes a multiple of S seconds (and at the end of the run).
    eval_every_steps: int = 0
    eval_every_seconds: float = 0.0
    eval_samples: int = 0  # evaluate on at most this many samples of each set (fixed per seed; 0: all)
    save: bool = True  # write metrics.json and checkpoint.pt to `out`
    # Under torchrun with several processes: "exact" (default) or "local", the policy of
    # gramopt's methods (gramopt.distributed); None in a single process.
    distributed: str | None = None
    schedule: str = "constant"  # learning-rate schedule over the run's steps (gramopt.training.schedules)

    def resolved(self, task: Task) -> TrainConfig:
        spec = get_optimizer_spec(self.optimizer)
        check_applies(self.optimizer, task)
        unknown = set(self.hyper) - set(spec.hyper_names)
        if unknown:
            raise ValueError(
                f"{self.optimizer} takes no hyper-parameter {sorted(unknown)}; it takes {sorted(spec.hyper_names)}"
            )
        hyper = {**task_hyper(task, self.optimizer), **self.hyper}
        epochs = task.epochs if self.epochs is None else self.epochs
        batch = task.batch_size if self.batch_size is None else self.batch_size
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if batch < 1:
            raise ValueError(f"batch size must be >= 1, got {batch}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.eval_every_steps < 0 or self.eval_every_seconds < 0 or self.eval_samples < 0:
            raise ValueError("eval_every_steps, eval_every_seconds and eval_samples must be >= 0")
        check_schedule(self.schedule)
        out = self.out or f"runs/{self.task}-{self.optimizer}-seed{self.seed}"
        check_distributed(self.distributed)
        distributed = None if world_size() == 1 else self.distributed or "exact"
        return replace(self, epochs=epochs, batch_size=batch, hyper=hyper, out=out, distributed=distributed)


@dataclass
class TrainResult:
    """``epochs``: the evaluation records (step, epoch, seconds, train_loss, test_loss,
    the task's metric); ``step_seconds``: the duration of every step this session ran."""

    config: TrainConfig
    epochs: list[dict[str, float]]
    diverged: bool
    model: nn.Module
    diverged_reason: str = ""
    step_seconds: list[float] = field(default_factory=list)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, x: Tensor, y: Tensor, batch: int = 1024, run: DataParallelRun | None = None
) -> tuple[float, float]:
    """(mean loss, metric) on (x, y): test MSE for regression, accuracy for classification.
    With a data-parallel ``run``, each rank evaluates its shard and the sums are added."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    rows = run.shard(x.shape[0]) if run is not None else None
    part_x, part_y = (x, y) if rows is None else (x[rows], y[rows])
    positions = 1 if y.dim() < 2 or task.loss == "mse" else y[0].numel()  # a language model: per position
    for i in range(0, part_x.shape[0], batch):
        out = model(part_x[i : i + batch])
        total += float(loss_value(task.loss, out, part_y[i : i + batch])) * out.shape[0]
        if task.loss == "cross_entropy":
            correct += int((out.argmax(1) == part_y[i : i + batch]).sum())  # classes: dim 1
    model.train(was_training)
    if run is not None:
        total, correct = run.sum([total, float(correct)])
    mean = total / x.shape[0]
    return mean, (mean if task.loss == "mse" else correct / (x.shape[0] * positions))


def eval_subset(x: Tensor, y: Tensor, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """At most ``samples`` rows of (x, y), the same for every run of ``seed`` (all if 0)."""
    if not samples or samples >= x.shape[0]:
        return x, y
    rows = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    return x[rows], y[rows]


def _load(task: Task, seed: int) -> Split:
    """``task.load(seed)``; a data set that is not installed is a ValueError saying how to
    install it (what the command line prints as an error, without a traceback)."""
    try:
        return task.load(seed)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err


def environment() -> dict[str, str]:
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "processes": str(world_size()),
    }


class Trainer:
    """One run of ``config`` (fresh, or continued from ``out/checkpoint.pt``).

    ``progress``: True for a progress bar of its own, False for none, or a rich
    ``Progress`` to add this run's bar to (removed when the run ends). ``verbose``:
    print a line per epoch. ``split``: the task's data for this seed, if already loaded
    (the comparison runs many settings on the same data). In a data-parallel run only
    rank 0 prints, shows progress and writes files.
    """

    def __init__(
        self,
        config: TrainConfig,
        console: Console | None = None,
        progress: bool | Progress = True,
        *,
        verbose: bool = True,
        split: Split | None = None,
    ) -> None:
        self.task = get_task(config.task)
        if self.task.kind != "supervised":
            raise ValueError(
                f"task {self.task.name!r} is {self.task.kind}; train it with gramopt.training.make_trainer"
            )
        self.config = config.resolved(self.task)
        self.run_part = DataParallelRun.current(self.config.distributed)
        self.main = self.run_part is None or self.run_part.main
        self.console = console or Console(quiet=not self.main)
        self.progress = progress if self.main else False
        self.verbose = verbose and self.main
        self.out = Path(self.config.out)
        self.split: Split = split if split is not None else _load(self.task, self.config.seed)
        if self.run_part is not None:
            self.run_part.check_batches(self.split.train_x.shape[0], self.config.batch_size)
        self.eval_train = eval_subset(
            self.split.train_x, self.split.train_y, self.config.eval_samples, self.config.seed
        )
        self.eval_test = eval_subset(self.split.test_x, self.split.test_y, self.config.eval_samples, self.config.seed)
        self.eval_val = (
            None if self.split.val_x is None or self.split.val_y is None
            else eval_subset(self.split.val_x, self.split.val_y, self.config.eval_samples, self.config.seed)
        )
        steps_per_epoch = math.ceil(self.split.train_x.shape[0] / self.config.batch_size)
        self.config.hyper = with_epoch_defaults(self.config.optimizer, self.config.hyper, steps_per_epoch)
        self.model = self.task.build_model(self.config.seed)
        self.optimizer = build_optimizer(
            self.config.optimizer, self.model, self.task.loss, dict(self.config.hyper), self.config.distributed
        )
        self.scheduler = build_scheduler(
            self.config.schedule, self.optimizer, self.config.epochs * steps_per_epoch, steps_per_epoch
        )
        # what the forward pass runs: DistributedDataParallel around the model for torch's optimizers
        self.forward_model = (
            self.model if self.run_part is None else self.run_part.model_for(self.model, self.optimizer)
        )
        self.epochs: list[dict[str, float]] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.seconds = 0.0
        self.diverged = False
        self.diverged_reason = ""
        self.step_seconds: list[float] = []

    # -- checkpoints --------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        if not self.config.save:
            return
        rank_states = None if self.run_part is None else self.run_part.rank_states(self.optimizer)
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            self.checkpoint_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "optimizer_ranks": rank_states,  # --distributed local: each rank's own state
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "config": asdict(self.config),
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
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
    ) -> Trainer:
        """Continue the run saved in ``out`` (optionally with a new total of epochs);
        ``payload``: its checkpoint, when the caller has read it already."""
        payload = load_checkpoint(Path(out) / "checkpoint.pt") if payload is None else payload
        trainer = cls(checkpoint_config(payload, out, epochs), console, progress)
        trainer.model.load_state_dict(payload["model"])
        ranks = payload.get("optimizer_ranks")
        if ranks is not None and trainer.run_part is not None:
            if len(ranks) != trainer.run_part.world_size or trainer.run_part.policy != "local":
                raise CheckpointError(
                    f"{out}/checkpoint.pt holds the optimizer states of {len(ranks)} processes (--distributed local): "
                    f"resume it with {len(ranks)} processes"
                )
            trainer.optimizer.load_state_dict(ranks[trainer.run_part.rank])
        elif ranks is not None:
            raise CheckpointError(
                f"{out}/checkpoint.pt holds the optimizer states of {len(ranks)} processes (--distributed local): "
                f"resume it under torchrun with {len(ranks)} processes"
            )
        else:
            trainer.optimizer.load_state_dict(payload["optimizer"])
        trainer.epoch = payload["epoch"]
        trainer.step_in_epoch = payload["step_in_epoch"]
        restore_progress(trainer, payload, out)
        return trainer

    def write_metrics(self) -> None:
        if not self.config.save or not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "config": asdict(self.config),
            "task": {"name": self.task.name, "loss": self.task.loss, "metric": self.task.metric},
            "epochs": self.epochs,
            "diverged": self.diverged,
            "environment": environment(),
        }
        tmp = self.out / "metrics.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.out / "metrics.json")

    # -- the loop -----------------------------------------------------------------------
    def finished(self) -> bool:
        cfg = self.config
        out_of_time = cfg.max_seconds is not None and self.seconds >= cfg.max_seconds
        return self.diverged or self.epoch >= cfg.epochs or out_of_time

    def _progress(self) -> tuple[Progress, bool]:
        """The progress display to use, and whether this run owns it."""
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

    def run(self) -> TrainResult:
        cfg = self.config
        n = self.split.train_x.shape[0]
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        if self.verbose:
            self.console.print(
                f"[bold]gramopt train[/]: task={cfg.task} optimizer={cfg.optimizer} {cfg.hyper} "
                f"epochs={cfg.epochs} batch={cfg.batch_size} seed={cfg.seed} -> {self.out}"
            )
        progress, owned = self._progress()
        # The bar counts steps, or seconds of the clock when the run has a time budget.
        timed = cfg.max_seconds is not None
        total = cfg.max_seconds if timed else cfg.epochs * steps_per_epoch
        self.model.train()
        with progress if owned else nullcontext():
            description = f"{cfg.optimizer} seed {cfg.seed}" if not owned else "training"
            bar = progress.add_task(description, total=total, completed=self._done(timed), status="")
            if self._scheduled() and not self.epochs:
                self._evaluate()  # the starting point of the curves
            shown = 0.0
            while not self.finished():
                order = epoch_order(n, cfg.seed, self.epoch)
                while self.step_in_epoch < steps_per_epoch and not self.finished():
                    idx = order[self.step_in_epoch * cfg.batch_size : (self.step_in_epoch + 1) * cfg.batch_size]
                    loss = self._step(idx)
                    if time.perf_counter() - shown > 0.1:  # the display costs more than a small step
                        shown = time.perf_counter()
                        progress.update(
                            bar, completed=self._done(timed), status=f"epoch {self.epoch + 1} loss {loss:.4g}"
                        )
                    if self.diverged:
                        break
                    if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                        self.save()
                    if self._evaluation_due():
                        self._evaluate()
                if self.step_in_epoch == steps_per_epoch and not self.diverged:
                    self._end_epoch()
            if not self.diverged and (not self.epochs or self.epochs[-1]["step"] != self.global_step):
                self._evaluate()  # the time budget ran out inside an epoch
            progress.update(bar, completed=self._done(timed))
            if not owned:
                progress.remove_task(bar)
        self.write_metrics()
        self.save()
        return TrainResult(
            cfg,
            self.epochs,
            self.diverged,
            self.model,
            self.diverged_reason,
            self.step_seconds,
        )

    def step_on(self, idx: Tensor) -> Tensor:
        """Forward, backward pass(es) and update on the training rows ``idx`` (this rank's
        slice of them in a data-parallel run); the (local) mean loss."""
        x, y = self.split.train_x, self.split.train_y
        if self.run_part is None:
            return training_step(self.optimizer, self.model, self.task.loss, x[idx], y[idx])
        return self.run_part.step(self.optimizer, self.forward_model, self.task.loss, x, y, idx)

    def _done(self, timed: bool) -> float:
        return min(self.seconds, self.config.max_seconds) if timed else self.global_step

    def _step(self, idx: Tensor) -> float:
        """One timed training step on the batch ``idx`` (in a data-parallel run: this rank's
        slice of it; the time and loss are then agreed by all ranks); a non-finite loss or
        a divergence error ends the run."""
        start = time.perf_counter()
        try:
            loss = float(self.step_on(idx))
            if self.scheduler is not None:
                self.scheduler.step()
        except DIVERGENCE_ERRORS as err:
            loss, self.diverged_reason = math.nan, f"{type(err).__name__} at step {self.global_step}: {err}"
        elapsed = time.perf_counter() - start
        if self.run_part is not None:
            elapsed, loss = self.run_part.agree(elapsed, loss, len(self.run_part.rows(idx)))
        self.seconds += elapsed
        self.step_seconds.append(elapsed)
        self.step_in_epoch += 1
        self.global_step += 1
        if not math.isfinite(loss):
            self.diverged = True
            self.diverged_reason = self.diverged_reason or f"loss {loss} at step {self.global_step - 1}"
            if self.verbose:
                self.console.print(f"[red]diverged[/]: {self.diverged_reason}")
        return loss

    def _scheduled(self) -> bool:
        return bool(self.config.eval_every_steps or self.config.eval_every_seconds)

    def _evaluation_due(self) -> bool:
        cfg = self.config
        if cfg.eval_every_steps and self.global_step % cfg.eval_every_steps == 0:
            return True
        if cfg.eval_every_seconds:
            last = self.epochs[-1]["seconds"] if self.epochs else 0.0
            return math.floor(self.seconds / cfg.eval_every_seconds) > math.floor(last / cfg.eval_every_seconds)
        return False

    def _evaluate(self) -> dict[str, float]:
        """Append an evaluation record (train loss and the test metric at this step)."""
        train_loss, _ = evaluate(self.model, self.task, *self.eval_train, run=self.run_part)
        test_loss, metric = evaluate(self.model, self.task, *self.eval_test, run=self.run_part)
        steps_per_epoch = math.ceil(self.split.train_x.shape[0] / self.config.batch_size)
        record = {
            "epoch": self.epoch + self.step_in_epoch / steps_per_epoch,
            "step": self.global_step,
            "train_loss": train_loss,
            "test_loss": test_loss,
            self.task.metric: metric,
            "seconds": self.seconds,
        }
        if self.eval_val is not None:  # the validation set carved from the training data (gramopt compare)
            val_loss, val_metric = evaluate(self.model, self.task, *self.eval_val, run=self.run_part)
            record["val_loss"] = val_loss
            record[self.task.metric.replace("test_", "val_", 1)] = val_metric
        self.epochs.append(record)
        if not math.isfinite(train_loss):
            self.diverged = True
            self.diverged_reason = f"train loss {train_loss} at step {self.global_step}"
        return record

    def _end_epoch(self) -> None:
        """Evaluate (unless the run has a schedule of its own), write metrics, checkpoint."""
        self.epoch += 1
        self.step_in_epoch = 0
        if not self._scheduled():
            self._evaluate_epoch()
        self.write_metrics()
        self.save()

    def _evaluate_epoch(self) -> None:
        record = self._evaluate()
        record["epoch"] = self.epoch
        if self.verbose:
            metric = record[self.task.metric]
            metric_text = f"{metric:.4g}" if self.task.loss == "mse" else f"{100 * metric:.2f}%"
            self.console.print(
                f"epoch {self.epoch:3d}  train loss {record['train_loss']:.4g}  {self.task.metric} {metric_text}  "
                f"{self.seconds:.2f}s"
            )


def train(config: TrainConfig, console: Console | None = None, progress: bool = True) -> TrainResult:
    """Train ``config`` from scratch (a residual task with ``training.residual``'s trainer)."""
    if get_task(config.task).kind == "residual":
        from gramopt.training.residual import ResidualTrainer

        return ResidualTrainer(config, console, progress).run()
    return Trainer(config, console, progress).run()


def checkpoint_config(payload: dict[str, Any], out: str | Path, epochs: int | None) -> TrainConfig:
    """The run's config from its checkpoint, writing to ``out``, optionally with a new
    total of epochs (steps, for a residual task)."""
    try:
        config = TrainConfig(**payload["config"])
    except TypeError as err:
        raise CheckpointError(f"{out}/checkpoint.pt has an unreadable config: {err}") from err
    config.out = str(out)
    if epochs is not None:
        config.epochs = epochs
    return config


def restore_progress(trainer: Any, payload: dict[str, Any], out: str | Path) -> None:
    """What every trainer saves besides its model, optimizer and data position: the
    schedule, the step count and clock, the per-epoch records, divergence, the RNGs."""
    if trainer.scheduler is not None:
        if payload.get("scheduler") is None:
            raise CheckpointError(f"{out}/checkpoint.pt has no state of its {trainer.config.schedule} schedule")
        trainer.scheduler.load_state_dict(payload["scheduler"])
    trainer.global_step = payload["global_step"]
    trainer.seconds = payload["seconds"]
    trainer.epochs = list(payload["epochs"])
    trainer.diverged = payload["diverged"]
    trainer.diverged_reason = payload.get("diverged_reason", "")
    set_rng_state(payload["rng"])

