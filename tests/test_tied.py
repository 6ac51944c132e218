"""Tied parameters (weight tying): a parameter several hooked modules use gets the step of
the dense float64 reference, whose per-sample row of that parameter is the sum of the
modules' contributions (tests/tied_cases.py, built with torch.func: ``functional_call``
ties the weights given under one name). Every method (GGN with each curvature and solver,
SENG exact and with cached curvature, FNGD estimating and sharing), both loops, gradient
accumulation; the block's factors against their own explicit rows; and the documented
fallbacks (a tie with a module without handler, weights used outside their modules'
calls, a tied module left uncalled), which give the plain gradient with a warning or an
error, never a wrong step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
import tied_cases as tc
from gramopt.capture.engine import CaptureEngine
from gramopt.capture.tied import TiedFactors
from gramopt.losses import get_loss
from reference import params_vector

CASES = list(tc.CASES)
LR, DAMPING = 0.5, 0.3


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation on a shared machine
    yield
    torch.set_num_threads(previous)


def target(case: tc.TiedCase, loss: str) -> torch.Tensor:
    return case.y_mse if loss == "mse" else case.y_ce


def positions(case: tc.TiedCase, loss: str) -> int:
    """P: GGN damps cross-entropy per position (its system's damping is damping * P)."""
    with torch.no_grad():
        f = case.model(case.x)
    return f[0].numel() // f.shape[1] if loss == "cross_entropy" else 1


def model_loss(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return get_loss(loss).value(out, y)


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, loss: str, loop: str = "uniform") -> torch.Tensor:
    before = params_vector(model)
    opt.zero_grad()
    if loop == "uniform":
        opt.backward(model(x), y)
    else:
        model_loss(loss, model(x), y).backward()
    opt.step()
    return params_vector(model) - before


def blocks_of(model: nn.Module, case: tc.TiedCase) -> list[list[nn.Parameter]]:
    """The case's blocks, as parameters of ``model`` (a copy of the case's model)."""
    names = {id(p): n for n, p in case.model.named_parameters()}
    mine = dict(model.named_parameters())
    return [[mine[names[id(p)]] for p in block] for block in case.blocks]


def ggn_reference(case: tc.TiedCase, loss: str, curvature: str, samples: int | None, seed: int = 5) -> torch.Tensor:
    """The dense step of GGN's system for ``curvature`` (the sampled columns as the
    optimizer draws them from its seed, :meth:`GaussNewtonLoss.sampled_rows`)."""
    model, y = case.model, target(case, loss)
    with torch.no_grad():
        f = model(case.x)
    if curvature == "exact" or (curvature == "top" and samples == f.shape[1]):
        h = tc.exact_curvature(f, loss)
    elif curvature == "top":
        h = tc.top_curvature(f, y, samples)
    else:
        generator = torch.Generator().manual_seed(seed * 1_000_003)
        h = tc.column_curvature(get_loss(loss).sampled_rows(f, y, samples, generator)[:-1])
    return tc.ggn_step(model, case.x, h, tc.output_gradient(f, y, loss), LR, DAMPING * positions(case, loss))


GGN_SETTINGS = [("mse", "exact"), ("mse", "sampled"), ("cross_entropy", "exact"), ("cross_entropy", "top"),
                ("cross_entropy", "sampled")]


@pytest.mark.parametrize("loss, curvature", GGN_SETTINGS, ids=[f"{loss}-{c}" for loss, c in GGN_SETTINGS])
@pytest.mark.parametrize("name", CASES)
def test_ggn_step_matches_the_dense_reference(name, loss, curvature):
    case = tc.CASES[name]()
    classes = case.classes
    samples = None if curvature == "exact" else 2
    if curvature == "top" and name == "embedding-linear":
        samples = classes  # [b, V, T]: all classes, the exact curvature
    expected = ggn_reference(case, loss, curvature, samples)
    kwargs = {} if samples is None else {"samples": samples}
    if curvature == "sampled":
        kwargs["seed"] = 5
    opt = gramopt.GGN(case.model, lr=LR, damping=DAMPING, loss=loss, curvature=curvature, damping_adaptation=None,
                      **kwargs)
    delta = one_step(case.model, opt, case.x, target(case, loss), loss)
    torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-11)


