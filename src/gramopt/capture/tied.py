"""Factors of a *tied block*: hooked layers that share a parameter (weight tying).

When modules share a parameter (a GPT's head and token embedding, ``b.weight =
a.weight``), that parameter's per-sample row is the *sum* of the modules' contributions.
With members l = 1..L, each with its own factors U_l ``[n, p_l]`` over the parameters it
covers, the block's U over the union of their parameters (``[n, p]``, each parameter
once) is

    U = sum_l U_l E_l                  (E_l ``[p_l, p]`` puts member l's columns in place)

so that, for the parameters S_lm both members l and m cover,

    K = U U^T = sum_l K_l + sum_{l != m} U_l[:, S_lm] U_m[:, S_lm]^T.

The cross blocks come from the members' structure where one knows a cheaper form
(:meth:`~gramopt.capture.factors.LayerFactors.cross_gram`, e.g. two Linear layers sharing
their weight: ``(Z_l Z_m^T) * (X_l X_m^T)``), otherwise exactly from the members'
columns (:meth:`~gramopt.capture.factors.LayerFactors.columns`), formed in chunks of at
most :data:`~gramopt.capture.factors.CHUNK_ELEMENTS` entries. Products with U are the
members' products: ``U^T a`` sums the members' parameter-shaped results per parameter,
``U v`` sums ``U_l E_l v``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.factors import CHUNK_ELEMENTS, ExplicitFactors, LayerFactors
from gramopt.capture.handlers import LayerHandler


class TiedModules:
    """The modules of a tied block, each with the parameters it covers (the ``module``
    of the block's :class:`~gramopt.capture.engine.Layer` and of its factors; not an
    ``nn.Module`` of the model)."""

    def __init__(self, members: Sequence[tuple[nn.Module, list[nn.Parameter]]]) -> None:
        self.members = list(members)

    def __repr__(self) -> str:
        return f"TiedModules({', '.join(type(m).__name__ for m, _ in self.members)})"


class TiedHandler(LayerHandler):
    """The handler of a tied block: its members' own handlers build their factors from
    their own captures; :meth:`factors` joins them (``saved``: the members' factors,
    ``grads``: unused)."""

    def factors(self, module, params, saved, grads):
        return TiedFactors(module, params, saved)


def _contains(params: Sequence[nn.Parameter], p: nn.Parameter) -> bool:
    return any(p is q for q in params)


class TiedFactors(LayerFactors):
    """``U = sum_l U_l E_l`` over members' factors (module doc).

    Args:
        module: the :class:`TiedModules` of the block.
        params: the union of the members' parameters, each once, in the block's order.
        members: the members' factors (``[n, p_l]`` each, the same n), each covering a
            subset of ``params``.
        indices: each member's position in ``module.members`` (default: in order), kept
            in :meth:`state` so a cached block is rebuilt with its members' modules.
    """

    form = "tied"

    def __init__(
        self,
        module: TiedModules,
        params: list[nn.Parameter],
        members: Sequence[LayerFactors],
        indices: Sequence[int] | None = None,
    ) -> None:
        if not members:
            raise ValueError("internal: a tied block needs at least one member's factors")
        rows = {m.num_rows for m in members}
        if len(rows) != 1:
            raise ValueError(f"internal: the members of a tied block have different numbers of rows {sorted(rows)}")
        self.module = module
        self.params = params
        self.members = list(members)
        self.indices = list(range(len(members))) if indices is None else list(indices)
        self.num_rows = rows.pop()
        position = {id(p): i for i, p in enumerate(params)}
        #: per member, the position in ``params`` of each of its parameters
        self.slots = [[position[id(p)] for p in m.params] for m in self.members]
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())

    def _dtype_source(self) -> Tensor:
        return self.members[0]._dtype_source()

    def tensors(self) -> list[Tensor]:
        return [t for m in self.members for t in m.tensors()]

    # -- the Gram ------------------------------------------------------------------------
    def gram(self) -> Tensor:
        """``sum_l K_l`` plus the cross blocks of every pair sharing a parameter, ``[n, n]``."""
        gram = self.members[0].gram()
        for member in self.members[1:]:
            gram = gram + member.gram()
        for a, b, shared in self.shared_pairs():
            cross = self.cross_block(a, b, shared)
            gram = gram + cross + cross.T
        return gram

    def shared_pairs(self) -> Iterator[tuple[int, int, list[nn.Parameter]]]:
        """``(l, m, S_lm)`` for every pair l < m of members covering common parameters."""
        for a in range(len(self.members)):
            for b in range(a + 1, len(self.members)):
                shared = [p for p in self.members[a].params if _contains(self.members[b].params, p)]
                if shared:
                    yield a, b, shared

    def cross_block(self, a: int, b: int, shared: list[nn.Parameter]) -> Tensor:
        """``U_a[:, S] U_b[:, S]^T`` ``[n, n]`` for the parameters S both cover: by the
        members' structure (either side's :meth:`LayerFactors.cross_gram`), else from their
        columns in chunks."""
        first, second = self.members[a], self.members[b]
        cross = first.cross_gram(second, shared)
        if cross is not None:
            return cross
        cross = second.cross_gram(first, shared)
        if cross is not None:
            return cross.T
        return columns_cross_gram(first, second, shared)

    # -- products ------------------------------------------------------------------------
    def rmatvec(self, coeffs: Tensor) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(self.params)
        for member, slots in zip(self.members, self.slots, strict=True):
            for slot, part in zip(slots, member.rmatvec(coeffs), strict=True):
                out[slot] = part if out[slot] is None else out[slot] + part
        return [
            t if t is not None else torch.zeros_like(p, dtype=self.dtype) for t, p in zip(out, self.params, strict=True)
        ]

    def matvec(self, vectors: Sequence[Tensor]) -> Tensor:
        out = None
        for member, slots in zip(self.members, self.slots, strict=True):
            part = member.matvec([vectors[s] for s in slots])
            out = part if out is None else out + part
        return out

    # -- rows and columns ----------------------------------------------------------------
    def _scatter_rows(self, parts: Sequence[Tensor]) -> Tensor:
        """``sum_l R_l E_l`` for per-member rows ``R_l`` ``[m, p_l]``, ``[m, p]``."""
        rows = parts[0].new_zeros(parts[0].shape[0], self.offsets[-1])
        for part, member, slots in zip(parts, self.members, self.slots, strict=True):
            start = 0
            for slot, p in zip(slots, member.params, strict=True):
                rows[:, self.offsets[slot] : self.offsets[slot + 1]] += part[:, start : start + p.numel()]
                start += p.numel()
        return rows

    def per_sample(self) -> Tensor:
        return self._scatter_rows([m.per_sample() for m in self.members])

    def row_block(self, i0: int, i1: int) -> Tensor:
        return self._scatter_rows([m.row_block(i0, i1) for m in self.members])

    def columns(self, index: Tensor) -> Tensor:
        """``U[:, index]`` ``[n, q]``: each member's columns of the parameters it covers, summed."""
        out = torch.zeros(self.num_rows, index.numel(), dtype=self.dtype, device=index.device)
        for member, slots in zip(self.members, self.slots, strict=True):
            where, local, start = [], [], 0
            for slot, p in zip(slots, member.params, strict=True):
                lo, hi = self.offsets[slot], self.offsets[slot + 1]
                mask = (index >= lo) & (index < hi)
                if mask.any():
                    where.append(mask.nonzero().view(-1))
                    local.append(index[mask] - lo + start)
                start += p.numel()
            if where:
                out.index_add_(1, torch.cat(where), member.columns(torch.cat(local)).to(out.dtype))
        return out

    # -- structure the methods use -------------------------------------------------------
    def held_numel(self) -> float:
        return sum(m.held_numel() for m in self.members)

    def compact(self) -> LayerFactors:
        """The explicit rows when smaller, else the block of the members' compact forms."""
        if self.num_rows * self.num_params <= self.held_numel():
            return ExplicitFactors(self.module, self.params, self.per_sample())
        return TiedFactors(self.module, self.params, [m.compact() for m in self.members], self.indices)

    def pass_block(self, samples: int, passes: int, keep: int) -> LayerFactors:
        blocks = [m.pass_block(samples, passes, keep) for m in self.members]
        return TiedFactors(self.module, self.params, blocks, self.indices)

    def state(self) -> dict[str, Any]:
        return {
            "form": "tied",
            "members": [{"member": i, **m.state()} for i, m in zip(self.indices, self.members, strict=True)],
        }

    @classmethod
    def _from_state(cls, module: nn.Module, params: list[nn.Parameter], state: dict[str, Any]) -> LayerFactors:
        if not isinstance(module, TiedModules):
            raise ValueError("cached tied factors need the tied block's modules")
        members, indices = [], []
        for entry in state["members"]:
            member, covered = module.members[entry["member"]]
            own = [p for p in covered if _contains(params, p)]
            members.append(LayerFactors.from_state(member, own, entry))
            indices.append(entry["member"])
        return cls(module, params, members, indices)


def columns_cross_gram(first: LayerFactors, second: LayerFactors, shared: Sequence[nn.Parameter]) -> Tensor:
    """``U_1[:, S] U_2[:, S]^T`` ``[n, n]`` from the members' columns of the shared
    parameters S, forming at most :data:`CHUNK_ELEMENTS` entries of each at once."""
    n = first.num_rows
    dtype = torch.promote_types(first.dtype, second.dtype)
    out = None
    chunk = max(1, CHUNK_ELEMENTS // max(1, n))
    for p in shared:
        lo1, lo2 = _offset(first, p), _offset(second, p)
        for c0 in range(0, p.numel(), chunk):
            span = torch.arange(c0, min(p.numel(), c0 + chunk), device=p.device)
            left = first.columns(span + lo1).to(dtype)
            right = second.columns(span + lo2).to(dtype)
            out = left @ right.T if out is None else out.addmm_(left, right.T)
    return out


def _offset(factors: LayerFactors, p: nn.Parameter) -> int:
    """Where ``p``'s columns start in the factors' flat parameter order."""
    start = 0
    for q in factors.params:
        if q is p:
            return start
        start += q.numel()
    raise ValueError("internal: the parameter is not covered by these factors")
