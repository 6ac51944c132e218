"""Data-parallel training on ``torch.distributed``: the optimizers' two policies.

R ranks (processes) hold the same model; rank r gets b_r samples B_r of a global batch
of B = b_1 + ... + b_R samples. ``GGN``, ``SENG`` and ``FNGD`` take
``distributed="exact"`` or ``"local"`` (``None``: one process) and then communicate
themselves, with or without a ``DistributedDataParallel`` wrapper around the model.

``"exact"``: the step of the concatenated batch B_1 ... B_R.
    Each layer's captures (every forward call's saved input and its output-gradients)
    and the method's per-sample quantities (GGN: residuals w, Hessian factors Q and the
    loss gradient) are all-gathered along the batch dimension in rank order
    (:meth:`DataParallel.gather_rows`; unequal b_r are padded, then trimmed). Every rank
    then runs the unchanged single-process math on the global factors. Output-gradients
    of a rank's *mean* loss (SENG, FNGD, GGN's loss gradient) are rescaled by b_r / B,
    so they are those of the global mean loss; GGN's Jacobian passes are not. The
    gradients a step reads (SENG: every ``.grad``; GGN, FNGD: the parameters left to the
    plain gradient) become the global mean-loss gradient ``sum_r (b_r / B) g_r`` (one
    all-reduce, :meth:`DataParallel.mean`) before the step; SENG gathers the captures
    only on its curvature-refresh steps and FNGD gathers them in its sharing phase too
    (its weights index the global batch).

    ``.grad``: after ``step()`` every ``.grad`` the step read is the global one; the
    others (the layers GGN and FNGD precondition, whose ``.grad`` ``loss.backward()``
    fills, or their own ``backward`` until the first step) hold this rank's own.

``"local"``: each rank's own step, averaged (the block-diagonal approximation).
    Each rank computes the direction d_r that a single process would compute on B_r
    alone (its own Gram, solve, coefficients and cached state), then one all-reduce of
    the flattened directions gives every rank

        d = sum_r (b_r / B) d_r,

    which the base class decorates (momentum, weight decay) and applies. Per method:

    - SENG, Eq. (25)-(26) with the block-diagonal approximation of
      ``(lam I + U^T U)^{-1}`` (one block per rank), each block applied to the global
      gradient g = sum_r (b_r / B) g_r (``local_gradient="global"``, the default, Eq. 26;
      one all-reduce of the gradients before the solve):
      ``d_r = (g - U_r^T (U_r U_r^T + b_r lam I)^{-1} U_r g) / lam``; with
      ``local_gradient="own"`` each block takes the rank's own g_r (no extra
      all-reduce). Eq. (27) (the previous step's global gradient, so that the
      all-reduce overlaps the backward pass) is not offered: the step here is
      synchronous, so it would cost the same all-reduce and use an older gradient.
      Implicit layers combine the ranks' own Eq. (23) products; Eq. (28) (summing the
      factor sums G^c, A^c over ranks) is not used: it adds cross-rank terms
      ``G^c_r^T A^c_s`` to the same approximation.
    - FNGD, Section VI-A: the local weighted sums ``U_r^T v_r``, with v_r from the
      rank's own Gram (and, when sharing, its own running mean), then one all-reduce.
    - GGN: each rank solves its own system,
      ``d_r = J_r^T Q_r (Q_r^T G_r Q_r + damping I)^{-1} w_r``. The mean, not the sum:
      summing the d_r would be the literal block-diagonal solve of ``G``, but it moves
      R times too far along directions every sample shares (e.g. the output bias).

    Communication per step: one all-reduce of the parameter-sized directions, as a DDP
    gradient all-reduce (SENG with ``local_gradient="global"``: two, gradients and
    directions). Cached state (SENG's curvature, FNGD's coefficients) and
    ``.grad`` are each rank's own; the parameters and momentum buffers are the same on
    every rank.

Agreement. Every synchronization point starts with a small header all-gather (the
point's name, a status, b_r and a hash of the layout of what follows), so that a rank
whose step failed locally (a non-finite loss, a failed solve) still meets the others:
the methods' ``backward`` and ``step`` report such failures (see
:class:`~gramopt.optim.base.SampleSpaceOptimizer`), and every rank raises (the failing
rank its own error, the others the same error class naming the rank), with nothing
changed on any rank. Ranks at different synchronization points, or with different
layers or shapes, get a :class:`DistributedError` instead of exchanging garbage. A rank
that dies makes the others' collectives fail (the connection closes; otherwise the
process group's ``timeout``), which surfaces as :class:`CollectiveError`.

With a ``DistributedDataParallel`` wrapper, the optimizer hooks the wrapped module and
sets the wrapper's ``require_backward_grad_sync = False``: DDP then neither all-reduces
gradients nor, after the first forward pass, broadcasts buffers (gramopt's supported
layers have none that train); its constructor's broadcast of rank 0's parameters is
still what makes the initial parameters equal.

Settings are checked at construction (:meth:`DataParallel.check_consistent`: optimizer
type, policy, hyper-parameters, options, parameter shapes and values) so that a rank
with another ``lr`` or model fails at once with a message naming the difference.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gramopt.errors import (
    CaptureError,
    CollectiveError,
    DistributedError,
    NonFiniteError,
    SingularSystemError,
    UnsupportedModuleError,
)

POLICIES = ("exact", "local")

# Failures a rank reports to the others, by code (index + 1); the others raise the same
# class (a rank's own error, re-raised, keeps its class).
_FAILURES: tuple[type[Exception], ...] = (
    NonFiniteError,
    SingularSystemError,
    CaptureError,
    UnsupportedModuleError,
    DistributedError,
    torch.linalg.LinAlgError,
    FloatingPointError,
    ArithmeticError,
    ValueError,
    TypeError,
    RuntimeError,
    Exception,
)
_PHASES = {"failure": 0, "gather": 1, "mean": 2}
_AGREED = "_gramopt_agreed"  # set on an exception once every rank knows of it


def check_policy(policy: str | None) -> str | None:
    """``policy`` if valid; a clear error if it needs a process group and none is there."""
    if policy is None:
        return None
    if policy not in POLICIES:
        raise ValueError(f"distributed must be None, 'exact' or 'local', got {policy!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            f"distributed={policy!r} needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (under torchrun, "
            "init_process_group('gloo') on CPU or 'nccl' on GPU reads the environment), or pass distributed=None"
        )
    return policy


def world_size() -> int:
    """The default process group's size (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class Traffic:
    """The collectives one rank issued: per kind (``all_gather``, ``all_reduce``, ...),
    the number of calls, the bytes of this rank's input buffers (``sent``) and of the
    results it received (``received``)."""

    calls: Counter = field(default_factory=Counter)
    sent: Counter = field(default_factory=Counter)
    received: Counter = field(default_factory=Counter)

    def add(self, kind: str, sent: int, received: int) -> None:
        self.calls[kind] += 1
        self.sent[kind] += sent
        self.received[kind] += received

    def total(self) -> dict[str, int]:
        return {
            "calls": sum(self.calls.values()),
            "sent": sum(self.sent.values()),
            "received": sum(self.received.values()),
        }

    def reset(self) -> None:
        self.calls.clear()
        self.sent.clear()
        self.received.clear()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _layout_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _tensor_layout(tensors: Sequence[Tensor]) -> str:
    """dtype and shape past the batch dimension of each tensor."""
    return ";".join(f"{t.dtype}{tuple(t.shape[1:])}" for t in tensors)


