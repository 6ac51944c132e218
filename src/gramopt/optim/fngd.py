"""Inverse-free fast natural gradient descent, FNGD, of
Xinwei Ou, Ce Zhu, Xiaolin Huang, Yipeng Liu, "Inverse-Free Fast Natural Gradient
Descent Method for Deep Learning", arXiv:2403.03473, 2024.

For a Linear or Conv layer l and a batch of M samples, let U_l be the M x p_l matrix of
per-sample loss gradients (one row per sample, weight and bias together; Eq. 11, 13)
and K_l = U_l U_l^T its M x M Gram (Eq. 12). The damped empirical-Fisher step of the
layer (Eq. 5) is, by Sherman-Morrison-Woodbury (Eq. 7-9), a weighted sum of the
per-sample gradients:

    (lam I + U_l^T U_l / M)^{-1} g_l = (1 / lam) U_l^T v_l,
    v_l = (1/M) (1 - (lam I + K_l / M)^{-1} K_l 1 / M),    lam = damping ||K_l||_F   (Eq. 9, 14)

and, with 1/lam folded into the learning rate as Section IV-D does,

    delta_l = -lr * U_l^T v_l.

``damping_mode="relative"`` (default, Eq. 14): lam = damping * ||K_l||_F, so v_l does
not change when U_l is scaled; ``damping_mode="absolute"``: lam = damping, the lambda
of Eq. (5) and Theorem 1 (the paper's "w/o damping rule" ablation of Table IV uses a
constant 0.3). In both modes 1/lam is folded into lr, so a large damping gives the
plain mean gradient (v = 1/M) and lr keeps the meaning of an SGD learning rate.

Since ``1 - (c I + K)^{-1} K 1 = c (c I + K)^{-1} 1``, v_l = lam (K_l + lam M I)^{-1} 1:
one Cholesky solve of a system whose condition number is at most 1 + 1/(damping M),
and v_l does not change when U_l is scaled. ``U_l^T v`` is one weight-gradient
computation with output-gradients weighted per sample (``LayerFactors.rmatvec``), so
U_l is never formed.

Algorithm 1 (coefficient sharing):

1. *estimation*, the first ``coefficient_steps`` steps (the paper: the first epoch):
   build K_l, solve for v_l, step, and keep the running mean of the v_l;
2. *sharing*, every later step: v_l = that mean with the current batch's U_l, so a step
   is one backward pass to the layers' outputs plus one weighted weight-gradient per
   layer: no Gram, no solve (about an SGD step).

The class cannot know the epoch, so ``coefficient_steps`` defaults to
:data:`DEFAULT_COEFFICIENT_STEPS` = 100: the running mean of the v_l then averages 100
batches (its sampling error is a tenth of one batch's spread), about a quarter of the
paper's epoch (CIFAR-10 at batch 128: 391 steps), so a run of a few hundred steps
already shares. Pass ``ceil(n_train / batch_size)`` for the paper's schedule (as
``gramopt train`` and ``gramopt compare`` do). ``coefficient_steps=None`` computes v_l on
every step (SMW-NGD, the paper's "w/o sharing" ablation).

Weight decay, ``weight_decay_mode="l2"`` (default: an L2 term of the loss, the form of
the papers' settings 1e-4 to 5e-4 and of ``weight_decay`` in ``torch.optim.SGD``, the
paper's baseline; FNGD's paper does not state its own): during estimation the
step preconditions the gradient of loss + (wd/2)||p||^2 exactly,
lam (lam I + U_l^T U_l / M)^{-1} (g_l + wd p_l) = U_l^T v_l + x - U_l^T (K_l + lam M I)^{-1} U_l x
with x = wd p_l (Sherman-Morrison-Woodbury, one more solve with the same matrix; the
curvature is the empirical Fisher of the data loss); while sharing, no Gram is formed
and x is added unpreconditioned (its correction is the part inside the span of the
per-sample gradients). ``weight_decay_mode="decoupled"``: ``p <- p - lr * wd * p``
next to the step.

A batch of another size M' than the estimation batches (the short last batch of an
epoch): v_l = (1 - c_l) / M, where c_l = (lam I + K_l/M)^{-1} K_l 1 / M is the
per-sample correction and 1/M the weight of the plain mean gradient. Shared weights
keep that form with M' in place of M: v'_i = (1 - c_(i mod M)) / M' = (M / M') v_(i mod M)
(the first M' coefficients, or the coefficients repeated, rescaled), so the step stays
on the scale of the mean gradient of the short batch and each sample keeps a
correction of the same relative size. During estimation a short batch gets its own
exact v_l, which is applied but not averaged (the running mean is over batches of the
first batch's size).

Parameters of other layers (norms, embeddings, modules without handler) follow the
plain gradient of the mean loss, as in the paper.

In practice sharing behaves like momentum SGD with a per-layer step ``lr * sum(v_l)``
(see benchmarks/notes.md): a learning rate tuned for the preconditioned first epoch can
be too large afterwards.

Usage (uniform loop, or ``loss.backward(); opt.step()`` with a mean loss)::

    opt = gramopt.FNGD(model, lr=0.1, damping=1e-3, momentum=0.9,
                       coefficient_steps=math.ceil(n_train / batch_size))  # one epoch
    opt.zero_grad(); loss = opt.backward(model(x), y); opt.step()
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture import handler_for
from gramopt.capture.factors import LayerFactors
from gramopt.errors import NonFiniteError
from gramopt.linalg.dense import solve_damped_psd
from gramopt.losses import GaussNewtonLoss, get_loss
from gramopt.optim.base import Batch, MethodNeeds, SampleSpaceOptimizer, check_hyper
from gramopt.optim.compat import positional_deprecated

#: Estimation steps before the coefficients are shared when none are given (see the
#: module docstring: the paper estimates during one epoch, which the class cannot know).
DEFAULT_COEFFICIENT_STEPS = 100
#: The constructor's lr and damping (the centres of ``gramopt compare``'s grids, which add momentum 0.9).
DEFAULT_LR, DEFAULT_DAMPING = 0.1, 1e-3

#: ``damping_mode`` values: lam = damping * ||K||_F (Eq. 14) or lam = damping (Theorem 1).
DAMPING_MODES = ("relative", "absolute")


def _preconditioned(module: nn.Module) -> bool:
    """Whether FNGD preconditions ``module``: a dense layer by its handler
    (:attr:`~gramopt.capture.handlers.LayerHandler.dense_layer`: the paper's Linear and
    convolutional layers, transposed and grouped convolutions and attention projections
    included). Every other parameter (norms, embeddings) takes the plain gradient of the
    mean loss, as in the paper: that is the method, not a fallback, so it is not warned
    about."""
    handler = handler_for(module)
    return handler is not None and handler.dense_layer


def fngd_damping(gram: Tensor, damping: float, mode: str = "relative", *, what: str = "FNGD Gram matrix") -> float:
    """lam of Eq. (5): ``damping * ||K||_F`` (``mode="relative"``, Eq. 14) or ``damping``
    (``"absolute"``); ``gram``: K, ``[M, M]``. NonFiniteError for NaN/inf in K."""
    norm = float(torch.linalg.matrix_norm(gram))
    if not math.isfinite(norm):
        raise NonFiniteError(f"the {what} has NaN or inf entries; nothing was changed")
    return damping * norm if mode == "relative" else float(damping)


def fngd_coefficients(
    gram: Tensor, damping: float, *, mode: str = "relative", what: str = "FNGD Gram matrix"
) -> Tensor:
    """v = (1/M) (1 - (lam I + K/M)^{-1} K 1 / M) (Eq. 9) with lam of :func:`fngd_damping`,
    computed as ``lam (K + lam M I)^{-1} 1`` (one Cholesky solve).

    Args:
        gram: K = U U^T, ``[M, M]`` (in the relative mode any positive multiple of it
            gives the same v; in the absolute mode U's rows are the per-sample gradients).
        damping: alpha of Eq. (14) (relative) or lam itself (absolute), > 0.

    Returns:
        v, ``[M]``. A zero Gram (all per-sample gradients zero) gives the limit 1/M.
    """
    m = gram.shape[0]
    lam = fngd_damping(gram, damping, mode, what=what)
    if lam == 0.0:  # relative mode, K = 0
        return torch.full((m,), 1.0 / m, dtype=gram.dtype, device=gram.device)
    rhs = torch.full((m,), lam, dtype=gram.dtype, device=gram.device)
    v, _ = solve_damped_psd(gram, rhs, lam * m, what=what)
    return v


def share_coefficients(mean: Tensor, batch: int) -> Tensor:
    """Shared coefficients for a batch of ``batch`` samples from the mean ``[M]`` of the
    estimation batches: ``(M / batch) * mean[i mod M]`` (see the module docstring)."""
    m = mean.shape[0]
    if batch == m:
        return mean
    index = torch.arange(batch, device=mean.device) % m
    return mean[index] * (m / batch)


@dataclass
class CoefficientBatch(Batch):
    """FNGD's batch: ``estimated``, this step's v_l per layer and the batch size M they
    belong to (estimation with sharing on), for :meth:`FNGD.commit` to average in."""

    estimated: tuple[dict[str, Tensor], int] | None = None


class FNGD(SampleSpaceOptimizer):
    """Fast natural gradient descent: ``delta_l = -lr * U_l^T v_l`` per Linear/Conv layer.

    Args:
        model: the network; its dense layers are preconditioned (Linear, every convolution and
            transposed convolution, the projections of ``nn.MultiheadAttention``: the handlers
            that set ``dense_layer``), every other parameter takes the plain gradient.
        lr: step size (the paper's eta with its 1/lam folded in), > 0. Default 0.1, with
            ``damping=1e-3`` the centre of ``gramopt compare``'s grids (docs/guides/tuning.md).
        damping: alpha of Eq. (14) (default 1e-3): lam_l = damping * ||K_l||_F, > 0 (at 0
            the folded-in form gives v = 0); with ``damping_mode="absolute"``, lam_l = damping. v = lam
            (K + lam M I)^{-1} 1 shrinks the mean-gradient weights 1/M by
            1 / (1 + mu / (lam M)) along each eigenvector of K (eigenvalue mu): damping * M
            >> 1 (relative) is the plain gradient; smaller damping preconditions more and
            shortens the step (raise lr with it).
        momentum: heavy-ball momentum on the direction, in [0, 1).
        weight_decay: the L2 coefficient wd >= 0 (see ``weight_decay_mode``).
        coefficient_steps: T >= 1: estimate during the first T steps, then share their
            mean (default :data:`DEFAULT_COEFFICIENT_STEPS` = 100, see the module
            docstring); None: compute v_l every step (the "w/o sharing" ablation). The
            paper estimates during the first epoch: T = ceil(n_train / batch_size) (what
            ``gramopt train`` and ``gramopt compare`` pass).
        loss: ``"cross_entropy"`` or ``"mse"``, the mean loss :meth:`backward` computes.
        params: optional parameters / param groups (default: all trainable parameters).
        unsupported: ``"gradient"`` (default, a warning naming them) or ``"error"`` for
            parameters the capture cannot handle (e.g. an ``nn.Parameter`` held by a
            Linear subclass's container). Norm and embedding parameters follow the plain
            gradient by the method's design, without a warning.
        max_update_norm: None or c > 0: clip the direction's norm (see
            :class:`~gramopt.optim.base.SampleSpaceOptimizer`); ``clip_grad_norm_`` on
            ``.grad`` does not reach the Linear/Conv layers' step (warned about).
        distributed: None, ``"exact"`` (the step of all ranks' batches concatenated) or
            ``"local"`` (Section VI-A: the ranks' own weighted sums, averaged), see
            :mod:`gramopt.distributed`.
        damping_mode: ``"relative"`` (Eq. 14, default: the paper's rule, which makes v_l
            invariant to the scale of the gradients) or ``"absolute"`` (lam = damping).
        weight_decay_mode: ``"l2"`` (default: the papers' L2 term, preconditioned with
            the gradient, as ``torch.optim.SGD``'s weight_decay) or ``"decoupled"``.

    :meth:`backward` runs one backward pass down to the layers' outputs (no weight
    gradients) and fills ``.grad`` of the plain-gradient parameters, whose step uses it.
    ``.grad`` of Linear/Conv parameters is filled only until the first step succeeds (the
    gradient of the mean loss, from the same pass), so that ``step()`` warns when it was
    modified, e.g. by ``clip_grad_norm_``, as in the ordinary loop: the step ignores it
    (clip with ``max_update_norm``). Later steps leave it empty (it would cost one more
    weight-gradient per layer). The ordinary ``loss.backward(); opt.step()`` works as
    well and gives the same step; its loss must be a mean over the batch (rows of U are
    M times the captured gradients; with a summed loss the step is M times too long).

    :attr:`phase` tells what the next step does, :attr:`sharing` whether sharing is on; ``extra_state`` (saved in
    ``state_dict()``) holds the running means ``coefficients`` (per layer name), their
    ``coefficient_counts`` and ``coefficient_batch`` (M of the estimation batches).
    """

    #: one pass of the mean loss; weight decay as an L2 term (the default) or decoupled
    needs = MethodNeeds(rows="loss_gradients", weight_decay_modes=("l2", "decoupled"))
    batch_type = CoefficientBatch

    @positional_deprecated("momentum", "weight_decay", "coefficient_steps", "loss")
    def __init__(
        self,
        model: nn.Module,
        lr: float = DEFAULT_LR,
        damping: float = DEFAULT_DAMPING,
        *,
        loss: str | GaussNewtonLoss = "cross_entropy",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        coefficient_steps: int | None = DEFAULT_COEFFICIENT_STEPS,
        params: Iterable[Any] | None = None,
        unsupported: str = "gradient",
        distributed: str | None = None,
        damping_mode: str = "relative",
        weight_decay_mode: str = "l2",
        max_update_norm: float | None = None,
    ) -> None:
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if coefficient_steps is not None and (
            isinstance(coefficient_steps, bool)
            or not isinstance(coefficient_steps, numbers.Integral)
            or coefficient_steps < 1
        ):
            raise ValueError(
                "coefficient_steps must be None (no sharing) or an integer >= 1 (the number of "
                f"estimation steps, e.g. the steps of one epoch), got {coefficient_steps!r}"
            )
        self.coefficient_steps = None if coefficient_steps is None else int(coefficient_steps)
        self.damping_mode = damping_mode
        self.loss: GaussNewtonLoss = get_loss(loss)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(
            model, params, defaults, unsupported, layer_filter=_preconditioned, distributed=distributed,
            weight_decay_mode=weight_decay_mode,
            max_update_norm=max_update_norm,
        )
        # The running mean of Algorithm 1, line 7, per layer, over estimation batches of
        # ``coefficient_batch`` samples (saved in state_dict()).
        self.extra_state.update(coefficient_batch=None, coefficients={}, coefficient_counts={})
        self._weights_cache: dict[tuple[str, int], Tensor] = {}  # M' times the shared v_l (from extra_state)

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        check_hyper("damping", group["damping"], inclusive=False)

    @property
    def sharing(self) -> bool:
        """Whether coefficient sharing is on (Algorithm 1): ``coefficient_steps`` (the
        number of estimation steps, an int) is not None."""
        return self.coefficient_steps is not None

    @property
    def phase(self) -> str:
        """``"estimate"`` or ``"share"``: what the next step does."""
        if self.coefficient_steps is None or self.steps_taken < self.coefficient_steps:
            return "estimate"
        return "share"

    # -- step ----------------------------------------------------------------------------
    def directions(self, batch: CoefficientBatch) -> dict[Tensor, Tensor]:
        """Compute (estimation) or reuse (sharing) the coefficients v_l; the direction of
        every Linear/Conv layer is ``U_l^T v_l``."""
        with self._phase("factors"):
            factors = batch.factors()  # (distributed="exact": the global batch's)
            if self.engine.layers and not factors:
                raise batch.missing_captures(
                    "FNGD.step() needs a backward pass of a training-mode forward first: "
                    "opt.backward(model(x), y), or loss.backward() with a mean loss"
                )
            rows = next(iter(factors.values())).num_rows if factors else 0
        estimating = self.phase == "estimate"
        corrections: dict[str, Tensor] = {}  # the L2 term's per-sample weights (estimation)
        if estimating:
            with self._phase("coefficients"):
                estimated = {}
                for name, factor in factors.items():
                    estimated[name], corrections[name] = self._estimate(name, factor)
                # Rows captured from the mean loss are U_l / M: U_l^T v = (U_l / M)^T (M v).
                weights = {name: v * rows for name, v in estimated.items()}
            if self.coefficient_steps is not None:
                batch.estimated = (estimated, rows)
        directions: dict[Tensor, Tensor] = {}
        with self._phase("direction"):
            if not estimating:
                weights = {name: self._shared_weights(name, rows, factor) for name, factor in factors.items()}
            for name, factor in factors.items():
                correction = corrections.get(name)
                coeffs = weights[name] if correction is None else weights[name] - correction
                for p, d in zip(factor.params, factor.rmatvec(coeffs), strict=True):
                    l2 = self.l2_term(p)
                    directions[p] = d if l2 is None else d + l2.to(d.dtype)
        return directions

    def commit(self, batch: CoefficientBatch) -> None:
        """Estimation: this step's v_l join the running mean (Algorithm 1, line 7)."""
        if batch.estimated is not None:
            self._accumulate(*batch.estimated)

    def _estimate(self, name: str, factor: LayerFactors) -> tuple[Tensor, Tensor | None]:
        """v_l of this batch (Eq. 9, 14), ``[M]``, and, under L2 weight decay, the weights
        ``M (K_l + lam M I)^{-1} U_l x`` (``[M]``, x = wd p_l) whose weighted sum of the
        captured rows U_l / M is the L2 term's correction U_l^T (K_l + lam M I)^{-1} U_l x."""
        what = f"FNGD Gram of layer {name}"
        m = factor.num_rows
        gram = factor.gram() * m**2  # K_l: the captured rows are U_l / M
        damping = self._damping(name, factor)
        v = fngd_coefficients(gram, damping, mode=self.damping_mode, what=what)
        terms = [self.l2_term(p) for p in factor.params]
        if all(t is None for t in terms):
            return v, None
        lam = fngd_damping(gram, damping, self.damping_mode, what=what)
        x = [torch.zeros_like(p) if t is None else t for p, t in zip(factor.params, terms, strict=True)]
        projected = factor.matvec(x).to(gram.dtype) * m  # U_l x, [M]
        if lam == 0.0:  # relative mode with K = 0: U_l = 0, no correction
            return v, torch.zeros_like(projected)
        w, _ = solve_damped_psd(gram, projected, lam * m, what=what)
        return v, w * m

    def _damping(self, name: str, factor: LayerFactors) -> float:
        values = {self.group_of(p)["damping"] for p in factor.params}
        if len(values) != 1:
            raise ValueError(
                f"the parameters of layer {name} lie in param groups with different damping {sorted(values)}: "
                "FNGD needs one damping per layer"
            )
        return values.pop()

    def _shared_weights(self, name: str, batch: int, factor: LayerFactors) -> Tensor:
        """M' times the shared v_l for a batch of M' = ``batch`` samples (cached: derived
        from ``extra_state``); a layer never seen during estimation takes the plain
        mean-gradient weights 1/M'."""
        key = (name, batch)
        weights = self._weights_cache.get(key)
        if weights is None:
            mean = self.extra_state["coefficients"].get(name)
            device = factor.params[0].device
            if mean is None:
                weights = torch.ones(batch, dtype=factor.dtype, device=device)
            else:  # (a state_dict may have been loaded from another device)
                weights = share_coefficients(mean.to(device), batch) * batch
            self._weights_cache[key] = weights
        return weights

    def _accumulate(self, estimated: dict[str, Tensor], batch: int) -> None:
        """Running mean (Algorithm 1, line 7) over estimation batches of the first size."""
        state = self.extra_state
        if state["coefficient_batch"] is None:
            state["coefficient_batch"] = batch
        if batch != state["coefficient_batch"]:
            return
        means, counts = state["coefficients"], state["coefficient_counts"]
        for name, v in estimated.items():
            count = counts.get(name, 0) + 1
            mean = means.get(name)
            means[name] = v.clone() if mean is None else mean.to(v.device) + (v - mean.to(v.device)) / count
            counts[name] = count
        self._weights_cache.clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._weights_cache.clear()
