"""Command line: ``gramopt tasks``, ``gramopt train``, ``gramopt compare``.

Parsing only: each command builds a config and calls the library. Under torchrun
(``WORLD_SIZE`` > 1) the process joins the process group first and only rank 0 prints
(``training.parallel``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gramopt.compare import config as compare_config
from gramopt.compare.report import flag_lines, markdown_table, plain_leaders, plain_table, rich_leaders, rich_table
from gramopt.compare.run import CompareConfig, run_comparison, write_outputs
from gramopt.distributed import POLICIES, rank
from gramopt.errors import GramoptError
from gramopt.tasks import TASKS, get_task
from gramopt.training import OPTIMIZERS, TrainConfig, make_trainer, resume_trainer
from gramopt.training.parallel import DEFAULT_TIMEOUT_SECONDS, init_from_environment
from gramopt.training.schedules import SCHEDULES

HYPER_FLAGS = ("lr", "damping", "momentum", "weight_decay")
#: ``gramopt train``'s optimizer without --optimizer, per task kind.
DEFAULT_OPTIMIZERS = {"supervised": "ggn", "residual": "gauss-newton"}
INT_HYPER_FLAGS = ("curvature_every",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gramopt", description="Sample-space second-order optimizers for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("tasks", help="list the embedded tasks")

    train = commands.add_parser("train", help="train one optimizer on one task")
    train.add_argument("--task", help="a task from `gramopt tasks` (default: teacher)")
    train.add_argument(
        "--optimizer",
        help=f"one of {', '.join(sorted(OPTIMIZERS))} (default: ggn; gauss-newton on residual tasks)",
    )
    train.add_argument("--epochs", type=int, help="number of epochs (default: the task's; residual tasks: steps)")
    train.add_argument("--batch-size", type=int, help="mini-batch size (default: the task's)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, the initialization and the data order")
    for name in HYPER_FLAGS:
        train.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"{name} (default: the task's setting)")
    for name in INT_HYPER_FLAGS:
        train.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{name} (default: the task's setting)")
    train.add_argument(
        "--coefficient-steps",
        type=_coefficient_steps,
        help="fngd: estimation steps before its coefficients are shared (default: one epoch, "
        "ceil(n_train / batch size), as in the paper; 'none': estimate on every step)",
    )
    train.add_argument("--out", help="output folder (default: runs/TASK-OPTIMIZER-seedSEED)")
    train.add_argument(
        "--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (default: each epoch)"
    )
    train.add_argument(
        "--schedule", choices=SCHEDULES, default="constant",
        help="learning-rate schedule over the run's steps (default: %(default)s; see gramopt.training.schedules)",
    )
    train.add_argument(
        "--resume", metavar="DIR",
        help="continue the run saved in DIR up to its epochs, or up to a new total given with --epochs",
    )
    train.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _distributed_flags(train)

    compare = commands.add_parser(
        "compare",
        help="optimizers head to head: same budget, same grid size, several seeds; report.md, curves.png, results.json",
    )
    compare.add_argument(
        "--task", default=compare_config.DEFAULT_TASK,
        help=f"task(s) from `gramopt tasks`, comma-separated, or all (default: {compare_config.DEFAULT_TASK})",
    )
    compare.add_argument(
        "--optimizers", type=_names,
        help="comma-separated optimizer names, or all (default: on supervised tasks the gramopt methods, sgd, "
        f"adamw, {', '.join(compare_config.DEFAULT_PEERS)}; on residual tasks every optimizer for them)",
    )
    compare.add_argument(
        "--seeds", type=int, default=compare_config.DEFAULT_SEEDS,
        help="seeds 0..N-1 per setting (default: %(default)s)",
    )
    budget = compare.add_mutually_exclusive_group()
    budget.add_argument("--budget-seconds", type=float, help="optimizer-clock seconds per run (default: the task's)")
    budget.add_argument("--epochs", type=int, help="epochs per run, instead of a time budget")
    compare.add_argument("--out", default="runs/compare", help="output folder (default: %(default)s)")
    compare.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: %(default)s, steadier timings)"
    )
    compare.add_argument(
        "--grid", choices=compare_config.GRIDS_BY_NAME, default=compare_config.DEFAULT_COMMAND_GRID,
        help="tuning grid per optimizer: quick (3 settings over one knob: damping for ggn, learning rate for the "
        "others), full (3 x 3: learning rate x damping for second-order methods, x weight decay for AdamW, "
        "x momentum for SGD and Muon) or base (the task's setting alone, untuned) (default: %(default)s)",
    )
    compare.add_argument("--no-progress", action="store_true", help="no progress display or progress lines")
    _distributed_flags(compare)
    return parser


def _distributed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed", choices=POLICIES,
        help="under torchrun with several processes: gramopt's methods take the step of the whole batch "
        "('exact', the default) or average the processes' own steps ('local'); torch's optimizers use DDP",
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
        help="under torchrun: how long a process waits for the others before failing (default: %(default)s)",
    )


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())
def _coefficient_steps(text: str) -> int | str:
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'none', got {text!r}") from None


def _tasks(console: Console) -> int:
    headers = ["task", "kind", "loss", "metric", "epochs", "batch", "description"]
    body = [[t.name, t.kind, t.loss, t.metric, str(t.epochs), str(t.batch_size), t.description] for t in TASKS.values()]
    if console.is_terminal:  # names whole, the descriptions folded to the terminal's width
        table = Table(title="gramopt tasks")
        for i, header in enumerate(headers):
            names = i < 4
            table.add_column(header, overflow="fold", no_wrap=names,
                             min_width=max(len(row[i]) for row in body) if names else None)
        for row in body:
            table.add_row(*row)
        console.print(table)
    else:  # piped: the whole table as Markdown, one line per task, as compare prints its tables
        console.print("\n".join(["gramopt tasks", "", *markdown_table(headers, body)]), highlight=False, markup=False,
                      soft_wrap=True)
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    hyper = {name: getattr(args, name) for name in HYPER_FLAGS + INT_HYPER_FLAGS if getattr(args, name) is not None}
    if args.coefficient_steps is not None:
        hyper["coefficient_steps"] = None if args.coefficient_steps == "none" else args.coefficient_steps
    if args.resume:
        given = [
            flag
            for flag, value in (
                ("--task", args.task is not None),
                ("--optimizer", args.optimizer is not None),
                ("--batch-size", args.batch_size is not None),
                ("--seed", args.seed != 0),
                ("--out", args.out is not None),
                ("--schedule", args.schedule != "constant"),
                ("hyper-parameters", bool(hyper)),
                ("--distributed", args.distributed is not None),
            )
            if value
        ]
        if given:
            raise ValueError(f"--resume continues a saved run with its own settings; drop {', '.join(given)}")
        trainer = resume_trainer(args.resume, console, not args.no_progress, epochs=args.epochs)
        done, total = trainer.epoch, trainer.config.epochs
        if trainer.diverged:
            raise ValueError(
                f"the run in {args.resume} diverged ({trainer.diverged_reason}); there is nothing to continue"
            )
        if done >= total:
            raise ValueError(
                f"the run in {args.resume} has already trained its {total} epoch(s); nothing to do. "
                f"Give --epochs N with N > {done} to train it further"
            )
    else:
        config = TrainConfig(
            args.task or "teacher",
            args.optimizer or DEFAULT_OPTIMIZERS[get_task(args.task or "teacher").kind],
            args.epochs,
            args.batch_size,
            args.seed,
            hyper,
            args.out,
            args.checkpoint_every,
            distributed=args.distributed,
            schedule=args.schedule,
        )
        trainer = make_trainer(config, console, not args.no_progress)
    result = trainer.run()
    if result.diverged:
        console.print("[red]the run diverged[/]")
        return 1
    console.print(f"wrote {trainer.out / 'metrics.json'} and {trainer.out / 'checkpoint.pt'}")
    return 0


def _compare(args: argparse.Namespace, console: Console) -> int:
    config = CompareConfig(
        _names(args.task), args.optimizers, args.seeds, args.budget_seconds, args.epochs, args.out, args.threads,
        not args.no_progress, args.distributed, args.grid,
    )
    results = run_comparison(config, console)
    if rank() != 0:
        return 0
    paths = write_outputs(results, Path(args.out))
    for task in results["tasks"].values():
        if console.is_terminal:
            for table in (rich_table(task), rich_leaders(task)):  # (cells fold, never cut)
                console.print(table)
        else:  # piped to a log: the whole tables as Markdown, never cut to the terminal's width
            for text in (plain_table(task), plain_leaders(task)):
                console.print(text, highlight=False, markup=False, soft_wrap=True)
        for text in flag_lines(task):
            console.print(f"[yellow]flagged ({task['task']['name']}):[/] {escape(text)}", highlight=False,
                          soft_wrap=True)
    console.print(f"{results['wall_seconds']:.0f} s; wrote {', '.join(str(p) for p in paths.values())}", soft_wrap=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    joined = args.command != "tasks" and init_from_environment(args.dist_timeout)
    console = Console(quiet=rank() != 0)
    try:
        if args.command == "tasks":
            return _tasks(console)
        if args.command == "compare":
            code = _compare(args, console)
        else:
            code = _train(args, console)
    except (GramoptError, ValueError) as err:
        where = console if rank() == 0 else Console(stderr=True)  # every rank tells its own error
        where.print(f"[red]error{f' (rank {rank()})' if rank() else ''}:[/] {escape(str(err))}")
        return 2  # (a failed process group is left to the exit: destroying it could wait on the others)
    if joined:
        import torch.distributed

        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
