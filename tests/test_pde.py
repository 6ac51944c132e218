"""gramopt.pde.forward_laplacian: value, gradient and Laplacian against dense float64
torch.func references (vmap of jacrev / hessian per point), and the capture engine's Jacobian
rows of residuals built from it (the bias indicator of gramopt.capture.channels) against
jacrev of the same residual built independently."""

from __future__ import annotations

import math

import pytest
import torch
from tests.reference import input_derivatives, named_trainable
from torch import nn
from torch.func import functional_call, jacrev, vmap

from gramopt.capture import CaptureEngine, LayerFactors
from gramopt.capture.channels import active_bias_positions, bias_positions
from gramopt.errors import CaptureError, UnsupportedModuleError
from gramopt.linalg.kernels import shared_weight_gram
from gramopt.pde import Derivatives, Sin, activations, forward_laplacian, register_activation

DT = torch.float64
# torch.func.hessian (forward-mode inside) loads a TorchScript decomposition that warns about torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "softplus": lambda: nn.Softplus(beta=1.5),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "sin": Sin,
}
# (d_in, hidden widths, outputs)
SHAPES = [(3, (5,), 1), (3, (4, 6, 3), 2), (2, (7, 7), 3)]


def mlp(d_in: int, hidden: tuple[int, ...], k: int, act, seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    widths = (d_in, *hidden, k)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def points(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.rand(n, d, dtype=DT, generator=torch.Generator().manual_seed(seed)) - 1


def assert_derivatives(u: Derivatives, model: nn.Module, x: torch.Tensor, dims=None, gradient_dims=None) -> None:
    value, jac, hess = input_derivatives(model, x)
    lap = list(range(x.shape[1])) if dims is None else list(dims)
    grad = lap if gradient_dims is None else list(gradient_dims)
    expected_lap = hess[:, :, lap, lap].sum(dim=2)
    torch.testing.assert_close(u.value, value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u.gradient, jac[:, :, grad], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u.laplacian, expected_lap, rtol=1e-12, atol=1e-12)


# -- forward_laplacian against torch.func ------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{'-'.join(map(str, s[1]))}-{s[2]}")
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_forward_laplacian_matches_dense_hessian(act, shape):
    d_in, hidden, k = shape
    model = mlp(d_in, hidden, k, ACTIVATIONS[act])
    x = points(6, d_in)
    u = forward_laplacian(model, x)
    assert u.value.shape == (6, k) and u.gradient.shape == (6, k, d_in) and u.laplacian.shape == (6, k)
    assert_derivatives(u, model, x)


@pytest.mark.parametrize("dims", [(0,), (2, 0), (1, 2)])
def test_laplacian_over_a_subset_of_coordinates(dims):
    model = mlp(3, (6, 5), 2, nn.Tanh)
    x = points(5, 3)
    u = forward_laplacian(model, x, dims)
    assert u.gradient.shape == (5, 2, len(dims))
    assert_derivatives(u, model, x, dims)


def test_gradient_dims_add_first_derivatives_outside_the_laplacian():
    # a heat equation: d_t u and the Laplacian over the spatial coordinates 1, 2
    model = mlp(3, (6,), 1, nn.SiLU)
    x = points(5, 3)
    u = forward_laplacian(model, x, dims=(1, 2), gradient_dims=(0, 1, 2))
    assert u.gradient.shape == (5, 1, 3)
    assert_derivatives(u, model, x, dims=(1, 2), gradient_dims=(0, 1, 2))
    negative = forward_laplacian(model, x, dims=(-2, -1), gradient_dims=(2, 0, 1))
    assert_derivatives(negative, model, x, dims=(1, 2), gradient_dims=(2, 0, 1))


def test_mixed_activations_no_bias_nested_sequential_and_identity():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(2, 5, bias=False),
        nn.Sequential(Sin(), nn.Linear(5, 4), nn.Identity(), nn.GELU()),
        nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Softplus(beta=0.5, threshold=30.0))),
        nn.Linear(4, 2),
    ).to(DT)
    x = points(7, 2)
    assert_derivatives(forward_laplacian(model, x), model, x)


def test_inplace_activation_and_repeated_module():
    torch.manual_seed(4)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(2, 4), nn.SiLU(inplace=True), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 1))
    model = model.to(DT)
    x = points(6, 2)
    assert_derivatives(forward_laplacian(model, x), model, x)


