"""SENG against dense float64 references: per-sample gradients by torch.func vmap(grad)
(tests/reference.py), per layer ``d = solve(U^T U / b + damping I, g)`` with a dense
p_l x p_l solve, nothing from gramopt's capture engine."""

from __future__ import annotations

import copy
import io
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
import models
from gramopt.linalg.sketches import KroneckerSketch, RowSampleSketch
from gramopt.optim.seng.implicit import (
    eq23_product,
    exact_product,
    factor_gram,
    truncate,
)
from gramopt.training.registry import (
    OPTIMIZERS,
    build_optimizer,
    task_hyper,
    training_step,
)
from reference import params_vector, per_sample_grads

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
CASES = {
    "mlp-ce": (lambda: models.mlp(out=3), lambda b: torch.randn(b, 5), "cross_entropy", 3),
    "mlp-mse": (lambda: models.mlp(out=2), lambda b: torch.randn(b, 5), "mse", 2),
    "cnn-ce": (lambda: models.cnn(out=3), lambda b: torch.randn(b, 1, 8, 8), "cross_entropy", 3),
    "transformer-ce": (
        lambda: models.TinyTransformer(out=3),
        lambda b: torch.randint(0, 11, (b, 5)),
        "cross_entropy",
        3,
    ),
}


def target(loss: str, b: int, k: int) -> torch.Tensor:
    return torch.randint(0, k, (b,)) if loss == "cross_entropy" else torch.randn(b, k)


def layer_params(model: nn.Module) -> list[list[nn.Parameter]]:
    """SENG's blocks: the trainable parameters of each module (weight and bias together)."""
    blocks = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            blocks.append(own)
    return blocks


def per_sample_blocks(model, x, y, loss) -> list[torch.Tensor]:
    """U_l ``[b, p_l]`` per block, from torch.func (on a copy without the optimizer's hooks)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        module._forward_hooks.clear()
    return [per_sample_grads(model, x, y, LOSSES[loss], params=block).detach() for block in layer_params(model)]


def reference_direction(us: list[torch.Tensor], gs: list[torch.Tensor], damping: float) -> torch.Tensor:
    """``d_l = (U_l^T U_l / b + damping I)^{-1} g_l``, concatenated in parameter order."""
    out = []
    for u, g in zip(us, gs, strict=True):
        m = u.T @ u / u.shape[0] + damping * torch.eye(u.shape[1], dtype=u.dtype)
        out.append(torch.linalg.solve(m, g))
    return torch.cat(out)


def gradients(model, x, y, loss) -> list[torch.Tensor]:
    return [u.mean(dim=0) for u in per_sample_blocks(model, x, y, loss)]


def take_step(opt, model, x, y, loss, loop="uniform") -> None:
    opt.zero_grad()
    if loop == "uniform":
        opt.backward(model(x), y)
    else:
        LOSSES[loss](model(x), y).backward()
    opt.step()


def step_direction(model, opt, x, y, loss, lr, loop="uniform") -> torch.Tensor:
    before = params_vector(model)
    take_step(opt, model, x, y, loss, loop)
    return -(params_vector(model) - before) / lr


# -- exactness ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_one_step_matches_dense_reference(name, float64):
    build, inputs, loss, k = CASES[name]
    model = build()
    x, y = inputs(6), target(loss, 6, k)
    us = per_sample_blocks(model, x, y, loss)
    expected = -0.3 * reference_direction(us, [u.mean(0) for u in us], 0.1)
    before = params_vector(model)
    opt = gramopt.SENG(model, 0.3, 0.1, loss=loss)
    take_step(opt, model, x, y, loss)
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-ce"])
def test_trajectory_with_curvature_every_2(name, float64):
    """Four steps on four batches: U from steps 0 and 2, reused on steps 1 and 3 with the
    current gradient (Algorithm 1)."""
    build, inputs, loss, k = CASES[name]
    model = build()
    batches = [(inputs(5), target(loss, 5, k)) for _ in range(4)]
    reference = copy.deepcopy(model)
    lr, damping = 0.5, 0.2
    opt = gramopt.SENG(model, lr, damping, curvature_every=2, loss=loss)
    us = None
    for t, (x, y) in enumerate(batches):
        if t % 2 == 0:
            us = per_sample_blocks(reference, x, y, loss)
        d = reference_direction(us, gradients(reference, x, y, loss), damping)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(params_vector(reference) - lr * d, reference.parameters())
        take_step(opt, model, x, y, loss)
        torch.testing.assert_close(
            params_vector(model), params_vector(reference), rtol=1e-8, atol=1e-11, msg=f"step {t}"
        )


def test_steps_between_refreshes_capture_nothing(float64):
    """With curvature_every > 1, the forward pass of a step that reuses the cached
    curvature saves no inputs and records no output-gradients; the trajectory is the same
    float for float as with capture on every step, also when a layer is frozen between
    refreshes (that layer's curvature is then rebuilt: it is captured)."""
    model = models.mlp(out=3)
    twin = copy.deepcopy(model)
    batches = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(7)]
    opt = gramopt.SENG(model, 0.3, 0.2, momentum=0.9, curvature_every=3)
    full = gramopt.SENG(twin, 0.3, 0.2, momentum=0.9, curvature_every=3)
    full.engine.capture_filter = None  # capture on every step
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    for t, (x, y) in enumerate(batches):
        if t == 4:  # between refreshes (3, 6): the layer's cached curvature covers the bias
            for m in (model, twin):
                next(layer for layer in m.modules() if isinstance(layer, nn.Linear)).bias.requires_grad_(False)
        for o, m in ((opt, model), (full, twin)):
            o.zero_grad()
            o.backward(m(x), y)
        calls = opt.engine._calls[id(first)]
        assert [c.skipped for c in calls] == [t % 3 != 0 and t != 4], t
        assert all(c.saved is None and not c.grads for c in calls if c.skipped)
        for o in (opt, full):
            o.step()
        torch.testing.assert_close(params_vector(model), params_vector(twin), rtol=0, atol=0, msg=f"step {t}")
    assert opt.steps_taken == len(batches)


