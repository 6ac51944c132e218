"""The papers' forms (issue 18), each against a dense float64 reference built with
torch.func: FNGD's coefficient sharing by default (``opt.sharing``), FNGD's absolute
damping (lam = damping, Theorem 1 of Ou et al., arXiv:2403.03473) next to the relative
one (Eq. 14), and coupled L2 weight decay (the gradient of loss + (wd/2)||p||^2,
preconditioned) in FNGD and SENG.

The references precondition the gradient of the regularized mean loss with the
empirical Fisher of the data loss, layer by layer, by dense p x p solves: no
Sherman-Morrison-Woodbury, no capture engine.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import gramopt
import models
from gramopt.optim.fngd import DEFAULT_COEFFICIENT_STEPS
from reference import fngd_blocks, named_trainable, params_vector, per_sample_grads, sample_loss_fn

CASES = {
    "mlp": (lambda: models.mlp(out=3), lambda b: torch.randn(b, 5)),
    "cnn": (lambda: models.cnn(out=3), lambda b: torch.randn(b, 1, 8, 8)),
}


def batch(name: str, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return CASES[name][1](b), torch.randint(0, 3, (b,))


def regularized_gradient(model: nn.Module, x, y, decay: float) -> dict[int, torch.Tensor]:
    """Gradient of mean cross-entropy + (decay/2) ||theta||^2, per parameter (by id)."""
    theta = named_trainable(model)

    def objective(t: dict[str, torch.Tensor]) -> torch.Tensor:
        data = F.cross_entropy(functional_call(model, t, (x,)), y)
        return data + 0.5 * decay * sum((v**2).sum() for v in t.values())

    g = grad(objective)(theta)
    by_name = dict(model.named_parameters())
    return {id(by_name[n]): g[n] for n in theta}


def preconditioned(u: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """``(U^T U / M + lam I)^{-1} g`` by a dense ``[p, p]`` solve."""
    m, p = u.shape
    fisher = u.T @ u / m
    return torch.linalg.solve(fisher + lam * torch.eye(p, dtype=u.dtype), g)


def flat(params, values: dict[int, torch.Tensor]) -> torch.Tensor:
    return torch.cat([values[id(p)].reshape(-1) for p in params])


def fngd_reference_delta(model, x, y, lr, damping, mode, decay) -> torch.Tensor:
    """-lr lam (lam I + F_l)^{-1} (g_l + decay p_l) per Linear/Conv layer (1/lam folded into
    lr), lam = damping ||U_l U_l^T||_F (relative) or damping (absolute); the other
    parameters take g + decay p."""
    model = copy.deepcopy(model)
    blocks, plain = fngd_blocks(model)
    g = regularized_gradient(model, x, y, decay)
    out: dict[int, torch.Tensor] = {}
    for params in blocks:
        u = per_sample_grads(model, x, y, sample_loss_fn("cross_entropy"), params=params)
        lam = damping * float(torch.linalg.matrix_norm(u.detach() @ u.detach().T)) if mode == "relative" else damping
        d, start = lam * preconditioned(u, flat(params, g), lam), 0
        for p in params:
            out[id(p)] = d[start : start + p.numel()].view_as(p)
            start += p.numel()
    for p in plain:
        out[id(p)] = g[id(p)]
    return -lr * torch.cat([out[id(p)].reshape(-1) for p in model.parameters() if p.requires_grad])


def step(opt, model, x, y) -> None:
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()


# -- FNGD: sharing by default --------------------------------------------------------------
def test_fngd_shares_by_default_and_none_is_the_ablation():
    model = models.mlp(out=3)
    default = gramopt.FNGD(model, lr=0.1, damping=1e-3)
    assert default.sharing is True and default.coefficient_steps == DEFAULT_COEFFICIENT_STEPS == 100
    assert isinstance(default.coefficient_steps, int)
    with pytest.raises(AttributeError):
        default.sharing = False  # read-only
    default.close()
    given = gramopt.FNGD(model, lr=0.1, damping=1e-3, coefficient_steps=7)
    assert given.sharing and given.coefficient_steps == 7
    given.close()
    ablation = gramopt.FNGD(model, lr=0.1, damping=1e-3, coefficient_steps=None)
    assert ablation.sharing is False and ablation.coefficient_steps is None and ablation.phase == "estimate"
    ablation.close()


def test_fngd_switches_to_sharing_after_the_default_steps(float64):
    model = models.mlp(out=3)
    opt = gramopt.FNGD(model, lr=0.05, damping=1e-2)
    for i in range(DEFAULT_COEFFICIENT_STEPS + 1):
        assert opt.phase == ("estimate" if i < DEFAULT_COEFFICIENT_STEPS else "share")
        step(opt, model, *batch("mlp", 4))
    assert set(opt.extra_state["coefficient_counts"].values()) == {DEFAULT_COEFFICIENT_STEPS}


def test_the_registry_gives_fngd_one_epoch_of_estimation():
    from gramopt.training.registry import build_optimizer, with_epoch_defaults

    hyper = with_epoch_defaults("fngd", {}, 13)
    opt = build_optimizer("fngd", models.mlp(out=3), "cross_entropy", hyper)
    assert opt.coefficient_steps == 13 and opt.sharing
    plain = build_optimizer("fngd", models.mlp(out=3), "cross_entropy", {})  # no epoch known: the class default
    assert plain.coefficient_steps == DEFAULT_COEFFICIENT_STEPS
    opt.close()
    plain.close()


# -- FNGD: damping modes and L2 weight decay, one estimation step ------------------------------
@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("mode,damping", [("relative", 0.05), ("absolute", 0.3), ("absolute", 1e-4)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fngd_step_matches_the_dense_reference(name, mode, damping, decay, float64):
    model = CASES[name][0]()
    x, y = batch(name, 6)
    expected = fngd_reference_delta(model, x, y, 0.3, damping, mode, decay)
    before = params_vector(model)
    opt = gramopt.FNGD(model, lr=0.3, damping=damping, weight_decay=decay, damping_mode=mode, weight_decay_mode="l2")
    step(opt, model, x, y)
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-8, atol=1e-11)


def test_fngd_absolute_and_relative_damping_differ_and_agree_at_the_matching_lambda(float64):
    """Absolute damping lam equals relative damping lam / ||K||_F on a one-layer model."""
    model = nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    u = per_sample_grads(model, x, y, sample_loss_fn("cross_entropy"))
    norm = float(torch.linalg.matrix_norm(u @ u.T))
    deltas = {}
    for mode, damping in [("relative", 0.01), ("absolute", 0.01 * norm), ("absolute", 0.01)]:
        m = copy.deepcopy(model)
        before = params_vector(m)
        opt = gramopt.FNGD(m, lr=0.5, damping=damping, damping_mode=mode)
        step(opt, m, x, y)
        deltas[(mode, damping)] = params_vector(m) - before
    a, b, c = deltas.values()
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(a, c)


def test_fngd_rejects_unknown_modes():
    model = models.mlp(out=3)
    with pytest.raises(ValueError, match="damping_mode"):
        gramopt.FNGD(model, lr=0.1, damping=1e-3, damping_mode="constant")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        gramopt.FNGD(model, lr=0.1, damping=1e-3, weight_decay_mode="coupled")
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_fngd_l2_while_sharing_adds_the_unpreconditioned_term(float64):
    """Sharing with L2: the shared-coefficient step plus lr * wd * p (no Gram, no solve)."""
    model = models.mlp(out=3)
    twin = copy.deepcopy(model)
    decay = 0.1
    l2 = gramopt.FNGD(model, lr=0.2, damping=0.05, weight_decay=decay, coefficient_steps=1)
    plain = gramopt.FNGD(twin, lr=0.2, damping=0.05, coefficient_steps=1)
    x, y = batch("mlp", 6)
    step(l2, model, x, y)
    step(plain, twin, x, y)
    # same coefficients (L2 does not change v); now take a shared step from the same point
    for name, v in l2.extra_state["coefficients"].items():
        torch.testing.assert_close(v, plain.extra_state["coefficients"][name])
    twin.load_state_dict(model.state_dict())
    x, y = batch("mlp", 6)
    before = params_vector(model)
    step(l2, model, x, y)
    step(plain, twin, x, y)
    torch.testing.assert_close(params_vector(model), params_vector(twin) - 0.2 * decay * before, rtol=1e-10, atol=1e-13)


def test_fngd_decoupled_weight_decay_is_the_shrink_next_to_the_step(float64):
    model = models.mlp(out=3)
    twin = copy.deepcopy(model)
    x, y = batch("mlp", 6)
    before = params_vector(model)
    step(gramopt.FNGD(model, lr=0.2, damping=0.05, weight_decay=0.1, weight_decay_mode="decoupled"), model, x, y)
    step(gramopt.FNGD(twin, lr=0.2, damping=0.05), twin, x, y)
    torch.testing.assert_close(params_vector(model), params_vector(twin) - 0.2 * 0.1 * before, rtol=1e-10, atol=1e-13)


# -- SENG: L2 weight decay ---------------------------------------------------------------------
def seng_reference_delta(model, x, y, lr, damping, decay) -> torch.Tensor:
    """-lr (F_l + damping I)^{-1} (g_l + decay p_l) per layer (every parameterized module)."""
    model = copy.deepcopy(model)
    g = regularized_gradient(model, x, y, decay)
    out = []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            u = per_sample_grads(model, x, y, sample_loss_fn("cross_entropy"), params=params)
            out.append(preconditioned(u, flat(params, g), damping))
    return -lr * torch.cat(out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_seng_l2_step_matches_the_dense_reference(name, float64):
    model = CASES[name][0]()
    x, y = batch(name, 6)
    expected = seng_reference_delta(model, x, y, 0.3, 0.2, 0.1)
    before = params_vector(model)
    opt = gramopt.SENG(model, lr=0.3, damping=0.2, weight_decay=0.1)
    assert opt.weight_decay_mode == "l2"
    step(opt, model, x, y)
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-8, atol=1e-11)


def test_ggn_weight_decay_is_decoupled_only():
    opt = gramopt.GGN(models.mlp(out=1), lr=0.5, damping=0.1, weight_decay=0.01, loss="mse")
    assert opt.weight_decay_mode == "decoupled" and opt.needs.weight_decay_modes == ("decoupled",)
    opt.close()
