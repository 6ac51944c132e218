"""Residual tasks: a physics-informed problem of :mod:`gramopt.pde.problems` as a
:class:`~gramopt.tasks.Task` of kind "residual".

Such a task trains full batch on the least-squares objective

    L(theta) = 1/2 sum_g ||r_g(theta)||^2

of the problem's residual groups (``PINNProblem.residuals``: the PDE's residual at the
interior points and the boundary (and initial) data's at the condition points, each scaled
by 1/sqrt(its point count)), one optimizer call per step (``gramopt.training.residual``).
Its metric is the relative L2 error ``||u_theta - u*|| / ||u*||`` (``test_rel_l2``).

Points, per seed (:class:`ResidualData`, float64, drawn from explicit generators):

- training: the problem's point counts, one fixed set, or drawn anew every step where the
  problem resamples (:class:`PointStream`); ``train_loss`` is L on the first set;
- validation (what ``gramopt compare`` selects settings on): another draw of training points
  (``val_loss``) and of evaluation points (``val_rel_l2``);
- test: the relative L2 error on a fixed evaluation set, the same for every seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.pde.problems import PINNProblem, Points
from gramopt.tasks.record import RESIDUAL_LOSS, RESIDUAL_METRIC, Target, Task

DTYPE = torch.float64
#: Generator seeds: the model's initialization is the seed itself; training points
#: TRAIN_STREAM + seed, validation points VALIDATION_STREAM + seed; the test set one fixed draw.
TRAIN_STREAM, VALIDATION_STREAM, TEST_SEED = 10_000, 20_000, 123_456


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class PointStream:
    """The training points of each step: the problem's one fixed set, or, where the
    problem resamples, a new draw at every call of :meth:`next` from a generator fixed by
    the seed (its first draw is :attr:`ResidualData.train`)."""

    def __init__(self, problem: PINNProblem, seed: int) -> None:
        self.problem = problem
        self.generator = _generator(TRAIN_STREAM + seed)
        self.fixed = None if problem.resample else problem.sample_points(self.generator, DTYPE)

    def next(self) -> Points:
        return self.fixed if self.fixed is not None else self.problem.sample_points(self.generator, DTYPE)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class ResidualData:
    """One seed's points of a residual task (module doc).

    Attributes:
        problem: the PDE problem.
        seed: the seed.
        train: the first training points (``interior [N_i, d]``, ``boundary [N_b, d]``).
        validation: another draw of training points, for ``val_loss``.
        validation_x: ``[M, d]`` evaluation points of ``val_rel_l2``.
        test_x: ``[M, d]`` the fixed evaluation set of ``test_rel_l2`` (the same for every seed).
    """

    problem: PINNProblem
    seed: int
    train: Points
    validation: Points
    validation_x: Tensor
    test_x: Tensor

    def stream(self) -> PointStream:
        """A fresh stream of this seed's training points (its first draw is :attr:`train`)."""
        return PointStream(self.problem, self.seed)

    @property
    def points_per_step(self) -> int:
        return self.train.interior.shape[0] + self.train.boundary.shape[0]

    def describe(self) -> str:
        """The points in one sentence."""
        p = self.problem
        how = "drawn anew every step" if p.resample else "one fixed set per seed"
        return (
            f"{p.interior_points} interior + {p.boundary_points} boundary points per step ({how}); "
            f"settings selected on another draw of points and {self.validation_x.shape[0]} validation evaluation "
            f"points per seed; test: relative L2 error on {self.test_x.shape[0]} fixed evaluation points"
        )


def residual_data(problem: PINNProblem, seed: int) -> ResidualData:
    """The points of ``problem`` for ``seed`` (module doc)."""
    train = PointStream(problem, seed).next()
    validation = _generator(VALIDATION_STREAM + seed)
    return ResidualData(
        problem,
        seed,
        train,
        problem.sample_points(validation, DTYPE),
        problem.evaluation_set(validation, DTYPE),
        problem.evaluation_set(_generator(TEST_SEED), DTYPE),
    )


def build_network(problem: PINNProblem, seed: int) -> nn.Module:
    """The problem's float64 network, initialized from ``seed``."""
    return problem.build_model(_generator(seed), DTYPE)


def residual_task(
    problem: PINNProblem,
    *,
    name: str | None = None,
    description: str,
    ladder: tuple[Target, ...],
    budget_seconds: float,
    steps: int,
    tuned: Mapping[str, Mapping[str, Any]] | None = None,
) -> Task:
    """``problem`` as a residual :class:`Task` (not registered). ``steps``: the steps of
    ``gramopt train`` (one full batch each: the task's ``epochs``); its ``batch_size`` is the
    points of one step."""
    return Task(
        name=name or problem.name,
        description=description,
        loss=RESIDUAL_LOSS,
        build_model=lambda seed: build_network(problem, seed),
        load=lambda seed: residual_data(problem, seed),
        epochs=steps,
        batch_size=problem.interior_points + problem.boundary_points,
        ladder=ladder,
        budget_seconds=budget_seconds,
        tuned=dict(tuned or {}),
        metric=RESIDUAL_METRIC,
        kind="residual",
    )
