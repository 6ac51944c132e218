"""Data-parallel GGN, SENG and FNGD on torch.distributed (gloo, 127.0.0.1).

Worker processes (``distributed_worker.py``) run the cases of ``distributed_cases.py``
on 2 and 4 ranks with unequal local batches, with and without DistributedDataParallel,
in float64; this module checks what they saw against single-process references:

- ``"exact"``: the single-process step on the concatenated batch (1e-10);
- ``"local"``: its documented formula ``d = sum_r (b_r / B) d_r``, each d_r from a
  single-process optimizer that sees only rank r's batch (and keeps its own state);
- every rank holds bitwise the same parameters and momentum buffers;
- a short run lowers the loss; settings that differ across ranks are clear errors;
- a rank that dies mid-step makes the others exit non-zero, no hang;
- ``gramopt train`` under torchrun writes what one process writes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gramopt
from distributed_cases import CASES_2, CASES_4, Case, batches, snapshot, train_step
from gramopt.distributed import DistributedError
from gramopt.training.parallel import DataParallelRun

HERE = Path(__file__).parent
SRC = HERE.parent / "src"
TIMEOUT = 120  # seconds for a whole launch: a hang fails the test instead of CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    path = os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def launch(mode: str, world: int, out: Path, timeout: float = TIMEOUT) -> tuple[list[int], list[str], float]:
    """Run ``world`` workers; their exit codes and outputs, and the seconds it took."""
    port = free_port()
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "distributed_worker.py"), mode, str(rank), str(world), str(port), str(out)],
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{mode} on {world} ranks hung for {timeout} s")
    return [proc.returncode for proc in procs], outputs, time.monotonic() - start


def run_cases(world: int, out: Path) -> list[dict]:
    codes, outputs, _ = launch("cases", world, out)
    assert codes == [0] * world, "\n".join(outputs)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory) -> list[dict]:
    return run_cases(2, tmp_path_factory.mktemp("two"))


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory) -> list[dict]:
    return run_cases(4, tmp_path_factory.mktemp("four"))


def results_of(case: Case, request) -> list[dict]:
    ranks = request.getfixturevalue("ranks2" if case.world_size == 2 else "ranks4")
    results = [r["cases"][case.name] for r in ranks]
    assert "error" not in results[0], results[0].get("error")
    return results


def global_batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = batches(case, step)
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def assert_close(got: list, want: list, what: str) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), f"{what} {i}: present on one side only"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m, i=i: f"{what} {i}: {m}")


EXACT = [case for case in CASES_2 + CASES_4 if case.policy == "exact"]
def global_gradient(case: Case) -> bool:
    """SENG under "local" with Eq. (26): the ranks' blocks take the global gradient."""
    return case.method == "seng" and case.options.get("local_gradient", "global") == "global"


LOCAL = [case for case in CASES_2 + CASES_4 if case.policy == "local" and not global_gradient(case)]
LOCAL_GLOBAL = [case for case in CASES_2 + CASES_4 if case.policy == "local" and global_gradient(case)]


@pytest.mark.parametrize("case", EXACT, ids=lambda c: c.name)
def test_exact_is_the_single_process_step_on_the_concatenated_batch(case, request):
    results = results_of(case, request)
    model = case.model()
    opt = case.optimizer(model, None)
    for step in range(case.steps):
        train_step(case, model, opt, *global_batch(case, step))
    want = snapshot(model, opt)
    assert_close(results[0]["params"], want["params"], "parameter")
    assert_close(results[0]["momentum"], want["momentum"], "momentum buffer")
    # .grad: global where the method reads it (GGN and SENG: all; FNGD: its plain-gradient LayerNorm)
    read = range(len(want["grads"])) if case.method != "fngd" else [2, 3] if case.norm else []
    assert_close([results[0]["grads"][i] for i in read], [want["grads"][i] for i in read], ".grad")


