"""GGN's output curvature (issue 16): "top" and "sampled" columns, outputs of any shape,
adaptive damping and divergence, against dense float64 references built with torch.func
(reference.jacobian) and a dense p x p solve, never the optimizer's own Gram code."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
import models
from gramopt.losses import CrossEntropyLoss
from reference import jacobian, params_vector


def dense_step(model, x, output_columns, gradient, lr, damping):
    """``-lr (M M^T + damping I)^{-1} g`` with ``M = J^T Q~`` (dense, p x p).

    ``output_columns``: ``[b k, r]`` block columns (Q~ spread over the flat outputs);
    ``gradient``: e ``[b k]``."""
    j = jacobian(model, x)
    m = j.T @ output_columns
    g = j.T @ gradient
    system = m @ m.T + damping * torch.eye(m.shape[0], dtype=m.dtype)
    return -lr * torch.linalg.solve(system, g)


def block_columns(columns):
    """Per-sample ``[b, k, r]`` -> block-diagonal ``[b k, b r]``."""
    return torch.block_diag(*columns)


def one_step(model, x, y, **kwargs):
    before = params_vector(model)
    opt = gramopt.GGN(model, damping_adaptation=None, **kwargs)
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()
    return params_vector(model) - before, opt


def top_columns(p, y, s):
    """Q~_i ``[k, s]``: ``sqrt(p_c) (1_c - p_i)`` for the label and the s-1 most probable others."""
    out = []
    for pi, yi in zip(p, y, strict=True):
        order = [int(c) for c in torch.argsort(pi, descending=True) if int(c) != int(yi)]
        chosen = [int(yi)] + order[: s - 1]
        eye = torch.eye(pi.numel(), dtype=pi.dtype)
        out.append(torch.stack([pi[c].sqrt() * (eye[c] - pi) for c in chosen], dim=1))
    return out


@pytest.mark.parametrize("s", [1, 2, 3, 5])
def test_top_step_matches_dense_reference(s, float64):
    model, x, y = models.mlp(out=5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    e = (p - F.one_hot(y, 5).to(p.dtype)).reshape(-1)
    expected = dense_step(model, x, block_columns(top_columns(p, y, s)), e, lr=0.7, damping=0.2)
    delta, _ = one_step(model, x, y, lr=0.7, damping=0.2, loss="cross_entropy", curvature="top", samples=s)
    torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-10)


def test_top_with_all_classes_is_the_exact_step(float64):
    model, x, y = models.mlp(out=4), torch.randn(5, 5), torch.randint(0, 4, (5,))
    top, _ = one_step(copy.deepcopy(model), x, y, lr=0.5, damping=0.3, loss="cross_entropy", curvature="top", samples=4)
    exact, _ = one_step(model, x, y, lr=0.5, damping=0.3, loss="cross_entropy", curvature="exact")
    torch.testing.assert_close(top, exact, rtol=1e-7, atol=1e-10)


def drawn_columns(loss, f, seed, draws, s):
    """Re-draw the optimizer's columns from its documented seeding (seed, draws)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + draws)
    if loss == "mse":
        return [torch.randn(f.shape, generator=g, dtype=f.dtype) / math.sqrt(s) for _ in range(s)]
    p = torch.softmax(f, dim=1)
    u = torch.rand(s, f.shape[0], 1, 1, generator=g, dtype=p.dtype)  # one uniform per draw: the inverse CDF
    cols = []
    for j in range(s):
        drawn = torch.stack(
            [torch.searchsorted(p[i].cumsum(0), u[j, i, 0] * p[i].sum(), right=True) for i in range(f.shape[0])]
        )
        cols.append((F.one_hot(drawn.view(-1), f.shape[1]).to(p.dtype) - p) / math.sqrt(s))
    return cols


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("s", [1, 3])
def test_sampled_step_with_the_optimizers_draws(loss, s, float64):
    model, x = models.mlp(out=3), torch.randn(6, 5)
    y = torch.randn(6, 3) if loss == "mse" else torch.randint(0, 3, (6,))
    with torch.no_grad():
        f = model(x)
    cols = drawn_columns(loss, f, seed=7, draws=0, s=s)
    columns = block_columns([torch.stack([c[i] for c in cols], dim=1) for i in range(6)])
    e = (f - y) if loss == "mse" else torch.softmax(f, 1) - F.one_hot(y, 3).to(f.dtype)
    expected = dense_step(model, x, columns, e.reshape(-1), lr=0.5, damping=0.4)
    delta, opt = one_step(model, x, y, lr=0.5, damping=0.4, loss=loss, curvature="sampled", samples=s, seed=7)
    torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-10)
    assert opt.state_dict()["gramopt"]["draws"] == 1


