"""Classification tasks on real data that ships with installed packages."""

from __future__ import annotations

import torch
from torch import nn

from gramopt.tasks import Split, Task, ladder, mlp, random_split, register_task, seeded


def load_digits(seed: int) -> Split:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), pixels scaled to [0, 1],
    20% held out."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return random_split(x, y, 0.2, seed)


register_task(
    Task(
        name="digits",
        description="scikit-learn 8x8 digits (1797 images, 10 classes), MLP 64-128-128-10",
        loss="cross_entropy",
        build_model=lambda seed: seeded(seed, lambda: mlp(64, 128, 10, act=nn.ReLU)),
        load=load_digits,
        epochs=10,
        batch_size=128,
        ladder=ladder("test_accuracy", (0.95, 0.97, 0.98), below=False),
        budget_seconds=3.0,
        # GGN at its constructor's cross-entropy defaults (benchmarks/results/ggn_ce_defaults.json)
        tuned={
            "seng": dict(lr=0.33, damping=3.0),
            "fngd": dict(lr=0.3),
            "sgd": dict(lr=0.3),
            "adamw": dict(lr=1e-2),
            "soap": dict(lr=0.009),
            "shampoo": dict(lr=0.01),
            "muon": dict(lr=0.06, adamw_lr=0.0009),
            "psgd-kron": dict(lr=0.01),
        },
    )
)
