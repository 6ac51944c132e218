"""gramopt.GaussNewton against dense float64 references built with torch.func
(tests/reference.py: residual_jacobian by jacrev, gauss_newton_delta by a dense solve)."""

from __future__ import annotations

import math

import pytest
import torch
from tests.reference import flat_residual, gauss_newton_delta, params_vector, residual_jacobian
from tests.test_gn_reference import autograd_closure, pinn_closure, small_model
from torch import nn

import gramopt
from gramopt.optim.gauss_newton import jacobian as jac_mod
from gramopt.optim.gauss_newton.residuals import evaluate
from gramopt.pde import forward_laplacian

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def multi_group_closure(model: nn.Module, k: int, n: int = 7):
    """Three groups: a forward-Laplacian interior residual [n, k] ([n] for k = 1), a
    boundary residual [4, k] and a data residual [3] (output 0)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(n, 2, dtype=DT, generator=gen)
    xb = torch.rand(4, 2, dtype=DT, generator=gen).round()
    xd = torch.rand(3, 2, dtype=DT, generator=gen)

    def residuals():
        u = forward_laplacian(model, x)
        interior = -u.laplacian - 1.0
        return [interior[:, 0] if k == 1 else interior, model(xb) - 0.5, model(xd)[:, 0] - 0.25]

    return residuals


def dense_step(model, closure, lr, damping, space="sample"):
    j, r = residual_jacobian(model, closure)
    return gauss_newton_delta(j, r, lr, damping, space), 0.5 * r @ r


# -- the hooks' Jacobian ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_hooks_jacobian_rows_match_jacrev(k):
    model = small_model(k)
    closure = multi_group_closure(model, k)
    expected, r = residual_jacobian(model, closure)
    opt = gramopt.GaussNewton(model, jacobian="hooks")
    params = opt._params()
    res = evaluate(closure, DT, torch.device("cpu"))
    jac, rest = jac_mod.hooks_jacobian(opt.engine, res, params)
    opt.engine.clear()
    assert rest == []
    torch.testing.assert_close(res.flat.detach(), r, rtol=0, atol=0)
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-10)
    assert jac_mod.gradient_mismatch(jac, r, expected.T @ r) is None


class TwoHeads(nn.Module):
    """A trunk and two one-output heads: ``forward(x) = [head0(trunk x), head1(trunk x)]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Sequential(nn.Linear(2, 5), nn.Tanh()).to(DT)
        self.head0 = nn.Linear(5, 1).to(DT)
        self.head1 = nn.Linear(5, 1).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([self.head0(h), self.head1(h)], dim=1)


def test_hooks_jacobian_rows_where_calls_reach_some_columns_or_groups_only():
    """J's blocks written by the per-group passes: a group that calls the trunk twice (rows
    added), one that reaches no call of head1 (its block zero), one of 5 points besides two
    of 6, a [6, 2] group whose column c depends on head c only."""
    model = TwoHeads()
    gen = torch.Generator().manual_seed(6)
    x, x2, x3 = (torch.rand(n, 2, dtype=DT, generator=gen) for n in (6, 6, 5))

    def closure():
        twice = model.head0(model.trunk(x2) * model.trunk(-x2))[:, 0]
        return [model(x) - 0.5, twice, model(x3)[:, 1] ** 2]

    expected, r = residual_jacobian(model, closure)
    opt = gramopt.GaussNewton(model, jacobian="hooks")
    params = opt._params()
    res = evaluate(closure, DT, torch.device("cpu"))
    jac, rest = jac_mod.hooks_jacobian(opt.engine, res, params)
    opt.engine.clear()
    assert rest == [] and bool(expected[12:18, -6:].eq(0).all())  # head1's columns, the second group's rows
    assert bool(expected[0:12:2, -6:].eq(0).all()) and bool(expected[1:12:2, -6:].ne(0).any())  # by column
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-12)
    assert jac_mod.gradient_mismatch(jac, r, expected.T @ r) is None


