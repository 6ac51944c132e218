"""The machine under a comparison: the CPU's model and whether its bfloat16 matmul is fast.

Some peers run part of their step in bfloat16 whatever the model's dtype (torch's and
pytorch-optimizer's Muon orthogonalize the update in bfloat16). On a CPU with native
bfloat16 instructions (x86 AVX512_BF16 or AMX-BF16, Arm BF16) that is as fast as float32
or faster; on one without, torch's bfloat16 matmul takes a slow path, many times
float32's, and such a peer's step time measures the machine, not the method.

The rule (:func:`bfloat16_matmul`): bfloat16 matmul is *fast* when a 256 x 256 bfloat16
product takes at most :data:`SLOW_FACTOR` times a float32 one. Each is timed
:data:`PROBE_PAIRS` times, in turns, on one thread (several threads contend with other
work on a shared machine), and the minimum of each is compared (the minimum is the least
disturbed by other work). The measurement runs once per
process (cached), a few products of each kind. The environment variable
``GRAMOPT_FAST_BFLOAT16`` overrides it: ``1`` (fast) or ``0`` (slow). The CPU's flags
(:func:`cpu_bfloat16_flags`) are recorded beside it but do not decide: whether torch uses
the instructions depends on its build and its oneDNN's settings too.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

OVERRIDE_VARIABLE = "GRAMOPT_FAST_BFLOAT16"
PROBE_SIZE = 256  # the side of the square matrices multiplied
PROBE_PAIRS = 5  # timed (bfloat16, float32) pairs, after one untimed pair
SLOW_FACTOR = 2.0  # bfloat16 slower than this x float32: not fast
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (the first two) and Arm names in /proc/cpuinfo


@dataclass(frozen=True)
class BFloat16Matmul:
    """Whether this CPU's bfloat16 matmul is fast (:func:`bfloat16_matmul`'s rule), the
    milliseconds of one ``PROBE_SIZE`` x ``PROBE_SIZE`` product in each dtype (None when
    overridden), and what decided: ``"measured"`` or the override variable's setting."""

    fast: bool
    bfloat16_ms: float | None
    float32_ms: float | None
    decided_by: str

    def describe(self) -> str:
        """One line for a report, e.g. "no fast bfloat16 matmul (256x256: 37 ms in
        bfloat16, 0.6 ms in float32)"."""
        verdict = "fast bfloat16 matmul" if self.fast else "no fast bfloat16 matmul"
        if self.bfloat16_ms is None or self.float32_ms is None:
            return f"{verdict} ({self.decided_by})"
        return (f"{verdict} ({PROBE_SIZE}x{PROBE_SIZE}: {self.bfloat16_ms:.2g} ms in bfloat16, "
                f"{self.float32_ms:.2g} ms in float32)")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.describe()}


def _override() -> bool | None:
    value = os.environ.get(OVERRIDE_VARIABLE)
    if value is None or value == "":
        return None
    if value.strip().lower() in ("1", "true", "yes"):
        return True
    if value.strip().lower() in ("0", "false", "no"):
        return False
    raise ValueError(
        f"{OVERRIDE_VARIABLE}={value!r}: set it to 1 (bfloat16 matmul is fast) or 0 (slow), or unset it to measure"
    )


@functools.cache
def _measured() -> tuple[float, float]:
    """(bfloat16 ms, float32 ms): the fastest of ``PROBE_PAIRS`` products each, timed in
    turns on one thread (the process's thread count is restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed_products()
    finally:
        torch.set_num_threads(threads)


def _timed_products() -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    a32 = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator)
    b32 = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.bfloat16: float("inf"), torch.float32: float("inf")}
    for timed in [False] + [True] * PROBE_PAIRS:
        for dtype, (a, b) in ((torch.bfloat16, (a16, b16)), (torch.float32, (a32, b32))):
            start = time.perf_counter()
            torch.mm(a, b)
            if timed:
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.bfloat16] * 1e3, best[torch.float32] * 1e3


def bfloat16_matmul() -> BFloat16Matmul:
    """Whether this CPU's bfloat16 matmul is fast: ``GRAMOPT_FAST_BFLOAT16`` if set, else
    measured once per process (the module docstring's rule). A bad value of the variable
    is a ValueError naming it."""
    override = _override()
    if override is not None:
        return BFloat16Matmul(override, None, None, f"{OVERRIDE_VARIABLE}={int(override)}")
    bfloat16_ms, float32_ms = _measured()
    return BFloat16Matmul(bfloat16_ms <= SLOW_FACTOR * float32_ms, bfloat16_ms, float32_ms, "measured")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name", or the platform's processor
    name), "unknown" where neither says."""
    info = _cpuinfo()
    return info.get("model name") or info.get("cpu model") or platform.processor() or "unknown"


def cpu_bfloat16_flags() -> list[str]:
    """The CPU's flags among :data:`BFLOAT16_CPU_FLAGS` (Linux's /proc/cpuinfo "flags" on
    x86, "features" on Arm; empty elsewhere)."""
    info = _cpuinfo()
    flags = set((info.get("flags", "") + " " + info.get("features", "")).split())
    return [flag for flag in BFLOAT16_CPU_FLAGS if flag in flags]
