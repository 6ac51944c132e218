"""Every script under benchmarks/ (the top level, probes/ and papers/) runs: each runs as
``__main__`` in a process of its own with ``--quick --out TMP`` (a smoke run of seconds at
tiny sizes, one torch thread), must exit 0, write its files under TMP and nothing under
benchmarks/results/ (the committed results). A new script is found by itself, so one
without ``--quick`` support fails here. The papers' studies also write the JSON keys that
benchmarks/results/papers/README.md reads. The figures themselves are benchmarks, not tests.

The processes are forked from a multiprocessing fork server that imported torch, gramopt
and matplotlib once (tests/benchmark_preload.py: a fresh interpreter pays seconds for them,
more than most quick runs); each is still a process of its own, as
``python benchmarks/SCRIPT`` is. Two run at a time (one torch thread each), started ahead
in the order of the tests, which wait for their own; a change under benchmarks/results/
fails the scripts that were running when it was seen.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import runpy
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
#: Modules the scripts import; not scripts themselves.
HELPERS = {"bench_common.py", "papers/common.py"}
#: Scripts that print and write no file.
PRINTS_ONLY = {"readme_table.py"}
#: Quick runs of more than ~10 s on 2 shared cores (subprocesses of their own, profilers,
#: torch.compile's tracing).
SLOW = {
    "core_footprint.py",
    "distributed.py",
    "gn_solvers.py",
    "probes/compile_step.py",
    "probes/pinn_gauss_newton.py",
    "seng_speed.py",
    "step_profile.py",
}
SECONDS = 240  # per script, to fail a script that ignores --quick instead of hanging
PARALLEL = 2  # scripts at a time (each runs one torch thread)
#: What the fork server imports once for every script.
PRELOAD = ["benchmark_preload"]

COMMON_KEYS = {"study", "paper", "claim", "settings", "held", "held_criterion", "environment"}
#: The keys each paper study writes besides COMMON_KEYS.
STUDIES = {
    "ggn_theorem1_width": {
        "per_width",
        "slope_log_max_ratio_vs_log_width",
        "slope_by_step",
        "constant_C_range",
        "runs",
    },
    "ggn_theorem2_minibatch": {"runs"},
    "ggn_fig2_sensitivity": {
        "runs",
        "best_alpha_by_lambda",
        "best_lambda",
        "decades_of_alpha_within_2x_at_lambda_1",
        "held_fastest_near_lambda_1",
        "held_insensitive_to_alpha_at_lambda_1",
    },
    "ggn_fig2a_test_loss": {"tasks"},
    "seng_theorem3_sketch": {
        "results",
        "unsketched_step_vs_dense_eq8_max_relative_gap",
        "bound_holds_every_draw",
        "gramopt_matches_dense_distribution",
        "error_falls_with_q",
    },
    "seng_curvature_every": {"summary", "runs", "held_epochs_insensitive", "held_time_per_epoch_falls"},
    "fngd_table4_ablation": {
        "summary",
        "runs",
        "absolute_damping_option",
        "constant_damping_arms",
        "held_sharing_saves_time",
        "held_sharing_keeps_accuracy",
    },
    "fngd_table5_damping": {
        "fngd",
        "fngd_range_points",
        "sweeps_by_lr",
        "range_points_by_lr",
        "held_at_smaller_lr",
        "paper_accuracies",
    },
    "vdb_lemma_b2": {"summary", "cases", "convergence_iff_predicted_contraction_below_1"},
}


def scripts() -> list[str]:
    """Every ``.py`` file under benchmarks/ but the helpers, relative to benchmarks/."""
    found = (p.relative_to(BENCHMARKS).as_posix() for p in BENCHMARKS.rglob("*.py"))
    return sorted(s for s in found if s not in HELPERS and not s.startswith("results/") and "__pycache__" not in s)


def committed_results() -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file under benchmarks/results/."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in RESULTS.rglob("*") if p.is_file()}


def test_the_lists_name_existing_scripts():
    every = set(scripts())
    assert SLOW | PRINTS_ONLY <= every, sorted((SLOW | PRINTS_ONLY) - every)
    assert {f"papers/{name}.py" for name in STUDIES} == {s for s in every if s.startswith("papers/")}


def run_script(script: Path, argv: list[str], log: Path) -> None:
    """In a child of the fork server: ``script`` as ``__main__`` with ``argv``, as
    ``python script argv`` runs it (its folder first on ``sys.path``), one torch thread,
    stdout and stderr into ``log``. Its exit code is the script's."""
    output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(output, 1)
    os.dup2(output, 2)
    source = str(ROOT / "src")
    os.environ.update(
        PYTHONPATH=os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p),  # for its own subprocesses
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MPLBACKEND="Agg",
    )
    sys.path[:0] = [str(script.parent), source]
    torch.set_num_threads(1)
    sys.argv = [str(script), *argv]
    os.chdir(ROOT)
    runpy.run_path(str(script), run_name="__main__")