@pytest.mark.parametrize("solver", ["cg", "sketch-pcg", "nystrom-pcg", "auto"])
def test_every_solver_solves_the_sampled_system(solver, float64):
    model, x, y = models.mlp(out=4), torch.randn(8, 5), torch.randint(0, 4, (8,))
    kwargs = dict(lr=0.5, damping=0.3, loss="cross_entropy", curvature="sampled", samples=2, seed=3)
    reference, _ = one_step(copy.deepcopy(model), x, y, **kwargs)
    delta, _ = one_step(
        model, x, y, solver=solver, solver_options={"tol": 1e-12} if solver != "auto" else None, **kwargs
    )
    torch.testing.assert_close(delta, reference, rtol=1e-6, atol=1e-9)


def test_sampled_step_converges_to_the_exact_step(float64):
    """The relative error falls with the number of columns (like 1/sqrt(s))."""
    model, x, y = models.mlp(out=3), torch.randn(4, 5), torch.randint(0, 3, (4,))
    exact, _ = one_step(copy.deepcopy(model), x, y, lr=1.0, damping=0.1, loss="cross_entropy")
    errors = {}
    for s in (16, 256):
        runs = []
        for seed in range(2):
            delta, _ = one_step(copy.deepcopy(model), x, y, lr=1.0, damping=0.1, loss="cross_entropy",
                                curvature="sampled", samples=s, seed=seed)
            runs.append(float((delta - exact).norm() / exact.norm()))
        errors[s] = sum(runs) / len(runs)
    assert errors[256] < 0.5 * errors[16], errors  # 1/sqrt(16) = 0.25 expected
    assert errors[256] < 0.2, errors


class SequenceModel(nn.Module):
    """Tokens ``[b, T]`` -> logits ``[b, V, T]`` (classes in dim 1, as F.cross_entropy)."""

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, vocab))

    def forward(self, tokens):
        return self.body(self.embed(tokens)).transpose(1, 2)


def per_position_reference(model, x, y, lr, damping, ignore_index=-100):
    """Every counted (sample, position) as a sample of its own: dense J^T H J over the
    flat [V, T] outputs of each sample."""
    j = jacobian(model, x)
    with torch.no_grad():
        f = model(x)
    b, v, t = f.shape
    h = torch.zeros(b * v * t, b * v * t, dtype=f.dtype)
    e = torch.zeros(b, v, t, dtype=f.dtype)
    for i in range(b):
        for pos in range(t):
            if int(y[i, pos]) == ignore_index:
                continue
            p = torch.softmax(f[i, :, pos], dim=0)
            e[i, :, pos] = p - F.one_hot(y[i, pos], v).to(p.dtype)
            index = torch.tensor([i * v * t + c * t + pos for c in range(v)])
            h[index.unsqueeze(1), index.unsqueeze(0)] = torch.diag(p) - torch.outer(p, p)
    system = j.T @ h @ j + damping * torch.eye(j.shape[1], dtype=j.dtype)
    return -lr * torch.linalg.solve(system, j.T @ e.reshape(-1))


@pytest.mark.parametrize("curvature", ["exact", "top"])
def test_sequence_outputs_match_a_per_position_reference(curvature, float64):
    model = SequenceModel()
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    y[0, 1] = y[2, 3] = -100
    # the damping is per position: the summed system's damping is damping * T (T = 4)
    expected = per_position_reference(model, x, y, lr=0.6, damping=0.5 * 4)
    kwargs = dict(samples=5) if curvature == "top" else {}
    delta, opt = one_step(model, x, y, lr=0.6, damping=0.5, loss="cross_entropy", curvature=curvature, **kwargs)
    torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-10)


def test_sequence_outputs_sampled_rows_stay_per_sample(float64):
    """[b, V, T] with "sampled": one row per sample and column (b (s + 1) rows), and
    many columns approach the per-position exact step."""
    model = SequenceModel()
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    exact = per_position_reference(model, x, y, lr=1.0, damping=0.5 * 4)
    delta, opt = one_step(
        model, x, y, lr=1.0, damping=0.5, loss="cross_entropy", curvature="sampled", samples=512, seed=1
    )
    assert float((delta - exact).norm() / exact.norm()) < 0.3


