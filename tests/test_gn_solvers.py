"""Matrix-free GGN solvers (cg, sketch-pcg, nystrom-pcg, auto) against the dense
torch.func reference and the Cholesky solver; the Gram is never built on their path;
Algorithm 1 of the near-linear-time paper (Theorem 4.1)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gramopt
import models
from gramopt.capture import SharedWeightFactors
from gramopt.optim.ggn import GaussNewtonSystem
from reference import ggn_delta, params_vector


def wide_mlp(out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 48), nn.Tanh(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, out))


def wide_cnn(out: int) -> nn.Module:
    """The tests' CNN with a wide head, so that sketch-pcg sketches some of its layers
    (the convolutions, with many positions per sample, stay exact)."""
    return nn.Sequential(*list(models.cnn(out=3))[:-1], nn.Linear(20, 48), nn.Tanh(), nn.Linear(48, out))


CASES = {
    "mlp-mse": (wide_mlp, lambda b: torch.randn(b, 5), "mse", 2),
    "mlp-ce": (wide_mlp, lambda b: torch.randn(b, 5), "cross_entropy", 3),
    "cnn-mse": (wide_cnn, lambda b: torch.randn(b, 1, 8, 8), "mse", 2),
    "cnn-ce": (wide_cnn, lambda b: torch.randn(b, 1, 8, 8), "cross_entropy", 3),
}
SOLVER_CASES = [
    ("cg", {}),
    ("sketch-pcg", {"oversampling": 1.0}),
    ("sketch-pcg", {"sketch": "countsketch", "oversampling": 2.0}),
    ("sketch-pcg", {"sketch": "srht", "oversampling": 1.0}),
    ("nystrom-pcg", {"rank": 4}),
    ("auto", {}),
]


def one_step(model, x, y, loss, damping, solver, options=None):
    """The step of one solver (a fixed damping: adaptation could undo the step)."""
    before = params_vector(model)
    opt = gramopt.GGN(
        model, lr=0.7, damping=damping, loss=loss, solver=solver, solver_options=options, damping_adaptation=None
    )
    opt.backward(model(x), y)
    opt.step()
    return params_vector(model) - before, opt.last_info


@pytest.mark.parametrize("solver,options", SOLVER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_step_as_cholesky_to_the_tolerance(name, solver, options, float64):
    build, inputs, loss, k = CASES[name]
    model = build(k)
    b = 6
    x = inputs(b)
    y = torch.randn(b, k) if loss == "mse" else torch.randint(0, k, (b,))
    damping = 1e-3 if loss == "mse" else 0.05
    expected = ggn_delta(model, x, y, loss, lr=0.7, damping=damping)
    reference, _ = one_step(copy.deepcopy(model), x, y, loss, damping, "cholesky")
    delta, info = one_step(
        model, x, y, loss, damping, solver, {**options, "tol": 1e-11} if solver != "auto" else options
    )
    torch.testing.assert_close(reference, expected, rtol=1e-8, atol=1e-10)
    scale = float(expected.norm())
    assert float((delta - expected).norm()) <= 1e-6 * scale, (info.solve.method, info.solve.residuals[-1:])
    assert info.solve.converged
    if solver in ("cg", "sketch-pcg", "nystrom-pcg"):
        assert info.solve.iterations >= 2 and info.solve.residuals[0] == 1.0


def test_sketch_pcg_preconditioner_is_sketched_not_exact(float64):
    """With the layers sketched, the preconditioner is only spectrally close to the Gram:
    PCG needs several iterations, each cheaper than exactness would make it."""
    model = wide_mlp(1)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    _, info = one_step(model, x, y, "mse", 1e-3, "sketch-pcg", {"oversampling": 1.0, "tol": 1e-10})
    assert 3 <= info.solve.iterations <= 40
    _, info = one_step(model, x, y, "mse", 1e-3, "sketch-pcg", {"oversampling": 100.0, "tol": 1e-10})
    assert info.solve.iterations <= 2  # 100 n >= every width: exact blocks, PCG converges at once


@pytest.mark.parametrize("solver", ["cg", "sketch-pcg", "nystrom-pcg"])
def test_matrix_free_solvers_never_build_the_gram(solver, float64, monkeypatch):
    """Every layer of a wide two-layer network is sketched (its output side or, for the
    head, its input side), so no exact Gram block is built by any solver here."""
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    expected = ggn_delta(model, x, y, "mse", lr=0.7, damping=1e-2)

    def forbidden(*args, **kwargs):
        raise AssertionError("the b x b Gram was built")

    monkeypatch.setattr(SharedWeightFactors, "gram", forbidden)
    monkeypatch.setattr(GaussNewtonSystem, "dense", forbidden)
    delta, info = one_step(
        model,
        x,
        y,
        "mse",
        1e-2,
        solver,
        {"tol": 1e-11, "oversampling": 1.0} if solver == "sketch-pcg" else {"tol": 1e-11},
    )
    torch.testing.assert_close(delta, expected, rtol=1e-7, atol=1e-10)


def test_solver_options_are_validated():
    model = wide_mlp(1)
    with pytest.raises(ValueError, match="unknown solver 'qr'"):
        gramopt.GGN(model, solver="qr")
    with pytest.raises(ValueError, match=r"solver 'cg' takes no option \['rank'\]"):
        gramopt.GGN(model, solver="cg", solver_options={"rank": 3})
    with pytest.raises(ValueError, match="takes no option"):
        gramopt.GGN(model, solver="cholesky", solver_options={"tol": 1e-3})
    with pytest.raises(ValueError, match="tol must be None or a number in"):
        gramopt.GGN(model, solver="sketch-pcg", solver_options={"tol": 2.0})
    with pytest.raises(ValueError, match="sketch must be one of"):
        gramopt.GGN(model, solver="sketch-pcg", solver_options={"sketch": "fourier"})
    with pytest.raises(ValueError, match="oversampling must be a number >= 1"):
        gramopt.GGN(model, solver="auto", solver_options={"oversampling": 0.5})
    with pytest.raises(ValueError, match="rank must be a positive int"):
        gramopt.GGN(model, solver="nystrom-pcg", solver_options={"rank": 0})
    with pytest.raises(ValueError, match="max_iter must be a positive int"):
        gramopt.GGN(model, solver="cg", solver_options={"max_iter": 2.5})
    gramopt.GGN(model, solver="nystrom-pcg", solver_options={"rank": 3, "seed": 4, "tol": None}).close()


def test_nonconvergence_is_reported_and_warned(float64):
    model = wide_mlp(1)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    opt = gramopt.GGN(model, damping=1e-6, solver="cg", solver_options={"max_iter": 2, "tol": 1e-12})
    opt.backward(model(x), y)
    with pytest.warns(gramopt.NumericalWarning, match="cg stopped at relative residual"):
        opt.step()
    assert not opt.last_info.solve.converged and opt.last_info.solve.iterations == 2


def test_randomized_solvers_are_reproducible_through_state_dict(float64):
    """The sketch is seeded by (seed, step): a restored optimizer takes the same steps."""
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    model = wide_mlp(1)
    opt = gramopt.GGN(model, damping=1e-2, solver="sketch-pcg", solver_options={"oversampling": 1.0, "tol": 1e-4})
    for _ in range(2):
        opt.backward(model(x), y)
        opt.step()
    clone = wide_mlp(1)
    clone.load_state_dict(model.state_dict())
    other = gramopt.GGN(clone, damping=1e-2, solver="sketch-pcg", solver_options={"oversampling": 1.0, "tol": 1e-4})
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        for m, o in ((model, opt), (clone, other)):
            o.backward(m(x), y)
            o.step()
        assert opt.last_info.solve.residuals == other.last_info.solve.residuals
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_shared_weight_products_with_input_sized_temporaries(float64, monkeypatch):
    """The products of a layer with k d_in < d_out (two passes, several positions, bias)
    against its explicit per-sample gradients."""
    monkeypatch.setattr("gramopt.capture.shared_weight.WEIGHT_INPUTS_MIN_SAVING", 0)  # a small case
    layer = nn.Linear(3, 16)
    x, z = torch.randn(4, 5, 3), torch.randn(4, 2, 5, 16)
    factor = SharedWeightFactors(layer, [layer.weight, layer.bias], layer.weight, layer.bias, x, z)
    assert factor._input_side()
    u = factor.per_sample()
    a = torch.randn(8)
    got = torch.cat([g.reshape(-1) for g in factor.rmatvec(a)])
    torch.testing.assert_close(got, u.T @ a)
    v = [torch.randn(16, 3), torch.randn(16)]
    torch.testing.assert_close(factor.matvec(v), u @ torch.cat([t.reshape(-1) for t in v]))


def two_layer_relu(n: int, m: int, d: int, seed: int = 0):
    """f(x) = a^T relu(W x) / sqrt(m) with a in {-1, +1}^m fixed (the paper's Section 3.1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randn(n, 1, generator=g)
    model = nn.Sequential(nn.Linear(d, m, bias=False), nn.ReLU(), nn.Linear(m, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(m, d, generator=g))
        model[2].weight.copy_((torch.randint(0, 2, (1, m), generator=g) * 2.0 - 1) / math.sqrt(m))
    model[2].weight.requires_grad_(False)
    return model, x, y


def test_algorithm1_halves_the_error_each_step(float64):
    """FASTERTWOLAYER (Algorithm 1, Theorem 4.1): full-batch Gauss-Newton steps
    W <- W - J^T g with g an eps_0-approximate solution of min ||J J^T g - (f - y)||
    (Algorithm 2, here sketch-pcg with eps_0 = 1e-3 <= sqrt(lambda/n)/6), damping 0:
    ||f_{t+1} - y|| <= ||f_t - y|| / 2 at every step; the trajectory matches exact GN."""
    n, m, d = 64, 4096, 8
    errors = {}
    for solver, options in (("sketch-pcg", {"tol": 1e-3}), ("cholesky", None)):
        model, x, y = two_layer_relu(n, m, d)
        opt = gramopt.GGN(model, lr=1.0, damping=0.0, solver=solver, solver_options=options)
        errors[solver] = []
        for _ in range(6):
            out = model(x)
            errors[solver].append(float((out.detach() - y).norm()))
            opt.backward(out, y)
            opt.step()
            if solver == "sketch-pcg":
                assert opt.last_info.solve.converged and opt.last_info.solve.iterations >= 2
        with torch.no_grad():
            errors[solver].append(float((model(x) - y).norm()))
    e = errors["sketch-pcg"]
    assert all(e[t + 1] <= 0.5 * e[t] for t in range(6)), e
    assert e[-1] < 1e-3 * e[0]
    for a, b in zip(e[:3], errors["cholesky"][:3], strict=True):
        assert a == pytest.approx(b, rel=1e-2)


def test_gram_product_after_dense_is_the_factor_product(float64):
    """Once ``dense()`` formed the Gram, ``gram_product`` (damping adaptation's predicted
    reduction) multiplies with it; before, it passes over the factors: the same ``R R^T x``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    b, k = 4, 2
    unfolded = torch.nn.functional.unfold(torch.randn(b, 2, 5, 5), 3, padding=1).transpose(1, 2)  # [b, 25, 18]
    z = torch.randn(b, k, 25, 3)
    factor = SharedWeightFactors(conv, [conv.weight, conv.bias], conv.weight, conv.bias, unfolded, z)
    rows = torch.cat(factor.explicit_rows(), dim=1)  # [b k, p]
    q = torch.randn(b, k, 1)
    system = GaussNewtonSystem(
        {"0": SharedWeightFactors(conv, [conv.weight, conv.bias], conv.weight, conv.bias, unfolded, z)},
        q,
        torch.zeros(b),
        0.1,
    )
    v = torch.randn(b * k)
    through_factors = system.gram_product(v)
    system.dense()
    torch.testing.assert_close(system.gram_product(v), through_factors)
    torch.testing.assert_close(through_factors, rows @ (rows.T @ v))


def test_auto_picks_by_size():
    """auto's cost model (shapes only): sketch-pcg for the paper's wide two-layer network
    at n = 8192, m = 2^17; cholesky there at n = 1024, and for a small MLP."""
    from gramopt.optim.ggn.solvers import choose_solver, estimated_flops

    def wide_system(n: int, m: int, d: int = 16) -> GaussNewtonSystem:
        layer = nn.Linear(d, m, bias=False)
        x = torch.zeros(1).expand(n, 1, d)  # shapes only: stride-0 views, no memory
        z = torch.zeros(1).expand(n, 1, 1, m)
        factor = SharedWeightFactors(layer, [layer.weight], layer.weight, None, x, z)
        return GaussNewtonSystem({"0": factor}, None, torch.zeros(n), 0.0)

    big, small = wide_system(8192, 2**17), wide_system(1024, 2**17)
    assert choose_solver(big) == "sketch-pcg" and choose_solver(small) == "cholesky"
    cost = estimated_flops(big)
    assert cost["cholesky"] == pytest.approx(2 * 8192**2 * (2**17 + 17) + 8192**3 / 3)
    model, x, y = models.mlp(out=1), torch.randn(64, 5), torch.randn(64, 1)
    opt = gramopt.GGN(
        model, damping=0.1, solver="auto"
    )  # (at damping 0 this float32 Gram, cond ~1e7, is singular to working precision)
    opt.backward(model(x), y)
    opt.step()
    assert opt.last_info.solve.method == "cholesky"


def test_captured_activations_are_released_after_step():
    """The capture engine's gradient hooks must not keep a step's layer outputs alive
    (a reference cycle through the autograd graph that Python's GC cannot collect)."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 1))
    seen = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(weakref.ref(out)))
    # fixed damping: adaptation's extra forward would call the hook once more
    opt = gramopt.GGN(model, damping=0.1, solver="sketch-pcg", damping_adaptation=None)
    for _ in range(2):
        out = model(torch.randn(8, 5))
        opt.backward(out, torch.randn(8, 1))
        opt.step()
        del out
    gc.collect()
    assert [r() is None for r in seen] == [True, True]
    opt.close()
