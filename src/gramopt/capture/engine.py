"""The capture engine: module hooks -> per-layer factors.

For every module with a registered handler the engine keeps a forward hook. During a
training forward pass (module in training mode, autograd enabled) the hook stores what
the handler asks for (usually the input) and registers a tensor hook on the module's
output, which receives the output-gradient of every backward pass that reaches it. A
tensor hook sees the gradient with respect to the output *as the layer produced it*,
also when a later in-place op (``ReLU(inplace=True)``) modifies that tensor.

Two ways of running backward passes feed the same hooks:

- the ordinary one, ``loss.backward()``: each layer gets one gradient per call; several
  backward calls of one forward pass before a step are summed, as ``.grad`` is;
- :meth:`CaptureEngine.backward_passes`: k passes with given output directions, as
  Gauss-Newton needs for k outputs; each layer gets ``[b, k, ...]``. These passes go
  only as deep as the layers' outputs, computing no weight gradients.

Gradient accumulation: a forward pass that starts after a backward pass (without a step
in between) opens a new *micro-batch*. :meth:`CaptureEngine.factors` concatenates the
micro-batches along the batch dimension (each layer's i-th call of every micro-batch,
saved inputs and output-gradients alike), so the factors are those of the concatenated
batch. Each micro-batch's backward must come before the next micro-batch's forward.

:meth:`CaptureEngine.factors` turns what was captured into one
:class:`~gramopt.capture.factors.LayerFactors` per layer, except that layers sharing a
parameter (weight tying) are one block (:attr:`CaptureEngine.blocks`,
:mod:`gramopt.capture.tied`). At the model's first training forward the engine checks
that the graph uses each preconditioned parameter only inside its modules' calls
(:meth:`CaptureEngine.audit_uses`). Hooks are removed by
:meth:`CaptureEngine.close`, which the optimizers call on ``close()`` and when they are
garbage-collected.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gramopt.capture import uses
from gramopt.capture.factors import LayerFactors, LowRankLayout
from gramopt.capture.handlers import LayerHandler
from gramopt.capture.registry import handler_for
from gramopt.capture.tied import TiedFactors, TiedHandler, TiedModules
from gramopt.errors import CaptureError, UnsupportedModuleError

UNSUPPORTED_POLICIES = ("error", "gradient")
#: Layers whose feed-forward Linear layers see ``[T, b, d]`` unless built with
#: ``batch_first=True``: covered as a whole by the unsupported-parameter policy then.
_SEQUENCE_FIRST_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: What makes a model's BatchNorm layers per-sample exact, for the methods that refuse them in training mode.
_COUPLING_REMEDY = (
    "use SENG or FNGD, nn.GroupNorm / nn.LayerNorm, or keep BatchNorm layers in eval mode (module.eval())"
)


@dataclass(frozen=True)
class Wording:
    """How the engine's refusals address the user of the method that owns it.

    Attributes:
        method: the method's name (``"GGN"``), for the messages that say whose choice a
            refusal is.
        fallback: the method's own ``unsupported`` value that lets the parameters the
            engine cannot cover go on without it, and what then happens to them, worded to
            follow ``"pass"``: ``"unsupported='gradient' to update them with the plain
            gradient"``. A refusal names it only where it is not in force already and would
            help (never for BatchNorm in training mode under GGN).
    """

    method: str = "this method"
    fallback: str = "unsupported='gradient' to update them with the plain gradient"


@dataclass
class _Call:
    """One forward call of a layer: what was saved and the gradients that reached it."""

    saved: Any
    output: Tensor | None  # dropped once its gradient arrived
    version: int
    grads: list[tuple[int, Tensor]] = field(default_factory=list)
    micro: int = 0  # the micro-batch (gradient accumulation) it belongs to
    scale: float = 1.0  # multiplies its output-gradients (see CaptureEngine.scale_captured)
    skipped: bool = False  # the layer ran, but capture_filter said its step needs no capture
    nodes: tuple[Any, list[Any]] | None = None  # (its output's node, its inputs' nodes) for audit_uses


class CallFactors(NamedTuple):
    """The factors of one forward call (:meth:`CaptureEngine.factors_per_call`): ``passes``,
    the indices of the passes that reached it, in order; ``factors``, their rows."""

    passes: tuple[int, ...]
    factors: LayerFactors


@dataclass
class Layer:
    """A supported module, its handler and its trainable parameters (weight, bias, ...).

    A *tied block* (:attr:`CaptureEngine.blocks`) is a Layer too: the hooked layers that
    share a parameter (``members``), its module a :class:`~gramopt.capture.tied.TiedModules`,
    its params the union of theirs, each once."""

    name: str
    module: nn.Module
    handler: LayerHandler
    params: list[nn.Parameter]
    members: list[Layer] = field(default_factory=list)
    #: The model's module the layer belongs to, when ``module`` is a proxy its handler
    #: hooks in its place (:attr:`LayerHandler.proxy_name`: an attention's in-projection).
    owner: nn.Module | None = None

    def low_rank_layout(self) -> LowRankLayout | None:
        """How the layer's rows factor as ``vec(G_r^T A_r)`` (SENG's implicit layers), from
        its handler (:meth:`LayerHandler.low_rank_layout`); None for a tied block."""
        return self.handler.low_rank_layout(self.module, self.params)


@dataclass
class _Use:
    """A module among those whose own parameters include one being covered (tie analysis
    in :meth:`CaptureEngine.add_params`)."""

    module: nn.Module
    label: str
    status: str  # "hooked", "filtered" (the method's layer_filter said no) or "refused"
    name: str = ""
    handler: LayerHandler | None = None


class CaptureEngine:
    """Hooks on the supported layers of ``model`` covering the parameters ``params``.

    Args:
        model: the network.
        params: the parameters the optimizer updates; layers with none of them are
            not hooked.
        unsupported: ``"gradient"`` (default) leaves the parameters no handler covers to
            the plain gradient (:attr:`plain_params`, their full names in
            :attr:`unsupported_names`, for the optimizer's warning); ``"error"`` raises
            :class:`UnsupportedModuleError` naming each of them.
        layer_filter: optional ``module -> bool``; modules for which it returns False are
            not hooked and their parameters go to :attr:`plain_params` (a method that
            preconditions only some layer types, e.g. FNGD's Linear/Conv layers; not
            a fallback, so not in :attr:`unsupported_names`).
        batchnorm_training: whether BatchNorm layers may run in training mode (SENG, FNGD:
            per-sample rows whose sum is the batch gradient); False (GGN) refuses them
            at construction and at every training-mode forward.
        wording: the owning method's name and ``unsupported`` vocabulary, for the
            refusals' hints (:class:`Wording`).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter],
        unsupported: str = "gradient",
        layer_filter: Callable[[nn.Module], bool] | None = None,
        batchnorm_training: bool = True,
        wording: Wording | None = None,
    ) -> None:
        if unsupported not in UNSUPPORTED_POLICIES:
            raise ValueError(f"unsupported must be one of {UNSUPPORTED_POLICIES}, got {unsupported!r}")
        self.model = model
        self.unsupported = unsupported
        self.layer_filter = layer_filter
        self.batchnorm_training = batchnorm_training
        self.wording = wording or Wording()
        self.layers: list[Layer] = []
        #: The units the methods precondition: each hooked layer, except that layers sharing
        #: a parameter (weight tying) are joined into one block (:class:`Layer` with members).
        self.blocks: list[Layer] = []
        self.plain_params: list[nn.Parameter] = []
        #: Full names of the parameters no handler covers (they follow the plain gradient).
        self.unsupported_names: list[str] = []
        #: Why each of :attr:`unsupported_names` is not covered (the reason
        #: ``unsupported="error"`` would give), for the optimizer's warning.
        self.unsupported_reasons: dict[str, str] = {}
        #: Why tied parameters follow the plain gradient: a module sharing them has no
        #: handler (or one that refuses it), so no hook sees that use (one line each).
        self.tied_fallbacks: list[str] = []
        self._calls: dict[int, list[_Call]] = {}
        self._handles: list[RemovableHandle] = []
        self._grad_handles: list[RemovableHandle] = []
        self._attached: list[tuple[nn.Module, LayerHandler]] = []  # modules rerouted through a proxy
        self._grad_versions: dict[int, tuple[int, int]] = {}  # id(p) -> (id(p.grad), version)
        self._pass: int | None = None  # index of the current pass in backward_passes
        self._paused = False  # see paused()
        # Multiplies every captured output-gradient in factors(): the optimizer sets it to
        # 1 / loss scale for the step of a torch.amp.GradScaler-scaled backward pass.
        self.gradient_scale = 1.0
        self._backward_seen = False
        self._micro = 0  # the current micro-batch (see the module docstring)
        self._scaled = False  # whether scale_captured scaled a capture since the last clear
        #: b of the last backward pass that reached a hooked layer (kept after clear()).
        self.last_batch_size: int | None = None
        #: Optional ``layer -> bool`` asked at each training forward call of a layer: False
        #: records only that the layer ran (no saved input, no gradient hook), for a step
        #: that will not read this layer's factors (SENG between curvature refreshes).
        self.capture_filter: Callable[[Layer], bool] | None = None
        #: Record forward calls of modules in eval mode too (autograd still required). For a
        #: method whose own step runs the forward passes it reads (GaussNewton's residual
        #: closure), so that the module's training flag does not matter; the methods that
        #: read what the user's training forward captured leave it off (an evaluation pass
        #: with autograd on is not theirs to record).
        self.capture_in_eval = False
        #: Called with one line naming the parameters :meth:`audit_uses` found used outside
        #: their modules' calls (they follow the plain gradient from then on), for a warning.
        self.on_escaped: Callable[[str], None] | None = None
        #: Full names of those parameters.
        self.escaped_names: list[str] = []
        self._audit_pending = True  # audit_uses at the next training forward of the model
        self.closed = False
        self._handles.append(model.register_forward_hook(self._make_audit_hook()))
        try:
            self.add_params(params)
        except BaseException:  # a refusal leaves no hook on the model
            self.close()
            raise
        if not batchnorm_training:
            refuse = functools.partial(_refuse_batchnorm_training, self.wording.method)
            for module in model.modules():
                if _couples_samples(module):
                    self._handles.append(module.register_forward_pre_hook(refuse))

    def add_params(self, params: Iterable[nn.Parameter]) -> list[str]:
        """Cover ``params`` too (``add_param_group``): hook the layers they belong to.

        Returns:
            the full names of those among them that no handler covers (they follow
            the plain gradient); raises :class:`UnsupportedModuleError` naming them
            instead under ``unsupported="error"``, changing nothing.

        A parameter several modules own (weight tying) is preconditioned once, by the block
        of the hooked layers sharing it (:attr:`blocks`). If the method's ``layer_filter``
        leaves out some of those modules, they are hooked for the shared parameter alone;
        if one of them cannot be hooked at all (no handler), the parameter follows the plain
        gradient (:attr:`tied_fallbacks`), or is refused under ``unsupported="error"``.
        """
        model = self.model
        wanted = {id(p) for p in params}
        names = {id(p): n for n, p in model.named_parameters()}
        known = {id(layer.module): layer for layer in self.layers}
        new_layers: list[Layer] = []
        extended: list[tuple[Layer, list[nn.Parameter]]] = []
        plain: list[nn.Parameter] = []
        unsupported: list[str] = []
        reasons: dict[str, str] = {}  # of the unsupported ones
        problems: list[str] = []
        fallback_helps = False  # whether the policy's fallback would take some of the problems
        inside: list[str] = []  # prefixes of modules refused as a whole (their submodules are skipped)
        proxies: list[tuple[nn.Module, LayerHandler, nn.Module]] = []  # attached once nothing was refused
        uses: dict[int, list[_Use]] = {}  # id(p) -> the modules owning p (weight tying when several)
        owned: dict[int, nn.Parameter] = {}

        def used(own: list[nn.Parameter], use: _Use) -> None:
            for q in own:
                uses.setdefault(id(q), []).append(use)
                owned[id(q)] = q

        for name, module in model.named_modules():
            if any(name.startswith(prefix) for prefix in inside):
                continue
            label = f"{name or 'model'} ({type(module).__name__})"
            handler = handler_for(module)
            proxied = handler is not None and handler.proxy_name is not None
            reason = _sequence_first_refusal(module, label)
            if reason is None and proxied:  # refused: its own forward does not call its submodules
                reason = self._refusal(module, handler, label)
            if reason is not None:  # every parameter below it follows the policy
                inside.append(f"{name}." if name else "")
                own = [p for p in module.parameters() if id(p) in wanted]
            else:
                own = [p for p in module.parameters(recurse=False) if id(p) in wanted]
            if not own:
                continue
            if reason is None:
                if handler is not None and self.layer_filter is not None and not self.layer_filter(module):
                    plain.extend(own)  # the method's own choice, not a fallback: no warning
                    # (a proxy is not pulled into a tie)
                    status = "filtered" if not proxied and self._refusal(module, handler, label) is None else "refused"
                    used(own, _Use(module, label, status, name or type(module).__name__, handler))
                    continue
                reason = self._refusal(module, handler, label)
            used(own, _Use(module, label, "hooked" if reason is None else "refused"))
            if reason is not None:
                full = [names.get(id(p), "?") for p in own]
                coupled = self._coupled_in_training(module)  # refused under either policy
                if self.unsupported == "gradient" and not coupled:
                    plain.extend(own)
                    unsupported.extend(full)
                    reasons.update(dict.fromkeys(full, reason))
                else:
                    problems.append(f"{', '.join(full)}: {reason}")
                    fallback_helps = fallback_helps or not coupled
                continue
            target, owner, layer_name = module, None, name or type(module).__name__
            if proxied:  # the layer is the proxy, named after the module
                target, owner = handler.proxy(module), module
                layer_name = f"{name}.{handler.proxy_name}" if name else handler.proxy_name
            if id(target) in known:
                extended.append((known[id(target)], own))
            else:
                if proxied:
                    proxies.append((module, handler, target))
                new_layers.append(Layer(layer_name, target, handler, own, owner=owner))
        tied_plain, tied_notes = self._resolve_ties(uses, owned, names, new_layers, extended, plain, known)
        if self.unsupported == "error":
            problems.extend(f"{note}: tied parameters need every use hooked" for note in tied_notes)
            fallback_helps = fallback_helps or bool(tied_notes)
        if problems:
            remedy = ""  # (BatchNorm in training mode: its own line says what helps)
            if fallback_helps:
                remedy = (
                    f"; register others with gramopt.register_handler, or pass {self.wording.fallback} "
                    "(with a warning naming them)"
                )
            raise UnsupportedModuleError(
                "gramopt cannot precondition these parameters:\n  - "
                + "\n  - ".join(problems)
                + "\nSupported: Linear, Conv1d/2d/3d (any groups), ConvTranspose1d/2d/3d, Embedding, "
                "MultiheadAttention, LayerNorm, GroupNorm, RMSNorm, BatchNorm (training mode: SENG, FNGD, "
                f"GaussNewton; eval mode: every method){remedy}."
            )
        for layer, own in extended:
            layer.params.extend(p for p in own if all(p is not q for q in layer.params))
            layer.params.sort(key=_canonical_order(layer))
        for module, handler, proxy in proxies:  # only now: a refusal above changes nothing
            self._attached.append((module, handler))
            handler.attach(module, proxy)
        known_plain = {id(q) for q in self.plain_params}
        for q in plain:  # each once (a tied parameter may come from several modules)
            if id(q) not in known_plain:
                known_plain.add(id(q))
                self.plain_params.append(q)
        tied_names = {names.get(id(q), "?") for q in tied_plain}
        unsupported = list(dict.fromkeys(n for n in unsupported if n not in tied_names))
        self.unsupported_names.extend(unsupported)
        self.unsupported_reasons.update(reasons)
        self.tied_fallbacks.extend(tied_notes)
        for layer in new_layers:
            self.layers.append(layer)
            self._calls[id(layer.module)] = []
            self._handles.append(layer.module.register_forward_hook(self._make_hook(layer)))
        self._group_blocks()
        self._audit_pending = True
        return unsupported

    def _group_blocks(self) -> None:
        self.blocks = tied_blocks(self.layers)
        self._block_of = {id(member.module): block for block in self.blocks for member in block.members or [block]}

    def _resolve_ties(
        self,
        uses: dict[int, list[_Use]],
        owned: dict[int, nn.Parameter],
        names: dict[int, str],
        new_layers: list[Layer],
        extended: list[tuple[Layer, list[nn.Parameter]]],
        plain: list[nn.Parameter],
        known: dict[int, Layer],
    ) -> tuple[list[nn.Parameter], list[str]]:
        """Parameters owned by several modules (weight tying), edited in place:

        - hooked by some, left out by the method's ``layer_filter`` for others: those others
          are hooked too, for the shared parameters alone (new member layers), so that the
          block sees every use;
        - owned by a module that cannot be hooked (no handler, a refused configuration) and
          by a hooked or filtered one: no hook sees every use, so the parameter leaves the
          hooked layers and follows the plain gradient.

        Returns the latter parameters and one line per tie saying why."""
        fallback: list[nn.Parameter] = []
        notes: list[str] = []
        pulled: dict[int, tuple[_Use, list[nn.Parameter]]] = {}
        for pid, owners in uses.items():
            if len(owners) < 2:
                continue
            p = owned[pid]
            statuses = {use.status for use in owners}
            if "refused" in statuses and statuses != {"refused"}:
                fallback.append(p)
                labels = ", ".join(use.label for use in owners)
                blind = ", ".join(use.label for use in owners if use.status == "refused")
                notes.append(f"{names.get(pid, '?')} (shared by {labels}; no hook sees its use in {blind})")
                if all(q is not p for q in plain):
                    plain.append(p)
            elif statuses == {"hooked", "filtered"}:
                for use in owners:
                    if use.status == "filtered":
                        pulled.setdefault(id(use.module), (use, []))[1].append(p)
                plain[:] = [q for q in plain if q is not p]
        if fallback:
            for layer in new_layers:
                layer.params[:] = [q for q in layer.params if all(q is not f for f in fallback)]
            new_layers[:] = [layer for layer in new_layers if layer.params]
            for _, own in extended:
                own[:] = [q for q in own if all(q is not f for f in fallback)]
        for use, own in pulled.values():
            if id(use.module) in known:
                extended.append((known[id(use.module)], own))
            else:
                new_layers.append(Layer(use.name, use.module, use.handler, own))
        if pulled:  # the new layers in the model's order again
            rank = {id(module): i for i, module in enumerate(self.model.modules())}

            def position(layer: Layer) -> int:
                return rank.get(id(layer.owner or layer.module), len(rank))

            new_layers.sort(key=position)
        return fallback, notes

    def block_of(self, layer: Layer) -> Layer:
        """The block (:attr:`blocks`) a hooked layer belongs to: itself, or its tied block."""
        return self._block_of.get(id(layer.module), layer)

    def _refusal(self, module: nn.Module, handler: LayerHandler | None, label: str) -> str | None:
        """Why ``module``'s own parameters cannot be preconditioned, or None."""
        if handler is None:
            return f"{label} has no gramopt handler"
        if self._coupled_in_training(module):
            return (
                f"{label} is in training mode: {self.wording.method} treats its batch statistics as coupling "
                f"the samples and refuses it; {_COUPLING_REMEDY}"
            )
        try:
            handler.validate(module)
        except UnsupportedModuleError as err:
            return f"{label}: {err}"
        return None

    def _coupled_in_training(self, module: nn.Module) -> bool:
        """Whether the method refuses ``module`` as it is: in training mode, its handler
        coupling the samples (BatchNorm), and the method needing per-sample rows."""
        return not self.batchnorm_training and module.training and _couples_samples(module)

    # -- hooks --------------------------------------------------------------------------
    def _make_hook(self, layer: Layer):
        calls = self._calls[id(layer.module)]
        engine_ref = self  # the hook lives on the model; close() removes it

        handler = layer.handler
        save, in_eval = handler.save, handler.captures_in_eval
        is_grad_enabled = torch.is_grad_enabled

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            # (runs at every forward call of the layer: the cheapest tests first)
            if not ((module.training or in_eval or engine_ref.capture_in_eval) and is_grad_enabled()):
                return
            if module is not layer.module:
                return  # (a deep copy of the model carries the hooks along)
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if engine_ref._backward_seen:  # gradient accumulation: a new micro-batch
                engine_ref._micro += 1
                engine_ref._backward_seen = False
            capture = engine_ref.capture_filter
            if capture is not None and not capture(layer):
                calls.append(_Call(None, None, 0, micro=engine_ref._micro, skipped=True))
                return
            call = _Call(save(module, args, output), output, output._version, micro=engine_ref._micro)
            if engine_ref._audit_pending:
                inputs = [a.grad_fn for a in args if isinstance(a, Tensor) and a.grad_fn is not None]
                call.nodes = (output.grad_fn, inputs)
            calls.append(call)
            # The hook lives in the output's autograd node (C++), which Python's GC cannot
            # see: a strong reference to the call (which holds the output) would make an
            # uncollectable cycle keeping every step's activations and gradients alive.
            call_ref = weakref.ref(call)

            def grad_hook(grad: Tensor | None) -> None:
                # None: a custom autograd Function returned no gradient for this output, so
                # no gradient reached this call in this pass (its rows are zero)
                if engine_ref._paused or grad is None:
                    return
                live = call_ref()
                if live is None:  # cleared (stale graph): nothing to record
                    return
                engine_ref._backward_seen = True
                engine_ref.last_batch_size = grad.shape[0]
                live.grads.append((engine_ref._pass if engine_ref._pass is not None else -1, grad.detach()))
                # Holding the output while its gradient flows back slows the backward pass
                # (convolution and ReLU backward; benchmarks/notes.md, "Capture costs");
                # it is only needed as a target of backward_passes, which keep their own list.
                live.output = None

            output.register_hook(grad_hook)

        return forward_hook

    # -- parameters used outside their modules' calls ---------------------------------------
    def _make_audit_hook(self) -> Callable[[nn.Module, tuple, Any], None]:
        engine = self  # a function, not a bound method: a deep copy of the model copies none of it

        def audit_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if engine._audit_pending and module is engine.model and torch.is_grad_enabled() and not engine._paused:
                if not uses.in_transform():  # (a deep copy of the model carries the hook along)
                    engine.audit_uses(output)

        return audit_hook

    def audit_uses(self, output: Any) -> list[nn.Parameter]:
        """Check, once after construction (and after :meth:`add_params`), at the end of the
        model's first training forward, that the graph of its ``output`` uses every
        preconditioned parameter only inside the recorded calls of the modules that own it
        (:mod:`gramopt.capture.uses`). Those used elsewhere as well (``F.linear(h,
        tok.weight)`` besides ``tok(idx)``) leave their layers and follow the plain
        gradient (:attr:`escaped_names`, :attr:`on_escaped`); under ``unsupported="error"``
        :class:`UnsupportedModuleError` names them (what was captured is dropped).
        Returns the parameters found (none if no hooked call was recorded: checked at the
        next forward)."""
        calls = [c for layer in self.layers for c in self._calls[id(layer.module)] if c.nodes is not None]
        if not calls:
            return []
        inside: Counter = Counter()
        for call in calls:
            node, stop = call.nodes
            inside.update(uses.edge_counts([node], stop))
            call.nodes = None
        total = uses.edge_counts(uses.output_nodes(output))
        recorded = {id(layer.module) for layer in self.layers if self._calls[id(layer.module)]}
        escaped = []
        for block in self.blocks:
            if all(id(member.module) in recorded for member in block.members or [block]):
                for p in trainable(block):
                    node = uses.gradient_node(p)
                    if total[node] > inside[node]:
                        escaped.append(p)
        self._audit_pending = False
        if not escaped:
            return []
        names = {id(p): n for n, p in self.model.named_parameters()}
        listed = ", ".join(names.get(id(p), "?") for p in escaped)
        if self.unsupported == "error":
            self._audit_pending = True
            self.clear()
            raise UnsupportedModuleError(
                f"gramopt cannot precondition {listed}: the model uses them outside the calls of the modules that "
                "own them (e.g. F.linear(h, tok.weight) for a tied head), and the hooks see the modules' calls only; "
                "tie weights by sharing the parameter between modules (head.weight = tok.weight) and call the modules, "
                f"or pass {self.wording.fallback}"
            )
        for layer in self.layers:
            layer.params[:] = [q for q in layer.params if all(q is not p for p in escaped)]
        self.plain_params.extend(escaped)
        self.escaped_names.extend(names.get(id(p), "?") for p in escaped)
        self._group_blocks()
        if self.on_escaped is not None:
            self.on_escaped(listed)
        return escaped

    # -- passes -------------------------------------------------------------------------
    def backward_passes(
        self,
        outputs: Tensor | Sequence[Tensor],
        directions: Sequence[Tensor],
        inputs: Sequence[Tensor] = (),
        retain_graph: bool = True,
    ) -> list[tuple[Tensor | None, ...]]:
        """Run one backward pass of ``outputs`` per direction (``grad_outputs``). Each
        captured layer then holds ``[b, len(directions), ...]``.

        Args:
            outputs: what to differentiate (model outputs, or a scalar loss), or one
                tensor per pass (pass j differentiates ``outputs[j]``: it runs through that
                tensor's part of the graph only, e.g. one residual group of several).
            directions: one ``grad_outputs`` per pass, each shaped like its output.
            inputs: further tensors (e.g. :attr:`plain_params`) whose gradients the same
                passes compute, so that no second backward pass is needed for them.
            retain_graph: keep the graph after the last pass (earlier passes always keep it).

        Returns:
            per pass, the gradients of ``inputs`` (None where one is not reached).
        """
        targets = self._traversal_targets()
        inputs = list(inputs)
        per_pass = [outputs] * len(directions) if isinstance(outputs, Tensor) else list(outputs)
        if len(per_pass) != len(directions):
            raise ValueError(f"backward_passes got {len(per_pass)} outputs for {len(directions)} directions")
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
                    per_pass[index],
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
        calls = [c for calls in self._calls.values() for c in calls if c.micro == self._micro and not c.skipped]
        if all(call.output is not None and call.output._version == call.version for call in calls):
            return [call.output for call in calls]
        return [p for block in self.blocks for p in trainable(block)]

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
        self.merge_micro_batches()
        scale = scale * self.gradient_scale
        out: dict[str, LayerFactors] = {}
        batch: list[int] = []
        for block in self.blocks:
            params = trainable(block)
            members = _active(block)
            if not params or not all(self._grad_calls(member) for member in members):
                continue  # (a tied block with a member that recorded nothing: stray_params)
            parts = [self._layer_factors(member, trainable(member), scale, dtype, batch) for member in members]
            if not block.members:
                out[block.name] = parts[0]
            else:
                indices = [i for i, member in enumerate(block.members) if trainable(member)]
                out[block.name] = TiedFactors(block.module, params, parts, indices)
        return out

    def factors_per_call(self) -> dict[str, list[CallFactors]]:
        """One :class:`CallFactors` per forward call that received output-gradients since
        the last clear, built from that call alone (:meth:`factors` joins a layer's calls
        as positions of one sample), per untied block with a trainable parameter: the
        passes of the last :meth:`backward_passes` that reached the call, in order, and
        factors of their output-gradients stacked ``[b, len(passes), ...]``, so row
        ``i * len(passes) + j`` is sample i's row in pass ``passes[j]`` (a pass that did
        not reach the call has no rows: its rows would be zero). Tied blocks are left out
        (their rows join their members' calls). For methods whose rows belong to calls of
        different batch sizes (residual groups of a least-squares closure)."""
        out: dict[str, list[CallFactors]] = {}
        for block in self.blocks:
            params = trainable(block)
            if block.members or not params:
                continue
            parts = []
            for call in self._grad_calls(block):
                if any(index < 0 for index, _ in call.grads):
                    raise CaptureError("internal: factors_per_call needs the captures of one backward_passes call")
                grads = self._stack(call.grads)
                grads = grads.to(_compute_dtype(grads.dtype))
                passes = tuple(sorted(index for index, _ in call.grads))
                parts.append(CallFactors(passes, block.handler.factors(block.module, params, [call.saved], [grads])))
            if parts:
                out[block.name] = parts
        return out

    def _grad_calls(self, layer: Layer) -> list[_Call]:
        return [c for c in self._calls[id(layer.module)] if c.grads]

    def _layer_factors(
        self, layer: Layer, params: list[nn.Parameter], scale: float, dtype: torch.dtype | None, batch: list[int]
    ) -> LayerFactors:
        """The factors of one hooked layer from its calls (``batch``: the batch size the
        layers before saw, checked and recorded)."""
        calls = self._grad_calls(layer)
        grads = [self._stack(c.grads) for c in calls]
        target = dtype or _compute_dtype(grads[0].dtype)
        if scale != 1.0:
            grads = [g.to(target) * scale for g in grads]
        elif grads[0].dtype != target or len(grads) > 1:
            grads = [g.to(target) for g in grads]
        b = grads[0].shape[0]
        if b == 0:
            raise ValueError(f"empty batch: layer {layer.name} saw 0 samples")
        if not batch:
            batch.append(b)
        elif b != batch[0]:
            raise CaptureError(
                f"layer {layer.name} saw a batch of {b} samples, an earlier layer {batch[0]}: every "
                "layer must see the same leading batch dimension"
            )
        return layer.handler.factors(layer.module, params, [c.saved for c in calls], grads)

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
        sizes = self.micro_batch_sizes()
        return sum(sizes) if sizes else None

    def micro_batch_sizes(self) -> list[int]:
        """b_m of each micro-batch captured since the last clear (one entry without
        gradient accumulation), as the first layer with gradients saw them."""
        for calls in self._calls.values():
            sizes: dict[int, int] = {}
            for call in calls:
                if call.grads:
                    sizes.setdefault(call.micro, int(call.grads[0][1].shape[0]))
            if sizes:
                return [sizes[m] for m in sorted(sizes)]
        return []

    def accumulated(self) -> bool:
        """Whether a forward pass opened a second micro-batch since the last clear
        (gradient accumulation); if not, everything captured is of one micro-batch."""
        return self._micro > 0

    def scale_captured(self, factor: float) -> None:
        """Multiply the output-gradients captured so far by ``factor`` (an optimizer's
        ``backward`` keeping the captures those of the mean loss over every micro-batch)."""
        for calls in self._calls.values():
            for call in calls:
                if call.grads:
                    call.scale *= factor
                    self._scaled = True

    def merge_micro_batches(self) -> None:
        """Concatenate the micro-batches (gradient accumulation) along the batch
        dimension: afterwards each layer holds one call per forward call of a micro-batch,
        with the saved inputs and output-gradients of all micro-batches, scaled. Raises
        :class:`CaptureError` when they do not fit together (a layer called a different
        number of times, or with other shapes beyond the batch dimension)."""
        if self._micro == 0 and not self._scaled:  # one micro-batch, unscaled: nothing to merge
            return
        for layer in self.layers:
            calls = [c for c in self._calls[id(layer.module)] if c.grads]
            micros = sorted({c.micro for c in calls})
            if len(micros) < 2 and all(c.scale == 1.0 for c in calls):
                continue
            per_micro = [[c for c in calls if c.micro == m] for m in micros]
            counts = {len(group) for group in per_micro}
            if len(counts) != 1:
                raise CaptureError(
                    f"layer {layer.name} was called {sorted(counts)} times in different micro-batches of one "
                    "step: gradient accumulation needs the same calls in every micro-batch"
                )
            merged = []
            for position in range(counts.pop()):
                group = [micro[position] for micro in per_micro]
                stacked = [self._stack(c.grads) * c.scale if c.scale != 1.0 else self._stack(c.grads) for c in group]
                saved = [c.saved for c in group]
                try:
                    grads = stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=0)
                    saved = layer.handler.merge_saved(saved) if len(saved) > 1 else saved[0]
                except (RuntimeError, TypeError) as err:
                    raise CaptureError(
                        f"layer {layer.name}: the micro-batches of this step cannot be concatenated along the batch "
                        f"dimension ({err}); accumulate micro-batches of equal shapes beyond the batch dimension"
                    ) from err
                k = grads.shape[1]
                as_list = [(-1, grads[:, 0])] if k == 1 else [(i, grads[:, i]) for i in range(k)]
                merged.append(_Call(saved, None, 0, as_list, micro=self._micro))
            others = [c for c in self._calls[id(layer.module)] if not c.grads]
            self._calls[id(layer.module)][:] = merged + others
        covered = {len({c.micro for c in self._calls[id(layer.module)] if c.grads}) for layer in self.layers}
        if covered - {0, 1}:
            raise CaptureError("internal: micro-batches left after merging")

    # -- gradients the method ignores (a warning when they are modified, e.g. clipped) ----
    def watch_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Remember ``.grad`` of ``params`` as each backward pass leaves it, so that
        :meth:`modified_gradients` tells which were changed afterwards (clipping)."""
        versions = self._grad_versions

        def hook(p: Tensor) -> None:
            versions[id(p)] = (id(p.grad), p.grad._version)

        for p in params:
            if p.requires_grad and hasattr(p, "register_post_accumulate_grad_hook"):
                self._grad_handles.append(p.register_post_accumulate_grad_hook(hook))

    def remember_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Remember ``.grad`` of ``params`` as it is now (an optimizer's ``backward`` that
        filled it itself), for :meth:`modified_gradients`."""
        for p in params:
            if p.grad is not None:
                self._grad_versions[id(p)] = (id(p.grad), p.grad._version)

    def modified_gradients(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """Those of ``params`` whose ``.grad`` changed since a backward pass left it."""
        out = []
        for p in params:
            seen = self._grad_versions.get(id(p))
            if seen is not None and p.grad is not None and seen != (id(p.grad), p.grad._version):
                out.append(p)
        return out

    def remembers_gradients(self) -> bool:
        """Whether a backward pass left a watched ``.grad`` since the last forget (if not,
        :meth:`modified_gradients` is empty)."""
        return bool(self._grad_versions)

    def forget_gradients(self) -> None:
        self._grad_versions.clear()

    # -- data parallelism (gramopt.distributed's exact policy) -----------------------------
    def capture_tensors(self) -> tuple[list[Tensor], list[bool], str]:
        """Everything captured since the last clear, as tensors with the batch first.

        Returns:
            per layer (in order) and per forward call that got gradients: the tensors its
            handler saved (:meth:`LayerHandler.saved_tensors`), then its
            output-gradients; per tensor whether it is an output-gradient; and the
            layout (layer names, saved tensors, calls, passes) that a replacement must keep.
        """
        self.merge_micro_batches()
        tensors: list[Tensor] = []
        is_grad: list[bool] = []
        layout = []
        for layer in self.layers:
            calls = [c for c in self._calls[id(layer.module)] if c.grads]
            entries = []
            for call in calls:
                try:
                    saved = layer.handler.saved_tensors(call.saved)
                except CaptureError as err:
                    raise CaptureError(f"layer {layer.name}: {err}") from err
                entries.append(f"{len(saved)}{[i for i, _ in call.grads]}")
                tensors.extend(saved)
                is_grad.extend([False] * len(saved))
                for _, grad in call.grads:
                    tensors.append(grad)
                    is_grad.append(True)
            layout.append(f"{layer.name}:" + ",".join(entries))
        return tensors, is_grad, "|".join(layout)

    def replace_capture_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Put ``tensors``, laid out as :meth:`capture_tensors` returned them (e.g. every
        rank's rows of them), in place of the captures; no more passes can run."""
        supply = iter(tensors)
        for layer in self.layers:
            calls = self._calls[id(layer.module)]
            calls[:] = [c for c in calls if c.grads]
            for call in calls:
                count = len(layer.handler.saved_tensors(call.saved))
                call.saved = layer.handler.restore_saved(call.saved, [next(supply) for _ in range(count)])
                call.output = None
                call.grads = [(index, next(supply)) for index, _ in call.grads]

    def uncalled_params(self) -> list[nn.Parameter]:
        """Trainable parameters of blocks (:attr:`blocks`) with a module that recorded no
        training forward call since the last clear. A backward pass may still reach them
        when the model uses their weights without calling the module
        (``F.linear(x, fc.weight)``): methods differentiate for them too, so that they are
        not silently frozen. (For a tied block with one member called and another not, the
        hooks cannot tell whether the other's weights were used without calling it.)"""
        return [
            p
            for block in self.blocks
            if not all(self._calls[id(member.module)] for member in _active(block))
            for p in trainable(block)
        ]

    def stray_params(self) -> list[nn.Parameter]:
        """Trainable parameters with a ``.grad`` whose block (one of :attr:`blocks`) has a
        module that captured no output-gradient since the last clear: its forward was
        bypassed, so the sample-space math has nothing (or, in a tied block, not every use)
        for them. They follow the plain gradient. Empty when no layer captured anything (a
        forward in eval mode: a clear error elsewhere)."""
        uncaptured = [
            block
            for block in self.blocks
            if not all(_captured(self._calls[id(member.module)]) for member in _active(block))
        ]
        if not uncaptured or not any(_captured(self._calls[id(layer.module)]) for layer in self.layers):
            return []  # all captured, or none (eval mode)
        return [p for block in uncaptured for p in trainable(block) if p.grad is not None]

    def has_factors(self) -> bool:
        for calls in self._calls.values():
            for call in calls:
                if call.grads:
                    return True
        return False

    def drop_captured(self) -> None:
        """Drop what backward passes captured (``zero_grad``: the accumulation starts
        over), keeping forward calls still waiting for their gradient."""
        for calls in self._calls.values():
            calls[:] = [c for c in calls if not c.grads]
        self._backward_seen = False
        self._grad_versions.clear()

    def clear(self) -> None:
        """Drop everything captured (after a step, or to start over)."""
        for calls in self._calls.values():
            calls.clear()
        self._backward_seen = False
        self._micro = 0
        self._scaled = False
        self._grad_versions.clear()

    def close(self) -> None:
        """Remove every hook; idempotent."""
        for handle in self._handles + self._grad_handles:
            handle.remove()
        self._handles.clear()
        self._grad_handles.clear()
        for module, handler in self._attached:
            handler.detach(module)
        self._attached.clear()
        self.clear()
        self.closed = True


_TIED = TiedHandler()


def tied_blocks(layers: Sequence[Layer]) -> list[Layer]:
    """The layers, with those that share a parameter (directly or through others: the
    connected components of "covers a common parameter") joined into one block: a
    :class:`Layer` named ``"a+b"`` whose members are the layers in model order and whose
    params are theirs, each once, in that order. A layer sharing nothing is its own block."""
    parent = list(range(len(layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer.params:
            j = owner.setdefault(id(p), i)
            if root(j) != root(i):
                parent[root(i)] = root(j)
    groups: dict[int, list[Layer]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(root(i), []).append(layer)
    blocks = []
    for members in groups.values():
        if len(members) == 1:
            blocks.append(members[0])
            continue
        params: list[nn.Parameter] = []
        for member in members:
            params.extend(p for p in member.params if all(p is not q for q in params))
        module = TiedModules([(member.module, member.params) for member in members])
        blocks.append(Layer("+".join(member.name for member in members), module, _TIED, params, list(members)))
    return blocks


def _sequence_first_refusal(module: nn.Module, label: str) -> str | None:
    """Why a Transformer layer cannot be preconditioned as a whole, submodules included
    (sequence-first: its Linear layers see ``[T, b, d]``), or None."""
    if isinstance(module, _SEQUENCE_FIRST_LAYERS) and not module.self_attn.batch_first:
        return (
            f"{label} is sequence-first (batch_first=False): its Linear layers see [T, b, d] inputs "
            "and gramopt needs the batch dimension first; build it with batch_first=True"
        )
    return None


def _couples_samples(module: nn.Module) -> bool:
    """Whether ``module``'s handler says it couples the samples in training mode (BatchNorm)."""
    handler = handler_for(module)
    return handler is not None and handler.couples_samples


def coupled_in_training(model: nn.Module) -> list[str]:
    """The modules of ``model`` that run in training mode now and whose handler says they
    couple the samples there (BatchNorm: its batch statistics make every sample's output
    depend on the whole batch), as ``"name (Type)"``."""
    return [
        f"{name or 'model'} ({type(module).__name__})"
        for name, module in model.named_modules()
        if module.training and _couples_samples(module)
    ]


def _canonical_order(layer: Layer) -> Callable[[nn.Parameter], int]:
    """Sort key putting a layer's parameters in the order its module (for a proxy: the
    module it stands for) declares them (weight before bias), whatever order the
    parameter groups named them in."""
    declared = list((layer.owner or layer.module).parameters(recurse=False))
    index = {id(p): i for i, p in enumerate(declared)}
    return lambda p: index.get(id(p), len(index))


_FULL_PRECISION = (torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The factors' compute dtype for gradients of ``dtype``: at least float32."""
    return dtype if dtype in _FULL_PRECISION else torch.promote_types(dtype, torch.float32)


def _captured(calls: list[_Call]) -> bool:
    """Whether any of a layer's forward calls received an output-gradient (or ran with
    its capture skipped on purpose, see ``CaptureEngine.capture_filter``)."""
    for call in calls:
        if call.grads or call.skipped:
            return True
    return False


def _active(block: Layer) -> list[Layer]:
    """The layers of a block (:attr:`CaptureEngine.blocks`) with a parameter that requires
    grad now: the block itself, or those of its members."""
    return [member for member in block.members or [block] if trainable(member)]


def trainable(layer: Layer) -> list[nn.Parameter]:
    """The layer's parameters that require grad now (all of them unless some were frozen
    after the optimizer was built)."""
    return [p for p in layer.params if p.requires_grad]


def _refuse_batchnorm_training(method: str, module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a method that refuses BatchNorm in training mode (``method``: its name)."""
    if module.training and torch.is_grad_enabled():
        raise UnsupportedModuleError(
            f"{type(module).__name__} ran in training mode under {method}: its batch statistics couple the "
            f"samples of a batch, which breaks the per-sample Jacobian rows; {_COUPLING_REMEDY}"
        )