@pytest.mark.parametrize("jacobian", ["hooks", "auto"])
def test_a_group_on_a_call_of_another_size_is_refused_by_the_hooks(jacobian):
    """Group 1 (4 points) depends on a call of 6 points: under "hooks" an error naming
    jacobian="functional" (nothing changed), under "auto" the functional J's dense step."""
    model = small_model(width=5)
    gen = torch.Generator().manual_seed(7)
    x6, x4 = torch.rand(6, 2, dtype=DT, generator=gen), torch.rand(4, 2, dtype=DT, generator=gen)

    def closure():
        return [model(x6)[:, 0] - 0.5, model(x4)[:, 0] + model(x6)[:4, 0]]

    delta, _ = dense_step(model, closure, lr=1.0, damping=1e-3)
    before = params_vector(model)
    opt = gramopt.GaussNewton(model, damping=1e-3, line_search=None, jacobian=jacobian)
    if jacobian == "hooks":
        with pytest.raises(gramopt.UnsupportedModuleError, match="called on 6 samples.*jacobian='functional'"):
            opt.step(closure)
        assert torch.equal(params_vector(model), before)
        return
    with pytest.warns(RuntimeWarning, match="called on 6 samples"):
        opt.step(closure)
    assert opt.last_info.jacobian == "functional"
    torch.testing.assert_close(params_vector(model) - before, delta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("closure_kind", ["autograd", "forward_laplacian"])
def test_functional_jacobian_matches_jacrev(closure_kind):
    """Per-point copies where each row depends on its own point (torch.autograd.grad inside
    included); jacrev through the closure where torch.func runs it (forward_laplacian uses
    the bias outside the layer's call, which the copies refuse); batched vector-Jacobian
    products through the step's graph without the closure, or by route."""
    model = small_model()
    with_autograd, with_forward_laplacian = autograd_closure(model, 6)
    expected, _ = residual_jacobian(model, with_forward_laplacian)
    opt = gramopt.GaussNewton(model, jacobian="functional")
    closure = with_autograd if closure_kind == "autograd" else with_forward_laplacian
    res = evaluate(closure, DT, torch.device("cpu"))
    jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure)
    assert route == ("per-point" if closure_kind == "autograd" else "jacrev")
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    for routes in [("rows",), jac_mod.FUNCTIONAL_ROUTES]:
        jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), None, routes)
        assert route == "rows"
        torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    assert not opt.engine.has_factors()
    assert not any(m._forward_hooks and len(m._forward_hooks) > 1 for m in model.modules())  # the copies' hooks went


def test_functional_jacobian_of_a_closure_that_changes_is_that_of_the_steps_rows():
    model = small_model()
    gen = torch.Generator().manual_seed(5)
    drawn = []

    def closure():  # new points at every call (as if resampled inside the closure)
        drawn.append(torch.rand(6, 2, dtype=DT, generator=gen))
        return model(drawn[-1])[:, 0]

    opt = gramopt.GaussNewton(model, jacobian="functional")
    res = evaluate(closure, DT, torch.device("cpu"))
    jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure)
    assert route == "rows" and len(drawn) == 3  # the step's call, per-point's and jacrev's (both refused)
    expected, _ = residual_jacobian(model, lambda: model(drawn[0])[:, 0])  # the rows of the step's own call
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)