def test_default_curvature_is_top_for_one_position_and_sampled_for_several(float64):
    """Cross-entropy's default curvature (DEFAULT_CURVATURE, chosen by
    benchmarks/results/ggn_ce_defaults.json) is "top"; for [b, V, T] logits the default
    becomes "sampled" (b (s + 1) rows, not b T s). A curvature given explicitly stays."""
    from gramopt.optim.ggn.optimizer import DEFAULT_CURVATURE, DEFAULT_HYPER

    assert DEFAULT_CURVATURE["cross_entropy"] == "top"
    model, x = models.mlp(out=3), torch.randn(6, 5)
    opt = gramopt.GGN(model, loss="cross_entropy")
    assert (opt.param_groups[0]["lr"], opt.damping) == (
        DEFAULT_HYPER["cross_entropy"]["lr"],
        DEFAULT_HYPER["cross_entropy"]["damping"],
    )
    assert opt.batch_curvature(model(x)) == "top" and opt.positions_per_sample(model(x)) == 1
    seq = SequenceModel()
    tokens, labels = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    default = gramopt.GGN(seq, loss="cross_entropy", seed=1, damping_adaptation=None)
    assert default.batch_curvature(seq(tokens)) == "sampled" and default.positions_per_sample(seq(tokens)) == 4
    before = params_vector(seq)
    default.zero_grad()
    default.backward(seq(tokens), labels)
    default.step()
    delta = params_vector(seq) - before
    assert default.state_dict()["gramopt"]["draws"] == 1  # it drew sampled columns
    assert default.curvature == "top" and default.last_info.curvature == "sampled"  # what the step used
    with torch.no_grad():
        seq_copy = copy.deepcopy(seq)
        for p, d in zip(
            seq_copy.parameters(), torch.split(delta, [p.numel() for p in seq_copy.parameters()]), strict=True
        ):
            p.sub_(d.view_as(p))  # back to the start
    same, _ = one_step(seq_copy, tokens, labels, loss="cross_entropy", curvature="sampled", seed=1)
    torch.testing.assert_close(same, delta, rtol=1e-9, atol=1e-12)
    explicit = gramopt.GGN(SequenceModel(), loss="cross_entropy", curvature="top")
    assert explicit.batch_curvature(seq(tokens)) == "top"


def test_ignore_index_and_loss_value(float64):
    model = SequenceModel()
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    y[1] = -100
    opt = gramopt.GGN(model, loss="cross_entropy", curvature="sampled")
    out = model(x)
    value = opt.backward(out, y)
    torch.testing.assert_close(value, F.cross_entropy(out.detach(), y))


# -- adaptive damping --------------------------------------------------------------------


def test_damping_rule_on_a_quadratic(float64):
    """A linear model under mse: the loss is its own quadratic model, so with the exact
    curvature rho = 1 (damping decreases); with sampled columns the model's curvature
    differs from the loss's and rho is the known ratio of the two dense reductions."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    rule = gramopt.AdaptiveDamping(every=1, min_damping=1e-3, reject=False)  # (the sampled step below raises the loss)
    opt = gramopt.GGN(model, lr=0.8, damping=0.5, damping_adaptation=rule)
    opt.backward(model(x), y)
    opt.step()
    assert opt.extra_state["damping_adaptation"]["last_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert opt.damping == pytest.approx(0.5 * rule.decrease)

    model = nn.Linear(4, 3, bias=False)
    before = params_vector(model)
    with torch.no_grad():
        f = model(x)
    cols = drawn_columns("mse", f, seed=5, draws=0, s=1)
    columns = block_columns([torch.stack([c[i] for c in cols], dim=1) for i in range(6)])
    j = jacobian(model, x)
    e = (f - y).reshape(-1)
    opt = gramopt.GGN(model, lr=0.8, damping=0.5, curvature="sampled", seed=5, damping_adaptation=rule)
    opt.backward(model(x), y)
    opt.step()
    delta = params_vector(model) - before
    g, m = j.T @ e, j.T @ columns
    predicted = g @ delta + 0.5 * delta @ m @ m.T @ delta
    actual = g @ delta + 0.5 * delta @ j.T @ j @ delta  # the loss is exactly quadratic
    rho = float(actual / predicted)
    assert opt.extra_state["damping_adaptation"]["last_ratio"] == pytest.approx(rho, rel=1e-7)
    expected = rule.update(0.5, rho, rule.min_damping)
    assert opt.damping == pytest.approx(expected)


def test_a_step_that_raises_its_batchs_loss_is_undone(float64):
    """reject (the default): a linear model under mse is its own quadratic model; lr 0.8
    keeps its promise (kept, damping lowered), lr 5 overshoots (the loss rises): the
    parameters and the momentum buffer return to their values after the first step,
    the damping rises, ``last_info`` and ``extra_state`` say so; a kept step after it
    moves on from there."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    rule = gramopt.AdaptiveDamping(every=1, min_damping=0.1)
    opt = gramopt.GGN(model, lr=0.8, damping=0.5, momentum=0.5, damping_adaptation=rule)
    opt.backward(model(x), y)
    opt.step()
    assert not opt.last_info.rejected and opt.damping == pytest.approx(0.5 * rule.decrease)
    kept = params_vector(model)
    buffer = opt.state[model.weight]["momentum_buffer"].clone()
    loss_before = F.mse_loss(model(x), y, reduction="sum")
    opt.param_groups[0]["lr"] = 5.0
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()
    assert (
        opt.last_info.rejected and opt.extra_state["damping_adaptation"]["rejected_steps"] == 1 and opt.steps_taken == 2
    )
    assert opt.extra_state["damping_adaptation"]["last_ratio"] < 0
    assert torch.equal(params_vector(model), kept)
    assert torch.equal(opt.state[model.weight]["momentum_buffer"], buffer)
    assert opt.damping == pytest.approx(0.5 * rule.decrease * rule.increase)
    torch.testing.assert_close(F.mse_loss(model(x), y, reduction="sum"), loss_before)
    opt.param_groups[0]["lr"] = 0.8
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()
    assert not opt.last_info.rejected and opt.extra_state["damping_adaptation"]["rejected_steps"] == 1
    assert F.mse_loss(model(x), y, reduction="sum") < loss_before
    # a first step that is rejected leaves no momentum buffer behind, and reject=False keeps it
    for reject in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(4, 3, bias=False)
        before = params_vector(model)
        opt = gramopt.GGN(
            model, lr=5.0, damping=0.5, momentum=0.5, damping_adaptation=gramopt.AdaptiveDamping(every=1, reject=reject)
        )
        opt.backward(model(x), y)
        opt.step()
        assert opt.last_info.rejected is reject
        assert torch.equal(params_vector(model), before) is reject
        assert ("momentum_buffer" in opt.state[model.weight]) is not reject


