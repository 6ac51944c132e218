"""Gauss-Newton for any least-squares residual: ``opt.step(residuals)``.

For residual rows r(theta) ``[M]`` (every group of the closure, :mod:`.residuals`) and
``L(theta) = 1/2 ||r||^2``, one step is

1. r and its Jacobian ``J = d r / d theta`` ``[M, p]`` (:mod:`.jacobian`);
2. the direction ``delta = -(J^T J + damping I)^{-1} J^T r`` in sample or parameter
   space (:mod:`.solve`), with SPRING's momentum (Goldshlager, Abrahamsen, Lin, "A
   Kaczmarz-inspired approach to accelerate the optimization of neural network
   wavefunctions", J. Comput. Phys. 2024, arXiv:2401.10190, Section 3)
   ``delta_k = mu delta_{k-1} - (J^T J + damping I)^{-1} J^T (r + mu J delta_{k-1})``;
3. ``max_update_norm``: delta scaled to at most that norm;
4. the line search over ``theta + t delta`` (:mod:`.line_search`), decoupled weight decay
   ``theta <- (1 - t wd) theta`` inside each trial; without one (``line_search=None``),
   optionally GGN's adaptive damping (:class:`~gramopt.optim.ggn.damping.AdaptiveDamping`):
   on a checked step the reduction ratio ``rho = (L(theta + s) - L) / m(s)`` of the step
   ``s = lr delta`` against its undamped model ``m(s) = r^T J s + 1/2 ||J s||^2`` (Levenberg-
   Marquardt's gain ratio) sets the next step's damping, and a step that raised L is not taken;
5. the update at the chosen t.

Each phase's seconds go to ``last_info.seconds`` (``jacobian`` with the closure call and
the check, ``gram``, ``solve``, ``line_search``, ``update``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gramopt.capture.engine import coupled_in_training
from gramopt.errors import NonFiniteError, UnsupportedModuleError
from gramopt.linalg.dense import NumericalWarning, SolveInfo, fallbacks_reported_by_caller
from gramopt.optim.base import MethodNeeds, SampleSpaceOptimizer, StepInfo, check_hyper, user_stacklevel
from gramopt.optim.gauss_newton import jacobian as jac_mod
from gramopt.optim.gauss_newton.line_search import LINE_SEARCHES, armijo_search, grid_search
from gramopt.optim.gauss_newton.residuals import (
    GroupShape,
    ResidualClosure,
    Residuals,
    check_same_shapes,
    evaluate,
    evaluate_loss,
)
from gramopt.optim.gauss_newton.solve import SPACES, choose_solver, choose_space, solve_direction
from gramopt.optim.ggn.damping import AdaptiveDamping
from gramopt.optim.ggn.solvers import check_solver_options
from gramopt.optim.notices import Notices

JACOBIANS = ("auto", "hooks", "functional")
UNSUPPORTED = ("warn", "error")


@dataclass
class GaussNewtonStepInfo(StepInfo):
    """What the last :meth:`GaussNewton.step` did.

    Attributes (besides ``step``, ``loss`` (L before the step), ``solve``, ``seconds``):
        loss_after: L at the point taken (None without a line search).
        lr_taken: the step length t (``lr * 2^-j`` of the first param group; 0: no step).
        space: ``"sample"`` or ``"parameter"``.
        solver: the solver used.
        jacobian: ``"hooks"`` or ``"functional"``.
        jacobian_route: how the functional J was taken: ``"per-point"`` (per-point copies of
            the Linear layers' parameters, one backward pass per residual column), ``"jacrev"``
            or ``"rows"`` (one vector-Jacobian product per row: slow); ``""`` for the hooks.
        rows: M, the residual rows.
        damping: the damping of the system.
        trials: L at each line-search trial, in the order tried. Trials that all equal
            ``loss`` to many digits mean the direction changes nothing any more (see
            :class:`GaussNewton`, "A grid step that raises L").
        checked: whether this step's Jacobian was checked: the hooks' against autograd's
            gradient of L, the functional per-point route's by its random pass.
        ratio: the adaptive damping's reduction ratio rho (None: not checked this step).
        rejected: whether the adaptive damping refused the step (it raised L; no step taken).
    """

    loss_after: float | None = None
    lr_taken: float = 0.0
    space: str = ""
    solver: str = ""
    jacobian: str = ""
    jacobian_route: str = ""
    rows: int = 0
    damping: float = 0.0
    trials: list[float] = field(default_factory=list)
    checked: bool = False
    ratio: float | None = None
    rejected: bool = False


#: Entries (all such parameters together) up to which the Jacobian columns of parameters that no
#: hooked layer covers come from autograd without a warning: a PDE coefficient's column costs a
#: couple of backward passes (:func:`.jacobian.functional_columns`), a small share of a step.
QUIET_AUTOGRAD_ENTRIES = 32


class GaussNewtonNotices(Notices):
    """The parameters no hooked layer covers get exact Jacobian columns from autograd, not
    the plain gradient: said in a warning where they cost (more than
    :data:`QUIET_AUTOGRAD_ENTRIES` entries) and the hooks serve the rest (not under
    ``jacobian="functional"``, which takes every column from autograd)."""

    def __init__(self, owner: str, names: dict[int, str], *, functional: bool = False) -> None:
        super().__init__(owner, names)
        self.functional = functional

    def uncovered(self, engine: Any, names: Sequence[str], tied: Sequence[str], has_params: bool) -> None:
        names = [*names, *tied]
        sizes = {name: p.numel() for name, p in engine.model.named_parameters()}
        entries = sum(sizes.get(name, QUIET_AUTOGRAD_ENTRIES + 1) for name in names)
        if names and not self.functional and entries > QUIET_AUTOGRAD_ENTRIES:
            warnings.warn(
                f"gramopt: {self.owner}'s hooks cover no layer of these parameters; their Jacobian columns come "
                f"from autograd (exact, slower): {'; '.join(names)} (pass unsupported='error' to refuse them)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    def escaped_parameters(self, names: str) -> None:
        warnings.warn(
            f"gramopt: {self.owner}: the model uses {names} outside the calls of the modules that own them; their "
            "Jacobian columns come from autograd from now on (exact, slower)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


class GaussNewton(SampleSpaceOptimizer):
    """Gauss-Newton for ``L(theta) = 1/2 sum_g ||r_g(theta)||^2`` (module doc).

    ``opt.step(residuals)`` calls ``residuals()`` (a tensor ``[N]`` or ``[N, k]``, or a
    list of them: the residual groups, points first) and returns ``L`` before the step as
    a detached 0-dim tensor. The closure is called once with autograd for the Jacobian
    (once more for each of the functional Jacobian's per-point and jacrev routes that it
    tries) and once per line-search trial under
    ``no_grad`` (a closure that fails there, e.g. one that takes derivatives with
    ``torch.autograd.grad``, is run with autograd from then on; no wrapping needed); it
    must be deterministic (the same rows at the same parameters: draw new
    points between steps, not inside it) and give groups of the same shapes every time, in
    the parameters' dtype and device.

    Args:
        model: the network the residuals use (its layers are hooked).
        lr: the largest step length (the line search's first trial); torch's LR
            schedulers change it.
        damping: Levenberg-Marquardt damping of ``J^T J`` (>= 0). The default 1e-10 suits
            float64 PINN problems; it is below float32's resolution (warned about).
        line_search: ``"grid"``, ``"armijo"`` or None (:mod:`.line_search`).
        line_search_trials: the grid's trials ``lr 2^-j``, ``j < line_search_trials``.
        solver: ``"auto"`` (cholesky), ``"cholesky"``, ``"cg"``, ``"sketch-pcg"`` or
            ``"nystrom-pcg"`` (GGN's solvers, options in ``solver_options``).
        jacobian: ``"hooks"`` (the capture engine's per-point rows: residuals built from
            the model's own modules, a plain forward or :func:`gramopt.pde.forward_laplacian`),
            ``"functional"`` (any residual, e.g. derivatives taken with ``torch.autograd.grad``:
            per-point copies of the Linear layers' parameters where each row depends on its own
            point, a few gradients of L a step, checked like the hooks; else ``torch.func.jacrev``
            through the closure or autograd's vector-Jacobian products through its graph, about
            M gradients of L a step; ``last_info.jacobian_route`` says which), or
            ``"auto"`` (hooks, checked; functional after a mismatch). The hooks' J is
            checked against autograd (``J^T r`` must be the gradient of L) on the first
            step and every ``check_every`` steps: under ``"hooks"`` a mismatch raises,
            under ``"auto"`` it warns once and switches to ``"functional"``. So does a
            BatchNorm layer in training mode (below), found before the closure runs.
        momentum: SPRING's mu in [0, 1) (0: off).
        max_update_norm: None, or c > 0: delta is scaled to norm at most c.
        weight_decay: decoupled weight decay (``theta <- (1 - t wd) theta`` with the step).
        params: optional parameters or param groups (default: the model's trainable
            ones); every group must have the same damping and momentum.
        unsupported: ``"warn"``: parameters no hooked layer covers get their columns
            from autograd, with one warning; ``"error"``: refuse them.
        check_every: steps between checks of the hooks' (and the per-point route's) Jacobian.
        space: ``"auto"`` (sample space when M <= p), ``"sample"`` or ``"parameter"``.
        solver_options: keyword options of the solver (tol, max_iter, rank, seed, ...).
        damping_adaptation: None (fixed damping), or with ``line_search=None`` GGN's
            :class:`~gramopt.optim.ggn.damping.AdaptiveDamping` (module doc, step 4): on
            the steps its :meth:`~gramopt.optim.ggn.damping.AdaptiveDamping.due` picks
            (``AdaptiveDamping(every=1)``: every step) one more closure call under
            ``no_grad``; the damping of every param group changes within its bounds (floor:
            the damping given), its state is ``extra_state["damping_adaptation"]``.

    The hooks record the closure's forward passes whatever the modules' training flag (a
    model in eval mode gets the hooks' Jacobian too; BatchNorm in eval mode is a fixed
    affine map per point). BatchNorm in training mode couples the points through its batch
    statistics, so every residual row depends on every point's call and the hooks' rows are
    not J; the residual is still a least-squares residual whose J autograd gives exactly:
    ``jacobian="auto"`` switches to ``"functional"`` for good (one warning naming the
    layer), ``"hooks"`` and ``unsupported="error"`` refuse it (at construction, and at a
    step when a layer was switched to training mode later), changing nothing. Its running
    statistics are updated at every call of the closure in training mode, line-search
    trials included. A solve that needs a fallback
    (jitter added to the damping, an eigen-solve, an iterative solver short of its
    tolerance) is warned about once per optimizer (a :class:`~gramopt.NumericalWarning`);
    every step's is in ``last_info.solve`` (``jitter``, ``fallback``, ``converged``).

    A grid step that raises L: ``"grid"`` takes its best trial even when every trial
    raises L. With a tiny damping and fewer rows than parameters the full step solves the
    linearization exactly and can be far too long; when even ``lr 2^-(trials-1)`` raises L,
    the step taken can raise it by orders of magnitude, grow the weights and saturate
    every tanh unit, after which the rows of derivative residuals (a Laplacian) vanish and
    every later step changes L in its last digits only (``last_info.trials`` all equal to
    ``last_info.loss``, ``lr_taken = lr``: the trials are ordered, the largest wins).
    Gauss-Newton cannot leave such a point. The default 16 trials (down to ``lr 2^-15``)
    avoid it where 8 did not (small tanh networks on the 2-D Poisson problem, see
    benchmarks/notes.md); if the first steps still raise L, take more trials,
    ``line_search="armijo"`` (never raises L), or a larger damping (1e-6 to 1e-4, which
    bounds the step).
    """

    needs = MethodNeeds(rows="jacobian")  # (BatchNorm in training mode: the functional Jacobian, see _jacobian_mode)
    unsupported_fallback = "unsupported='warn' to take their Jacobian columns from autograd, exact but slower"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 1e-10,
        line_search: str | None = "grid",
        line_search_trials: int = 16,
        solver: str = "auto",
        jacobian: str = "auto",
        momentum: float = 0.0,
        max_update_norm: float | None = None,
        weight_decay: float = 0.0,
        params: Iterable[Any] | None = None,
        unsupported: str = "warn",
        check_every: int = 50,
        *,
        space: str = "auto",
        solver_options: dict[str, Any] | None = None,
        damping_adaptation: AdaptiveDamping | None = None,
    ) -> None:
        if damping_adaptation is not None:
            if not isinstance(damping_adaptation, AdaptiveDamping):
                raise TypeError(f"damping_adaptation must be an AdaptiveDamping or None, got {damping_adaptation!r}")
            if line_search is not None:
                raise ValueError(
                    "damping_adaptation needs line_search=None (a line search already chooses the step length); "
                    f"got line_search={line_search!r}"
                )
        if line_search not in LINE_SEARCHES:
            raise ValueError(f"line_search must be one of {LINE_SEARCHES}, got {line_search!r}")
        if not _positive_int(line_search_trials):
            raise ValueError(f"line_search_trials must be a positive int, got {line_search_trials!r}")
        if jacobian not in JACOBIANS:
            raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}")
        if unsupported not in UNSUPPORTED:
            raise ValueError(f"unsupported must be one of {UNSUPPORTED}, got {unsupported!r}")
        if not _positive_int(check_every):
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if isinstance(model, nn.Module):  # (the base class names anything else)
            _refuse_coupled(_coupling(model), jacobian, unsupported)
        self.solver_options = check_solver_options(solver, solver_options)
        if solver == "auto" and self.solver_options:
            raise ValueError("solver='auto' takes no solver_options (it uses cholesky); name the solver")
        self.line_search = line_search
        self.line_search_trials = int(line_search_trials)
        self.solver = solver
        self.jacobian = jacobian
        self.check_every = int(check_every)
        self.space = space
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(
            model,
            params,
            defaults,
            "gradient" if unsupported == "warn" else "error",
            max_update_norm=max_update_norm,
        )
        self.extra_state.update(jacobian=None if jacobian == "auto" else jacobian, shapes=None, previous=None)
        self.damping_adaptation = damping_adaptation
        if damping_adaptation is not None:
            self.extra_state["damping_adaptation"] = damping_adaptation.initial_state(damping)
        self._warned_precision = False
        self._functional_routes = jac_mod.FUNCTIONAL_ROUTES  # those still worth trying (a failed one is not)
        self._route = ""  # the functional route of this step's J ("": the hooks')
        self._per_point_checked = False  # the per-point route passed its check once
        self._trials_need_graph = False  # the closure fails under no_grad (it differentiates itself)
        self._warned_fallback = False  # the solve's first fallback (jitter, eigen-solve) was warned about
        self._warn_precision()

    def new_notices(self) -> GaussNewtonNotices:
        return GaussNewtonNotices(type(self).__name__, self._names, functional=self.jacobian == "functional")

    # -- hyper-parameters ------------------------------------------------------------------
    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        check_hyper("damping", group["damping"])

    def _shared(self, name: str) -> float:
        values = {group[name] for group in self.param_groups}
        if len(values) != 1:
            raise ValueError(
                f"GaussNewton solves one system for all parameters: every param group needs the same {name}, "
                f"got {sorted(values)}; nothing was changed"
            )
        return float(values.pop())

    @property
    def damping(self) -> float:
        """The damping (every param group's)."""
        return self._shared("damping")

    def _warn_precision(self) -> None:
        params = self._params()
        if self._warned_precision or not params or params[0].dtype == torch.float64:
            return
        eps = torch.finfo(params[0].dtype).eps
        damping = min(group["damping"] for group in self.param_groups)
        if damping < eps:
            self._warned_precision = True
            warnings.warn(
                f"gramopt: GaussNewton with {params[0].dtype} parameters and damping {damping:g}, below "
                f"{params[0].dtype}'s resolution ({eps:.1e} relative): the damping changes nothing in the Gram "
                "matrix, whose solve is then as ill-conditioned as J. Least-squares problems such as PINNs need "
                "float64 (model.double() and float64 points); or raise the damping",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )

    # -- the contract's entry points that a closure method does not use ---------------------
    def backward(self, output: Tensor, target: Tensor) -> Tensor:
        raise TypeError("GaussNewton takes its residuals in the step: loss = opt.step(residuals)")

    def directions(self, batch: Any) -> dict[Tensor, Tensor]:
        raise TypeError("GaussNewton takes its residuals in the step: loss = opt.step(residuals)")

    # -- the step --------------------------------------------------------------------------
    def step(self, closure: ResidualClosure | None = None) -> Tensor:  # type: ignore[override]
        """One Gauss-Newton step on ``closure``'s residuals (class doc); returns L before
        the step. On an error nothing is changed (parameters and state)."""
        if closure is None or not callable(closure):
            raise TypeError("GaussNewton.step(residuals) needs the residual closure: loss = opt.step(residuals)")
        self._require_open()
        damping, mu = self.damping, self._shared("momentum")
        self._warn_precision()
        params = self._params()
        self._seconds = {}
        self.engine.clear()  # (captures of passes outside the step, e.g. torch.func on the model, are not its)
        self._route = ""
        # The step runs the closure's forward passes itself: the hooks record them whatever the
        # modules' training flag (no batch statistics to protect: BatchNorm in training mode stays
        # refused, in eval mode its rows are per point); passes outside the step stay unrecorded.
        self.engine.capture_in_eval = True
        try:
            with self._phase("jacobian"):
                mode = self._jacobian_mode()
                res = evaluate(closure, params[0].dtype, params[0].device)
                shapes = self._check_shapes(res.shapes)
                jac, mode, checked = self._jacobian(res, params, closure, mode)
                r = res.flat.detach()
                del res  # the graph
            self.engine.clear()
            loss = 0.5 * float(r @ r)
            delta, space, solver, info = self._direction(jac, r, damping, mu)
            adapt = self._adaptation_due(loss)
            with self._phase("line_search"):
                t, loss_after, trials = self._search(closure, shapes, params, delta, jac, r, loss, adapt)
                ratio, new_damping = self._adapted(jac, r, delta, loss, loss_after) if adapt else (None, damping)
                rejected = adapt and not self.damping_adaptation.keeps(loss_after - loss)
                if rejected:
                    t = 0.0
            with self._phase("update"):
                if t:
                    self._move(params, delta, t)
        finally:
            self.engine.clear()
            self.engine.capture_in_eval = False
        self.extra_state["step"] += 1
        self.extra_state["shapes"] = [[s.points, s.columns, s.matrix] for s in shapes]
        if not rejected:
            self.extra_state["previous"] = delta.clone() if mu else None
        if self.damping_adaptation is not None:
            self._commit_adaptation(loss, ratio, new_damping, rejected)
        if self.jacobian == "auto":
            self.extra_state["jacobian"] = mode
        self.last_info = GaussNewtonStepInfo(
            step=self.steps_taken,
            loss=loss,
            solve=info,
            seconds=self._seconds,
            loss_after=loss_after,
            lr_taken=t * self.param_groups[0]["lr"],
            space=space,
            solver=solver,
            jacobian=mode,
            jacobian_route=self._route,
            rows=r.shape[0],
            damping=damping,
            trials=trials,
            checked=checked,
            ratio=ratio,
            rejected=rejected,
        )
        return torch.tensor(loss, dtype=r.dtype)

    def _check_shapes(self, shapes: list[GroupShape]) -> list[GroupShape]:
        saved = self.extra_state.get("shapes")
        check_same_shapes(shapes, None if saved is None else [GroupShape(*s) for s in saved])
        return shapes

    def _jacobian_mode(self) -> str:
        """The Jacobian this step starts from, ``"hooks"`` or ``"functional"``, before the
        closure runs: BatchNorm layers in training mode (class doc) are refused under
        ``jacobian="hooks"`` or ``unsupported="error"``, changing nothing, and switch
        ``"auto"`` to the functional Jacobian."""
        mode = self.extra_state["jacobian"] or "hooks"
        if mode == "hooks":
            why = _coupling(self.model)
            if why is not None:
                _refuse_coupled(why, self.jacobian, self.engine.unsupported)
                mode = self._switch_to_functional(why)
        return mode

    def _switch_to_functional(self, why: str) -> str:
        """The hooks cannot give J (``why``): refused under ``jacobian="hooks"`` (nothing
        changed), else one warning; returns ``"functional"`` (kept from this step on)."""
        if self.jacobian == "hooks":
            raise UnsupportedModuleError(
                f"GaussNewton(jacobian='hooks'): {why}. Pass jacobian='functional' for such residuals; "
                "nothing was changed"
            )
        warnings.warn(
            f"gramopt: GaussNewton switches to jacobian='functional' for good: {why}",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return "functional"

    def _jacobian(
        self, res: Residuals, params: list[nn.Parameter], closure: ResidualClosure, mode: str
    ) -> tuple[Tensor, str, bool]:
        """``(J, "hooks" | "functional", whether J was checked)`` starting from
        ``mode``; the auto fallback and the check (class doc). Raises on a residual group
        independent of the parameters."""
        checked = False
        if mode == "functional":
            jac, checked = self._functional(res, params, closure)
        else:
            checked = self.steps_taken % self.check_every == 0
            why = None
            try:
                jac, rest = jac_mod.hooks_jacobian(self.engine, res, params)
            except jac_mod.JacobianMismatch as mismatch:
                why = str(mismatch)
            else:
                if checked and len(rest) < len(params):
                    gradient = jac_mod.loss_gradient(self.engine, res, params)
                    why = jac_mod.gradient_mismatch(jac, res.flat, gradient)
            if why is not None:
                mode = self._switch_to_functional(why)
                jac, _ = self._functional(res, params, closure)
        for index, ((start, end), shape) in enumerate(zip(res.group_rows(), res.shapes, strict=True)):
            if not _any_nonzero(jac[start:end]) and not _reaches(res.groups[index], params, self.engine):
                raise ValueError(
                    f"residual group {index} ({shape.describe()}) does not depend on the parameters (no autograd "
                    "path leads from it to them); nothing was changed"
                )
        return jac, mode, checked

    def _functional(self, res: Residuals, params: list[nn.Parameter], closure: ResidualClosure) -> tuple[Tensor, bool]:
        """``(J, whether it was checked)``: the functional J by the fastest route that applies
        (:func:`.jacobian.functional_jacobian`); the routes tried before it are not tried again
        (they failed for this closure). The per-point route is checked on its first step and
        every ``check_every`` steps, as the hooks are, and not tried while BatchNorm layers are
        in training mode (their batch statistics couple the points: a model switched to
        training mode between checks must not reach it)."""
        routes = self._functional_routes
        if _coupling(self.model) is not None:
            routes = tuple(r for r in routes if r != "per-point")
        check = not self._per_point_checked or self.steps_taken % self.check_every == 0
        jac, route = jac_mod.functional_jacobian(self.engine, res, params, closure, routes, check)
        failed = routes[: routes.index(route)]
        self._functional_routes = tuple(r for r in self._functional_routes if r not in failed)
        self._route = route
        checked = route == "per-point" and check
        self._per_point_checked = self._per_point_checked or checked
        return jac, checked

    def _direction(self, jac: Tensor, r: Tensor, damping: float, mu: float) -> tuple[Tensor, str, str, Any]:
        """``(delta [p], space, solver, SolveInfo)``: step 2 and 3 of the module doc."""
        previous = self.extra_state.get("previous")
        spring = mu and previous is not None
        w = r + mu * (jac @ previous) if spring else r
        space = choose_space(self.space, jac.shape[0], jac.shape[1])
        solver = choose_solver(self.solver)
        with self._phase("solve"), fallbacks_reported_by_caller():
            d, info = solve_direction(jac, w, damping, space, solver, self.solver_options, self.steps_taken)
        self._warn_fallback(info)
        gram = info.seconds.get("gram", 0.0)
        if gram:
            self._seconds["gram"] = gram
            self._seconds["solve"] -= gram
        delta = -d if not spring else mu * previous - d
        if not bool(torch.isfinite(delta).all()):
            raise NonFiniteError("the Gauss-Newton direction has NaN or inf; nothing was changed")
        if self.max_update_norm is not None:
            norm = float(torch.linalg.vector_norm(delta))
            if norm > self.max_update_norm:
                delta = delta * (self.max_update_norm / norm)
        return delta, space, solver, info

    def _warn_fallback(self, info: SolveInfo) -> None:
        """Warn of the solve's first fallback (jitter added to the damping, an eigen-solve, an
        iterative solver short of its tolerance), once per optimizer: ill-conditioned PINN
        systems (damping 1e-10) need one on many steps. Every step's is in
        ``last_info.solve`` (``jitter``, ``fallback``, ``converged``)."""
        if info.fallback is None or self._warned_fallback:
            return
        self._warned_fallback = True
        warnings.warn(
            f"gramopt: GaussNewton step {self.steps_taken}: {info.fallback}. Warned once: later steps' fallbacks "
            "are in opt.last_info.solve (jitter, fallback, converged); a larger damping avoids them",
            NumericalWarning,
            stacklevel=user_stacklevel(),
        )

    def _search(
        self,
        closure: ResidualClosure,
        shapes: list[GroupShape],
        params: list[nn.Parameter],
        delta: Tensor,
        jac: Tensor,
        r: Tensor,
        loss: float,
        adapt: bool = False,
    ) -> tuple[float, float | None, list[float]]:
        """``(t, L there, the trials' L)``; the parameters are back at theta afterwards.
        Without a line search t = 1, and L there is evaluated only for the adaptive
        damping's check (``adapt``)."""
        if self.line_search is None and not adapt:
            return 1.0, None, []
        saved = [p.detach().clone() for p in params]
        dtype = params[0].dtype

        def trial(t: float) -> float:
            self._move(params, delta, t, saved)
            with self.engine.paused():
                if not self._trials_need_graph:
                    try:
                        return evaluate_loss(closure, shapes, dtype)
                    except Exception:  # a closure that differentiates itself fails under no_grad, however:
                        pass  # torch's RuntimeError, or a derivative helper's own check
                try:
                    value = evaluate_loss(closure, shapes, dtype, graph=True)
                finally:
                    self.engine.clear()
                self._trials_need_graph = True  # (only once it ran with autograd: other errors still raise)
                return value

        try:
            if self.line_search == "grid":
                t, value, values = grid_search(trial, 1.0, self.line_search_trials)
            elif self.line_search == "armijo":
                slope = float((r @ jac) @ self._scaled(delta))
                t, value, values = armijo_search(trial, 1.0, loss, slope)
            else:  # the adaptive damping's check of the fixed step
                t, value = 1.0, trial(1.0)
                values = [value]
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, saved, strict=True):
                    p.copy_(p0)
        return t, value, values

    # -- the adaptive damping (line_search=None) --------------------------------------------------
    def _adaptation_due(self, loss: float) -> bool:
        """Whether this step's damping is checked (:meth:`AdaptiveDamping.due`)."""
        config = self.damping_adaptation
        if config is None:
            return False
        state = self.extra_state["damping_adaptation"]
        return config.due(self.steps_taken, loss, state["loss_average"], state["last_ratio"])

    def _adapted(self, jac: Tensor, r: Tensor, delta: Tensor, loss: float, loss_after: float) -> tuple[float, float]:
        """``(rho, the next damping)`` for the step ``s = lr delta`` whose L went from
        ``loss`` to ``loss_after``: rho against the model ``m(s) = r^T J s + 1/2 ||J s||^2``
        (module doc), the damping by :meth:`AdaptiveDamping.update`."""
        config, state = self.damping_adaptation, self.extra_state["damping_adaptation"]
        js = jac @ self._scaled(delta)
        predicted = float(r @ js + 0.5 * (js @ js))
        rho = config.ratio(loss_after - loss, predicted)
        return rho, config.update(self.damping, rho, state["min_damping"])

    def _commit_adaptation(self, loss: float, ratio: float | None, damping: float, rejected: bool) -> None:
        """The adaptation's state after a step: its running mean of L, and on a checked
        step rho, the damping (every param group's) and the count of refused steps."""
        state = self.extra_state["damping_adaptation"]
        state["loss_average"] = AdaptiveDamping.averaged(state["loss_average"], loss)
        if ratio is None:
            return
        state["last_ratio"] = ratio
        state["rejected_steps"] += int(rejected)
        for group in self.param_groups:
            group["damping"] = damping

    def _scaled(self, delta: Tensor) -> Tensor:
        """delta with each parameter's part times its group's lr (the step at t = 1)."""
        parts, start = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                parts.append(delta[start : start + p.numel()] * group["lr"])
                start += p.numel()
        return torch.cat(parts) if parts else delta

    def _move(self, params: list[nn.Parameter], delta: Tensor, t: float, start: list[Tensor] | None = None) -> None:
        """``theta <- (1 - s wd) theta_0 + s delta`` with ``s = t lr`` of each parameter's group
        (``theta_0``: ``start``, or the parameters as they are)."""
        offset = 0
        with torch.no_grad():
            index = 0
            for group in self.param_groups:
                s = t * group["lr"]
                for p in group["params"]:
                    base = p if start is None else start[index]
                    part = delta[offset : offset + p.numel()].view_as(p).to(p.dtype)
                    value = base * (1 - s * group["weight_decay"]) if group["weight_decay"] else base
                    p.copy_(value + s * part)
                    offset += p.numel()
                    index += 1


def _any_nonzero(rows: Tensor, width: int = 256) -> bool:
    """Whether ``rows`` ``[n, q]`` has a nonzero entry, scanning blocks of ``width`` columns
    from the last (the output layer's, which most residuals reach) and stopping at the first."""
    for end in range(rows.shape[1], 0, -width):
        if bool(rows[:, max(0, end - width) : end].any()):
            return True
    return False


def _reaches(residual: Tensor, params: list[nn.Parameter], engine: Any) -> bool:
    """Whether an autograd path leads from ``residual`` to one of ``params`` (a group whose
    Jacobian is zero may merely sit where the model saturates)."""
    with engine.paused():
        grads = torch.autograd.grad(
            residual, params, grad_outputs=torch.ones_like(residual), retain_graph=True, allow_unused=True
        )
    return any(g is not None for g in grads)


def _coupling(model: nn.Module) -> str | None:
    """Why the hooks' rows are not J while ``model`` has layers in training mode whose
    batch statistics couple the points (BatchNorm), or None."""
    layers = coupled_in_training(model)
    if not layers:
        return None
    return (
        f"{', '.join(layers)} {'is' if len(layers) == 1 else 'are'} in training mode: batch statistics couple the "
        "points, so every residual row depends on every point's call (nn.GroupNorm / nn.LayerNorm, or BatchNorm "
        "in eval mode, keep the rows per point)"
    )


def _refuse_coupled(why: str | None, jacobian: str, unsupported: str) -> None:
    """UnsupportedModuleError for BatchNorm layers in training mode (``why``: :func:`_coupling`,
    None: there are none) under ``unsupported="error"`` or ``jacobian="hooks"``, naming
    what takes them: the functional Jacobian."""
    if why is None:
        return
    if unsupported == "error":
        also = " and jacobian='functional'" if jacobian == "hooks" else ""
        raise UnsupportedModuleError(
            f"GaussNewton(unsupported='error'): {why}. Pass unsupported='warn'{also} to take the Jacobian "
            "from autograd (exact, slower); nothing was changed"
        )
    if jacobian == "hooks":
        raise UnsupportedModuleError(
            f"GaussNewton(jacobian='hooks'): {why}. Pass jacobian='functional' (or 'auto') to take the Jacobian "
            "from autograd (exact, slower); nothing was changed"
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


