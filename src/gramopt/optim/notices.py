"""The warnings every method shares: what the optimizer cannot precondition, and uses of
the training loop that change the step. Each says what happened, what the optimizer does
instead (the plain gradient: never a silently frozen parameter) and how to change it.
:class:`Notices` gives each once per optimizer (and parameter, where it names some).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at the
    first frame outside gramopt, torch and the optimizer's own methods (the user's
    ``opt.step()``), however many of torch.optim's wrappers (profiling hook, ``no_grad``)
    or overrides of a method defined outside gramopt lie between."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _internal(frame):
        frame, level = frame.f_back, level + 1
    return level


def _internal(frame: Any) -> bool:
    """A frame of gramopt, of torch, or of a method of an optimizer (``self`` one)."""
    if frame.f_globals.get("__name__", "").startswith(("gramopt.", "torch.")):
        return True
    return isinstance(frame.f_locals.get("self"), Optimizer)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def unsupported(owner: str, by_reason: dict[str, list[str]]) -> None:
    """Parameters no handler covers (``by_reason``: the reason ``unsupported="error"``
    would give -> their names); they follow the plain gradient."""
    _warn(
        f"gramopt: {owner} cannot precondition these parameters; they follow the plain "
        "gradient of the loss:\n  - "
        + "\n  - ".join(f"{', '.join(group)}: {reason}" for reason, group in by_reason.items())
        + "\n(register a handler for a module without one with gramopt.register_handler; pass "
        "unsupported='error' to refuse these parameters instead)"
    )


def tied_without_handler(owner: str, names: Sequence[str]) -> None:
    """Tied parameters that a module without a handler shares."""
    _warn(
        f"gramopt: {owner} cannot precondition the tied parameters {'; '.join(names)}: their "
        "per-sample rows need every module that uses them, so they follow the plain gradient of the loss "
        "(pass unsupported='error' to refuse them, or register a handler for that module with "
        "gramopt.register_handler)"
    )


def no_layer(owner: str) -> None:
    """The method preconditions no layer of the model at all."""
    _warn(
        f"gramopt: {owner} preconditions no layer of this model (none it supports has "
        "trainable parameters): every parameter follows the plain gradient, i.e. SGD"
    )


def escaped(owner: str, names: str) -> None:
    """Parameters the model uses outside the calls of the modules that own them."""
    _warn(
        f"gramopt: {owner} cannot precondition {names}: the model uses them outside the calls of "
        "the modules that own them (e.g. F.linear(h, tok.weight) for a tied head), which the hooks cannot see; "
        "they follow the plain gradient of the loss from now on (share the parameter between modules instead, "
        "head.weight = tok.weight, and call the modules, to precondition it)"
    )


def stray(names: Sequence[str]) -> None:
    """Parameters of a hooked module that received a gradient although the module's
    hooks recorded nothing (its weights were used without calling it)."""
    _warn(
        f"gramopt: {', '.join(names)} received a gradient, but the hooks of their module recorded "
        "nothing (its weights were used without calling the module, e.g. F.linear(x, layer.weight)); "
        "they follow the plain gradient of the loss"
    )


def modified_gradients(owner: str, names: Sequence[str], more: bool) -> None:
    """``.grad`` that the step ignores was changed after ``backward`` (clipping)."""
    _warn(
        f"gramopt: .grad of {', '.join(names)}{' ...' if more else ''} was modified after backward "
        f"(gradient clipping such as torch.nn.utils.clip_grad_norm_?), but {owner} computes "
        "the step of these layers from the per-sample gradients it captured and ignores their .grad: "
        "clipping .grad has no effect there; pass max_update_norm=... to clip the update instead"
    )


def unequal_micro_batches(sizes: Sequence[int]) -> None:
    """Micro-batches of unequal sizes accumulated by ``loss.backward()``."""
    _warn(
        f"gramopt: micro-batches of unequal sizes {list(sizes)} were accumulated with loss.backward(): the "
        "step (and .grad) is that of the concatenated batch only if each micro-batch's mean loss was "
        "multiplied by b_m / B (dividing by the number of micro-batches is exact for equal sizes "
        "only); opt.backward(output, target) weighs micro-batches exactly"
    )


class Notices:
    """The shared warnings of one optimizer (``owner``: its class name; ``names``: the
    parameters' full names by id), each given once."""

    def __init__(self, owner: str, names: dict[int, str]) -> None:
        self.owner, self.names = owner, names
        self._strays: set[str] = set()
        self._modified = False
        self._micro = False

    def stray_parameters(self, params: Sequence[Tensor]) -> None:
        """Parameters with a gradient that the method cannot precondition (their module
        recorded nothing): they follow the plain gradient. Once per parameter."""
        new = [n for n in (self.names.get(id(p), "?") for p in params) if n not in self._strays]
        if new:
            self._strays.update(new)
            stray(new)

    def uncovered(self, engine: Any, names: Sequence[str], tied: Sequence[str], has_params: bool) -> None:
        """The parameters no handler covers (``names``), tied parameters that a module
        without a handler shares (``tied``: the engine's ``tied_fallbacks``), and a model
        of which the method preconditions no layer at all (``has_params``: the optimizer
        has parameters)."""
        if tied:
            tied_without_handler(self.owner, tied)
        if names:
            by_reason: dict[str, list[str]] = {}  # the reason unsupported="error" would give, and its fix
            for name in names:
                by_reason.setdefault(engine.unsupported_reasons.get(name, "no gramopt handler"), []).append(name)
            unsupported(self.owner, by_reason)
        if not engine.layers and has_params:
            no_layer(self.owner)

    def escaped_parameters(self, names: str) -> None:
        """The capture engine found parameters used outside their modules' calls."""
        escaped(self.owner, names)

    def modified_gradients(self, engine: Any) -> None:
        """``.grad`` of a preconditioned layer, which the step ignores, changed since the
        backward pass left it (clipping). Once."""
        if self._modified or not engine.remembers_gradients():
            return
        changed = engine.modified_gradients([p for layer in engine.blocks for p in layer.params])
        if changed:
            self._modified = True
            modified_gradients(self.owner, [self.names.get(id(p), "?") for p in changed[:5]], len(changed) > 5)

    def micro_batches(self, engine: Any, own: int) -> None:
        """Micro-batches of unequal sizes accumulated by ``loss.backward()`` (``own``: how
        many the optimizer's ``backward`` saw, which weighs them exactly). Once."""
        if self._micro or not engine.accumulated():  # one micro-batch: nothing to compare
            return
        sizes = engine.micro_batch_sizes()
        if len(set(sizes)) > 1 and own != len(sizes):
            self._micro = True
            unequal_micro_batches(sizes)
