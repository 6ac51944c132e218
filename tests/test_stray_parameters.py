"""No parameter with a gradient is silently left alone.

``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``) uses the weights of its
``out_proj`` submodule without calling it, so a hook on ``out_proj`` never fires: the
container owns every parameter below it. A model that uses a hooked layer's weights
functionally is caught at run time: those parameters follow the plain gradient with a
warning that names them. Every test checks that each parameter with a non-zero
gradient moves.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt


class EncoderClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 32)
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(dim=1))


class FunctionalUse(nn.Module):
    """``fc``'s weights are used through ``F.linear``: its hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        h = torch.tanh(F.linear(h, self.fc.weight, self.fc.bias))
        return self.head(h)


def _reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _build(method: str, model: nn.Module, **kwargs):
    if method == "ggn":
        return gramopt.GGN(model, lr=0.1, damping=1.0, loss="cross_entropy", **kwargs)
    if method == "seng":
        return gramopt.SENG(model, lr=0.1, damping=1.0, loss="cross_entropy", **kwargs)
    return gramopt.FNGD(model, lr=0.1, damping=1.0, loss="cross_entropy", **kwargs)


def _step(opt, model, x, y, loop: str) -> None:
    opt.zero_grad()
    if loop == "uniform":
        opt.backward(model(x), y)
    else:
        F.cross_entropy(model(x), y).backward()
    opt.step()


def _assert_all_move(model: nn.Module, before: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    frozen = [
        name
        for name, p in model.named_parameters()
        if name in grads and grads[name].abs().max() > 0 and torch.equal(p.detach(), before[name])
    ]
    assert not frozen, f"parameters with a non-zero gradient did not move: {frozen}"


CASES = [
    ("fngd", "uniform", {}),
    ("fngd", "ordinary", {}),
    ("seng", "uniform", {"unsupported": "gradient"}),
    ("seng", "ordinary", {"unsupported": "gradient"}),
    ("ggn", "uniform", {"unsupported": "gradient"}),
]


@pytest.mark.parametrize("method,loop,kwargs", CASES)
def test_transformer_encoder_layer_trains_every_parameter(method, loop, kwargs):
    model = EncoderClassifier()
    x, y = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
    grads = _reference_grads(model, x, y)
    assert grads["encoder.self_attn.out_proj.weight"].abs().max() > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _build(method, model, **kwargs)
    # both projections of the attention are preconditioned like Linear layers
    names = [layer.name for layer in opt.engine.layers]
    assert "encoder.self_attn.in_proj" in names and "encoder.self_attn.out_proj" in names
    _step(opt, model, x, y, loop)
    _assert_all_move(model, before, grads)


@pytest.mark.parametrize("method", ["ggn", "seng"])
def test_multihead_attention_is_covered_under_error(method):
    """unsupported="error" accepts a stock encoder layer: nothing in it needs the fallback
    (add_bias_kv, which does, is refused by name in test_attention.py)."""
    opt = _build(method, EncoderClassifier(), unsupported="error")
    assert not opt.engine.unsupported_names


@pytest.mark.parametrize(
    "method,loop",
    [("fngd", "uniform"), ("fngd", "ordinary"), ("seng", "uniform"), ("seng", "ordinary"), ("ggn", "uniform")],
)
def test_weights_used_without_calling_the_module_follow_the_plain_gradient(method, loop):
    torch.manual_seed(1)
    model = FunctionalUse()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    grads = _reference_grads(model, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _build(method, model)
    with pytest.warns(RuntimeWarning, match=r"fc\.weight, fc\.bias received a gradient"):
        _step(opt, model, x, y, loop)
    _assert_all_move(model, before, grads)
    # the fallback is exactly the plain gradient step (momentum and weight decay 0)
    expected = before["fc.weight"] - 0.1 * grads["fc.weight"]
    torch.testing.assert_close(model.fc.weight.detach(), expected)
    # one warning per optimizer and parameter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt, model, x, y, loop)
