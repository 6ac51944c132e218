"""Layer types beyond Linear: grouped / depthwise / transposed / 3-d convolutions and
BatchNorm, each against a dense float64 ``torch.func`` reference of per-sample gradients
(vmap(grad) of functional_call), and for BatchNorm in training mode: the rows of every
layer sum to the autograd batch gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
from gramopt.capture import CaptureEngine
from reference import per_sample_grads

CONVS = {
    "conv1d-grouped-stride-reflect": (
        nn.Conv1d(4, 6, 3, groups=2, stride=2, padding=1, padding_mode="reflect"), (4, 9)),
    "conv1d-depthwise-dilation-same-circular": (
        nn.Conv1d(4, 4, 3, groups=4, dilation=2, padding="same", padding_mode="circular"), (4, 9)),
    "conv2d-grouped-stride-replicate": (
        nn.Conv2d(4, 8, 3, groups=4, stride=2, padding=1, padding_mode="replicate"), (4, 6, 5)),
    "conv2d-depthwise-dilation-same-nobias": (
        nn.Conv2d(4, 4, (3, 2), groups=4, dilation=(2, 1), padding="same", bias=False), (4, 6, 5)),
    "conv2d-circular": (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 5, 5)),
    "conv3d-stride": (nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 2)), (2, 4, 5, 5)),
    "conv3d-grouped-reflect": (nn.Conv3d(4, 4, 3, groups=2, padding=1, padding_mode="reflect"), (4, 3, 4, 4)),
    "convtranspose1d-grouped-output-padding": (
        nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (4, 5)),
    "convtranspose2d-stride": (nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (4, 4, 3)),
    "convtranspose2d-depthwise-dilation-nobias": (
        nn.ConvTranspose2d(4, 4, 3, groups=4, dilation=2, stride=2, bias=False), (4, 3, 3)),
    "convtranspose3d": (nn.ConvTranspose3d(2, 3, 2, stride=2), (2, 2, 3, 3)),
}


def _half_squared(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out - y).pow(2).sum()


def _rows_and_reference(
    model: nn.Module, layer: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(captured rows of ``layer`` for the summed per-sample losses, the torch.func rows, factors)."""
    torch.manual_seed(1)
    y = torch.randn_like(model(x))
    engine = CaptureEngine(model, list(model.parameters()))
    _half_squared(model(x), y).backward()
    factors = engine.factors()
    name = next(n for n, m in model.named_modules() if m is layer)
    factor = factors[name]
    engine.close()
    reference = per_sample_grads(model, x, y, _half_squared, params=list(layer.parameters()))
    return factor.per_sample(), reference, factor


@pytest.mark.parametrize("name", list(CONVS))
def test_convolution_rows_match_torch_func(name):
    layer, shape = CONVS[name]
    torch.manual_seed(0)
    layer = layer.double()
    model = nn.Sequential(layer, nn.Tanh())
    x = torch.randn(3, *shape, dtype=torch.float64)
    rows, reference, factor = _rows_and_reference(model, layer, x)
    torch.testing.assert_close(rows, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factor.gram(), reference @ reference.T, rtol=1e-10, atol=1e-12)
    a = torch.randn(3, dtype=torch.float64)
    flat = torch.cat([t.reshape(-1) for t in factor.rmatvec(a)])
    torch.testing.assert_close(flat, a @ reference, rtol=1e-10, atol=1e-12)



@pytest.mark.parametrize("kind", ["bn1d", "bn1d-sequence", "bn2d"])
def test_batchnorm_rows_sum_to_the_batch_gradient(kind):
    """Training mode: batch statistics couple the samples, so rows are not per-sample
    loss gradients; their sum is the autograd batch gradient, for the BatchNorm's affine
    parameters and for every layer before and after it."""
    torch.manual_seed(0)
    if kind == "bn2d":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)
        )
        x = torch.randn(5, 2, 4, 4)
    elif kind == "bn1d-sequence":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4))
        x = torch.randn(5, 2, 6)
    else:
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4))
        x = torch.randn(5, 6)
    model = model.double()
    x = x.double()
    y = torch.randint(0, 4, (5,))
    engine = CaptureEngine(model, list(model.parameters()))
    F.cross_entropy(model(x), y).backward()
    factors = engine.factors()
    assert "1" in factors  # the BatchNorm layer is preconditioned
    for name, factor in factors.items():
        summed = factor.rmatvec(torch.ones(factor.num_rows, dtype=torch.float64))
        for p, s in zip(factor.params, summed, strict=True):
            torch.testing.assert_close(s, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    engine.close()


def test_batchnorm_in_eval_mode_rows_match_torch_func():
    """Eval mode (running statistics): exact per-sample gradients of the affine parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).double()
    model(torch.randn(8, 2, 4, 4, dtype=torch.float64))  # running statistics
    model[1].eval()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    rows, reference, _ = _rows_and_reference(model, model[1], x)
    torch.testing.assert_close(rows, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["ggn", "seng", "fngd"])
def test_every_method_steps_grouped_and_transposed_convolutions(method):
    """A depthwise + transposed convolution network: every parameter moves, no warning."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Tanh(),
        nn.ConvTranspose2d(4, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3),
    )
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if method == "ggn":
            opt = gramopt.GGN(model, lr=0.5, damping=1.0, loss="cross_entropy")
        elif method == "seng":
            opt = gramopt.SENG(model, lr=0.5, damping=1.0)
        else:
            opt = gramopt.FNGD(model, lr=0.5, damping=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        opt.backward(model(x), y)
        opt.step()
    assert len(opt.engine.layers) == 4
    for p, q in zip(model.parameters(), before, strict=True):
        assert not torch.equal(p, q)
