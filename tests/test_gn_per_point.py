"""The functional Jacobian's per-point route (gramopt.optim.gauss_newton.per_point) against a
dense float64 reference built independently with torch.func: the residual as a function of
the parameters (``functional_call``), its Laplacian from ``torch.func.hessian`` and first
derivatives from ``torch.func.jacrev`` per point, J by ``torch.func.jacrev`` over the
parameters. The closures take their derivatives the usual PINN way, with nested
``torch.autograd.grad(create_graph=True)``, which torch.func cannot run."""

from __future__ import annotations

import math

import pytest
import torch
from tests.reference import gauss_newton_delta, params_vector, residual_jacobian
from tests.test_gn_reference import small_model
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, hessian, jacrev, vmap

import gramopt
from gramopt.optim.gauss_newton import jacobian as jac_mod
from gramopt.optim.gauss_newton.per_point import NotPerPoint
from gramopt.optim.gauss_newton.residuals import evaluate

DT = torch.float64
CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:gramopt.*hooks cover no layer of these parameters:RuntimeWarning"),
]


class InverseProblem(nn.Module):
    """A network and a learnable PDE coefficient (a parameter of no Linear layer)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.kappa = nn.Parameter(torch.tensor(0.7, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def points(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 2, dtype=DT, generator=torch.Generator().manual_seed(seed))


def autograd_groups(model: nn.Module, net: nn.Module, k: int, matrix: bool):
    """The closure: ``[-kappa Lap u - f [7(, k)], u(boundary) - 0.5 [4(, k)], du_0/dx_0 [3]]``
    (kappa = 1 without a coefficient), derivatives by ``torch.autograd.grad``."""
    x, xb, xn = points(7, 1), points(4, 2).round(), points(3, 3)
    f = torch.sin(math.pi * x).prod(dim=1, keepdim=True)

    def residuals():
        xi = x.clone().requires_grad_(True)
        u = net(xi)
        laplacian = []
        for c in range(k):
            (du,) = torch.autograd.grad(u[:, c].sum(), xi, create_graph=True)
            laplacian.append(sum(torch.autograd.grad(du[:, j].sum(), xi, create_graph=True)[0][:, j] for j in range(2)))
        kappa = getattr(model, "kappa", 1.0)
        interior = -kappa * torch.stack(laplacian, dim=1) - f
        xi_n = xn.clone().requires_grad_(True)
        (dn,) = torch.autograd.grad(net(xi_n)[:, 0].sum(), xi_n, create_graph=True)
        boundary = net(xb) - 0.5
        if not matrix:
            interior, boundary = interior[:, 0], boundary[:, 0]
        return [interior, boundary, dn[:, 0]]

    return residuals, (x, xb, xn, f)


def reference_jacobian(model: nn.Module, k: int, matrix: bool, data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J [M, p], r [M])`` of :func:`autograd_groups`' rows by torch.func alone."""
    x, xb, xn, f = data
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    theta = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def rows(th: dict[str, torch.Tensor]) -> torch.Tensor:
        def u(point: torch.Tensor) -> torch.Tensor:  # [2] -> [k]
            return functional_call(model, th, (point.unsqueeze(0),))[0]

        laplacian = vmap(hessian(u))(x).diagonal(dim1=-2, dim2=-1).sum(-1)  # [7, k]
        kappa = th["kappa"] if "kappa" in th else 1.0
        interior = -kappa * laplacian - f
        boundary = functional_call(model, th, (xb,)) - 0.5
        if not matrix:
            interior, boundary = interior[:, 0], boundary[:, 0]
        dn = vmap(jacrev(u))(xn)[:, 0, 0]
        return torch.cat([interior.reshape(-1), boundary.reshape(-1), dn])

    jac = jacrev(rows)(theta)
    r = rows(theta)
    return torch.cat([jac[name].reshape(r.shape[0], -1) for name in names], dim=1), r