class DataParallel:
    """An optimizer's view of the process group: its policy, its collectives (counted
    in :attr:`traffic`) and the agreement protocol (module docstring).

    Args:
        policy: ``"exact"`` or ``"local"``.
        group: the process group (default: the default group).
    """

    def __init__(self, policy: str, group: Any = None) -> None:
        self.policy = check_policy(policy)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.traffic = Traffic()
        self._depth = 0  # agreement() blocks entered (backward inside step's closure: 2)

    # -- counted collectives -------------------------------------------------------------
    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        tensor = tensor.to(self.device)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with self._collective("all_gather"):
            dist.all_gather(out, tensor, group=self.group)
        self.traffic.add("all_gather", _nbytes(tensor), self.world_size * _nbytes(tensor))
        return out

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        tensor = tensor.to(self.device)
        with self._collective("all_reduce"):
            dist.all_reduce(tensor, group=self.group)
        self.traffic.add("all_reduce", _nbytes(tensor), _nbytes(tensor))
        return tensor

    def _all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        with self._collective("all_gather_object"):
            dist.all_gather_object(out, obj, group=self.group)
        self.traffic.add("all_gather_object", 0, 0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. a random seed drawn at construction)."""
        box = [obj]
        with self._collective("broadcast"):
            dist.broadcast_object_list(
                box, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group
            )
        self.traffic.add("broadcast", 0, 0)
        return box[0]

    def _collective(self, kind: str) -> Any:
        return collective(kind, self.rank)

    # -- agreement ---------------------------------------------------------------------------
    def _agree(self, phase: str, samples: int, layout: str, failure: BaseException | None = None) -> list[int]:
        """The header all-gather of a synchronization point; returns every rank's b_r.

        Raises on every rank, together, if any rank reports a failure, is at another
        synchronization point or has another layout."""
        code = 0 if failure is None else next(i + 1 for i, cls in enumerate(_FAILURES) if isinstance(failure, cls))
        header = torch.tensor([_PHASES[phase], code, samples, _layout_hash(layout)], dtype=torch.int64)
        table = torch.stack(self._all_gather(header)).cpu()
        if bool((table[:, 1] != 0).any()):
            self._raise_failure(table, failure)
        phases = table[:, 0].tolist()
        if len(set(phases)) > 1:
            names = {v: k for k, v in _PHASES.items()}
            where = ", ".join(f"rank {r}: {names[p]}" for r, p in enumerate(phases))
            raise _agreed(DistributedError(f"the ranks reached different synchronization points ({where})"))
        hashes = table[:, 3].tolist()
        if len(set(hashes)) > 1:
            others = [r for r, h in enumerate(hashes) if h != hashes[0]]
            raise _agreed(
                DistributedError(
                    f"{phase}: rank(s) {others} hold tensors of another layout than rank 0 (other layers, number of "
                    "forward calls or backward passes, dtypes, or shapes past the batch dimension such as sequence "
                    "lengths): every rank must run the same model on inputs of the same shape"
                )
            )
        return table[:, 2].tolist()

    def _raise_failure(self, table: Tensor, failure: BaseException | None) -> None:
        messages = self._all_gather_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            setattr(failure, _AGREED, True)
            raise failure
        failed = [r for r in range(self.world_size) if int(table[r, 1]) != 0]
        first = failed[0]
        cls = _FAILURES[int(table[first, 1]) - 1]
        detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise _agreed(cls(f"another rank failed in this step ({detail}); nothing was changed on any rank"))

    def report(self, failure: BaseException) -> None:
        """Tell the other ranks about a local failure outside a synchronization point
        (their next one raises); nothing if every rank already knows of it."""
        if getattr(failure, _AGREED, False) or not isinstance(failure, Exception):
            return
        try:
            self._agree("failure", 0, "", failure)
        except Exception:  # noqa: BLE001 - the caller re-raises the original failure
            pass

    @contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a step (or backward) whose local failures the other ranks must learn of;
        a block inside another (``opt.backward`` in ``step``'s closure) leaves the report
        to the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth += 1
        try:
            yield
        except Exception as err:
            self.report(err)
            raise
        finally:
            self._depth -= 1

    @property
    def nested(self) -> bool:
        """Whether an :meth:`agreement` block runs inside another."""
        return self._depth > 1

    # -- the synchronization points ------------------------------------------------------------
    def gather_rows(self, tensors: Sequence[Tensor], scaled: Sequence[bool], layout: str = "") -> list[Tensor]:
        """Every rank's rows, in rank order: ``[b_r, *s]`` each -> ``[B, *s]``.

        Tensors marked ``scaled`` (gradients of a rank's mean loss) are multiplied by
        b_r / B on the way. One header all-gather, then one all-gather per dtype of the
        rows flattened, padded to the largest b_r and trimmed.

        Args:
            tensors: this rank's tensors, all with the same leading dimension b_r.
            scaled: per tensor, whether to rescale it by b_r / B.
            layout: what every rank must share beyond dtypes and shapes (layer names).
        """
        samples = int(tensors[0].shape[0]) if tensors else 0
        problem = None
        if any(t.shape[0] != samples for t in tensors):
            problem = CaptureError(
                "the exact policy gathers tensors with one leading batch dimension, got "
                f"{[tuple(t.shape) for t in tensors]}"
            )
        sizes = self._agree("gather", samples, layout + "|" + _tensor_layout(tensors), problem)
        total, most = sum(sizes), max(sizes)
        out: list[Tensor | None] = [None] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            index = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            widths = [math.prod(tensors[i].shape[1:]) for i in index]
            rows = torch.zeros(most, sum(widths), dtype=dtype, device=self.device)
            if samples:
                rows[:samples] = torch.cat(
                    [tensors[i].reshape(samples, w).to(self.device) for i, w in zip(index, widths, strict=True)], dim=1
                )
            parts = [chunk[:b].split(widths, dim=1) for chunk, b in zip(self._all_gather(rows), sizes, strict=True)]
            home = tensors[index[0]].device
            for j, i in enumerate(index):
                pieces = [p[j].reshape(b, *tensors[i].shape[1:]) for p, b in zip(parts, sizes, strict=True)]
                if scaled[i]:
                    pieces = [p * (b / total) for p, b in zip(pieces, sizes, strict=True)]
                out[i] = torch.cat(pieces).to(home)
        return out  # type: ignore[return-value]

    def mean(self, tensors: Sequence[Tensor | None], like: Sequence[Tensor], samples: int) -> list[Tensor | None]:
        """``sum_r (b_r / B) t_r`` per slot, on every rank: one header all-gather and one
        all-reduce per dtype of the flattened tensors (a DDP-style bucket).

        Args:
            tensors: this rank's tensors (None: this rank has none; counts as zeros).
            like: per slot, a tensor of the slot's shape and dtype (the parameter).
            samples: b_r.

        Returns:
            per slot the weighted mean, or None where no rank had a tensor.
        """
        sizes = self._agree("mean", samples, ";".join(f"{p.dtype}{tuple(p.shape)}" for p in like))
        weight = samples / sum(sizes) if sum(sizes) else 1.0 / self.world_size
        out: list[Tensor | None] = [None] * len(like)
        for dtype in dict.fromkeys(p.dtype for p in like):
            index = [i for i, p in enumerate(like) if p.dtype == dtype]
            flat = [
                torch.zeros(like[i].numel(), dtype=dtype, device=self.device)
                if tensors[i] is None
                else (tensors[i].detach().reshape(-1).to(self.device, dtype) * weight)
                for i in index
            ]
            present = torch.tensor([float(tensors[i] is not None) for i in index], dtype=dtype, device=self.device)
            total = self._all_reduce(torch.cat(flat + [present]))
            values = total[: -len(index)].split([like[i].numel() for i in index])
            for j, i in enumerate(index):
                if total[len(total) - len(index) + j] > 0:
                    out[i] = values[j].view_as(like[i]).to(like[i].device)
        return out

    def synchronize_gradients(self, params: Sequence[Tensor], samples: int) -> None:
        """``"exact"``: each ``p.grad`` becomes ``sum_r (b_r / B) g_r`` (``samples``: b_r)."""
        if params:
            for p, g in zip(params, self.mean([p.grad for p in params], params, samples), strict=True):
                p.grad = g

    def average_directions(
        self, directions: dict[Tensor, Tensor], params: Sequence[Tensor], samples: int
    ) -> dict[Tensor, Tensor]:
        """``"local"``: ``d = sum_r (b_r / B) d_r`` for every parameter of ``params``
        (one all-reduce); ``samples``: b_r."""
        by_id = {id(p): d for p, d in directions.items()}
        means = self.mean([by_id.get(id(p)) for p in params], params, samples)
        return {p: d for p, d in zip(params, means, strict=True) if d is not None}

    # -- construction ------------------------------------------------------------------------
    def check_consistent(self, fingerprint: dict[str, str]) -> None:
        """DistributedError on every rank unless all ranks have the same ``fingerprint``
        (a small dict of readable settings), naming each difference."""
        prints = self._all_gather_object(fingerprint)
        problems = []
        for rank, other in enumerate(prints[1:], start=1):
            for key in dict.fromkeys([*prints[0], *other]):
                if prints[0].get(key) != other.get(key):
                    problems.append(f"{key}: rank 0 has {prints[0].get(key)}, rank {rank} has {other.get(key)}")
        if problems:
            raise DistributedError(
                "the ranks' optimizers differ; every rank must build the same optimizer, with the same settings, "
                "on the same model with the same initial parameters (DistributedDataParallel broadcasts rank 0's):\n  "
                "- "
                + "\n  - ".join(problems)
            )


def unwrap_model(model: nn.Module, policy: str | None, owner: str) -> tuple[nn.Module, DistributedDataParallel | None]:
    """``(module to hook, DDP wrapper or None)``; ValueError for a wrapper the optimizer
    cannot communicate for (``owner``: the optimizer's name, for messages)."""
    if not isinstance(model, DistributedDataParallel):
        return model, None
    if policy is None and world_size() > 1:
        raise ValueError(
            f"the model is wrapped in DistributedDataParallel, but distributed=None: {owner} "
            "computes its own gradients and communicates itself; pass distributed='exact' or 'local'"
        )
    if model.static_graph:
        raise ValueError(
            "DistributedDataParallel(static_graph=True) all-reduces the gradients on its own schedule; "
            f"{owner} communicates itself: wrap the model without static_graph"
        )
    return model.module, model


def settings_fingerprint(
    optimizer: str,
    policy: str | None,
    param_groups: Sequence[dict[str, Any]],
    layers: Sequence[str],
    options: dict[str, Any],
) -> dict[str, str]:
    """The settings every rank must share, as text: the optimizer's type name, the policy,
    the param groups (hyper-parameters and shapes), the hooked layers' names, the method's
    public options and the initial parameter values (a digest)."""
    print_: dict[str, str] = {"optimizer": optimizer, "policy": str(policy)}
    for i, group in enumerate(param_groups):
        for key, value in group.items():
            if key != "params":
                print_[f"param group {i} {key}"] = describe(value)
        print_[f"param group {i} shapes"] = repr([tuple(p.shape) for p in group["params"]])
    print_["hooked layers"] = repr(list(layers))
    for key, value in options.items():
        print_[f"option {key}"] = describe(value)
    print_["initial parameter values (digest)"] = parameter_digest([p for g in param_groups for p in g["params"]])
    return print_


@contextmanager
def collective(kind: str, rank: int) -> Iterator[None]:
    """Run one collective of ``kind`` on ``rank``; its failure (a rank died, left early or
    passed the timeout) becomes a :class:`~gramopt.errors.CollectiveError` that every rank
    already knows of."""
    try:
        yield
    except Exception as err:
        error = CollectiveError(
            f"rank {rank}: {kind} failed ({type(err).__name__}: {err}); another rank probably "
            "died, raised outside gramopt's agreement, or passed the process group's timeout"
        )
        setattr(error, _AGREED, True)
        raise error from err


def _agreed(error: Exception) -> Exception:
    setattr(error, _AGREED, True)
    return error


def describe(value: Any) -> str:
    """A setting as text that is the same on every rank (no object addresses)."""
    if hasattr(value, "name") and isinstance(value.name, str) and not isinstance(value, type):
        return f"{type(value).__name__}({value.name})"
    if callable(value) and hasattr(value, "__qualname__"):
        return value.__qualname__
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def parameter_digest(params: Sequence[Tensor]) -> str:
    """A short hash of the parameters' values (bitwise)."""
    digest = hashlib.blake2b(digest_size=8)
    for p in params:
        digest.update(p.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
