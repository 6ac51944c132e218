"""The comparison's peers: every parameter trained, by the optimizer their docs say."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gramopt.compare.config import grid
from gramopt.tasks import get_task
from gramopt.training import OPTIMIZERS
from gramopt.training.chain import Chain
from gramopt.training.muon_float32 import Float32Muon, newton_schulz
from gramopt.training.peers import EXTRA_OF, PEERS
from gramopt.training.registry import build_optimizer, task_hyper, training_step

pytest.importorskip("singd")


def _owners(optimizer: torch.optim.Optimizer) -> dict[int, str]:
    parts = optimizer.optimizers if isinstance(optimizer, Chain) else [optimizer]
    return {id(p): type(o).__name__ for o in parts for g in o.param_groups for p in g["params"]}


@pytest.mark.parametrize("task_name", ["recall", "mnist", "teacher"])
@pytest.mark.parametrize("name", ["muon", "muon-f32", "ikfac", "singd"])
def test_every_parameter_is_trained_by_exactly_one_optimizer(task_name, name):
    task = get_task(task_name)
    model = task.build_model(0)
    optimizer = build_optimizer(name, model, task.loss, {})
    owners = _owners(optimizer)
    assert set(owners) == {id(p) for p in model.parameters()}
    if name.startswith("muon"):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        hidden = {id(m.weight) for m in linears[:-1]}
        assert {i for i, o in owners.items() if o == {"muon": "Muon", "muon-f32": "Float32Muon"}[name]} == hidden
    else:
        supported = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert {i for i, o in owners.items() if o == "SINGD"} == {id(p) for m in supported for p in m.parameters()}
    split = task.load(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        loss = training_step(optimizer, model, task.loss, split.train_x[:32], split.train_y[:32])
    assert torch.isfinite(loss)
    # every parameter moved (but the attention's key bias: softmax ignores it, its gradient is 0)
    still = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert still in ([], ["attention.key.bias"]), still


def test_chain_steps_each_optimizer_and_round_trips_its_state():
    model = nn.Linear(3, 2)
    make = lambda: Chain(torch.optim.SGD([model.weight], lr=0.1, momentum=0.9), torch.optim.AdamW([model.bias], lr=0.1))  # noqa: E731
    chain = make()
    scheduler = torch.optim.lr_scheduler.LambdaLR(chain, lambda k: 0.5)
    assert [g["lr"] for g in chain.param_groups] == [0.05, 0.05]  # a schedule reaches every group
    model(torch.randn(4, 3)).square().sum().backward()
    chain.step()
    scheduler.step()
    other = make()
    other.load_state_dict(chain.state_dict())
    assert torch.equal(
        other.optimizers[0].state[model.weight]["momentum_buffer"],
        chain.optimizers[0].state[model.weight]["momentum_buffer"],
    )
    with pytest.raises(ValueError, match="two optimizers"):
        Chain(torch.optim.SGD([model.weight], lr=0.1), torch.optim.SGD([model.weight], lr=0.1))


def test_shampoo_is_the_grafted_scalable_form_and_muon_is_torchs():
    from pytorch_optimizer import ScalableShampoo

    model = get_task("teacher").build_model(0)
    assert isinstance(build_optimizer("shampoo", model, "mse", {}), ScalableShampoo)
    assert OPTIMIZERS["shampoo"].defaults["preconditioning_compute_steps"] < 100
    assert OPTIMIZERS["muon"].source == "torch" and "muon-po" in OPTIMIZERS
    assert EXTRA_OF["psgd-kron"] == "bench" and EXTRA_OF["ikfac"] == "compare"
    assert {spec.name for _, spec in PEERS} >= {"ikfac", "singd", "muon", "muon-po", "shampoo", "soap"}


COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults


def _reference_newton_schulz(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """NS_k in float64 through the SVD, independent of the matrix iteration: each singular
    value s of U / ||U||_F goes through s -> a s + b s^3 + c s^5, k times."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    s = s / update.double().norm()
    a, b, c = COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)])