@pytest.mark.parametrize("case", LOCAL_GLOBAL, ids=lambda c: c.name)
def test_seng_local_eq26_applies_each_rank_block_to_the_global_gradient(case, request):
    """Eq. (26) of Yang et al. (arXiv:2006.05924): d = sum_r (b_r / B) d_r with
    d_r = (g - U_r^T (U_r U_r^T + b_r lam I)^{-1} U_r g) / lam, g the global batch's
    mean-loss gradient: d_r is the step of a single-process SENG that sees B_r's
    per-sample gradients but whose .grad is replaced by g (computed by autograd on the
    concatenated batch); momentum 0, so theta -= lr d (L2 weight decay: wd theta joins g
    before the solve on both sides)."""
    from gramopt.losses import get_loss

    results = results_of(case, request)
    own = [case.model() for _ in case.sizes]
    opts = [case.optimizer(m, None) for m in own]
    lr, total = case.options["lr"], sum(case.sizes)
    loss = get_loss(case.loss)
    theta = [p.detach().clone() for p in case.model().parameters()]
    for step in range(case.steps):
        whole = case.model()
        with torch.no_grad():
            for p, t in zip(whole.parameters(), theta, strict=True):
                p.copy_(t)
        x_all, y_all = global_batch(case, step)
        g = torch.autograd.grad(loss.value(whole(x_all), y_all), list(whole.parameters()))
        direction = [torch.zeros_like(t) for t in theta]
        for rank, (model, opt, (x, y)) in enumerate(zip(own, opts, batches(case, step), strict=True)):
            with torch.no_grad():
                for p, t in zip(model.parameters(), theta, strict=True):
                    p.copy_(t)
            opt.zero_grad()
            loss.value(model(x), y).backward()  # rank r's per-sample gradients
            for p, gp in zip(model.parameters(), g, strict=True):
                p.grad = gp.clone()
            opt.step()
            for d, p, t in zip(direction, model.parameters(), theta, strict=True):
                d += case.sizes[rank] / total * (t - p.detach()) / lr
        theta = [t - lr * d for t, d in zip(theta, direction, strict=True)]
    assert_close(results[0]["params"], theta, "parameter")


@pytest.mark.parametrize("case", LOCAL, ids=lambda c: c.name)
def test_local_is_the_batch_weighted_mean_of_the_ranks_own_steps(case, request):
    """d = sum_r (b_r / B) d_r, d_r the step of an optimizer that sees only B_r (and keeps
    its own curvature / coefficients across steps); momentum 0, so theta -= lr d."""
    results = results_of(case, request)
    own = [case.model() for _ in case.sizes]
    opts = [case.optimizer(m, None) for m in own]
    lr, total = case.options["lr"], sum(case.sizes)
    theta = [p.detach().clone() for p in case.model().parameters()]
    for step in range(case.steps):
        direction = [torch.zeros_like(t) for t in theta]
        for rank, (model, opt, (x, y)) in enumerate(zip(own, opts, batches(case, step), strict=True)):
            with torch.no_grad():
                for p, t in zip(model.parameters(), theta, strict=True):
                    p.copy_(t)
            train_step(case, model, opt, x, y)
            for d, p, t in zip(direction, model.parameters(), theta, strict=True):
                d += case.sizes[rank] / total * (t - p.detach()) / lr
        theta = [t - lr * d for t, d in zip(theta, direction, strict=True)]
    assert_close(results[0]["params"], theta, "parameter")


@pytest.mark.parametrize("case", CASES_2 + CASES_4, ids=lambda c: c.name)
def test_every_rank_holds_the_same_parameters_and_momentum(case, request):
    results = results_of(case, request)
    for other in results[1:]:
        for key in ("params", "momentum"):
            for a, b in zip(results[0][key], other[key], strict=True):
                assert (a is None and b is None) or torch.equal(a, b)


def test_local_communicates_one_parameter_sized_all_reduce_per_step(ranks2):
    for case in CASES_2:
        if case.policy != "local":
            continue
        calls = ranks2[0]["cases"][case.name]["calls"]
        traffic = ranks2[0]["cases"][case.name]["traffic"]
        params = list(case.model().parameters())
        reduces = 2 if global_gradient(case) else 1  # Eq. (26): the gradients, then the directions
        assert calls["all_reduce"] == reduces * case.steps
        # per step: the directions (8-byte floats) and one presence flag per parameter tensor
        reduced = case.steps * 8 * (sum(p.numel() for p in params) + len(params))
        headers = case.steps * 4 * 8  # one 4-int64 header per step
        assert traffic["sent"] == reduces * (reduced + headers)


@pytest.mark.parametrize("ranks", ["ranks2", "ranks4"])
def test_a_short_run_lowers_the_loss(ranks, request):
    falls = request.getfixturevalue(ranks)[0]["falls"]
    assert set(falls) == {f"{m}-{p}" for m in ("ggn", "seng", "fngd") for p in ("exact", "local")}
    for name, (before, after) in falls.items():
        assert after < 0.1 * before, name


