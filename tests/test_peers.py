"""The comparison's peers: every parameter trained, by the optimizer their docs say."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gramopt.tasks import get_task
from gramopt.training import OPTIMIZERS
from gramopt.training.chain import Chain
from gramopt.training.peers import EXTRA_OF, PEERS
from gramopt.training.registry import build_optimizer, training_step

pytest.importorskip("singd")


def _owners(optimizer: torch.optim.Optimizer) -> dict[int, str]:
    parts = optimizer.optimizers if isinstance(optimizer, Chain) else [optimizer]
    return {id(p): type(o).__name__ for o in parts for g in o.param_groups for p in g["params"]}


@pytest.mark.parametrize("task_name", ["recall", "mnist", "teacher"])
@pytest.mark.parametrize("name", ["muon", "ikfac", "singd"])
def test_every_parameter_is_trained_by_exactly_one_optimizer(task_name, name):
    task = get_task(task_name)
    model = task.build_model(0)
    optimizer = build_optimizer(name, model, task.loss, {})
    owners = _owners(optimizer)
    assert set(owners) == {id(p) for p in model.parameters()}
    if name == "muon":
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        hidden = {id(m.weight) for m in linears[:-1]}
        assert {i for i, o in owners.items() if o == "Muon"} == hidden
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
    assert torch.equal(other.optimizers[0].state[model.weight]["momentum_buffer"], chain.optimizers[0].state[model.weight]["momentum_buffer"])
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