def test_checks_between_the_every_th_steps_follow_a_surge_or_a_failed_check(float64):
    """AdaptiveDamping.due: a check (one extra forward pass of the model) on each of the
    first ``warmup`` steps, on every ``every``-th step, on a step whose batch loss surged
    above ``surge`` times the running mean, and on every step after a check with rho < low
    until one holds."""
    rule = gramopt.AdaptiveDamping(every=100, warmup=0)
    assert rule.due(0, 1.0, None, None) and rule.due(200, 1.0, 1.0, 1.0)
    warm = gramopt.AdaptiveDamping(every=100, warmup=3)
    assert [warm.due(step, 1.0, 1.0, 0.9) for step in range(5)] == [True, True, True, False, False]
    assert not rule.due(1, 1.0, 1.0, 0.9) and not rule.due(1, 1.9, 1.0, None)
    assert rule.due(1, 2.1, 1.0, 0.9)  # a surge
    assert rule.due(1, 1.0, 1.0, 0.1) and rule.due(1, 1.0, 1.0, -math.inf) and rule.due(1, 1.0, 1.0, math.nan)
    assert not gramopt.AdaptiveDamping(every=100, warmup=0, surge=None).due(1, 1e9, 1.0, 0.9)
    assert rule.averaged(None, 3.0) == 3.0 and rule.averaged(1.0, 3.0) == pytest.approx(1.2)
    for bad in (1.0, 0.5, math.inf, True, "2"):
        with pytest.raises(ValueError, match="surge"):
            gramopt.AdaptiveDamping(surge=bad)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="warmup"):
            gramopt.AdaptiveDamping(warmup=bad)

    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    opt = gramopt.GGN(model, lr=0.1, damping=0.5, damping_adaptation=rule, divergence=None)

    def forwards(target: torch.Tensor, lr: float = 0.1) -> int:
        """The model's forward passes in one step (1: unchecked, 2: checked)."""
        opt.param_groups[0]["lr"] = lr
        calls.clear()
        opt.zero_grad()
        opt.backward(model(x), target)
        opt.step()
        return len(calls)

    assert forwards(y) == 2  # step 0: every 100th
    assert [forwards(y) for _ in range(3)] == [1, 1, 1]
    assert forwards(10 * y) == 2  # the batch loss surged
    assert opt.extra_state["damping_adaptation"]["last_ratio"] == pytest.approx(
        1.0
    )  # (a linear mse model is its own quadratic model)
    assert forwards(y) == 1
    assert forwards(100 * y, lr=5.0) == 2 and opt.last_info.rejected  # a surge, and a failed check ...
    assert forwards(y, lr=5.0) == 2 and opt.last_info.rejected  # ... calls the next check ...
    assert forwards(y) == 2 and not opt.last_info.rejected  # ... until one holds
    assert forwards(y) == 1
    state = opt.state_dict()
    other = gramopt.GGN(copy.deepcopy(model), damping_adaptation=rule)
    other.load_state_dict(state)
    assert (
        other.extra_state["damping_adaptation"]["loss_average"] == opt.extra_state["damping_adaptation"]["loss_average"]
    )


def test_damping_rule_raises_on_a_failed_step():
    rule = gramopt.AdaptiveDamping()
    assert rule.update(1.0, -3.0, 1.0) == pytest.approx(rule.increase)
    assert rule.update(2.0, 0.9, 1.0) == pytest.approx(max(2.0 * rule.decrease, 1.0))
    assert rule.update(2.0, 0.5, 1.0) == 2.0
    assert rule.ratio(1.0, 0.0) == -math.inf
    with pytest.raises(ValueError, match="every"):
        gramopt.AdaptiveDamping(every=0)
    with pytest.raises(ValueError, match="reject"):
        gramopt.AdaptiveDamping(reject=1)
    assert rule.keeps(-1.0) and rule.keeps(0.0) and not rule.keeps(1e-9) and not rule.keeps(math.nan)
    assert gramopt.AdaptiveDamping(reject=False).keeps(math.inf)


