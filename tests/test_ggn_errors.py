"""Bad input to GGN: a clear error naming the problem, and nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gramopt
import models
from reference import params_vector


def test_model_first():
    model = models.mlp()
    with pytest.raises(TypeError, match="takes the model first"):
        gramopt.GGN(model.parameters())


def _state(model, opt):
    return params_vector(model), copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, before):
    params, state = before
    assert torch.equal(params_vector(model), params)
    assert opt.state_dict()["gramopt"] == state["gramopt"]
    assert opt.state_dict()["state"].keys() == state["state"].keys()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_outputs_change_nothing(bad):
    model = models.mlp(out=1)
    opt = gramopt.GGN(model, damping=0.1, momentum=0.9)
    x, y = torch.randn(4, 5), torch.randn(4, 1)
    opt.backward(model(x), y)
    opt.step()
    before = _state(model, opt)
    out = model(x)
    with pytest.raises(gramopt.NonFiniteError, match="model output has NaN or inf"):
        opt.backward(out * torch.tensor([[bad], [1.0], [1.0], [1.0]]), y)
    with pytest.raises(gramopt.CaptureError, match="needs opt.backward"):
        opt.step()
    _assert_unchanged(model, opt, before)


def test_non_finite_target():
    model = models.mlp(out=1)
    opt = gramopt.GGN(model)
    y = torch.randn(4, 1)
    y[0] = float("nan")
    before = _state(model, opt)
    with pytest.raises(gramopt.NonFiniteError, match="target has NaN"):
        opt.backward(model(torch.randn(4, 5)), y)
    _assert_unchanged(model, opt, before)


def test_non_finite_gram_names_the_layer():
    """An infinite input saturates tanh, so the outputs stay finite, but layer 0's Gram
    block is not: the step names the layer and changes nothing."""
    model = models.mlp(out=1)
    opt = gramopt.GGN(model, damping=0.1)
    x = torch.randn(4, 5)
    x[0, 0] = float("inf")
    before = _state(model, opt)
    opt.backward(model(x), torch.randn(4, 1))
    with pytest.raises(gramopt.NonFiniteError, match="Gram block of layer 0"):
        opt.step()
    _assert_unchanged(model, opt, before)


@pytest.mark.parametrize(
    "out_shape, target_shape",
    [((6,), (6, 1)), ((6, 1), (6,)), ((6, 2), (6, 3))],
)
def test_mse_target_shape_mismatch_shows_both_shapes(out_shape, target_shape):
    k = out_shape[1] if len(out_shape) == 2 else 1
    model = nn.Sequential(nn.Linear(3, k), nn.Flatten(0)) if len(out_shape) == 1 else nn.Linear(3, k)
    opt = gramopt.GGN(model)
    out = model(torch.randn(6, 3))
    with pytest.raises(
        ValueError, match=rf"target shape \({', '.join(map(str, target_shape))},?\) does not match output shape"
    ):
        opt.backward(out, torch.randn(*target_shape))


def test_cross_entropy_target_checks():
    model = models.mlp(out=3)
    opt = gramopt.GGN(model, loss="cross_entropy", damping=0.1)
    with pytest.raises(ValueError, match="integer class targets"):
        opt.backward(model(torch.randn(4, 5)), torch.randn(4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        opt.backward(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 3]))


def test_singular_system_with_zero_damping():
    """More samples than parameters: G = J J^T is singular, and damping 0 is refused at step."""
    model = nn.Linear(2, 1)  # 3 parameters
    opt = gramopt.GGN(model, damping=0.0)
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    model.double()
    before = _state(model, opt)
    opt.backward(model(x), y)
    with pytest.raises(gramopt.SingularSystemError, match="use damping > 0"):
        opt.step()
    _assert_unchanged(model, opt, before)


def test_duplicated_samples_with_damping_solve_cleanly(float64):
    model = models.mlp(out=1)
    x = torch.randn(3, 5).repeat(4, 1)
    opt = gramopt.GGN(model, damping=1e-6)
    opt.backward(model(x), torch.randn(12, 1))
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batch_size_one_works():
    model = models.mlp(out=2)
    opt = gramopt.GGN(model, damping=0.1)
    opt.backward(model(torch.randn(1, 5)), torch.randn(1, 2))
    opt.step()
    assert opt.last_info.solve.method == "cholesky"


def test_empty_batch():
    model = models.mlp(out=1)
    opt = gramopt.GGN(model)
    with pytest.raises(ValueError, match="empty batch"):
        opt.backward(model(torch.randn(0, 5)), torch.randn(0, 1))


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(gramopt.UnsupportedModuleError, match="GroupNorm"):
        gramopt.GGN(model)


def test_batchnorm_switched_to_training_later_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model[1].eval()
    model[1].requires_grad_(False)
    opt = gramopt.GGN(model)
    model.train()
    with pytest.raises(gramopt.UnsupportedModuleError, match="eval mode"):
        model(torch.randn(5, 3))
    opt.close()


def test_unsupported_module_configurations_are_named():
    with pytest.raises(
        gramopt.UnsupportedModuleError, match=r"0.weight: 0 \(Embedding\): Embedding\(sparse=True\): sparse gradients"
    ):
        gramopt.GGN(nn.Sequential(nn.Embedding(5, 2, sparse=True)), unsupported="error")


def test_complex_parameters_refused():
    model = nn.Linear(2, 1).to(torch.complex64)
    with pytest.raises(ValueError, match="complex parameters"):
        gramopt.GGN(model)


def test_step_without_backward():
    opt = gramopt.GGN(models.mlp())
    with pytest.raises(gramopt.CaptureError, match="needs opt.backward"):
        opt.step()


def test_eval_mode_captures_nothing():
    model = models.mlp(out=1)
    opt = gramopt.GGN(model)
    model.eval()
    with pytest.raises(gramopt.CaptureError, match="no supported layer was recorded"):
        opt.backward(model(torch.randn(3, 5)), torch.randn(3, 1))
