"""The PINN examples run as scripts with small settings: examples/pinn_poisson.py (the
forward-Laplacian residual with hooks, and the torch.autograd.grad residual with the
functional Jacobian) lowers its loss; examples/deepxde_poisson.py trains DeepXDE's problem
with GaussNewton, and so does examples/pina_poisson.py with PINA's (each skipped without its
library, neither of which is a gramopt dependency)."""

from __future__ import annotations

import math
import re

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
