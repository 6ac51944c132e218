"""What every gramopt optimizer shares: the hooks' lifetime, validation, the
decoration of a direction with weight decay and momentum, and state beyond torch's
per-parameter state.

A method computes a *direction* d per parameter; the base applies

    p <- p - lr * wd * p                 (decoupled weight decay, if weight_decay > 0)
    m <- momentum * m + d;  d <- m       (heavy-ball momentum, if momentum > 0)
    p <- p - lr * d

so with momentum and weight decay 0 a step is exactly ``delta = -lr * d``. Methods
never touch momentum or weight decay themselves (optax's separation of direction and
decoration), except that with ``weight_decay_mode="l2"`` (coupled, the papers' form)
there is no decoupled term: the method preconditions the gradient of
loss + (wd/2)||p||^2, i.e. g + wd * p (:meth:`l2_term` gives wd * p; the
plain-gradient parameters take g + wd * p).

The base class owns :meth:`step`, the same for every method (kfac-pytorch's
phase-by-phase step, torch.optim's split of the frame from the update):

    closure (if any) -> distribution: synchronize the gradients the step reads
    -> the method's :meth:`directions` (its paper's algorithm)
    -> the plain gradient for the parameters no layer preconditions (:meth:`gradient_params`)
    -> :meth:`apply_directions` (decoration, update) -> the method's :meth:`commit`
    -> :class:`StepInfo`

with every phase timed by ``with self._phase(name):``. A method's ``backward`` runs the
passes it needs and leaves a :class:`PendingBatch` (its loss, the seconds spent) for the
step. Data parallelism (``distributed="exact"`` or ``"local"``) is a collaborator,
:class:`gramopt.distributed.DataParallel` (``self.sync``), that the base class calls at
fixed points: construction (:func:`gramopt.distributed.unwrap_model`, the settings
check), ``backward`` and ``step`` (the agreement on local failures), the gradients the
step reads (:attr:`reads_gradients`), :meth:`_gather_batch` (a method calls it once its
captures are complete) and :meth:`apply_directions` (``"local"`` averages the directions).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gramopt import distributed as dp
from gramopt.capture.engine import CaptureEngine
from gramopt.capture.factors import all_finite
from gramopt.errors import CaptureError, NonFiniteError
from gramopt.linalg.dense import SolveInfo
from gramopt.losses import GaussNewtonLoss

_EXTRA_KEY = "gramopt"


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at the
    first frame outside gramopt and torch (the user's ``opt.step()``), however many of
    torch.optim's wrappers (profiling hook, ``no_grad``) lie between."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(("gramopt.", "torch.")):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class StepInfo:
    """What the last step did: its number, the loss ``backward`` returned, the solve
    (method, fallback, iterations, residuals), seconds per phase and, for GGN, the output
    curvature the step used (``"exact"``, ``"top"`` or ``"sampled"``: the default "top"
    becomes "sampled" for outputs with several positions per sample; None for the other
    methods), and whether the step was undone (GGN's ``AdaptiveDamping(reject=True)``:
    the step raised the loss of its own batch; the parameters are those before it)."""

    step: int
    loss: float | None = None
    solve: SolveInfo | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    curvature: str | None = None
    rejected: bool = False


@dataclass
class PendingBatch:
    """What ``backward`` leaves for the next step: the mean loss it computed (None in
    the ordinary loop) and the seconds per phase it spent. Methods whose step needs more
    (GGN: its system) extend it."""

    loss: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: samples of the micro-batches ``backward`` saw since the last step, and how many
    samples: int = 0
    micro_batches: int = 0


def check_hyper(name: str, value: Any, *, low: float = 0.0, inclusive: bool = True) -> None:
    """ValueError unless ``value`` is a finite real number >= low (> low if not inclusive)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (not inclusive and value == low):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")


