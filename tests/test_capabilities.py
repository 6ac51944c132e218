"""What methods ask of layers instead of testing their types: handlers' capabilities
(``dense_layer``, ``low_rank_layout``) and factors' (``low_rank_factors``), checked against
torch.func references, and a user-registered handler opting into each of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gramopt
import models
from gramopt.capture import CaptureEngine, handler_for
from gramopt.capture.handlers import linear_factors, weight_bias_layout
from gramopt.capture.registry import _REGISTRY
from reference import jacobian

CASES = {
    "mlp": (lambda: models.mlp(out=3), lambda b: torch.randn(b, 5)),
    "cnn": (lambda: models.cnn(out=3), lambda b: torch.randn(b, 1, 8, 8)),
    "conv1d": (lambda: models.conv1d_net(out=3), lambda b: torch.randn(b, 2, 8)),
    "transformer": (lambda: models.TinyTransformer(out=3), lambda b: torch.randint(0, 11, (b, 5))),
    "grouped": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
        lambda b: torch.randn(b, 2, 4, 4),
    ),
    "bias-free": (
        lambda: nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)),
        lambda b: torch.randn(b, 4),
    ),
}


def _rows_from_low_rank(g: Tensor, a: Tensor, layout) -> Tensor:
    """U ``[n, p]`` (weight flattened, then bias) from ``vec(G_r^T A_r)`` ``[n, n_G, n_A]``."""
    m = torch.einsum("rsg,rsa->rga", g, a)
    d_in = 0 if layout.weight_shape is None else layout.weight_shape[1:].numel()
    parts = [m[:, :, :d_in].reshape(m.shape[0], -1)] if layout.weight_shape is not None else []
    if layout.bias:
        parts.append(m[:, :, d_in])
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("passes", [1, 3])
@pytest.mark.parametrize("name", sorted(CASES))
def test_low_rank_factors_give_the_rows_and_the_handler_says_which(name, passes, float64):
    """Where a handler gives a low-rank layout, the layer's factors give G and A whose
    ``vec(G_r^T A_r)`` are the rows of U (Jacobian rows times the passes' directions, from
    torch.func), with the same layout; where it gives none (Embedding, norms, grouped
    convolutions), neither do the factors."""
    build, inputs = CASES[name]
    model, b = build(), 4
    x = inputs(b)
    engine = CaptureEngine(model, [p for p in model.parameters() if p.requires_grad])
    out = model(x)
    directions = [torch.randn_like(out) for _ in range(passes)]
    engine.backward_passes(out, directions)
    factors = engine.factors()
    layers = {layer.name: layer for layer in engine.blocks}
    engine.close()
    k = out[0].numel()
    seen = 0
    for name_, factor in factors.items():
        layout = layers[name_].low_rank_layout()
        low_rank = factor.low_rank_factors()
        if layout is None:
            assert low_rank is None, name_
            continue
        seen += 1
        assert low_rank is not None and low_rank.layout == layout, name_
        jac = jacobian(model, x, factor.params).view(b, k, -1)
        stacked = torch.stack([d.reshape(b, k) for d in directions])  # [passes, b, k]
        rows = torch.einsum("cbo,bop->bcp", stacked, jac).reshape(b * passes, -1)
        assert low_rank.g.shape[0] == low_rank.a.shape[0] == b * passes
        assert low_rank.g.shape[2] == layout.output_features and low_rank.a.shape[2] == layout.input_features
        torch.testing.assert_close(_rows_from_low_rank(low_rank.g, low_rank.a, layout), rows, rtol=1e-10, atol=1e-12)
    assert seen


def test_which_built_in_layers_have_which_capability():
    """Dense: Linear, every convolution, attention. Low-rank layout: Linear and ungrouped
    Conv1d / Conv2d only (grouped, transposed and 3-d convolutions have explicit rows)."""
    dense = {t.__name__ for t, h in _REGISTRY.items() if h.dense_layer}
    assert dense == {"Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                     "MultiheadAttention"}
    params = lambda m: list(m.parameters(recurse=False))  # noqa: E731
    for module, expected in [
        (nn.Linear(3, 2), (2, 4, True)),
        (nn.Conv2d(2, 5, 3), (5, 19, True)),
        (nn.Conv1d(2, 5, 3, bias=False), (5, 6, False)),
        (nn.Conv2d(4, 4, 3, groups=2), None),
        (nn.ConvTranspose2d(2, 3, 3), None),
        (nn.Conv3d(1, 2, 1), None),
        (nn.Embedding(5, 3), None),
        (nn.LayerNorm(3), None),
        (nn.MultiheadAttention(4, 2), None),
    ]:
        layout = handler_for(module).low_rank_layout(module, params(module))
        got = None if layout is None else (layout.output_features, layout.input_features, layout.bias)
        assert got == expected, module
    linear = nn.Linear(3, 2)
    bias_only = handler_for(linear).low_rank_layout(linear, [linear.bias])
    assert bias_only.weight_shape is None and bias_only.input_features == 1
    assert bias_only.split([torch.zeros(2)])[0] is None


# -- a user's layer type opting into the capabilities --------------------------------------
class MyLinear(nn.Module):
    """A Linear layer that is not an ``nn.Linear``: only its handler can say what it is."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class MyLinearHandler(gramopt.LayerHandler):
    """The Linear layer's factors and, when ``capable``, its capabilities."""

    def __init__(self, capable: bool) -> None:
        self.dense_layer = capable
        self.capable = capable

    def factors(self, module, params, saved, grads):
        return linear_factors(module, params, module.weight, module.bias, saved, grads)

    def low_rank_layout(self, module, params):
        return weight_bias_layout(module, params) if self.capable else None