class Composed(nn.Module):
    """A forward that is a plain composition of modules (traced with torch.fx)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.inp = nn.Linear(3, 6)
        self.body = nn.Sequential(nn.Tanh(), nn.Linear(6, 6), Sin())
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


def test_module_whose_forward_composes_supported_modules():
    model = Composed().to(DT)
    x = points(5, 3)
    assert_derivatives(forward_laplacian(model, x), model, x)


class Cube(nn.Module):
    def forward(self, x):
        return x**3 / 3


def test_registered_activation(monkeypatch):
    monkeypatch.setattr(activations, "_RULES", dict(activations._RULES))
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 5), Cube(), nn.Linear(5, 1)).to(DT)
    x = points(5, 2)
    with pytest.raises(UnsupportedModuleError, match="Cube"):
        forward_laplacian(model, x)
    register_activation(Cube, lambda m, a: a**2, lambda m, a: 2 * a)
    assert_derivatives(forward_laplacian(model, x), model, x)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_activation(int, lambda m, a: a, lambda m, a: a)
    with pytest.raises(TypeError, match="callables"):
        register_activation(Cube, None, lambda m, a: a)


# -- refusals ---------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Tanh()

    def forward(self, x):
        return x + self.b(self.a(x))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x):
        h = self.a(x)
        self.b(x)  # a call whose output is dropped: not a plain composition
        return h


class TanhOverridden(nn.Tanh):
    def forward(self, x):
        return 2 * torch.tanh(x)


class Shaped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x


@pytest.mark.parametrize(
    "model, names",
    [
        (nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1)), ["1", "LayerNorm"]),
        (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), ["1", "ReLU"]),
        (Residual(), ["Residual", "add"]),
        (Branching(), ["Branching", "b"]),
        (nn.Sequential(nn.Linear(2, 2), TanhOverridden()), ["TanhOverridden", "register_activation"]),
        (Shaped(), ["Shaped", "torch.fx"]),
        (nn.Conv1d(2, 2, 1), ["Conv1d"]),
    ],
    ids=["layernorm", "relu", "residual", "branching", "overridden", "control-flow", "conv"],
)
def test_unsupported_models_are_refused_by_name(model, names):
    with pytest.raises(UnsupportedModuleError) as err:
        forward_laplacian(model.to(DT), points(3, 2))
    message = str(err.value)
    assert 'jacobian="functional"' in message or "register_activation" in message
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    "x, dims, error, match",
    [
        (torch.rand(3, dtype=DT), None, ValueError, r"\[N, d_in\]"),
        (torch.ones(3, 2, dtype=torch.int64), None, TypeError, "floating point"),
        ([[0.0, 1.0]], None, TypeError, "tensor"),
        (torch.rand(3, 2, dtype=DT), (0, 0), ValueError, "repeats"),
        (torch.rand(3, 2, dtype=DT), (2,), ValueError, "out of range"),
        (torch.rand(3, 2, dtype=DT), (), ValueError, "empty"),
        (torch.rand(3, 2, dtype=DT), (0.0,), TypeError, "ints"),
        (torch.rand(3, 2, dtype=DT), 0, TypeError, "sequence"),
        (torch.rand(3, 2, dtype=torch.float32), None, TypeError, "float64"),
    ],
)
def test_bad_points_and_dims(x, dims, error, match):
    model = mlp(2, (3,), 1, nn.Tanh)
    with pytest.raises(error, match=match):
        forward_laplacian(model, x, dims)


def test_gradient_dims_must_contain_dims():
    with pytest.raises(ValueError, match="must contain"):
        forward_laplacian(mlp(3, (3,), 1, nn.Tanh), points(2, 3), dims=(1, 2), gradient_dims=(0, 1))


# -- the capture engine's Jacobian rows of forward-Laplacian residuals ----------------------------
def source(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * x).prod(dim=1, keepdim=True)


def dense_laplacian_residual(model: nn.Module, x: torch.Tensor, theta: dict, k: int) -> torch.Tensor:
    """``-Lap u_theta(x_i) - f(x_i)`` ``[N, k]`` with the Laplacian from torch.func.hessian."""

    def u(xi):
        return functional_call(model, theta, (xi.unsqueeze(0),)).squeeze(0)

    lap = vmap(lambda xi: torch.func.hessian(u)(xi).diagonal(dim1=1, dim2=2).sum(dim=1))(x)
    return -lap - source(x).expand(-1, k)


def hooked(model: nn.Module, residual: torch.Tensor, engine: CaptureEngine) -> dict[str, LayerFactors]:
    """One backward pass per output column of ``residual [N, k]`` through the engine."""
    k = residual.shape[1]
    directions = [torch.zeros_like(residual).index_fill_(1, torch.tensor([c]), 1.0) for c in range(k)]
    engine.backward_passes(residual, directions)
    return engine.factors()


def layer_blocks(engine: CaptureEngine, theta: dict) -> list[tuple[str, slice]]:
    """Per hooked layer, its columns of J (parameters in named_parameters order)."""
    offsets, start = {}, 0
    for name, t in theta.items():
        offsets[name] = slice(start, start + t.numel())
        start += t.numel()
    out = []
    for layer in engine.layers:
        names = [n for n, p in engine.model.named_parameters() if any(p is q for q in layer.params)]
        out.append((layer.name, slice(offsets[names[0]].start, offsets[names[-1]].stop)))
    return out


def check_factors(factors: dict[str, LayerFactors], blocks, j: torch.Tensor) -> None:
    """Every product of the layers' factors against the dense rows J ``[n, p]``."""
    gen = torch.Generator().manual_seed(0)
    n = j.shape[0]
    gram = torch.zeros(n, n, dtype=DT)
    for name, cols in blocks:
        f = factors[name]
        u = j[:, cols]
        torch.testing.assert_close(f.per_sample(), u, rtol=1e-10, atol=1e-12)
        gram += f.gram()
        a = torch.randn(n, generator=gen, dtype=DT)
        torch.testing.assert_close(torch.cat([t.reshape(-1) for t in f.rmatvec(a)]), u.T @ a, rtol=1e-10, atol=1e-12)
        v = torch.randn(u.shape[1], generator=gen, dtype=DT)
        shapes = [p.shape for p in f.params]
        parts = list(torch.split(v, [math.prod(s) for s in shapes]))
        vectors = [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
        torch.testing.assert_close(f.matvec(vectors), u @ v, rtol=1e-10, atol=1e-12)
        index = torch.tensor([0, u.shape[1] - 1, u.shape[1] // 2])
        torch.testing.assert_close(f.columns(index), u[:, index], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.row_block(1, 3), u[1:3], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f.column_norms(), u.pow(2).sum(dim=0), rtol=1e-10, atol=1e-12)
        x_side, z_side = f.kronecker_factors()  # U_i = sum_s z_is (x) [x_is, m_is]
        kron = torch.einsum("bksz,bsx->bkzx", z_side, x_side).reshape(n, -1)
        torch.testing.assert_close(kron, _weight_then_bias(u, f), rtol=1e-10, atol=1e-12)
        for strategy in ("pairs", "explicit"):  # both forms of the shared-weight Gram
            gram_l = shared_weight_gram(f.inputs, f.grads, f.with_bias, strategy, None, f.bias_positions)
            torch.testing.assert_close(gram_l, u @ u.T, rtol=1e-10, atol=1e-12)
        b, k = f.batch_size, f.passes  # the first pass's rows (GGN's sampled systems)
        first = u.reshape(b, k, -1)[:, :1].reshape(b, -1)
        torch.testing.assert_close(f.pass_block(b, k, 1).gram(), first @ first.T, rtol=1e-10, atol=1e-12)
        c = torch.randn(n, generator=gen, dtype=DT)
        torch.testing.assert_close(f.block_product(b, k, 1, c), first @ (u.T @ c), rtol=1e-10, atol=1e-12)
        restored = LayerFactors.from_state(f.module, f.params, f.state())
        torch.testing.assert_close(restored.per_sample(), u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(restored.gram(), u @ u.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gram, j @ j.T, rtol=1e-10, atol=1e-12)


def _weight_then_bias(u: torch.Tensor, f) -> torch.Tensor:
    """Rows ``[W | c]`` reordered as ``[d_out, d_in + 1]`` (the Kronecker factors' layout)."""
    d_out, d_in = f.weight_shape
    weight = u[:, : d_out * d_in].reshape(-1, d_out, d_in)
    return torch.cat([weight, u[:, d_out * d_in :].reshape(-1, d_out, 1)], dim=2).reshape(u.shape[0], -1)


@pytest.mark.parametrize("k", [1, 2])
def test_hooks_rows_of_an_interior_residual_match_jacrev(k):
    model = mlp(2, (6, 5), k, nn.Tanh).train()
    x = torch.rand(8, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    theta = named_trainable(model)
    engine = CaptureEngine(model, list(model.parameters()))
    u = forward_laplacian(model, x)
    factors = hooked(model, -u.laplacian - source(x).expand(-1, k), engine)
    jac = jacrev(lambda th: dense_laplacian_residual(model, x, th, k))(theta)
    j = torch.cat([jac[name].reshape(8 * k, -1) for name in theta], dim=1)
    check_factors(factors, layer_blocks(engine, theta), j)
    engine.close()


def test_hooks_rows_of_value_gradient_and_laplacian_channels_in_one_residual():
    # boundary rows (value channel), interior rows (Laplacian and a first derivative): one call per layer
    model = mlp(2, (5, 4), 1, nn.SiLU).train()
    x = torch.rand(9, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    boundary = torch.arange(9) >= 6
    theta = named_trainable(model)

    def combine(value, grad_x0, lap):
        return torch.where(boundary.view(-1, 1), value - source(x), -lap + 0.5 * grad_x0 - source(x))

    engine = CaptureEngine(model, list(model.parameters()))
    u = forward_laplacian(model, x)
    factors = hooked(model, combine(u.value, u.gradient[:, :, 0], u.laplacian), engine)

    def dense(th):
        value, jac, hess = input_derivatives(lambda z: functional_call(model, th, (z,)), x)
        return combine(value, jac[:, :, 0], hess.diagonal(dim1=2, dim2=3).sum(dim=2))

    jac = jacrev(dense)(theta)
    j = torch.cat([jac[name].reshape(9, -1) for name in theta], dim=1)
    check_factors(factors, layer_blocks(engine, theta), j)
    # the check can fail: a bias reaching every channel (the sum over positions) is wrong here
    first = factors[engine.layers[0].name]
    naive = first.grads.sum(dim=2).reshape(9, -1)
    assert (naive - first.per_sample()[:, -naive.shape[1] :]).abs().max() > 1e-3
    engine.close()


def test_hooks_rows_of_a_plain_boundary_residual_match_jacrev():
    model = mlp(2, (6, 5), 1, nn.Tanh).train()
    xb = torch.rand(7, 2, dtype=DT, generator=torch.Generator().manual_seed(4)).round()
    theta = named_trainable(model)
    engine = CaptureEngine(model, list(model.parameters()))
    factors = hooked(model, model(xb) - 0.3, engine)
    jac = jacrev(lambda th: functional_call(model, th, (xb,)) - 0.3)(theta)
    j = torch.cat([jac[name].reshape(7, -1) for name in theta], dim=1)
    check_factors(factors, layer_blocks(engine, theta), j)
    for factor in factors.values():
        assert factor.bias_positions is None  # outside forward_laplacian nothing changes
    engine.close()


def test_accumulated_micro_batches_keep_the_bias_indicator():
    model = mlp(2, (5,), 1, nn.Tanh).train()
    x = torch.rand(8, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    theta = named_trainable(model)
    engine = CaptureEngine(model, list(model.parameters()))
    for part in (x[:5], x[5:]):
        u = forward_laplacian(model, part)
        (-u.laplacian - source(part)).sum().backward()
    factors = engine.factors()
    jac = jacrev(lambda th: dense_laplacian_residual(model, x, th, 1))(theta)
    j = torch.cat([jac[name].reshape(8, -1) for name in theta], dim=1)
    for name, cols in layer_blocks(engine, theta):
        torch.testing.assert_close(factors[name].per_sample(), j[:, cols], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors[name].gram(), j[:, cols] @ j[:, cols].T, rtol=1e-10, atol=1e-12)
    engine.close()


def test_seng_implicit_factors_use_the_bias_indicator():
    model = mlp(2, (4,), 1, nn.Tanh).train()
    x = torch.rand(6, 2, dtype=DT, generator=torch.Generator().manual_seed(6))
    engine = CaptureEngine(model, list(model.parameters()))
    u = forward_laplacian(model, x)
    (-u.laplacian).sum().backward()
    for factor in engine.factors().values():
        low_rank = factor.low_rank_factors()  # u_i = vec(G_i^T A_i) = [weight | bias] rows
        g, a = low_rank.g, low_rank.a
        rows = torch.einsum("bsz,bsx->bzx", g, a).reshape(6, -1)
        torch.testing.assert_close(rows, _weight_then_bias(factor.per_sample(), factor), rtol=1e-10, atol=1e-12)
    engine.close()


def test_bias_positions_context_is_scoped_and_checked():
    assert active_bias_positions() is None
    with bias_positions([1.0, 0.0]):
        assert active_bias_positions() == (1.0, 0.0)
        with bias_positions([1.0, 0.0, 0.0]):
            assert active_bias_positions() == (1.0, 0.0, 0.0)
        assert active_bias_positions() == (1.0, 0.0)
    assert active_bias_positions() is None
    with pytest.raises(ValueError, match="one indicator per position"):
        with bias_positions([]):
            pass
    model = nn.Linear(2, 2).to(DT).train()
    engine = CaptureEngine(model, list(model.parameters()))
    with pytest.raises(CaptureError, match=r"\[N, 3, d_in\]"), bias_positions([1.0, 0.0, 0.0]):
        model(torch.rand(4, 2, dtype=DT))
    engine.close()