@pytest.mark.parametrize("k, matrix", [(1, False), (1, True), (2, True)])
@pytest.mark.parametrize("coefficient", [False, True])
def test_per_point_jacobian_is_the_dense_reference(k, matrix, coefficient):
    net = small_model(k, width=5)
    model = InverseProblem(net) if coefficient else net
    closure, data = autograd_groups(model, net, k, matrix)
    expected, r = reference_jacobian(model, k, matrix, data)
    opt = gramopt.GaussNewton(model, jacobian="functional")
    res = evaluate(closure, DT, CPU)
    torch.testing.assert_close(res.flat.detach(), r, rtol=1e-12, atol=1e-13)
    jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure)
    assert route == "per-point"
    assert jac.shape == expected.shape and bool(expected.ne(0).any())
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure, ("rows",))
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)


def test_a_layer_called_on_a_sequence_per_point_gives_the_reference_rows():
    """Inputs ``[N, S, d]``: point n's rows depend on its S entries (one copy per point)."""
    model = small_model(2, width=4)
    x = torch.rand(5, 3, 2, dtype=DT, generator=torch.Generator().manual_seed(4))

    def closure():
        return model(x).sum(dim=1)

    expected, _ = residual_jacobian(model, closure)
    opt = gramopt.GaussNewton(model, jacobian="functional")
    res = evaluate(closure, DT, CPU)
    jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure)
    assert route == "per-point"
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)


def refused_closures(model: nn.Module) -> dict[str, tuple[object, str]]:
    """Closures whose rows are not per point (or not all through the copies), with the
    reason the per-point route gives."""
    x6, x4 = points(6, 5), points(4, 6)
    return {
        # the first pass (ones on the rows) sums to zero here: only the random pass sees it
        "neighbour": (lambda: model(x6)[:, 0] - model(x6)[:, 0].roll(1), "another point's call"),
        "mean": (lambda: model(x6)[:, 0] - model(x6)[:, 0].mean(), "another point's call"),
        "other size": (lambda: [model(x6)[:, 0], model(x4)[:, 0] + model(x6)[:4, 0]], "on 6 points"),
        "outside": (lambda: model(x6)[:, 0] + model[0].bias.sum(), "0.bias is used outside"),
        "unbatched": (lambda: model(x6)[:, 0] + model(x6[0])[0], "without a batch of points"),
    }


@pytest.mark.parametrize("case", ["neighbour", "mean", "other size", "outside", "unbatched"])
def test_rows_that_are_not_per_point_are_refused_and_the_next_route_is_exact(case):
    model = small_model(width=5)
    closure, reason = refused_closures(model)[case]
    expected, _ = residual_jacobian(model, closure)
    params = list(model.parameters())
    res = evaluate(closure, DT, CPU)
    with pytest.raises(NotPerPoint, match=reason):
        jac_mod.per_point_route(model, closure, res, params)
    if case == "unbatched":
        return  # (the optimizer's own hooks refuse such a call in the step, before any Jacobian)
    opt = gramopt.GaussNewton(model, jacobian="functional")
    jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure)
    assert route == "jacrev"  # (these closures run under torch.func)
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    assert all(len(m._forward_hooks) <= 1 for m in model.modules())  # only the engine's hook is left


def test_coupled_autograd_rows_fall_back_to_row_products():
    """Rows coupled through the mean of an autograd Laplacian: neither per-point copies nor
    jacrev apply; the row-by-row products give the reference J (torch.func.hessian)."""
    model = small_model(width=5)
    x = points(6, 7)

    def closure():
        xi = x.clone().requires_grad_(True)
        (du,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        laplacian = sum(torch.autograd.grad(du[:, j].sum(), xi, create_graph=True)[0][:, j] for j in range(2))
        return laplacian - laplacian.mean()

    names = [name for name, _ in model.named_parameters()]

    def rows(th):
        u = lambda point: functional_call(model, th, (point.unsqueeze(0),))[0, 0]  # noqa: E731
        laplacian = vmap(hessian(u))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
        return laplacian - laplacian.mean()

    theta = {name: p.detach() for name, p in model.named_parameters()}
    jac = jacrev(rows)(theta)
    expected = torch.cat([jac[name].reshape(6, -1) for name in names], dim=1)
    opt = gramopt.GaussNewton(model, jacobian="functional")
    res = evaluate(closure, DT, CPU)
    got, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure)
    assert route == "rows"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_the_step_is_the_dense_step_and_the_check_runs_every_check_every_steps():
    net = small_model(2, width=5)
    closure, data = autograd_groups(net, net, 2, True)
    opt = gramopt.GaussNewton(net, lr=0.5, damping=1e-3, line_search=None, jacobian="functional", check_every=2)
    seen = []
    for _ in range(3):
        expected, r = reference_jacobian(net, 2, True, data)
        delta = gauss_newton_delta(expected, r, 0.5, 1e-3, "sample")
        before = params_vector(net)
        opt.step(closure)
        torch.testing.assert_close(params_vector(net) - before, delta, rtol=1e-9, atol=1e-12)
        seen.append((opt.last_info.jacobian_route, opt.last_info.checked))
    assert seen == [("per-point", True), ("per-point", False), ("per-point", True)]


