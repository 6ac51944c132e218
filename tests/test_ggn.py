"""GGN steps against dense float64 references (torch.func jacrev + linalg.solve), a
cross-check against curvlinops' GGN, and the paper's Theorem 1."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gramopt
import models
from reference import ggn_delta, params_vector

CASES = {
    "mlp-k1": (lambda: models.mlp(out=1), lambda b: torch.randn(b, 5), "mse", 1),
    "mlp-k3": (lambda: models.mlp(out=3), lambda b: torch.randn(b, 5), "mse", 3),
    "cnn": (lambda: models.cnn(out=2), lambda b: torch.randn(b, 1, 8, 8), "mse", 2),
    "layernorm": (lambda: models.layernorm_net(out=2), lambda b: torch.randn(b, 6), "mse", 2),
    "mlp-ce": (lambda: models.mlp(out=4), lambda b: torch.randn(b, 5), "cross_entropy", 4),
    "cnn-ce": (lambda: models.cnn(out=3), lambda b: torch.randn(b, 1, 8, 8), "cross_entropy", 3),
    "transformer-ce": (
        lambda: models.TinyTransformer(out=3),
        lambda b: torch.randint(0, 11, (b, 5)),
        "cross_entropy",
        3,
    ),
}


def make_target(loss: str, b: int, k: int) -> torch.Tensor:
    return torch.randn(b, k) if loss == "mse" else torch.randint(0, k, (b,))


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_matches_dense_reference(name, float64):
    build, inputs, loss, k = CASES[name]
    model = build()
    x, y = inputs(6), make_target(loss, 6, k)
    expected = ggn_delta(model, x, y, loss, lr=0.7, damping=0.1)
    before = params_vector(model)
    opt = gramopt.GGN(model, lr=0.7, damping=0.1, loss=loss, curvature="exact")  # (cross-entropy's default is "top")
    opt.zero_grad()
    opt.backward(model(x), y)
    opt.step()
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-8, atol=1e-10)


def test_scalar_outputs_without_feature_dim(float64):
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0))
    x, y = torch.randn(7, 3), torch.randn(7)
    expected = ggn_delta(model, x, y, "mse", lr=1.0, damping=0.01)
    before = params_vector(model)
    opt = gramopt.GGN(model, lr=1.0, damping=0.01, damping_adaptation=None)
    opt.backward(model(x), y)
    opt.step()
    torch.testing.assert_close(params_vector(model) - before, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_backward_returns_the_loss_and_fills_grad(loss, float64):
    """The returned loss is the usual mean loss; plain-gradient parameters get the loss
    gradient on every backward, the preconditioned layers until the first step (their step
    comes from the factors; that .grad is there to report clipping, tests/test_clipping.py)."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.tensor([1.5]))

        def forward(self, x):
            return x * self.s

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(5, 7), Scale(), nn.Tanh(), nn.Linear(7, 3))

    model, reference = build(), build()
    x, y = torch.randn(6, 5), make_target(loss, 6, 3)
    fn = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    expected_loss = fn(reference(x), y)
    expected_loss.backward()
    opt = gramopt.GGN(model, loss=loss, damping=0.1, unsupported="gradient")
    value = opt.backward(model(x), y)
    torch.testing.assert_close(value, expected_loss.detach())
    torch.testing.assert_close(model[1].s.grad, reference[1].s.grad, rtol=1e-10, atol=1e-12)
    # the preconditioned layers' .grad: filled until the first step (for the clipping check)
    for m, r in ((model[0], reference[0]), (model[3], reference[3])):
        for p, q in zip(m.parameters(), r.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    opt.step()
    opt.zero_grad()
    opt.backward(model(x), y)
    assert all(p.grad is None for m in (model[0], model[3]) for p in m.parameters())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_matches_curvlinops_ggn(loss, float64):
    """Independent peer: (GGN_sum/c + damping I) d = grad_sum/c with curvlinops' GGN,
    where c = 2 for MSELoss(sum) (H = 2I) and 1 for CrossEntropyLoss(sum)."""
    curvlinops = pytest.importorskip("curvlinops")
    model = models.mlp(out=3)
    x, y = torch.randn(8, 5), make_target(loss, 8, 3)
    lr, damping = 0.5, 0.05
    loss_fn = nn.MSELoss(reduction="sum") if loss == "mse" else nn.CrossEntropyLoss(reduction="sum")
    c = 2.0 if loss == "mse" else 1.0
    frozen = copy.deepcopy(model)  # curvlinops evaluates lazily: keep the pre-step point
    params = list(frozen.parameters())
    ggn = curvlinops.GGNLinearOperator(frozen, loss_fn, params, [(x, y)])
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(frozen(x), y), params)])
    before = params_vector(model)
    opt = gramopt.GGN(model, lr=lr, damping=damping, loss=loss)
    opt.backward(model(x), y)
    opt.step()
    d = -(params_vector(model) - before) / lr
    torch.testing.assert_close((ggn @ d) / c + damping * d, grad / c, rtol=1e-7, atol=1e-9)


