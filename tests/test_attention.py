"""``nn.MultiheadAttention``: its in-projection and out-projection preconditioned like
Linear layers (gramopt.capture.attention).

- the capturing forward computes what ``nn.MultiheadAttention.forward`` computes (outputs,
  attention weights and parameter gradients, float64) for every option the module takes;
- the captured rows of both projections equal dense float64 per-sample gradients from
  ``torch.func`` (vmap(grad) of functional_call on the unmodified module);
- GGN, SENG and FNGD step stock Transformer layers with no warning and move every parameter;
- what stays unsupported (``add_bias_kv``) is refused or falls back, by the user's choice,
  changing nothing on refusal; closing the optimizer restores the module.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gramopt
from gramopt.capture import CaptureEngine, attention
from gramopt.errors import CaptureError, UnsupportedModuleError
from reference import per_sample_grads

E, H = 8, 2


def _inputs(batch_first: bool, b: int = 3, tgt: int = 4, src: int = 5, kdim: int = E, vdim: int = E):
    g = torch.Generator().manual_seed(0)
    shape = (lambda n, d: (b, n, d)) if batch_first else (lambda n, d: (n, b, d))
    q = torch.randn(*shape(tgt, E), generator=g, dtype=torch.float64)
    k = torch.randn(*shape(src, kdim), generator=g, dtype=torch.float64)
    v = torch.randn(*shape(src, vdim), generator=g, dtype=torch.float64)
    return q, k, v


def _causal(n: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


# name -> (module options, call: (module, batch_first) -> (args, kwargs))
def _self(masks=None):
    def call(batch_first):
        q, _, _ = _inputs(batch_first, src=4)
        kwargs = dict(masks or {})
        if kwargs.pop("causal", False):
            kwargs.update(attn_mask=_causal(4), is_causal=True)
        return (q, q, q), kwargs

    return call


def _cross(kdim=E, vdim=E, **kwargs):
    def call(batch_first):
        q, k, v = _inputs(batch_first, kdim=kdim, vdim=vdim)
        return (q, k, v), dict(kwargs)

    return call


def _kv_same(batch_first):
    q, k, _ = _inputs(batch_first)
    return (q, k, k), {}


PADDING = torch.tensor([[False] * 5, [False, False, False, True, True], [False, True, False, False, False]])
CASES = {
    "self": ({}, _self()),
    "self-no-weights": ({}, _self({"need_weights": False})),
    "self-per-head-weights": ({}, _self({"average_attn_weights": False})),
    "self-causal-fast": ({}, _self({"causal": True, "need_weights": False})),
    "self-causal-weights": ({}, _self({"causal": True})),
    "self-no-bias": ({"bias": False}, _self({"need_weights": False})),
    "self-bool-mask": ({}, _self({"attn_mask": torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)})),
    "cross": ({}, _cross()),
    "cross-padding": ({}, _cross(key_padding_mask=PADDING, need_weights=False)),
    "cross-padding-3d-mask": (
        {},
        _cross(
            key_padding_mask=PADDING.double() * -1e4,
            attn_mask=torch.randn(3 * H, 4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
        ),
    ),
    "key-is-value": ({}, _kv_same),
    "kdim-vdim": ({"kdim": 3, "vdim": 6}, _cross(kdim=3, vdim=6)),
    "kdim-vdim-no-bias-no-weights": ({"kdim": 3, "vdim": 6, "bias": False}, _cross(kdim=3, vdim=6, need_weights=False)),
    "zero-attn": ({"add_zero_attn": True}, _cross(key_padding_mask=PADDING)),
}


def _module(options: dict, batch_first: bool) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, H, batch_first=batch_first, **options).double()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_capturing_forward_computes_the_module(case, batch_first):
    options, call = CASES[case]
    module = _module(options, batch_first)
    args, kwargs = call(batch_first)
    expected, expected_weights = module(*args, **kwargs)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(module.parameters()))
    proxy = attention.attach(module)
    try:
        got, got_weights = module(*args, **kwargs)  # the instance forward, training mode
        got_grads = torch.autograd.grad(got.square().sum(), list(module.parameters()))
    finally:
        attention.detach(module)
    assert "forward" not in module.__dict__ and attention.PROXY not in module.__dict__
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if expected_weights is None:
        assert got_weights is None
    else:
        torch.testing.assert_close(got_weights, expected_weights, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert isinstance(proxy, attention.InProjection)


class _Wrapped(nn.Module):
    """One attention call then a Linear read-out per position, for per-sample references."""

    def __init__(self, options: dict, call_kwargs: dict, cross: bool) -> None:
        super().__init__()
        self.attn = _module(options, batch_first=True)
        self.read = nn.Linear(E, 2).double()
        self.kwargs = call_kwargs
        self.cross = cross

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cross:  # x: [b, 4 + 5, E]: queries, then keys (values = keys)
            q, kv = x[:, :4], x[:, 4:]
            out, _ = self.attn(q, kv, kv, **self.kwargs)
        else:
            out, _ = self.attn(x, x, x, **self.kwargs)
        return self.read(torch.tanh(out))


ROW_CASES = {
    "self-causal": ({}, dict(attn_mask=_causal(4), is_causal=True, need_weights=False), False),
    "self-weights-no-bias": ({"bias": False}, {}, False),
    "cross": ({}, {}, True),
    "cross-zero-attn": ({"add_zero_attn": True}, {}, True),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_projection_rows_match_torch_func(case):
    options, kwargs, cross = ROW_CASES[case]
    model = _Wrapped(options, kwargs, cross)
    torch.manual_seed(1)
    x = torch.randn(3, 9 if cross else 4, E, dtype=torch.float64)
    y = torch.randn(3, 4, 2, dtype=torch.float64)

    def loss(out, target):
        return 0.5 * (out - target).pow(2).sum()

    engine = CaptureEngine(model, list(model.parameters()))
    assert [layer.name for layer in engine.layers] == ["attn.in_proj", "attn.out_proj", "read"]
    loss(model(x), y).backward()
    factors = engine.factors()
    engine.close()
    assert "forward" not in model.attn.__dict__
    for name, params in (
        ("attn.in_proj", attention.in_projection_params(model.attn)),
        ("attn.out_proj", list(model.attn.out_proj.parameters())),
    ):
        reference = per_sample_grads(model, x, y, loss, params=params)
        torch.testing.assert_close(factors[name].per_sample(), reference, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(factors[name].gram(), reference @ reference.T, rtol=1e-10, atol=1e-12)
        a = torch.randn(3, dtype=torch.float64)
        flat = torch.cat([t.reshape(-1) for t in factors[name].rmatvec(a)])
        torch.testing.assert_close(flat, a @ reference, rtol=1e-10, atol=1e-12)


def test_separate_projection_rows_match_torch_func():
    """kdim / vdim other than embed_dim: q_proj_weight, k_proj_weight, v_proj_weight and one
    in_proj_bias, rows formed explicitly."""
    model = _Wrapped({"kdim": 3, "vdim": 3}, {}, cross=False)
    model.attn = _module({"kdim": 5, "vdim": 6}, batch_first=True)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.read = model.attn, model.read

        def forward(self, x):
            q, k, v = x[:, :4, :E], x[:, 4:, :5], x[:, 4:, E - 6 : E]
            return self.read(torch.tanh(self.attn(q, k, v, need_weights=False)[0]))

    net = Cross()
    torch.manual_seed(2)
    x, y = torch.randn(3, 9, E, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)

    def loss(out, target):
        return 0.5 * (out - target).pow(2).sum()

    engine = CaptureEngine(net, list(net.parameters()))
    loss(net(x), y).backward()
    factor = engine.factors()["attn.in_proj"]
    engine.close()
    reference = per_sample_grads(net, x, y, loss, params=attention.in_projection_params(net.attn))
    torch.testing.assert_close(factor.per_sample(), reference, rtol=1e-10, atol=1e-12)


def _encoder_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True),
        nn.Flatten(),
        nn.Linear(16 * 5, 3),
    )


class _Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.src, self.tgt = nn.Linear(6, 16), nn.Linear(6, 16)
        self.core = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):  # x: [b, 5, 6] -> [b, 3, 5] per-position logits, classes in dim 1
        mask = nn.Transformer.generate_square_subsequent_mask(5)
        return self.out(self.core(self.src(x), self.tgt(x), tgt_mask=mask, tgt_is_causal=True)).transpose(1, 2)


@pytest.mark.parametrize("method", ["ggn", "seng", "fngd"])
@pytest.mark.parametrize("build", [_encoder_model, _Seq2Seq], ids=["encoder-layer", "transformer"])
def test_every_method_trains_stock_transformer_layers(method, build):
    model = build()
    x = torch.randn(8, 5, 6)
    y = torch.randint(0, 3, (8,) if build is _encoder_model else (8, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if method == "ggn":
            opt = gramopt.GGN(model, loss="cross_entropy", curvature="sampled")
        elif method == "seng":
            opt = gramopt.SENG(model, lr=0.1, damping=1.0, loss="cross_entropy")
        else:
            opt = gramopt.FNGD(model, lr=0.1, damping=1.0, loss="cross_entropy")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.backward(model(x), y)
        opt.step()
    names = [layer.name for layer in opt.engine.layers]
    assert sum(n.endswith("in_proj") for n in names) == sum(n.endswith("out_proj") for n in names) >= 1
    plain = {id(p) for p in opt.engine.plain_params}  # FNGD's choice: norm layers follow the gradient
    assert all("norm" in n for n, p in model.named_parameters() if id(p) in plain)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert unchanged == []
    opt.close()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_state_dict_and_deepcopy_while_attached():
    model = _encoder_model()
    keys = list(model.state_dict())
    opt = gramopt.SENG(model, lr=0.1, damping=1.0, loss="cross_entropy")
    assert list(model.state_dict()) == keys
    assert len(list(model.modules())) == len(list(_encoder_model().modules()))
    twin = copy.deepcopy(model)
    x = torch.randn(4, 5, 6)
    model.eval(), twin.eval()
    torch.testing.assert_close(twin(x), model(x))
    model.train(), twin.train()
    opt.backward(model(x), torch.randint(0, 3, (4,)))  # the copy's calls do not reach opt
    opt.step()
    twin(x).sum().backward()
    opt.close()


def test_add_bias_kv_falls_back_with_a_warning_or_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8))
    model.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

    def forward(x):
        h = model[0](x)
        return model.attn(h, h, h, need_weights=False)[0].mean(1)

    with pytest.raises(UnsupportedModuleError, match=r"attn\.bias_k.*add_bias_kv"):
        gramopt.FNGD(model, lr=0.1, damping=1.0, unsupported="error")
    assert "forward" not in model.attn.__dict__  # refused: nothing changed
    with pytest.warns(RuntimeWarning, match=r"attn\.in_proj_weight.*attn\.out_proj\.weight"):
        opt = gramopt.FNGD(model, lr=0.1, damping=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.backward(forward(torch.randn(5, 3, 4)), torch.randint(0, 8, (5,)))
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unbatched_call_in_training_is_reported_and_changes_nothing():
    """An unbatched call ([L, E]) runs the module's own forward, so nothing is captured:
    the step says so and leaves the parameters alone (no silent plain-gradient step)."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(4, 2)
    opt = gramopt.SENG(nn.ModuleDict({"attn": attn}), lr=0.1, damping=1.0)
    before = [p.detach().clone() for p in attn.parameters()]
    x = torch.randn(3, 4)
    attn(x, x, x)[0].sum().backward()
    with pytest.raises(CaptureError, match="backward"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, attn.parameters(), strict=True))