# -- the step ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("space", ["sample", "parameter"])
@pytest.mark.parametrize("jacobian", ["hooks", "functional"])
def test_step_is_the_dense_gauss_newton_step(k, space, jacobian):
    model = small_model(k, width=6)  # p = 67 + 7 (k - 1)
    closure = multi_group_closure(model, k, n=7 if space == "sample" else 80)  # M = 11 k + 3, 84 k + 3
    delta, loss = dense_step(model, closure, lr=0.5, damping=1e-3, space=space)
    before = params_vector(model)
    opt = gramopt.GaussNewton(model, lr=0.5, damping=1e-3, line_search=None, jacobian=jacobian, space=space)
    value = opt.step(closure)
    assert opt.last_info.space == space and opt.last_info.solver == "cholesky" and opt.last_info.jacobian == jacobian
    rows = opt.last_info.rows
    assert (rows <= before.numel()) == (space == "sample")
    torch.testing.assert_close(value, loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(params_vector(model) - before, delta, rtol=1e-9, atol=1e-12)
    assert set(opt.last_info.seconds) >= {"jacobian", "solve", "line_search", "update"}


def loss_at(model: nn.Module, closure, theta: torch.Tensor) -> float:
    """L = 1/2 ||r||^2 with the model's parameters set to ``theta`` (then put back)."""
    params = list(model.parameters())
    saved = params_vector(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, params)
        value = 0.5 * float(flat_residual(closure()).pow(2).sum())
        torch.nn.utils.vector_to_parameters(saved, params)
    return value


@pytest.mark.parametrize("case", ["kept", "rejected"])
def test_adaptive_damping_takes_the_dense_steps_gain_ratio(case):
    """line_search=None with GGN's AdaptiveDamping: rho = (L(theta + s) - L) / (r^T J s + 1/2 ||J s||^2)
    for the dense step s; rho > 3/4 lowers the damping by 2/3 (the step taken, and the next
    step is the dense step at that damping), a step that raises L is refused and raises the
    damping 1.5x (at least 1e-4)."""
    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    lr, damping = (1e-3, 0.1) if case == "kept" else (0.2, 1e-3)
    j, r = residual_jacobian(model, closure)
    s = gauss_newton_delta(j, r, lr, damping, "sample")
    theta = params_vector(model)
    loss, after = 0.5 * float(r @ r), loss_at(model, closure, theta + s)
    rho = (after - loss) / float(r @ (j @ s) + 0.5 * (j @ s).pow(2).sum())
    assert (rho > 0.75) if case == "kept" else (after > loss)
    expected = damping * 2 / 3 if case == "kept" else max(damping * 1.5, 1e-4)
    opt = gramopt.GaussNewton(
        model, lr=lr, damping=damping, line_search=None, jacobian="hooks",
        damping_adaptation=gramopt.AdaptiveDamping(every=1, min_damping=1e-6),
    )
    opt.step(closure)
    info = opt.last_info
    assert info.ratio == pytest.approx(rho, rel=1e-8) and info.rejected == (case == "rejected")
    assert info.damping == damping and opt.param_groups[0]["damping"] == pytest.approx(expected, rel=1e-14)
    assert opt.state_dict()["gramopt"]["damping_adaptation"]["rejected_steps"] == int(case == "rejected")
    if case == "rejected":
        assert torch.equal(params_vector(model), theta) and info.lr_taken == 0.0
        return
    torch.testing.assert_close(params_vector(model), theta + s, rtol=1e-9, atol=1e-12)
    delta, _ = dense_step(model, closure, lr=lr, damping=expected)
    before = params_vector(model)
    opt.step(closure)
    torch.testing.assert_close(params_vector(model) - before, delta, rtol=1e-9, atol=1e-12)


def test_adaptive_damping_needs_line_search_none_and_an_adaptive_damping():
    model = small_model()
    with pytest.raises(ValueError, match="line_search=None"):
        gramopt.GaussNewton(model, damping_adaptation=gramopt.AdaptiveDamping())
    with pytest.raises(TypeError, match="AdaptiveDamping or None"):
        gramopt.GaussNewton(model, line_search=None, damping_adaptation="auto")


def test_grid_line_search_takes_the_argmin_of_its_trials():
    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    delta, loss = dense_step(model, closure, lr=1.0, damping=1e-4)
    theta = params_vector(model)
    expected = []
    for j in range(6):  # L at every trial, evaluated here
        torch.nn.utils.vector_to_parameters((theta + 2.0**-j * delta).clone(), model.parameters())
        with torch.no_grad():
            expected.append(0.5 * float(flat_residual(closure()).pow(2).sum()))
    torch.nn.utils.vector_to_parameters(theta.clone(), model.parameters())  # (it aliases the vector)
    opt = gramopt.GaussNewton(model, damping=1e-4, line_search="grid", line_search_trials=6)
    opt.step(closure)
    best = min(range(6), key=expected.__getitem__)
    info = opt.last_info
    assert info.lr_taken == 2.0**-best
    torch.testing.assert_close(torch.tensor(info.trials), torch.tensor(expected), rtol=1e-9, atol=0)
    torch.testing.assert_close(params_vector(model), theta + 2.0**-best * delta, rtol=1e-9, atol=1e-12)
    assert info.loss_after == min(info.trials)


def test_a_short_poisson_run_lowers_the_error_by_orders_of_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(DT)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 2, dtype=DT, generator=gen)
    xb = torch.rand(40, 2, dtype=DT, generator=gen)
    xb[:20, 0] = xb[:20, 0].round()
    xb[20:, 1] = xb[20:, 1].round()
    f = 2 * math.pi**2 * torch.sin(math.pi * x).prod(dim=1, keepdim=True)
    x_eval = torch.rand(500, 2, dtype=DT, generator=gen)
    exact = torch.sin(math.pi * x_eval).prod(dim=1, keepdim=True)

    def error() -> float:
        with torch.no_grad():
            return float((model(x_eval) - exact).norm() / exact.norm())

    def residuals():
        u = forward_laplacian(model, x)
        return [(-u.laplacian - f) / 10.0, model(xb) / 40**0.5]

    opt = gramopt.GaussNewton(model)
    first = error()
    for _ in range(20):
        opt.step(residuals)
    assert error() < 1e-3 * first