def test_first_step_uses_the_constructors_damping_and_state_round_trips(float64):
    model, x, y = models.mlp(out=3), torch.randn(6, 5), torch.randint(0, 3, (6,))
    adaptive = copy.deepcopy(model)
    fixed, _ = one_step(model, x, y, lr=0.5, damping=0.7, loss="cross_entropy")
    before = params_vector(adaptive)
    opt = gramopt.GGN(
        adaptive, lr=0.5, damping=0.7, loss="cross_entropy", damping_adaptation=gramopt.AdaptiveDamping(every=1)
    )
    opt.backward(adaptive(x), y)
    opt.step()
    torch.testing.assert_close(params_vector(adaptive) - before, fixed)
    state = opt.state_dict()
    other = gramopt.GGN(copy.deepcopy(adaptive), loss="cross_entropy")
    other.load_state_dict(state)
    assert other.damping == opt.damping
    assert other.extra_state["damping_adaptation"]["last_ratio"] == opt.extra_state["damping_adaptation"]["last_ratio"]


def test_sampled_run_checkpoint_resume_is_reproducible(float64):
    def run(model, opt, steps, g):
        for _ in range(steps):
            x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            opt.backward(model(x), y)
            opt.step()

    model = models.mlp(out=3)
    opt = gramopt.GGN(model, loss="cross_entropy", curvature="sampled", samples=2, seed=11)
    g = torch.Generator().manual_seed(0)
    run(model, opt, 3, g)
    saved_model, saved_opt, saved_g = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), g.get_state()
    run(model, opt, 3, g)
    resumed = models.mlp(out=3)
    resumed.load_state_dict(saved_model)
    opt2 = gramopt.GGN(resumed, loss="cross_entropy", curvature="sampled", samples=2)
    opt2.load_state_dict(saved_opt)
    g2 = torch.Generator()
    g2.set_state(saved_g)
    run(resumed, opt2, 3, g2)
    torch.testing.assert_close(params_vector(resumed), params_vector(model))


def test_each_rank_draws_its_own_sampled_columns_reproducibly(monkeypatch, float64):
    """Under distributed=, every rank holds rank 0's seed; the rank enters the draws' seed
    (gramopt.optim.ggn.optimizer.process_rank is gramopt.distributed.rank, 0 without a
    process group), so ranks draw different columns, each reproducibly; rank 0 draws what
    a single process draws (the documented (seed, draws) seeding)."""
    import gramopt.optim.ggn.optimizer as ggn_module

    torch.manual_seed(0)
    model, x, y = models.mlp(out=3), torch.randn(6, 5), torch.randint(0, 3, (6,))
    kwargs = dict(lr=0.5, damping=0.4, loss="cross_entropy", curvature="sampled", samples=2, seed=7)
    deltas = {}
    for rank in (0, 1, 1, 2):
        monkeypatch.setattr(ggn_module, "process_rank", lambda rank=rank: rank)
        delta, _ = one_step(copy.deepcopy(model), x, y, **kwargs)
        deltas.setdefault(rank, []).append(delta)
    torch.testing.assert_close(deltas[1][0], deltas[1][1], rtol=0, atol=0)  # reproducible per rank
    assert not torch.allclose(deltas[0][0], deltas[1][0]) and not torch.allclose(deltas[1][0], deltas[2][0])
    with torch.no_grad():
        f = model(x)
    cols = drawn_columns("cross_entropy", f, seed=7, draws=0, s=2)
    columns = block_columns([torch.stack([c[i] for c in cols], dim=1) for i in range(6)])
    e = torch.softmax(f, 1) - F.one_hot(y, 3).to(f.dtype)
    torch.testing.assert_close(
        deltas[0][0], dense_step(model, x, columns, e.reshape(-1), lr=0.5, damping=0.4), rtol=1e-7, atol=1e-10
    )


def test_divergence_is_reported_and_changes_nothing():
    model, x, y = models.mlp(out=3), torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt = gramopt.GGN(model, loss="cross_entropy", divergence=10.0)
    opt.backward(model(x), y)
    opt.step()
    with torch.no_grad():
        model[-1].weight.mul_(1e3)  # logits blow up: the loss grows by orders of magnitude
    before = params_vector(model)
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(gramopt.DivergenceError, match="diverges"):
        opt.backward(model(x), y)
    torch.testing.assert_close(params_vector(model), before)
    assert opt.state_dict()["param_groups"] == state["param_groups"]


