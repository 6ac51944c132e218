"""The timing and memory helpers that compare and the benchmarks share (issue 15)."""

from __future__ import annotations

import torch

from gramopt.compare import timing
from gramopt.compare.memory import AVAILABLE, peak_memories


def test_interleaved_times_synchronizes_each_turn(monkeypatch):
    calls: list[object] = []
    monkeypatch.setattr(timing, "synchronize", lambda device=None: calls.append(device))
    samples = timing.interleaved_times(
        {"a": lambda: None, "b": lambda: None}, rounds=3, steps_per_round=2, warmup=0, device="cpu"
    )
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    assert calls == ["cpu"] * 12  # before and after each of the 6 turns


def test_synchronize_is_a_no_op_on_cpu():
    timing.synchronize("cpu")
    timing.synchronize(None)


def test_peak_memories_reports_resident_and_cuda():
    keep = []
    peaks = peak_memories(lambda: keep.append(torch.ones(16 * 2**20 // 4)))
    uses_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    assert (peaks["cuda_allocated"] is None) == (not uses_cuda)
    if AVAILABLE:
        assert 12 * 2**20 <= peaks["resident"] <= 40 * 2**20
    else:
        assert peaks["resident"] is None