@pytest.mark.parametrize("space", ["sample", "parameter"])
@pytest.mark.parametrize("solver", ["cg", "sketch-pcg", "nystrom-pcg"])
def test_iterative_solvers_reach_the_dense_step(space, solver):
    model = small_model(2, width=6)  # p = 74
    closure = multi_group_closure(model, 2, n=7 if space == "sample" else 80)
    delta, _ = dense_step(model, closure, lr=1.0, damping=1e-2, space=space)
    before = params_vector(model)
    opt = gramopt.GaussNewton(
        model, damping=1e-2, line_search=None, solver=solver, space=space, solver_options={"tol": 1e-12}
    )
    opt.step(closure)
    info = opt.last_info
    assert info.solver == solver and info.solve.converged and info.solve.iterations > 0
    step = params_vector(model) - before
    assert float((step - delta).norm()) <= 1e-8 * float(delta.norm())


def test_auto_solver_and_space_follow_the_system_size():
    model = small_model(1, width=6)  # p = 67
    for n, space in [(7, "sample"), (80, "parameter")]:
        opt = gramopt.GaussNewton(model, line_search=None, damping=1e-2)
        opt.step(multi_group_closure(model, 1, n=n))
        assert (opt.last_info.space, opt.last_info.solver) == (space, "cholesky")
        opt.close()


# -- the hooks' check ----------------------------------------------------------------------------
def test_auto_jacobian_falls_back_once_on_an_autograd_derivative_residual():
    model = small_model()
    with_autograd, _ = autograd_closure(model, 6)
    twin = small_model()
    twin_closure, _ = autograd_closure(twin, 6)
    expected = gramopt.GaussNewton(twin, damping=1e-3, jacobian="functional")
    opt = gramopt.GaussNewton(model, damping=1e-3)  # jacobian="auto"
    with pytest.warns(RuntimeWarning, match="jacobian='functional'") as caught:
        for _ in range(2):
            torch.testing.assert_close(opt.step(with_autograd), expected.step(twin_closure), rtol=1e-12, atol=0)
            assert opt.last_info.jacobian == "functional"
            torch.testing.assert_close(params_vector(model), params_vector(twin), rtol=1e-10, atol=1e-13)
    assert len([w for w in caught if "jacobian='functional'" in str(w.message)]) == 1
    assert opt.state_dict()["gramopt"]["jacobian"] == "functional"


@pytest.mark.parametrize("coupled", ["autograd", "mean"])
def test_hooks_jacobian_refuses_a_residual_that_is_not_per_point_and_changes_nothing(coupled):
    model = small_model()
    if coupled == "autograd":
        closure, _ = autograd_closure(model, 6)
    else:  # every row depends on every point through the mean
        x = torch.rand(6, 2, dtype=DT, generator=torch.Generator().manual_seed(3))

        def closure():
            u = model(x)[:, 0]
            return u - u.mean()

    opt = gramopt.GaussNewton(model, jacobian="hooks")
    before, state = params_vector(model), opt.state_dict()
    with pytest.raises(gramopt.UnsupportedModuleError, match="jacobian='functional'"):
        opt.step(closure)
    assert torch.equal(params_vector(model), before)
    assert opt.state_dict()["gramopt"] == state["gramopt"] and opt.last_info is None


def test_the_check_runs_on_the_first_step_and_every_check_every_steps():
    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    opt = gramopt.GaussNewton(model, damping=1e-3, check_every=3)
    checked = []
    for _ in range(7):
        opt.step(closure)
        checked.append(opt.last_info.checked)
        assert opt.last_info.jacobian == "hooks"
    assert checked == [True, False, False, True, False, False, True]


