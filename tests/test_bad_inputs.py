"""Bad input, for every method where it applies: a clear error (the message names the
problem, the layer or the parameter) and nothing changed (parameters, optimizer state,
param groups). Cases from optim_cases.py."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
from optim_cases import CASES, LOSS_FUNCTIONS, REPRESENTATIVE, OptimizerCase, assert_same_params, snapshot

representative = pytest.mark.parametrize("case", REPRESENTATIVE, ids=[c.id for c in REPRESENTATIVE])


def _unchanged(model: nn.Module, opt, before: tuple[list[torch.Tensor], dict]) -> None:
    params, state = before
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params, strict=True))
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    assert now["gramopt"]["step"] == state["gramopt"]["step"]
    assert now["state"].keys() == state["state"].keys()


def _before(model: nn.Module, opt) -> tuple[list[torch.Tensor], dict]:
    return snapshot(model), copy.deepcopy(opt.state_dict())


# -- hyper-parameters ------------------------------------------------------------------------
HYPER = [(case, kwargs, match) for case in REPRESENTATIVE for kwargs, match in case.error_inputs]


@pytest.mark.parametrize("case, kwargs, match", HYPER, ids=[f"{c.id}-{k!r}" for c, k, _ in HYPER])
def test_invalid_hyper_parameters(case, kwargs, match):
    with pytest.raises(ValueError, match=match):
        case.make(case.build_model(), **kwargs)


GROUP_BAD = [
    ("lr", -1.0, "lr must be"),
    ("momentum", 1.5, "momentum must be < 1"),
    ("damping", -1.0, "damping must be"),
]


@representative
@pytest.mark.parametrize("name, value, match", GROUP_BAD)
def test_invalid_param_group_in_a_state_dict(case, name, value, match):
    """load_state_dict validates every group before changing anything."""
    model = case.build_model()
    opt = case.make(model)
    x, y = case.batches(1)[0]
    case.step(opt, model, x, y)
    before = _before(model, opt)
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0][name] = value
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    _unchanged(model, opt, before)
    with pytest.raises(ValueError, match="no 'gramopt' entry"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    _unchanged(model, opt, before)


@representative
def test_add_param_group_after_construction(case):
    """A group added after construction (fine-tuning unfreezes a layer) is hooked and
    stepped: the step equals that of an optimizer given both groups from the start."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(case.build_model(torch.float64), nn.Linear(case.outputs, case.outputs).double())

    (x, y), = case.batches(1, dtype=torch.float64)
    late, early = build(), build()
    torch.manual_seed(1)
    opt_late = case.make(late, params=list(late[0].parameters()))
    opt_late.add_param_group({"params": list(late[1].parameters())})
    torch.manual_seed(1)
    opt_early = case.make(
        early, params=[{"params": list(early[0].parameters())}, {"params": list(early[1].parameters())}]
    )
    assert len(opt_late.param_groups) == len(opt_early.param_groups) == 2
    assert [layer.name for layer in opt_late.engine.layers] == [layer.name for layer in opt_early.engine.layers]
    before = [p.detach().clone() for p in late[1].parameters()]
    case.step(opt_late, late, x, y)
    case.step(opt_early, early, x, y)
    assert all(not torch.equal(p, q) for p, q in zip(late[1].parameters(), before, strict=True))
    for p, q in zip(late.parameters(), early.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@representative
def test_add_param_group_refuses_foreign_parameters(case):
    """A parameter not of the model is refused and nothing changes."""
    model = case.build_model()
    opt = case.make(model)
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="must belong to the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == groups


# -- non-finite values ---------------------------------------------------------------------
MLP_CASES = [case for case in CASES if case.model in ("mlp", "wide")]


@pytest.mark.parametrize("case", MLP_CASES, ids=[c.id for c in MLP_CASES])
def test_non_finite_gram_names_the_layer(case):
    """An inf input saturates tanh, so the loss stays finite but the first layer's
    per-sample gradients are not: the error names layer 0 (or its parameter, in FNGD's
    sharing phase, where no Gram is built), after three steps (FNGD then shares)."""
    model = case.build_model()
    opt = case.make(model)
    data = case.batches(4)
    for x, y in data[:3]:
        case.step(opt, model, x, y)
    x, y = data[3]
    x = x.clone()
    x[0, 0] = math.inf
    before = _before(model, opt)
    with pytest.raises(gramopt.NonFiniteError, match=r"layer 0\b|parameter 0\.weight"):
        case.step(opt, model, x, y)
    _unchanged(model, opt, before)


@representative
@pytest.mark.parametrize("what", ["target", "output"])
def test_non_finite_loss_target_or_output(case, what):
    model = case.build_model()
    opt = case.make(model)
    x, y = case.batches(1)[0]
    if what == "target" and case.loss == "mse":
        y = y.clone()
        y[0, 0] = math.nan
    else:
        x = x.clone()
        x.view(x.shape[0], -1)[0, 0] = math.nan
    before = _before(model, opt)
    with pytest.raises(gramopt.NonFiniteError, match="NaN or inf|loss is nan"):
        case.step(opt, model, x, y)
    _unchanged(model, opt, before)


GGN_MSE = [case for case in CASES if case.cls is gramopt.GGN and case.loss == "mse"]


@pytest.mark.parametrize("case", GGN_MSE, ids=[c.id for c in GGN_MSE])
def test_singular_system_with_zero_damping(case):
    """More samples than parameters (J J^T singular) at damping 0: the direct solvers
    raise SingularSystemError; CG and Nystrom-PCG cannot tell a singular system from a
    slow one, report non-convergence (warning, last_info) and return their best iterate,
    never worse than no step."""
    model = nn.Linear(2, 2)
    opt = case.make(model, damping=0.0)
    x, y = torch.randn(8, 2), torch.randn(8, 2)
    before = _before(model, opt)
    opt.backward(model(x), y)
    if case.kwargs.get("solver") in ("cg", "nystrom-pcg"):
        with pytest.warns(gramopt.NumericalWarning, match="stopped at relative residual"):
            opt.step()
        assert not opt.last_info.solve.converged and opt.last_info.solve.residuals[-1] <= 1.0
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return
    with pytest.raises(gramopt.SingularSystemError, match="use damping > 0"):
        opt.step()
    _unchanged(model, opt, before)


# -- modules ---------------------------------------------------------------------------------
class Scale(nn.Module):
    """A trainable module without a gramopt handler."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


@representative
def test_unsupported_trainable_modules(case):
    """One policy for every method: a parameter no handler covers (here ``1.s`` of a
    module without a handler, and ``pos``, an nn.Parameter on the top-level model)
    follows the plain gradient with one warning naming each by its full name;
    unsupported='error' refuses them, naming them."""

    class WithPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(case.build_model(), Scale(case.outputs))
            self.pos = nn.Parameter(torch.zeros(case.outputs))

        def forward(self, x):
            return self.net(x) + self.pos

    model = WithPosition()
    with pytest.raises(
        gramopt.UnsupportedModuleError, match=r"net\.1\.s: net\.1 \(Scale\) has no gramopt handler"
    ) as err:
        case.make(model, unsupported="error")
    assert "pos: model (WithPosition)" in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = case.make(model)
        data = case.batches(2)
        for x, y in data:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            case.step(opt, model, x, y)
            for n, p in model.named_parameters():
                assert not torch.equal(p, before[n]), n
    messages = [str(w.message) for w in caught if "cannot precondition" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert "net.1.s" in messages[0] and "pos" in messages[0]


REFUSED_MODULES = {
    "no-handler": lambda: Scale(3),
    "sequence-first": lambda: nn.TransformerEncoderLayer(8, 2, 16),
    "add-bias-kv": lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True),
    "embedding-sparse": lambda: nn.Embedding(5, 8, sparse=True),
    "embedding-scale-grad": lambda: nn.Embedding(5, 8, scale_grad_by_freq=True),
    "embedding-max-norm": lambda: nn.Embedding(5, 8, max_norm=1.0),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_MODULES))
@pytest.mark.parametrize("method", [gramopt.GGN, gramopt.SENG, gramopt.FNGD], ids=lambda c: c.__name__)
def test_the_fallback_warning_gives_the_reason_and_fix_that_the_error_gives(method, kind):
    """Under the default policy the warning names each refused module's reason (with its
    fix: batch_first=True, no add_bias_kv, the Embedding option to drop, a handler to
    register) exactly as unsupported="error" does."""
    model = nn.ModuleDict({"refused": REFUSED_MODULES[kind](), "head": nn.Linear(3, 3)})
    try:
        method(model, unsupported="error")
    except gramopt.UnsupportedModuleError as err:
        reasons = re.findall(r"^  - (.*)$", str(err), re.M)
    else:  # FNGD leaves embeddings to the plain gradient by design: no warning either
        reasons = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method(model)
    warned = [str(w.message) for w in caught if "cannot precondition" in str(w.message)]
    if not reasons:
        assert method is gramopt.FNGD and kind.startswith("embedding") and not warned, warned
        return
    assert len(warned) == 1 and reasons, (warned, reasons)
    for reason in reasons:
        assert f"  - {reason}" in warned[0], (reason, warned[0])
    fixes = {"no-handler": "gramopt.register_handler", "sequence-first": "build it with batch_first=True",
             "add-bias-kv": "build it without add_bias_kv", "embedding-sparse": "build it with sparse=False",
             "embedding-scale-grad": "build it with scale_grad_by_freq=False",
             "embedding-max-norm": "build it with max_norm=None"}
    assert fixes[kind] in warned[0]


@representative
def test_model_without_supported_layer_warns_and_trains(case):
    """No layer the method preconditions: one warning, and plain-gradient steps."""
    model = nn.Sequential(Scale(case.outputs))
    with pytest.warns(RuntimeWarning, match="preconditions no layer"):
        opt = case.make(model)
    assert opt.engine.plain_params == [model[0].s]


@representative
def test_batchnorm_in_training_mode(case):
    """SENG and FNGD train BatchNorm in training mode (rows summing to the batch
    gradient, tests/test_layers.py); GGN refuses it by name; in eval mode BatchNorm
    (affine parameters included) works for every method."""

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, case.outputs))

    x = torch.randn(6, 5)
    y = case.batches(1)[0][1]
    if not case.cls.needs.batchnorm_training:  # (GGN)
        with pytest.raises(gramopt.UnsupportedModuleError, match=r"1 \(BatchNorm1d\) is in training mode"):
            case.make(net())
        model = net()
        model[1].eval()
        opt = case.make(model)
        model.train()
        before = _before(model, opt)
        with pytest.raises(gramopt.UnsupportedModuleError, match="eval mode"):
            model(x)
        _unchanged(model, opt, before)
        model[1].eval()
    else:
        model = net()
        opt = case.make(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        case.step(opt, model, x, y[: x.shape[0]])
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n


# -- batches ---------------------------------------------------------------------------------
UNIFORM = [case for case in REPRESENTATIVE if case.loop == "uniform"]


def _bad_targets(case: OptimizerCase, b: int):
    if case.loss == "mse":
        yield torch.randn(b), rf"target shape \({b},\) does not match output shape \({b}, 2\)"
        yield torch.randn(b, 3), "does not match output shape"
        yield torch.randn(b, 2, dtype=torch.float64), "target of the output's dtype torch.float32"
    else:
        yield torch.randn(b), "integer class targets"
        yield torch.randint(0, 3, (b, 1)), "integer class targets"
        yield torch.randint(0, 3, (b,), dtype=torch.int32), r"torch.long"
        yield torch.tensor([0, 1, 2, 3, 0, 1][:b]), r"must lie in \[0, 2\]"


TARGETS = [(case, i) for case in UNIFORM for i in range(len(list(_bad_targets(case, 6))))]


@pytest.mark.parametrize("case, index", TARGETS, ids=[f"{c.id}-{i}" for c, i in TARGETS])
def test_target_mismatch(case, index):
    model = case.build_model()
    opt = case.make(model)
    x, _ = case.batches(1)[0]
    target, match = list(_bad_targets(case, x.shape[0]))[index]
    before = _before(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.backward(model(x), target)
    _unchanged(model, opt, before)


@pytest.mark.parametrize("method", [gramopt.GGN, gramopt.SENG, gramopt.FNGD], ids=lambda c: c.__name__)
def test_classes_last_logits_name_the_class_dimension_and_the_fix(method):
    """[b, T, C] logits (classes last, as a language model's head gives them) with [b, T]
    targets: the error says the classes go in dim 1 and how to move them there."""
    model = nn.Linear(4, 5)
    # (GGN's damping adaptation re-runs the model and needs its own output, not a transpose)
    opt = method(model, loss="cross_entropy", **({"damping_adaptation": None} if method is gramopt.GGN else {}))
    x, target = torch.randn(6, 7, 4), torch.randint(0, 5, (6, 7))
    before = _before(model, opt)
    fix = r"classes go in dim 1 .*logits\.transpose\(1, 2\) or logits\.permute\(0, 2, 1\)"
    with pytest.raises(ValueError, match=fix):
        opt.backward(model(x), target)
    _unchanged(model, opt, before)
    opt.backward(model(x).transpose(1, 2), target)  # the fix it names
    opt.step()
    # a target of another shape gets no such hint
    with pytest.raises(ValueError, match="integer class targets") as caught:
        opt.backward(model(x), target[:, :3])
    assert "dim 1" not in str(caught.value)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_second_step_after_one_backward_says_so(case):
    """step() twice after one backward pass: the first step used up the captures; the
    second says that (not "no backward pass reached a hooked layer"), changing nothing.
    After zero_grad, or a new backward pass that reached no hooked layer, the message is
    the one about the missing backward pass. (SENG between curvature refreshes reads only
    .grad and its cached curvature: a second step there repeats the first, as torch's
    optimizers do; so the second step here is a refresh.)"""
    model = case.build_model()
    opt = case.make(model, **({"curvature_every": 1} if case.cls is gramopt.SENG else {}))
    x, y = case.batches(1)[0]
    case.step(opt, model, x, y)
    before = _before(model, opt)
    with pytest.raises(gramopt.CaptureError, match=r"step\(\) was already called after this backward pass") as err:
        opt.step()
    assert ("loss.backward()" in str(err.value)) == ("ordinary" in case.method.loops)
    _unchanged(model, opt, before)
    opt.zero_grad()
    with pytest.raises(gramopt.CaptureError) as err:
        opt.step()
    assert "already called" not in str(err.value)
    _unchanged(model, opt, before)
    if case.loop == "ordinary":  # a backward pass of an eval-mode forward: not the same backward
        model.eval()
        LOSS_FUNCTIONS[case.loss](model(x), y).backward()
        model.train()
        with pytest.raises(gramopt.CaptureError) as err:
            opt.step()
        assert "already called" not in str(err.value)
    case.step(opt, model, x, y)  # and the loop goes on


@representative
def test_empty_batch(case):
    model = case.build_model()
    opt = case.make(model)
    x, y = case.batches(1)[0]
    before = _before(model, opt)
    with pytest.raises(ValueError, match="empty batch"):
        case.step(opt, model, x[:0], y[:0])
    _unchanged(model, opt, before)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_batch_of_one_sample(case):
    model = case.build_model()
    opt = case.make(model)
    before = snapshot(model)
    for x, y in case.batches(3):
        case.step(opt, model, x[:1], y[:1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@representative
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(case, dtype, monkeypatch):
    """A half-precision model keeps its dtype; its Grams are factored in float32 and the
    step is close to that of a float32 run from the same (rounded) parameters. (A step
    100 times the usual one: the rounding of the updated bfloat16 parameters, 2^-8
    relative, would otherwise be as large as the step itself.)"""
    model = case.build_model().to(dtype)
    reference = copy.deepcopy(model).float()
    factored = []
    cholesky = torch.linalg.cholesky_ex

    def spy(matrix, *args, **kwargs):
        factored.append(matrix.dtype)
        return cholesky(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    x, y = case.batches(1)[0]
    steps = []
    for m, xx, yy in (
        (reference, x, y),
        (model, x.to(dtype) if x.is_floating_point() else x, y.to(dtype) if y.is_floating_point() else y),
    ):
        before = torch.cat([p.detach().float().reshape(-1) for p in m.parameters()])
        # (GGN: a fixed damping; its damping adaptation would undo a step this large if it raised the loss)
        fixed = {"damping_adaptation": None} if case.cls is gramopt.GGN else {}
        opt = case.make(m, lr=100 * case.kwargs["lr"], **fixed)
        factored.clear()
        case.step(opt, m, xx, yy)
        steps.append(torch.cat([p.detach().float().reshape(-1) for p in m.parameters()]) - before)
    assert set(factored) == ({torch.float32} if case.method.factors_grams else set())
    assert all(p.dtype == dtype for p in model.parameters())
    error = float((steps[1] - steps[0]).norm() / steps[0].norm())
    assert error < 0.05, error


# -- devices and dtypes ------------------------------------------------------------------------
@representative
def test_parameters_of_several_dtypes_or_devices(case):
    model = case.build_model()
    last = list(model.modules())[-1]
    last.double()
    with pytest.raises(ValueError, match="one dtype and one device.*float32.*float64"):
        case.make(model)
    model = case.build_model()
    list(model.modules())[-1].to("meta")
    with pytest.raises(ValueError, match="one dtype and one device.*on meta"):
        case.make(model)


@representative
def test_target_on_another_device(case):
    model = case.build_model()
    opt = case.make(model)
    x, y = case.batches(1)[0]
    before = _before(model, opt)
    with pytest.raises(ValueError, match="target is on meta, output on cpu"):
        opt.backward(model(x), y.to("meta"))
    _unchanged(model, opt, before)


@representative
def test_input_of_another_dtype(case):
    """torch's forward refuses it (before any hook runs): nothing captured, and the next
    step is that of a twin that never saw it."""
    model = case.build_model()
    twin = copy.deepcopy(model)
    opt, other = case.make(model), case.make(twin)
    x, y = case.batches(1)[0]
    x = x.double()
    match = "dtype|type \\(double\\)"
    with pytest.raises(RuntimeError, match=match):
        case.step(opt, model, x, y)
    x, y = case.batches(1)[0]
    case.step(opt, model, x, y)
    case.step(other, twin, x, y)
    assert_same_params(model, twin)


class SparseNet(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 3, sparse=True)
        self.head = nn.Linear(3, k)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


@representative
def test_sparse_gradients(case):
    """Embedding(sparse=True): refused when hooked (GGN, SENG); a sparse gradient on the
    plain-gradient path (FNGD, or unsupported='gradient') is refused at step by name."""
    tokens = torch.randint(0, 7, (4, 3))
    y = torch.randn(4, 2) if case.loss == "mse" else torch.randint(0, 3, (4,))
    loss = F.mse_loss if case.loss == "mse" else F.cross_entropy
    options = [{"unsupported": "gradient"}]
    if case.method.linear_conv_only:
        options.append({})
    else:
        with pytest.raises(gramopt.UnsupportedModuleError, match="sparse gradients are not supported"):
            case.make(SparseNet(case.outputs), unsupported="error")
    for extra in options:
        model = SparseNet(case.outputs)
        opt = case.make(model, **extra)
        before = _before(model, opt)
        opt.zero_grad()
        if case.loop == "uniform":
            opt.backward(model(tokens), y)
        else:
            loss(model(tokens), y).backward()
        with pytest.raises(ValueError, match="embed.weight .* sparse gradient"):
            opt.step()
        _unchanged(model, opt, before)


@representative
@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_complex_parameters(case):
    model = nn.Linear(3, case.outputs).to(torch.complex64)
    with pytest.raises(ValueError, match="complex parameters are not supported"):
        case.make(model)