def test_two_optimizers_share_the_attachment():
    model = _encoder_model()
    mha = model[1].self_attn
    a = gramopt.SENG(model, lr=0.1, damping=1.0)
    b = gramopt.SENG(model, lr=0.1, damping=1.0)
    a.close()
    assert "forward" in mha.__dict__
    b.close()
    assert "forward" not in mha.__dict__


def test_sequence_first_transformer_layers_fall_back_by_name():
    """batch_first=False: the feed-forward Linear layers see [T, b, d], which per-sample
    rows cannot take; the layer follows the unsupported-parameter policy instead of
    being preconditioned wrongly (silently so when T == b)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0))
    with pytest.raises(
        UnsupportedModuleError, match=r"1 \(TransformerEncoderLayer\) is sequence-first.*batch_first=True"
    ):
        gramopt.SENG(model, lr=0.1, damping=1.0, unsupported="error")
    with pytest.warns(RuntimeWarning, match=r"1\.self_attn\.in_proj_weight.*sequence-first.*batch_first=True"):
        opt = gramopt.SENG(model, lr=0.1, damping=1.0)
    assert [layer.name for layer in opt.engine.layers] == ["0"]
    x = torch.randn(6, 6, 4)  # T == b: shapes alone could not tell
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.backward(model(x).mean(0), torch.randint(0, 8, (6,)))
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


class _TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        out, _ = self.attn(h, h, h, attn_mask=_causal(x.shape[1]).to(x.dtype), is_causal=True, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize("method", ["ggn", "seng", "fngd"])
def test_accumulated_micro_batches_give_the_whole_batch_step(method):
    """Two backward calls on halves, one step == one step on the concatenation (float64)."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(8, 4, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    results = []
    for halves in (False, True):
        model = _TinyEncoder().double()
        if method == "ggn":
            opt = gramopt.GGN(model, lr=0.5, damping=0.3, loss="cross_entropy", damping_adaptation=None)
        elif method == "seng":
            opt = gramopt.SENG(model, lr=0.5, damping=0.1, loss="cross_entropy")
        else:
            opt = gramopt.FNGD(model, lr=0.5, damping=0.01, loss="cross_entropy")
        for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])) if halves else ((x, y),):
            opt.backward(model(xs), ys)
        opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-11)



class _CrossEncoder(_TinyEncoder):
    """``_TinyEncoder`` whose attention gets key and value as copies of the query: the
    same function, but not a packed self-attention call, so that its handler saves
    query, key and value apiece."""

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        kv = h.clone()
        out, _ = self.attn(h, kv, kv, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize("method", ["ggn", "seng"])
def test_micro_batches_of_unpacked_calls_give_the_whole_batch_step(method):
    """The in-projection's three saved inputs are concatenated over micro-batches
    (``merge_saved`` through ``saved_tensors`` / ``restore_saved``), float64."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    results = []
    for parts in (((x, y),), ((x[:2], y[:2]), (x[2:], y[2:]))):
        model = _CrossEncoder().double()
        if method == "ggn":
            opt = gramopt.GGN(model, lr=0.5, damping=0.3, loss="cross_entropy", damping_adaptation=None)
        else:
            opt = gramopt.SENG(model, lr=0.5, damping=0.1, loss="cross_entropy")
        for xs, ys in parts:
            opt.backward(model(xs), ys)
        opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-11)