def test_memorisation_trains_with_the_defaults():
    """Issue 16's case: 512 random inputs, 4 random labels, MLP 20-64-64-4, batches of 64,
    100 steps, gramopt.GGN(mlp, loss="cross_entropy")."""
    x, y = torch.randn(512, 20), torch.randint(0, 4, (512,))
    mlp = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = gramopt.GGN(mlp, loss="cross_entropy")
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        idx = torch.randint(0, 512, (64,), generator=g)
        opt.zero_grad()
        losses.append(float(opt.backward(mlp(x[idx]), y[idx])))
        opt.step()
    with torch.no_grad():
        accuracy = float((mlp(x).argmax(1) == y).float().mean())
    assert max(losses) < 3 * losses[0], losses
    # chance is 0.25. The defaults (top s=3, lr 0.3, damping 10) reach 0.66 here; damping 3
    # memorised faster (exact: 0.94) but diverged on the project's mnist and digits tasks
    # (benchmarks/results/ggn_ce_defaults.json), so the defaults trade this speed for safety.
    assert accuracy > 0.6, accuracy


# -- bad input ---------------------------------------------------------------------------


def test_bad_configurations_are_refused():
    model = models.mlp(out=3)
    with pytest.raises(ValueError, match="samples"):
        gramopt.GGN(model, loss="cross_entropy", curvature="sampled", samples=0)
    with pytest.raises(ValueError, match="not defined"):
        gramopt.GGN(model, loss="mse", curvature="top")
    with pytest.raises(ValueError, match="unknown curvature"):
        gramopt.GGN(model, curvature="fisher")
    with pytest.raises(ValueError, match="samples"):
        gramopt.GGN(model, samples=2)


@pytest.mark.parametrize(
    "case", ["all-ignored", "non-finite", "too-many-top-samples", "too-many-exact-rows"]
)
def test_bad_batches_change_nothing(case):
    model = models.mlp(out=3)
    kwargs = dict(loss="cross_entropy", curvature="sampled")
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    error, match = ValueError, "ignore_index"
    if case == "all-ignored":
        y = torch.full((6,), -100)
    elif case == "non-finite":
        x[2, 1] = float("nan")
        error, match = gramopt.NonFiniteError, "NaN"
    elif case == "too-many-top-samples":
        kwargs = dict(loss="cross_entropy", curvature="top", samples=4)
        match = "samples"
    else:
        kwargs = dict(loss="cross_entropy", curvature="exact")
        model, x, y = SequenceModel(vocab=5), torch.randint(0, 5, (64, 32)), torch.randint(0, 5, (64, 32))
        match = 'curvature="sampled"'
    opt = gramopt.GGN(model, **kwargs)
    before, state = params_vector(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.backward(model(x), y)
    with pytest.raises(gramopt.CaptureError):
        opt.step()
    torch.testing.assert_close(params_vector(model), before)
    assert opt.state_dict()["gramopt"] == state["gramopt"]


def test_cross_entropy_loss_object_with_ignore_index(float64):
    model = SequenceModel()
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(1, 5, (3, 4))
    y[:, 0] = 0
    loss = CrossEntropyLoss(ignore_index=0)
    expected = per_position_reference(model, x, y, lr=0.6, damping=0.5 * 4, ignore_index=0)  # per position, T = 4
    delta, _ = one_step(model, x, y, lr=0.6, damping=0.5, loss=loss, curvature="exact")
    torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-10)