class SampleSpaceOptimizer(torch.optim.Optimizer):
    """Base class: takes the model (to hook its layers) and the usual parameter groups.

    Args:
        model: the network; its parameters are optimized unless ``params`` says otherwise.
        params: optional parameters or param-group dicts (default: the model's trainable
            parameters), all of which must belong to ``model``.
        defaults: hyper-parameters (``lr``, ``momentum``, ``weight_decay`` and the method's).
        unsupported: ``"gradient"`` (default): parameters no handler covers (a learned
            positional ``nn.Parameter`` on the model, a cls token, a module without a
            handler) follow the plain gradient, with one warning per optimizer naming each
            by its full name; ``"error"``: :class:`UnsupportedModuleError` naming them.
        max_update_norm: None, or c > 0: the direction d (all parameters together,
            before momentum and weight decay) is scaled by ``min(1, c / ||d||)``: gradient
            clipping for the preconditioned step (``clip_grad_norm_`` on ``.grad`` has no
            effect on the methods that compute their step from captured per-sample
            gradients; modifying such a ``.grad`` is warned about).
        layer_filter: optional ``module -> bool`` choosing the layers the method hooks;
            the parameters of the others follow the plain gradient (see :class:`CaptureEngine`).
        distributed: None (one process), ``"exact"`` or ``"local"``
            (:mod:`gramopt.distributed`; needs an initialized process group).
        weight_decay_mode: ``"decoupled"`` (``p <- p - lr * wd * p`` next to the step)
            or ``"l2"`` (``wd * p`` added to the gradient, which the method then
            preconditions; only for the methods that support it, :attr:`weight_decay_modes`).
    """

    #: The weight-decay forms the method supports.
    weight_decay_modes: ClassVar[tuple[str, ...]] = ("decoupled",)

    #: Whether the output-gradients the method captures are those of a mean loss over
    #: the batch (rescaled by b_r / B when gathered) rather than Jacobian passes (GGN).
    captures_mean_loss: ClassVar[bool] = True
    #: Whose ``.grad`` the step reads: ``"plain"`` (the parameters left to the plain
    #: gradient) or ``"all"`` (SENG's g); synchronized first under ``"exact"``.
    reads_gradients: ClassVar[str] = "plain"
    #: Whether BatchNorm layers may run in training mode (rows summing to the batch gradient).
    batchnorm_training: ClassVar[bool] = True
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
        if weight_decay_mode not in self.weight_decay_modes:
            raise ValueError(
                f"{type(self).__name__} takes weight_decay_mode in {self.weight_decay_modes}, got {weight_decay_mode!r}"
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
            batchnorm_training=self.batchnorm_training,
        )
        self._finalizer = weakref.finalize(self, self.engine.close)
        self.engine.on_escaped = _weak_callback(self._warn_escaped)  # (the model's hooks must not keep self alive)
        self._warned_gradients = False
        # Until the first step succeeds, the backward of a method whose step ignores .grad of
        # its layers fills that .grad too (_probe_params), so that a change to it is reported.
        self._gradient_probe = self.reads_gradients == "plain"
        self._grads_at_step: list[tuple[int, int] | None] | None = None  # see _missing_captures
        self._warned_micro = False
        self._warn_unsupported(self.engine.unsupported_names, self.engine.tied_fallbacks)
        self._watch_ignored_gradients(self.engine.blocks)
        self.extra_state: dict[str, Any] = {"step": 0}
        self.last_info: StepInfo | None = None
        self._warned_stray: set[str] = set()
        self._pending: PendingBatch | None = None
        self._seconds: dict[str, float] = {}
        self.sync: dp.DataParallel | None = None
        self._own_backward = False  # the last backward was opt.backward (nothing to unscale)
        if policy is not None:
            self.sync = dp.DataParallel(policy)
            self.sync.check_consistent(dp.settings_fingerprint(self))
            if wrapper is not None:
                wrapper.require_backward_grad_sync = False  # the optimizer communicates itself

    # -- data parallelism ------------------------------------------------------------------
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

    def _gather_batch(self, *extras: Tensor | None, scaled: Sequence[bool] = ()) -> tuple[Tensor | None, ...]:
        """Under ``"exact"``: replace the engine's captures by the global batch's (every
        rank's rows, in rank order) and return ``extras`` (``[b_r, ...]`` each, or None)
        gathered likewise, those marked ``scaled`` (gradients of this rank's mean loss)
        times b_r / B. Otherwise ``extras`` unchanged. Call it once per step, after the
        backward pass(es) and before :meth:`CaptureEngine.factors`."""
        if self.sync is None or self.sync.policy != "exact":
            return extras
        tensors, is_grad, layout = self.engine.capture_tensors()
        present = [e for e in extras if e is not None]
        flags = [g and self.captures_mean_loss for g in is_grad]
        flags += [bool(s) for e, s in zip(extras, scaled) if e is not None]
        gathered = self.sync.gather_rows(tensors + present, flags, layout)
        self.engine.replace_capture_tensors(gathered[: len(tensors)])
        rest = iter(gathered[len(tensors) :])
        return tuple(None if e is None else next(rest) for e in extras)

    def _synchronize_gradients(self) -> None:
        """``"exact"``: each ``.grad`` the step reads becomes ``sum_r (b_r / B) g_r``."""
        if self.sync is None or self.sync.policy != "exact" or self.sync.nested:
            return
        if self.reads_gradients == "all":
            params = [p for g in self.param_groups for p in g["params"]]
        else:
            params = self.engine.plain_params + self.stray_params()
        self.sync.synchronize_gradients(params, self._local_samples())

    # -- validation ----------------------------------------------------------------------
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
            # cosine down to 0) is not, and a state_dict saved then loads (_validate_group).
            check_hyper("lr", group["lr"], inclusive=False)
            self._validate_group(group)
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
            self._validate_group(group)
            _check_params(self._names, [p for g in self.param_groups for p in g["params"]])
            before = {id(p) for layer in engine.blocks for p in layer.params}
            tied = len(engine.tied_fallbacks)
            names = engine.add_params(group["params"])
        except BaseException:
            del self.param_groups[count:]
            raise
        self._group_index = None  # l2_term's parameter -> group map is stale
        self._warn_unsupported(names, engine.tied_fallbacks[tied:])
        self._watch_ignored_gradients([b for b in engine.blocks if any(id(p) not in before for p in b.params)])

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_hyper("lr", group["lr"])
        check_hyper("momentum", group["momentum"])
        if group["momentum"] >= 1:
            raise ValueError(f"momentum must be < 1, got {group['momentum']!r}")
        check_hyper("weight_decay", group["weight_decay"])

    # -- input ---------------------------------------------------------------------------
    def _check_batch(self, output: Tensor, target: Tensor) -> None:
        """What ``backward(output, target)`` checks first, for every method: two tensors on
        one device, a target that fits the output under ``self.loss``, at least one sample."""
        if not isinstance(output, Tensor) or not isinstance(target, Tensor):
            raise TypeError("backward(output, target) takes two tensors")
        if target.device != output.device:
            raise ValueError(f"target is on {target.device}, output on {output.device}")
        self.loss.check(output, target)
        if output.shape[0] == 0:
            raise ValueError("empty batch: the output has 0 samples")

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the optimizer's hooks from the model (also done on garbage collection)."""
        self._finalizer()

    def __enter__(self) -> "SampleSpaceOptimizer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_open(self) -> None:
        if self.engine.closed:
            raise CaptureError(f"this {type(self).__name__} was closed: its hooks are gone")

    # -- the step ------------------------------------------------------------------------
    def backward(self, output: Tensor, target: Tensor) -> Tensor:
        """The configured mean loss of ``output`` against ``target`` and the backward
        pass(es) the method needs; returns the loss (detached). See the method's
        :meth:`_backward`."""
        with self._agreement():
            self._require_open()
            self._grads_at_step = None
            loss = self._backward(output, target)
            self._own_backward = True
            return loss

    def _backward(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

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

    def _micro_batch_weight(self, samples: int) -> float:
        """Gradient accumulation in ``backward``: before the backward pass of a
        micro-batch of ``samples`` samples, rescale ``.grad`` and the captures of the
        earlier micro-batches of this step (``B_prev`` samples) by ``B_prev / B`` and
        return ``samples / B`` (``B = B_prev + samples``), the weight of this micro-batch's
        mean loss. ``.grad`` and the captures are then always those of the mean loss over
        all the micro-batches so far: the step is that of their concatenation."""
        prior = self._pending.samples if self._pending is not None else 0
        total = prior + samples
        if prior:
            factor = prior / total
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(factor)
            if self.captures_mean_loss:  # (Jacobian rows, GGN's, do not depend on B)
                self.engine.scale_captured(factor)
            self.engine.forget_gradients()
        return samples / total

    def _merged_pending(self, loss: float, samples: int, seconds: dict[str, float]) -> tuple[float, int, int, dict[str, float]]:
        """(mean loss, samples, micro-batches, seconds) of this step's micro-batches
        with this one added."""
        old = self._pending
        if old is None or not old.samples:
            return loss, samples, 1, dict(seconds)
        total = old.samples + samples
        merged = dict(old.seconds)
        for key, value in seconds.items():
            merged[key] = merged.get(key, 0.0) + value
        mean = (old.loss * old.samples + loss * samples) / total if old.loss is not None else loss
        return mean, total, old.micro_batches + 1, merged

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
        self._warn_modified_gradients()
        self._synchronize_gradients()
        pending = self._pending
        self._seconds = dict(pending.seconds) if pending is not None else {}
        self._rejected = False
        try:
            self._check_micro_batches(pending)
            directions, solve = self.directions(pending)
            for p in self.gradient_params():
                if p.grad is not None:
                    l2 = None if p.grad.is_sparse else self.l2_term(p)  # (sparse: refused below)
                    directions[p] = p.grad if l2 is None else p.grad + l2
            if self.max_update_norm is not None:
                directions = self._clip(directions)
            with self._phase("update"):
                self.apply_directions(directions)
                self.commit()
            self._gradient_probe = False  # (_probe_params)
            self._grads_at_step = self._gradient_marks()
        finally:
            self.engine.clear()
            self._pending = None
        self.last_info = StepInfo(
            self.steps_taken,
            None if pending is None else pending.loss,
            solve,
            self._seconds,
            getattr(pending, "curvature", None),
            self._rejected,
        )

    def _gradient_marks(self) -> list[tuple[int, int] | None]:
        """Which ``.grad`` tensor each parameter holds and its version: any backward pass
        since changes them (accumulates in place, or sets a new tensor)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]

    def _missing_captures(self, message: str) -> CaptureError:
        """The error of a step that finds nothing captured: ``message``, unless the last
        thing that happened was a step (no ``opt.backward`` since, no ``.grad`` changed),
        which consumed the captures of the backward pass before it: then that."""
        if self._grads_at_step is not None and self._grads_at_step == self._gradient_marks():
            # (a method that captures a mean loss's gradients also takes the ordinary loop)
            backward = "opt.backward(model(x), y)" + (", or loss.backward()" if self.captures_mean_loss else "")
            return CaptureError(
                f"{type(self).__name__}.step() was already called after this backward pass, and that step used "
                f"up its per-sample captures (they are dropped after every step). Run the forward and backward "
                f"pass again ({backward}) before each step(), also to take several steps on one batch"
            )
        return CaptureError(message)

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

    def directions(self, pending: PendingBatch | None) -> tuple[dict[Tensor, Tensor], SolveInfo | None]:
        """The method's algorithm: a direction d per preconditioned parameter (the step
        is ``-lr * d``) and what the solve did. ``pending``: what ``backward`` left (None
        in the ordinary loop). Changes nothing that :meth:`commit` does not."""
        raise NotImplementedError

    def gradient_params(self) -> list[Tensor]:
        """The parameters that follow their plain gradient (``.grad``) this step: those
        of modules without a handler, and hooked ones whose module recorded nothing
        (warned about, :meth:`_warn_stray`)."""
        stray = self.stray_params()
        self._warn_stray(stray)
        return self.engine.plain_params + stray

    def commit(self) -> None:
        """Keep the method's state of this step, once the update succeeded."""

    def l2_term(self, p: Tensor) -> Tensor | None:
        """``weight_decay_mode="l2"``: ``wd * p``, the gradient of (wd/2)||p||^2 that the
        method adds to the gradient of the loss before preconditioning (``wd``: the
        weight_decay of p's param group); None when there is none to add."""
        if self.weight_decay_mode != "l2":
            return None
        decay = self._group_of(p)["weight_decay"]
        return p.detach() * decay if decay else None

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The param group of ``p`` (one dict lookup: the map is rebuilt only after
        ``add_param_group``)."""
        if self._group_index is None:
            self._group_index = {id(q): i for i, g in enumerate(self.param_groups) for q in g["params"]}
        return self.param_groups[self._group_index[id(p)]]

    def _phase(self, name: str) -> "_PhaseTimer":
        """``with self._phase(name):`` adds the seconds of the block to
        ``last_info.seconds[name]`` (a plain context manager: a few per step)."""
        return _PhaseTimer(self, name)

    def apply_directions(self, directions: dict[Tensor, Tensor]) -> None:
        """Check every direction is finite, then decorate and apply them (all or nothing).

        Multi-tensor (``torch._foreach_*``) kernels: one finiteness check for all
        directions and a few calls per param group, with the arithmetic of the
        per-tensor formulas in the module docstring.
        """
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
        # The step's one finiteness check: one multi-tensor 2-norm and one host sync for
        # all directions (the sum of the norms is NaN or inf iff a direction has a NaN or
        # inf, or a finite norm overflowed: the exact per-tensor check tells them apart).
        if checked and not math.isfinite(float(_sum_of(torch._foreach_norm([d for _, d in checked])))):
            bad = [p for p, d in checked if not all_finite(d)]
            if bad:
                raise NonFiniteError(
                    f"the step direction of parameter {self._name(bad[0])} has NaN or inf; nothing was changed"
                )
        for group, params, ds in work:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            if decay and self.weight_decay_mode == "decoupled":
                torch._foreach_mul_(params, 1 - lr * decay)
            if momentum:
                buffers, old, new = [], [], []
                for p, d in zip(params, ds):
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        old.append(buf)
                        new.append(d)
                    buffers.append(buf)
                if old:
                    torch._foreach_mul_(old, momentum)
                    torch._foreach_add_(old, new)
                ds = buffers
            torch._foreach_add_(params, ds, alpha=-lr)
        self.extra_state["step"] += 1

    def stray_params(self) -> list[nn.Parameter]:
        """Parameters of hooked layers that got a gradient this step although their
        module recorded nothing (its forward was bypassed: the weights were used
        functionally). They follow the plain gradient (see :meth:`_warn_stray`)."""
        return self.engine.stray_params()

    def _warn_stray(self, params: Sequence[Tensor]) -> None:
        """One warning per optimizer and parameter: it has a gradient that the method
        cannot precondition, so it follows the plain gradient (never silently frozen)."""
        names = [self._names.get(id(p), "?") for p in params]
        new = [n for n in names if n not in self._warned_stray]
        if new:
            self._warned_stray.update(new)
            warnings.warn(
                f"gramopt: {', '.join(new)} received a gradient, but the hooks of their module recorded "
                "nothing (its weights were used without calling the module, e.g. F.linear(x, layer.weight)); "
                "they follow the plain gradient of the loss",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def _warn_unsupported(self, names: Sequence[str], tied: Sequence[str] = ()) -> None:
        """One warning for the parameters no handler covers (the default policy), one for
        tied parameters that a module without a handler shares (``tied``: the engine's
        :attr:`~gramopt.capture.engine.CaptureEngine.tied_fallbacks`), and one when the
        method preconditions no layer of the model at all."""
        if tied:
            warnings.warn(
                f"gramopt: {type(self).__name__} cannot precondition the tied parameters {'; '.join(tied)}: their "
                "per-sample rows need every module that uses them, so they follow the plain gradient of the loss "
                "(pass unsupported='error' to refuse them, or register a handler for that module with "
                "gramopt.register_handler)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        if names:
            by_reason: dict[str, list[str]] = {}  # the reason unsupported="error" would give, and its fix
            for name in names:
                by_reason.setdefault(self.engine.unsupported_reasons.get(name, "no gramopt handler"), []).append(name)
            warnings.warn(
                f"gramopt: {type(self).__name__} cannot precondition these parameters; they follow the plain "
                "gradient of the loss:\n  - "
                + "\n  - ".join(f"{', '.join(group)}: {reason}" for reason, group in by_reason.items())
                + "\n(register a handler for a module without one with gramopt.register_handler; pass "
                "unsupported='error' to refuse these parameters instead)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        if not self.engine.layers and any(len(g["params"]) for g in self.param_groups):
            warnings.warn(
                f"gramopt: {type(self).__name__} preconditions no layer of this model (none it supports has "
                "trainable parameters): every parameter follows the plain gradient, i.e. SGD",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def _warn_escaped(self, names: str) -> None:
        """The capture engine found parameters used outside their modules' calls
        (:meth:`~gramopt.capture.engine.CaptureEngine.audit_uses`)."""
        warnings.warn(
            f"gramopt: {type(self).__name__} cannot precondition {names}: the model uses them outside the calls of "
            "the modules that own them (e.g. F.linear(h, tok.weight) for a tied head), which the hooks cannot see; "
            "they follow the plain gradient of the loss from now on (share the parameter between modules instead, "
            "head.weight = tok.weight, and call the modules, to precondition it)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def _watch_ignored_gradients(self, layers: Sequence[Any]) -> None:
        """Methods whose step ignores ``.grad`` of the preconditioned layers (FNGD, GGN)
        remember it after each backward, to warn when it is modified (clipping)."""
        if self.reads_gradients == "plain":
            self.engine.watch_gradients(p for layer in layers for p in layer.params)  # (blocks: each once)

    def _probe_params(self, plain: Sequence[Tensor]) -> list[nn.Parameter]:
        """The parameters whose ``.grad`` a method's ``backward`` fills besides ``plain``
        (those whose step reads it): until the first step succeeds, for a method whose
        step ignores ``.grad`` of the layers it preconditions (:attr:`reads_gradients`
        ``"plain"``: GGN, FNGD), those layers' trainable parameters, else none.

        In the ordinary loop ``loss.backward()`` fills every ``.grad``, and :meth:`step`
        warns when one it ignores was modified (``clip_grad_norm_``). The method's own
        ``backward`` computes no weight gradients of its layers; filling them on the
        first step (the gradient of the mean loss, from the same backward pass, given to
        :meth:`_add_gradients` with ``probe``) gives the uniform loop the same warning.
        Later steps leave that ``.grad`` empty: computing it every step would cost weight
        gradients that the step never reads."""
        if not self._gradient_probe:
            return []
        known = {id(p) for p in plain}
        return [p for block in self.engine.blocks for p in block.params if p.requires_grad and id(p) not in known]

    def _add_gradients(
        self, params: Sequence[Tensor], grads: Sequence[Tensor | None], probe: Sequence[Tensor] = ()
    ) -> list[Tensor]:
        """Add ``grads`` (a method's ``backward``: the gradients of its mean loss, None
        where one was not reached) to ``.grad`` of ``params`` (in their dtype), and
        remember ``.grad`` of ``probe`` (:meth:`_probe_params`) as it is then, for the
        warning about a modified one. Returns the parameters that received a gradient."""
        received = []
        for p, g in zip(params, grads):
            if g is not None:
                g = g if g.dtype == p.dtype else g.to(p.dtype)
                p.grad = g if p.grad is None else p.grad + g
                received.append(p)
        self.engine.remember_gradients(probe)
        return received

    def _warn_modified_gradients(self) -> None:
        if self.reads_gradients != "plain" or self._warned_gradients or not self.engine.remembers_gradients():
            return
        params = [p for layer in self.engine.blocks for p in layer.params]
        modified = self.engine.modified_gradients(params)
        if modified:
            self._warned_gradients = True
            names = ", ".join(self._names.get(id(p), "?") for p in modified[:5])
            warnings.warn(
                f"gramopt: .grad of {names}{' ...' if len(modified) > 5 else ''} was modified after backward "
                f"(gradient clipping such as torch.nn.utils.clip_grad_norm_?), but {type(self).__name__} computes "
                "the step of these layers from the per-sample gradients it captured and ignores their .grad: "
                "clipping .grad has no effect there; pass max_update_norm=... to clip the update instead",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def _check_micro_batches(self, pending: PendingBatch | None) -> None:
        """Micro-batches of unequal sizes accumulated by ``loss.backward()`` (not by the
        optimizer's ``backward``, which weighs them exactly): the step is that of the
        concatenated batch only if each micro-batch's mean loss was multiplied by b_m / B."""
        if not self.engine.accumulated():  # one micro-batch: nothing to compare
            return
        sizes = self.engine.micro_batch_sizes()
        own = pending.micro_batches if pending is not None else 0
        if len(set(sizes)) > 1 and own != len(sizes) and not self._warned_micro:
            self._warned_micro = True
            warnings.warn(
                f"gramopt: micro-batches of unequal sizes {sizes} were accumulated with loss.backward(): the "
                "step (and .grad) is that of the concatenated batch only if each micro-batch's mean loss was "
                "multiplied by b_m / B (dividing by the number of micro-batches is exact for equal sizes "
                "only); opt.backward(output, target) weighs micro-batches exactly",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def _clip(self, directions: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """Scale every direction by ``min(1, max_update_norm / ||d||)`` (d: all together)."""
        values = [d for d in directions.values() if d.numel()]
        if not values:
            return directions
        norm = float(torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(values)])))
        if not math.isfinite(norm) or norm <= self.max_update_norm:
            return directions  # (a non-finite direction is refused by apply_directions)
        factor = self.max_update_norm / norm
        return {p: d * factor for p, d in directions.items()}

    def _name(self, p: Tensor) -> str:
        return f"{self._names.get(id(p), '?')} (shape {tuple(p.shape)})"

    # -- state ---------------------------------------------------------------------------
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
            self._validate_group(group)
        super().load_state_dict(state_dict)
        self.extra_state = _clone_tree(extra)

    @property
    def steps_taken(self) -> int:
        return int(self.extra_state["step"])


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


def _check_params(names: dict[int, str], params: list[Tensor]) -> None:
    """ValueError unless every parameter belongs to the model (``names``: id -> name) and
    all are real, dense and floating point, of one dtype on one device (the sample-space
    systems couple the layers)."""
    kinds: dict[tuple[torch.dtype, torch.device], str] = {}
    for p in params:
        if id(p) not in names:
            raise ValueError("every parameter given to the optimizer must belong to the model")
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


def _weak_callback(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` through a weak reference (nothing once its object is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call


def _sum_of(scalars: list[Tensor]) -> Tensor:
    """The sum of 0-d tensors (of possibly different dtypes), one tensor."""
    if len({t.dtype for t in scalars}) > 1:
        scalars = [t.double() for t in scalars]
    return torch.stack(scalars).sum() if len(scalars) > 1 else scalars[0]


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