def test_momentum_and_weight_decay_decorate_the_direction(float64):
    model = models.mlp(out=3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    lr, momentum, decay, damping = 0.4, 0.9, 0.05, 0.3
    opt = gramopt.SENG(model, lr, damping, momentum=momentum, weight_decay=decay, weight_decay_mode="decoupled")
    buffer = None
    for _ in range(3):
        us = per_sample_blocks(model, x, y, "cross_entropy")
        d = reference_direction(us, [u.mean(0) for u in us], damping)
        before = params_vector(model)
        buffer = d if buffer is None else momentum * buffer + d
        take_step(opt, model, x, y, "cross_entropy")
        torch.testing.assert_close(params_vector(model), before * (1 - lr * decay) - lr * buffer, rtol=1e-8, atol=1e-11)


def test_damping_schedule_is_evaluated_at_each_step(float64):
    model = models.mlp(out=3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    schedule = gramopt.DampingDecay(0.4, 0.5, every=1)
    opt = gramopt.SENG(model, 0.3, schedule)
    for step in range(3):
        us = per_sample_blocks(model, x, y, "cross_entropy")
        expected = reference_direction(us, [u.mean(0) for u in us], 0.4 * 0.5**step)
        torch.testing.assert_close(
            step_direction(model, opt, x, y, "cross_entropy", 0.3), expected, rtol=1e-8, atol=1e-11
        )
        assert opt.param_groups[0]["damping"] == pytest.approx(0.4 * 0.5**step)


# -- implicit layers ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-ce", "cnn-ce"])
@pytest.mark.parametrize("rank", [None, "full"])
def test_implicit_without_sampling_at_full_rank_equals_explicit(name, rank, float64):
    """Implicit factors (Eq. 15, exact product, no sketch) give the explicit direction;
    ``rank="full"`` compresses each conv layer's factors exactly by an SVD (r = the
    smaller factor side < kappa)."""
    build, inputs, loss, k = CASES[name]
    model = build()
    twin = copy.deepcopy(model)
    x, y = inputs(6), target(loss, 6, k)
    r = 5 if rank == "full" else None  # cnn: conv sides n_G = 4 and 5 (<= 5 < kappa)
    explicit = gramopt.SENG(model, 0.3, 0.1, loss=loss)
    implicit = gramopt.SENG(
        twin, 0.3, 0.1, loss=loss, implicit=gramopt.ImplicitConfig(threshold=1, rank=r, exact_product=True)
    )
    assert implicit.implicit_layers and not explicit.implicit_layers
    for _ in range(2):
        take_step(explicit, model, x, y, loss)
        take_step(implicit, twin, x, y, loss)
    kinds = {state["kind"] for state in implicit.extra_state["curvature"].values()}
    assert "implicit" in kinds
    torch.testing.assert_close(params_vector(twin), params_vector(model), rtol=1e-9, atol=1e-12)


def test_eq23_matches_its_formula(float64):
    """Eq. 23 against a literal evaluation, and its exact case (all G_i equal)."""
    b, r, n_g, n_a = 5, 3, 4, 6
    g, a, c = torch.randn(b, r, n_g), torch.randn(b, r, n_a), torch.randn(b)
    root = c.abs().sqrt()
    g_sum = sum(root[i] * g[i] for i in range(b))  # [r, n_G]
    a_sum = sum(c[i] / root.sum() * a[i] for i in range(b))  # [r, n_A]
    literal = sum(torch.outer(g_sum[j], a_sum[j]) for j in range(r))
    torch.testing.assert_close(eq23_product(c, g, a), literal, rtol=1e-12, atol=1e-12)
    exact = sum(c[i] * g[i].T @ a[i] for i in range(b))
    torch.testing.assert_close(exact_product(c, g, a), exact, rtol=1e-12, atol=1e-12)
    assert (eq23_product(c, g, a) - exact).norm() > 1e-3 * exact.norm(), "Eq. 23 is an approximation"
    same = g[:1].expand(b, r, n_g)
    torch.testing.assert_close(eq23_product(c, same, a), exact_product(c, same, a), rtol=1e-12, atol=1e-12)
    assert eq23_product(torch.zeros(b), g, a).abs().max() == 0


def test_implicit_direction_with_eq23_matches_its_formula(float64):
    """A two-layer MLP, all layers implicit with Eq. 23: beta from the exact Gram
    (Eq. 9, dense U from torch.func), then ``d = (g - C_U(beta)) / lam`` with C_U
    evaluated literally on ``u_i = z_i [x_i; 1]^T`` (z_i: autograd of sample i's loss
    with respect to the layer's output)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    b, lam, lr = 7, 0.2, 0.5
    us = per_sample_blocks(model, x, y, "cross_entropy")
    with torch.no_grad():
        hidden = torch.tanh(model[0](x))
    expected = []
    for index, (layer, u, xin) in enumerate(zip((model[0], model[2]), us, (x, hidden), strict=True)):
        zs = []
        for i in range(b):
            out = layer(xin[i : i + 1])
            logits = model[2](torch.tanh(out)) if index == 0 else out
            (z,) = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), out)
            zs.append(z[0])
        g_fac, a_fac = torch.stack(zs), torch.cat([xin, torch.ones(b, 1)], dim=1)  # [b, n_G], [b, n_A]
        torch.testing.assert_close(
            torch.einsum("bg,ba->bga", g_fac, a_fac)[:, :, :-1].reshape(b, -1), u[:, : -layer.out_features]
        )
        g = u.mean(0)
        beta = torch.linalg.solve(u @ u.T + b * lam * torch.eye(b), u @ g)
        root = beta.abs().sqrt()
        c_u = torch.outer((root[:, None] * g_fac).sum(0), (beta[:, None] / root.sum() * a_fac).sum(0))
        flat = torch.cat([c_u[:, :-1].reshape(-1), c_u[:, -1]])  # weight, then bias
        expected.append((g - flat) / lam)
    before = params_vector(model)
    opt = gramopt.SENG(model, lr, lam, implicit=gramopt.ImplicitConfig(threshold=1))
    take_step(opt, model, x, y, "cross_entropy")
    torch.testing.assert_close(-(params_vector(model) - before) / lr, torch.cat(expected), rtol=1e-8, atol=1e-11)


def test_truncated_factors_are_the_svd_truncation(float64):
    """Eq. 15 with footnote 1: rank-r factors reproduce ``Q_r S_r P_r^T A_i`` (the SVD of
    the smaller factor, computed here by numpy), and are exact from r = that side on."""
    g, a = torch.randn(3, 9, 4), torch.randn(3, 9, 6)  # kappa = 9 positions, n_G = 4 < n_A = 6
    g2, a2 = truncate(g, a, 2)
    assert g2.shape == (3, 2, 4) and a2.shape == (3, 2, 6)
    for i in range(3):
        p, s, qh = (torch.from_numpy(t) for t in __import__("numpy").linalg.svd(g[i].numpy(), full_matrices=False))
        best = qh[:2].T @ torch.diag(s[:2]) @ p[:, :2].T @ a[i]
        torch.testing.assert_close(g2[i].T @ a2[i], best, rtol=1e-10, atol=1e-12)
    g4, a4 = truncate(g, a, 4)
    torch.testing.assert_close(
        torch.einsum("brg,bra->bga", g4, a4), torch.einsum("brg,bra->bga", g, a), rtol=1e-10, atol=1e-12
    )
    gs, as_ = truncate(torch.randn(3, 9, 7), a, 3)  # A is the smaller side now
    assert gs.shape == (3, 3, 7) and as_.shape == (3, 3, 6)


# -- sketches -------------------------------------------------------------------------
def sketch_errors(config_of, sizes, seeds, implicit=None):
    """Median over seeds of ||d_sketch - d|| / ||d|| per sketch size (fixed batch)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = torch.randn(16, 20), torch.randint(0, 10, (16,))
    us = per_sample_blocks(model, x, y, "cross_entropy")
    exact = reference_direction(us, [u.mean(0) for u in us], 0.05)
    medians = []
    for size in sizes:
        errors = []
        for seed in seeds:
            twin = copy.deepcopy(model)
            opt = gramopt.SENG(twin, 1.0, 0.05, sketch=config_of(size, seed), implicit=implicit)
            d = step_direction(twin, opt, x, y, "cross_entropy", 1.0)
            errors.append(float((d - exact).norm() / exact.norm()))
        medians.append(statistics.median(errors))
    return medians


@pytest.mark.parametrize("sampling", ["uniform", "leverage"])
def test_explicit_sketch_error_shrinks_with_size(sampling, float64):
    """Eq. 11-14: median direction error over 15 seeds falls as q grows; uniform
    sampling of every coordinate (q = p, a permutation) is exact."""
    sizes = [1 / 16, 1 / 4, 1.0]
    medians = sketch_errors(
        lambda q, seed: gramopt.SketchConfig(size=q, sampling=sampling, seed=seed), sizes, range(15)
    )
    assert medians[0] > medians[1] > medians[2], medians
    assert medians[0] > 0.05, medians  # the small sketch does change the direction
    if sampling == "uniform":
        assert medians[2] < 1e-10, medians


@pytest.mark.parametrize("sampling", ["uniform", "leverage"])
def test_factor_sketch_error_shrinks_with_size(sampling, float64):
    """Eq. 17, 19, 21 (implicit layers, exact product so the sketch is the only error)."""
    sizes = [0.25, 0.5, 1.0]
    implicit = gramopt.ImplicitConfig(threshold=1, exact_product=True)
    medians = sketch_errors(
        lambda f, seed: gramopt.SketchConfig(factor_size=f, sampling=sampling, seed=seed), sizes, range(15), implicit
    )
    assert medians[0] > medians[1] > medians[2], medians
    assert medians[0] > 0.05, medians
    if sampling == "uniform":
        assert medians[2] < 1e-10, medians


def test_row_sample_is_eq14(float64):
    gen = torch.Generator().manual_seed(0)
    perm = RowSampleSketch(6, 6, generator=gen).dense()
    torch.testing.assert_close(perm.T @ perm, torch.eye(6))
    weights = torch.tensor([4.0, 1.0, 0.0, 3.0, 2.0])
    omega = RowSampleSketch(3, 5, sampling="leverage", weights=weights, generator=gen)
    p = weights / weights.sum()
    torch.testing.assert_close(omega.scale, 1 / torch.sqrt(3 * p[omega.index]))
    assert 2 not in omega.index.tolist()
    draws = [RowSampleSketch(3, 5, sampling="leverage", weights=weights, generator=gen).dense() for _ in range(4000)]
    mean = sum(o.T @ o for o in draws) / len(draws)
    expected = torch.diag(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(mean, expected, atol=0.12, rtol=0)  # E[Omega^T Omega] = I on the support
    zero = RowSampleSketch(2, 4, sampling="leverage", weights=torch.zeros(4), generator=gen)  # no mass: uniform
    torch.testing.assert_close(zero.scale, torch.full((2,), 2**0.5))


def test_kronecker_row_sketch_is_the_sketch_of_the_vectors(float64):
    """Eq. 19 and 21 on row-sampled factors equal (Omega_G (x) Omega_A) applied to the
    explicit vec(G_i^T A_i)."""
    gen = torch.Generator().manual_seed(1)
    b, r, n_g, n_a = 4, 3, 7, 5
    g, a, m = torch.randn(b, r, n_g), torch.randn(b, r, n_a), torch.randn(n_g, n_a)
    sketch = KroneckerSketch(
        RowSampleSketch(4, n_g, sampling="leverage", weights=g.pow(2).sum((0, 1)), generator=gen),
        RowSampleSketch(3, n_a, generator=gen),
    )
    omega = torch.kron(sketch.grads.dense(), sketch.inputs.dense())  # row-major vec
    u = torch.einsum("brg,bra->bga", g, a).reshape(b, -1) @ omega.T
    xi_a, xi_g, xi_z = sketch.sketch_inputs(a), sketch.sketch_grads(g), sketch.sketch_matrix(m)
    torch.testing.assert_close(((xi_a @ xi_z.T) * xi_g).sum(dim=(1, 2)), u @ (omega @ m.reshape(-1)))
    torch.testing.assert_close(factor_gram(xi_a, xi_g), u @ u.T)


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (4, 2, 50, 50), (5, 1, 6, 3)])
def test_factor_gram_forms_agree_with_dense(shape, float64):
    b, r, n_a, n_g = shape  # explicit vectors, rank pairs, Khatri-Rao (r = 1)
    a, g = torch.randn(b, r, n_a), torch.randn(b, r, n_g)
    u = torch.einsum("brg,bra->bga", g, a).reshape(b, -1)
    torch.testing.assert_close(factor_gram(a, g), u @ u.T)


@pytest.mark.parametrize("name", ["mlp-ce", "cnn-ce", "transformer-ce"])
def test_sampled_columns_and_weights_from_factors(name, float64):
    """The row-sampling pieces computed from the capture engine's factors (never forming
    U for Linear/Conv layers) against the explicit per-sample gradients."""
    from gramopt.capture import CaptureEngine

    build, inputs, loss, k = CASES[name]
    model = build()
    engine = CaptureEngine(model, model.parameters())
    LOSSES[loss](model(inputs(5)), target(loss, 5, k)).backward()
    factors = engine.factors(scale=5.0)
    engine.close()
    for layer, factor in factors.items():
        u = factor.per_sample()
        index = torch.randint(0, u.shape[1], (11,))
        for form in (factor, factor.compact()):
            torch.testing.assert_close(form.columns(index), u[:, index], msg=layer)
            torch.testing.assert_close(form.column_norms(), u.pow(2).sum(0), msg=layer)
        held = factor.num_rows * factor.num_params
        assert isinstance(factor.compact(), gramopt.ExplicitFactors) == (held <= _factor_numel(factor)), layer


def _factor_numel(factor) -> float:
    if isinstance(factor, gramopt.ExplicitFactors):
        return float("inf")
    first = factor.inputs if hasattr(factor, "inputs") else factor.indices
    return first.numel() + factor.grads.numel()


# -- both loops, state, schedules -------------------------------------------------------
LOOP_CONFIGS = {
    "exact": dict(),
    "sketched": dict(sketch=gramopt.SketchConfig(size=0.5, sampling="leverage", factor_size=0.6, seed=4),
                     implicit=gramopt.ImplicitConfig(threshold=60, rank=2)),
}


@pytest.mark.parametrize("config", sorted(LOOP_CONFIGS))
@pytest.mark.parametrize("name", ["mlp-ce", "cnn-ce"])
def test_both_loops_are_identical(name, config):
    build, inputs, loss, k = CASES[name]
    model = build()
    twin = copy.deepcopy(model)
    batches = [(inputs(8), target(loss, 8, k)) for _ in range(3)]
    opts = [
        gramopt.SENG(m, 0.2, 0.3, momentum=0.5, curvature_every=2, loss=loss, **LOOP_CONFIGS[config])
        for m in (model, twin)
    ]
    for x, y in batches:
        take_step(opts[0], model, x, y, loss, "uniform")
        take_step(opts[1], twin, x, y, loss, "ordinary")
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip_bit_for_bit():
    """Curvature cache, sketch generator and step survive torch.save / load: a restored
    optimizer continues exactly (mid-period, then through a refresh)."""
    def make(model, seed):
        return gramopt.SENG(
            model, 0.1, gramopt.DampingDecay(0.5, 0.8, every=1), momentum=0.9, curvature_every=3,
            sketch=gramopt.SketchConfig(size=0.5, sampling="leverage", factor_size=0.5, seed=seed),
            implicit=gramopt.ImplicitConfig(threshold=40, rank=3),
        )

    model = models.cnn(out=3)
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(5)]
    opt = make(model, 3)
    for x, y in batches[:2]:
        take_step(opt, model, x, y, "cross_entropy")
    assert {s["kind"] for s in opt.extra_state["curvature"].values()} == {"explicit", "implicit"}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # no callable inside: the damping schedule is not saved
    buffer.seek(0)
    clone = models.cnn(out=3)
    clone.load_state_dict(model.state_dict())
    other = make(clone, 99)
    other.load_state_dict(torch.load(buffer, weights_only=True))  # what gramopt train loads
    assert other.steps_taken == 2
    saved, restored = opt.state_dict()["gramopt"], other.state_dict()["gramopt"]
    assert torch.equal(saved["sketch_rng"], restored["sketch_rng"])
    for layer, state in saved["curvature"].items():
        for key, value in state.items():
            same = (
                torch.equal(value, restored["curvature"][layer][key])
                if torch.is_tensor(value)
                else value == restored["curvature"][layer][key]
            )
            assert same, (layer, key)
    for x, y in batches[2:]:
        take_step(opt, model, x, y, "cross_entropy")
        take_step(other, clone, x, y, "cross_entropy")
        for p, q in zip(model.parameters(), clone.parameters(), strict=True):
            assert torch.equal(p, q)


