"""Per-layer factors against per-sample gradients built with torch.func.vmap(grad)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from gramopt.capture import CaptureEngine, ConvFactors, EmbeddingFactors, SharedWeightFactors
from reference import per_sample_grads

CASES = {
    "mlp": (lambda: models.mlp(out=2), lambda b: torch.randn(b, 5)),
    "cnn": (lambda: models.cnn(out=2), lambda b: torch.randn(b, 1, 8, 8)),
    "layernorm": (lambda: models.layernorm_net(out=2), lambda b: torch.randn(b, 6)),
    "conv1d": (lambda: models.conv1d_net(out=2), lambda b: torch.randn(b, 2, 8)),
    "transformer": (lambda: models.TinyTransformer(out=2), lambda b: torch.randint(0, 11, (b, 5))),
}


def sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum()


def captured(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    engine = CaptureEngine(model, model.parameters())
    sample_loss(model(x), y).backward()  # sum of per-sample losses: z_i = d l_i / d out_i
    factors = engine.factors()
    engine.close()
    return factors


@pytest.fixture(params=["weight-outputs", "weight-inputs"])
def weighting(request, monkeypatch):
    """U^T a weights the output-gradients, or (where the inputs are at most half as
    large) the inputs: both branches on the tests' small layers."""
    saving = 0 if request.param == "weight-inputs" else 2**62
    monkeypatch.setattr("gramopt.capture.shared_weight.WEIGHT_INPUTS_MIN_SAVING", saving)
    return request.param


@pytest.mark.parametrize("name", sorted(CASES))
def test_factors_match_per_sample_gradients(name, float64, weighting):
    build, inputs = CASES[name]
    model = build()
    x, y = inputs(6), torch.randn(6, 2)
    factors = captured(model, x, y)
    covered = {id(p) for f in factors.values() for p in f.params}
    assert covered == {id(p) for p in model.parameters()}, "every parameter belongs to a captured layer"
    for layer, factor in factors.items():
        ref = per_sample_grads(model, x, y, sample_loss, params=factor.params)
        a = torch.randn(ref.shape[0])
        structured = torch.cat([t.reshape(-1) for t in factor.rmatvec(a)])  # before U is formed
        torch.testing.assert_close(structured, ref.T @ a, rtol=1e-10, atol=1e-12, msg=f"U^T a of {layer}")
        u = factor.per_sample()
        torch.testing.assert_close(u, ref, rtol=1e-10, atol=1e-12, msg=f"per-sample grads of {layer}")
        torch.testing.assert_close(factor.gram(), ref @ ref.T, rtol=1e-10, atol=1e-12, msg=f"Gram of {layer}")
        flat = torch.cat([t.reshape(-1) for t in factor.rmatvec(a)])  # from U where it was formed
        torch.testing.assert_close(flat, ref.T @ a, rtol=1e-10, atol=1e-12, msg=f"U^T a of {layer} (explicit)")
        v = torch.randn(ref.shape[1])
        pieces, start = [], 0
        for p in factor.params:
            pieces.append(v[start : start + p.numel()].view_as(p))
            start += p.numel()
        torch.testing.assert_close(factor.matvec(pieces), ref @ v, rtol=1e-10, atol=1e-12, msg=f"U v of {layer}")


@pytest.mark.parametrize("strategy", ["pairs", "explicit"])
@pytest.mark.parametrize("name", ["cnn", "conv1d", "transformer"])
def test_both_gram_strategies_agree(name, strategy, float64, monkeypatch):
    build, inputs = CASES[name]
    model = build()
    x, y = inputs(5), torch.randn(5, 2)
    monkeypatch.setattr(SharedWeightFactors, "gram_strategy", lambda self: strategy)
    monkeypatch.setattr(ConvFactors, "gram_strategy", lambda self: strategy)
    monkeypatch.setattr(EmbeddingFactors, "gram_strategy", lambda self: strategy)
    factors = captured(model, x, y)
    for layer, factor in factors.items():
        ref = per_sample_grads(model, x, y, sample_loss, params=factor.params)
        torch.testing.assert_close(factor.gram(), ref @ ref.T, rtol=1e-10, atol=1e-12, msg=layer)


def test_strategy_choice_follows_cost():
    """A first conv layer on a large image is cheaper explicit; a short sequence of wide
    features is cheaper by position pairs."""
    conv = SharedWeightFactors(
        nn.Conv2d(1, 8, 3), [], torch.zeros(8, 9), None, torch.zeros(16, 784, 9), torch.zeros(16, 1, 784, 8)
    )
    assert conv.gram_strategy() == "explicit"
    seq = SharedWeightFactors(
        nn.Linear(512, 512), [], torch.zeros(512, 512), None, torch.zeros(16, 4, 512), torch.zeros(16, 1, 4, 512)
    )
    assert seq.gram_strategy() == "pairs"


