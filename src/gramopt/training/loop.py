"""The training loop behind ``gramopt train``: fixed data order per (seed, epoch),
per-epoch evaluation, ``metrics.json`` and an atomic ``checkpoint.pt`` from which a
run continues bit for bit (``--resume``)."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from gramopt.losses import get_loss
from gramopt.tasks import Split, Task, get_task
from gramopt.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gramopt.training.optimizers import build_optimizer, get_optimizer_spec, training_step, with_epoch_defaults


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

    def resolved(self, task: Task) -> "TrainConfig":
        spec = get_optimizer_spec(self.optimizer)
        unknown = set(self.hyper) - set(spec.hyper_names)
        if unknown:
            raise ValueError(
                f"{self.optimizer} takes no hyper-parameter {sorted(unknown)}; it takes {sorted(spec.hyper_names)}"
            )
        hyper = {**task.hyper.get(self.optimizer, {}), **self.hyper}
        epochs = task.epochs if self.epochs is None else self.epochs
        batch = task.batch_size if self.batch_size is None else self.batch_size
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if batch < 1:
            raise ValueError(f"batch size must be >= 1, got {batch}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        out = self.out or f"runs/{self.task}-{self.optimizer}-seed{self.seed}"
        return TrainConfig(self.task, self.optimizer, epochs, batch, self.seed, hyper, out, self.checkpoint_every)


@dataclass
class TrainResult:
    config: TrainConfig
    epochs: list[dict[str, float]]
    diverged: bool
    model: nn.Module


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, x: Tensor, y: Tensor, batch: int = 1024) -> tuple[float, float]:
    """(mean loss, metric) on (x, y): test MSE for regression, accuracy for classification."""
    was_training = model.training
    model.eval()
    loss_fn = get_loss(task.loss)
    total, correct = 0.0, 0
    for i in range(0, x.shape[0], batch):
        out = model(x[i : i + batch])
        total += float(loss_fn.value(out, y[i : i + batch])) * out.shape[0]
        if task.loss == "cross_entropy":
            correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    mean = total / x.shape[0]
    return mean, (mean if task.loss == "mse" else correct / x.shape[0])


def environment() -> dict[str, str]:
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


class Trainer:
    """One run of ``config`` (fresh, or continued from ``out/checkpoint.pt``)."""

    def __init__(self, config: TrainConfig, console: Console | None = None, progress: bool = True) -> None:
        self.task = get_task(config.task)
        self.config = config.resolved(self.task)
        self.console = console or Console()
        self.show_progress = progress
        self.out = Path(self.config.out)
        self.split: Split = self.task.load(self.config.seed)
        steps_per_epoch = math.ceil(self.split.train_x.shape[0] / self.config.batch_size)
        self.config.hyper = with_epoch_defaults(self.config.optimizer, self.config.hyper, steps_per_epoch)
        self.model = self.task.build_model(self.config.seed)
        self.optimizer = build_optimizer(self.config.optimizer, self.model, self.task.loss, dict(self.config.hyper))
        self.epochs: list[dict[str, float]] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.seconds = 0.0
        self.diverged = False

    # -- checkpoints --------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            self.checkpoint_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "config": asdict(self.config),
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
                "seconds": self.seconds,
                "epochs": self.epochs,
                "diverged": self.diverged,
                "rng": rng_state(),
            },
        )

    @classmethod
    def resume(cls, out: str | Path, console: Console | None = None, progress: bool = True, epochs: int | None = None) -> "Trainer":
        """Continue the run saved in ``out`` (optionally with a new total of epochs)."""
        payload = load_checkpoint(Path(out) / "checkpoint.pt")
        try:
            config = TrainConfig(**payload["config"])
        except TypeError as err:
            raise CheckpointError(f"{out}/checkpoint.pt has an unreadable config: {err}") from err
        config.out = str(out)
        if epochs is not None:
            config.epochs = epochs
        trainer = cls(config, console, progress)
        trainer.model.load_state_dict(payload["model"])
        trainer.optimizer.load_state_dict(payload["optimizer"])
        trainer.epoch = payload["epoch"]
        trainer.step_in_epoch = payload["step_in_epoch"]
        trainer.global_step = payload["global_step"]
        trainer.seconds = payload["seconds"]
        trainer.epochs = list(payload["epochs"])
        trainer.diverged = payload["diverged"]
        set_rng_state(payload["rng"])
        return trainer

    def write_metrics(self) -> None:
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
    def run(self) -> TrainResult:
        cfg = self.config
        n = self.split.train_x.shape[0]
        steps_per_epoch = math.ceil(n / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        self.console.print(
            f"[bold]gramopt train[/]: task={cfg.task} optimizer={cfg.optimizer} {cfg.hyper} "
            f"epochs={cfg.epochs} batch={cfg.batch_size} seed={cfg.seed} -> {self.out}"
        )
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not self.show_progress,
            transient=True,
        )
        self.model.train()
        with progress:
            bar = progress.add_task("training", total=total, completed=min(self.global_step, total), status="")
            while self.epoch < cfg.epochs and not self.diverged:
                order = epoch_order(n, cfg.seed, self.epoch)
                while self.step_in_epoch < steps_per_epoch:
                    idx = order[self.step_in_epoch * cfg.batch_size : (self.step_in_epoch + 1) * cfg.batch_size]
                    x, y = self.split.train_x[idx], self.split.train_y[idx]
                    start = time.perf_counter()
                    try:
                        loss = float(training_step(self.optimizer, self.model, self.task.loss, x, y))
                    except ArithmeticError as err:  # NonFiniteError, SingularSystemError
                        self.console.print(f"[red]diverged[/] at step {self.global_step}: {err}")
                        loss = math.nan
                    self.seconds += time.perf_counter() - start
                    self.step_in_epoch += 1
                    self.global_step += 1
                    progress.update(bar, advance=1, status=f"epoch {self.epoch + 1} loss {loss:.4g}")
                    if not math.isfinite(loss):
                        self.diverged = True
                        break
                    if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                        self.save()
                if self.diverged:
                    break
                self._end_epoch()
        self.write_metrics()
        self.save()
        return TrainResult(cfg, self.epochs, self.diverged, self.model)

    def _end_epoch(self) -> None:
        train_loss, _ = evaluate(self.model, self.task, self.split.train_x, self.split.train_y)
        test_loss, metric = evaluate(self.model, self.task, self.split.test_x, self.split.test_y)
        self.epoch += 1
        self.step_in_epoch = 0
        record = {
            "epoch": self.epoch,
            "step": self.global_step,
            "train_loss": train_loss,
            "test_loss": test_loss,
            self.task.metric: metric,
            "seconds": self.seconds,
        }
        self.epochs.append(record)
        metric_text = f"{metric:.4g}" if self.task.loss == "mse" else f"{100 * metric:.2f}%"
        self.console.print(
            f"epoch {self.epoch:3d}  train loss {train_loss:.4g}  {self.task.metric} {metric_text}  "
            f"{self.seconds:.2f}s"
        )
        if not math.isfinite(train_loss):
            self.diverged = True
        self.write_metrics()
        self.save()


def train(config: TrainConfig, console: Console | None = None, progress: bool = True) -> TrainResult:
    """Train ``config`` from scratch."""
    return Trainer(config, console, progress).run()
