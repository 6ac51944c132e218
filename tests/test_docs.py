"""The documentation site: `mkdocs build --strict` with zero warnings, every public name
in the API reference, every paper cited in full, and every guide's Python code runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gramopt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

CITATIONS = {
    "arXiv:1905.11675": "Gram-Gauss-Newton Method: Learning Overparameterized Neural Networks for Regression",
    "arXiv:2006.05924": "Sketchy Empirical Natural Gradient Methods for Deep Learning",
    "arXiv:2006.11648": "Training (Overparametrized) Neural Networks in Near-Linear Time",
    "arXiv:2403.03473": "Inverse-Free Fast Natural Gradient Descent Method for Deep Learning",
}


def test_mkdocs_build_strict_has_no_warning(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-4000:]
    assert "WARNING" not in log, log[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="gramopt.GGN"' in api and "damping" in api  # docstrings were rendered
    methods = (tmp_path / "site" / "methods" / "index.html").read_text()
    assert 'class="arithmatex"' in methods  # math went to MathJax


def test_api_reference_lists_every_public_name():
    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: gramopt\.(\w+)$", api, re.M))  # top-level names
    assert documented == set(gramopt.__all__)


def test_methods_page_cites_every_paper_in_full():
    methods = (DOCS / "methods.md").read_text()
    text = " ".join(re.sub(r"^> ", "", methods, flags=re.M).split())  # blockquotes, line breaks
    for arxiv, title in CITATIONS.items():
        assert arxiv in text and title in text, arxiv
    assert "papers/" not in methods and "DESIGN" not in methods


def test_readme_keeps_its_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- main-command -->") == 1 and readme.count("<!-- test-command -->") == 1
    main = readme.split("<!-- main-command -->")[1].split("```")[1]
    test = readme.split("<!-- test-command -->")[1].split("```")[1]
    assert '".[compare]"' in main and "gramopt compare" in main
    assert '".[test,compare,docs]"' in test and "pytest" in test


@pytest.mark.parametrize("page", [p for p in PAGES if PYTHON_BLOCK.search(p.read_text())],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_every_python_block_of_a_page_runs(page, tmp_path):
    # A page's blocks build on each other: they run in order, as one script.
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(PYTHON_BLOCK.findall(page.read_text())))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
