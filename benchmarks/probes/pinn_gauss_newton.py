"""Probe: which Gauss-Newton settings reach the PINN problems' 1e-6 on a CPU? The defaults of
gramopt.GaussNewton came from it (a research prototype, not the library optimizer).

Conclusion (benchmarks/notes.md, "PINN Gauss-Newton probe"; ``benchmarks/results/probes/*.json``;
one torch thread on a shared 2-core machine whose load average, 2-14, is logged with every point):

- ``poisson2d`` at the defaults (lr 1, damping 1e-10, sample space, Cholesky, ``grid`` line
  search of 8 trials lr 2^-j, no momentum): relative L2 error 1.9e-6 / 1.1e-6 / 3.2e-6 after
  120 s (seeds 0 / 1 / 2; p2d_baseline.json, p2d_seeds.json), 1e-5 reached at 48 / 52 / 70 s.
  The same 120 s (seed 0, p2d_peers.json): Adam 0.11 (best of lr 1e-3, 3e-4, 1e-4), L-BFGS
  8.9e-4, parameter-space ENGD (31-trial grid) 1.04 after 5 steps.
- Line search (p2d_knobs.json, momentum 0.5, damping 1e-12, 100 s): grid of 16 9.97e-7, armijo
  1.8e-6; a grid of 4 diverged (4.9e2) and a grid that keeps the point when no trial lowers L
  stalled at 0.95: the grid's argmin must be taken even when every trial raises L.
- Damping (p2d_damping.json, 150 s): 1e-8 2.0e-6, 1e-6 1.9e-5, 1e-4 9.6e-5; damping tied to
  the loss and the Levenberg-Marquardt gain-ratio rule lost (1.8e-4, 1.3e-3; p2d_rule_momentum.json,
  p2d_knobs.json); reusing J for chord steps diverged (p2d_knobs.json).
- SPRING momentum 0.5 reached 1e-6 at 59 s on poisson2d (p2d_rule_momentum.json; 0.9: 6.9e-3)
  but gave 4.9e-4 against 2.0e-4 without on poisson5d at small N (p5d_smallN.json): off by default.
- Cost (cost_poisson2d.json; N = 1020, p = 9,873): J by hooks 0.25 s, the Gram J J^T 0.66 s, its
  Cholesky solve 0.04 s, one line-search trial 0.024 s; to the same direction (tol 1e-10) plain CG
  took 15.5 s, rank-200 Nystrom-PCG 0.66 s, sketch-PCG 1.43 s: the Gram dominates.

The step, for the residual rows r [N] of L(theta) = 1/2 ||r||^2 and their Jacobian J [N, p]:

    sample space     delta = -J^T (J J^T + damping I)^{-1} r           (N x N system)
    parameter space  delta = -(J^T J + damping I)^{-1} J^T r           (p x p system, ENGD's)

then theta <- theta + t delta with t from a line search on L. Knobs (``--run`` specs,
``kind:key=value,...``):

- ``gn``: the Gauss-Newton step.
  ``damping`` (1e-10), ``damping_rule``: ``fixed`` | ``residual`` (damping = damping_scale * L,
  floored at ``damping``) | ``lm`` (Levenberg-Marquardt gain-ratio rule of Nielsen, no line
  search: a rejected step is re-solved with the same Gram and 2^k times the damping);
  ``line_search``: ``grid`` (lr 2^-j, j < trials, the argmin of L even when every trial
  raises it) | ``grid-keep`` (the same, but no step if no trial lowers L) | ``grid-stop``
  (trials from the largest, stopping at the first rise after a fall) | ``armijo``
  (halving from lr until L(t) <= L + 1e-4 t g^T delta) | ``none``; ``trials`` (8); ``lr`` (1);
  ``momentum`` (0; SPRING's mu, below); ``space``: ``sample`` | ``parameter``;
  ``solver``: ``cholesky`` | ``cg`` | ``nystrom`` (PCG with a rank-``rank`` Nystrom
  preconditioner) | ``sketch`` (gramopt.linalg.fast_regression on A = J^T) with ``tol``;
  ``jacobian``: ``hooks`` | ``functional`` (vmap(jacrev) of the forward-Laplacian residual);
  ``curvature_every`` (1; k > 1: J and its Gram are reused for k - 1 steps with the residual
  at the current point, a chord step that is taken only if some trial lowers L).
- ``engd``: Müller & Zeinhofer's step, ``gn`` with space=parameter, line_search=grid, trials=31.
- ``adam``: torch.optim.Adam, ``lr``.  ``lbfgs``: torch.optim.LBFGS (strong Wolfe, lr 1,
  history 100, 20 iterations per call on one set of points), ``lr``.

SPRING (Goldshlager, Abrahamsen, Lin, "A Kaczmarz-inspired approach to accelerate the
optimization of neural network wavefunctions", J. Comput. Phys. 2024, arXiv:2401.10190,
Section 3: phi_k = argmin ||O phi - eps||^2 + lambda ||phi - mu phi_{k-1}||^2, i.e.
phi_k = mu phi_{k-1} + O^T (O O^T + lambda I)^{-1} (eps - mu O phi_{k-1})), with O = J and
eps = -r:  delta_k = mu delta_{k-1} - J^T (J J^T + damping I)^{-1} (r + mu J delta_{k-1});
the line search then scales delta_k (SPRING's own norm constraint is replaced by it), and
delta_k (unscaled) is what the next step decays.

Usage:

    python benchmarks/probes/pinn_gauss_newton.py --quick          # seconds: every path once
    python benchmarks/probes/pinn_gauss_newton.py cost              # per-step cost breakdown
    python benchmarks/probes/pinn_gauss_newton.py train --problem poisson2d --budget 120 \\
        --run gn --run gn:damping=1e-8 --run adam:lr=1e-3 --name NAME

Timing: the training clock counts the steps only (not the error evaluation); the machine's
load average is recorded with each logged point. Results go to ``--out`` (default
benchmarks/results/probes/) as ``NAME.json``; ``--quick`` writes ``pinn_gauss_newton_quick.json`` there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from gramopt.capture import CaptureEngine
from gramopt.capture.factors import symmetric_gram
from gramopt.compare.timing import interleaved_times
from gramopt.linalg.dense import solve_damped_psd
from gramopt.linalg.krylov import pcg
from gramopt.linalg.regression import fast_regression
from gramopt.pde.problems import PROBLEMS, PINNProblem, Points

RESULTS = Path(__file__).resolve().parents[1] / "results" / "probes"
EVALUATION_SEED = 12345  # one evaluation set per problem, whatever the training seed
TARGETS = (1e-3, 1e-4, 1e-5, 1e-6)


# -- the problem's state ------------------------------------------------------------------------
@dataclasses.dataclass
class State:
    """A model on a problem, its current training points and the fixed evaluation set."""

    problem: PINNProblem
    model: nn.Sequential
    params: list[nn.Parameter]
    points: Points
    generator: torch.Generator
    eval_x: Tensor

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def refresh_points(self) -> None:
        if self.problem.resample:
            self.points = self.problem.sample_points(self.generator)

    def loss(self) -> float:
        with torch.no_grad():
            return float(self.problem.loss(self.model, self.points))

    def error(self) -> float:
        return self.problem.relative_l2_error(self.model, self.eval_x)

    def theta(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def set_theta(self, theta: Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(self.params, theta.split([p.numel() for p in self.params]), strict=True):
                p.copy_(chunk.view_as(p))


def make_problem(name: str, **overrides) -> PINNProblem:
    """The problem record, with fields replaced (``hidden``, ``interior_points``, ...)."""
    return dataclasses.replace(PROBLEMS[name], **{k: v for k, v in overrides.items() if v is not None})


def new_state(problem: PINNProblem, seed: int) -> State:
    generator = torch.Generator().manual_seed(seed)
    model = problem.build_model(generator)
    points = problem.sample_points(generator)
    eval_x = problem.evaluation_set(torch.Generator().manual_seed(EVALUATION_SEED))
    return State(problem, model, list(model.parameters()), points, generator, eval_x)


def residual_groups(state: State) -> list[Callable[[nn.Module], Tensor]]:
    """The residual groups as closures ``model -> r [n]`` (problem.residuals, one group each)."""
    problem, x, xb = state.problem, state.points.interior, state.points.boundary

    def interior(model: nn.Module) -> Tensor:
        return problem.pde_residual(problem.derivatives(model, x), x)[:, 0] / math.sqrt(x.shape[0])

    def boundary(model: nn.Module) -> Tensor:
        return (model(xb) - problem.boundary_data(xb))[:, 0] / math.sqrt(xb.shape[0])

    return [interior, boundary]


# -- Jacobians --------------------------------------------------------------------------------------
class HooksJacobian:
    """J [N, p] and r [N] by gramopt's capture engine: per group one forward (forward_laplacian
    for the interior), one backward of sum r, each layer's explicit rows written into J's columns
    (columns in model.parameters() order: weight, then bias, layer by layer)."""

    def __init__(self, state: State) -> None:
        self.engine = CaptureEngine(state.model, state.params)

    def __call__(self, state: State) -> tuple[Tensor, Tensor]:
        groups = residual_groups(state)
        n = state.points.interior.shape[0] + state.points.boundary.shape[0]
        jac = torch.empty(n, state.num_params, dtype=torch.float64)
        residuals, row = [], 0
        for group in groups:
            r = group(state.model)
            self.engine.backward_passes(r, [torch.ones_like(r)], retain_graph=False)
            factors = self.engine.factors()
            self.engine.clear()
            col = 0
            for layer in self.engine.layers:
                for part in factors[layer.name].explicit_rows():
                    jac[row : row + r.shape[0], col : col + part.shape[1]] = part
                    col += part.shape[1]
            residuals.append(r.detach())
            row += r.shape[0]
        return jac, torch.cat(residuals)

    def close(self) -> None:
        self.engine.close()


class _Point(nn.Module):
    """``forward(x [1, d], group)``: one point's residual of ``group`` (0 interior, 1 boundary)."""

    def __init__(self, model: nn.Module, problem: PINNProblem, sizes: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.problem, self.sizes = model, problem, sizes

    def forward(self, x: Tensor, group: int) -> Tensor:
        if group == 0:
            u = self.problem.derivatives(self.model, x)
            return self.problem.pde_residual(u, x)[0, 0] / math.sqrt(self.sizes[0])
        return (self.model(x) - self.problem.boundary_data(x))[0, 0] / math.sqrt(self.sizes[1])


class FunctionalJacobian:
    """J by vmap over the points of jacrev over the parameters (forward-Laplacian residual),
    on a hook-free copy of the model whose parameters follow the state's."""

    def __init__(self, state: State) -> None:
        self.copy = copy.deepcopy(state.model)  # the engine's hooks ignore a copy

    def __call__(self, state: State) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            for p, q in zip(self.copy.parameters(), state.params, strict=True):
                p.copy_(q)
        x, xb = state.points.interior, state.points.boundary
        wrapper = _Point(self.copy, state.problem, (x.shape[0], xb.shape[0]))
        theta = {f"model.{n}": p.detach() for n, p in self.copy.named_parameters()}
        blocks, residuals = [], []
        for group, pts in enumerate((x, xb)):

            def one(th: dict[str, Tensor], point: Tensor, group: int = group) -> Tensor:
                return functional_call(wrapper, th, (point.unsqueeze(0), group))

            jac = vmap(jacrev(one), in_dims=(None, 0))(theta, pts)
            blocks.append(torch.cat([jac[k].reshape(pts.shape[0], -1) for k in theta], dim=1))
            with torch.no_grad():
                residuals.append(vmap(one, in_dims=(None, 0))(theta, pts))
        return torch.cat(blocks), torch.cat(residuals)

    def close(self) -> None:
        pass


# -- solvers --------------------------------------------------------------------------------------
def gram(jac: Tensor, how: str = "symmetric") -> Tensor:
    """J J^T [N, N]: gramopt's symmetric_gram (the blocks on and below the diagonal) or one matmul."""
    return symmetric_gram([jac]) if how == "symmetric" else jac @ jac.T


def nystrom_pcg(jac: Tensor, rhs: Tensor, damping: float, rank: int, tol: float, generator: torch.Generator):
    """PCG on (J J^T + damping I) a = rhs with a rank-``rank`` Nystrom preconditioner (Frangella,
    Tropp, Udell, "Randomized Nystrom preconditioning", SIAM J. Matrix Anal. Appl. 2023,
    arXiv:2110.02820, Algorithms 2.1 and 5.1), its sketch Y = J (J^T Omega) by two GEMMs."""
    n = jac.shape[0]
    omega = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=jac.dtype)).Q
    y = jac @ (jac.T @ omega)
    shift = math.sqrt(n) * torch.finfo(jac.dtype).eps * float(torch.linalg.matrix_norm(y, ord=2))
    y = y + shift * omega
    chol = torch.linalg.cholesky(omega.T @ y)
    b = torch.linalg.solve_triangular(chol, y.T, upper=False).T
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    lam = (sigma**2 - shift).clamp_min(0.0)
    scale = (lam[-1] + damping) / (lam + damping)

    def precond(v: Tensor) -> Tensor:
        return v + u @ ((scale - 1.0) * (u.T @ v))

    return pcg(lambda v: jac @ (jac.T @ v) + damping * v, rhs, precond=precond, tol=tol, max_iter=500)


