"""Optimizers by name, for the command line and the comparison harness.

Each optimizer trains tasks of some kinds (``OptimizerSpec.kinds``, the kinds of
``gramopt.tasks.KINDS``). On supervised tasks, gramopt's methods and the first-order
baselines run through one step function, :func:`training_step`, so they are timed doing
the same work: forward, the backward pass(es) the method needs, the update. On residual
tasks they run through :func:`residual_step`: each optimizer gets the closure of the step's
residual groups and evaluates it as often as its method needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gramopt
from gramopt.losses import get_loss
from gramopt.optim.base import SampleSpaceOptimizer
from gramopt.optim.fngd import DEFAULT_COEFFICIENT_STEPS
from gramopt.optim.fngd import DEFAULT_DAMPING as FNGD_DEFAULT_DAMPING
from gramopt.optim.fngd import DEFAULT_LR as FNGD_DEFAULT_LR
from gramopt.optim.ggn.optimizer import DEFAULT_HYPER as GGN_DEFAULT_HYPER
from gramopt.optim.seng.optimizer import DEFAULT_DAMPING as SENG_DEFAULT_DAMPING
from gramopt.optim.seng.optimizer import DEFAULT_LR as SENG_DEFAULT_LR

# What a step may raise when the optimizer diverges: gramopt's NonFiniteError and
# SingularSystemError (ArithmeticError), and torch's LinAlgError from a peer's
# factorization of a non-finite or indefinite matrix.
DIVERGENCE_ERRORS: tuple[type[BaseException], ...] = (ArithmeticError, torch.linalg.LinAlgError)


@dataclass(frozen=True)
class OptimizerSpec:
    """``build(model, loss, hyper)`` makes the optimizer; ``defaults`` fill in missing
    hyper-parameters; ``hyper_names`` are those the command line may set; ``per_epoch``
    names hyper-parameters whose default is the number of steps in one epoch (see
    :func:`with_epoch_defaults`); ``per_loss`` gives, per loss name, the values of
    hyper-parameters whose default depends on the loss (their ``defaults`` entry is None:
    the optimizer's constructor picks the same value itself); ``source`` says where the
    method comes from ("gramopt", "torch" or the peer package); ``tuned_as`` names the
    optimizer whose per-task settings (``Task.tuned``) and tuning grids this one shares
    (another implementation of the same method, e.g. ``muon-f32`` of ``muon``); ``kinds``
    are the kinds of task it trains (``gramopt.tasks.KINDS``)."""

    name: str
    description: str
    build: Callable[[nn.Module, str, dict[str, Any]], torch.optim.Optimizer]
    defaults: dict[str, Any]
    per_epoch: tuple[str, ...] = field(default=(), kw_only=True)
    per_loss: dict[str, dict[str, Any]] = field(default_factory=dict, kw_only=True)
    source: str = field(default="gramopt", kw_only=True)
    tuned_as: str | None = field(default=None, kw_only=True)
    kinds: tuple[str, ...] = field(default=("supervised",), kw_only=True)

    def __post_init__(self) -> None:
        unknown = set(self.per_epoch) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"{self.name}: per_epoch names {sorted(unknown)}, which are not among its hyper-parameters"
            )
        for loss, values in self.per_loss.items():
            unknown = set(values) - set(self.defaults)
            if unknown:
                raise ValueError(
                    f"{self.name}: per_loss[{loss!r}] names {sorted(unknown)}, which are not among its hyper-parameters"
                )

    def loss_defaults(self, loss: str) -> dict[str, Any]:
        """The defaults with the per-loss values of ``loss`` filled in (the numbers the
        optimizer's constructor uses when given None), e.g. GGN's lr and damping."""
        return {**self.defaults, **self.per_loss.get(loss, {})}

    def run_defaults_for(self, loss: str) -> dict[str, Any]:
        """:meth:`loss_defaults` without the ``per_epoch`` ones: the base of a task's grids."""
        return {key: value for key, value in self.loss_defaults(loss).items() if key not in self.per_epoch}

    @property
    def run_defaults(self) -> dict[str, Any]:
        """The defaults without the ``per_epoch`` ones, which each run fills in from its
        epoch length (:func:`with_epoch_defaults`): the base of tuning grids."""
        return {key: value for key, value in self.defaults.items() if key not in self.per_epoch}

    @property
    def hyper_names(self) -> tuple[str, ...]:
        return tuple(self.defaults)


def _ggn(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    return gramopt.GGN(model, loss=loss, **hyper)


def _fngd(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    return gramopt.FNGD(model, loss=loss, **hyper)


def _seng(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    return gramopt.SENG(model, loss=loss, **hyper)


def _sgd(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), **hyper)


def _adamw(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), **hyper)


def _adam(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    hyper = dict(hyper)
    return torch.optim.Adam(model.parameters(), betas=(0.9, hyper.pop("beta2")), **hyper)


def _gauss_newton(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    return gramopt.GaussNewton(model, **hyper)


#: Müller & Zeinhofer's energy natural gradient step (ICML 2023, arXiv:2302.13163, Section 3 and
#: Algorithm 1): the p x p Gramian of the residuals' parameter Jacobian, solved in parameter
#: space, and their line search, the best of lr * 2^-j for j = 0..30 (31 trials).
ENGD_LINE_SEARCH_TRIALS = 31


def _engd(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    return gramopt.GaussNewton(
        model, line_search="grid", line_search_trials=ENGD_LINE_SEARCH_TRIALS, space="parameter", **hyper
    )


def _lbfgs(model: nn.Module, loss: str, hyper: dict[str, Any]) -> torch.optim.Optimizer:
    # tolerances 0: the run's budget ends it, never a gradient or change below torch's default thresholds
    return torch.optim.LBFGS(
        model.parameters(), line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0, **hyper
    )


OPTIMIZERS: dict[str, OptimizerSpec] = {
    # lr and damping: None, the constructor's per-loss defaults (GGN's DEFAULT_HYPER: mse lr 1,
    # damping 0.3; cross-entropy lr 0.3, damping 10), which ``per_loss`` repeats for the grids;
    # curvature and samples: None, the constructor's defaults (DEFAULT_CURVATURE, DEFAULT_SAMPLES).
    "ggn": OptimizerSpec(
        "ggn",
        "gramopt Gram-Gauss-Newton",
        _ggn,
        dict(lr=None, damping=None, momentum=0.0, weight_decay=0.0, curvature=None, samples=None),
        per_loss={loss: dict(values) for loss, values in GGN_DEFAULT_HYPER.items()},
    ),
    "fngd": OptimizerSpec(
        "fngd",
        "gramopt fast natural gradient (coefficients estimated in the first epoch, then shared)",
        _fngd,
        # the constructor's lr and damping, with the tuned momentum 0.9
        dict(
            lr=FNGD_DEFAULT_LR,
            damping=FNGD_DEFAULT_DAMPING,
            momentum=0.9,
            weight_decay=0.0,
            coefficient_steps=DEFAULT_COEFFICIENT_STEPS,
        ),
        per_epoch=("coefficient_steps",),
    ),
    "seng": OptimizerSpec(
        "seng",
        "gramopt sketchy empirical natural gradient (layer-wise empirical Fisher by SMW)",
        _seng,
        dict(lr=SENG_DEFAULT_LR, damping=SENG_DEFAULT_DAMPING, momentum=0.9, weight_decay=0.0, curvature_every=10),
    ),
    "sgd": OptimizerSpec(
        "sgd", "torch SGD with momentum", _sgd, dict(lr=0.1, momentum=0.9, weight_decay=0.0), source="torch"
    ),
    "adamw": OptimizerSpec("adamw", "torch AdamW", _adamw, dict(lr=1e-3, weight_decay=0.01), source="torch"),
    # Residual tasks (L = 1/2 sum ||r||^2, full batch; residual_step). gauss-newton: GaussNewton's own
    # defaults (tests/test_residual_tasks.py checks that they are its constructor's).
    "gauss-newton": OptimizerSpec(
        "gauss-newton",
        "gramopt Gauss-Newton for least-squares residuals (sample space, grid line search)",
        _gauss_newton,
        dict(lr=1.0, damping=1e-10, line_search_trials=16, momentum=0.0, weight_decay=0.0),
        kinds=("residual",),
    ),
    "engd": OptimizerSpec(
        "engd",
        "energy natural gradient (Müller & Zeinhofer 2023): parameter-space Gauss-Newton, 31-trial grid line search",
        _engd,
        dict(lr=1.0, damping=1e-10),
        kinds=("residual",),
    ),
    "adam": OptimizerSpec(
        "adam", "torch Adam on 1/2 sum ||r||^2", _adam, dict(lr=1e-3, beta2=0.999), source="torch", kinds=("residual",)
    ),
    # One step: one call of LBFGS.step, up to max_iter iterations (torch's default 20) on the step's points,
    # each with a strong-Wolfe line search; curvature pairs of the last history_size iterations.
    "lbfgs": OptimizerSpec(
        "lbfgs",
        "torch L-BFGS (strong Wolfe line search) on 1/2 sum ||r||^2",
        _lbfgs,
        dict(lr=1.0, history_size=100, max_iter=20),
        source="torch",
        kinds=("residual",),
    ),
}


# Peers whose package is not installed: name -> what installs them (filled by ``peers``).
MISSING_PEERS: dict[str, str] = {}


def optimizers_for(kind: str) -> tuple[str, ...]:
    """The registered optimizers that train tasks of ``kind``, in registry order."""
    return tuple(name for name, spec in OPTIMIZERS.items() if kind in spec.kinds)


def check_applies(name: str, task: Any) -> None:
    """A ValueError if optimizer ``name`` cannot train ``task``'s kind, naming those that can."""
    spec = get_optimizer_spec(name)
    if task.kind not in spec.kinds:
        raise ValueError(
            f"optimizer {name!r} trains {' and '.join(spec.kinds)} tasks, not task {task.name!r} (kind {task.kind!r}); "
            f"the optimizers for {task.kind} tasks: {', '.join(optimizers_for(task.kind))}"
        )


def get_optimizer_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS and name in MISSING_PEERS:
        raise ValueError(f"optimizer {name!r} is not available: {MISSING_PEERS[name]}")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


def task_hyper(task: Any, name: str) -> dict[str, Any]:
    """Every hyper-parameter of optimizer ``name`` on ``task`` but the ``per_epoch`` ones:
    its defaults for the task's loss (:meth:`OptimizerSpec.run_defaults_for`) with the
    task's own values (``task.tuned``) over them, found under ``name`` or, where the task
    has none there, under the spec's ``tuned_as``. A tuned value of a hyper-parameter the
    optimizer does not take is a ValueError naming the task."""
    spec = get_optimizer_spec(name)
    tuned = task.tuned.get(name)
    if tuned is None and spec.tuned_as is not None:
        tuned = task.tuned.get(spec.tuned_as)
    tuned = dict(tuned or {})
    unknown = set(tuned) - set(spec.defaults)
    if unknown:
        raise ValueError(f"task {task.name!r} tunes {sorted(unknown)} of {name}, which takes {sorted(spec.defaults)}")
    return {**spec.run_defaults_for(task.loss), **tuned}


def with_epoch_defaults(name: str, hyper: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """``hyper`` with the optimizer's ``per_epoch`` hyper-parameters set to
    ``steps_per_epoch`` where not given (an explicit value, None included, wins).
    FNGD: ``coefficient_steps`` = ceil(n_train / batch_size), the paper's first epoch."""
    spec = get_optimizer_spec(name)
    return {**{key: steps_per_epoch for key in spec.per_epoch}, **hyper}


def build_optimizer(
    name: str, model: nn.Module, loss: str, hyper: dict[str, Any], distributed: str | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``name`` on ``model`` with ``hyper`` over the spec's defaults;
    ``distributed`` (a policy of :mod:`gramopt.distributed`) goes to gramopt's methods
    (the others train through DistributedDataParallel, see ``training.parallel``)."""
    spec = get_optimizer_spec(name)
    unknown = set(hyper) - set(spec.defaults)
    if unknown:
        raise ValueError(f"{name} takes no hyper-parameter {sorted(unknown)}; it takes {sorted(spec.defaults)}")
    hyper = {**spec.defaults, **hyper}
    if distributed is not None and spec.source == "gramopt":
        hyper["distributed"] = distributed
    return spec.build(model, loss, hyper)


def loss_value(loss: str, output: Tensor, y: Tensor) -> Tensor:
    """The mean loss of a first-order step. Cross-entropy takes the class dimension 1, as
    ``F.cross_entropy`` does: sequence logits ``[b, V, T]`` with targets ``[b, T]`` (a
    language model) give the mean over the ``b * T`` positions."""
    return get_loss(loss).value(output, y)


def residual_loss(groups: Tensor | Sequence[Tensor]) -> Tensor:
    """``L = 1/2 sum_g ||r_g||^2`` of a residual tensor or a list of residual groups."""
    groups = [groups] if isinstance(groups, Tensor) else list(groups)
    return 0.5 * sum(r.pow(2).sum() for r in groups)


def residual_step(optimizer: torch.optim.Optimizer, residuals: Callable[[], Tensor | Sequence[Tensor]]) -> Tensor:
    """One step on ``L = 1/2 sum_g ||r_g||^2`` of the closure ``residuals`` (a tensor or a
    list of groups, each ``[N_g]`` or ``[N_g, k]``): Gauss-Newton methods take the closure
    itself; L-BFGS a closure of L and its gradient, evaluated as often as its line search
    needs; the others one gradient of L. Returns L before the step (detached)."""
    if isinstance(optimizer, gramopt.GaussNewton):
        return optimizer.step(residuals).detach()

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = residual_loss(residuals())
        value.backward()
        return value

    if isinstance(optimizer, torch.optim.LBFGS):
        return optimizer.step(closure).detach()
    value = closure()
    optimizer.step()
    return value.detach()


def training_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, loss: str, x: Tensor, y: Tensor, grad_scale: float = 1.0
) -> Tensor:
    """One step: forward, the method's backward pass(es), update. Returns the batch loss.
    ``grad_scale`` multiplies the loss whose gradient the first-order optimizers use
    (data-parallel runs; gramopt's methods scale their own)."""
    optimizer.zero_grad(set_to_none=True)
    output = model(x)
    if isinstance(optimizer, SampleSpaceOptimizer):
        value = optimizer.backward(output, y)
    else:
        value = loss_value(loss, output, y)
        (value * grad_scale if grad_scale != 1.0 else value).backward()
    optimizer.step()
    return value.detach()
