"""Regression tasks: the papers' synthetic teacher and scikit-learn's diabetes set."""

from __future__ import annotations

import torch
from torch import nn

from gramopt.tasks import Split, Task, register_task, seeded


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator)
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def _standardize(split: Split) -> Split:
    """Standardize inputs and targets with the training set's statistics."""
    mean, std = split.train_x.mean(0), split.train_x.std(0).clamp_min(1e-8)
    y_mean, y_std = split.train_y.mean(0), split.train_y.std(0).clamp_min(1e-8)
    return Split(
        (split.train_x - mean) / std,
        (split.train_y - y_mean) / y_std,
        (split.test_x - mean) / std,
        (split.test_y - y_mean) / y_std,
    )


def mlp(d_in: int, width: int, d_out: int, depth: int = 2, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


TEACHER_DIM, TEACHER_TRAIN, TEACHER_TEST = 16, 2048, 512


def load_teacher(seed: int) -> Split:
    """Unit-norm inputs in d = 16 labelled by a fixed random two-layer tanh teacher
    (width 64) plus 1% noise: the over-parameterized regression setting of the GGN and
    near-linear-time papers. The teacher and data depend only on ``seed``."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    n = TEACHER_TRAIN + TEACHER_TEST
    x = torch.randn(n, TEACHER_DIM, generator=generator)
    x = x / x.norm(dim=1, keepdim=True)
    w1 = torch.randn(64, TEACHER_DIM, generator=generator) * 2.0
    w2 = torch.randn(64, 1, generator=generator) / 64**0.5
    y = torch.tanh(x @ w1.T) @ w2
    y = (y - y.mean()) / y.std()
    y = y + 0.01 * torch.randn(n, 1, generator=generator)
    return Split(x[:TEACHER_TRAIN], y[:TEACHER_TRAIN], x[TEACHER_TRAIN:], y[TEACHER_TRAIN:])


def load_diabetes(seed: int) -> Split:
    """scikit-learn's diabetes set (442 patients, 10 features), 20% held out, standardized."""
    from sklearn.datasets import load_diabetes as sk_diabetes

    data = sk_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    return _standardize(_split(x, y, 0.2, seed))


register_task(
    Task(
        name="teacher",
        description="synthetic teacher-student regression (2048 unit-norm inputs, d=16), MLP 16-256-256-1",
        loss="mse",
        build_model=lambda seed: seeded(seed, lambda: mlp(TEACHER_DIM, 256, 1)),
        load=load_teacher,
        epochs=10,
        batch_size=128,
        hyper={
            "ggn": dict(lr=1.0, damping=1.0),
            "seng": dict(lr=0.1, damping=1.0, curvature_every=10),
            "fngd": dict(lr=0.1, damping=1e-3, momentum=0.9),
            "sgd": dict(lr=0.1, momentum=0.9),
            "adamw": dict(lr=1e-2, weight_decay=0.0),
            "soap": dict(lr=0.03),
            "shampoo": dict(lr=0.01),
            "muon": dict(lr=0.2, adamw_lr=0.003),
            "psgd-kron": dict(lr=0.01),
        },
    )
)

register_task(
    Task(
        name="diabetes",
        description="scikit-learn diabetes regression (442 samples, 10 features), MLP 10-64-64-1",
        loss="mse",
        build_model=lambda seed: seeded(seed, lambda: mlp(10, 64, 1)),
        load=load_diabetes,
        epochs=30,
        batch_size=64,
        hyper={
            "ggn": dict(lr=0.5, damping=0.33),
            "seng": dict(lr=0.09, damping=1.0, curvature_every=10),
            "fngd": dict(lr=0.1, damping=1e-2, momentum=0.9),
            "sgd": dict(lr=0.1, momentum=0.9),
            "adamw": dict(lr=1e-2, weight_decay=0.0),
            "soap": dict(lr=0.03),
            "shampoo": dict(lr=0.01),
            "muon": dict(lr=0.2, adamw_lr=0.003),
            "psgd-kron": dict(lr=0.01),
        },
    )
)
