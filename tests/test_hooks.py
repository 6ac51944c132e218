"""No hook outlives its optimizer."""

from __future__ import annotations

import gc

import pytest
import torch

import gramopt
import models


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_close_removes_hooks():
    model = models.cnn()
    base = hook_count(model)
    opt = gramopt.GGN(model)
    assert hook_count(model) > base
    opt.close()
    assert hook_count(model) == base
    opt.close()  # idempotent
    with pytest.raises(gramopt.CaptureError, match="closed"):
        opt.backward(model(torch.randn(2, 1, 8, 8)), torch.randn(2, 3))


def test_garbage_collection_removes_hooks():
    model = models.mlp()
    base = hook_count(model)
    opt = gramopt.GGN(model)
    opt.backward(model(torch.randn(3, 5)), torch.randn(3, 1))
    del opt
    gc.collect()
    assert hook_count(model) == base


def test_context_manager_removes_hooks():
    model = models.mlp()
    base = hook_count(model)
    with gramopt.GGN(model) as opt:
        opt.backward(model(torch.randn(3, 5)), torch.randn(3, 1))
        opt.step()
    assert hook_count(model) == base


def test_exception_mid_step_then_close():
    model = models.mlp()
    base = hook_count(model)
    opt = gramopt.GGN(model, damping=0.0)
    model.double()
    x = torch.randn(40, 5, dtype=torch.float64)  # more samples than the 7-wide layer can fit
    with pytest.raises(gramopt.SingularSystemError):
        opt.backward(model(x.repeat(2, 1)), torch.randn(80, 1, dtype=torch.float64))
        opt.step()
    opt.close()
    assert hook_count(model) == base


def test_no_grad_forward_captures_nothing():
    model = models.mlp()
    opt = gramopt.GGN(model)
    with torch.no_grad():
        model(torch.randn(3, 5))
    assert not any(opt.engine._calls.values())