def test_schedules():
    warm = gramopt.WarmupPolyDecay(warmup=5, total=60, power=6, start_factor=0.01 / 0.3)
    assert warm(0) == pytest.approx(0.01 / 0.3)
    assert warm(5) == pytest.approx(1.0)
    assert warm(4) < warm(5) and warm(6) < warm(5)
    assert warm(32) == pytest.approx((1 - 27 / 55) ** 6)
    assert warm(60) == 0 and warm(70) == 0
    exp = gramopt.WarmupPolyDecay(warmup=0, total=80, power=4)
    assert exp(20) == pytest.approx(0.75**4)
    model = models.mlp(out=3)
    opt = gramopt.SENG(model, 0.3, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warm)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    for _ in range(5):
        take_step(opt, model, x, y, "cross_entropy")
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
    saved = scheduler.state_dict()["lr_lambdas"][0]  # a dataclass: its fields are saved
    assert saved == dict(warmup=5, total=60, power=6, start_factor=0.01 / 0.3)
    decay = gramopt.DampingDecay(0.17, 0.9, every=10, steps_per_epoch=4)
    assert (
        decay(3) == pytest.approx(0.17)
        and decay(40) == pytest.approx(0.17 * 0.9)
        and decay(200) == pytest.approx(0.17 * 0.9**5)
    )
    for bad in (
        dict(warmup=5, total=5, power=1),
        dict(warmup=0, total=10, power=-1),
        dict(warmup=0, total=10, power=1, start_factor=2),
    ):
        with pytest.raises(ValueError):
            gramopt.WarmupPolyDecay(**bad)
    for bad in (
        dict(initial=0, factor=0.9),
        dict(initial=1, factor=1.5),
        dict(initial=1, factor=0.9, steps_per_epoch=0),
    ):
        with pytest.raises(ValueError):
            gramopt.DampingDecay(**bad)


