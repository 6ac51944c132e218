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
from gramopt.linalg.kron_sketch import KroneckerRowSketch, RowSample, factor_gram
from gramopt.optim.seng_layers import eq23_product, exact_product, truncate
from gramopt.training.optimizers import OPTIMIZERS, build_optimizer, training_step
from reference import params_vector, per_sample_grads

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
CASES = {
    "mlp-ce": (lambda: models.mlp(out=3), lambda b: torch.randn(b, 5), "cross_entropy", 3),
    "mlp-mse": (lambda: models.mlp(out=2), lambda b: torch.randn(b, 5), "mse", 2),
    "cnn-ce": (lambda: models.cnn(out=3), lambda b: torch.randn(b, 1, 8, 8), "cross_entropy", 3),
    "transformer-ce": (lambda: models.TinyTransformer(out=3), lambda b: torch.randint(0, 11, (b, 5)), "cross_entropy", 3),
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
    return [per_sample_grads(model, x, y, LOSSES[loss], params=block) for block in layer_params(model)]


def reference_direction(us: list[torch.Tensor], gs: list[torch.Tensor], damping: float) -> torch.Tensor:
    """``d_l = (U_l^T U_l / b + damping I)^{-1} g_l``, concatenated in parameter order."""
    out = []
    for u, g in zip(us, gs):
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
        torch.testing.assert_close(params_vector(model), params_vector(reference), rtol=1e-8, atol=1e-11, msg=f"step {t}")


def test_momentum_and_weight_decay_decorate_the_direction(float64):
    model = models.mlp(out=3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    lr, momentum, decay, damping = 0.4, 0.9, 0.05, 0.3
    opt = gramopt.SENG(model, lr, damping, momentum=momentum, weight_decay=decay)
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
        torch.testing.assert_close(step_direction(model, opt, x, y, "cross_entropy", 0.3), expected, rtol=1e-8, atol=1e-11)
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
    implicit = gramopt.SENG(twin, 0.3, 0.1, loss=loss, implicit=gramopt.ImplicitConfig(threshold=1, rank=r, exact_product=True))
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
    for index, (layer, u, xin) in enumerate(zip((model[0], model[2]), us, (x, hidden))):
        zs = []
        for i in range(b):
            out = layer(xin[i : i + 1])
            logits = model[2](torch.tanh(out)) if index == 0 else out
            (z,) = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), out)
            zs.append(z[0])
        g_fac, a_fac = torch.stack(zs), torch.cat([xin, torch.ones(b, 1)], dim=1)  # [b, n_G], [b, n_A]
        torch.testing.assert_close(torch.einsum("bg,ba->bga", g_fac, a_fac)[:, :, :-1].reshape(b, -1), u[:, : -layer.out_features])
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
    torch.testing.assert_close(torch.einsum("brg,bra->bga", g4, a4), torch.einsum("brg,bra->bga", g, a), rtol=1e-10, atol=1e-12)
    gs, as_ = truncate(torch.randn(3, 9, 7), a, 3)  # A is the smaller side now
    assert gs.shape == (3, 3, 7) and as_.shape == (3, 3, 6)
