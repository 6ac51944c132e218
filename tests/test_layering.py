"""The import layering of the package, read from the sources (ast): data flows one way,
and layer knowledge lives in gramopt.capture only.

- Each package imports only from the tiers below it (and from itself): errors and losses,
  then linalg (numerics), capture (hooks -> factors), pde and distributed (collaborators
  of the methods), optim (the methods), the public names, and the application on top.
  Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
- optim/ asks handlers and factors for capabilities: it imports from capture only the
  engine and the abstract factor interface, never a concrete handler or factor class, and
  never names a torch layer type (``nn.Linear``, ``nn.modules.conv._ConvNd``, ...).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
from torch import nn

import gramopt
from gramopt.capture.factors import LayerFactors
from gramopt.capture.handlers import LayerHandler

SOURCE = Path(gramopt.__file__).parent

#: Lowest first: a package may import from its own tier's package and from lower tiers.
TIERS: list[set[str]] = [
    {"errors", "losses"},
    {"linalg"},
    {"capture"},
    {"pde", "distributed"},
    {"optim"},
    {"<root>"},  # gramopt/__init__.py: the public names
    {"tasks", "integrations"},
    {"training"},
    {"compare"},
    {"cli"},
    {"console"},
    {"__main__"},
]
TIER = {package: level for level, packages in enumerate(TIERS) for package in packages}

#: What optim/ may import from capture: the engine and the abstract factor interface.
OPTIM_CAPTURE_MODULES = {"gramopt.capture", "gramopt.capture.engine", "gramopt.capture.factors"}
#: The torch.nn names optim/ may use (types of arguments, not layer types).
OPTIM_NN_NAMES = {"Module", "Parameter"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    """``gramopt.capture.engine`` -> ``capture``; the root package -> ``<root>``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every ``gramopt`` import outside ``if TYPE_CHECKING:``
    (``from gramopt import x`` gives module ``gramopt.x``)."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "gramopt":
            if node.module == "gramopt":
                found.extend((node.lineno, f"gramopt.{a.name}", []) for a in node.names)
            else:
                found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "gramopt")
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "<relative>", []))
    return found


SOURCES = sorted(SOURCE.rglob("*.py"))


def test_every_package_has_a_tier():
    packages = {_package(_module_name(path)) for path in SOURCES}
    assert packages <= set(TIER), f"packages without a tier in tests/test_layering.py: {sorted(packages - set(TIER))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_imports_go_down_the_tiers(path):
    module = _module_name(path)
    mine = _package(module)
    wrong = []
    for line, target, _ in _runtime_imports(ast.parse(path.read_text())):
        if target == "<relative>":
            wrong.append(f"line {line}: a relative import (gramopt uses absolute ones)")
            continue
        theirs = _package(target)
        if theirs != mine and TIER.get(theirs, -1) >= TIER[mine]:
            wrong.append(f"line {line}: {mine} imports {target} ({theirs} is not below {mine})")
    assert not wrong, f"{module}:\n" + "\n".join(wrong)


OPTIM_SOURCES = [path for path in SOURCES if _package(_module_name(path)) == "optim"]


def _concrete_layer_class(value: object) -> bool:
    if not inspect.isclass(value) or value in (LayerHandler, LayerFactors):
        return False
    return issubclass(value, (LayerHandler, LayerFactors))


@pytest.mark.parametrize("path", OPTIM_SOURCES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_optim_asks_capabilities_of_the_abstract_interface(path):
    """No concrete handler or factor class, no capture module beyond the engine and the
    factor interface, nothing that capture only passes on (a numerical helper, e.g. a Gram
    kernel or a finiteness check, is imported from linalg, where it lives)."""
    wrong = []
    for line, target, names in _runtime_imports(ast.parse(path.read_text())):
        if _package(target) != "capture":
            continue
        if target not in OPTIM_CAPTURE_MODULES:
            wrong.append(f"line {line}: imports {target}")
            continue
        imported = importlib.import_module(target)
        for name in names:
            value = getattr(imported, name, None)
            if _concrete_layer_class(value):
                wrong.append(f"line {line}: imports the concrete class {name}")
            elif not getattr(value, "__module__", "gramopt.capture").startswith("gramopt.capture"):
                wrong.append(f"line {line}: imports {name} through capture (it lives in {value.__module__})")
    assert not wrong, f"{path.name}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", OPTIM_SOURCES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_optim_names_no_layer_type(path):
    """``nn.Linear``, ``nn.modules.conv._ConvNd``, ``torch.nn.Conv2d``: a method asks the
    layer's handler (``dense_layer``, ``low_rank_layout``) instead of testing its type."""
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nn":
            if node.attr not in OPTIM_NN_NAMES:
                wrong.append(f"line {node.lineno}: nn.{node.attr}")
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "torch.nn":
            wrong.append(f"line {node.lineno}: torch.nn.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch.nn"):
            if node.module != "torch.nn" or any(a.name not in OPTIM_NN_NAMES | {"functional"} for a in node.names):
                wrong.append(f"line {node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
    assert not wrong, f"{path.name}:\n" + "\n".join(wrong)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The three checks on snippets that break them (a check that cannot fail proves nothing)."""
    tree = ast.parse("from gramopt.optim.base import X\nif TYPE_CHECKING:\n    from gramopt.cli import Y\n")
    assert [t for _, t, _ in _runtime_imports(tree)] == ["gramopt.optim.base"]
    assert _concrete_layer_class(gramopt.capture.SharedWeightFactors)
    assert _concrete_layer_class(gramopt.capture.attention.MultiheadAttentionHandler)
    assert not _concrete_layer_class(LayerFactors) and not _concrete_layer_class(gramopt.capture.CaptureEngine)
    linear = [n for n in ast.walk(ast.parse("isinstance(m, nn.Linear)")) if isinstance(n, ast.Attribute)]
    assert linear and linear[0].attr not in OPTIM_NN_NAMES
    assert nn.MultiheadAttention in gramopt.capture.registry._REGISTRY  # attention is a handler like any other
