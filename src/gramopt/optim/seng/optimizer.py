"""Sketchy empirical natural gradient, Algorithms 1-2 of
Minghan Yang, Dong Xu, Zaiwen Wen, Mengyun Chen, Pengxiang Xu, "Sketchy Empirical
Natural Gradient Methods for Deep Learning", arXiv:2006.05924, 2020.

Per Linear/Conv layer l (weight and bias together; also Embedding and norm layers),
with per-sample loss gradients u_i (rows of U_l) and the batch gradient g_l:

    d_l = (M_l + lam_k I)^{-1} g_l,   M_l = (1/b) sum_i u_i u_i^T          (Eq. 2, 5, 7)
        = (g_l - U_l^T beta) / lam_k,  beta = (U_l U_l^T + b lam_k I)^{-1} U_l g_l  (Eq. 8-9)
    theta <- theta - lr d                                             (Algorithm 2)

Algorithm 1, per step k and layer l:

    if k mod T == 0:  rebuild U_l (explicit) or its factors G_l, A_l (implicit)
    else:             reuse them, with the current step's g_l
    explicit layer (fewer than ``implicit.threshold`` parameters):
        draw Omega_k (Eq. 14), solve the sketched LS problem (Eq. 11-12), d by Eq. 13
    implicit layer:
        draw Omega_G, Omega_A (Eq. 17), d by Eq. 24 (U g by Eq. 19, U U^T by Eq. 21,
        U^T beta by Eq. 23)

``sketch=None`` draws no sketch (the exact Eq. 9 for explicit layers). The per-sample
gradients come from the ordinary backward pass of a *mean* loss (the capture engine's
output-gradients times b), so both loops work::

    opt.zero_grad(); loss = opt.backward(model(x), y); opt.step()    # uniform loop
    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()     # ordinary loop

Momentum and decoupled weight decay decorate d in the base class; L2 weight decay
(the default, the paper's) adds wd * p to g_l before the solve.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.engine import Layer, trainable
from gramopt.errors import CaptureError, NonFiniteError
from gramopt.linalg.dense import SolveInfo, all_finite
from gramopt.losses import GaussNewtonLoss, get_loss
from gramopt.optim.base import Batch, MethodNeeds, SampleSpaceOptimizer, check_hyper
from gramopt.optim.compat import positional_deprecated
from gramopt.optim.seng.config import ImplicitConfig, SketchConfig
from gramopt.optim.seng.explicit import ExplicitCurvature
from gramopt.optim.seng.implicit import ImplicitCurvature

Damping = float | Callable[[int], float]

#: ``local_gradient`` values: the global gradient (Eq. 26) or each rank's own.
LOCAL_GRADIENTS = ("global", "own")
#: The constructor's lr and damping (the centres of ``gramopt compare``'s grids, which add momentum 0.9).
DEFAULT_LR, DEFAULT_DAMPING = 0.1, 1.0


_SKIPPED_HINT = (
    " (with curvature_every > 1 the forward pass of a step that reuses the cached curvature captures "
    "nothing: if requires_grad or the optimizer's state changed between the forward pass and step(), "
    "run the forward and backward pass again)"
)


def _weak_filter(method: Callable[[Layer], bool]) -> Callable[[Layer], bool]:
    """``method`` through a weak reference (True once its object is gone)."""
    ref = weakref.WeakMethod(method)

    def capture(layer: Layer) -> bool:
        bound = ref()
        return True if bound is None else bound(layer)

    return capture


@dataclass
class SketchyBatch(Batch):
    """SENG's batch: what :meth:`SENG.commit` keeps once the update succeeded: the
    curvature cache per layer, the sketch generator after this step's draws and the
    scheduled damping per param group."""

    curvature: dict[str, Any] | None = None
    sketch_generator: torch.Generator | None = None
    dampings: list[float] | None = None


class SENG(SampleSpaceOptimizer):
    """Sketchy empirical natural gradient: ``delta_l = -lr (M_l + damping I)^{-1} g_l``.

    Args:
        model: the network (its supported layers are hooked).
        lr: step size alpha_k, > 0 (LR schedulers work as usual). Default 0.1, with
            ``damping=1`` the centre of ``gramopt compare``'s grids (docs/guides/tuning.md).
        damping: lam_k > 0 (default 1.0), or a callable ``step -> lam_k`` (e.g.
            :class:`~gramopt.optim.schedules.DampingDecay`, Appendix A). A callable is
            evaluated at every step and its value written to each param group's
            ``"damping"``; ``state_dict()`` keeps the step, not the callable: pass the
            same callable when restoring.
        momentum: heavy-ball momentum on the direction, in [0, 1).
        weight_decay: the weight-decay coefficient wd >= 0 (see ``weight_decay_mode``).
        curvature_every: T: U (or the factors) is rebuilt on steps 0, T, 2T, ... and
            reused in between with the current gradient (Algorithm 1), int >= 1.
        sketch: a :class:`SketchConfig` or None (no sketching).
        loss: ``"cross_entropy"`` or ``"mse"`` (for :meth:`backward`; in the ordinary
            loop use the same loss with mean reduction).
        implicit: an :class:`ImplicitConfig` (default ``ImplicitConfig()``: layers from
            2^20 parameters on are implicit).
        params: optional parameters / param groups (default: all trainable ones).
        unsupported: ``"gradient"`` (default: plain-gradient steps for parameters no
            handler covers, with one warning naming them) or ``"error"`` (refused by name).
        max_update_norm: None or c > 0: clip the direction's norm (see
            :class:`~gramopt.optim.base.SampleSpaceOptimizer`). ``clip_grad_norm_`` on
            ``.grad`` also takes effect: SENG's step reads g from ``.grad``.
        distributed: None, ``"exact"`` (the step of all ranks' batches concatenated) or
            ``"local"`` (Eq. 25-26, block-diagonal), see :mod:`gramopt.distributed`.
        local_gradient: under ``distributed="local"``, the gradient each rank's block
            preconditions: ``"global"`` (default, Eq. 26: the global batch's mean-loss
            gradient g_k, one more all-reduce before the solve) or ``"own"`` (the rank's
            own g_r, no extra communication; not in the paper). Without
            ``distributed="local"`` it has no effect.
        weight_decay_mode: ``"l2"`` (default) or ``"decoupled"``. ``"l2"`` is the paper's
            setting (its experiments tune weight decay in {5e-4, 2e-4, 1e-4}, the scale
            of an L2 term of the loss, the form of ``torch.optim.SGD``'s weight_decay):
            d = (M_l + lam I)^{-1} (g_l + wd p_l), the curvature M_l being the empirical
            Fisher of the data loss (the per-sample gradients do not include the
            regularizer). ``"decoupled"``: ``p <- p - lr * wd * p`` next to the step.

    ``last_info`` tells what the last step did; ``extra_state["curvature"]`` holds the
    cached curvature per layer (see :mod:`gramopt.optim.seng.explicit` and
    :mod:`gramopt.optim.seng.implicit`).
    """

    #: the per-sample gradients of the mean loss, and g of every layer from .grad
    needs = MethodNeeds(rows="loss_gradients", reads_gradients="all", weight_decay_modes=("l2", "decoupled"))
    batch_type = SketchyBatch

    @positional_deprecated("momentum", "weight_decay", "curvature_every", "sketch", "loss")
    def __init__(
        self,
        model: nn.Module,
        lr: float = DEFAULT_LR,
        damping: Damping = DEFAULT_DAMPING,
        *,
        loss: str | GaussNewtonLoss = "cross_entropy",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        curvature_every: int = 1,
        sketch: SketchConfig | None = None,
        implicit: ImplicitConfig | None = None,
        params: Iterable[Any] | None = None,
        unsupported: str = "gradient",
        distributed: str | None = None,
        weight_decay_mode: str = "l2",
        local_gradient: str = "global",
        max_update_norm: float | None = None,
    ) -> None:
        if local_gradient not in LOCAL_GRADIENTS:
            raise ValueError(f"local_gradient must be one of {LOCAL_GRADIENTS}, got {local_gradient!r}")
        self.local_gradient = local_gradient
        self.loss = get_loss(loss)
        if isinstance(curvature_every, bool) or not isinstance(curvature_every, int) or curvature_every < 1:
            raise ValueError(f"curvature_every must be an int >= 1, got {curvature_every!r}")
        if sketch is not None and not isinstance(sketch, SketchConfig):
            raise ValueError(f"sketch must be a gramopt.SketchConfig or None, got {type(sketch).__name__}")
        if implicit is None:
            implicit = ImplicitConfig()
        if not isinstance(implicit, ImplicitConfig):
            raise ValueError(f"implicit must be a gramopt.ImplicitConfig or None, got {type(implicit).__name__}")
        self.damping_schedule: Callable[[int], float] | None = damping if callable(damping) else None
        initial = self._scheduled_damping(0) if self.damping_schedule is not None else damping
        self.curvature_every, self.sketch, self.implicit = curvature_every, sketch, implicit
        defaults = dict(lr=lr, damping=initial, momentum=momentum, weight_decay=weight_decay)
        super().__init__(
            model, params, defaults, unsupported, distributed=distributed, weight_decay_mode=weight_decay_mode,
            max_update_norm=max_update_norm,
        )
        self.implicit_layers = {layer.name for layer in self.engine.blocks if self._is_implicit(layer)}
        self._check_sketch_sizes()
        self.extra_state["curvature"] = {}
        if sketch is not None:
            seed = sketch.seed if sketch.seed is not None else self._draw_seed()
            self.extra_state["sketch_rng"] = torch.Generator().manual_seed(seed).get_state()
        if curvature_every > 1 and self.sync is None:
            # Between refreshes a step reads only .grad and the cached curvature: the forward
            # pass saves no inputs and the backward pass records no output-gradients there.
            # (a weak reference: the hooks on the model must not keep the optimizer alive)
            self.engine.capture_filter = _weak_filter(self._capture_needed)

    def _skipped_hint(self) -> str:
        return _SKIPPED_HINT if self.engine.capture_filter is not None else ""

    def _capture_needed(self, layer: Layer) -> bool:
        """Whether the coming step refreshes the curvature of ``layer`` (asked by the
        engine at the layer's forward call): on every ``curvature_every``-th step, and when
        the layer has no cached curvature for the parameters that require grad now (the
        curvature of a tied layer is its block's, :attr:`CaptureEngine.blocks`)."""
        if self.steps_taken % self.curvature_every == 0:
            return True
        layer = self.engine.block_of(layer)
        state = self.extra_state["curvature"].get(layer.name)
        return state is None or state.get("covered") != [p.requires_grad for p in layer.params]

    # -- configuration -------------------------------------------------------------------
    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        check_hyper("damping", group["damping"], inclusive=False)

    def _scheduled_damping(self, step: int) -> float:
        value = self.damping_schedule(step)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"the damping schedule must return a finite number > 0, got {value!r} at step {step}")
        return float(value)

    def _is_implicit(self, layer: Layer) -> bool:
        """Whether the layer keeps low-rank factors (its handler gives their layout: Linear,
        ungrouped Conv1d/2d; not a tied block, whose Gram has the members' cross terms that
        Eq. 20 has not) and has at least ``implicit.threshold`` parameters."""
        threshold = self.implicit.threshold
        if threshold is None or layer.low_rank_layout() is None:
            return False
        return sum(p.numel() for p in layer.params) >= threshold

    def _check_sketch_sizes(self) -> None:
        """A sketch larger than a layer (or a factor side) is an error."""
        sketch = self.sketch
        if sketch is None:
            return
        for layer in self.engine.blocks:
            if layer.name in self.implicit_layers:
                if isinstance(sketch.factor_size, int):
                    layout = layer.low_rank_layout()
                    n_g, n_a = layout.output_features, layout.input_features
                    if sketch.factor_size > min(n_g, n_a):
                        raise ValueError(
                            f"SketchConfig.factor_size={sketch.factor_size} is larger than implicit layer "
                            f"{layer.name} (factor sides n_G={n_g}, n_A={n_a}); use at most {min(n_g, n_a)} or a "
                            "fraction"
                        )
            elif isinstance(sketch.size, int):
                n = sum(p.numel() for p in layer.params)
                if sketch.size > n:
                    raise ValueError(
                        f"SketchConfig.size={sketch.size} is larger than layer {layer.name} ({n} parameters); "
                        f"use at most {n} rows or a fraction in (0, 1]"
                    )

    # -- the step ------------------------------------------------------------------------
    def global_gradient_params(self, batch: Batch) -> list[Tensor]:
        """``"exact"`` (base class), and ``"local"`` with ``local_gradient="global"``: every
        ``.grad`` becomes the global mean-loss gradient ``sum_r (b_r / B) g_r`` (Eq. 26)."""
        if self.sync is not None and self.sync.policy == "local" and self.local_gradient == "global":
            params = [p for g in self.param_groups for p in g["params"]]
            for p in params:  # a rank's NaN would reach every rank's g: fail here, where it arose
                if p.grad is not None and not all_finite(p.grad):
                    raise NonFiniteError(
                        f"the gradient of parameter {self._name(p)} has NaN or inf (is the loss finite?); nothing was "
                        "changed"
                    )
            return params
        return super().global_gradient_params(batch)

    def _layer_dampings(self, step: int) -> tuple[dict[int, float], list[float]]:
        """lam_k per parameter (by id) and per group."""
        per_group = [
            self._scheduled_damping(step) if self.damping_schedule is not None else float(group["damping"])
            for group in self.param_groups
        ]
        by_param = {
            id(p): lam for group, lam in zip(self.param_groups, per_group, strict=True) for p in group["params"]
        }
        return by_param, per_group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "implicit_layers"):  # after construction: the new layers' kind
            self.implicit_layers = {layer.name for layer in self.engine.blocks if self._is_implicit(layer)}
            self._check_sketch_sizes()

    def directions(self, batch: SketchyBatch) -> dict[Tensor, Tensor]:
        """Algorithm 1 for every layer: ``d_l = (g_l - U_l^T beta) / lam``. The cache,
        the sketch generator and the scheduled damping are kept by :meth:`commit`."""
        step = self.steps_taken
        damping_of, per_group = self._layer_dampings(step)
        layers: dict[str, Layer] = {}
        grads: dict[str, list[Tensor]] = {}
        covered: dict[str, list[bool]] = {}  # which of the layer's parameters require grad
        for layer in self.engine.blocks:  # (layers sharing a parameter: one block)
            params = trainable(layer)  # a parameter frozen after construction is left alone
            present = [p.grad for p in params]
            if all(g is None for g in present):
                continue
            layers[layer.name] = replace(layer, params=params)
            covered[layer.name] = [p.requires_grad for p in layer.params]
            # NaN/inf in g surfaces in U g (or, sketched, in the direction): both are refused
            grads[layer.name] = [
                torch.zeros_like(p) if g is None else self._regularized(p, g)
                for p, g in zip(params, present, strict=True)
            ]
        stray = self.engine.stray_params()  # (they follow the plain gradient, warned about by the base)
        for p in stray:
            for name in [n for n, layer in layers.items() if any(p is q for q in layer.params)]:
                del layers[name], grads[name], covered[name]  # its module recorded nothing
        if not grads and not stray and all(p.grad is None for p in self.engine.plain_params):
            raise CaptureError(
                "SENG.step() found no gradient: call loss.backward() (mean loss) or opt.backward(model(x), y) first"
            )
        cache = dict(self.extra_state["curvature"])
        # a cache built for another set of trainable parameters is stale
        stale = [name for name in grads if cache.get(name, {}).get("covered") != covered[name]]
        if step % self.curvature_every == 0:
            stale = list(grads)
        if stale:
            with self._phase("curvature"):
                self._refresh(batch, cache, stale, covered)
        generator = None
        if self.sketch is not None:
            generator = torch.Generator()
            generator.set_state(self.extra_state["sketch_rng"])
        directions: dict[Tensor, Tensor] = {}
        methods: dict[str, None] = {}
        fallbacks: list[str] = []
        jitter = 0.0
        combined: list[Tensor] = []  # U^T beta per parameter, made (g - U^T beta) / lam below
        subtracted: list[Tensor] = []
        divisors: list[float] = []
        for name, layer_grads in grads.items():
            with self._phase("solve"):
                layer = layers[name]
                lams = {damping_of[id(p)] for p in layer.params}
                if len(lams) != 1:
                    raise ValueError(
                        f"layer {name} has parameters in param groups with different damping {sorted(lams)}"
                    )
                lam = lams.pop()
                curvature = self._curvature(layer, cache[name])
                rows = curvature.sketch_rows(self.sketch)
                sampling = self.sketch.sampling if self.sketch is not None else "uniform"
                beta, info = curvature.coefficients(layer_grads, lam, rows, sampling, generator)
                cache[name] = {**curvature.state(), "covered": covered[name]}  # with the Cholesky factor it kept
                methods[info.method] = None
                if info.fallback:
                    fallbacks.append(info.fallback)
                jitter = max(jitter, info.jitter)
                # a fallback's jitter j raised b lam to b lam + j: Eq. 9 holds with that lam
                shift = lam + info.jitter / curvature.batch
            with self._phase("direction"):
                for p, g, t in zip(curvature.params, layer_grads, curvature.combine(beta), strict=True):
                    directions[p] = t
                    combined.append(t)
                    subtracted.append(g if g.dtype == t.dtype else g.to(t.dtype))
                    divisors.append(-shift)
        with self._phase("direction"):
            # (g - U^T beta) / lam for all layers in two multi-tensor calls, as
            # (U^T beta - g) / (-lam): the same floats (negation is exact)
            if combined:
                torch._foreach_sub_(combined, subtracted)
                torch._foreach_div_(combined, divisors)
        batch.curvature, batch.sketch_generator, batch.dampings = cache, generator, per_group
        batch.solve = SolveInfo(", ".join(methods) or "none", jitter=jitter, fallback="; ".join(fallbacks) or None)
        return directions

    def _regularized(self, p: Tensor, g: Tensor) -> Tensor:
        """g + wd * p under ``weight_decay_mode="l2"`` (the gradient of loss + (wd/2)||p||^2), else g."""
        l2 = None if g.is_sparse else self.l2_term(p)  # (a sparse g is refused with a clear error)
        return g if l2 is None else g + l2.to(g.dtype)

    def commit(self, batch: SketchyBatch) -> None:
        """Keep this step's cache, sketch generator state and scheduled damping."""
        self.extra_state["curvature"] = batch.curvature
        if batch.sketch_generator is not None:
            self.extra_state["sketch_rng"] = batch.sketch_generator.get_state()
        if self.damping_schedule is not None:
            for group, lam in zip(self.param_groups, batch.dampings, strict=True):
                group["damping"] = lam

    def _refresh(self, batch: Batch, cache: dict[str, Any], names: list[str], covered: dict[str, list[bool]]) -> None:
        """Rebuild the curvature of ``names`` from this step's per-sample gradients (of
        the parameters that require grad now)."""
        b = batch.captured_samples()  # (distributed="exact": the global batch's)
        if b is None:
            raise batch.missing_captures(
                "SENG needs the per-sample gradients of this step, but no backward pass reached a hooked "
                "layer: run the forward pass in training mode with autograd enabled, then loss.backward()"
                + self._skipped_hint()
            )
        factors = batch.factors(scale=float(b))  # mean loss -> per-sample loss gradients
        sketch = self.sketch
        leverage = sketch is not None and sketch.sampling == "leverage"
        for name in names:
            if name not in factors:
                raise CaptureError(
                    f"layer {name} has a gradient but no captured per-sample gradients" + self._skipped_hint()
                )
            if name in self.implicit_layers:
                sketched = sketch is not None and sketch.factor_size is not None
                built = ImplicitCurvature.build(
                    name, factors[name], self.implicit.rank, sketched, leverage, self.implicit.exact_product
                )
            else:
                sketched = sketch is not None and sketch.size is not None
                built = ExplicitCurvature.build(name, factors[name], sketched, leverage)
            cache[name] = {**built.state(), "covered": covered[name]}

    def _curvature(self, layer: Layer, state: dict[str, Any]) -> ExplicitCurvature | ImplicitCurvature:
        if state["kind"] == "implicit":
            return ImplicitCurvature.from_state(layer, state, self.implicit.exact_product)
        return ExplicitCurvature.from_state(layer, state)

    # -- state ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("gramopt", {"sketch_rng": None})  # (no entry: the base class says so)
        if self.sketch is not None and "sketch_rng" not in extra:
            raise ValueError("this state_dict has no sketch generator state: it was saved by a SENG without sketch")
        super().load_state_dict(state_dict)
