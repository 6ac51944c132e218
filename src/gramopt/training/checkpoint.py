"""Atomic checkpoints: write a temporary file, fsync, rename over the old one.

A kill at any moment leaves either the previous checkpoint or the new one, never a
partial file under the checkpoint's name. A truncated or corrupt file gives
:class:`CheckpointError`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gramopt.errors import GramoptError


class CheckpointError(GramoptError, RuntimeError):
    """A checkpoint that is missing, truncated or not gramopt's."""


#: What a training checkpoint holds: the model's ``state_dict()``, the optimizer's (with
#: its curvature state), the run's config, the data order position (epoch, step in epoch,
#: global step), the clock, the evaluations so far and the torch, numpy and python RNG
#: states; also the scheduler's state ("scheduler", None without a schedule).
REQUIRED = (
    "model", "optimizer", "config", "epoch", "step_in_epoch", "global_step", "seconds", "epochs", "diverged", "rng",
)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be loaded ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a gramopt training checkpoint (it holds a {type(payload).__name__})")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a gramopt training checkpoint (no {', '.join(missing)})")
    return payload


def rng_state() -> dict[str, Any]:
    """torch, numpy and python RNG states in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