def test_gradients_of_several_passes_are_stacked(float64):
    """k backward passes with one-hot directions give the rows of the output Jacobian."""
    model = models.mlp(out=3)
    x = torch.randn(4, 5)
    engine = CaptureEngine(model, model.parameters())
    out = model(x)
    directions = [F.one_hot(torch.full((4,), c), 3).to(out.dtype) for c in range(3)]
    engine.backward_passes(out, directions)
    factors = engine.factors()
    engine.close()
    from reference import jacobian

    for factor in factors.values():
        torch.testing.assert_close(factor.per_sample(), jacobian(model, x, factor.params), rtol=1e-10, atol=1e-12)


def test_weight_shared_over_two_calls(float64):
    """A layer called twice in one forward: per-sample gradients sum both calls."""
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    factors = captured(model, x, y)
    (factor,) = factors.values()
    ref = per_sample_grads(model, x, y, sample_loss)
    torch.testing.assert_close(factor.per_sample(), ref, rtol=1e-10, atol=1e-12)


def test_frozen_weight_trainable_bias(float64):
    model = models.mlp(out=2)
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 5), torch.randn(5, 2)
    engine = CaptureEngine(model, [p for p in model.parameters() if p.requires_grad])
    sample_loss(model(x), y).backward()
    factor = engine.factors()["0"]
    engine.close()
    assert [p is model[0].bias for p in factor.params] == [True]
    ref = per_sample_grads(model, x, y, sample_loss, params=[model[0].bias])
    torch.testing.assert_close(factor.gram(), ref @ ref.T)


@pytest.mark.parametrize("name", ["cnn", "conv1d"])
def test_conv_products_never_unfold_the_input(name, float64):
    """Conv layers' per-sample gradients, U^T a and U v come from convolutions; the
    unfolded patches (a prod(kernel)-fold copy of the input) are not formed."""
    build, inputs = CASES[name]
    factors = captured(build(), inputs(4), torch.randn(4, 2))
    convs = [f for f in factors.values() if isinstance(f, ConvFactors)]
    assert len(convs) == 2
    for factor in convs:
        factor.per_sample()
        factor.rmatvec(torch.randn(factor.num_rows))
        factor.matvec([torch.randn_like(p) for p in factor.params])
        assert "inputs" not in factor.__dict__ and "grads" not in factor.__dict__  # never unfolded
CONV_VARIANTS = {
    "same-asymmetric": lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1)),
    "stride-circular": lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular"),
    "no-bias-replicate": lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate", bias=False),
    "conv1d-reflect": lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"),
    # 2 |input| <= |output-gradient|: U^T a weights the input (with and without bias)
    "weighted-input": lambda: nn.Conv2d(2, 5, 3, padding=1),
    "weighted-input-conv1d-no-bias": lambda: nn.Conv1d(2, 4, 3, padding=1, bias=False),
}


@pytest.mark.parametrize("strategy", ["pairs", "explicit"])
@pytest.mark.parametrize("name", sorted(CONV_VARIANTS))
def test_conv_factors_variants(name, strategy, float64, monkeypatch):
    """ConvFactors (convolution_backward for U^T a and grouped per-sample gradients,
    the convolution for U v, unfolded patches only for the pair Gram) on padding modes,
    asymmetric 'same', stride, dilation, Conv1d and no bias, as first and inner layer."""
    monkeypatch.setattr(SharedWeightFactors, "gram_strategy", lambda self: strategy)
    monkeypatch.setattr("gramopt.capture.shared_weight.WEIGHT_INPUTS_MIN_SAVING", 0)  # the "weighted-input" cases
    conv = CONV_VARIANTS[name]()
    spatial = (9,) if isinstance(conv, nn.Conv1d) else (7, 6)
    pointwise = nn.Conv1d if len(spatial) == 1 else nn.Conv2d
    first = nn.Sequential(conv, nn.Tanh(), pointwise(conv.out_channels, 2, 1), nn.Flatten())
    inner = nn.Sequential(pointwise(2, 2, 1), nn.Tanh(), conv, nn.Flatten())  # its input needs a gradient
    for net in (first, inner):
        x = torch.randn(4, 2, *spatial)
        out_dim = net(x).shape[1]
        y = torch.randn(4, out_dim)
        factors = captured(net, x, y)
        factor = factors[next(n for n, f in factors.items() if f.module is conv)]
        ref = per_sample_grads(net, x, y, sample_loss, params=factor.params)
        a = torch.randn(4)
        for when in ("structured", "explicit"):  # before and after U is formed
            flat = torch.cat([t.reshape(-1) for t in factor.rmatvec(a)])
            torch.testing.assert_close(flat, ref.T @ a, rtol=1e-10, atol=1e-12, msg=f"U^T a of {name} ({when})")
            torch.testing.assert_close(factor.gram(), ref @ ref.T, rtol=1e-10, atol=1e-12, msg=f"K of {name}")
        torch.testing.assert_close(factor.per_sample(), ref, rtol=1e-10, atol=1e-12, msg=f"U of {name}")
        v = torch.randn(ref.shape[1])
        pieces, start = [], 0
        for p in factor.params:
            pieces.append(v[start : start + p.numel()].view_as(p))
            start += p.numel()
        torch.testing.assert_close(factor.matvec(pieces), ref @ v, rtol=1e-10, atol=1e-12, msg=f"U v of {name}")


