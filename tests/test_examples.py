"""The zoo's examples (examples/vit_digits.py, mobilenet_digits.py,
conv_autoencoder_digits.py) run as scripts with a few steps: every method, the
checkpoint written and resumed (model, optimizer and scheduler state_dicts), and the
printed losses finite. Needs scikit-learn (the digits), as the examples do.
examples/resnet_fashion_mnist.py runs on a synthetic Fashion-MNIST folder (the data set
is outside pip)."""

from __future__ import annotations

import math
import re

import pytest

from conftest import FASHION_MNIST, fashion_folder
from example_runner import run_example

pytest.importorskip("sklearn", reason="the examples load scikit-learn's digits (compare extra)")
pytestmark = pytest.mark.filterwarnings("ignore:.*cannot precondition.*:RuntimeWarning")

SCRIPTS = ["vit_digits.py", "mobilenet_digits.py", "conv_autoencoder_digits.py"]


def losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"train loss (\S+)", out)]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("method", ["fngd", "seng", "ggn"])
def test_example_runs_and_resumes(script, method, capsys, tmp_path):
    checkpoint = tmp_path / "run.pt"
    small = ["--method", method, "--batch-size", "8", "--checkpoint", str(checkpoint)]
    first = run_example(script, capsys, "--steps", "2", *small)
    assert "step    2" in first and checkpoint.exists(), first
    second = run_example(script, capsys, "--steps", "3", *small)
    assert "resumed from" in second and "at step 2" in second and "step    3" in second, second
    assert all(math.isfinite(v) for v in losses(first) + losses(second)), (first, second)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_refuses_an_unknown_method(script, capsys):
    with pytest.raises(SystemExit):
        run_example(script, capsys, "--method", "adam", "--steps", "1")
    assert "invalid choice" in capsys.readouterr().err


def test_the_fashion_mnist_example_trains_every_optimizer_on_the_folder_the_environment_names(
    capsys, tmp_path, monkeypatch
):
    pytest.importorskip("matplotlib", reason="the example plots with matplotlib (compare extra)")
    data = tmp_path / "fashion"
    data.mkdir()
    fashion_folder(data, n_train=16, n_test=8)
    monkeypatch.setenv(FASHION_MNIST.env, str(data))
    plot = tmp_path / "curves.png"
    argv = ["--seconds", "0.05", "--evaluations", "1", "--batch-size", "8", "--plot", str(plot)]
    out = run_example("resnet_fashion_mnist.py", capsys, *argv)
    assert "Fashion-MNIST: 16 train, 8 test images" in out, out
    assert all(f"  {name:6s}" in out for name in ("fngd", "seng", "sgd", "adamw")), out
    assert all(math.isfinite(v) for v in losses(out)) and plot.exists(), out


def test_the_fashion_mnist_example_says_how_to_install_the_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST.env, str(tmp_path))
    with pytest.raises(SystemExit) as caught:
        run_example("resnet_fashion_mnist.py", capsys)
    assert "apt-get install dataset-fashion-mnist" in str(caught.value) and FASHION_MNIST.env in str(caught.value)