def test_top_with_every_class_is_the_exact_step_on_a_tied_model():
    case = tc.linear_linear()
    expected = ggn_reference(case, "cross_entropy", "exact", None)
    opt = gramopt.GGN(case.model, lr=LR, damping=DAMPING, loss="cross_entropy", curvature="top", samples=6,
                      damping_adaptation=None)
    torch.testing.assert_close(one_step(case.model, opt, case.x, case.y_ce, "cross_entropy"), expected,
                               rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("solver", ["cg", "sketch-pcg", "nystrom-pcg", "auto"])
@pytest.mark.parametrize("curvature", ["exact", "sampled"])
@pytest.mark.parametrize("name", ["linear-linear", "embedding-linear"])
def test_every_ggn_solver_takes_the_tied_step(name, curvature, solver):
    """The matrix-free solvers use the block's products (and sketch-pcg its exact Gram,
    since a tied block has no Kronecker factors); sampled systems its pass blocks."""
    case = tc.CASES[name]()
    loss = "cross_entropy"
    samples = None if curvature == "exact" else 2
    expected = ggn_reference(case, loss, curvature, samples)
    kwargs = {} if samples is None else {"samples": samples, "seed": 5}
    options = None if solver == "auto" else {"tol": 1e-13}
    opt = gramopt.GGN(case.model, lr=LR, damping=DAMPING, loss=loss, curvature=curvature, solver=solver,
                      solver_options=options, damping_adaptation=None, **kwargs)
    torch.testing.assert_close(one_step(case.model, opt, case.x, case.y_ce, loss), expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("loop", ["uniform", "ordinary"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", CASES)
def test_seng_exact_step_matches_the_dense_reference(name, loss, loop):
    case = tc.CASES[name]()
    y = target(case, loss)
    expected = tc.as_vector(case.model, tc.seng_step(case.model, case.x, y, loss, case.blocks, LR, DAMPING))
    opt = gramopt.SENG(case.model, lr=LR, damping=DAMPING, loss=loss)
    torch.testing.assert_close(one_step(case.model, opt, case.x, y, loss, loop), expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("name", ["linear-linear", "embedding-linear", "conv-conv"])
def test_seng_cached_curvature_of_a_tied_block_and_its_state_round_trip(name):
    """curvature_every=2: step 1 reuses U of step 0 (Algorithm 1) with step 1's gradient,
    ``d = (U_0^T U_0 / b + lam I)^{-1} g_1``; a state_dict saved after step 0 resumes it."""
    case, loss = tc.CASES[name](), "cross_entropy"
    model = case.model
    second_x = case.x.flip(0)
    second_y = case.y_ce.flip(0)
    opt = gramopt.SENG(model, lr=LR, damping=DAMPING, loss=loss, curvature_every=2)
    u0 = [tc.block_rows(model, case.x, case.y_ce, loss, block) for block in case.blocks]
    one_step(model, opt, case.x, case.y_ce, loss)
    assert any("+" in key for key in opt.state_dict()["gramopt"]["curvature"])  # the tied block's cache
    twin = copy.deepcopy(model)
    resumed = gramopt.SENG(twin, lr=LR, damping=DAMPING, loss=loss, curvature_every=2)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    expected = {}
    for u, block in zip(u0, case.blocks, strict=True):
        g = tc.block_rows(model, second_x, second_y, loss, block).mean(dim=0)
        d = torch.linalg.solve(u.T @ u / u.shape[0] + DAMPING * torch.eye(u.shape[1]), g)
        expected.update(tc._split(-LR * d, block))
    delta = one_step(model, opt, second_x, second_y, loss, "ordinary")
    torch.testing.assert_close(delta, tc.as_vector(model, expected), rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(one_step(twin, resumed, second_x, second_y, loss, "ordinary"), delta, rtol=0, atol=0)


def test_seng_sketch_over_every_column_is_the_exact_step():
    """Uniform row sampling of all p columns (without replacement, scale 1) is the exact
    Eq. 9: the sketched path reads the block's columns (:meth:`TiedFactors.columns`)."""
    case, loss = tc.linear_linear(), "mse"
    p = sum(q.numel() for q in case.blocks[0])
    expected = tc.as_vector(case.model, tc.seng_step(case.model, case.x, case.y_mse, loss, case.blocks, LR, DAMPING))
    sketch = gramopt.SketchConfig(size=p, sampling="uniform", seed=1)
    opt = gramopt.SENG(case.model, lr=LR, damping=DAMPING, loss=loss, sketch=sketch)
    torch.testing.assert_close(one_step(case.model, opt, case.x, case.y_mse, loss), expected, rtol=1e-8, atol=1e-11)


def test_seng_never_treats_a_tied_block_as_implicit():
    """The implicit (low-rank factor) path has no cross terms between layers: a tied block
    stays explicit whatever its size, and its step is exact."""
    case, loss = tc.conv_conv(), "cross_entropy"
    expected = tc.as_vector(case.model, tc.seng_step(case.model, case.x, case.y_ce, loss, case.blocks, LR, DAMPING))
    opt = gramopt.SENG(case.model, lr=LR, damping=DAMPING, loss=loss, implicit=gramopt.ImplicitConfig(threshold=10))
    assert "c1+c2" in {block.name for block in opt.engine.blocks} and "c1+c2" not in opt.implicit_layers
    assert "head" in opt.implicit_layers
    delta = one_step(case.model, opt, case.x, case.y_ce, loss)
    tied = slice(0, sum(p.numel() for p in case.blocks[0]))  # (the head's implicit step is Eq. 23's approximation)
    names = [n for n, _ in case.model.named_parameters()]
    assert names[:3] == ["c1.weight", "c1.bias", "c2.bias"]
    torch.testing.assert_close(delta[tied], expected[tied], rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("loop", ["uniform", "ordinary"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", CASES)
def test_fngd_estimation_and_sharing_match_the_dense_reference(name, loss, loop):
    """Step 0 estimates v per block (the Embedding tied to a Linear head is hooked with
    it, though FNGD leaves Embedding layers to the plain gradient), step 1 shares it."""
    case = tc.CASES[name]()
    model, y = case.model, target(case, loss)
    x1, y1 = case.x.flip(0), y.flip(0)
    opt = gramopt.FNGD(model, lr=LR, damping=1e-2, loss=loss, coefficient_steps=1)
    first, used = tc.fngd_step(model, case.x, y, loss, case.blocks, LR, 1e-2)
    torch.testing.assert_close(one_step(model, opt, case.x, y, loss, loop), tc.as_vector(model, first),
                               rtol=1e-8, atol=1e-11)
    assert opt.phase == "share"
    second, _ = tc.fngd_step(model, x1, y1, loss, case.blocks, LR, 1e-2, shared=used)
    torch.testing.assert_close(one_step(model, opt, x1, y1, loss, loop), tc.as_vector(model, second),
                               rtol=1e-8, atol=1e-11)


METHODS = {
    "ggn": lambda m, loss: gramopt.GGN(m, lr=LR, damping=DAMPING, loss=loss, curvature="exact",
                                       damping_adaptation=None),
    "seng": lambda m, loss: gramopt.SENG(m, lr=LR, damping=DAMPING, loss=loss),
    "fngd": lambda m, loss: gramopt.FNGD(m, lr=LR, damping=1e-2, loss=loss, coefficient_steps=None),
}


#: (method, loop) pairs: GGN's step needs opt.backward; SENG and FNGD take both loops
LOOPS = [("ggn", "uniform"), ("seng", "uniform"), ("seng", "ordinary"), ("fngd", "uniform"), ("fngd", "ordinary")]


@pytest.mark.filterwarnings("ignore:gramopt. micro-batches of unequal sizes")  # (weighed by b_m / B here)
@pytest.mark.parametrize("method, loop", LOOPS, ids=[f"{m}-{loop}" for m, loop in LOOPS])
@pytest.mark.parametrize("name", ["linear-linear", "embedding-linear", "conv-conv"])
def test_accumulated_micro_batches_take_the_reference_step_of_their_concatenation(name, method, loop):
    """Micro-batches of 2 and the rest, before one step: the dense reference's tied step
    of the whole batch (the ordinary loop weighs each mean loss by b_m / B)."""
    case, loss = tc.CASES[name](), "cross_entropy"
    model = case.model
    if method == "ggn":
        expected = ggn_reference(case, loss, "exact", None)
    elif method == "seng":
        expected = tc.as_vector(model, tc.seng_step(model, case.x, case.y_ce, loss, case.blocks, LR, DAMPING))
    else:
        expected = tc.as_vector(model, tc.fngd_step(model, case.x, case.y_ce, loss, case.blocks, LR, 1e-2)[0])
    opt = METHODS[method](model, loss)
    before = params_vector(model)
    opt.zero_grad()
    total = case.x.shape[0]
    for x, y in ((case.x[:2], case.y_ce[:2]), (case.x[2:], case.y_ce[2:])):
        if loop == "uniform":
            opt.backward(model(x), y)
        else:
            (model_loss(loss, model(x), y) * (x.shape[0] / total)).backward()
    opt.step()
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-8, atol=1e-11)


# -- the block's factors against their own explicit rows -----------------------------------
def captured_block(name: str, passes: int) -> tuple[TiedFactors, torch.Tensor]:
    """The tied block's factors after ``passes`` backward passes with random directions,
    and the dense rows ``[b passes, p]`` of the same passes (torch.func)."""
    case = tc.CASES[name]()
    model = case.model
    engine = CaptureEngine(model, list(model.parameters()))
    out = model(case.x)
    generator = torch.Generator().manual_seed(4)
    directions = [torch.randn(out.shape, generator=generator) for _ in range(passes)]
    engine.backward_passes(out, directions)
    factors = engine.factors()
    block = next(f for f in factors.values() if isinstance(f, TiedFactors))
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}

    def f(theta):
        return torch.func.functional_call(model, theta, (case.x,))

    jac = torch.func.jacrev(f)({names[id(p)]: p.detach() for p in block.params})
    b = case.x.shape[0]
    rows = []
    for p in block.params:
        j = jac[names[id(p)]].reshape(b, -1, p.numel())  # [b, k, numel]
        rows.append(torch.stack([torch.einsum("bk,bkp->bp", d.reshape(b, -1), j) for d in directions], dim=1))
    engine.close()
    return block, torch.cat(rows, dim=2).reshape(b * passes, -1)


@pytest.mark.parametrize("passes", [1, 3])
@pytest.mark.parametrize("name", ["linear-linear", "embedding-linear", "conv-conv"])
def test_tied_factors_agree_with_their_rows(name, passes):
    block, rows = captured_block(name, passes)
    torch.testing.assert_close(block.per_sample(), rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.gram(), rows @ rows.T, rtol=1e-10, atol=1e-12)
    a = torch.randn(rows.shape[0])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in block.rmatvec(a)]), rows.T @ a)
    v = [torch.randn_like(p) for p in block.params]
    torch.testing.assert_close(block.matvec(v), rows @ torch.cat([t.reshape(-1) for t in v]))
    index = torch.randperm(rows.shape[1])[:7]
    torch.testing.assert_close(block.columns(index), rows[:, index])
    torch.testing.assert_close(block.row_block(1, 3), rows[1:3])
    torch.testing.assert_close(block.column_norms(), rows.pow(2).sum(dim=0))
    b = rows.shape[0] // passes
    keep = max(1, passes - 1)
    kept = rows.reshape(b, passes, -1)[:, :keep].reshape(b * keep, -1)
    torch.testing.assert_close(block.pass_block(b, passes, keep).gram(), kept @ kept.T)
    torch.testing.assert_close(block.block_product(b, passes, keep, a), kept @ (rows.T @ a))
    state = copy.deepcopy(block.state())
    again = gramopt.LayerFactors.from_state(block.module, block.params, state)
    torch.testing.assert_close(again.gram(), rows @ rows.T)
    torch.testing.assert_close(block.compact().gram(), rows @ rows.T)
    assert block.kronecker_factors() is None and block.is_finite()


@pytest.mark.parametrize("name", ["linear-linear", "embedding-linear", "conv-conv"])
def test_structured_cross_blocks_equal_the_columns_form(name, monkeypatch):
    """The members' cross_gram (Linear/Conv pairs, an Embedding with its tied head) and the
    generic form from their columns give the same Gram."""
    block, rows = captured_block(name, 2)
    a, b, shared = next(block.shared_pairs())
    structured = block.cross_block(a, b, shared)
    assert block.members[a].cross_gram(block.members[b], shared) is not None or \
        block.members[b].cross_gram(block.members[a], shared) is not None
    monkeypatch.setattr(gramopt.LayerFactors, "cross_gram", lambda self, other, params: None)
    for member in block.members:
        monkeypatch.setattr(type(member), "cross_gram", lambda self, other, params: None, raising=False)
    torch.testing.assert_close(structured, block.cross_block(a, b, shared), rtol=1e-10, atol=1e-12)


def test_structured_cross_block_by_explicit_rows_for_wide_position_counts(monkeypatch):
    """Two tied convolutions whose cross block is cheaper from explicit rows than from
    position pairs take that route, with the same result."""
    import gramopt.capture.shared_weight as sw

    block, rows = captured_block("conv-conv", 1)
    a, b, shared = next(block.shared_pairs())
    expected = block.cross_block(a, b, shared)
    calls = []
    original = sw.SharedWeightFactors.explicit_rows
    monkeypatch.setattr(sw.SharedWeightFactors, "explicit_rows", lambda self: calls.append(1) or original(self))
    monkeypatch.setattr(sw, "EXPLICIT_MAX_ELEMENTS", 2**40)
    for member in block.members:
        member.__dict__["_rows"] = original(member)  # formed already: explicit costs n^2 d_in d_out only
    torch.testing.assert_close(block.cross_block(a, b, shared), expected, rtol=1e-10, atol=1e-12)
    assert calls


# -- fallbacks: the plain gradient with a warning naming the parameter, or an error -----
class Scale(nn.Module):
    """A module without a gramopt handler whose weight is tied to a Linear layer's."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.T


class TiedWithUnhandled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.other = Scale(self.a.weight)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.other(torch.tanh(self.a(x)))))


def plain_gradient(model, x, y, loss, param) -> torch.Tensor:
    model.zero_grad()
    model_loss(loss, model(x), y).backward()
    g = param.grad.detach().clone()
    model.zero_grad()
    return g


@pytest.mark.parametrize("method", list(METHODS))
def test_a_tie_with_a_module_without_handler_gives_the_plain_gradient_with_a_warning(method):
    torch.manual_seed(1)
    model = TiedWithUnhandled()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    grad = plain_gradient(model, x, y, "cross_entropy", model.a.weight)
    expected = r"the tied parameters a\.weight \(shared by a \(Linear\), other \(Scale\); no hook sees its use in other"
    with pytest.warns(RuntimeWarning, match=expected):
        opt = METHODS[method](model, "cross_entropy")
    assert all(all(p is not model.a.weight for p in block.params) for block in opt.engine.blocks)
    before = model.a.weight.detach().clone()
    one_step(model, opt, x, y, "cross_entropy")
    torch.testing.assert_close(model.a.weight - before, -LR * grad)
    cls = {"ggn": gramopt.GGN, "seng": gramopt.SENG, "fngd": gramopt.FNGD}[method]
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"a\.weight.*other \(Scale\) has no gramopt handler"):
        cls(TiedWithUnhandled(), unsupported="error")


class FunctionalHead(nn.Module):
    """GPT weight tying written functionally: the head is ``F.linear(h, tok.weight)``."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)

    def forward(self, idx):
        return F.linear(torch.tanh(self.mix(self.tok(idx))), self.tok.weight).transpose(1, 2)


@pytest.mark.parametrize("method, loop", [("ggn", "uniform"), ("seng", "uniform"), ("seng", "ordinary")])
def test_weights_used_outside_their_modules_calls_follow_the_plain_gradient(method, loop):
    """The first training forward finds tok.weight used by F.linear besides tok's call: it
    follows the plain gradient from then on, with a warning naming it (FNGD leaves
    Embedding layers to the plain gradient anyway)."""
    torch.manual_seed(2)
    model = FunctionalHead()
    idx, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    grad = plain_gradient(model, idx, y, "cross_entropy", model.tok.weight)
    opt = METHODS[method](model, "cross_entropy")
    before = model.tok.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"cannot precondition tok\.weight: the model uses them outside the calls"):
        one_step(model, opt, idx, y, "cross_entropy", loop)
    torch.testing.assert_close(model.tok.weight - before, -LR * grad)
    assert opt.engine.escaped_names == ["tok.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(model, opt, idx, y, "cross_entropy", loop)  # one warning per optimizer


def test_weights_used_outside_their_modules_calls_are_refused_under_error():
    torch.manual_seed(2)
    model = FunctionalHead()
    idx = torch.randint(0, 7, (3, 4))
    opt = gramopt.SENG(model, unsupported="error")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # refused at every forward until fixed, changing nothing
        with pytest.raises(gramopt.UnsupportedModuleError, match=r"tok\.weight: the model uses them outside"):
            model(idx)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not opt.engine.has_factors()


def test_module_tying_is_not_mistaken_for_a_use_outside_the_calls():
    case = tc.embedding_linear()
    opt = gramopt.SENG(case.model, loss="cross_entropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step(case.model, opt, case.x, case.y_ce, "cross_entropy")
    assert opt.engine.escaped_names == [] and [b.name for b in opt.engine.blocks] == ["tok+head", "mix"]


class SometimesTied(nn.Module):
    """Two tied Linear layers; ``skip`` leaves the second uncalled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)
        self.skip = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(h if self.skip else torch.tanh(self.b(h)))


@pytest.mark.parametrize("method", list(METHODS))
def test_a_tied_block_with_a_member_left_uncalled_follows_the_plain_gradient(method):
    """With b not called, the hooks cannot tell whether its weights were used without the
    call: the block's parameters follow the plain gradient, with the stray warning."""
    torch.manual_seed(3)
    model = SometimesTied()
    model.skip = True
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    grad = plain_gradient(model, x, y, "cross_entropy", model.a.weight)
    opt = METHODS[method](model, "cross_entropy")
    before = model.a.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"a\.weight.*received a gradient, but the hooks of their module recorded"):
        one_step(model, opt, x, y, "cross_entropy")
    torch.testing.assert_close(model.a.weight - before, -LR * grad)


def test_fngd_hooks_an_embedding_tied_to_a_linear_head():
    """FNGD leaves Embedding layers to the plain gradient, but one tied to a preconditioned
    Linear head is hooked for the shared weight, without a warning."""
    case = tc.embedding_linear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = gramopt.FNGD(case.model, loss="cross_entropy")
    assert [b.name for b in opt.engine.blocks] == ["tok+head", "mix"]
    assert all(p is not case.model.tok.weight for p in opt.engine.plain_params)


def test_fngd_refuses_or_warns_for_an_embedding_it_cannot_hook_tied_to_a_linear_head():
    """An Embedding whose configuration its handler refuses (sparse gradients) tied to a
    Linear head: the head cannot decide the shared weight's step alone."""
    case = tc.embedding_linear()
    case.model.tok.sparse = True
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"tok\.weight \(shared by tok \(Embedding\), head"):
        gramopt.FNGD(case.model, loss="cross_entropy", unsupported="error")
    with pytest.warns(RuntimeWarning, match=r"the tied parameters tok\.weight .*no hook sees its use in tok"):
        opt = gramopt.FNGD(case.model, loss="cross_entropy")
    assert [b.name for b in opt.engine.blocks] == ["mix"] and opt.engine.plain_params == [case.model.tok.weight]