def test_float32_newton_schulz_matches_a_float64_reference_where_bfloat16_does_not(shape):
    update = torch.randn(*shape, dtype=torch.float64)
    reference = _reference_newton_schulz(update)
    ours = newton_schulz(update.float(), COEFFICIENTS, 5, 1e-7)
    assert ours.dtype == torch.float32 and ours.shape == update.shape
    error = (ours.double() - reference).norm() / reference.norm()
    bfloat16 = torch.optim._muon._zeropower_via_newtonschulz(update.float(), COEFFICIENTS, 5, 1e-7)
    bfloat16_error = (bfloat16.double() - reference).norm() / reference.norm()
    assert error < 1e-5, error
    assert bfloat16_error > 100 * error  # torch's own iteration, in bfloat16: what muon-f32 avoids
    assert newton_schulz(update, COEFFICIENTS, 5, 1e-7).dtype == torch.float64  # never narrower than the update


def _pair(nesterov: bool, weight_decay: float, adjust_lr_fn: str | None, shape: tuple[int, int]):
    weights = [torch.randn(*shape), torch.randn(shape[1], shape[0])]
    copies = [w.clone() for w in weights]
    hyper = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, adjust_lr_fn=adjust_lr_fn)
    ours = Float32Muon([nn.Parameter(w) for w in weights], **hyper)
    torchs = torch.optim.Muon([nn.Parameter(w) for w in copies], **hyper)
    return ours, torchs


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay, adjust_lr_fn", [(0.0, None), (0.1, "original"), (0.1, "match_rms_adamw")])
def test_float32_muon_is_torchs_update_with_its_orthogonalization_in_float32(
    monkeypatch, nesterov, weight_decay, adjust_lr_fn
):
    # torch's step with its Newton-Schulz computed in float32 must be ours to the bit:
    # momentum, Nesterov, learning-rate scaling and weight decay are torch's.
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz",
                        lambda grad, coefficients, steps, eps: newton_schulz(grad, coefficients, steps, eps))
    ours, torchs = _pair(nesterov, weight_decay, adjust_lr_fn, (24, 10))
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours.param_groups[0]["params"]]
        for optimizer in (ours, torchs):
            for p, g in zip(optimizer.param_groups[0]["params"], grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for p, q in zip(ours.param_groups[0]["params"], torchs.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
    for p, q in zip(ours.param_groups[0]["params"], torchs.param_groups[0]["params"], strict=True):
        assert torch.equal(ours.state[p]["momentum_buffer"], torchs.state[q]["momentum_buffer"])


def test_float32_muons_step_is_the_float64_reference_and_torchs_is_its_bfloat16_rounding():
    # From zero momentum, the first step is W - lr s(W) NS_5(G) (NS is scale-free).
    ours, torchs = _pair(True, 0.0, None, (40, 16))
    starts = [p.detach().clone() for p in ours.param_groups[0]["params"]]
    grads = [torch.randn_like(p) for p in starts]
    for optimizer in (ours, torchs):
        for p, g in zip(optimizer.param_groups[0]["params"], grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    for start, g, p, q in zip(
        starts, grads, ours.param_groups[0]["params"], torchs.param_groups[0]["params"], strict=True
    ):
        scale = max(1.0, start.shape[0] / start.shape[1]) ** 0.5
        expected_step = -0.05 * scale * _reference_newton_schulz(g)
        error = ((p.double() - start.double()) - expected_step).norm() / expected_step.norm()
        bfloat16_error = ((q.double() - start.double()) - expected_step).norm() / expected_step.norm()
        assert error < 1e-4, error
        assert 1e-3 < bfloat16_error < 0.1, bfloat16_error  # the same update, rounded through bfloat16


def test_muon_f32_shares_muons_task_settings_and_grids():
    for task_name in ("teacher", "recall", "charlm"):
        task = get_task(task_name)
        assert task_hyper(task, "muon-f32") == task_hyper(task, "muon")
        assert grid("muon-f32", task, "full") == grid("muon", task, "full")
    assert OPTIMIZERS["muon-f32"].source != "gramopt" and "float32" in OPTIMIZERS["muon-f32"].description
