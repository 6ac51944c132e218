"""Smoke test of the papers' studies (benchmarks/papers/*.py): each runs with ``--quick``
into a temporary folder and writes a JSON with the keys the README's "What the papers claim
and what we measured" reads, and a PNG. The figures themselves are benchmarks, not tests."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

PAPERS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "papers"

COMMON_KEYS = {"study", "paper", "claim", "settings", "held", "held_criterion", "environment"}

STUDIES = {
    "ggn_theorem1_width": {"per_width", "slope_log_max_ratio_vs_log_width", "slope_by_step", "constant_C_range", "runs"},
    "ggn_theorem2_minibatch": {"runs"},
    "ggn_fig2_sensitivity": {"runs", "best_alpha_by_lambda", "best_lambda", "decades_of_alpha_within_2x_at_lambda_1", "held_fastest_near_lambda_1", "held_insensitive_to_alpha_at_lambda_1"},
    "ggn_fig2a_test_loss": {"tasks"},
    "seng_theorem3_sketch": {"results", "unsketched_step_vs_dense_eq8_max_relative_gap", "bound_holds_every_draw", "gramopt_matches_dense_distribution", "error_falls_with_q"},
    "seng_curvature_every": {"summary", "runs", "held_epochs_insensitive", "held_time_per_epoch_falls"},
    "fngd_table4_ablation": {"summary", "runs", "absolute_damping_option", "constant_damping_arms", "held_sharing_saves_time", "held_sharing_keeps_accuracy"},
    "fngd_table5_damping": {"fngd", "fngd_range_points", "sweeps_by_lr", "range_points_by_lr", "held_at_smaller_lr", "paper_accuracies"},
    "vdb_lemma_b2": {"summary", "cases", "convergence_iff_predicted_contraction_below_1"},
}


@pytest.fixture
def studies_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PAPERS_DIR))
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


def test_every_study_is_listed():
    scripts = {p.stem for p in PAPERS_DIR.glob("*.py") if p.stem != "common"}
    assert scripts == set(STUDIES)


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_quick_run_writes_promised_keys(name, studies_path, tmp_path):
    module = importlib.import_module(name)
    payload = module.main(["--quick", "--out", str(tmp_path)])
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    missing = (COMMON_KEYS | STUDIES[name]) - set(written)
    assert not missing, f"{name}.json lacks {sorted(missing)}"
    assert written["held"] in (True, False)
    assert written["study"] == payload["study"]
    assert "arXiv:" in written["paper"]


def test_fngd_absolute_damping_detection(studies_path, monkeypatch):
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
