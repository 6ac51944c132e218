"""Regression tasks: the papers' synthetic teacher and scikit-learn's diabetes set.

Their ladders are on the train loss (the targets are standardized, so 0.01 is 1% of the
target variance): they measure optimization speed, the training objective itself."""

from __future__ import annotations

import torch

from gramopt.tasks import Split, Task, ladder, mlp, random_split, register_task, seeded, standardized

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
    return standardized(random_split(x, y, 0.2, seed))


# The first-order methods and peers share their settings on both MLPs.
MLP_REGRESSION_TUNED = {
    "adamw": dict(lr=1e-2, weight_decay=0.0),
    "soap": dict(lr=0.03),
    "shampoo": dict(lr=0.01),
    "muon": dict(lr=0.2),
    "psgd-kron": dict(lr=0.01),
}

register_task(
    Task(
        name="teacher",
        description="synthetic teacher-student regression (2048 unit-norm inputs, d=16), MLP 16-256-256-1",
        loss="mse",
        build_model=lambda seed: seeded(seed, lambda: mlp(TEACHER_DIM, 256, 1)),
        load=load_teacher,
        epochs=10,
        batch_size=128,
        # The top rung is where the best optimizer of the committed run reaches it within the
        # budget: nobody reached 1e-3 in 3 s (best final train loss 0.0018, pytorch-optimizer's
        # Muon; GGN 0.0027), so the top rung is 3e-3 and the budget (the default command's) 3 s.
        ladder=ladder("train_loss", (1e-1, 1e-2, 3e-3), below=True),
        budget_seconds=3.0,
        tuned={"ggn": dict(damping=1.0), **MLP_REGRESSION_TUNED},
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
        # Every optimizer reached 0.4 / 0.3 / 0.2 within a tenth of the 1-s budget (the two-knob
        # grid's run), so those rungs no longer separated anyone; the best reach 0.01 in 0.3 s
        # (GGN, AdamW, pytorch-optimizer's Muon, quick grid).
        ladder=ladder("train_loss", (1e-1, 3e-2, 1e-2), below=True),
        budget_seconds=1.0,
        tuned={
            "ggn": dict(lr=0.5, damping=0.33),
            "seng": dict(lr=0.09),
            "fngd": dict(damping=1e-2),
            **MLP_REGRESSION_TUNED,
        },
    )
)