def test_conv_called_twice_and_several_passes(float64):
    """A conv applied twice in one forward (gradients summed over calls), with k = 3
    backward passes (rows of the output Jacobian)."""
    from reference import jacobian

    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    model = nn.Sequential(conv, nn.Tanh(), conv, nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    x = torch.randn(4, 2, 5, 5)
    engine = CaptureEngine(model, model.parameters())
    out = model(x)
    engine.backward_passes(out, [F.one_hot(torch.full((4,), c), 3).to(out.dtype) for c in range(3)])
    factor = engine.factors()["0"]
    engine.close()
    ref = jacobian(model, x, factor.params)
    torch.testing.assert_close(factor.per_sample(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factor.gram(), ref @ ref.T, rtol=1e-10, atol=1e-12)
    a = torch.randn(12)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in factor.rmatvec(a)]), ref.T @ a, rtol=1e-10, atol=1e-12)


def test_backward_passes_return_gradients_of_extra_inputs(float64):
    """``inputs`` of backward_passes get their gradients from the same pass; a
    layer_filter leaves unhooked layers' parameters to plain_params."""
    model = models.layernorm_net(out=2)
    engine = CaptureEngine(model, model.parameters(), layer_filter=lambda m: isinstance(m, nn.Linear))
    norm = model[1]
    assert [id(p) for p in engine.plain_params] == [id(norm.weight), id(norm.bias)]
    assert [layer.name for layer in engine.layers] == ["0", "3"]
    x, y = torch.randn(5, 6), torch.randn(5, 2)
    model.eval()  # not recorded: the reference gradient
    expected = torch.autograd.grad(sample_loss(model(x), y), [norm.weight, norm.bias])
    model.train()
    loss = sample_loss(model(x), y)
    ((gw, gb),) = engine.backward_passes(loss, [torch.ones(())], inputs=engine.plain_params, retain_graph=False)
    torch.testing.assert_close(gw, expected[0])
    torch.testing.assert_close(gb, expected[1])
    assert set(engine.factors()) == {"0", "3"}
    engine.close()


def test_passes_of_their_own_outputs_reach_only_their_calls(float64):
    """backward_passes with one output per pass: each pass runs through its own output's
    graph; factors_per_call gives each call the passes that reached it, and their rows are
    the per-sample Jacobian rows of that call's inputs."""
    from reference import jacobian

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    engine = CaptureEngine(model, model.parameters())
    x, y = torch.randn(5, 3), torch.randn(3, 3)
    out_x, out_y = model(x), model(y)
    directions = [F.one_hot(torch.full((5,), c), 2).to(out_x.dtype) for c in range(2)] + [torch.ones(3, 2)]
    engine.backward_passes([out_x, out_x, out_y], directions)
    with pytest.raises(ValueError, match="2 outputs for 3 directions"):
        engine.backward_passes([out_x, out_y], directions)
    per_call = engine.factors_per_call()
    engine.close()
    assert set(per_call) == {"0", "2"}
    for name, layer in (("0", model[0]), ("2", model[2])):
        (passes_x, fx), (passes_y, fy) = per_call[name]
        assert passes_x == (0, 1) and passes_y == (2,)
        torch.testing.assert_close(fx.per_sample(), jacobian(model, x, fx.params), rtol=1e-10, atol=1e-12)
        summed = jacobian(model, y, fy.params).view(3, 2, -1).sum(dim=1)  # the pass with ones on both outputs
        torch.testing.assert_close(fy.per_sample(), summed, rtol=1e-10, atol=1e-12)
        assert fx.params == [layer.weight, layer.bias]


def test_captured_outputs_are_freed_without_the_cycle_collector():
    """After clear(), nothing of a step outlives it by a reference cycle (the tensor hook
    on a layer's output must not hold the output)."""
    import gc
    import weakref

    model = models.mlp(out=2)
    engine = CaptureEngine(model, model.parameters())
    gc.disable()
    try:
        out = model(torch.randn(4, 5))
        probe = weakref.ref(engine._calls[id(model[0])][0].output)
        sample_loss(out, torch.randn(4, 2)).backward()
        engine.clear()
        del out
        assert probe() is None, "a layer output outlived the step"
    finally:
        gc.enable()
        engine.close()


def test_deep_copy_of_a_hooked_model_feeds_nothing(float64):
    """copy.deepcopy(model) (an EMA copy, a reference model) carries the forward hooks
    along; its forward passes must not be recorded as the original model's."""
    import copy

    model = models.mlp(out=2)
    engine = CaptureEngine(model, model.parameters())
    clone = copy.deepcopy(model)
    sample_loss(clone(torch.randn(3, 5)), torch.randn(3, 2)).backward()
    assert not engine.has_factors()
    engine.close()