def test_a_refused_route_is_not_tried_again():
    model = small_model(width=5)
    closure, _ = refused_closures(model)["neighbour"]
    opt = gramopt.GaussNewton(model, jacobian="functional", line_search=None, damping=1e-3)
    calls = []

    def counted():
        calls.append(1)
        return closure()

    opt.step(counted)
    assert opt.last_info.jacobian_route == "jacrev" and len(calls) == 3  # the step's, per-point's, jacrev's
    calls.clear()
    opt.step(counted)
    assert opt.last_info.jacobian_route == "jacrev" and len(calls) == 2


@pytest.mark.parametrize("coefficient", [False, True])
def test_rows_and_columns_of_the_row_route_are_the_reference(coefficient):
    """J through the step's graph by rows (vector-Jacobian products) and by columns (double
    vector-Jacobian products), whichever functional_columns would pick."""
    net = small_model(2, width=4)
    model = InverseProblem(net) if coefficient else net
    closure, data = autograd_groups(model, net, 2, True)
    expected, _ = reference_jacobian(model, 2, True, data)
    params = [p for p in model.parameters()]
    flat = evaluate(closure, DT, CPU).flat
    by_rows = jac_mod.rows_by_vjp(flat, params)
    by_columns = jac_mod.columns_by_double_vjp(flat, params)
    torch.testing.assert_close(by_rows, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(by_columns, expected, rtol=1e-10, atol=1e-12)


class SquareOnce(torch.autograd.Function):
    """``x^2`` whose backward cannot be differentiated again (autograd drops such a path
    from a derivative of the backward without an error)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_columns_through_a_once_differentiable_backward_fall_back_to_rows():
    scale = nn.Parameter(torch.tensor(0.8, dtype=DT))
    x = points(9, 8)[:, 0]
    flat = SquareOnce.apply(scale * x)
    expected = (2 * scale.detach() * x.pow(2)).unsqueeze(1)  # d (scale x)^2 / d scale
    assert not jac_mod._agrees_with_a_vjp(jac_mod.columns_by_double_vjp(flat, [scale]), flat, [scale])
    torch.testing.assert_close(jac_mod.functional_columns(flat, [scale]), expected, rtol=1e-12, atol=0)


def test_batchnorm_in_training_mode_keeps_the_per_point_route_off_until_eval_mode():
    """Batch statistics couple the points: the route is not tried in training mode (nor
    dropped for good); in eval mode BatchNorm is per point and the route gives the dense J
    (BatchNorm's own parameters by columns)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    x = points(8, 9)
    calls = []

    def closure():
        calls.append(1)
        return model(x)[:, 0] - 0.5

    opt = gramopt.GaussNewton(model, jacobian="functional", line_search=None, damping=1e-3)
    opt.step(closure)
    assert opt.last_info.jacobian_route == "rows" and len(calls) == 2  # the step's call and jacrev's (refused)
    model.eval()
    expected, _ = residual_jacobian(model, closure)
    res = evaluate(closure, DT, CPU)
    jac, route = jac_mod.functional_jacobian(opt.engine, res, opt._params(), closure)
    assert route == "per-point"
    torch.testing.assert_close(jac, expected, rtol=1e-10, atol=1e-12)
    opt.step(closure)
    assert opt.last_info.jacobian_route == "per-point"