class _AttentionNet(nn.Module):
    """nn.MultiheadAttention (packed in-projection) on ``[b, 4, 6]``, then a Linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.read = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.read(torch.tanh(out).mean(dim=1))


def _frozen_weight_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    model[2].weight.requires_grad_(False)  # a layer whose factors cover its bias alone
    return model


BLOCK_CASES = {
    "mlp": (lambda: models.mlp(out=3), lambda b: torch.randn(b, 5)),
    "wide-mlp": (
        lambda: nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)),
        lambda b: torch.randn(b, 5),
    ),
    "frozen-weight": (_frozen_weight_mlp, lambda b: torch.randn(b, 5)),
    "cnn": (lambda: models.cnn(out=3), lambda b: torch.randn(b, 1, 8, 8)),
    "conv1d": (lambda: models.conv1d_net(out=3), lambda b: torch.randn(b, 2, 8)),
    "layernorm": (lambda: models.layernorm_net(out=3), lambda b: torch.randn(b, 6)),
    "transformer": (lambda: models.TinyTransformer(out=3), lambda b: torch.randint(0, 11, (b, 5))),
    "attention": (_AttentionNet, lambda b: torch.randn(b, 4, 6)),
}


@pytest.mark.parametrize("name", sorted(BLOCK_CASES))
@pytest.mark.parametrize("strategy", ["default", "explicit"])
def test_block_gram_and_product_match_the_full_grams_block(name, strategy, float64, monkeypatch):
    """``pass_block(b, r, m).gram()`` is the ``[S, S]`` block of ``U U^T`` over the rows of
    each sample's first m passes, and ``block_product(b, r, m, c)`` is ``U[S] U^T c``, with
    U from torch.func Jacobians (tests/reference.py), for every layer type's factors."""
    from gramopt.capture import CaptureEngine

    if strategy == "explicit":  # position-pair Grams formed from explicit rows instead
        monkeypatch.setattr("gramopt.capture.shared_weight.gram_strategy", lambda d_in, shape: "explicit")
    build, inputs = BLOCK_CASES[name]
    model, b, r, m = build(), 4, 3, 2
    x = inputs(b)
    engine = CaptureEngine(model, [p for p in model.parameters() if p.requires_grad])
    out = model(x)
    directions = [torch.randn_like(out) for _ in range(r)]
    engine.backward_passes(out, directions)
    factors = engine.factors()
    engine.close()
    coeffs = torch.randn(b * r)
    selected = (torch.arange(b)[:, None] * r + torch.arange(m)).reshape(-1)
    k = out[0].numel()
    for layer, factor in factors.items():
        jac = jacobian(model, x, factor.params).view(b, k, -1)  # independent of the capture
        rows = torch.einsum("cbo,bop->bcp", torch.stack([d.reshape(b, k) for d in directions]), jac).reshape(b * r, -1)
        # the full Gram first: what it caches on the factors must not leak into the block
        torch.testing.assert_close(factor.gram(), rows @ rows.T, rtol=1e-10, atol=1e-12, msg=layer)
        block = factor.pass_block(b, r, m)
        assert block.num_rows == b * m
        torch.testing.assert_close(block.gram(), rows[selected] @ rows[selected].T, rtol=1e-10, atol=1e-12, msg=layer)
        expected = rows[selected] @ (rows.T @ coeffs)
        torch.testing.assert_close(factor.block_product(b, r, m, coeffs), expected, rtol=1e-10, atol=1e-12, msg=layer)
        torch.testing.assert_close(factor.gram(), rows @ rows.T, rtol=1e-10, atol=1e-12, msg=layer)  # the parent intact


def test_sampled_system_forms_only_the_drawn_rows_block(float64, monkeypatch):
    """The sampled step builds the [b s, b s] block (never the [b (s+1)]^2 Gram) and still
    equals the dense reference of test_sampled_step_with_the_optimizers_draws."""
    from gramopt.capture.shared_weight import SharedWeightFactors

    sizes = []
    original = SharedWeightFactors.gram

    def recording(self):
        gram = original(self)
        sizes.append(gram.shape[0])
        return gram

    monkeypatch.setattr(SharedWeightFactors, "gram", recording)
    model, x, y = models.mlp(out=3), torch.randn(6, 5), torch.randint(0, 3, (6,))
    with torch.no_grad():
        f = model(x)
    cols = drawn_columns("cross_entropy", f, seed=7, draws=0, s=2)
    columns = block_columns([torch.stack([c[i] for c in cols], dim=1) for i in range(6)])
    e = torch.softmax(f, 1) - F.one_hot(y, 3).to(f.dtype)
    expected = dense_step(model, x, columns, e.reshape(-1), lr=0.5, damping=0.4)
    delta, _ = one_step(model, x, y, lr=0.5, damping=0.4, loss="cross_entropy", curvature="sampled", samples=2, seed=7)
    torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-10)
    assert sizes and set(sizes) == {6 * 2}, sizes


def test_drawn_classes_follow_the_probabilities(float64):
    """CrossEntropyLoss.draw_classes draws y^ ~ Categorical(p): frequencies over 40000
    seeded draws within 0.01 of p (4 standard deviations at most), never a class of p = 0."""
    p = torch.tensor([[[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25]], [[0.0, 0.0, 0.0, 1.0], [0.7, 0.2, 0.1, 0.0]]])
    drawn = CrossEntropyLoss.draw_classes(p, 40000, torch.Generator().manual_seed(3))
    assert drawn.shape == (40000, 2, 2)
    freq = F.one_hot(drawn, 4).double().mean(dim=0)
    torch.testing.assert_close(freq, p, rtol=0, atol=0.01)
    assert not freq[p == 0].any()


