"""Property tests (hypothesis, float64): the push-through / SMW identity behind every
method, and invariance of a step to the order of the samples in the batch."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gramopt
import models
from gramopt.linalg import solve_damped_psd
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
