"""The capture engine's refusals speak the caller's own vocabulary and suggest only what
works: GGN, SENG and FNGD let uncovered parameters go on with ``unsupported="gradient"``,
GaussNewton with ``unsupported="warn"`` (its ``"gradient"`` is refused as a value); a hint
never names the policy in force already, nor one that would not help (BatchNorm in training
mode under GGN). Every refusal leaves the model as it was: parameters, buffers, hooks."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from tests.test_bad_inputs import Scale  # a trainable module without a gramopt handler
from torch import nn

import gramopt

SAMPLE_SPACE = [gramopt.GGN, gramopt.SENG, gramopt.FNGD]
FALLBACK = {gramopt.GGN: "gradient", gramopt.SENG: "gradient", gramopt.FNGD: "gradient", gramopt.GaussNewton: "warn"}


class ReusedWeight(nn.Module):
    """``head(F.linear(body(x), body.weight))``: body's weight is used outside body's call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.linear(self.body(x), self.body.weight))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Parameters and buffers as before, and no hook left on any module."""
    now = snapshot(model)
    assert now.keys() == before.keys() and all(torch.equal(now[n], before[n]) for n in before)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
    assert "forward" not in vars(model)  # (no attention forward swapped in)


def policy_values(message: str) -> set[str]:
    """The ``unsupported=...`` values a message names."""
    return set(re.findall(r"unsupported='(\w+)'", message))


def batchnorm_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))


@pytest.mark.parametrize("unsupported", ["gradient", "error"])
def test_ggn_refuses_batchnorm_in_training_mode_naming_what_helps_and_no_policy(unsupported):
    """No value of ``unsupported`` takes BatchNorm in training mode under GGN: the message
    names the remedies that work (SENG / FNGD, GroupNorm / LayerNorm, eval mode) and no
    policy value, neither the one in force nor the other."""
    model = batchnorm_net()
    before = snapshot(model)
    with pytest.raises(gramopt.UnsupportedModuleError) as refused:
        gramopt.GGN(model, loss="mse", unsupported=unsupported)
    message = str(refused.value)
    assert "1 (BatchNorm1d) is in training mode: GGN treats" in message
    for remedy in ("SENG or FNGD", "nn.GroupNorm / nn.LayerNorm", "eval mode"):
        assert remedy in message, message
    assert policy_values(message) == set(), message
    assert_untouched(model, before)


@pytest.mark.parametrize("method", [*SAMPLE_SPACE, gramopt.GaussNewton], ids=lambda c: c.__name__)
def test_a_module_without_handler_refused_names_the_methods_own_fallback(method):
    """``unsupported="error"`` and a module without a handler: the hint names the method's
    own value that would take it (``"gradient"`` / GaussNewton's ``"warn"``), and that value
    does take it."""
    # 40 entries: above GaussNewton's QUIET_AUTOGRAD_ENTRIES, so its fallback warns as the others' do
    model = nn.Sequential(nn.Linear(3, 40), Scale(40), nn.Linear(40, 2)).double()
    before = snapshot(model)
    with pytest.raises(gramopt.UnsupportedModuleError, match=r"1\.s: 1 \(Scale\) has no gramopt handler") as refused:
        method(model, unsupported="error")
    message = str(refused.value)
    assert policy_values(message) == {FALLBACK[method]}, message
    assert "gramopt.register_handler" in message
    assert_untouched(model, before)
    with pytest.warns(RuntimeWarning, match=r"1\.s"):
        method(model, unsupported=FALLBACK[method]).close()


@pytest.mark.parametrize("method", [gramopt.GGN, gramopt.GaussNewton], ids=lambda c: c.__name__)
def test_a_weight_used_outside_its_module_refused_names_the_methods_own_fallback(method):
    """The use audit at the first forward under ``unsupported="error"``: the hint names
    the method's own fallback, and nothing changes."""
    model = ReusedWeight().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    opt = method(model, unsupported="error")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gramopt.UnsupportedModuleError, match="body.weight") as refused:
        if method is gramopt.GaussNewton:
            opt.step(lambda: model(x))
        else:
            opt.backward(model(x), torch.randint(0, 2, (4,)))
    assert policy_values(str(refused.value)) == {FALLBACK[method]}, str(refused.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    opt.close()


@pytest.mark.parametrize("method", [*SAMPLE_SPACE, gramopt.GaussNewton], ids=lambda c: c.__name__)
def test_attention_with_add_bias_kv_names_no_policy_in_its_reason(method):
    """The reason for ``add_bias_kv`` says how to build the module; the policy hint is the
    refusal's (the method's own value under ``"error"``), and the warning under the default
    policy does not tell the user to keep the value they already use."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, add_bias_kv=True), "head": nn.Linear(8, 2)})
    before = snapshot(model)
    with pytest.raises(gramopt.UnsupportedModuleError, match="build it without add_bias_kv") as refused:
        method(model, unsupported="error")
    assert policy_values(str(refused.value)) == {FALLBACK[method]}, str(refused.value)
    assert_untouched(model, before)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method(model).close()
    warned = [str(w.message) for w in caught if "attn.in_proj_weight" in str(w.message)]
    assert len(warned) == 1, [str(w.message) for w in caught]
    assert FALLBACK[method] not in policy_values(warned[0]), warned[0]


def test_ggn_batchnorm_switched_to_training_later_names_the_method_and_what_helps():
    model = batchnorm_net()
    model[1].eval()
    opt = gramopt.GGN(model, loss="mse")
    model.train()
    before = snapshot(model)
    with pytest.raises(gramopt.UnsupportedModuleError, match="BatchNorm1d ran in training mode under GGN") as refused:
        model(torch.randn(5, 3))
    message = str(refused.value)
    assert "SENG or FNGD" in message and "eval mode" in message and policy_values(message) == set()
    assert all(torch.equal(t, before[n]) for n, t in snapshot(model).items())
    opt.close()