class _Output(dict):
    """A stand-in for a Hugging Face ``ModelOutput``: a dict with attribute access and
    integer indexing through ``to_tuple``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def to_tuple(self):
        return tuple(self.values())

    def __getitem__(self, key):
        return self.to_tuple()[key] if isinstance(key, int) else super().__getitem__(key)


class _Wrapped(nn.Module):
    """The MLP with its logits in a ModelOutput-like object (``.logits``), or a tuple."""

    def __init__(self, inner: nn.Module, form: str) -> None:
        super().__init__()
        self.inner, self.form = inner, form

    def forward(self, x, scale=1.0):
        logits = self.inner(x) * scale
        return (
            _Output(logits=logits, hidden=torch.tanh(logits)) if self.form == "logits" else (logits, torch.tanh(logits))
        )


@pytest.mark.parametrize("form", ["logits", "tuple"])
def test_damping_adapts_when_the_model_returns_a_model_output(form, float64):
    """GGN re-runs the model and takes the logits as the step did (``.logits`` or the
    first element): the same ratios and dampings as with a model returning the tensor."""
    rule = gramopt.AdaptiveDamping(every=1, min_damping=1e-3)
    model, x, y = models.mlp(out=3), torch.randn(8, 5), torch.randint(0, 3, (8,))
    wrapped = _Wrapped(copy.deepcopy(model), form)
    plain_opt = gramopt.GGN(model, lr=0.5, damping=0.3, loss="cross_entropy", damping_adaptation=rule)
    opt = gramopt.GGN(wrapped, lr=0.5, damping=0.3, loss="cross_entropy", damping_adaptation=rule)
    dampings = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "damping stays fixed" warning
        for _ in range(4):
            plain_opt.zero_grad()
            plain_opt.backward(model(x), y)
            plain_opt.step()
            opt.zero_grad()
            out = wrapped(x, scale=1.0)  # a keyword argument travels to the re-run too
            opt.backward(out.logits if form == "logits" else out[0], y)
            opt.step()
            assert opt.extra_state["damping_adaptation"]["last_ratio"] == pytest.approx(
                plain_opt.extra_state["damping_adaptation"]["last_ratio"], rel=1e-9
            )
            dampings.append((opt.damping, plain_opt.damping))
    assert all(a == pytest.approx(b) for a, b in dampings)
    assert len({a for a, _ in dampings}) > 1, dampings  # the damping did change


@pytest.mark.parametrize("n", [5, 191, 192, 385])
def test_symmetric_gram_is_the_sum_of_the_blocks_products(n, float64):
    """symmetric_gram (lower blocks and their mirror) against the plain products, for
    sizes below, at and above its split into parts, with uneven parts."""
    from gramopt.linalg.kernels import symmetric_gram

    rows = [torch.randn(n, 500), torch.randn(n, 30)]  # 530 columns: split from 192 rows
    gram = symmetric_gram(rows)
    torch.testing.assert_close(gram, rows[0] @ rows[0].T + rows[1] @ rows[1].T, rtol=1e-12, atol=1e-12)
    if n >= 192:  # split: the blocks above the diagonal blocks mirror those below
        parts = min(4, n // 96)
        block = torch.arange(n) * parts // n  # the part of each row (the function's split, up to rounding)
        upper = block[:, None] + 1 < block[None, :]
        assert torch.equal(gram[upper], gram.T[upper])


class _PositionwiseNet(nn.Module):
    """Tokens ``[b, T]`` -> logits ``[b, V, T]`` through position-wise Linear layers (one
    with a frozen weight, so its factors cover the bias alone) after a position mixing."""

    def __init__(self, vocab: int = 5, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(3, 3)  # mixes the T = 3 positions: its passes reach every position
        self.body = nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, vocab))
        self.body[2].weight.requires_grad_(False)

    def forward(self, tokens):
        h = self.mix(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        return self.body(h).transpose(1, 2)


def test_one_position_passes_gram_matches_the_rows(float64):
    """Per-position passes (curvature="top" on [b, C, T] outputs): in the layers after the
    last position mixing each pass reaches one position (pass_positions) and the Gram is
    formed from that position alone; against torch.func rows, with a pass that is zero
    everywhere (an ignored position) and one layer that reaches every position."""
    from gramopt.capture import CaptureEngine

    model, b, T, vocab = _PositionwiseNet(), 4, 3, 5
    x = torch.randint(0, vocab, (b, T))
    engine = CaptureEngine(model, [p for p in model.parameters() if p.requires_grad])
    out = model(x)
    directions = []
    for t in range(T):
        for _ in range(2):
            d = torch.zeros_like(out)
            d[:, :, t] = torch.randn(b, vocab)
            directions.append(d)
    directions.append(torch.zeros_like(out))  # zero everywhere
    engine.backward_passes(out, directions)
    factors = engine.factors()
    engine.close()
    r, k = len(directions), out[0].numel()
    one_position = []
    for layer, factor in factors.items():
        jac = jacobian(model, x, factor.params).view(b, k, -1)
        rows = torch.einsum("cbo,bop->bcp", torch.stack([d.reshape(b, k) for d in directions]), jac).reshape(b * r, -1)
        where = factor.pass_positions() if hasattr(factor, "pass_positions") else None
        if where is not None:
            one_position.append(layer)
            assert where.tolist() == [0, 0, 1, 1, 2, 2, 0]
        torch.testing.assert_close(factor.gram(), rows @ rows.T, rtol=1e-10, atol=1e-12, msg=layer)
    assert one_position == ["body.0", "body.2", "body.4"]
    assert factors["mix"].pass_positions() is None
