"""Sketch operators: the matrices they apply, subspace embedding at the documented size,
determinism, and the Kronecker sketch of per-sample gradients through the factors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models
from gramopt.capture import CaptureEngine, SharedWeightFactors
from gramopt.linalg import SKETCHES, KroneckerSketch, fwht, make_sketch
from gramopt.linalg.regression import _qr_factor
from gramopt.optim.ggn.solvers import sketched_layer_gram
from reference import per_sample_grads

KINDS = sorted(SKETCHES)


def orthonormal(rows: int, cols: int, seed: int, coherent: int = 0) -> torch.Tensor:
    """Random orthonormal basis; ``coherent`` of its columns are coordinate vectors."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    u[:, :coherent] = 0
    u[torch.arange(coherent), torch.arange(coherent)] = 1.0
    return torch.linalg.qr(u).Q


@pytest.mark.parametrize("kind", KINDS)
def test_apply_is_a_fixed_linear_map_along_any_dim(kind, float64):
    sketch = make_sketch(kind, 24, 50, generator=torch.Generator().manual_seed(3))
    s = sketch.dense()
    assert s.shape == (24, 50)
    a = torch.randn(50, 7)
    torch.testing.assert_close(sketch.apply(a), s @ a)
    x = torch.randn(3, 4, 50)
    torch.testing.assert_close(sketch.apply(x, dim=-1), x @ s.T)
    torch.testing.assert_close(sketch.apply(x.transpose(1, 2), dim=1), (x @ s.T).transpose(1, 2))
    # E ||S a||^2 = ||a||^2: column norms of S average to 1
    big = make_sketch(kind, 64, 1024, generator=torch.Generator().manual_seed(4)).dense()
    assert abs(float((big**2).sum(0).mean()) - 1.0) < 0.05


def test_fwht_is_the_walsh_hadamard_matrix(float64):
    h = torch.ones(1, 1)
    for _ in range(5):  # Sylvester's construction, 32 x 32
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fwht(x), x @ h.T)
    with pytest.raises(ValueError, match="power-of-2"):
        fwht(torch.randn(2, 12))


EMBEDDING_CASES = [(kind, 0) for kind in KINDS] + [(kind, 16) for kind in KINDS if kind != "countsketch"]


@pytest.mark.parametrize("kind,coherent", EMBEDDING_CASES)
def test_subspace_embedding_at_documented_size(kind, coherent):
    """Singular values of S U within [1 - delta, 1 + delta] for m = 4k (delta = 0.6, the
    module's table), also for a coherent subspace (not countsketch: it needs ~k^2 rows
    there), and the preconditioned A R^{-1} has singular values in [1/(1+d), 1/(1-d)]."""
    k, n_rows, delta = 64, 8192, 0.6
    u = orthonormal(n_rows, k, seed=1, coherent=coherent)
    for seed in range(3):
        sketch = make_sketch(kind, 4 * k, n_rows, generator=torch.Generator().manual_seed(seed))
        sv = torch.linalg.svdvals(sketch.apply(u))
        assert 1 - delta <= float(sv.min()) and float(sv.max()) <= 1 + delta, (kind, seed, sv.min(), sv.max())
        a = u * torch.logspace(0, -4, k, dtype=torch.float64)  # cond(A) = 1e4
        r = _qr_factor(sketch.apply(a), 0.0)
        sv = torch.linalg.svdvals(torch.linalg.solve_triangular(r, a, upper=True, left=False))
        assert 1 / (1 + delta) <= float(sv.min()) and float(sv.max()) <= 1 / (1 - delta), (kind, seed)


@pytest.mark.parametrize("kind", KINDS)
def test_same_generator_same_sketch(kind, float64):
    draw = lambda seed: make_sketch(kind, 16, 40, generator=torch.Generator().manual_seed(seed)).dense()  # noqa: E731
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_bad_sketch_arguments():
    with pytest.raises(ValueError, match="unknown sketch"):
        make_sketch("fourier", 4, 8)
    with pytest.raises(ValueError, match="rows must be a positive int"):
        make_sketch("gaussian", 0, 8)
    with pytest.raises(ValueError, match="at most 8 rows"):
        make_sketch("srht", 9, 5)
    with pytest.raises(ValueError, match="maps dimension 8"):
        make_sketch("sparse", 4, 8).apply(torch.randn(7, 2))


