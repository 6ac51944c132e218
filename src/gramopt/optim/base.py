"""The method contract: what every gramopt optimizer shares, and the few hooks a method
fills in (:class:`SampleSpaceOptimizer`; docs/guides/writing-a-method.md is the same
contract with a worked example).

The base class owns the training loop's bookkeeping: the hooks' lifetime, validation,
``backward`` (checks, the loss, the backward passes through the capture engine,
gradient accumulation, ``.grad`` of the parameters that follow the plain gradient),
``step`` (closure, mixed precision, data parallelism, the plain gradient, clipping, the
update with momentum and weight decay of :mod:`gramopt.optim.update`) and the state
beyond torch's per-parameter state. A method states what it needs
(:class:`MethodNeeds`) and computes its directions from a :class:`Batch`.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gramopt import distributed as dp
from gramopt.capture.engine import CaptureEngine, Wording
from gramopt.capture.factors import LayerFactors
from gramopt.errors import CaptureError, NonFiniteError
from gramopt.linalg.dense import SolveInfo, all_finite
from gramopt.losses import GaussNewtonLoss
from gramopt.optim.notices import Notices, user_stacklevel
from gramopt.optim.update import all_norms_finite, clip_directions, decorated_update

__all__ = ["Batch", "MethodNeeds", "SampleSpaceOptimizer", "StepInfo", "check_hyper", "user_stacklevel"]

_EXTRA_KEY = "gramopt"
ROWS = ("loss_gradients", "jacobian")
READS = ("plain", "all")


@dataclass(frozen=True)
class MethodNeeds:
    """What a method needs from the base class, as data (a class attribute ``needs``).

    Attributes:
        rows: what the capture engine records at the layers' outputs during ``backward``.
            ``"loss_gradients"``: the output-gradients of the (micro-batch weighted)
            mean loss, one backward pass; the per-sample loss gradients are ``b`` times
            them. The ordinary loop (``loss.backward()``) records the same, so both
            loops work. ``"jacobian"``: one backward pass per row direction the method's
            :meth:`~SampleSpaceOptimizer.row_directions` returns (``grad_outputs`` on the
            model output, e.g. the output Jacobian's rows): rows that do not depend on the
            batch size; the step needs ``opt.backward(output, target)``.
        reads_gradients: whose ``.grad`` the step reads. ``"plain"``: only that of the
            parameters no layer preconditions (``backward`` stops at the layers' outputs;
            ``.grad`` of the preconditioned layers is filled until the first step only,
            to report clipping it); ``"all"``: every ``.grad`` (``backward`` is the
            ordinary ``loss.backward()``; SENG's g). Synchronized under
            ``distributed="exact"``.
        batchnorm_training: whether BatchNorm layers may run in training mode (their
            batch statistics couple the samples' rows; a method whose rows must be the
            samples' own refuses them).
        weight_decay_modes: the ``weight_decay_mode`` values the method takes:
            ``"decoupled"`` (``p <- p - lr * wd * p`` next to the step, by the base) and
            ``"l2"`` (the method preconditions ``g + wd * p``, :meth:`~SampleSpaceOptimizer.l2_term`).
    """

    rows: str = "loss_gradients"
    reads_gradients: str = "plain"
    batchnorm_training: bool = True
    weight_decay_modes: tuple[str, ...] = ("decoupled",)

    def __post_init__(self) -> None:
        if self.rows not in ROWS:
            raise ValueError(f"MethodNeeds.rows must be one of {ROWS}, got {self.rows!r}")
        if self.reads_gradients not in READS:
            raise ValueError(f"MethodNeeds.reads_gradients must be one of {READS}, got {self.reads_gradients!r}")
        if self.rows == "jacobian" and self.reads_gradients != "plain":
            raise ValueError('MethodNeeds: rows="jacobian" passes reach no weight, so reads_gradients must be "plain"')
        if not self.weight_decay_modes or set(self.weight_decay_modes) - {"decoupled", "l2"}:
            raise ValueError(
                "MethodNeeds.weight_decay_modes must be taken from ('decoupled', 'l2'), got "
                f"{self.weight_decay_modes!r}"
            )


@dataclass
class StepInfo:
    """What the last step did (``opt.last_info``): its number, the mean loss ``backward``
    returned (None in the ordinary loop), the solve (method, fallback, iterations,
    residuals; None for methods without one) and seconds per phase. Methods extend it
    (:class:`~gramopt.optim.ggn.GGNStepInfo`)."""

    step: int
    loss: float | None = None
    solve: SolveInfo | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Batch:
    """What the step computes from: the batch of every ``backward`` call since the last
    step (micro-batches joined), or of the ordinary loop (``loss`` None, ``samples`` 0).
    A method that keeps more (its per-batch values, what :meth:`~SampleSpaceOptimizer.commit`
    needs) declares a dataclass subclass whose fields have defaults (the base class makes
    one per ``backward`` call, and one for the ordinary loop) and names it in
    ``batch_type``; everything on a batch lives for one step.

    Attributes:
        loss: the mean loss over the micro-batches ``backward`` saw (None in the ordinary loop).
        samples: their samples b (this process's), 0 in the ordinary loop.
        micro_batches: the ``backward`` calls of this step.
        seconds: seconds per phase of those calls (the step adds its own).
        per_sample: the method's per-sample tensors ``[b, ...]`` (None where absent), set
            by :meth:`~SampleSpaceOptimizer.row_directions`: concatenated over the
            micro-batches and, under ``distributed="exact"``, gathered over the ranks in
            rank order with the captures, before :meth:`~SampleSpaceOptimizer.directions`.
            Never rescaled (rows that do not depend on the batch size).
        plain: the parameters whose ``.grad`` ``backward`` filled for the plain gradient
            (``rows="jacobian"``; None: the step asks the capture engine).
        strays: those of ``plain`` from hooked modules that recorded nothing (warned about).
        solve: what the method's solve did (set by ``directions``; ``last_info.solve``).
    """

    loss: float | None = None
    samples: int = 0
    micro_batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    per_sample: dict[str, Tensor | None] = field(default_factory=dict)
    plain: list[nn.Parameter] | None = None
    strays: list[nn.Parameter] | None = None
    solve: SolveInfo | None = None
    # the optimizer whose step reads this batch (set for the step only) and whether its
    # captures were gathered (distributed="exact")
    _optimizer: SampleSpaceOptimizer | None = field(default=None, init=False, repr=False, compare=False)
    _gathered: bool = field(default=False, init=False, repr=False, compare=False)

    def factors(self, scale: float = 1.0) -> dict[str, LayerFactors]:
        """The captured rows as one :class:`~gramopt.capture.factors.LayerFactors` per
        hooked layer (block) that took part: every micro-batch's and, under
        ``distributed="exact"``, every rank's (gathered on the first call). ``scale``
        multiplies the captured output-gradients (``b`` turns the gradients of a mean loss
        into per-sample loss gradients). Call it in ``directions`` only."""
        owner = self._owner()
        owner._gather(self)
        return owner.engine.factors(scale=scale)

    def captured_samples(self) -> int | None:
        """The samples the captured rows cover (all micro-batches and, under
        ``distributed="exact"``, all ranks); None when no backward pass reached a hooked
        layer. Call it in ``directions`` only."""
        owner = self._owner()
        owner._gather(self)
        return owner.engine.batch_size()

    def missing_captures(self, message: str) -> CaptureError:
        """The error for ``directions`` to raise when it finds nothing captured: ``message``,
        unless the last thing that happened was a step, which used up the captures of the
        backward pass before it: then that."""
        return self._owner()._missing_captures(message)

    def join(self, later: Batch) -> Batch:
        """This step's micro-batches so far with ``later``, the next one, appended
        (gradient accumulation): the mean loss over all samples, seconds summed,
        ``per_sample`` concatenated, ``plain`` and ``strays`` united; every other field
        is ``later``'s. A subclass whose fields cannot be joined that way extends it."""
        total = self.samples + later.samples
        seconds = dict(self.seconds)
        for key, value in later.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + value
        loss = (self.loss * self.samples + later.loss * later.samples) / total if self.loss is not None else later.loss
        keys = dict.fromkeys([*self.per_sample, *later.per_sample])
        per_sample = {key: _join_rows(key, self.per_sample.get(key), later.per_sample.get(key)) for key in keys}
        return replace(
            later,
            loss=loss,
            samples=total,
            seconds=seconds,
            per_sample=per_sample,
            plain=_union(self.plain, later.plain),
            strays=_union(self.strays, later.strays),
        )

    def _owner(self) -> SampleSpaceOptimizer:
        if self._optimizer is None:
            raise RuntimeError("internal: a batch's captures are read in the step only")
        return self._optimizer


def check_hyper(name: str, value: Any, *, low: float = 0.0, inclusive: bool = True) -> None:
    """ValueError unless ``value`` is a finite real number >= low (> low if not inclusive)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (not inclusive and value == low):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")


class SampleSpaceOptimizer(torch.optim.Optimizer):
    """The base class of gramopt's optimizers: the method contract.

    **A method** is a subclass that declares what it needs and fills in a few hooks; the
    base class does everything else, in a fixed order::

        class MyMethod(SampleSpaceOptimizer):
            needs = MethodNeeds(...)          # rows, reads_gradients, batchnorm_training, weight_decay_modes
            batch_type = Batch                # or a subclass with the method's per-step fields
            def __init__(self, model, lr, damping, *, loss, ...):
                self.loss = get_loss(loss)    # the loss backward(output, target) computes
                super().__init__(model, params, dict(lr=lr, damping=damping, momentum=..., weight_decay=...), ...)
            def directions(self, batch): ...  # required: the paper's algorithm

    ``backward(output, target)`` (the uniform loop):

    1. base: the optimizer is open; ``output`` and ``target`` are two tensors on one
       device that ``self.loss.check`` accepts, with at least one sample;
    2. base: the mean loss ``self.loss.value(output, target)``; a NaN or inf in the
       output, the target or the loss is a :class:`~gramopt.errors.NonFiniteError`;
    3. hook ``row_directions(output, target, batch) -> list[Tensor]`` (``rows="jacobian"``
       only): the ``grad_outputs`` of the passes, each shaped like ``output``; it may set
       ``batch.per_sample`` and the fields of its ``batch_type``. Nothing may change
       before it returns (it may raise);
    4. base: the passes through the capture engine (``rows="loss_gradients"``: one pass of
       the weighted mean loss, the ordinary ``loss.backward()`` when
       ``reads_gradients="all"``; ``rows="jacobian"``: one pass per direction, then one of
       the loss for ``.grad`` of the plain parameters), gradient accumulation (earlier
       micro-batches reweighted so that ``.grad`` and the captures are always those of the
       mean loss over all of them), ``.grad`` of the parameters that follow the plain
       gradient (no handler, hooked modules that were not called), the warning about the
       latter, and the gradient probe (``.grad`` of the preconditioned layers until the
       first step, to report a modified one);
    5. base: the batch joined to the step's earlier micro-batches (:meth:`Batch.join`);
       it returns the loss (detached). A failure anywhere drops the step's captures and
       micro-batches; parameters and state are unchanged.

    ``step(closure=None)``:

    1. base: the closure (autograd and the caller's autocast on); GradScaler's inf check
       and unscaling; the warning about a modified ``.grad`` the step ignores; under
       ``distributed``, the gradients the step reads are synchronized (hook
       ``global_gradient_params(batch)``, optional); the micro-batch check; under
       ``distributed="exact"`` ``batch.per_sample`` is gathered (the captures are
       gathered by the first :meth:`Batch.factors`);
    2. hook ``directions(batch) -> dict[Tensor, Tensor]``: a direction d per parameter it
       preconditions (the step is ``-lr * d`` before decoration); reads
       ``batch.factors()``, ``batch.per_sample``, ``extra_state``, ``param_groups``;
       writes ``batch.solve`` and its own batch fields, nothing else;
    3. base: the plain gradient (``.grad``, plus ``wd * p`` under L2 weight decay) for the
       parameters no layer preconditions; ``max_update_norm`` clipping; one finiteness
       check of all directions (a NaN or inf changes nothing); momentum, decoupled weight
       decay and the update (:func:`~gramopt.optim.update.decorated_update`);
    4. hook ``commit(batch)``: keep the method's state of this step (``extra_state``,
       ``param_groups``), once the update succeeded;
    5. hook ``step_info(batch, **common) -> StepInfo``: ``last_info`` (default
       :class:`StepInfo` with ``step``, ``loss``, ``solve``, ``seconds``).

    The captures are dropped after every step, successful or not. Optional hooks:
    ``validate_group(group)`` (ValueError for a bad hyper-parameter; call ``super()``),
    ``global_gradient_params(batch)``, and torch's ``load_state_dict`` (check or convert
    the saved ``extra_state`` before calling ``super()``).

    **State rules** (optax's explicit state): hyper-parameters that a user or a scheduler
    may change live in ``param_groups`` only (``lr``, ``momentum``, ``weight_decay``,
    ``damping``, ...; validated by ``validate_group``); what the method keeps across steps
    lives in ``extra_state`` (numbers, tensors, dicts and lists of them: saved by
    ``state_dict()``) and per-parameter tensors in ``self.state[p]``; what lives for one
    step lives on the batch; attributes of ``self`` are the constructor's configuration
    and caches derived from the state (rebuilt after ``load_state_dict``).

    Args:
        model: the network; its parameters are optimized unless ``params`` says otherwise.
        params: optional parameters or param-group dicts (default: the model's trainable
            parameters), all of which must belong to ``model``.
        defaults: hyper-parameters (``lr``, ``momentum``, ``weight_decay`` and the method's).
        unsupported: ``"gradient"`` (default): parameters no handler covers (a learned
            positional ``nn.Parameter`` on the model, a cls token, a module without a
            handler) follow the plain gradient, with one warning per optimizer naming each
            by its full name; ``"error"``: :class:`UnsupportedModuleError` naming them.
        layer_filter: optional ``module -> bool`` choosing the layers the method hooks;
            the parameters of the others follow the plain gradient (see :class:`CaptureEngine`).
        distributed: None (one process), ``"exact"`` or ``"local"``
            (:mod:`gramopt.distributed`; needs an initialized process group).
        weight_decay_mode: ``"decoupled"`` (``p <- p - lr * wd * p`` next to the step)
            or ``"l2"`` (``wd * p`` added to the gradient, which the method then
            preconditions; only for the methods whose :attr:`needs` list it).
        max_update_norm: None, or c > 0: the direction d (all parameters together,
            before momentum and weight decay) is scaled by ``min(1, c / ||d||)``: gradient
            clipping for the preconditioned step (``clip_grad_norm_`` on ``.grad`` has no
            effect on the methods that compute their step from captured per-sample
            gradients; modifying such a ``.grad`` is warned about).
    """

    #: What the method needs from the base class.
    needs: ClassVar[MethodNeeds] = MethodNeeds()
    #: The record the method's hooks receive: :class:`Batch` or a subclass.
    batch_type: ClassVar[type[Batch]] = Batch
    #: The method's ``unsupported`` value that keeps its uncovered parameters going, and what
    #: then happens to them, for the capture engine's refusals (:class:`~gramopt.capture.engine.Wording`).
    unsupported_fallback: ClassVar[str] = Wording.fallback
    loss: GaussNewtonLoss  # the loss backward(output, target) computes, set by each method

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None,
        defaults: dict[str, Any],
        unsupported: str = "gradient",
        layer_filter: Callable[[nn.Module], bool] | None = None,
        distributed: str | None = None,
        weight_decay_mode: str = "decoupled",
        max_update_norm: float | None = None,
    ) -> None:
        if weight_decay_mode not in self.needs.weight_decay_modes:
            raise ValueError(
                f"{type(self).__name__} takes weight_decay_mode in {self.needs.weight_decay_modes}, "
                f"got {weight_decay_mode!r}"
            )
        self.weight_decay_mode = weight_decay_mode
        self._group_index: dict[int, int] | None = None  # id(p) -> its param group (l2_term)
        if max_update_norm is not None:
            check_hyper("max_update_norm", max_update_norm, inclusive=False)
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model first (to hook its layers), got {type(model).__name__}"
            )
        policy = dp.check_policy(distributed)
        model, wrapper = dp.unwrap_model(model, policy, type(self).__name__)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self._names = {id(p): name for name, p in model.named_parameters()}
        _check_params(self._names, [p for g in self.param_groups for p in g["params"]])
        self.model = model
        self.engine = CaptureEngine(
            model,
            [p for g in self.param_groups for p in g["params"]],
            unsupported,
            layer_filter,
            batchnorm_training=self.needs.batchnorm_training,
            wording=Wording(type(self).__name__, self.unsupported_fallback),
        )
        self._finalizer = weakref.finalize(self, self.engine.close)
        self._notices = self.new_notices()
        self.engine.on_escaped = self._notices.escaped_parameters
        # Until the first step succeeds, the backward of a method whose step ignores .grad of
        # its layers fills that .grad too (_probe_params), so that a change to it is reported.
        self._gradient_probe = self.needs.reads_gradients == "plain"
        self._grads_at_step: list[tuple[int, int] | None] | None = None  # see _missing_captures
        engine = self.engine
        self._notices.uncovered(engine, engine.unsupported_names, engine.tied_fallbacks, bool(self._params()))
        self._watch_ignored_gradients(self.engine.blocks)
        self.extra_state: dict[str, Any] = {"step": 0}
        self.last_info: StepInfo | None = None
        self._pending: Batch | None = None  # the micro-batches backward saw since the last step
        self._seconds: dict[str, float] = {}
        self.sync: dp.DataParallel | None = None
        self._own_backward = False  # the last backward was opt.backward (nothing to unscale)
        if policy is not None:
            self.sync = dp.DataParallel(policy)
            self.sync.check_consistent(
                dp.settings_fingerprint(
                    type(self).__name__,
                    policy,
                    self.param_groups,
                    [layer.name for layer in self.engine.layers],
                    _public_options(self),
                )
            )
            if wrapper is not None:
                wrapper.require_backward_grad_sync = False  # the optimizer communicates itself

    # -- the method's hooks ----------------------------------------------------------------
    def new_notices(self) -> Notices:
        """The warnings about parameters and calls, made once at construction (after the
        method's own settings): a method whose step treats them otherwise returns a
        :class:`~gramopt.optim.notices.Notices` subclass that words them its way."""
        return Notices(type(self).__name__, self._names)

    def row_directions(self, output: Tensor, target: Tensor, batch: Batch) -> list[Tensor]:
        """``rows="jacobian"``: the ``grad_outputs`` of this micro-batch's backward passes,
        one per captured row, each shaped like ``output`` (the captured rows of sample i
        are then ``d_j[i]^T (d f_i / d theta)``). May set ``batch.per_sample`` and the
        method's batch fields; changes nothing else. ``batch.loss`` is this micro-batch's
        mean loss, ``batch.micro_batches`` its number within the step (1 for the first)."""
        raise NotImplementedError(f"{type(self).__name__} declares rows='jacobian' but has no row_directions")

    def directions(self, batch: Batch) -> dict[Tensor, Tensor]:
        """The method's algorithm: a direction d per preconditioned parameter (the step
        is ``-lr * d`` before momentum and weight decay). Reads ``batch.factors()``;
        may set ``batch.solve`` and the method's batch fields; changes nothing else."""
        raise NotImplementedError

    def commit(self, batch: Batch) -> None:
        """Keep the method's state of this step (``extra_state``, ``param_groups``), once
        the update succeeded."""

    def step_info(self, batch: Batch, **common: Any) -> StepInfo:
        """``last_info``: ``common`` holds ``step``, ``loss``, ``solve`` and ``seconds``;
        a method with more to say returns its :class:`StepInfo` subclass."""
        return StepInfo(**common)

    def validate_group(self, group: dict[str, Any]) -> None:
        """ValueError naming a bad hyper-parameter of ``group`` (a method checks its own
        after ``super().validate_group(group)``)."""
        check_hyper("lr", group["lr"])
        check_hyper("momentum", group["momentum"])
        if group["momentum"] >= 1:
            raise ValueError(f"momentum must be < 1, got {group['momentum']!r}")
        check_hyper("weight_decay", group["weight_decay"])

    def global_gradient_params(self, batch: Batch) -> list[Tensor]:
        """The parameters whose ``.grad`` must hold the global mean-loss gradient
        ``sum_r (b_r / B) g_r`` before :meth:`directions` (one all-reduce; data parallel
        only): under ``"exact"`` those whose ``.grad`` the step reads, else none."""
        if self.sync is None or self.sync.policy != "exact":
            return []
        if self.needs.reads_gradients == "all":
            return [p for g in self.param_groups for p in g["params"]]
        return self.engine.plain_params + (batch.strays if batch.strays is not None else self.engine.stray_params())

    def l2_term(self, p: Tensor) -> Tensor | None:
        """``weight_decay_mode="l2"``: ``wd * p``, the gradient of (wd/2)||p||^2 that the
        method adds to the gradient of the loss before preconditioning (``wd``: the
        weight_decay of p's param group); None when there is none to add."""
        if self.weight_decay_mode != "l2":
            return None
        decay = self.group_of(p)["weight_decay"]
        return p.detach() * decay if decay else None

    # -- torch.optim's interface -----------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group``, also after construction (fine-tuning that
        unfreezes layers): the new parameters must belong to the model; their layers are
        hooked from the next forward pass on (parameters no handler covers follow the
        plain gradient, warned about, or are refused under ``unsupported="error"``), and
        their state is created at their first step. Nothing changes on an error."""
        engine = getattr(self, "engine", None)
        if engine is None:
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            # A zero lr given by hand is a mistake; one set by a scheduler (a warmup from 0, a
            # cosine down to 0) is not, and a state_dict saved then loads (validate_group).
            check_hyper("lr", group["lr"], inclusive=False)
            self.validate_group(group)
            return
        self._require_open()
        if engine.has_factors():
            raise ValueError(
                "add_param_group between backward and step: call it before the forward pass of a step"
            )
        count = len(self.param_groups)
        try:
            torch.optim.Optimizer.add_param_group(self, param_group)
            group = self.param_groups[-1]
            check_hyper("lr", group["lr"], inclusive=False)
            self.validate_group(group)
            _check_params(self._names, [p for g in self.param_groups for p in g["params"]])
            before = {id(p) for layer in engine.blocks for p in layer.params}
            tied = len(engine.tied_fallbacks)
            names = engine.add_params(group["params"])
        except BaseException:
            del self.param_groups[count:]
            raise
        self._group_index = None  # group_of's parameter -> group map is stale
        self._notices.uncovered(engine, names, engine.tied_fallbacks[tied:], bool(self._params()))
        self._watch_ignored_gradients([b for b in engine.blocks if any(id(p) not in before for p in b.params)])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``, which also drops the per-sample captures of the
        backward passes since the last step (gradient accumulation starts over, as for
        ``.grad``); a forward pass whose backward has not run yet is kept. It also starts a
        new step for the GradScaler protocol: the next backward is not ``opt.backward``
        until it says so (see :meth:`step`)."""
        self._own_backward = False
        self._grads_at_step = None
        super().zero_grad(set_to_none)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.drop_captured()
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_EXTRA_KEY] = _clone_tree(self.extra_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_EXTRA_KEY, None)
        if extra is None:
            raise ValueError(
                f"this state_dict has no '{_EXTRA_KEY}' entry: it was not saved by a gramopt optimizer"
            )
        for group in state_dict.get("param_groups", []):
            self.validate_group(group)
        super().load_state_dict(state_dict)
        self.extra_state = _clone_tree(extra)

    @property
    def steps_taken(self) -> int:
        return int(self.extra_state["step"])

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the optimizer's hooks from the model (also done on garbage collection)."""
        self._finalizer()

    def __enter__(self) -> SampleSpaceOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self.engine.closed:
            raise CaptureError(f"this {type(self).__name__} was closed: its hooks are gone")

    # -- backward ------------------------------------------------------------------------
    def backward(self, output: Tensor, target: Tensor) -> Tensor:
        """The mean loss of ``output`` against ``target`` (``self.loss``) and the backward
        passes the method needs (the class docstring's order); returns the loss, detached.
        Several calls before one :meth:`step` accumulate micro-batches: the step is that
        of their concatenated batch."""
        with self._agreement():
            self._require_open()
            self._grads_at_step = None
            self._seconds = {}
            previous = self._pending
            try:
                batch = self.batch_type(micro_batches=1 + (previous.micro_batches if previous is not None else 0))
                value = self._record(output, target, batch)
                batch.seconds = dict(self._seconds)
                self._pending = batch if previous is None else previous.join(batch)
            except BaseException:
                self.engine.clear()
                self._pending = None  # (a failed micro-batch ends the accumulation)
                raise
            self._own_backward = True
            return value

    def _record(self, output: Tensor, target: Tensor, batch: Batch) -> Tensor:
        """Steps 1-4 of ``backward``: the loss, the passes, ``.grad``; fills ``batch``."""
        needs = self.needs
        jacobian = needs.rows == "jacobian"
        with self._phase("jacobian" if jacobian else "backward"):
            _check_batch(self.loss, output, target)
            # Jacobian rows: the loss of a detached output, whose gradient seeds the pass for .grad
            graph = output.detach().requires_grad_(True) if jacobian else output
            with torch.enable_grad():
                value = self.loss.value(graph, target)
            batch.loss = _finite_loss(value, output, target)
            batch.samples = samples = output.shape[0]
            if jacobian:
                directions = self.row_directions(output, target, batch)
                self.engine.backward_passes(output, [d.to(output.dtype) for d in directions])
            elif needs.reads_gradients == "all":  # the ordinary backward pass: every .grad
                weight = self._micro_batch_weight(samples)
                (value * weight if weight != 1.0 else value).backward()
            else:  # one pass to the layers' outputs, and to the parameters whose .grad the step reads
                plain = [p for p in self.engine.plain_params if p.requires_grad] + self.engine.uncalled_params()
                probe = self._probe_params(plain)
                weight = self._micro_batch_weight(samples)
                direction = torch.full_like(value, weight)
                (grads,) = self.engine.backward_passes(value, [direction], inputs=plain + probe, retain_graph=False)
                self._add_gradients(plain + probe, grads, probe)
        if jacobian:
            with self._phase("gradient"):
                batch.plain, batch.strays = self._gradient_pass(value, graph, output, samples)
        return value.detach()

    def _gradient_pass(
        self, value: Tensor, graph: Tensor, output: Tensor, samples: int
    ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``rows="jacobian"``: ``.grad`` where the step reads it, the plain-gradient
        parameters (and, until the first step, the preconditioned ones: :meth:`_probe_params`),
        from one more pass through the kept graph that no hook records. Hooked layers whose
        module was not called (weights used functionally) get the plain gradient too when
        the pass reaches them (never silently frozen; warned about). Returns those
        parameters and the strays among them."""
        uncalled = self.engine.uncalled_params()
        plain = [p for p in self.engine.plain_params if p.requires_grad] + uncalled
        strays: list[nn.Parameter] = []
        weight = self._micro_batch_weight(samples)  # gradient accumulation: the mean over all micro-batches
        probe = self._probe_params(plain)
        if plain or probe:
            (grad_output,) = torch.autograd.grad(value, graph)  # only the plain gradient needs it
            with self.engine.paused():
                grads = torch.autograd.grad(output, plain + probe, grad_outputs=grad_output * weight, allow_unused=True)
            uncalled_ids = {id(p) for p in uncalled}
            strays = [p for p in self._add_gradients(plain + probe, grads, probe) if id(p) in uncalled_ids]
        self._notices.stray_parameters(strays)
        return plain, strays

    def _micro_batch_weight(self, samples: int) -> float:
        """Gradient accumulation: before the backward pass of a micro-batch of ``samples``
        samples, rescale ``.grad`` and the captures of the earlier micro-batches of this
        step (``B_prev`` samples) by ``B_prev / B`` and return ``samples / B``
        (``B = B_prev + samples``), the weight of this micro-batch's mean loss. ``.grad``
        and the captures are then always those of the mean loss over all the micro-batches
        so far: the step is that of their concatenation."""
        prior = self._pending.samples if self._pending is not None else 0
        total = prior + samples
        if prior:
            factor = prior / total
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(factor)
            if self.needs.rows == "loss_gradients":  # (Jacobian rows do not depend on B)
                self.engine.scale_captured(factor)
            self.engine.forget_gradients()
        return samples / total

    def _probe_params(self, plain: Sequence[Tensor]) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` ``backward`` fills besides ``plain`` (those whose
        step reads it): until the first step succeeds, for a method whose step ignores
        ``.grad`` of the layers it preconditions (``reads_gradients="plain"``), those
        layers' trainable parameters, else none.

        In the ordinary loop ``loss.backward()`` fills every ``.grad``, and :meth:`step`
        warns when one it ignores was modified (``clip_grad_norm_``). ``backward``
        computes no weight gradients of the layers; filling them on the first step (the
        gradient of the mean loss, from the same backward pass) gives the uniform loop the
        same warning. Later steps leave that ``.grad`` empty: computing it every step
        would cost weight gradients that the step never reads."""
        if not self._gradient_probe:
            return []
        known = {id(p) for p in plain}
        return [p for block in self.engine.blocks for p in block.params if p.requires_grad and id(p) not in known]

    def _add_gradients(
        self, params: Sequence[Tensor], grads: Sequence[Tensor | None], probe: Sequence[Tensor] = ()
    ) -> list[Tensor]:
        """Add ``grads`` (None where one was not reached) to ``.grad`` of ``params`` (in
        their dtype), and remember ``.grad`` of ``probe`` as it is then, for the warning
        about a modified one. Returns the parameters that received a gradient."""
        received = []
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                g = g if g.dtype == p.dtype else g.to(p.dtype)
                p.grad = g if p.grad is None else p.grad + g
                received.append(p)
        self.engine.remember_gradients(probe)
        return received

    # -- step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: the method's directions, the plain gradient for the parameters no
        layer preconditions, then the update (with momentum and weight decay).

        ``closure``, if given, must run the forward pass and a backward pass
        (``opt.backward`` or, for the methods that allow it, ``loss.backward()``) and
        return the loss; it is called with autograd enabled. On an error nothing is
        changed, and the captured factors are dropped either way.
        """
        with self._agreement():
            self._require_open()
            # torch.amp.GradScaler.step(opt) sets these (see _step_supports_amp_scaling)
            found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
            own_backward, self._own_backward = self._own_backward, False
            caller = _autocast_dtypes()
            result = None
            if closure is not None:
                with torch.enable_grad(), _autocast(caller):
                    result = closure()
            # the Grams and solves run in the factors' dtype (>= float32), never autocast's
            with _autocast(dict.fromkeys(caller)) if caller else nullcontext():
                scaled = found_inf is not None and not own_backward
                if scaled and float(found_inf) > 0:  # the scaler's inf check: skip, change nothing
                    self.engine.clear()
                    self._pending = None
                    return result
                if scaled:
                    self._unscale(grad_scale)
                try:
                    self._step_body()
                finally:
                    self.engine.gradient_scale = 1.0
        return result

    def _step_body(self) -> None:
        """Steps 1-5 of ``step`` (the class docstring)."""
        if self.needs.reads_gradients == "plain":
            self._notices.modified_gradients(self.engine)
        recorded = self._pending
        batch = recorded if recorded is not None else self.batch_type()
        self._synchronize_gradients(batch)
        self._seconds = dict(batch.seconds)
        batch._optimizer = self
        try:
            self._notices.micro_batches(self.engine, recorded.micro_batches if recorded is not None else 0)
            if recorded is None and self.needs.rows == "jacobian":
                raise self._missing_captures(f"{type(self).__name__}.step() needs opt.backward(model(x), y) first")
            if batch.per_sample and self.sync is not None and self.sync.policy == "exact":
                with self._phase("factors"):
                    self._gather(batch)
            directions = self.directions(batch)
            for p in self._plain_params(batch):
                if p.grad is not None:
                    l2 = None if p.grad.is_sparse else self.l2_term(p)  # (sparse: refused below)
                    directions[p] = p.grad if l2 is None else p.grad + l2
            if self.max_update_norm is not None:
                directions = clip_directions(directions, self.max_update_norm)
            with self._phase("update"):
                self.apply_directions(directions)
                self.commit(batch)
            self._gradient_probe = False  # (_probe_params)
            self._grads_at_step = _gradient_marks(self._params())
        finally:
            batch._optimizer = None
            self.engine.clear()
            self._pending = None
        self.last_info = self.step_info(
            batch, step=self.steps_taken, loss=batch.loss, solve=batch.solve, seconds=self._seconds
        )

    def _plain_params(self, batch: Batch) -> list[nn.Parameter]:
        """The parameters that follow their plain gradient (``.grad``) this step: those
        ``backward`` filled (``rows="jacobian"``), else those of modules without a handler
        and hooked ones whose module recorded nothing (warned about)."""
        if batch.plain is not None:
            return batch.plain
        strays = self.engine.stray_params()
        self._notices.stray_parameters(strays)
        return self.engine.plain_params + strays

    def apply_directions(self, directions: dict[Tensor, Tensor]) -> None:
        """Check every direction is finite, then decorate and apply them (all or nothing;
        ``"local"`` first averages the ranks' directions)."""
        if self.sync is not None and self.sync.policy == "local":
            params = [p for g in self.param_groups for p in g["params"]]
            directions = self.sync.average_directions(directions, params, self._local_samples())
        by_id = {id(p): d for p, d in directions.items()}
        work = []
        checked: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            params, ds = [], []
            for p in group["params"]:
                d = by_id.get(id(p))
                if d is None:
                    continue
                if d.is_sparse:
                    raise ValueError(
                        f"parameter {self._name(p)} has a sparse gradient (e.g. Embedding(sparse=True)): "
                        "sparse gradients are not supported; nothing was changed"
                    )
                if d.dtype != p.dtype:
                    d = d.to(p.dtype)
                params.append(p)
                ds.append(d)
                if d.numel():
                    checked.append((p, d))
            if params:
                work.append((group, params, ds))
        if checked and not all_norms_finite([d for _, d in checked]):
            bad = [p for p, d in checked if not all_finite(d)]
            if bad:
                raise NonFiniteError(
                    f"the step direction of parameter {self._name(bad[0])} has NaN or inf; nothing was changed"
                )
        for group, params, ds in work:
            buffers = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] else []
            decorated_update(
                params, ds, buffers, lr=group["lr"], momentum=group["momentum"],
                weight_decay=group["weight_decay"], decoupled=self.weight_decay_mode == "decoupled",
            )
            for p, buffer in zip(params, buffers, strict=False):
                self.state[p]["momentum_buffer"] = buffer
        self.extra_state["step"] += 1

    # torch.amp.GradScaler.step(opt) hands such an optimizer the loss scale and the inf check
    # (attributes grad_scale, found_inf) instead of unscaling .grad itself: the per-sample
    # captures are scaled too, and only the optimizer can unscale them.
    _step_supports_amp_scaling = True

    def _unscale(self, grad_scale: Tensor | None) -> None:
        """GradScaler (``scaler.scale(loss).backward(); scaler.step(opt)``): multiply ``.grad``
        and the captured output-gradients by 1/S. After ``opt.backward`` (which computes its
        loss itself, unscaled) there is nothing to unscale."""
        if grad_scale is None:
            raise ValueError(
                f"{type(self).__name__}: scaler.unscale_(opt) before scaler.step(opt) unscales .grad but not the "
                "per-sample gradients the optimizer captured; call scaler.step(opt) alone (it unscales both)"
            )
        inverse = 1.0 / float(grad_scale)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inverse)
        self.engine.forget_gradients()  # (not the user's clipping)
        self.engine.gradient_scale = inverse

    def _missing_captures(self, message: str) -> CaptureError:
        """The error of a step that finds nothing captured: ``message``, unless the last
        thing that happened was a step (no ``opt.backward`` since, no ``.grad`` changed),
        which consumed the captures of the backward pass before it: then that."""
        if self._grads_at_step is not None and self._grads_at_step == _gradient_marks(self._params()):
            # (a method that captures a mean loss's gradients also takes the ordinary loop)
            ordinary = self.needs.rows == "loss_gradients"
            backward = "opt.backward(model(x), y)" + (", or loss.backward()" if ordinary else "")
            return CaptureError(
                f"{type(self).__name__}.step() was already called after this backward pass, and that step used "
                f"up its per-sample captures (they are dropped after every step). Run the forward and backward "
                f"pass again ({backward}) before each step(), also to take several steps on one batch"
            )
        return CaptureError(message)

    def group_of(self, p: Tensor) -> dict[str, Any]:
        """The param group of ``p`` (one dict lookup: the map is rebuilt only after
        ``add_param_group``)."""
        if self._group_index is None:
            self._group_index = {id(q): i for i, g in enumerate(self.param_groups) for q in g["params"]}
        return self.param_groups[self._group_index[id(p)]]

    def _phase(self, name: str) -> _PhaseTimer:
        """``with self._phase(name):`` adds the seconds of the block to
        ``last_info.seconds[name]`` (a plain context manager: a few per step)."""
        return _PhaseTimer(self, name)

    def _name(self, p: Tensor) -> str:
        return f"{self._names.get(id(p), '?')} (shape {tuple(p.shape)})"

    # -- data parallelism (gramopt.distributed, a collaborator) --------------------------------
    def _agreement(self) -> Any:
        """Where a local failure must reach the other ranks (``backward``, ``step``)."""
        return nullcontext() if self.sync is None else self.sync.agreement()

    def _draw_seed(self) -> int:
        """A random seed from torch's generator; rank 0's on every rank when distributed."""
        seed = int(torch.randint(0, 2**62, (1,)))
        return seed if self.sync is None else int(self.sync.broadcast(seed))

    def _local_samples(self) -> int:
        """b_r: this rank's batch size as the hooked layers saw it (all micro-batches; 1 if
        none did)."""
        return self.engine.batch_size() or self.engine.last_batch_size or 1

    def _gather(self, batch: Batch) -> None:
        """Under ``"exact"``, once per step: replace the engine's captures by the global
        batch's (every rank's rows, in rank order; gradients of a rank's mean loss times
        b_r / B) and ``batch.per_sample`` likewise (unscaled)."""
        if batch._gathered or self.sync is None or self.sync.policy != "exact":
            return
        batch._gathered = True
        tensors, is_grad, layout = self.engine.capture_tensors()
        keys = [key for key, t in batch.per_sample.items() if t is not None]
        flags = [g and self.needs.rows == "loss_gradients" for g in is_grad] + [False] * len(keys)
        gathered = self.sync.gather_rows(tensors + [batch.per_sample[key] for key in keys], flags, layout)
        self.engine.replace_capture_tensors(gathered[: len(tensors)])
        batch.per_sample.update(zip(keys, gathered[len(tensors) :], strict=True))

    def _synchronize_gradients(self, batch: Batch) -> None:
        """Each ``.grad`` of :meth:`global_gradient_params` becomes ``sum_r (b_r / B) g_r``."""
        if self.sync is None or self.sync.nested:
            return
        params = self.global_gradient_params(batch)
        if params:
            self.sync.synchronize_gradients(params, self._local_samples())

    def _watch_ignored_gradients(self, layers: Sequence[Any]) -> None:
        """Methods whose step ignores ``.grad`` of the preconditioned layers remember it
        after each backward, to warn when it is modified (clipping)."""
        if self.needs.reads_gradients == "plain":
            self.engine.watch_gradients(p for layer in layers for p in layer.params)  # (blocks: each once)

    def _params(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]


class _PhaseTimer:
    """The context manager of :meth:`SampleSpaceOptimizer._phase`."""

    __slots__ = ("owner", "name", "start")

    def __init__(self, owner: SampleSpaceOptimizer, name: str) -> None:
        self.owner, self.name = owner, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        seconds = self.owner._seconds
        seconds[self.name] = seconds.get(self.name, 0.0) + time.perf_counter() - self.start


#: Attributes of an optimizer that are not its settings (every rank may differ, or they are compared otherwise).
_NOT_SETTINGS = frozenset({"defaults", "state", "param_groups", "model", "engine", "extra_state", "last_info", "sync"})


def _public_options(optimizer: SampleSpaceOptimizer) -> dict[str, Any]:
    """The method's public options: its public attributes (set before the base class's
    ``__init__``), for the ranks' agreement on settings."""
    options = sorted(vars(optimizer).items())
    return {key: value for key, value in options if not key.startswith("_") and key not in _NOT_SETTINGS}


def _check_params(names: dict[int, str], params: list[Tensor]) -> None:
    """ValueError unless every parameter belongs to the model (``names``: id -> name) and
    all are real, dense and floating point, of one dtype on one device (the sample-space
    systems couple the layers)."""
    kinds: dict[tuple[torch.dtype, torch.device], str] = {}
    for p in params:
        if id(p) not in names:
            raise ValueError(
                f"every parameter given to the optimizer must belong to the model: a parameter of shape "
                f"{tuple(p.shape)} is not among model.parameters(); register it on a module of the model "
                "(model.log_kappa = nn.Parameter(...)), or wrap the network and it in one nn.Module, and pass "
                "that module as the model"
            )
        name = names[id(p)]
        if p.is_complex():
            raise ValueError(f"complex parameters are not supported ({name} is {p.dtype})")
        if p.is_sparse:
            raise ValueError(f"sparse parameters are not supported ({name})")
        if not p.is_floating_point():
            raise ValueError(f"parameters must be floating point ({name} is {p.dtype})")
        kinds.setdefault((p.dtype, p.device), name)
    if len(kinds) > 1:
        found = ", ".join(f"{name}: {dtype} on {device}" for (dtype, device), name in kinds.items())
        raise ValueError(
            f"all parameters must have one dtype and one device, got {found}: "
            "convert the model with model.to(dtype, device) before building the optimizer"
        )


def _check_batch(loss: GaussNewtonLoss, output: Tensor, target: Tensor) -> None:
    """Two tensors on one device, a target that fits the output under ``loss``, at least
    one sample."""
    if not isinstance(output, Tensor) or not isinstance(target, Tensor):
        raise TypeError("backward(output, target) takes two tensors")
    if target.device != output.device:
        raise ValueError(f"target is on {target.device}, output on {output.device}")
    loss.check(output, target)
    if output.shape[0] == 0:
        raise ValueError("empty batch: the output has 0 samples")


def _finite_loss(value: Tensor, output: Tensor, target: Tensor) -> float:
    """The loss as a float, after one fused check (one host sync) of the loss, the output
    and a floating-point target: NonFiniteError naming the first non-finite one."""
    sums = [value.detach(), output.detach().sum()] + ([target.sum()] if target.is_floating_point() else [])
    loss, *rest = torch.stack([t.to(value.dtype) for t in sums]).tolist()
    if not math.isfinite(loss + sum(rest)):  # (a finite sum that overflowed: checked below)
        if not torch.isfinite(output).all():
            raise NonFiniteError(f"the model output has NaN or inf (the loss is {loss}); nothing was changed")
        if target.is_floating_point() and not torch.isfinite(target).all():
            raise NonFiniteError(f"the target has NaN or inf (the loss is {loss}); nothing was changed")
        if not math.isfinite(loss):
            raise NonFiniteError(f"the loss is {loss}; nothing was changed")
    return loss


def _gradient_marks(params: Sequence[Tensor]) -> list[tuple[int, int] | None]:
    """Which ``.grad`` tensor each parameter holds and its version: any backward pass since
    changes them (accumulates in place, or sets a new tensor)."""
    return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def _join_rows(key: str, old: Tensor | None, new: Tensor | None) -> Tensor | None:
    """Two micro-batches' per-sample tensors ``[b_m, ...]`` concatenated (both None: None)."""
    if old is None and new is None:
        return None
    if old is None or new is None:
        raise CaptureError(f"internal: micro-batches of one step with and without per-sample {key!r}")
    return torch.cat([old, new])


def _union(first: list[nn.Parameter] | None, second: list[nn.Parameter] | None) -> list[nn.Parameter] | None:
    """``first`` then the parameters of ``second`` not in it (by identity)."""
    if first is None or second is None:
        return second
    return first + [p for p in second if all(p is not q for q in first)]


def _clone_tree(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tree(v) for v in tree)
    return tree


AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_dtypes() -> dict[str, torch.dtype]:
    """The device types for which autocast is on now, with its dtype."""
    on = {}
    for device in AUTOCAST_DEVICES:
        try:
            enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        except (TypeError, AttributeError):  # torch < 2.4
            if device == "cpu":
                enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
            else:
                enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        if enabled:
            on[device] = dtype
    return on


@contextmanager
def _autocast(dtypes: dict[str, torch.dtype | None]) -> Iterator[None]:
    """Autocast on (a dtype) or off (None) for the given device types."""
    with ExitStack() as stack:
        for device, dtype in dtypes.items():
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=dtype is not None))
        yield