# -- errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "needs size"),
        (dict(size=0), "size must be >= 1"),
        (dict(size=1.5), r"fraction must lie in \(0, 1\]"),
        (dict(size="big"), "must be an int"),
        (dict(size=4, sampling="gaussian"), "sampling must be one of"),
        (dict(size=4, seed=1.5), "seed must be an int"),
    ],
)
def test_bad_sketch_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gramopt.SketchConfig(**kwargs)


def test_bad_implicit_configs_are_refused():
    for kwargs in (dict(threshold=0), dict(rank=0), dict(rank=1.5), dict(exact_product=1)):
        with pytest.raises(ValueError, match="ImplicitConfig"):
            gramopt.ImplicitConfig(**kwargs)


def snapshot(model, opt):
    return params_vector(model), copy.deepcopy(opt.state_dict())


def assert_unchanged(before, model, opt):
    params, state = before
    assert torch.equal(params_vector(model), params)
    now = opt.state_dict()
    assert now["gramopt"]["step"] == state["gramopt"]["step"]
    assert now["gramopt"].keys() == state["gramopt"].keys()
    assert now["gramopt"]["curvature"].keys() == state["gramopt"]["curvature"].keys()
    for layer, cached in state["gramopt"]["curvature"].items():
        for key, value in cached.items():
            if torch.is_tensor(value):
                assert torch.equal(value, now["gramopt"]["curvature"][layer][key])
    if "sketch_rng" in state["gramopt"]:
        assert torch.equal(now["gramopt"]["sketch_rng"], state["gramopt"]["sketch_rng"])
    assert now["state"].keys() == state["state"].keys()


