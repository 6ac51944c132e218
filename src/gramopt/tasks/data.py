"""Data helpers the task files share: the :class:`Split` record, a seeded random split,
standardization with the training set's statistics, and the validation set that
``gramopt compare`` carves from the training data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Split:
    """Train and test tensors; inputs ``[n, ...]``, targets ``[n]`` or ``[n, k]``;
    optionally a validation set carved from the training data (:func:`with_validation`)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    val_x: Tensor | None = None
    val_y: Tensor | None = None


VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 5000


def random_split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> Split:
    """``round(test_fraction * n)`` random rows of ``(x, y)`` held out for testing, the rest
    for training; the choice is fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator)
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def standardized(split: Split) -> Split:
    """``split`` with inputs and targets standardized (per column) by the training set's
    mean and standard deviation (at least 1e-8)."""
    mean, std = split.train_x.mean(0), split.train_x.std(0).clamp_min(1e-8)
    y_mean, y_std = split.train_y.mean(0), split.train_y.std(0).clamp_min(1e-8)
    return Split(
        (split.train_x - mean) / std,
        (split.train_y - y_mean) / y_std,
        (split.test_x - mean) / std,
        (split.test_y - y_mean) / y_std,
    )


def with_validation(
    split: Split, seed: int, fraction: float = VALIDATION_FRACTION, most: int = VALIDATION_MAX
) -> Split:
    """``split`` with ``min(round(fraction * n_train), most)`` training samples moved to a
    validation set: a random choice fixed by ``seed`` (the same for every optimizer and
    setting of that seed). The test set is unchanged."""
    if split.val_x is not None:
        raise ValueError("this split already has a validation set")
    n = split.train_x.shape[0]
    n_val = min(int(round(fraction * n)), most)
    if not 0 < n_val < n:
        raise ValueError(f"cannot carve {n_val} validation samples out of {n} training samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(30_000 + seed))
    val, train = order[:n_val], order[n_val:]
    return Split(
        split.train_x[train], split.train_y[train], split.test_x, split.test_y, split.train_x[val], split.train_y[val]
    )
