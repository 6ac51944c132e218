"""The capture engine: module hooks -> per-layer factors.

For every module with a registered handler the engine keeps a forward hook. During a
training forward pass (module in training mode, autograd enabled) the hook stores what
the handler asks for (usually the input) and registers a tensor hook on the module's
output, which receives the output-gradient of every backward pass that reaches it. A
tensor hook sees the gradient with respect to the output *as the layer produced it*,
also when a later in-place op (``ReLU(inplace=True)``) modifies that tensor.

Two ways of running backward passes feed the same hooks:

- the ordinary one, ``loss.backward()``: each layer gets one gradient per call; several
  backward calls before a step are summed, as ``.grad`` is;
- :meth:`CaptureEngine.backward_passes`: k passes with given output directions, as
  Gauss-Newton needs for k outputs; each layer gets ``[b, k, ...]``. These passes go
  only as deep as the layers' outputs, computing no weight gradients.

:meth:`CaptureEngine.factors` turns what was captured into one
:class:`~gramopt.capture.factors.LayerFactors` per layer. Hooks are removed by
:meth:`CaptureEngine.close`, which the optimizers call on ``close()`` and when they are
garbage-collected.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gramopt.capture.factors import LayerFactors
from gramopt.capture.handlers import LayerHandler, handler_for
from gramopt.errors import CaptureError, UnsupportedModuleError

_BATCHNORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
UNSUPPORTED_POLICIES = ("error", "gradient")
#: Modules whose forward uses the parameters of their submodules without calling them
#: (``F.multi_head_attention_forward`` reads ``out_proj.weight`` directly): a hook on such
#: a submodule never fires, so the container owns every parameter below it.
FUNCTIONAL_CONTAINERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


@dataclass
class _Call:
    """One forward call of a layer: what was saved and the gradients that reached it."""

    saved: Any
    output: Tensor | None  # dropped once its gradient arrived
    version: int
    grads: list[tuple[int, Tensor]] = field(default_factory=list)


@dataclass
class Layer:
    """A supported module, its handler and its trainable parameters (weight, bias, ...)."""

    name: str
    module: nn.Module
    handler: LayerHandler
    params: list[nn.Parameter]


class CaptureEngine:
    """Hooks on the supported layers of ``model`` covering the parameters ``params``.

    Args:
        model: the network.
        params: the parameters the optimizer updates; layers with none of them are
            not hooked.
        unsupported: ``"error"`` (default) raises :class:`UnsupportedModuleError` naming
            every module with parameters in ``params`` and no handler; ``"gradient"``
            leaves their parameters to the plain gradient (:attr:`plain_params`).
        layer_filter: optional ``module -> bool``; modules for which it returns False are
            not hooked and their parameters go to :attr:`plain_params` (a method that
            preconditions only some layer types, e.g. FNGD's Linear/Conv layers).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter],
        unsupported: str = "error",
        layer_filter: Callable[[nn.Module], bool] | None = None,
    ) -> None:
        if unsupported not in UNSUPPORTED_POLICIES:
            raise ValueError(f"unsupported must be one of {UNSUPPORTED_POLICIES}, got {unsupported!r}")
        wanted = {id(p) for p in params}
        self.layers: list[Layer] = []
        self.plain_params: list[nn.Parameter] = []
        problems: list[str] = []
        inside: list[str] = []  # prefixes of functional containers (their submodules are skipped)
        for name, module in model.named_modules():
            if any(name.startswith(prefix) for prefix in inside):
                continue
            if isinstance(module, FUNCTIONAL_CONTAINERS):
                inside.append(f"{name}." if name else "")
                own = [p for p in module.parameters() if id(p) in wanted]
            else:
                own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if isinstance(module, _BATCHNORM):
                if module.training:
                    problems.append(
                        f"{name or 'model'} ({type(module).__name__}) is in training mode: batch "
                        "statistics couple the samples of a batch, which breaks the per-sample math. "
                        "Replace it with nn.GroupNorm / nn.LayerNorm, or keep it in eval mode"
                    )
                    continue
            if not own:
                continue
            if layer_filter is not None and not layer_filter(module):
                self.plain_params.extend(own)
                continue
            handler = handler_for(module)
            if handler is None:
                if unsupported == "gradient":
                    self.plain_params.extend(own)
                    continue
                hint = (
                    ": its affine parameters are not supported; freeze them (requires_grad_(False))"
                    if isinstance(module, _BATCHNORM)
                    else ""
                )
                problems.append(f"{name or 'model'} ({type(module).__name__}) has no gramopt handler{hint}")
                continue
            try:
                handler.validate(module)
            except UnsupportedModuleError as err:
                if unsupported == "gradient":
                    self.plain_params.extend(own)
                    continue
                problems.append(f"{name or 'model'}: {err}")
                continue
            self.layers.append(Layer(name or type(module).__name__, module, handler, own))
        if problems:
            raise UnsupportedModuleError(
                "gramopt cannot handle these modules:\n  - "
                + "\n  - ".join(problems)
                + "\nSupported: Linear, Conv1d/Conv2d (groups=1), Embedding, LayerNorm, GroupNorm, "
                "RMSNorm; register others with gramopt.register_handler, or pass "
                "unsupported='gradient' to update them with the plain gradient."
            )
        self._calls: dict[int, list[_Call]] = {id(layer.module): [] for layer in self.layers}
        self._pass: int | None = None  # index of the current pass in backward_passes
        self._paused = False  # see paused()
        # Multiplies every captured output-gradient in factors(): the optimizer sets it to
        # 1 / loss scale for the step of a torch.amp.GradScaler-scaled backward pass.
        self.gradient_scale = 1.0
        self._backward_seen = False
        #: b of the last backward pass that reached a hooked layer (kept after clear()).
        self.last_batch_size: int | None = None
        self._handles: list[RemovableHandle] = []
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._make_hook(layer)))
        for module in model.modules():
            if isinstance(module, _BATCHNORM):
                self._handles.append(module.register_forward_pre_hook(_refuse_batchnorm_training))
        self.closed = False

    # -- hooks --------------------------------------------------------------------------
    def _make_hook(self, layer: Layer):
        calls = self._calls[id(layer.module)]
        engine_ref = self  # the hook lives on the model; close() removes it

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if module is not layer.module:  # a deep copy of the model carries the hooks along
                return
            if not (module.training and torch.is_grad_enabled()):
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if engine_ref._backward_seen:
                engine_ref._discard_stale()
            call = _Call(layer.handler.save(module, args, output), output, output._version)
            calls.append(call)
            # The hook lives in the output's autograd node (C++), which Python's GC cannot
            # see: a strong reference to the call (which holds the output) would make an
            # uncollectable cycle keeping every step's activations and gradients alive.
            call_ref = weakref.ref(call)

            def grad_hook(grad: Tensor) -> None:
                if engine_ref._paused:
                    return
                live = call_ref()
                if live is None:  # cleared (stale graph): nothing to record
                    return
                engine_ref._backward_seen = True
                engine_ref.last_batch_size = grad.shape[0]
                live.grads.append((engine_ref._pass if engine_ref._pass is not None else -1, grad.detach()))
                # Holding the output while its gradient flows back made the backward pass of
                # a small CNN ~1.6-2x slower (convolution and ReLU backward, measured on CPU);
                # it is only needed as a target of backward_passes, which keep their own list.
                live.output = None

            output.register_hook(grad_hook)

        return forward_hook

    def _discard_stale(self) -> None:
        """A forward after a backward without step(): the earlier factors are dropped."""
        if any(call.grads for calls in self._calls.values() for call in calls):
            warnings.warn(
                "gramopt: a new forward pass started after a backward pass without step(); the "
                "factors of the earlier backward were discarded (gradient accumulation over several "
                "backward passes is not supported: call step() after each backward)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.clear()

    # -- passes -------------------------------------------------------------------------
    def backward_passes(
        self,
        outputs: Tensor,
        directions: Sequence[Tensor],
        inputs: Sequence[Tensor] = (),
        retain_graph: bool = True,
    ) -> list[tuple[Tensor | None, ...]]:
        """Run one backward pass of ``outputs`` per direction (``grad_outputs``). Each
        captured layer then holds ``[b, len(directions), ...]``.

        Args:
            outputs: what to differentiate (model outputs, or a scalar loss).
            directions: one ``grad_outputs`` per pass, each shaped like ``outputs``.
            inputs: further tensors (e.g. :attr:`plain_params`) whose gradients the same
                passes compute, so that no second backward pass is needed for them.
            retain_graph: keep the graph after the last pass (earlier passes always keep it).

        Returns:
            per pass, the gradients of ``inputs`` (None where one is not reached).
        """
        targets = self._traversal_targets()
        inputs = list(inputs)
        if not targets and (self.layers or not inputs):
            raise CaptureError(
                "no supported layer was recorded in the forward pass: call the optimizer's backward "
                "on outputs computed in training mode with autograd enabled"
            )
        results = []
        try:
            for index, direction in enumerate(directions):
                self._pass = index
                grads = torch.autograd.grad(
                    outputs,
                    targets + inputs,
                    grad_outputs=direction,
                    retain_graph=retain_graph or index < len(directions) - 1,
                    allow_unused=True,
                )
                results.append(tuple(grads[len(targets) :]))
        finally:
            self._pass = None
        return results

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes inside this block record nothing (e.g. a method's own pass
        for the loss gradient after its Jacobian passes)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _traversal_targets(self) -> list[Tensor]:
        """What the passes differentiate for: the layers' outputs (no weight gradients),
        or, if an in-place op changed one of them, the layers' parameters."""
        calls = [call for calls in self._calls.values() for call in calls]
        if all(call.output is not None and call.output._version == call.version for call in calls):
            return [call.output for call in calls]
        return [p for layer in self.layers for p in trainable(layer)]

    # -- factors ------------------------------------------------------------------------
    def factors(self, scale: float = 1.0, dtype: torch.dtype | None = None) -> dict[str, LayerFactors]:
        """One :class:`LayerFactors` per layer that took part in the last backward and
        has a parameter that requires grad now (covering those only: a parameter frozen
        after the optimizer was built is left alone, as torch.optim leaves a parameter
        without ``.grad``).

        Args:
            scale: multiplies every captured output-gradient (e.g. b, to turn the
                gradients of a mean loss into per-sample loss gradients).
            dtype: compute dtype (default: the gradients' dtype, at least float32).
        """
        scale = scale * self.gradient_scale
        out: dict[str, LayerFactors] = {}
        batch = None
        for layer in self.layers:
            calls = [c for c in self._calls[id(layer.module)] if c.grads]
            params = trainable(layer)
            if not calls or not params:
                continue
            grads = [self._stack(c.grads) for c in calls]
            target = dtype or torch.promote_types(grads[0].dtype, torch.float32)
            if scale != 1.0:
                grads = [g.to(target) * scale for g in grads]
            elif grads[0].dtype != target or len(grads) > 1:
                grads = [g.to(target) for g in grads]
            b = grads[0].shape[0]
            if b == 0:
                raise ValueError(f"empty batch: layer {layer.name} saw 0 samples")
            if batch is None:
                batch = b
            elif b != batch:
                raise CaptureError(
                    f"layer {layer.name} saw a batch of {b} samples, an earlier layer {batch}: every "
                    "layer must see the same leading batch dimension"
                )
            out[layer.name] = layer.handler.factors(layer.module, params, [c.saved for c in calls], grads)
        return out

    @staticmethod
    def _stack(grads: list[tuple[int, Tensor]]) -> Tensor:
        """Ordinary backward calls (index -1) are summed; passes are stacked: ``[b, k, ...]``."""
        if len(grads) == 1:  # one ordinary backward or one pass (the common case)
            return grads[0][1].unsqueeze(1)
        passes = sorted(((i, g) for i, g in grads if i >= 0), key=lambda pair: pair[0])
        ordinary = [g for i, g in grads if i < 0]
        if len(passes) == 1:
            return passes[0][1].unsqueeze(1)
        if passes:
            return torch.stack([g for _, g in passes], dim=1)
        total = ordinary[0]
        for g in ordinary[1:]:
            total = total + g
        return total.unsqueeze(1)

    def batch_size(self) -> int | None:
        """b, the leading dimension of the captured output-gradients (None before any
        backward pass reached a layer). Methods that turn the gradients of a mean loss
        into per-sample gradients need it before :meth:`factors` (``scale=b``)."""
        for calls in self._calls.values():
            for call in calls:
                if call.grads:
                    return int(call.grads[0][1].shape[0])
        return None

    # -- data parallelism (gramopt.distributed's exact policy) -----------------------------
    def capture_tensors(self) -> tuple[list[Tensor], list[bool], str]:
        """Everything captured since the last clear, as tensors with the batch first.

        Returns:
            per layer (in order) and per forward call that got gradients: its saved
            tensor, then its output-gradients; per tensor whether it is an
            output-gradient; and the layout (layer names, calls, passes) that a
            replacement must keep.
        """
        tensors: list[Tensor] = []
        is_grad: list[bool] = []
        layout = []
        for layer in self.layers:
            calls = [c for c in self._calls[id(layer.module)] if c.grads]
            layout.append(f"{layer.name}:" + ",".join(str([i for i, _ in c.grads]) for c in calls))
            for call in calls:
                if not isinstance(call.saved, Tensor):
                    raise CaptureError(
                        f"layer {layer.name}: its handler saved a {type(call.saved).__name__}; distributed='exact' "
                        "gathers what handlers save as tensors with a leading batch dimension"
                    )
                tensors.append(call.saved)
                is_grad.append(False)
                for _, grad in call.grads:
                    tensors.append(grad)
                    is_grad.append(True)
        return tensors, is_grad, "|".join(layout)

    def replace_capture_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Put ``tensors``, laid out as :meth:`capture_tensors` returned them (e.g. every
        rank's rows of them), in place of the captures; no more passes can run."""
        supply = iter(tensors)
        for layer in self.layers:
            calls = self._calls[id(layer.module)]
            calls[:] = [c for c in calls if c.grads]
            for call in calls:
                call.saved = next(supply)
                call.output = None
                call.grads = [(index, next(supply)) for index, _ in call.grads]

    def uncalled_params(self) -> list[nn.Parameter]:
        """Trainable parameters of hooked layers whose module recorded no training forward
        call since the last clear. A backward pass may still reach them when the model
        uses their weights without calling the module (``F.linear(x, fc.weight)``):
        methods differentiate for them too, so that they are not silently frozen."""
        return [p for layer in self.layers if not self._calls[id(layer.module)] for p in trainable(layer)]

    def stray_params(self) -> list[nn.Parameter]:
        """Trainable parameters with a ``.grad`` whose hooked layer captured no
        output-gradient since the last clear: their module's forward was bypassed, so the
        sample-space math has nothing for them. They follow the plain gradient. Empty
        when no layer captured anything (a forward in eval mode: a clear error elsewhere)."""
        uncaptured = [layer for layer in self.layers if not _captured(self._calls[id(layer.module)])]
        if not uncaptured or len(uncaptured) == len(self.layers):  # all captured, or none (eval mode)
            return []
        return [p for layer in uncaptured for p in trainable(layer) if p.grad is not None]

    def has_factors(self) -> bool:
        for calls in self._calls.values():
            for call in calls:
                if call.grads:
                    return True
        return False

    def clear(self) -> None:
        """Drop everything captured (after a step, or to start over)."""
        for calls in self._calls.values():
            calls.clear()
        self._backward_seen = False

    def close(self) -> None:
        """Remove every hook; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
        self.closed = True


def _captured(calls: list[_Call]) -> bool:
    """Whether any of a layer's forward calls received an output-gradient."""
    for call in calls:
        if call.grads:
            return True
    return False


def trainable(layer: Layer) -> list[nn.Parameter]:
    """The layer's parameters that require grad now (all of them unless some were frozen
    after the optimizer was built)."""
    return [p for p in layer.params if p.requires_grad]


def _refuse_batchnorm_training(module: nn.Module, args: tuple) -> None:
    if module.training and torch.is_grad_enabled():
        raise UnsupportedModuleError(
            f"{type(module).__name__} ran in training mode under a gramopt optimizer: batch "
            "statistics couple the samples of a batch, which breaks the per-sample math. Replace it "
            "with nn.GroupNorm / nn.LayerNorm, or keep BatchNorm layers in eval mode (module.eval())"
        )
