"""Probe: does GGN at its defaults train the mnist CNN from every seed? Only with the warm-up.

Conclusion (benchmarks/notes.md, "GGN's damping warm-up"; ``benchmarks/results/
ggn_warmup_probe.json``): on the mnist CNN (cross-entropy defaults, 60 steps of batches of
128, six seeds) without the warm-up one unchecked early step (the next batch's loss went
from 2.3 to 9.7) left 3 seeds of 6 with a network that predicts chance for good (test
accuracy 0.08-0.10, and no error: the loss does not grow); with ``warmup=20`` all 6 trained
(test accuracy 0.89-0.96). Hence ``AdaptiveDamping``'s warm-up (every one of the first
steps checked).

What it runs: GGN (cross-entropy defaults) for a fixed number of steps on an embedded task,
from several seeds (model initialization and batch order), once with
``AdaptiveDamping(warmup=0)`` (checks every 5th step, on surges and after failed checks)
and once with the default warm-up, and records per seed the last batch losses, the test
accuracy, the checks made (extra forward passes) and the steps rejected. Not timed: it
counts what happens, not seconds.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/probes/ggn_warmup_probe.py [--task mnist --steps 60 --seeds 6]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

import gramopt
from gramopt.tasks import get_task
from gramopt.training.loop import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for bench_common
from bench_common import arguments, environment, write_json  # noqa: E402


def train(task_name: str, seed: int, steps: int, warmup: int) -> dict[str, Any]:
    """One run: ``steps`` GGN steps on random batches of the task's training set."""
    task = get_task(task_name)
    split = task.load(0)
    model = task.build_model(seed)
    rule = gramopt.AdaptiveDamping(warmup=warmup)
    opt = gramopt.GGN(model, loss=task.loss, damping_adaptation=rule)
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    generator = torch.Generator().manual_seed(seed)
    n = split.train_x.shape[0]
    losses: list[float] = []
    for _ in range(steps):
        index = torch.randint(0, n, (task.batch_size,), generator=generator)
        opt.zero_grad()
        losses.append(float(opt.backward(model(split.train_x[index]), split.train_y[index])))
        opt.step()
    checks = forwards[0] - steps  # every step makes one forward pass; a check one more
    _, metric = evaluate(model, task, split.test_x, split.test_y)
    return {
        "seed": seed,
        "warmup": warmup,
        "last_losses": losses[-3:],
        task.metric: metric,
        "checks": checks,
        "rejected": int(opt.extra_state["damping_adaptation"]["rejected_steps"]),
        "final_damping": opt.damping,
    }


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--tag", default="", help="results ggn_warmup_probe_TAG.json")
    args = parser.parse_args()
    if args.quick:  # digits, 3 steps, one seed
        args.task, args.steps, args.seeds = "digits", 3, 1
    torch.set_num_threads(1)
    default_warmup = gramopt.AdaptiveDamping().warmup
    runs = []
    for seed in range(args.seeds):
        for warmup in (0, default_warmup):
            run = train(args.task, seed, args.steps, warmup)
            print(run, flush=True)
            runs.append(run)
    record = {
        "what": "GGN at its defaults, with and without the damping warm-up, per seed",
        "task": args.task,
        "steps": args.steps,
        "environment": environment(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runs": runs,
    }
    write_json(record, args.out / (f"ggn_warmup_probe_{args.tag}.json" if args.tag else "ggn_warmup_probe.json"))

if __name__ == "__main__":
    main()