def _pair() -> tuple[nn.Module, nn.Module]:
    """The same network twice: with nn.Linear layers, and with MyLinear as the middle layer."""
    torch.manual_seed(3)
    reference = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    mine = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), MyLinear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    mine.load_state_dict(reference.state_dict())
    return reference, mine


def _steps(opt, model, steps: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    opt.close()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("capable", [True, False])
def test_a_registered_handler_opts_into_fngd_and_seng_implicit(capable, monkeypatch):
    """FNGD preconditions a user's layer whose handler says ``dense_layer`` (and gives it
    the plain gradient, unwarned, otherwise); SENG keeps it implicit when its handler gives
    a low-rank layout. With the capabilities, the steps are those of the nn.Linear network."""
    monkeypatch.setitem(_REGISTRY, MyLinear, MyLinearHandler(capable))
    reference, mine = _pair()
    fngd = gramopt.FNGD(mine, lr=0.1, coefficient_steps=None)
    covered = {id(p) for layer in fngd.engine.layers for p in layer.params}
    assert (id(mine[2].weight) in covered) is capable
    assert not fngd.engine.unsupported_names
    got = _steps(fngd, mine)
    want = _steps(gramopt.FNGD(reference, lr=0.1, coefficient_steps=None), reference)
    if capable:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert not torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    reference, mine = _pair()
    implicit = gramopt.ImplicitConfig(threshold=60, exact_product=True)
    seng = gramopt.SENG(mine, lr=0.1, damping=1.0, implicit=implicit)
    assert ("2" in seng.implicit_layers) is capable and "0" not in seng.implicit_layers
    got = _steps(seng, mine)
    want = _steps(gramopt.SENG(reference, lr=0.1, damping=1.0, implicit=implicit), reference)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # (implicit with the exact product: the same step)


def test_a_proxy_handler_must_define_how_it_reroutes():
    class HalfProxy(MyLinearHandler):
        proxy_name = "inner"

        def proxy(self, module):
            return module

    with pytest.raises(TypeError, match="HalfProxy sets proxy_name but does not define attach, detach"):
        gramopt.register_handler(MyLinear, HalfProxy(True))
    assert MyLinear not in _REGISTRY