# -- the Gauss-Newton probe ---------------------------------------------------------------------
@dataclasses.dataclass
class GNConfig:
    damping: float = 1e-10
    damping_rule: str = "fixed"
    damping_scale: float = 1.0
    line_search: str = "grid"
    trials: int = 8
    lr: float = 1.0
    momentum: float = 0.0
    space: str = "sample"
    solver: str = "cholesky"
    rank: int = 200
    tol: float = 1e-10
    jacobian: str = "hooks"
    curvature_every: int = 1
    gram: str = "symmetric"


class GaussNewtonProbe:
    """One Gauss-Newton step per call (module doc); returns the step's info (phase seconds,
    the line search's t, the damping, solver iterations)."""

    def __init__(self, state: State, config: GNConfig, seed: int = 0) -> None:
        self.config = config
        self.jacobian = HooksJacobian(state) if config.jacobian == "hooks" else FunctionalJacobian(state)
        self.previous: Tensor | None = None  # SPRING's delta_{k-1}
        self.damping = config.damping if config.damping_rule != "residual" else None
        self.nu = 2.0  # Nielsen's growth factor
        self.cached: tuple | None = None  # (J, factor) for curvature_every > 1
        self.age = 0
        self.generator = torch.Generator().manual_seed(seed)

    def close(self) -> None:
        self.jacobian.close()

    def __call__(self, state: State) -> dict:
        cfg, seconds = self.config, {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[name] = seconds.get(name, 0.0) + now - clock
            clock = now

        state.refresh_points()
        reuse = self.cached is not None and self.age % cfg.curvature_every != 0
        if reuse:
            jac = self.cached[0]
            with torch.no_grad():
                r = torch.cat([g(state.model) for g in residual_groups(state)])
        else:
            jac, r = self.jacobian(state)
        self.age += 1
        lap("jacobian")
        loss0 = 0.5 * float(r @ r)
        if cfg.damping_rule == "residual":
            self.damping = max(cfg.damping, cfg.damping_scale * loss0)
        rhs = r if not (cfg.momentum and self.previous is not None) else r + cfg.momentum * (jac @ self.previous)
        info: dict = {"loss": loss0}
        theta0 = state.theta()

        def direction(damping: float) -> Tensor:
            if cfg.space == "parameter":
                if not reuse:
                    h = jac.T @ jac
                    lap("gram")
                    self.cached = (jac, h)
                delta, sinfo = solve_damped_psd(self.cached[1], jac.T @ rhs, damping)
                if sinfo.fallback:
                    info["jitter"] = sinfo.jitter
                lap("solve")
                return -delta
            if cfg.solver == "cholesky":
                if not reuse or self.cached[1] is None:
                    g = gram(jac, cfg.gram)
                    lap("gram")
                    self.cached = (jac, g)
                alpha, sinfo = solve_damped_psd(self.cached[1], rhs, damping)
                if sinfo.fallback:
                    info["jitter"] = sinfo.jitter
            elif cfg.solver == "cg":
                alpha, sinfo = pcg(lambda v: jac @ (jac.T @ v) + damping * v, rhs, tol=cfg.tol, max_iter=1000)
                info["iterations"] = sinfo.iterations
                self.cached = (jac, None)
            elif cfg.solver == "nystrom":
                alpha, sinfo = nystrom_pcg(jac, rhs, damping, cfg.rank, cfg.tol, self.generator)
                info["iterations"] = sinfo.iterations
                self.cached = (jac, None)
            elif cfg.solver == "sketch":
                alpha, sinfo = fast_regression(jac.T, rhs, damping=damping, tol=cfg.tol, generator=self.generator)
                info["iterations"] = sinfo.iterations
                self.cached = (jac, None)
            else:
                raise ValueError(f"unknown solver {cfg.solver!r}")
            lap("solve")
            delta = -(jac.T @ alpha)
            lap("direction")
            return delta

        if cfg.damping_rule == "lm":
            t, loss1 = self._levenberg_marquardt(state, theta0, jac, r, loss0, direction, lap)
        else:
            delta = direction(self.damping)
            if cfg.momentum and self.previous is not None:
                delta = delta + cfg.momentum * self.previous
            t, loss1 = self._line_search(state, theta0, delta, jac, r, loss0, keep=reuse)
            state.set_theta(theta0 + t * delta)
            if cfg.momentum:
                self.previous = delta
            lap("line_search")
        info.update(seconds=seconds, t=t, damping=self.damping, loss_after=loss1, reused=reuse)
        return info

    def _trial(self, state: State, theta0: Tensor, delta: Tensor, t: float) -> float:
        state.set_theta(theta0 + t * delta)
        value = state.loss()
        return value if math.isfinite(value) else math.inf

    def _line_search(self, state: State, theta0: Tensor, delta: Tensor, jac: Tensor, r: Tensor, loss0: float,
                     keep: bool = False):
        """(t, L(theta0 + t delta)); ``keep``: no step unless some trial lowers L (the steps that reuse
        an old J: a stale direction that raises L is dropped, the next fresh J decides)."""
        cfg = self.config
        steps = [cfg.lr * 2.0**-j for j in range(cfg.trials)]
        if cfg.line_search == "none":
            return cfg.lr, math.nan
        if cfg.line_search == "armijo":
            slope = float(r @ (jac @ delta))  # g^T delta with g = J^T r
            value = math.inf
            for t in [cfg.lr * 2.0**-j for j in range(40)]:
                value = self._trial(state, theta0, delta, t)
                if value <= loss0 + 1e-4 * t * slope:
                    return t, value
            return 0.0, loss0
        values: list[float] = []
        for t in steps:
            values.append(self._trial(state, theta0, delta, t))
            if cfg.line_search == "grid-stop" and len(values) > 1 and values[-1] > values[-2] and values[-2] < loss0:
                break
        best = min(range(len(values)), key=values.__getitem__)
        if (keep or cfg.line_search == "grid-keep") and values[best] >= loss0:
            return 0.0, loss0
        return steps[best], values[best]

    def _levenberg_marquardt(self, state, theta0, jac, r, loss0, direction, lap):
        """Nielsen's rule: gain ratio rho = (L - L(theta + delta)) / (L - 1/2 ||r + J delta||^2);
        rho > 0: accept, damping *= max(1/3, 1 - (2 rho - 1)^3); else damping *= nu, nu *= 2, retry."""
        for _ in range(30):
            delta = direction(self.damping)
            predicted = loss0 - 0.5 * float((r + jac @ delta).pow(2).sum())
            loss1 = self._trial(state, theta0, delta, 1.0)
            lap("line_search")
            rho = (loss0 - loss1) / predicted if predicted > 0 else -1.0
            if rho > 0:
                self.damping *= max(1 / 3, 1 - (2 * rho - 1) ** 3)
                self.damping = max(self.damping, 1e-14)
                self.nu = 2.0
                return 1.0, loss1
            self.damping *= self.nu
            self.nu *= 2
        state.set_theta(theta0)
        return 0.0, loss0


# -- peers ----------------------------------------------------------------------------------------
class AdamPeer:
    def __init__(self, state: State, lr: float = 1e-3) -> None:
        self.opt = torch.optim.Adam(state.params, lr=lr)

    def __call__(self, state: State) -> dict:
        state.refresh_points()
        self.opt.zero_grad()
        loss = state.problem.loss(state.model, state.points)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def close(self) -> None:
        pass


class LBFGSPeer:
    """torch.optim.LBFGS, 20 iterations per call on one set of points."""

    def __init__(self, state: State, lr: float = 1.0) -> None:
        self.opt = torch.optim.LBFGS(
            state.params, lr=lr, max_iter=20, history_size=100, line_search_fn="strong_wolfe",
            tolerance_grad=0.0, tolerance_change=0.0,
        )

    def __call__(self, state: State) -> dict:
        state.refresh_points()

        def closure() -> Tensor:
            self.opt.zero_grad()
            loss = state.problem.loss(state.model, state.points)
            loss.backward()
            return loss

        loss = self.opt.step(closure)
        return {"loss": float(loss.detach())}

    def close(self) -> None:
        pass


def parse_spec(spec: str) -> tuple[str, dict[str, float | int | str]]:
    """``kind:key=value,...`` -> (kind, {key: value}) with numbers converted."""
    kind, _, rest = spec.partition(":")
    options: dict[str, float | int | str] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for convert in (int, float):
            try:
                options[key] = convert(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return kind, options


def make_stepper(spec: str, state: State, seed: int):
    kind, options = parse_spec(spec)
    if kind == "adam":
        return AdamPeer(state, **options)
    if kind == "lbfgs":
        return LBFGSPeer(state, **options)
    if kind == "engd":
        options = {"space": "parameter", "line_search": "grid", "trials": 31, **options}
    elif kind != "gn":
        raise ValueError(f"unknown kind {kind!r} in {spec!r}")
    fields = {f.name: f.type for f in dataclasses.fields(GNConfig)}
    unknown = set(options) - set(fields)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in {spec!r}")
    config = GNConfig(**{k: (float(v) if fields[k] == "float" else v) for k, v in options.items()})
    return GaussNewtonProbe(state, config, seed)


# -- training ------------------------------------------------------------------------------------
def train(spec: str, problem: PINNProblem, seed: int, budget: float, max_steps: int, stop_at: float,
          log_every: float, threads: int) -> dict:
    """Steps until ``budget`` seconds of step time (or ``max_steps``, or the error <= ``stop_at``);
    the error is measured (untimed) after every step that ends ``log_every`` seconds after the
    last logged one (0: every step)."""
    torch.set_num_threads(threads)
    state = new_state(problem, seed)
    stepper = make_stepper(spec, state, seed)
    history = [{"step": 0, "seconds": 0.0, "error": state.error(), "loss": state.loss(), "load": os.getloadavg()[0]}]
    phases: dict[str, list[float]] = {}
    extra: dict[str, list] = {"t": [], "damping": [], "iterations": [], "jitter": []}
    clock, step, last_log, status = 0.0, 0, 0.0, "budget"
    while clock < budget and step < max_steps:
        start = time.perf_counter()
        info = stepper(state)
        clock += time.perf_counter() - start
        step += 1
        for name, sec in info.get("seconds", {}).items():
            phases.setdefault(name, []).append(sec)
        for key in extra:
            if key in info:
                extra[key].append(info[key])
        if not math.isfinite(info["loss"]):
            status = "diverged"
            break
        if clock - last_log >= log_every or clock >= budget or step >= max_steps:
            last_log = clock
            error = state.error()
            history.append({"step": step, "seconds": clock, "error": error, "loss": info["loss"],
                            "load": os.getloadavg()[0]})
            if error <= stop_at:
                status = "target"
                break
            if not math.isfinite(error):
                status = "diverged"
                break
    stepper.close()
    return {
        "spec": spec, "problem": problem.name, "seed": seed, "threads": threads, "status": status,
        "steps": step, "seconds": clock, "final_error": history[-1]["error"],
        "phase_median_seconds": {k: statistics.median(v) for k, v in phases.items()},
        "t_histogram": _histogram(extra["t"]), "damping_last": extra["damping"][-1] if extra["damping"] else None,
        "solver_iterations_median": statistics.median(extra["iterations"]) if extra["iterations"] else None,
        "jitter_fallbacks": len(extra["jitter"]),
        "jitter_median": statistics.median(extra["jitter"]) if extra["jitter"] else None,
        "to_target": _to_targets(history), "history": history,
    }


def _histogram(values: list[float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = "0" if v == 0 else f"2^{round(math.log2(v))}" if v > 0 else str(v)
        out[key] = out.get(key, 0) + 1
    return out


def _to_targets(history: list[dict]) -> dict[str, dict | None]:
    """The first logged point at or below each target error: steps and seconds."""
    out = {}
    for target in TARGETS:
        hit = next((h for h in history if h["error"] <= target), None)
        out[f"{target:.0e}"] = None if hit is None else {"step": hit["step"], "seconds": round(hit["seconds"], 2)}
    return out


def error_at(history: list[dict], seconds: float) -> float | None:
    """The error at the last logged point within ``seconds`` of step time."""
    inside = [h for h in history if h["seconds"] <= seconds]
    return inside[-1]["error"] if inside else None


# -- the per-step cost breakdown ------------------------------------------------------------------
def cost_breakdown(problem: PINNProblem, threads: int, rounds: int, functional: bool, solvers: bool) -> dict:
    """Median seconds of each phase of a step at the problem's sizes, timed in interleaved rounds."""
    torch.set_num_threads(threads)
    state = new_state(problem, 0)
    hooks = HooksJacobian(state)
    jac, r = hooks(state)
    g = gram(jac)
    damping = 1e-10
    alpha, _ = solve_damped_psd(g, r, damping)
    delta = -(jac.T @ alpha)
    theta0 = state.theta()
    plain = copy.deepcopy(state.model)  # no hooks fire on a copy
    phases: dict[str, Callable[[], object]] = {
        "gradient (one backward of L, reference)": lambda: torch.autograd.grad(
            state.problem.loss(plain, state.points), list(plain.parameters())),
        "jacobian hooks": lambda: hooks(state),
        "gram symmetric_gram": lambda: gram(jac, "symmetric"),
        "gram matmul": lambda: gram(jac, "matmul"),
        "cholesky solve (damping 1e-10)": lambda: solve_damped_psd(g, r, damping),
        "J^T alpha": lambda: jac.T @ alpha,
        "loss evaluation (one line-search trial)": lambda: (state.set_theta(theta0 + 0.5 * delta), state.loss()),
    }
    if functional:
        fun = FunctionalJacobian(state)
        phases["jacobian vmap(jacrev)"] = lambda: fun(state)
    check = {}
    if solvers:
        exact = alpha
        for name, run in {
            "cg (tol 1e-10)": lambda: pcg(lambda v: jac @ (jac.T @ v) + damping * v, r, tol=1e-10, max_iter=1000),
            "nystrom-pcg rank 200 (tol 1e-10)": lambda: nystrom_pcg(
                jac, r, damping, 200, 1e-10, torch.Generator().manual_seed(0)
            ),
            "sketch fast_regression (tol 1e-10)": lambda: fast_regression(
                jac.T, r, damping=damping, tol=1e-10, generator=torch.Generator().manual_seed(0)
            ),
        }.items():
            try:
                x, info = run()
            except ValueError as err:
                check[name] = {"error": str(err)}
                continue
            step_error = float((jac.T @ (x - exact)).norm() / (jac.T @ exact).norm())
            check[name] = {"iterations": info.iterations, "converged": info.converged,
                           "relative_difference_of_delta_to_cholesky": step_error}
            phases[name] = run
    load_before = os.getloadavg()
    samples = interleaved_times(phases, rounds=rounds, steps_per_round=1, warmup=1)
    hooks.close()
    state.set_theta(theta0)
    return {
        "problem": problem.name, "N": jac.shape[0], "p": jac.shape[1], "threads": threads,
        "load_before": load_before, "load_after": os.getloadavg(),
        "median_seconds": {k: statistics.median(v) for k, v in samples.items()},
        "seconds": samples, "iterative_solvers": check,
    }


# -- main -----------------------------------------------------------------------------------------
def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("train", "cost", "summary"), default="train")
    parser.add_argument("--quick", action="store_true", help="a small network and few points: every path, seconds")
    parser.add_argument("--problem", default="poisson2d", choices=sorted(PROBLEMS))
    parser.add_argument("--run", action="append", default=[], help="a stepper spec (module doc); repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of step time per run")
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument("--stop-at", type=float, default=0.0, help="stop a run once its error is at or below this")
    parser.add_argument("--log-every", type=float, default=0.0, help="seconds between logged errors (0: every step)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interior", type=int, help="override N_interior")
    parser.add_argument("--boundary", type=int, help="override N_boundary")
    parser.add_argument("--hidden", type=int, nargs="+", help="override the hidden widths")
    parser.add_argument("--functional", action="store_true", help="cost: time vmap(jacrev) too")
    parser.add_argument("--solvers", action="store_true", help="cost: time the iterative solvers too")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the written files (default: %(default)s)")
    parser.add_argument("--name", default=None, help="file name of a train or cost run's JSON (no suffix)")
    args = parser.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    hidden = tuple(args.hidden) if args.hidden else None
    if args.quick:
        return quick(args.out)
    if args.mode == "summary":
        return summary(args.out)
    problem = make_problem(args.problem, interior_points=args.interior, boundary_points=args.boundary, hidden=hidden)
    if args.mode == "cost":
        results = [cost_breakdown(problem, t, args.rounds, args.functional, args.solvers) for t in args.threads]
        for res in results:
            print(f"N={res['N']} p={res['p']} threads={res['threads']} load {res['load_before'][0]:.1f}")
            for name, sec in res["median_seconds"].items():
                print(f"  {name:42s} {sec:8.4f} s")
            for name, chk in res["iterative_solvers"].items():
                print(f"  {name}: {chk}")
        payload = {"mode": "cost", "results": results, "environment": environment()}
    else:
        runs = []
        for spec in args.run or ["gn"]:
            for seed in args.seeds:
                res = train(spec, problem, seed, args.budget, args.max_steps, args.stop_at, args.log_every,
                            args.threads[0])
                at = {s: error_at(res["history"], s) for s in (30, 60, 120, 300, 600) if s <= args.budget}
                res["error_at_seconds"] = at
                print(f"{spec:48s} seed {seed}: {res['steps']:5d} steps {res['seconds']:7.1f} s  final "
                      f"{res['final_error']:.2e} ({res['status']})  "
                      f"at {', '.join(f'{s}s {e:.1e}' for s, e in at.items() if e)}"
                      f"  to-target {res['to_target']}  phases {_round(res['phase_median_seconds'])}", flush=True)
                runs.append(res)
        payload = {"mode": "train", "problem": dataclasses.asdict(problem) | {"solution": None, "pde_residual": None,
                   "boundary_data": None, "sample_interior": None, "sample_boundary": None},
                   "budget_seconds": args.budget, "runs": runs, "environment": environment()}
    if args.name:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{args.name}.json"
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")


def summary(folder: Path) -> None:
    """One line per training run in benchmarks/results/probes/*.json: steps and seconds to
    1e-5 / 1e-6, the error at 30 / 60 / 120 / 600 s and at the end, the median load average."""
    print(f"{'file':22s} {'run':62s} seed steps   to 1e-5     to 1e-6     @30s    @60s    @120s   @600s   final   load")
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        for run in data.get("runs", []):
            hits = [run["to_target"][k] for k in ("1e-05", "1e-06")]
            hit = ["-" if h is None else f"{h['step']}/{h['seconds']:.0f}s" for h in hits]
            at = [error_at(run["history"], s) if s <= run["seconds"] + 1 else None for s in (30, 60, 120, 600)]
            load = statistics.median(h["load"] for h in run["history"])
            print(f"{path.stem:22s} {run['spec']:62s} {run['seed']:4d} {run['steps']:5d}   {hit[0]:11s} {hit[1]:11s} "
                  + " ".join("   -   " if e is None else f"{e:.1e}" for e in at)
                  + f" {run['final_error']:.1e} {load:5.1f}")


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def quick(out: Path) -> None:
    """Every path once on a small network (2-16-16-1, 60 + 20 points): J by hooks against
    vmap(jacrev), sample against parameter space, each solver, line search and peer."""
    problem = make_problem("poisson2d", hidden=(16, 16), interior_points=60, boundary_points=20, evaluation_points=500)
    state = new_state(problem, 0)
    jac_h, r_h = HooksJacobian(state)(state)
    jac_f, r_f = FunctionalJacobian(state)(state)
    diff = float((jac_h - jac_f).abs().max())
    print(f"hooks J vs vmap(jacrev): max |difference| {diff:.1e}, residual {float((r_h - r_f).abs().max()):.1e}")
    assert diff < 1e-10, "the hooks Jacobian disagrees with vmap(jacrev)"
    specs = ["gn", "gn:jacobian=functional", "gn:line_search=grid-keep", "gn:line_search=grid-stop",
             "gn:line_search=armijo", "gn:damping_rule=lm,damping=1e-4", "gn:damping_rule=residual",
             "gn:momentum=0.5", "gn:solver=cg", "gn:solver=nystrom,rank=20", "gn:curvature_every=3",
             "engd", "adam:lr=1e-3", "lbfgs"]
    for spec in specs:
        res = train(spec, problem, 0, budget=1.0, max_steps=15, stop_at=0.0, log_every=0.0, threads=1)
        first, last = res["history"][0]["error"], res["final_error"]
        print(f"  {spec:36s} {res['steps']:3d} steps  error {first:.2e} -> {last:.2e}")
    res = cost_breakdown(problem, 1, rounds=2, functional=True, solvers=False)
    print("  cost:", _round(res["median_seconds"]))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pinn_gauss_newton_quick.json"
    record = {"mode": "quick", "jacobian_difference": diff, "cost": res, "environment": environment()}
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
