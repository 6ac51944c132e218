"""Peak memory of training steps on CPU, from the kernel's resident-set counters.

Linux keeps the peak resident set size of a process (``VmHWM`` in
``/proc/self/status``) and lets the process reset it to the current size by writing
``5`` to ``/proc/self/clear_refs``. :func:`peak_memory` resets it, runs the given steps
and reads it back: the result is the largest resident size during the steps minus the
resident size just before them (model, data and imports are in that baseline;
activations, gradients, optimizer state and temporaries are not).

Before the reset, ``gc.collect()`` and glibc's ``malloc_trim(0)`` return freed memory to
the kernel, so memory freed by an earlier run in the same process is not silently
reused (which would hide new allocations from the counter). Where the counters are
missing (not Linux), :data:`AVAILABLE` is False and the peak is ``None``.

Tensors on a GPU are not in the resident set: :func:`peak_memories` also reports
``torch.cuda.max_memory_allocated`` over the steps (its peak statistic reset first),
minus what was allocated before them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError, TypeError):
        return None


_LIBC = _libc()


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} is missing from {_STATUS}")
    return int(match.group(1))


def _release_free_memory() -> None:
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _probe() -> bool:
    try:
        _status_kib("VmHWM")
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


AVAILABLE = _probe()


def peak_memory(steps: Callable[[], object]) -> int | None:
    """Bytes of resident memory that ``steps()`` added at its peak (None off Linux)."""
    if not AVAILABLE:
        return None
    _release_free_memory()
    baseline = _status_kib("VmRSS")
    _CLEAR_REFS.write_text("5")
    steps()
    return 1024 * max(0, _status_kib("VmHWM") - baseline)


def peak_memories(steps: Callable[[], object]) -> dict[str, int | None]:
    """Bytes that ``steps()`` added at its peak: ``"resident"`` (the process's resident
    set, None off Linux) and ``"cuda_allocated"`` (``torch.cuda.max_memory_allocated``
    over the CUDA devices, None when CUDA is not in use)."""
    use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = range(torch.cuda.device_count()) if use_cuda else range(0)
    before = {}
    for d in devices:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
        before[d] = torch.cuda.memory_allocated(d)

    def run() -> None:
        steps()
        for d in devices:
            torch.cuda.synchronize(d)

    resident = peak_memory(run) if AVAILABLE else (run(), None)[1]
    cuda = sum(max(0, torch.cuda.max_memory_allocated(d) - before[d]) for d in devices) if use_cuda else None
    return {"resident": resident, "cuda_allocated": cuda}
