"""The PINN examples run as scripts with small settings: examples/pinn_poisson.py (the
forward-Laplacian residual with hooks, and the torch.autograd.grad residual with the
functional Jacobian) lowers its loss; examples/pinn_inverse.py identifies its unknown
coefficient kappa with either residual (and runs its Adam and L-BFGS comparisons);
examples/deepxde_poisson.py trains DeepXDE's problem
with GaussNewton, and so does examples/pina_poisson.py with PINA's (each skipped without its
library, neither of which is a gramopt dependency)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from example_runner import run_example

SMALL = ["--hidden", "32", "32", "32", "--interior", "100", "--boundary", "40"]


def logged(out: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{name} (\S+)", out)]


def test_pinn_poisson_trains_with_the_forward_laplacian_and_hooks(capsys):
    out = run_example("pinn_poisson.py", capsys, "--steps", "25", *SMALL)
    losses, errors = logged(out, "loss"), logged(out, "error")
    assert "jacobian='hooks'" in out and len(losses) == 25, out
    assert all(math.isfinite(v) for v in losses + errors), out
    assert losses[-1] < 1e-3 * losses[0], out


def test_pinn_poisson_trains_with_an_autograd_residual_and_the_functional_jacobian(capsys):
    out = run_example("pinn_poisson.py", capsys, "--autograd", "--steps", "25", *SMALL)
    losses = logged(out, "loss")
    assert "jacobian='functional'" in out and len(losses) == 25, out
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 1e-3 * losses[0], out


def test_both_residuals_of_pinn_poisson_give_the_same_first_step(capsys):
    # L before steps 1 and 2 (printed to 4 digits). Later steps drift apart: with damping 1e-10 the
    # solve amplifies the two Jacobians' rounding differences.
    hooks = logged(run_example("pinn_poisson.py", capsys, "--steps", "2", *SMALL), "loss")
    functional = logged(run_example("pinn_poisson.py", capsys, "--autograd", "--steps", "2", *SMALL), "loss")
    assert len(hooks) == 2 and functional == pytest.approx(hooks, rel=1e-3)


INVERSE_SMALL = ["--hidden", "16", "16", "--interior", "150", "--boundary", "40", "--observations", "80"]
KAPPA_TRUE, KAPPA_INIT = 0.7, 2.0  # the example's defaults


def per_step(out: str, name: str) -> list[float]:
    """``name``'s value on each ``step ...`` line of ``out``."""
    return [float(v) for v in re.findall(rf"^step .*?\b{name} (\S+)", out, re.MULTILINE)]


def run_inverse(capsys, *argv: str) -> str:
    """examples/pinn_inverse.py at small sizes. log_kappa's one Jacobian column comes from
    autograd (no Linear layer holds it), exact and cheap: no warning (any warning fails the run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return run_example("pinn_inverse.py", capsys, *INVERSE_SMALL, *argv)


def test_pinn_inverse_identifies_kappa_from_noisy_observations(capsys):
    out = run_inverse(capsys, "--steps", "20")  # noise 1e-2 (the default)
    losses, kappas = per_step(out, "loss"), per_step(out, "kappa")
    assert "J by hooks" in out and len(losses) == len(kappas) == 20, out
    assert all(math.isfinite(v) for v in losses + kappas), out
    # kappa starts 186% off; the test fails unless it ends within 1% (the noise leaves ~1e-3).
    assert abs(kappas[-1] / KAPPA_TRUE - 1) < 1e-2 * abs(KAPPA_INIT / KAPPA_TRUE - 1), out
    assert losses[-1] < 1e-4 * losses[0], out


def test_pinn_inverse_with_an_autograd_residual_takes_the_same_steps(capsys):
    # The Laplacian by torch.autograd.grad: the functional Jacobian's per-point route, kappa's
    # column by autograd; the same J, so the same first steps (L and kappa printed to 4 and 7 digits).
    hooks = run_inverse(capsys, "--steps", "5")
    functional = run_inverse(capsys, "--steps", "5", "--autograd")
    assert "J by functional (per-point)" in functional, functional
    assert len(per_step(hooks, "loss")) == 5, hooks
    assert per_step(functional, "loss") == pytest.approx(per_step(hooks, "loss"), rel=1e-3)
    assert per_step(functional, "kappa") == pytest.approx(per_step(hooks, "kappa"), rel=1e-5)


@pytest.mark.parametrize("optimizer, steps", [("adam", "200"), ("lbfgs", "3")])
def test_pinn_inverse_compares_with_adam_and_lbfgs_on_the_same_loss(capsys, optimizer, steps):
    out = run_inverse(capsys, "--optimizer", optimizer, "--steps", steps, "--log-every", "1")
    losses, kappas = per_step(out, "loss"), per_step(out, "kappa")
    assert len(losses) == int(steps) and all(math.isfinite(v) for v in losses + kappas), out
    assert losses[-1] < 0.5 * losses[0] and kappas[-1] != KAPPA_INIT, out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_deepxde_example_trains_with_gauss_newton(capsys):
    pytest.importorskip("deepxde", reason="examples/deepxde_poisson.py needs DeepXDE (pip install deepxde)")
    small = ["--seconds", "2", "--hidden", "8", "--num-domain", "30", "--num-boundary", "12"]
    for jacobian in ("hooks", "functional"):
        out = run_example("deepxde_poisson.py", capsys, *small, "--optimizers", "gauss-newton", "--jacobian", jacobian)
        errors = logged(out, "relative L2 error")
        assert len(errors) == 1 and math.isfinite(errors[0]), out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pina_example_trains_with_gauss_newton(capsys):
    pytest.importorskip("pina", reason="examples/pina_poisson.py needs PINA (pip install pina-mathlab)")
    small = ["--steps", "30", "--interior", "100", "--boundary", "40"]
    for jacobian in ("hooks", "functional"):
        default_dtype = torch.get_default_dtype()
        try:
            out = run_example("pina_poisson.py", capsys, *small, "--jacobian", jacobian)
        finally:
            torch.set_default_dtype(default_dtype)  # the example sets float64 for PINA's sampling
        losses = logged(out, "loss")
        assert len(losses) == 30 and all(math.isfinite(v) for v in losses), out
        assert losses[-1] < 1e-3 * losses[0], out
