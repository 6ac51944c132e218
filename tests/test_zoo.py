"""The model zoo (tests/zoo.py) trains with every method: 20 steps on a fixed batch, the
loss falls, every parameter with a non-zero gradient moves, and no warning is raised but
the documented one for parameters no handler covers (the ViT's cls token and positions,
and nn.MultiheadAttention's projections where no handler covers them); the GPT with tied
embeddings (its head's weight is the token table) is preconditioned as one tied block, with
no fallback warning.

GGN runs every model: the GPT's per-token logits are ``[b, V, T]`` (class dimension 1),
and the BatchNorm layers of the ResNet and the MobileNet run in eval mode (running
statistics; the other layers train), since GGN refuses BatchNorm in training mode by
design (its batch statistics couple the samples' Jacobian rows); a separate test checks
that refusal."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramopt
from zoo import ZOO

METHODS = {
    "ggn": lambda model, loss: gramopt.GGN(model, lr=0.1, damping=1.0, loss=loss),
    "seng": lambda model, loss: gramopt.SENG(model, lr=0.05, damping=1.0, loss=loss, momentum=0.5),
    "fngd": lambda model, loss: gramopt.FNGD(model, lr=0.05, damping=0.1, loss=loss, momentum=0.5),
}
CASES = [(name, method) for name in ZOO for method in METHODS]
STEPS = 20


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation, which on a
    loaded 2-core machine made the suite some 20x slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y) if kind == "mse" else F.cross_entropy(out, y)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _backward(method: str, kind: str, opt: torch.optim.Optimizer, model: nn.Module, x, y) -> None:
    """GGN needs its own backward (the outputs and targets); SENG and FNGD take the
    per-token model through the ordinary ``loss.backward()`` loop, the others through
    ``opt.backward``."""
    if kind == "token_cross_entropy" and method != "ggn":
        _loss(kind, model(x), y).backward()
    else:
        opt.backward(model(x), y)


@pytest.mark.parametrize("name, method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_zoo_model_trains(name, method):
    torch.manual_seed(0)
    model, x, y, kind = ZOO[name](torch.Generator().manual_seed(1))
    if method == "ggn":
        for bn in _batchnorms(model):
            bn.eval()  # GGN preconditions BatchNorm with running statistics only
    _loss(kind, model(x), y).backward()
    moving = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert moving, "the zoo model has no parameter with a gradient"
    model.zero_grad()
    with torch.no_grad():
        first = float(_loss(kind, model(x), y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = METHODS[method](model, "cross_entropy" if "cross_entropy" in kind else "mse")
        for step in range(STEPS):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            _backward(method, kind, opt, model, x, y)
            opt.step()
            if step == 0:
                frozen = [n for n, p in model.named_parameters() if n in moving and torch.equal(p, before[n])]
                assert not frozen, f"parameters with a gradient left unchanged: {frozen}"
    others = [str(w.message) for w in caught if "cannot precondition" not in str(w.message) or "tied" in str(w.message)]
    assert not others, others
    with torch.no_grad():
        last = float(_loss(kind, model(x), y))
    assert last < first, (first, last)


@pytest.mark.parametrize("name", [n for n in ZOO if _batchnorms(ZOO[n](torch.Generator().manual_seed(1))[0])])
def test_ggn_refuses_batchnorm_in_training_mode(name):
    """GGN's documented choice: BatchNorm in training mode is refused by name, at
    construction and at a training-mode forward pass after construction, with the advice
    to use eval mode (which trains, above), and no parameter changes."""
    model, x, y, _ = ZOO[name](torch.Generator().manual_seed(1))
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"(?s)BatchNorm2d.*training mode.*eval"):
        METHODS["ggn"](model, "cross_entropy")
    for bn in _batchnorms(model):
        bn.eval()
    opt = METHODS["ggn"](model, "cross_entropy")
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"BatchNorm2d ran in training mode under GGN.*eval"):
        opt.backward(model(x), y)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