def explicit_rows(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """U with rows vec(sum_s z_rs x_is^T), r = i k + c, by loops (independent of the code)."""
    b, k, s, _ = z.shape
    rows = []
    for i in range(b):
        for c in range(k):
            rows.append(sum(torch.outer(z[i, c, t], x[i, t]) for t in range(s)).reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("sides", ["both", "grads", "inputs"])
@pytest.mark.parametrize("positions", [1, 3])
def test_kronecker_sketch_is_kron_of_the_two(sides, positions, float64):
    b, k, d_in, d_out = 4, 2, 6, 9
    x, z = torch.randn(b, positions, d_in), torch.randn(b, k, positions, d_out)
    g = torch.Generator().manual_seed(0)
    s_g = make_sketch("gaussian", 5, d_out, generator=g) if sides in ("both", "grads") else None
    s_a = make_sketch("sparse", 4, d_in, generator=g) if sides in ("both", "inputs") else None
    kron = KroneckerSketch(s_g, s_a)
    dense_g = s_g.dense() if s_g else torch.eye(d_out)
    dense_a = s_a.dense() if s_a else torch.eye(d_in)
    expected = explicit_rows(x, z) @ torch.kron(dense_g, dense_a).T
    got = kron.per_sample(x, z)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(kron.gram(x, z), expected @ expected.T)
    assert kron.sketch_inputs(x).shape == (b, positions, dense_a.shape[0])
    assert kron.sketch_grads(z).shape == (b, k, positions, dense_g.shape[0])


def test_kronecker_sketch_of_a_captured_conv_layer(float64):
    """Through captured factors of a real Conv2d: equals (S_G kron S_A) applied to the
    weight's per-sample gradients from torch.func."""
    model = models.cnn(out=2)
    x, y = torch.randn(5, 1, 8, 8), torch.randn(5, 2)
    engine = CaptureEngine(model, model.parameters())
    (0.5 * ((model(x) - y) ** 2).sum()).backward()
    factor = engine.factors()["4"]  # the second Conv2d: 4 -> 5 channels, 3x3
    engine.close()
    assert isinstance(factor, SharedWeightFactors) and factor.positions > 1
    conv = model[4]
    ref = per_sample_grads(model, x, y, lambda o, t: 0.5 * ((o - t) ** 2).sum(), params=[conv.weight])
    g = torch.Generator().manual_seed(1)
    s_g, s_a = make_sketch("gaussian", 3, 5, generator=g), make_sketch("srht", 12, 36, generator=g)
    got = KroneckerSketch(s_g, s_a).per_sample(factor.inputs, factor.grads)
    torch.testing.assert_close(got, ref @ torch.kron(s_g.dense(), s_a.dense()).T, rtol=1e-9, atol=1e-11)


def test_sketched_layer_gram_is_the_gram_of_the_sketched_rows(float64):
    """A wide Linear with bias: the output side (64) is sketched to 2 n = 12 rows, the
    input side (5 + 1 for the bias) stays exact; reference from torch.func rows."""
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 1))
    x, y = torch.randn(6, 5), torch.randn(6, 1)
    engine = CaptureEngine(model, model.parameters())
    (0.5 * ((model(x) - y) ** 2).sum()).backward()
    factor = engine.factors()["0"]
    engine.close()
    got = sketched_layer_gram(factor, "gaussian", 2.0, torch.Generator().manual_seed(7))
    s_g = make_sketch("gaussian", 12, 64, generator=torch.Generator().manual_seed(7)).dense()
    ref = per_sample_grads(model, x, y, lambda o, t: 0.5 * ((o - t) ** 2).sum(), params=list(model[0].parameters()))
    w, c = ref[:, : 64 * 5].reshape(6, 64, 5), ref[:, 64 * 5 :].reshape(6, 64, 1)
    rows = torch.cat([w, c], dim=2)  # per-sample [W, c], the bias as an input of ones
    sketched = torch.einsum("gz,nzx->ngx", s_g, rows).reshape(6, -1)
    torch.testing.assert_close(got, sketched @ sketched.T, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(got, factor.gram(), rtol=1e-3), "the block was sketched, not exact"
    small = sketched_layer_gram(factor, "gaussian", 20.0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(small, factor.gram())  # 20 n >= 64: nothing to gain, exact


def test_sketch_of_the_embedding_dims():
    """Documented: delta ~ sqrt(k/m) for a Gaussian sketch (Marchenko-Pastur)."""
    k = 32
    u = orthonormal(2048, k, seed=2)
    sv = torch.linalg.svdvals(
        make_sketch("gaussian", 16 * k, 2048, generator=torch.Generator().manual_seed(0)).apply(u)
    )
    assert float(sv.max()) - 1 < 1.5 * math.sqrt(1 / 16) and 1 - float(sv.min()) < 1.5 * math.sqrt(1 / 16)
