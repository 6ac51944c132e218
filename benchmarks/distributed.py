"""Data-parallel GGN, SENG and FNGD against DDP + SGD: communication per step, step
time, and the scaling from 1 to 2 processes.

Model and data: the ``teacher`` task's MLP (16-256-256-1, 70k parameters, float32) on
global batches of 128 of its training data, split 64 + 64 over 2 gloo processes on this
machine (1 torch thread each). Variants, each on its own fresh model:

- ``ddp-sgd``: ``DistributedDataParallel`` + ``torch.optim.SGD(momentum=0.9)``, the
  reference; its traffic is counted by a DDP communication hook (the gradient buckets
  it all-reduces);
- ``ggn``, ``seng`` (curvature refreshed every 10 steps), ``fngd-estimate`` (Gram and
  solve every step) and ``fngd-share`` (shared coefficients), each with
  ``distributed="exact"`` and ``"local"``; their traffic is what
  ``gramopt.distributed.DataParallel`` counts of the collectives it issues (``sent``:
  this rank's input buffers, ``received``: the results; one all-reduce of N bytes is
  N and N, an all-gather of n bytes per rank is n and 2n).

Every step is forward, the method's backward pass(es) and the update on the rank's 64
samples (``training_step``). The variants are timed in turns (round robin, the same
order on both ranks, which run in lockstep), ``STEPS`` steps per turn; the ratio to
DDP + SGD is taken per round on rank 0's clock and the median over rounds reported.
Then the same variants run in one process on the whole batch of 128 (``distributed=None``,
plain SGD), timed the same way: scaling efficiency = t_1 / (2 t_2) per variant (1 is
perfect strong scaling). Two processes on a 2-core machine shared with other jobs can't
show real scaling: the numbers say what the communication and the synchronization
cost here, not what a cluster would see.

    PYTHONPATH=src python benchmarks/distributed.py      # writes benchmarks/results/distributed.{json,png}
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from bench_common import arguments, environment, pyplot, write_json

GLOBAL_BATCH = 128
VARIANTS = ("ddp-sgd", "ggn-exact", "ggn-local", "seng-exact", "seng-local", "fngd-estimate-exact",
            "fngd-estimate-local", "fngd-share-exact", "fngd-share-local")
STEPS = 10  # per turn: a whole SENG curvature cycle (--quick: 2)


def build(variant: str, world: int, rank: int) -> tuple[Callable[[], None], Callable[[], dict]]:
    """A step function of a fresh model and optimizer for ``variant``, and a function
    returning its traffic since the last call (bytes and calls per rank)."""
    from gramopt.tasks import get_task
    from gramopt.training.registry import build_optimizer, task_hyper, training_step

    task = get_task("teacher")
    split = task.load(0)
    model = task.build_model(0)
    order = torch.randperm(split.train_x.shape[0], generator=torch.Generator().manual_seed(0))
    batches = [order[i : i + GLOBAL_BATCH] for i in range(0, len(order) - GLOBAL_BATCH + 1, GLOBAL_BATCH)]
    counted = {"calls": 0, "sent": 0, "received": 0}
    if variant == "ddp-sgd":
        forward = model
        if world > 1:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
                allreduce_hook,
            )
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(model)

            def hook(state, bucket):  # no annotations: DDP checks them (and this module's are strings)
                size = bucket.buffer().numel() * bucket.buffer().element_size()
                state.update(calls=state["calls"] + 1, sent=state["sent"] + size, received=state["received"] + size)
                return allreduce_hook(None, bucket)

            forward.register_comm_hook(counted, hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        method, policy = variant.rsplit("-", 1)
        name, _, phase = method.partition("-")
        hyper = dict(task_hyper(task, name))
        if name == "fngd":
            hyper["coefficient_steps"] = 1 if phase == "share" else None
        optimizer = build_optimizer(name, model, task.loss, hyper, policy if world > 1 else None)
        forward = model
    position = [0]

    def step() -> None:
        idx = batches[position[0] % len(batches)]
        position[0] += 1
        rows = idx.tensor_split(world)[rank]
        scale = world * len(rows) / len(idx) if variant == "ddp-sgd" else 1.0
        training_step(optimizer, forward, task.loss, split.train_x[rows], split.train_y[rows], grad_scale=scale)

    def traffic() -> dict:
        sync = getattr(optimizer, "sync", None)
        now = dict(counted) if sync is None else sync.traffic.total()
        if sync is None:
            counted.update(calls=0, sent=0, received=0)
        else:
            sync.traffic.reset()
        return now

    return step, traffic


def timed(world: int, rank: int, rounds: int, steps_per_turn: int = STEPS) -> dict:
    """Round-robin timing of every variant; per variant the seconds per step of each
    round and the traffic per step."""
    steppers = {v: build(v, world, rank) for v in VARIANTS}
    for step, traffic in steppers.values():  # warm-up (and the first SENG refresh, FNGD's estimate)
        for _ in range(steps_per_turn):
            step()
        traffic()
    seconds = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            step = steppers[v][0]
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            for _ in range(steps_per_turn):
                step()
            seconds[v].append((time.perf_counter() - start) / steps_per_turn)
    steps = rounds * steps_per_turn
    out = {
        v: {"seconds": seconds[v], "traffic_per_step": {k: n / steps for k, n in steppers[v][1]().items()}}
        for v in VARIANTS
    }
    if world > 1:
        out["collectives"] = collective_seconds(world)
    return out


def collective_seconds(world: int, repeats: int = 50) -> dict[str, float]:
    """Median seconds of the two collectives a gramopt step issues at least: the header
    all-gather (4 int64) and an all-reduce of the model's parameter bytes (float32)."""
    from gramopt.tasks import get_task

    n = sum(p.numel() for p in get_task("teacher").build_model(0).parameters())
    out = {}
    header = torch.zeros(4, dtype=torch.int64)
    for name, run in (
        ("header_all_gather", lambda: dist.all_gather([torch.empty_like(header) for _ in range(world)], header)),
        ("parameter_all_reduce", lambda: dist.all_reduce(torch.zeros(n))),
    ):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def worker(rank: int, world: int, port: int, out: Path, rounds: int, steps_per_turn: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    result = timed(world, rank, rounds, steps_per_turn)
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.barrier()
    gc.collect()  # the DDP model and the optimizers' hooks go before their process group
    dist.destroy_process_group()


def two_processes(rounds: int, steps_per_turn: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rank0.json"
        command = [
            sys.executable,
            __file__,
            "--port",
            str(port),
            "--rounds",
            str(rounds),
            "--steps",
            str(steps_per_turn),
        ]
        command += ["--worker-out", str(out), "--worker"]
        procs = [subprocess.Popen([*command, str(rank)], env=env) for rank in range(2)]
        for proc in procs:
            if proc.wait(timeout=1800) != 0:
                raise SystemExit(f"a worker failed with exit code {proc.returncode}")
        return json.loads(out.read_text())


def summarize(one: dict, two: dict) -> dict:
    from gramopt.tasks import get_task

    params = sum(p.numel() * p.element_size() for p in get_task("teacher").build_model(0).parameters())
    out = {}
    for v in VARIANTS:
        t2 = statistics.median(two[v]["seconds"])
        t1 = statistics.median(one[v]["seconds"])
        ratios = [a / b for a, b in zip(two[v]["seconds"], two["ddp-sgd"]["seconds"], strict=True)]
        out[v] = {
            "seconds_per_step_2_processes": t2,
            "seconds_per_step_1_process": t1,
            "time_ratio_to_ddp_sgd": statistics.median(ratios),
            "time_ratio_to_ddp_sgd_range": [min(ratios), max(ratios)],
            "scaling_efficiency": t1 / (2 * t2),
            "traffic_per_step": two[v]["traffic_per_step"],
            "sent_per_step_over_parameter_bytes": two[v]["traffic_per_step"]["sent"] / params,
        }
    return {"parameter_bytes": params, "variants": out}


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    names = list(results["variants"])
    rows = [results["variants"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    at = range(len(names))
    axes[0].bar([i - 0.2 for i in at], [r["traffic_per_step"]["sent"] / 1024 for r in rows], width=0.4, label="sent")
    axes[0].bar(
        [i + 0.2 for i in at], [r["traffic_per_step"]["received"] / 1024 for r in rows], width=0.4, label="received"
    )
    axes[0].set_xticks(list(at), names)
    axes[0].axhline(results["parameter_bytes"] / 1024, color="k", ls="--", lw=1, label="parameter bytes")
    axes[0].set_ylabel("KiB per step per rank")
    axes[0].set_title("communication (2 processes)")
    axes[0].legend()
    axes[1].bar(names, [r["time_ratio_to_ddp_sgd"] for r in rows])
    axes[1].axhline(1.0, color="k", ls="--", lw=1)
    axes[1].set_ylabel("step time / DDP + SGD step")
    axes[1].set_title("step time (2 processes, rank 0)")
    axes[2].bar(names, [r["scaling_efficiency"] for r in rows])
    axes[2].axhline(1.0, color="k", ls="--", lw=1)
    axes[2].set_ylabel("t_1 / (2 t_2)")
    axes[2].set_title("scaling efficiency 1 -> 2 processes (2 shared cores)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle("teacher MLP 16-256-256-1, global batch 128, gloo on one shared 2-core machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per turn")
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, 2, args.port, args.worker_out, args.rounds, args.steps)
        return
    if args.quick:  # one round of 2 steps per variant
        args.rounds, args.steps = 1, 2
    torch.set_num_threads(1)
    started = time.time()
    one = timed(1, 0, args.rounds, args.steps)
    two = two_processes(args.rounds, args.steps)
    results = {
        "benchmark": "benchmarks/distributed.py",
        "setup": f"teacher MLP, float32, global batch {GLOBAL_BATCH} (2 x 64), gloo on 127.0.0.1, {args.rounds} rounds "
            "x "
        f"{args.steps} steps per variant, round robin",
        **summarize(one, two),
        "collective_seconds_2_processes": two.pop("collectives"),
        "raw": {"one_process": one, "two_processes": two},
        "machine": {**environment(), "threads_per_process": torch.get_num_threads()},
        "wall_seconds": time.time() - started,
        "note": "2 processes on a shared 2-core machine cannot show real scaling; the efficiency says what "
        "communication and synchronization cost here",
    }
    write_json(results, args.out / "distributed.json")
    plot(results, args.out / "distributed.png")
    for name, row in results["variants"].items():
        sent, share = row["traffic_per_step"]["sent"] / 1024, row["sent_per_step_over_parameter_bytes"]
        print(
            f"{name:22s} sent/step {sent:9.1f} KiB ({share:.2f} x params)"
            f"  time/DDP-SGD {row['time_ratio_to_ddp_sgd']:6.2f}  efficiency {row['scaling_efficiency']:.2f}"
        )


if __name__ == "__main__":
    main()

