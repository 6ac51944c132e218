"""One rank of the distributed tests: ``python distributed_worker.py MODE RANK WORLD PORT OUT``.

Joins a gloo process group on 127.0.0.1:PORT (a short timeout, one thread), runs the
MODE's work and saves what it saw to ``OUT/rank{RANK}.pt`` for ``test_distributed.py``
to check against single-process references. Modes:

- ``cases``: every case of ``distributed_cases`` for this world size; on 2 ranks also
  settings that differ across ranks (each must be a clear error on every rank) and a
  step that fails on rank 1 alone (every rank must raise); then a short run per
  method and policy whose loss must fall;
- ``die``: rank 1 exits (``os._exit``) in the middle of its second SENG step; the
  others must fail, not hang.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))

import gramopt  # noqa: E402
from distributed_cases import CASES_2, CASES_4, Case, batches, snapshot, token_net, train_step  # noqa: E402
from gramopt.losses import get_loss  # noqa: E402


def run_case(case: Case, rank: int) -> dict:
    model = case.model()
    forward = DistributedDataParallel(model) if case.ddp else model
    opt = case.optimizer(forward, case.policy)
    losses = [train_step(case, forward, opt, *batches(case, t)[rank]) for t in range(case.steps)]
    return {
        **snapshot(model, opt),
        "losses": losses,
        "traffic": opt.sync.traffic.total(),
        "calls": dict(opt.sync.traffic.calls),
    }


def mismatches(rank: int) -> dict[str, str]:
    """Settings that differ on rank 1: each must raise on every rank, naming the difference."""
    case = CASES_2[0]
    errors = {}
    variants = {
        "lr": lambda m: case.optimizer(m, "exact", lr=0.7 if rank == 0 else 0.5),
        "policy": lambda m: case.optimizer(m, "exact" if rank == 0 else "local"),
        "type": lambda m: (
            case.optimizer(m, "exact") if rank == 0 else gramopt.SENG(m, lr=0.1, damping=1.0, distributed="exact")
        ),
        "shapes": lambda m: case.optimizer(m if rank == 0 else Case(**{**case.__dict__, "out": 3}).model(), "exact"),
        "values": lambda m: case.optimizer(m if rank == 0 else m.apply(_nudge), "exact"),
    }
    for name, build in variants.items():
        try:
            build(case.model())
            errors[name] = "no error"
        except gramopt.GramoptError as err:
            errors[name] = f"{type(err).__name__}: {err}"
    try:
        case.optimizer(DistributedDataParallel(case.model()), None)
        errors["ddp-none"] = "no error"
    except ValueError as err:
        errors["ddp-none"] = f"{type(err).__name__}: {err}"
    return errors


def _nudge(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Linear):
        with torch.no_grad():
            module.bias.add_(1e-12)


def loss_falls(rank: int, world: int) -> dict[str, tuple[float, float]]:
    """A short run per method and policy on one regression problem: global loss before and after."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(48, 5, generator=generator, dtype=torch.float64)
    y = torch.tanh(x @ torch.tensor([[0.5], [-0.3], [0.2], [0.0], [0.4]], dtype=torch.float64))
    shards = list(zip(x.tensor_split(world), y.tensor_split(world), strict=True))
    settings = {
        "ggn": dict(lr=1.0, damping=0.1),
        "seng": dict(lr=0.5, damping=1.0, curvature_every=2, momentum=0.5),
        "fngd": dict(lr=0.5, damping=0.1, coefficient_steps=5, momentum=0.5),
    }
    out = {}
    for method, options in settings.items():
        for policy in ("exact", "local"):
            case = Case("falls", method, policy, "mse", 1, (1,) * world, 0, options)
            model = case.model()
            opt = case.optimizer(model, policy)
            before = float(get_loss("mse").value(model(x), y))
            for _ in range(10):
                train_step(case, model, opt, *shards[rank])
            out[f"{method}-{policy}"] = (before, float(get_loss("mse").value(model(x), y)))
    return out


def agreement(rank: int) -> dict[str, dict]:
    """Rank 1 alone fails a step (a NaN in its input); every rank must raise, change
    nothing, and take the next step together."""
    settings = {
        "ggn": dict(lr=0.5, damping=0.1),
        "seng": dict(lr=0.2, damping=0.5),
        "fngd": dict(lr=0.1, damping=1e-2, coefficient_steps=1),
    }
    out = {}
    for method, options in settings.items():
        for policy, loop in (("exact", "uniform"), ("local", "uniform"), ("local", "ordinary")):
            if loop == "ordinary" and method != "seng":
                continue
            case = Case("agree", method, policy, "mse", 2, (4, 4), 0, options, norm=True, loop=loop)
            model = case.model()
            opt = case.optimizer(model, policy)
            x, y = batches(case, 0)[rank]
            if rank == 1:
                x = x.clone()
                x[0, 0] = float("nan")
            try:
                train_step(case, model, opt, x, y)
                error = "no error"
            except Exception as err:  # noqa: BLE001 - reported to the test
                error = f"{type(err).__name__}: {err}"
            train_step(case, model, opt, *batches(case, 1)[rank])
            params = [p.detach().clone() for p in model.parameters()]
            out[f"{method}-{policy}-{loop}"] = {"error": error, "steps": opt.steps_taken, "params": params}
    # a sketch seed drawn at construction: rank 0's on every rank
    torch.manual_seed(rank)
    opt = gramopt.SENG(token_net(), lr=0.1, damping=1.0, sketch=gramopt.SketchConfig(size=4), distributed="exact")
    out["seed"] = {"rng": opt.extra_state["sketch_rng"]}
    # sequences of another length on rank 1: the gathered layouts differ
    model = token_net()
    opt = gramopt.GGN(model, lr=0.5, damping=0.1, distributed="exact")
    tokens = torch.randint(0, 10, (3, 5 + rank), generator=torch.Generator().manual_seed(rank))
    try:
        opt.backward(model(tokens), torch.zeros(3, 2, dtype=torch.float64))
        opt.step()  # GGN gathers the ranks' rows in step (its micro-batches accumulate until then)
        out["lengths"] = {"error": "no error"}
    except Exception as err:  # noqa: BLE001
        out["lengths"] = {"error": f"{type(err).__name__}: {err}"}
    return out


def die(rank: int) -> None:
    """SENG steps; rank 1 exits inside its second step, before the gradient all-reduce."""
    case = CASES_2[2]
    model = case.model()
    opt = case.optimizer(model, "exact")
    original = opt.sync.mean

    def mean(*args, **kwargs):
        if rank == 1 and opt.steps_taken == 1:
            os._exit(17)
        return original(*args, **kwargs)

    opt.sync.mean = mean
    for t in range(3):
        train_step(case, model, opt, *batches(case, t)[min(rank, 1)])


def main() -> None:
    mode, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=20),
    )
    result: dict = {}
    try:
        if mode == "cases":
            cases = CASES_2 if world == 2 else CASES_4
            result["cases"] = {}
            for case in cases:
                try:
                    result["cases"][case.name] = run_case(case, rank)
                except Exception:  # noqa: BLE001 - reported to the test
                    result["cases"][case.name] = {"error": traceback.format_exc()}
            if world == 2:
                result["mismatch"] = mismatches(rank)
                result["agreement"] = agreement(rank)
            result["falls"] = loss_falls(rank, world)
        elif mode == "die":
            die(rank)
    finally:
        torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