@pytest.mark.parametrize("loop", ["uniform", "ordinary"])
def test_non_finite_loss_changes_nothing(loop):
    model = models.mlp(out=3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    opt = gramopt.SENG(model, 0.1, 0.1, momentum=0.9, curvature_every=2, sketch=gramopt.SketchConfig(size=0.5, seed=0))
    take_step(opt, model, x, y, "cross_entropy")
    before = snapshot(model, opt)
    bad = x.clone()
    bad[0, 0] = float("nan")
    opt.zero_grad()
    with pytest.raises(gramopt.NonFiniteError, match="nothing was changed"):
        if loop == "uniform":
            opt.backward(model(bad), y)
        else:
            F.cross_entropy(model(bad), y).backward()
            opt.step()
    assert_unchanged(before, model, opt)
    reference = copy.deepcopy(model)
    take_step(opt, model, x, y, "cross_entropy")  # carries on normally, no leftovers
    assert opt.steps_taken == 2 and not torch.equal(params_vector(model), params_vector(reference))


def test_damping_schedule_failing_mid_run_changes_nothing():
    model = models.mlp(out=3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    opt = gramopt.SENG(model, 0.1, lambda step: 0.1 if step < 1 else -1.0)
    take_step(opt, model, x, y, "cross_entropy")
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="at step 1"):
        take_step(opt, model, x, y, "cross_entropy")
    assert_unchanged(before, model, opt)


def test_step_needs_a_backward_pass():
    model = models.mlp(out=3)
    opt = gramopt.SENG(model, 0.1, 0.1)
    with pytest.raises(gramopt.CaptureError, match="no gradient"):
        opt.step()
    with torch.no_grad():
        model(torch.randn(4, 5))
    for p in model.parameters():  # gradients without captured per-sample gradients
        p.grad = torch.zeros_like(p)
    with pytest.raises(gramopt.CaptureError, match="per-sample gradients"):
        opt.step()


# -- registry and tasks ---------------------------------------------------------------
def test_registered_with_defaults_for_every_task():
    from gramopt.tasks import TASKS

    spec = OPTIMIZERS["seng"]
    assert set(spec.defaults) == {"lr", "damping", "momentum", "weight_decay", "curvature_every"}
    for task in TASKS.values():
        assert set(task_hyper(task, "seng")) <= set(spec.defaults), task.name
    model = models.mlp(out=3)
    opt = build_optimizer("seng", model, "cross_entropy", {"curvature_every": 5})
    assert isinstance(opt, gramopt.SENG) and opt.curvature_every == 5
    loss = training_step(opt, model, "cross_entropy", torch.randn(8, 5), torch.randint(0, 3, (8,)))
    assert torch.isfinite(loss) and opt.steps_taken == 1


def test_conv_layer_kept_as_its_inputs_and_gradients(float64):
    """A conv layer whose per-sample gradients are larger than its input and
    output-gradients is cached as those (``form="conv"``), and the steps that reuse it
    match the dense reference."""
    model = nn.Sequential(nn.Conv2d(2, 16, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 3 * 3, 3))
    batches = [(torch.randn(4, 2, 7, 7), torch.randint(0, 3, (4,))) for _ in range(2)]
    reference = copy.deepcopy(model)
    opt = gramopt.SENG(model, 0.5, 0.2, curvature_every=2)
    us = per_sample_blocks(reference, *batches[0], "cross_entropy")
    for t, (x, y) in enumerate(batches):
        d = reference_direction(us, gradients(reference, x, y, "cross_entropy"), 0.2)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(params_vector(reference) - 0.5 * d, reference.parameters())
        take_step(opt, model, x, y, "cross_entropy")
        if t == 0:
            assert opt.extra_state["curvature"]["0"]["form"] == "conv"
        torch.testing.assert_close(params_vector(model), params_vector(reference), rtol=1e-8, atol=1e-11)


def test_unsupported_modules_left_to_the_gradient(float64):
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"1 \(Scale\)"):
        gramopt.SENG(model, 0.1, 0.1, unsupported="error")
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    blocks = [[model[0].weight, model[0].bias], [model[3].weight, model[3].bias]]
    hookless = copy.deepcopy(model)
    us = [
        per_sample_grads(hookless, x, y, F.cross_entropy, params=[dict(hookless.named_parameters())[n] for n in names])
        for names in (["0.weight", "0.bias"], ["3.weight", "3.bias"])
    ]
    expected = reference_direction(us, [u.mean(0) for u in us], 0.1)
    opt = gramopt.SENG(model, 0.5, 0.1, unsupported="gradient")
    scale = model[1].s.detach().clone()
    before = torch.cat([p.detach().reshape(-1) for block in blocks for p in block])
    opt.zero_grad()
    opt.backward(model(x), y)
    grad = model[1].s.grad.clone()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for block in blocks for p in block])
    torch.testing.assert_close(model[1].s.detach(), scale - 0.5 * grad)
    torch.testing.assert_close(after - before, -0.5 * expected, rtol=1e-8, atol=1e-11)
    assert opt.last_info.step == 1 and opt.last_info.loss is not None and opt.last_info.solve.method == "cholesky"
