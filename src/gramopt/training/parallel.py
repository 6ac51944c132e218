"""``gramopt train`` and ``gramopt compare`` under torchrun: one process per rank.

- Launch: torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT``; :func:`init_from_environment` joins the process group (gloo: the
  loop trains on the CPU) with a timeout, so that a rank that hangs fails the others.
- Data: every rank draws the single-process run's global batch and keeps its
  contiguous slice (``tensor_split`` order), so the ranks' slices concatenated in rank
  order are that batch (DistributedSampler-style, without padding; every batch needs
  at least one sample per rank).
- Optimizers: gramopt's methods get ``distributed=policy`` and communicate themselves;
  torch's optimizers and the peers train through ``DistributedDataParallel``, with each
  rank's mean loss scaled by ``R b_r / B`` so that DDP's average of the ranks'
  gradients is the global batch's mean-loss gradient also when the b_r differ.
- Clock and loss: after each step one all-gather of (seconds, loss, b_r): the step
  took the slowest rank's time and its loss is the global batch's, the same on every
  rank, so time budgets, evaluation schedules and divergence act at the same step
  everywhere.
- Evaluation: each rank evaluates a contiguous shard of each set; one all-reduce of
  the sums.
- Output: rank 0 alone prints and writes metrics, checkpoints and reports. Under
  ``--distributed local`` each rank's optimizer state (its own curvature or
  coefficients) goes into the checkpoint, gathered to rank 0.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gramopt.distributed import POLICIES, collective, world_size
from gramopt.optim.base import SampleSpaceOptimizer
from gramopt.training.registry import training_step

DEFAULT_TIMEOUT_SECONDS = 300.0


def torchrun_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_environment(timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Join torchrun's process group (gloo) if there is more than one rank and none is
    joined yet; whether this call joined it (the caller then destroys it)."""
    if torchrun_world_size() <= 1 or dist.is_initialized():
        return False
    if not timeout_seconds > 0:
        raise ValueError(f"the distributed timeout must be > 0 seconds, got {timeout_seconds}")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_seconds))
    return True


def check_distributed(policy: str | None) -> None:
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"distributed must be one of {POLICIES} (or unset), got {policy!r}")


@dataclass(frozen=True)
class DataParallelRun:
    """This process's part of a data-parallel run: its rank, the world size, the policy."""

    rank: int
    world_size: int
    policy: str

    @classmethod
    def current(cls, policy: str | None) -> DataParallelRun | None:
        """The run of the joined process group, or None for a single process."""
        check_distributed(policy)
        if world_size() == 1:
            return None
        return cls(dist.get_rank(), world_size(), policy or "exact")

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- data --------------------------------------------------------------------------
    def rows(self, idx: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch."""
        return idx.tensor_split(self.world_size)[self.rank]

    def check_batches(self, n: int, batch: int) -> None:
        """ValueError if some batch of an epoch has fewer samples than ranks."""
        smallest = min(batch, n % batch or batch, n)
        if smallest < self.world_size:
            raise ValueError(
                f"a batch of {smallest} sample(s) (batch size {batch}, {n} training samples) cannot be split over "
                f"{self.world_size} processes: choose a batch size (and a last batch, n mod batch) of at least "
                f"{self.world_size}, or fewer processes"
            )

    # -- training ----------------------------------------------------------------------
    def model_for(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """What the forward pass runs: the model itself for gramopt's methods (they
        communicate themselves), DistributedDataParallel around it for the others."""
        if isinstance(optimizer, SampleSpaceOptimizer):
            return model
        return DistributedDataParallel(model)

    def step(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, loss: str, x: Tensor, y: Tensor, idx: Tensor
    ) -> Tensor:
        """One step on this rank's slice of the global batch ``idx`` of ``(x, y)``;
        returns this rank's mean loss."""
        rows = self.rows(idx)
        scale = 1.0 if isinstance(optimizer, SampleSpaceOptimizer) else self.world_size * len(rows) / len(idx)
        return training_step(optimizer, model, loss, x[rows], y[rows], grad_scale=scale)

    def agree(self, seconds: float, loss: float, samples: int) -> tuple[float, float]:
        """(the slowest rank's seconds, the global batch's mean loss), on every rank."""
        table = self._all_gather(torch.tensor([seconds, loss, float(samples)], dtype=torch.float64))
        return float(table[:, 0].max()), float((table[:, 1] * table[:, 2]).sum() / table[:, 2].sum())

    # -- evaluation --------------------------------------------------------------------
    def shard(self, n: int) -> Tensor:
        """This rank's contiguous share of ``n`` evaluation rows."""
        return torch.arange(n).tensor_split(self.world_size)[self.rank]

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64), on every rank."""
        return self._all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    # -- checkpoints -------------------------------------------------------------------
    def rank_states(self, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]] | None:
        """Every rank's optimizer state on rank 0 (None elsewhere) under the local
        policy, whose curvature and coefficients are each rank's own; None otherwise."""
        if self.policy != "local" or not isinstance(optimizer, SampleSpaceOptimizer):
            return None
        states: list[Any] | None = [None] * self.world_size if self.main else None
        with collective("gathering the optimizer states", self.rank):
            dist.gather_object(optimizer.state_dict(), states, dst=0)
        return states

    # -- collectives -------------------------------------------------------------------
    def _all_gather(self, t: Tensor) -> Tensor:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with collective("all_gather", self.rank):
            dist.all_gather(out, t)
        return torch.stack(out)

    def _all_reduce(self, t: Tensor) -> Tensor:
        with collective("all_reduce", self.rank):
            dist.all_reduce(t)
        return t