def test_theorem1_quadratic_convergence(float64):
    """Full-batch GGN with damping 0 on a wide two-layer tanh network, first layer
    trained (Theorem 1): ||f - y|| falls from order 10 below 1e-8 within 5 steps, and
    each error is at most a constant times the previous one squared."""
    n, d, m = 256, 32, 4096
    x = torch.randn(n, d)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1)
    model = nn.Sequential(nn.Linear(d, m, bias=False), nn.Tanh(), nn.Linear(m, 1, bias=False))
    with torch.no_grad():
        model[0].weight.normal_()
        model[2].weight.copy_((torch.randint(0, 2, (1, m)) * 2.0 - 1) / m**0.5)
    model[2].weight.requires_grad_(False)
    opt = gramopt.GGN(model, lr=1.0, damping=0.0)
    errors = []
    for _ in range(5):
        out = model(x)
        errors.append(float((out - y).detach().norm()))
        opt.zero_grad()
        opt.backward(out, y)
        opt.step()
    with torch.no_grad():
        errors.append(float((model(x) - y).norm()))
    assert 5 < errors[0] < 50
    assert errors[-1] < 1e-8, errors
    ratios = [errors[t + 1] / errors[t] ** 2 for t in range(5) if errors[t + 1] > 1e-11]
    assert len(ratios) >= 3 and max(ratios) < 0.01, (errors, ratios)


def test_momentum_and_weight_decay_decorate_the_direction(float64):
    model = models.mlp(out=1)
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    lr, momentum, decay = 0.5, 0.9, 0.1
    opt = gramopt.GGN(model, lr=lr, damping=0.1, momentum=momentum, weight_decay=decay, damping_adaptation=None)
    buffer = None
    for _ in range(3):
        direction = -ggn_delta(copy.deepcopy(model), x, y, "mse", lr=1.0, damping=0.1)  # a copy: no hooks fire
        before = params_vector(model)
        buffer = direction if buffer is None else momentum * buffer + direction
        expected = before * (1 - lr * decay) - lr * buffer
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
        torch.testing.assert_close(params_vector(model), expected, rtol=1e-8, atol=1e-10)


def test_param_groups_scale_their_part_of_the_direction(float64):
    model = models.mlp(out=1)
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    expected = ggn_delta(model, x, y, "mse", lr=1.0, damping=0.1)
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    before = params_vector(model)
    opt = gramopt.GGN(model, damping=0.1, params=[{"params": first, "lr": 0.5}, {"params": rest, "lr": 2.0}])
    opt.backward(model(x), y)
    opt.step()
    n_first = sum(p.numel() for p in first)
    delta = params_vector(model) - before
    torch.testing.assert_close(delta[:n_first], 0.5 * expected[:n_first])
    torch.testing.assert_close(delta[n_first:], 2.0 * expected[n_first:])


def test_state_dict_round_trip(float64):
    model = models.mlp(out=1)
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    opt = gramopt.GGN(model, damping=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(model(x), y)
        opt.step()
    clone = models.mlp(out=1)
    clone.load_state_dict(model.state_dict())
    other = gramopt.GGN(clone, damping=0.1, momentum=0.9)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.steps_taken == 2
    for _ in range(3):
        for m, o in ((model, opt), (clone, other)):
            o.zero_grad()
            o.backward(m(x), y)
            o.step()
        for p, q in zip(model.parameters(), clone.parameters(), strict=True):
            assert torch.equal(p, q)


def test_unsupported_modules_left_to_the_gradient(float64):
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"1\.s: 1 \(Scale\)"):
        gramopt.GGN(model, unsupported="error")
    opt = gramopt.GGN(model, lr=0.5, unsupported="gradient")
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    scale_before = model[1].s.detach().clone()
    opt.backward(model(x), y)
    grad = model[1].s.grad.clone()
    opt.step()
    torch.testing.assert_close(model[1].s.detach(), scale_before - 0.5 * grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_solve_in_float32(dtype):
    """The Gram and solve run in float32; the step is close to a float32 run's."""
    model = models.mlp(out=2)
    half = copy.deepcopy(model).to(dtype)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    steps = []
    for m, xx, yy in ((model, x, y), (half, x.to(dtype), y.to(dtype))):
        before = params_vector(m).float()
        opt = gramopt.GGN(m, lr=0.5, damping=0.1)
        opt.backward(m(xx), yy)
        opt.step()
        steps.append(params_vector(m).float() - before)
        assert all(p.dtype == m[0].weight.dtype for p in m.parameters())
    rel = (steps[1] - steps[0]).norm() / steps[0].norm()
    assert rel < 0.05, rel
