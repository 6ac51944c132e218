"""Gram-Gauss-Newton, Algorithm 1 with Eq. (11) of
Tianle Cai, Ruiqi Gao, Jikai Hou, Siyu Chen, Dong Wang, Di He, Zhihua Zhang, Liwei Wang,
"Gram-Gauss-Newton Method: Learning Overparameterized Neural Networks for Regression
Problems", arXiv:1905.11675, 2019:

    1. fetch a mini-batch B_t; forward pass f = f(w_t, x_B)
    2. J: per-sample output Jacobians, b k rows (one backward pass per output, Section 5)
    3. G = J J^T, the b k x b k Gram matrix                         (never p x p)
    4. w_{t+1} = w_t - lr * J^T (H G + damping I)^{-1} e              (Eq. 11)

with lr = 1/lambda and damping = alpha/lambda in the paper's notation; damping = 0,
lr = 1 and the full batch is the ridgeless Eq. (9). ``e_i`` is the gradient of sample
i's own loss with respect to its outputs and H the per-sample output Hessian:
``mse`` (e = f - y, H = I, the paper's setting) or ``cross_entropy`` (generalized
Gauss-Newton, beyond the paper). The non-symmetric system is solved in the symmetric
form of :mod:`gramopt.losses`: ``x = Q (Q^T G Q + damping I)^{-1} w``.

Output curvature (``curvature=``): H_i = Q_i Q_i^T is replaced by
``Q~_i Q~_i^T`` with s columns per sample, and the rows captured are those of
``M^T = Q~^T J`` (one backward pass per column, with ``grad_outputs = Q~[:, :, j]``):

- ``"exact"``: Q~ = I, the rows of J (one pass per output) and Q_i in the system;
- ``"top"`` (cross-entropy): the exact columns of Q_i for the label and the s-1 most
  probable other classes, per position; the label's column spans e_i, so
  ``delta = -lr M (M^T M + damping I)^{-1} w``; s = k is the exact step;
- ``"sampled"`` (any loss): s random columns with ``E[Q~ Q~^T] = H`` at every position
  at once, plus one pass for e (outside the columns' span), and Sherman-Morrison-Woodbury
  ``delta = -(lr / damping) (g - M (M^T M + damping I)^{-1} M^T g)``, a ``b s`` system.

Usage::

    opt = gramopt.GGN(model, lr=1.0, damping=1e-3, loss="mse")
    opt.zero_grad(); loss = opt.backward(model(x), y); opt.step()
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.distributed import rank as process_rank
from gramopt.errors import DivergenceError, NonFiniteError
from gramopt.linalg.dense import NumericalWarning
from gramopt.losses import GaussNewtonLoss, get_loss
from gramopt.optim.base import Batch, MethodNeeds, SampleSpaceOptimizer, StepInfo, check_hyper
from gramopt.optim.compat import positional_deprecated
from gramopt.optim.ggn.damping import AdaptiveDamping
from gramopt.optim.ggn.solvers import SOLVERS, check_solver_options
from gramopt.optim.ggn.system import GaussNewtonSystem, is_selection
from gramopt.optim.notices import user_stacklevel

#: lr and damping when the constructor is given none, per loss. mse: the paper's lr = 1,
#: damping 0.3; cross-entropy: the per-batch generalized Gauss-Newton step over-fits each
#: batch at lr = 1, so lr 0.3 with damping 10, the setting (with the default curvature
#: "top", s = 3) that trained digits, mnist and recall in every seed tried and reached
#: mnist's rungs first (benchmarks/notes.md, "GGN cross-entropy curvature and defaults";
#: benchmarks/probes/ggn_ce_defaults.py).
DEFAULT_HYPER = {"mse": {"lr": 1.0, "damping": 0.3}, "cross_entropy": {"lr": 0.3, "damping": 10.0}}
#: The default number of columns per sample (per position for "top").
DEFAULT_SAMPLES = {"top": 3, "sampled": 1}
#: The default output curvature per loss. Cross-entropy: "top" (s = 3), which reached the
#: comparison's rungs before "exact" and "sampled" at a fraction of "exact"'s step cost
#: (benchmarks/notes.md, as above; benchmarks/ggn_curvature.py). With more than one position
#: per sample ([b, C, T] logits) the default is "sampled": "top" needs b P s rows, "sampled"
#: b (s + 1).
DEFAULT_CURVATURE = {"mse": "exact", "cross_entropy": "top"}
_DEFAULT = object()
#: How far apart the seeds of two ranks' draws lie (an odd constant, the golden-ratio
#: multiplier of Fibonacci hashing, so that rank r's seeds do not run into rank r+1's).
_RANK_STRIDE = 0x9E3779B97F4A7C15


@dataclass
class GaussNewtonBatch(Batch):
    """GGN's batch. ``per_sample`` holds Q ``"q"`` ``[b, r, m]`` (None: the identity),
    w ``"w"`` ``[b, m]`` (None for sampled systems: computed from the factors) and c
    ``"outside"`` ``[b, r]`` (sampled systems: g = R^T c) of the captured rows R.

    Attributes:
        positions: P, the positions per sample of the last micro-batch's output
            (:meth:`GGN.positions_per_sample`): the system's damping is ``damping * P``.
        curvature: the output curvature of the batch (:meth:`GGN.batch_curvature`).
        adapt: what damping adaptation needs to check this step (None: unchecked).
        predicted: the quadratic model's change ``m(delta)`` of the step (set by
            ``directions`` for a checked step).
        before: the parameters and momentum buffers before the update, to undo a
            rejected step with (``AdaptiveDamping(reject=True)`` on a checked step).
        rejected: whether the step was undone (``last_info.rejected``).
    """

    positions: int = 1
    curvature: str | None = None
    adapt: dict[str, Any] | None = None
    predicted: float | None = None
    before: tuple[list[Tensor], list[Tensor], list[Tensor | None]] | None = None
    rejected: bool = False

    def join(self, later: Batch) -> GaussNewtonBatch:
        """:meth:`Batch.join`; damping adaptation measures single batches, so an
        accumulated step is not checked (said once per step)."""
        if self.adapt is not None or getattr(later, "adapt", None) is not None:
            warnings.warn(
                "GGN damping_adaptation measures its reduction ratio on single batches: the damping stays fixed "
                "on a step that accumulates several backward calls",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        joined = super().join(later)
        joined.adapt = None
        return joined


@dataclass
class GGNStepInfo(StepInfo):
    """:class:`~gramopt.optim.base.StepInfo` and the output curvature the step used
    (``"exact"``, ``"top"`` or ``"sampled"``: the default "top" becomes "sampled" for
    outputs with several positions per sample), and whether the step was undone
    (``AdaptiveDamping(reject=True)``: the step raised the loss of its own batch; the
    parameters are those before it)."""

    curvature: str | None = None
    rejected: bool = False


def output_candidates(output: Any) -> list[tuple[str, Tensor]]:
    """The tensors of a model's output that ``opt.backward`` may have been given, with how
    each is found: the output itself (a Tensor), its ``.logits`` (a Hugging Face
    ``ModelOutput``) or its first element (a tuple, list or ``ModelOutput``). Damping
    adaptation re-runs the model and takes the same one from the new output."""
    if isinstance(output, Tensor):
        return [("output", output)]
    found = []
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        found.append(("logits", logits))
    if isinstance(output, (tuple, list)) or callable(getattr(output, "to_tuple", None)):
        try:
            first = output[0]
        except (IndexError, KeyError, TypeError):
            first = None
        if isinstance(first, Tensor):
            found.append(("first", first))
    return found


class GGN(SampleSpaceOptimizer):
    """Gram-Gauss-Newton: ``delta = -lr * J^T (H G + damping I)^{-1} e``, ``G = J J^T``.

    Args:
        model: the network (its supported layers are hooked).
        lr: step size (1/lambda of the paper; 1 is the paper's advice), > 0; default
            :data:`DEFAULT_HYPER` of the loss (1 for mse, 0.3 for cross-entropy).
        damping: Levenberg-Marquardt damping of the first step (alpha/lambda of the paper;
            its experiments use 0.3), >= 0; default :data:`DEFAULT_HYPER` of the loss
            (0.3 for mse, 10 for cross-entropy); ``damping_adaptation`` changes it for later
            steps. 0 is the ridgeless Eq. (9) and needs a nonsingular G; cross-entropy and
            ``curvature="sampled"`` need damping > 0. Cross-entropy outputs with P > 1
            positions per sample (``[b, C, T]``) are damped per position: the system's
            damping is ``damping * P`` (:meth:`positions_per_sample`).
        loss: ``"mse"``, ``"cross_entropy"`` or a :class:`~gramopt.losses.GaussNewtonLoss`
            (e.g. ``CrossEntropyLoss(ignore_index=0)``). Outputs may have any shape
            ``[b, ...]`` (cross-entropy: classes in dim 1, as ``F.cross_entropy``); the
            step is that of the sum of the per-position losses (with the damping per
            position, above), ``backward`` returns their mean.
        solver: name in :data:`SOLVERS`: ``"cholesky"`` (the Gram, then Cholesky),
            ``"cg"``, ``"sketch-pcg"``, ``"nystrom-pcg"`` (matrix-free, never the Gram) or
            ``"auto"`` (see :mod:`gramopt.optim.ggn.solvers`).
        momentum: heavy-ball momentum on the direction, in [0, 1).
        weight_decay: decoupled weight decay, >= 0.
        curvature: ``"exact"``, ``"top"`` (cross-entropy) or ``"sampled"`` (module doc);
            default :data:`DEFAULT_CURVATURE` of the loss ("exact" for mse; "top" for
            cross-entropy, and "sampled" for its outputs with several positions per sample,
            :meth:`batch_curvature`).
        samples: columns per sample s >= 1 (``"top"``: per position, <= the classes);
            default :data:`DEFAULT_SAMPLES`. Only with ``"top"`` or ``"sampled"``.
        seed: the seed of the optimizer's generator for ``"sampled"`` (default: drawn
            from torch's global generator); the draws of step t depend on (seed, t, the rank) only,
            and both live in ``state_dict()``, so a resumed run draws the same columns.
        damping_adaptation: an :class:`AdaptiveDamping` (the default; off under
            ``distributed``) or None for a fixed damping. It costs one extra forward
            pass on each checked step (the first ``warmup`` steps, every ``every``-th
            step, and those a loss surge or a failed check calls:
            :meth:`AdaptiveDamping.due`) and a copy of the parameters, undoes a step
            that raised its own batch's loss (``opt.last_info.rejected``), and needs
            ``opt.backward(model(x), y)`` with the
            model's own output, its ``.logits`` (a Hugging Face ``ModelOutput``) or its
            first element (:func:`output_candidates`).
        divergence: raise :class:`~gramopt.errors.DivergenceError` in ``backward`` when the
            batch loss exceeds ``divergence`` times the first batch's loss (None: never).
        params: optional parameters / param groups (default: all trainable parameters).
        unsupported: ``"gradient"`` (default: plain-gradient steps for parameters no
            handler covers, with one warning naming them) or ``"error"`` (refused by name).
        max_update_norm: None or c > 0: clip the direction's norm (see
            :class:`~gramopt.optim.base.SampleSpaceOptimizer`); GGN's step does not read
            ``.grad`` of its layers, so ``clip_grad_norm_`` cannot clip it (reported:
            below).
        solver_options: the solver's options as a dict (e.g. ``{"tol": 1e-6}``); each
            solver documents those it takes, anything else is a ValueError.
        distributed: None, ``"exact"`` (the step of all ranks' batches concatenated) or
            ``"local"`` (the mean of the ranks' own steps), see :mod:`gramopt.distributed`.

    Rows: ``"exact"`` captures ``b k`` rows (k outputs per sample), ``"top"`` ``b P s``
    (P positions), ``"sampled"`` ``b (s + 1)``. ``"exact"`` and ``"top"`` refuse more than
    :attr:`MAX_ROWS` rows (use ``curvature="sampled"``).

    ``backward(output, target)`` runs one backward pass per row direction (down to the
    layers' outputs: no weight gradients) and returns the mean loss; ``.grad`` is
    filled for plain-gradient parameters (``unsupported="gradient"``), whose step uses
    it, and, until the first ``step()``, for the layers GGN preconditions (the gradient
    of the mean loss, from one more backward pass, once), so that ``step()`` warns when
    it was modified, e.g. by ``clip_grad_norm_``: the step ignores it (clip with
    ``max_update_norm``). Later steps leave that ``.grad`` empty (filling it costs
    10-30% of a step). ``step()`` solves and updates. ``last_info``, a
    :class:`GGNStepInfo`, tells what the solve did (method, fallbacks, seconds), the
    output curvature it used and whether damping adaptation undid the step.

    State: the damping lives in the param groups (``opt.damping`` reads it);
    ``extra_state`` holds the generator's ``seed`` and ``draws``, the ``first_loss``
    (``divergence``) and, with ``damping_adaptation``, the adaptation's own state
    ``extra_state["damping_adaptation"]`` (its floor ``min_damping``, ``loss_average``,
    ``last_ratio``, ``rejected_steps``: :meth:`AdaptiveDamping.initial_state`).

    Gradient accumulation: several ``backward`` calls (micro-batches) before one
    ``step()`` give the step of their concatenated batch: the Jacobian rows, residuals
    and Hessian factors are concatenated, and ``.grad`` of the plain-gradient parameters
    is that of the mean loss over all micro-batches.

    BatchNorm layers in training mode are refused (their batch statistics couple the
    samples' Jacobian rows); in eval mode they are preconditioned like any layer.
    """

    #: Jacobian rows (one backward pass per row direction); BatchNorm in training mode is
    #: refused: its batch statistics couple the Jacobian rows of the samples (eval mode,
    #: with running statistics, works).
    needs = MethodNeeds(rows="jacobian", batchnorm_training=False)
    batch_type = GaussNewtonBatch
    #: the most rows ``"exact"`` and ``"top"`` capture in one step (their Gram is n x n)
    MAX_ROWS = 8192

    @positional_deprecated("loss", "solver", "momentum", "weight_decay")
    def __init__(
        self,
        model: nn.Module,
        lr: float | None = None,
        damping: float | None = None,
        *,
        loss: str | GaussNewtonLoss = "mse",
        solver: str = "cholesky",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        curvature: str | None = None,
        samples: int | None = None,
        seed: int | None = None,
        damping_adaptation: AdaptiveDamping | None | object = _DEFAULT,
        divergence: float | None = 100.0,
        params: Iterable[Any] | None = None,
        unsupported: str = "gradient",
        solver_options: dict[str, Any] | None = None,
        distributed: str | None = None,
        max_update_norm: float | None = None,
    ) -> None:
        self.loss: GaussNewtonLoss = get_loss(loss)
        hyper = DEFAULT_HYPER.get(self.loss.name, DEFAULT_HYPER["mse"])
        lr = hyper["lr"] if lr is None else lr
        damping = hyper["damping"] if damping is None else damping
        # default curvature: "sampled" instead of "top" for outputs with several positions
        self._curvature_given = curvature is not None
        self.curvature = DEFAULT_CURVATURE.get(self.loss.name, "exact") if curvature is None else curvature
        if self.curvature not in ("exact", "top", "sampled"):
            raise ValueError(f'unknown curvature {self.curvature!r}; choose "exact", "top" or "sampled"')
        if self.curvature not in self.loss.curvatures:
            raise ValueError(
                f"curvature={self.curvature!r} is not defined for loss={self.loss.name!r}; "
                f"it takes {list(self.loss.curvatures)}"
            )
        if self.curvature == "exact":
            if samples is not None:
                raise ValueError('samples is only used with curvature="top" or "sampled"')
        elif samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
            raise ValueError(f"samples must be an int >= 1, got {samples!r}")
        self.samples = samples
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if damping_adaptation is _DEFAULT:
            damping_adaptation = None if distributed is not None else AdaptiveDamping()
        elif damping_adaptation is not None:
            if not isinstance(damping_adaptation, AdaptiveDamping):
                raise TypeError(f"damping_adaptation must be an AdaptiveDamping or None, got {damping_adaptation!r}")
            if distributed is not None:
                raise ValueError(
                    "damping_adaptation is not supported with distributed=...; pass damping_adaptation=None"
                )
        self.damping_adaptation: AdaptiveDamping | None = damping_adaptation  # type: ignore[assignment]
        if divergence is not None and not (isinstance(divergence, (int, float)) and divergence > 1):
            raise ValueError(f"divergence must be None or a number > 1, got {divergence!r}")
        self.divergence = divergence
        self.solver_options = check_solver_options(solver, solver_options)
        self.solver = solver
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, params, defaults, unsupported, distributed=distributed, max_update_norm=max_update_norm)
        self.extra_state["seed"] = self._draw_seed() if seed is None else seed
        self.extra_state["draws"] = 0
        self.extra_state["first_loss"] = None
        if self.damping_adaptation is not None:
            # its bounds and running signals (AdaptiveDamping.initial_state)
            self.extra_state["damping_adaptation"] = self.damping_adaptation.initial_state(damping)
        self._last_call: tuple[Any, Any, Any] | None = None  # the model's last call (damping adaptation re-runs it)
        self._warned_adaptation = False
        if self.damping_adaptation is not None:
            owner = weakref.ref(self)  # the model's hook must not keep the optimizer alive

            def record_call(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
                opt = owner()
                if opt is not None and torch.is_grad_enabled():
                    # weak references only: never keeps the graph alive
                    found = [(how, weakref.ref(t)) for how, t in output_candidates(output)]
                    opt._last_call = (args, kwargs, found) if found else None

            handle = self.model.register_forward_hook(record_call, with_kwargs=True)
            self._finalizer_hook = weakref.finalize(self, handle.remove)

    def close(self) -> None:
        if self.damping_adaptation is not None:
            self._finalizer_hook()
        super().close()

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        check_hyper("damping", group["damping"])
        if group["damping"] == 0 and (self.loss.name == "cross_entropy" or self.curvature != "exact"):
            raise ValueError(
                f"damping must be > 0 with loss={self.loss.name!r}, curvature={self.curvature!r}: the output "
                "curvature is singular (cross-entropy's H_i 1 = 0; sampled columns have rank s), so the damped "
                "system is singular at damping=0"
            )

    @property
    def damping(self) -> float:
        values = {group["damping"] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(
                "GGN solves one system for all parameters: every param group needs the same damping, got "
                f"{sorted(values)}"
            )
        return values.pop()

    def _generator(self, device: torch.device, offset: int) -> torch.Generator:
        """The generator of this backward's draws: seeded by (seed, number of draws so far,
        ``offset``: the step's micro-batches before this one, the process's rank). Under
        ``distributed=`` every rank holds rank 0's seed; the rank
        term gives each rank its own columns (identical draws on every rank would repeat
        one sample of the curvature R times instead of R independent ones), reproducibly:
        a rank's draws depend on (seed, step, rank) only. Rank 0 (and a single process)
        draws what it drew before the rank term existed."""
        seed = int(self.extra_state["seed"]) * 1_000_003 + int(self.extra_state["draws"]) + offset
        seed += process_rank() * _RANK_STRIDE
        return torch.Generator(device=device).manual_seed(seed % 2**63)

    def batch_curvature(self, output: Tensor) -> str:
        """The curvature a batch with this ``output`` ``[b, C, ...]`` uses: the configured
        one, except that the *default* "top" (``curvature`` not given) becomes "sampled" for
        outputs with more than one position per sample, whose rows stay ``b (s + 1)``."""
        if self.curvature == "top" and not self._curvature_given and output[0].numel() > output.shape[1]:
            return "sampled"
        return self.curvature

    def positions_per_sample(self, output: Tensor) -> int:
        """P, the positions per sample of a cross-entropy output ``[b, C, d_1, ...]``
        (1 for ``[b, C]`` and for mse): the system's damping is ``damping * P``, so the
        damping is per position (the step is that of the per-sample *mean* over positions
        at ``damping``), and one default serves ``[b, C]`` and ``[b, C, T]`` outputs alike."""
        if self.loss.name != "cross_entropy" or output.dim() <= 2:
            return 1
        return max(1, output[0].numel() // output.shape[1])

    def damping_scale(self, output: Tensor) -> int:
        """Deprecated name of :meth:`positions_per_sample` (it returns a count of positions)."""
        warnings.warn(
            "GGN.damping_scale is deprecated: it is GGN.positions_per_sample (the system's damping is damping * P)",
            FutureWarning,
            stacklevel=2,
        )
        return self.positions_per_sample(output)

    def _row_directions(
        self, wide: Tensor, target: Tensor, offset: int
    ) -> tuple[list[Tensor], Tensor | None, Tensor | None, Tensor | None]:
        """``(directions, q [b, r, m], w [b, m], c [b, r])`` of the configured curvature."""
        b = wide.shape[0]
        k = wide[0].numel()
        curvature = self.batch_curvature(wide)
        if curvature == "exact":
            if b * k > self.MAX_ROWS:
                raise ValueError(
                    f'curvature="exact" needs {b * k} rows ({b} samples x {k} outputs), more than GGN.MAX_ROWS='
                    f'{self.MAX_ROWS}: use curvature="sampled" (or "top" for cross-entropy with few positions)'
                )
            q, w = self.loss.residual_system(wide, target)
            flat = wide.reshape(b, k)
            directions = []
            for c in range(k):
                direction = torch.zeros_like(flat)
                direction[:, c] = 1.0
                directions.append(direction.view_as(wide))
            return directions, q, w, None
        if curvature == "top":
            samples = self.samples if self.samples is not None else min(DEFAULT_SAMPLES["top"], wide.shape[1])
            positions = k // wide.shape[1]
            if b * positions * samples > self.MAX_ROWS:
                raise ValueError(
                    f'curvature="top" needs {b * positions * samples} rows ({b} samples x {positions} positions x '
                    f'{samples} columns), more than GGN.MAX_ROWS={self.MAX_ROWS}: use curvature="sampled"'
                )
            directions, w = self.loss.top_system(wide, target, samples)
            return directions, None, w, None
        samples = self.samples if self.samples is not None else DEFAULT_SAMPLES["sampled"]
        directions = self.loss.sampled_rows(wide, target, samples, self._generator(wide.device, offset))
        q = torch.zeros(b, samples + 1, samples, dtype=wide.dtype, device=wide.device)
        q[:, :samples] = torch.eye(samples, dtype=wide.dtype, device=wide.device)
        outside = torch.zeros(b, samples + 1, dtype=wide.dtype, device=wide.device)
        outside[:, samples] = 1.0
        return directions, q, None, outside

    # -- the contract's hooks ------------------------------------------------------------
    def row_directions(self, output: Tensor, target: Tensor, batch: GaussNewtonBatch) -> list[Tensor]:
        """The divergence check, then the rows of the configured curvature (in at least
        float32: half-precision models solve in float32) with their Q, w and c, and what
        damping adaptation needs."""
        first = self.extra_state.get("first_loss")
        if self.divergence is not None and first is not None and batch.loss > self.divergence * max(first, 1e-12):
            raise DivergenceError(
                f"GGN diverges: the batch loss {batch.loss:.4g} is more than {self.divergence:g} times the first "
                f"batch's {first:.4g} (damping now {self.damping:.4g}); raise the damping or lower lr "
                "(GGN(..., divergence=None) turns this check off); nothing was changed"
            )
        wide = output.detach().to(torch.promote_types(output.dtype, torch.float32))
        wide_target = target.to(wide.dtype) if target.is_floating_point() else target
        b = output.shape[0]
        # the micro-batches of one step draw in turn (extra_state["draws"] moves on at commit)
        directions, q, w, outside = self._row_directions(wide, wide_target, offset=batch.micro_batches - 1)
        batch.adapt = self._adaptation_record(output, wide, wide_target, batch.loss)
        batch.per_sample = {
            "q": q,
            "w": None if w is None else w.reshape(b, -1),
            "outside": None if outside is None else outside.reshape(b, -1),
        }
        batch.positions = self.positions_per_sample(wide)
        batch.curvature = self.batch_curvature(wide)
        return directions

    def directions(self, batch: GaussNewtonBatch) -> dict[Tensor, Tensor]:
        """Solve ``(Q^T R R^T Q + damping I) a = w``; the direction is ``R^T x``,
        ``x = system.coefficients(a)``."""
        with self._phase("factors"):
            factors = batch.factors()  # the micro-batches (and, distributed="exact", the ranks) concatenated
        q, w, outside = (batch.per_sample[key] for key in ("q", "w", "outside"))
        directions: dict[Tensor, Tensor] = {}
        if self.solver != "cholesky":  # the matrix-free solvers never see a Gram block to check
            for name, factor in factors.items():
                if not factor.is_finite():
                    raise NonFiniteError(f"the Jacobian of layer {name} has NaN or inf; nothing was changed")
        if not factors:
            return directions
        dtype = next(iter(factors.values())).dtype
        q = None if q is None else q.to(dtype)
        outside = None if outside is None else outside.reshape(-1).to(dtype)
        # sampled systems: Q selects each sample's drawn rows (the gradient's row comes last),
        # so only their block of the Gram is formed (GaussNewtonSystem.selected)
        selected = q.shape[2] if outside is not None and is_selection(q, q.shape[2]) else None
        w = GaussNewtonSystem.sampled_rhs(factors, q, outside, selected) if w is None else w.reshape(-1).to(dtype)
        # the damping is per position (positions_per_sample): P times it for P positions per sample
        system = GaussNewtonSystem(factors, q, w, self.damping * batch.positions, self.steps_taken, outside, selected)
        a, batch.solve = SOLVERS[self.solver](system, **self.solver_options)
        if not batch.solve.converged:
            warnings.warn(
                f"GGN step {self.steps_taken}: {batch.solve.fallback}", NumericalWarning, stacklevel=user_stacklevel()
            )
        self._seconds.update(batch.solve.seconds)
        with self._phase("direction"):
            x = system.coefficients(a)
            for factor in factors.values():
                for p, d in zip(factor.params, factor.rmatvec(x), strict=True):
                    directions[p] = d
        if batch.adapt is not None:
            batch.predicted = self._predicted_change(system, x)
            if batch.predicted is not None and self.damping_adaptation.reject:
                batch.before = self._snapshot()
        return directions

    def commit(self, batch: GaussNewtonBatch) -> None:
        """The draws and the first loss move on; damping adaptation: its running mean of
        the batch losses, and on a checked step one forward pass on the step's batch, the
        reduction ratio, the step undone if the rule rejects it, and the new damping (in
        every param group, so ``state_dict()`` keeps it)."""
        if batch.curvature == "sampled":  # (configured, or the default for several positions)
            self.extra_state["draws"] += max(batch.micro_batches, 1)
        if self.extra_state.get("first_loss") is None:
            self.extra_state["first_loss"] = batch.loss
        config = self.damping_adaptation
        if config is None:
            return
        state = self.extra_state["damping_adaptation"]
        state["loss_average"] = AdaptiveDamping.averaged(state["loss_average"], batch.loss)  # the surge signal
        if batch.adapt is not None and batch.predicted is not None:
            self._adapt(batch, config, state)

    def step_info(self, batch: GaussNewtonBatch, **common: Any) -> GGNStepInfo:
        return GGNStepInfo(**common, curvature=batch.curvature, rejected=batch.rejected)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; a state saved by gramopt 0.1 (the adaptation's
        state at the top level of ``extra_state``, its floor as ``damping_floor``) is
        converted to this layout first."""
        extra = state_dict.get("gramopt")
        if isinstance(extra, dict):
            state_dict = {**state_dict, "gramopt": self._upgraded_extra_state(extra)}
        super().load_state_dict(state_dict)

    def _upgraded_extra_state(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``extra`` in this version's layout: ``damping_floor``, ``loss_average``,
        ``last_ratio`` and ``rejected_steps`` (gramopt 0.1) move into
        ``extra["damping_adaptation"]``, whose ``min_damping`` is the floor 0.1 applied
        (``AdaptiveDamping.min_damping`` if set, else ``damping_floor``); a state without
        adaptation loaded into an optimizer with it starts its adaptation afresh."""
        extra = dict(extra)
        config = self.damping_adaptation
        if "damping_floor" in extra:
            floor = float(extra.pop("damping_floor"))
            adaptation = {
                "min_damping": floor if config is None or config.min_damping is None else float(config.min_damping),
                "loss_average": extra.pop("loss_average", None),
                "last_ratio": extra.pop("last_ratio", None),
                "rejected_steps": int(extra.pop("rejected_steps", 0)),
            }
            extra.setdefault("damping_adaptation", adaptation)
        if config is not None and "damping_adaptation" not in extra:
            extra["damping_adaptation"] = config.initial_state(self.defaults["damping"])
        return extra

    def _adaptation_record(self, output: Tensor, wide: Tensor, target: Tensor, loss: float) -> dict[str, Any] | None:
        """What the reduction ratio of this step needs (None when it is not checked:
        :meth:`AdaptiveDamping.due`, from the batch's mean ``loss``)."""
        config = self.damping_adaptation
        if config is None:
            return None
        state = self.extra_state["damping_adaptation"]
        if not config.due(self.steps_taken, loss, state["loss_average"], state["last_ratio"]):
            return None
        call, self._last_call = self._last_call, None
        how = None if call is None else next((how for how, ref in call[2] if ref() is output), None)
        if how is None:
            if not self._warned_adaptation:
                self._warned_adaptation = True
                warnings.warn(
                    "GGN damping_adaptation needs opt.backward(model(x), y) with the model's own output, its .logits "
                    "or its first element (it re-runs the model on the same input after the step); the damping "
                    "stays fixed at this step",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            return None
        before = float(self.loss.total(wide, target))
        return {"call": (call[0], call[1], tuple(output.shape)), "how": how, "target": target, "before": before}

    def _predicted_change(self, system: GaussNewtonSystem, x: Tensor) -> float | None:
        """``m(delta) = g^T delta + 0.5 delta^T B delta`` for ``delta = -lr R^T x``, with
        ``g = R^T c`` and ``B = R^T Q Q^T R`` (the curvature the step used)."""
        lrs = {group["lr"] for group in self.param_groups}
        if len(lrs) != 1:
            return None
        lr = lrs.pop()
        gx = system.gram_product(x)
        c = system.gradient_coefficients()
        return float(-lr * torch.dot(c, gx) + 0.5 * lr**2 * system.apply_qt(gx).square().sum())

    def _snapshot(self) -> tuple[list[Tensor], list[Tensor], list[Tensor | None]]:
        """The parameters and momentum buffers as they are now (before the update)."""
        params = [p for group in self.param_groups for p in group["params"]]
        buffers = [self.state[p].get("momentum_buffer") if p in self.state else None for p in params]
        return params, [p.detach().clone() for p in params], [None if b is None else b.clone() for b in buffers]

    def _undo_step(self, batch: GaussNewtonBatch, state: dict[str, Any]) -> None:
        """Put back the parameters and momentum buffers of before the step (``batch.before``)."""
        params, values, buffers = batch.before
        torch._foreach_copy_(params, values)
        for p, buffer in zip(params, buffers, strict=True):
            if buffer is None:
                self.state.get(p, {}).pop("momentum_buffer", None)
            else:
                self.state[p]["momentum_buffer"] = buffer
        state["rejected_steps"] += 1
        batch.rejected = True

    def _adapt(self, batch: GaussNewtonBatch, config: AdaptiveDamping, state: dict[str, Any]) -> None:
        """The reduction ratio of the step just taken on its own batch; the step undone if
        the rule rejects it; the new damping, within the adaptation's bounds."""
        args, kwargs, shape = batch.adapt["call"]
        buffers = [b.detach().clone() for b in self.model.buffers()]
        device = next((t.device for t in args if isinstance(t, Tensor)), torch.device("cpu"))
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), self.engine.paused(), torch.random.fork_rng(devices=devices):
            after = self.model(*args, **kwargs)
        for b, saved in zip(self.model.buffers(), buffers, strict=True):
            b.copy_(saved)
        after = dict(output_candidates(after)).get(batch.adapt["how"])
        if after is None or tuple(after.shape) != shape:
            return
        wide = after.to(torch.promote_types(after.dtype, torch.float32))
        actual = float(self.loss.total(wide, batch.adapt["target"])) - batch.adapt["before"]
        rho = config.ratio(actual, batch.predicted)
        if not config.keeps(actual) and batch.before is not None:
            self._undo_step(batch, state)
        damping = config.update(self.damping, rho, state["min_damping"])
        for group in self.param_groups:
            group["damping"] = damping
        state["last_ratio"] = rho