def start_fork_server() -> multiprocessing.context.BaseContext:
    """The fork server, started with :data:`PRELOAD` imported (it finds modules through
    ``PYTHONPATH``, not through this process's ``sys.path``)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), str(ROOT / "src"), previous) if p)
    try:
        first = context.Process(target=os.getpid)  # starts the server
        first.start()
        first.join()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    return context


@dataclass
class Run:
    """One script's quick run: its exit code (None: killed after :data:`SECONDS`), its
    output, its --out folder, and the scripts that ran while benchmarks/results/ changed
    (empty when nothing there changed)."""

    exitcode: int | None
    output: str
    out: Path
    wrote_results: list[str]


class QuickRuns:
    """The selected scripts' quick runs, :data:`PARALLEL` at a time in the order the tests
    ask for them, each in a process of its own; :meth:`result` waits for one."""

    def __init__(self, scripts: list[str], folder: Path) -> None:
        self.context = start_fork_server()
        self.folder = folder
        self.waiting = list(scripts)
        self.running: dict[str, tuple[multiprocessing.process.BaseProcess, float]] = {}
        self.finished: dict[str, Run] = {}
        self.results = committed_results()

    def _start(self) -> None:
        while self.waiting and len(self.running) < PARALLEL:
            script = self.waiting.pop(0)
            folder = self.folder / script.replace("/", "-")
            argv = ["--quick", "--out", str(folder / "out")]
            folder.mkdir(parents=True)
            process = self.context.Process(target=run_script, args=(BENCHMARKS / script, argv, folder / "log.txt"))
            process.start()
            self.running[script] = (process, time.monotonic() + SECONDS)

    def _collect(self) -> None:
        """Wait until a running script ends (or overstays), and record it."""
        first_deadline = min(deadline for _, deadline in self.running.values())
        wait([process.sentinel for process, _ in self.running.values()], max(0.0, first_deadline - time.monotonic()))
        for script, (process, deadline) in list(self.running.items()):
            if process.is_alive() and time.monotonic() < deadline:
                continue
            if process.is_alive():
                process.kill()
            process.join()
            results = committed_results()
            wrote = sorted(self.running) if results != self.results else []
            self.results = results
            del self.running[script]
            folder = self.folder / script.replace("/", "-")
            log = folder / "log.txt"
            output = log.read_text() if log.exists() else ""
            self.finished[script] = Run(process.exitcode, output, folder / "out", wrote)

    def result(self, script: str) -> Run:
        if script not in self.running and script not in self.finished:  # asked for out of order: it goes first
            self.waiting = [script] + [s for s in self.waiting if s != script]
        while script not in self.finished:
            self._start()
            self._collect()
        return self.finished[script]

    def close(self) -> None:
        for process, _ in self.running.values():
            process.kill()
            process.join()


@pytest.fixture(scope="module")
def quick_runs(request, tmp_path_factory):
    items = request.session.items
    selected = [item.callspec.params["script"] for item in items if item.originalname == "test_quick_run"]
    runs = QuickRuns(selected, tmp_path_factory.mktemp("quick"))
    yield runs
    runs.close()


@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if s in SLOW else []) for s in scripts()])
def test_quick_run(script, quick_runs):
    run = quick_runs.result(script)
    assert run.exitcode == 0, f"{script} --quick exited {run.exitcode}:\n{run.output[-6000:]}"
    assert not run.wrote_results, f"benchmarks/results/ changed while {run.wrote_results} ran (write under --out)"
    written = [p for p in run.out.rglob("*") if p.is_file()]
    if script in PRINTS_ONLY:
        assert not written, f"{script} wrote {written} (listed as printing only)"
    else:
        assert written, f"{script} --quick wrote nothing under --out (write there, or list it in PRINTS_ONLY)"
    name = Path(script).stem
    if script.startswith("papers/"):
        record = json.loads((run.out / f"{name}.json").read_text())
        assert (run.out / f"{name}.png").stat().st_size > 0
        missing = (COMMON_KEYS | STUDIES[name]) - set(record)
        assert not missing, f"{name}.json lacks {sorted(missing)}"
        assert record["held"] in (True, False)
        assert "arXiv:" in record["paper"]


@pytest.fixture
def papers_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS / "papers"))
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


def test_fngd_absolute_damping_detection(papers_path, monkeypatch):
    """The FNGD studies pick up an absolute damping mode from FNGD's signature, and run the
    relative mode alone when there is none."""
    common = importlib.import_module("common")
    import gramopt

    class WithMode:
        def __init__(self, model, lr, damping, *, damping_mode: str = "relative", coefficient_steps=None): ...

    class Without:
        def __init__(self, model, lr, damping, momentum=0.0, coefficient_steps=None): ...

    monkeypatch.setattr(gramopt, "FNGD", WithMode)
    assert common.fngd_absolute_damping() == {"damping_mode": "absolute"}
    monkeypatch.setattr(gramopt, "FNGD", Without)
    assert common.fngd_absolute_damping() is None
