"""Several torch optimizers over disjoint parameters, driven as one.

Peers whose package covers only some parameters (torch's Muon takes 2-D weights only;
singd's SINGD takes Linear and Conv2d layers only) train the rest with a second
optimizer, as their documentation says; :class:`Chain` lets the training loop, the
checkpoint and the learning-rate schedules treat the pair as one optimizer.
"""

from __future__ import annotations

from typing import Any

import torch


class Chain(torch.optim.Optimizer):
    """``step``/``zero_grad``/``state_dict`` of each optimizer in ``optimizers``, in order.

    ``param_groups`` is the concatenation of theirs (the same dictionaries), so a
    learning-rate scheduler on the chain scales every group of every optimizer.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("Chain needs at least one optimizer")
        seen: set[int] = set()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter is in two optimizers of a Chain")
                    seen.add(id(p))
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        return {key: value for optimizer in self.optimizers for key, value in optimizer.state.items()}

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        states = state_dict.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(
                f"expected the states of {len(self.optimizers)} chained optimizers, got {state_dict!r:.80}"
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return "Chain(" + ", ".join(type(o).__name__ for o in self.optimizers) + ")"