def test_settings_that_differ_across_ranks_are_clear_errors(ranks2):
    for rank in ranks2:
        errors = rank["mismatch"]
        assert "param group 0 lr: rank 0 has 0.7, rank 1 has 0.5" in errors["lr"]
        assert "policy: rank 0 has exact, rank 1 has local" in errors["policy"]
        assert "optimizer: rank 0 has GGN, rank 1 has SENG" in errors["type"]
        assert "param group 0 shapes" in errors["shapes"]
        assert "initial parameter values" in errors["values"] and "param group" not in errors["values"]
        assert errors["ddp-none"].startswith("ValueError") and "distributed='exact' or 'local'" in errors["ddp-none"]
        assert all(message.startswith(("DistributedError", "ValueError")) for message in errors.values())


def test_a_step_that_fails_on_one_rank_fails_on_every_rank_and_changes_nothing(ranks2):
    zero, one = (rank["agreement"] for rank in ranks2)
    assert len(zero) == 9
    for name in zero:
        if name in ("lengths", "seed"):
            continue
        assert one[name]["error"].startswith("NonFiniteError") and "another rank" not in one[name]["error"], name
        assert zero[name]["error"].startswith(
            "NonFiniteError: another rank failed in this step (rank 1: NonFiniteError"
        ), name
        assert zero[name]["steps"] == one[name]["steps"] == 1, name  # the failed step changed nothing
        assert all(torch.equal(a, b) for a, b in zip(zero[name]["params"], one[name]["params"], strict=True)), name
    for rank in (zero, one):
        assert rank["lengths"]["error"].startswith("DistributedError") and "sequence" in rank["lengths"]["error"]


def test_a_seed_drawn_at_construction_is_rank_0s(ranks2):
    zero, one = (rank["agreement"]["seed"]["rng"] for rank in ranks2)
    assert torch.equal(zero, one)  # drawn after torch.manual_seed(rank): different draws, one seed


def test_a_rank_that_dies_mid_step_fails_the_others_without_a_hang(tmp_path):
    codes, outputs, seconds = launch("die", 3, tmp_path, timeout=60)
    assert codes[1] == 17  # the rank that died
    for rank in (0, 2):
        assert codes[rank] != 0, outputs[rank]
        assert "CollectiveError" in outputs[rank], outputs[rank]
    assert seconds < 60


def test_policies_are_validated_without_a_process_group():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="distributed must be None, 'exact' or 'local'"):
        gramopt.GGN(model, distributed="sync")
    methods = ((gramopt.GGN, {}), (gramopt.SENG, dict(lr=0.1, damping=1.0)), (gramopt.FNGD, dict(lr=0.1, damping=1e-3)))
    for cls, options in methods:
        with pytest.raises(DistributedError, match="needs an initialized torch.distributed process group"):
            cls(model, distributed="exact", **options)


def cli(args: list[str], out: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "gramopt"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                    f"--master_port={free_port()}", "-m", "gramopt"]
    result = subprocess.run(
        launcher + args + ["--out", str(out), "--no-progress"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_train_under_torchrun_writes_what_one_process_writes(tmp_path):
    args = ["train", "--task", "diabetes", "--epochs", "1", "--optimizer", "seng"]
    one = cli(args, tmp_path / "one", 1)
    two = cli(args, tmp_path / "two", 2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert two.stdout.count("epoch   1") == 1 and two.stdout.count("wrote ") == 1  # rank 0 alone prints
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert a.keys() == b.keys() and a["epochs"][0].keys() == b["epochs"][0].keys()
    assert b["config"]["distributed"] == "exact" and b["environment"]["processes"] == "2"
    for key in ("train_loss", "test_loss", "test_mse"):  # float32: the same run up to rounding
        assert b["epochs"][0][key] == pytest.approx(a["epochs"][0][key], rel=1e-4)
    assert "epoch   1" in one.stdout


def test_compare_under_torchrun_writes_its_report(tmp_path):
    cli(["compare", "--task", "diabetes", "--optimizers", "ggn,sgd", "--seeds", "1", "--epochs", "1",
         "--distributed", "local"], tmp_path, 2)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["distributed"] == "local" and results["environment"]["processes"] == "2"
    for name in ("ggn", "sgd"):
        assert results["tasks"]["diabetes"]["optimizers"][name]["summary"]["failed"] == 0
    assert (tmp_path / "report.md").exists() and (tmp_path / "curves.png").exists()


def test_each_rank_takes_its_contiguous_slice_of_the_global_batch():
    idx = torch.randperm(11)
    parts = [DataParallelRun(rank, 3, "exact").rows(idx) for rank in range(3)]
    assert torch.equal(torch.cat(parts), idx) and [len(p) for p in parts] == [4, 4, 3]
    DataParallelRun(0, 2, "exact").check_batches(n=353, batch=64)  # last batch 33
    with pytest.raises(ValueError, match="a batch of 1 sample"):
        DataParallelRun(0, 2, "exact").check_batches(n=129, batch=64)
