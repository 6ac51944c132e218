"""Property tests (hypothesis, float64): the push-through / SMW identity behind every
method, and invariance of a step to the order of the samples in the batch."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gramopt
import models
from gramopt.linalg import solve_damped_psd
from optim_cases import CASES
from reference import params_vector


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    p=st.integers(1, 40),
    log_damping=st.floats(-6, 3),
    seed=st.integers(0, 2**16),
)
def test_smw_identity_matches_dense_solve(n, p, log_damping, seed):
    """(U^T U + lam I)^{-1} U^T r = U^T (U U^T + lam I)^{-1} r."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(n, p, generator=generator, dtype=torch.float64)
    r = torch.randn(n, generator=generator, dtype=torch.float64)
    lam = 10.0**log_damping
    dense = torch.linalg.solve(u.T @ u + lam * torch.eye(p, dtype=torch.float64), u.T @ r)
    a, _ = solve_damped_psd(u @ u.T, r, lam)
    sample_space = u.T @ a
    scale = dense.norm() + 1e-300
    assert (sample_space - dense).norm() / scale < 1e-7


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), loss=st.sampled_from(["mse", "cross_entropy"]))
def test_ggn_step_is_invariant_to_batch_order(seed, loss):
    torch.manual_seed(seed)
    model = models.mlp(out=3).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64) if loss == "mse" else torch.randint(0, 3, (7,))
    perm = torch.randperm(7)
    steps = []
    for order in (torch.arange(7), perm):
        clone = models.mlp(out=3).double()
        clone.load_state_dict(model.state_dict())
        before = params_vector(clone)
        opt = gramopt.GGN(clone, lr=0.5, damping=0.1, loss=loss)
        opt.backward(clone(x[order]), y[order])
        opt.step()
        steps.append(params_vector(clone) - before)
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-9, atol=1e-11)


PERMUTABLE = [case for case in CASES if case.permutation_invariant]
ITERATIVE = ("cg", "sketch-pcg", "nystrom-pcg")


@pytest.mark.parametrize("case", PERMUTABLE, ids=[c.id for c in PERMUTABLE])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_every_step_of_every_method_is_invariant_to_batch_order(case, seed):
    """Three steps with each batch in its order and permuted leave the same parameters,
    for every configuration of optim_cases.CASES but FNGD's sharing phase (below): GGN with
    each solver (the iterative ones to their tolerance), SENG exact, sketched (the
    sketches sample parameters, not samples), implicit and with cached curvature, FNGD's
    estimation steps."""
    torch.manual_seed(seed)
    model = case.build_model(torch.float64)
    twin = copy.deepcopy(model)
    opt, other = case.make(model), case.make(twin)
    generator = torch.Generator().manual_seed(seed)
    iterative = case.kwargs.get("solver") in ITERATIVE
    start = params_vector(model)
    for x, y in case.batches(3, seed=seed, dtype=torch.float64):
        order = torch.randperm(x.shape[0], generator=generator)
        case.step(opt, model, x, y)
        case.step(other, twin, x[order], y[order])
        if iterative:
            # an iterative solve stops at a relative residual: the two orders agree to a
            # fraction of the distance travelled, not entry by entry
            moved = torch.linalg.vector_norm(params_vector(model) - start)
            gap = torch.linalg.vector_norm(params_vector(twin) - params_vector(model))
            assert gap <= 1e-6 * moved, f"permuted batch: {float(gap):.3g} apart after moving {float(moved):.3g}"
        else:
            torch.testing.assert_close(params_vector(twin), params_vector(model), rtol=1e-9, atol=1e-11)


def test_fngd_sharing_phase_depends_on_batch_order(float64):
    """The exception, by design (Algorithm 1 of papers/003_*): shared coefficients are
    tied to batch positions, so a permuted batch gets another sharing step (estimation
    steps are invariant, above)."""
    case = next(c for c in CASES if c.cls is gramopt.FNGD and c.kwargs.get("coefficient_steps"))
    model = case.build_model(torch.float64)
    twin = copy.deepcopy(model)
    opt, other = case.make(model), case.make(twin)
    data = case.batches(case.kwargs["coefficient_steps"] + 1, dtype=torch.float64)
    for x, y in data[:-1]:
        case.step(opt, model, x, y)
        case.step(other, twin, x, y)
    x, y = data[-1]
    order = torch.arange(x.shape[0]).flip(0)
    assert opt.phase == "share"
    case.step(opt, model, x, y)
    case.step(other, twin, x[order], y[order])
    assert not torch.allclose(params_vector(model), params_vector(twin), rtol=1e-6, atol=0)