# -- parameters no hooked layer covers -----------------------------------------------------------
class Scaled(nn.Module):
    """A Linear stack whose output a bare parameter of ``size`` entries scales (by their mean;
    no handler covers it)."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.body = small_model(1, width=5)
        self.scale = nn.Parameter(torch.full((size,), 1.5, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale.mean()


@pytest.mark.parametrize("size", [1, 40])
def test_uncovered_parameters_get_exact_columns_and_a_warning_where_they_cost(size):
    """A few entries outside every hooked layer (a PDE coefficient) pass quietly; more than
    QUIET_AUTOGRAD_ENTRIES are named in a warning. Either way their columns are exact."""
    import warnings

    from gramopt.optim.gauss_newton.optimizer import QUIET_AUTOGRAD_ENTRIES

    model = Scaled(size)
    x = torch.rand(9, 2, dtype=DT, generator=torch.Generator().manual_seed(4))

    def closure():
        return model(x)[:, 0] - 0.3

    delta, _ = dense_step(model, closure, lr=1.0, damping=1e-3)
    before = params_vector(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = gramopt.GaussNewton(model, damping=1e-3, line_search=None, jacobian="hooks")
    named = [w for w in caught if "scale" in str(w.message)]
    assert len(named) == (1 if size > QUIET_AUTOGRAD_ENTRIES else 0), [str(w.message) for w in caught]
    opt.step(closure)
    assert opt.last_info.jacobian == "hooks" and opt.last_info.checked
    torch.testing.assert_close(params_vector(model) - before, delta, rtol=1e-9, atol=1e-12)
    with pytest.raises(gramopt.UnsupportedModuleError, match="scale"):
        gramopt.GaussNewton(Scaled(size), unsupported="error")
    with warnings.catch_warnings():  # every column comes from autograd there: nothing to say
        warnings.simplefilter("error")
        gramopt.GaussNewton(Scaled(size), jacobian="functional")


def test_a_parameter_outside_the_model_is_refused_saying_how_to_register_it():
    model = small_model(1, width=5)
    kappa = nn.Parameter(torch.tensor(0.5, dtype=DT))
    with pytest.raises(ValueError, match=r"must belong to the model.*register it on a module"):
        gramopt.GaussNewton(model, params=[*model.parameters(), kappa])


# -- momentum, the Armijo search, max_update_norm ----------------------------------------------------
def test_spring_momentum_matches_its_formula():
    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    mu, damping = 0.6, 1e-3
    opt = gramopt.GaussNewton(model, damping=damping, momentum=mu, line_search=None, lr=0.5)
    previous = None
    for _ in range(3):
        j, r = residual_jacobian(model, closure)
        w = r if previous is None else r + mu * (j @ previous)
        direction = -j.T @ torch.linalg.solve(j @ j.T + damping * torch.eye(j.shape[0], dtype=DT), w)
        expected = direction if previous is None else mu * previous + direction
        before = params_vector(model)
        opt.step(closure)
        torch.testing.assert_close(params_vector(model) - before, 0.5 * expected, rtol=1e-8, atol=1e-12)
        previous = expected


def test_armijo_takes_the_first_halving_with_sufficient_decrease():
    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    j, r = residual_jacobian(model, closure)
    delta, loss = dense_step(model, closure, lr=4.0, damping=1e-6)
    theta = params_vector(model)
    opt = gramopt.GaussNewton(model, lr=4.0, damping=1e-6, line_search="armijo")
    opt.step(closure)
    info = opt.last_info
    slope = float((j.T @ r) @ (delta / 4.0))
    j_taken = round(-math.log2(info.lr_taken / 4.0))
    assert len(info.trials) == j_taken + 1
    for i, value in enumerate(info.trials):
        t = 4.0 * 2.0**-i
        assert (value <= float(loss) + 1e-4 * t * slope) == (i == j_taken)
    torch.testing.assert_close(params_vector(model), theta + info.lr_taken * delta / 4.0, rtol=1e-9, atol=1e-12)


def test_max_update_norm_scales_the_step():
    model = small_model(width=6)
    closure = pinn_closure(model, 8, 4)
    delta, _ = dense_step(model, closure, lr=1.0, damping=1e-3)
    before = params_vector(model)
    cap = 0.1 * float(delta.norm())
    opt = gramopt.GaussNewton(model, damping=1e-3, line_search=None, max_update_norm=cap)
    opt.step(closure)
    expected = delta * (cap / float(delta.norm()))
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-9, atol=1e-12)
