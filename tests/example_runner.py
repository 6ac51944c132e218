"""Runs a script of examples/ in the test's own process (tests/test_examples.py,
tests/test_pinn_examples.py)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(script: str, capsys, *argv: str) -> str:
    """Runs ``examples/script`` as ``__main__`` with ``argv`` in this process; its stdout."""
    previous = sys.argv, torch.get_num_threads()
    sys.argv = [script, *argv]
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    finally:
        sys.argv = previous[0]
        torch.set_num_threads(previous[1])
    return capsys.readouterr().out
