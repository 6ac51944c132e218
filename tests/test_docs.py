"""The documentation site: `mkdocs build --strict` with zero warnings, every public name
in the API reference, every paper cited in full, every guide's Python code runs, and the
results the README and the guides quote are those of the committed comparison."""

from __future__ import annotations

import json
import math
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
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
        )
        if done.returncode == 0 or GLOO_TEARDOWN not in done.stderr:
            break
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


#: A gloo worker process that sometimes aborts while its process group is torn down, after
#: the guide's work is done (torch 2.13, one process in about five on this machine; the guide
#: closes the optimizer, drops what uses the group and meets at a barrier first): such a run
#: is repeated, up to three in all; any other failure fails at once.
GLOO_TEARDOWN = "terminate called without an active exception"


# -- results quoted from the committed comparison ------------------------------------------
MARKED = [ROOT / "README.md", *PAGES]
_OPENING = re.compile(r"<!-- (?:s|w|n|x|d|f) [^>]*-->")
_UNMARKED_FIGURE = re.compile(r"\b\d+\.\d+ ?s\b|\b\d+(?:\.\d+)?x\b")


@pytest.fixture(scope="module")
def tables():
    """benchmarks/readme_table.py, which generates the results tables and figures (it
    reads gramopt.compare: the compare extra)."""
    pytest.importorskip("rich", reason="benchmarks/readme_table.py needs the compare extra")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import readme_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return readme_table


@pytest.fixture(scope="module")
def committed_results(tables):
    return tables.load()


def _without_marked(tables, text: str) -> str:
    text = tables._FIGURE.sub("", text)
    for table in (tables._TABLE, tables._WORK_TABLE, tables._SUMMARY):
        text = table.sub("", text)
    return text


@pytest.mark.parametrize("page", MARKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_results_are_those_of_the_committed_json(page, tables, committed_results):
    """Every table and figure marked for benchmarks/readme_table.py equals what the
    committed results.json files give; regenerate them with
    ``python benchmarks/readme_table.py --update``."""
    text = page.read_text()
    rendered = tables.render(text, committed_results)
    if rendered != text:
        stale = [(old, new) for old, new in zip(text.splitlines(), rendered.splitlines(), strict=False) if old != new]
        old, new = stale[0] if stale else ("(the number of lines)", "")
        pytest.fail(f"{page.name}: {len(stale)} line(s) disagree with the committed JSON, first:\n{old}\n{new}")
    # every opening marker is closed (an unclosed one would be skipped, never checked)
    assert len(_OPENING.findall(text)) == len(tables._FIGURE.findall(text)), page.name


def test_every_page_with_results_is_regenerated_by_update(tables):
    """``readme_table.py --update`` without names regenerates every page that quotes the
    committed comparison."""
    quoting = {
        str(page.relative_to(ROOT)) for page in MARKED
        if "<!-- results-" in page.read_text() or _OPENING.search(page.read_text())
    }
    assert quoting == set(tables.PAGES)


def test_the_results_are_quoted_through_markers(tables):
    """The README's summary and the results page's tables come from the JSON, and the prose
    that reads them (each "What it says" of docs/results.md, the short answer of
    which-method.md) quotes no seconds or step-time ratio by hand."""
    assert "<!-- results-summary -->" in (ROOT / "README.md").read_text()
    results = (DOCS / "results.md").read_text()
    for marker in ("<!-- results-summary -->", "<!-- results-table ", "<!-- results-work-table "):
        assert marker in results, marker
    readings = results.split("What it says")[1:]
    assert len(readings) >= 8  # one per task of the committed comparison and one across them
    for reading in readings:
        plainly = _without_marked(tables, reading.split("\n#")[0])
        assert not _UNMARKED_FIGURE.findall(plainly), (_UNMARKED_FIGURE.findall(plainly), plainly[:300])
    short_answer = (DOCS / "guides" / "which-method.md").read_text().split("\n## ")[0]
    rows = [row for row in _without_marked(tables, short_answer).splitlines() if "MNIST" in row or "teacher" in row]
    assert rows and not any(re.search(r"\b\d+\.\d+ ?s\b", row) for row in rows), rows


def _fake_task(name: str, rungs: list[dict], seconds: dict[str, list[float | None]]) -> dict:
    """A results.json task with the fields the tables read: per optimizer the median
    seconds to each rung (None: the median seed missed it)."""
    def summary(value):
        return {"median": value, "median_with_misses": value, "n": 3 if value is not None else 0, "of": 3}
    return {
        "task": {"name": name}, "rungs": rungs, "budget": {"seconds": 10.0},
        "optimizers": {
            opt: {
                "source": "gramopt" if opt in ("ggn", "seng", "fngd") else "torch",
                "summary": {"time_to_rungs": [summary(v) for v in values], "step_time_ratio": {"median": 1.0}},
            }
            for opt, values in seconds.items()
        },
    }


def test_a_lower_is_better_metric_reads_like_the_others(tables):
    """A ladder whose metric falls to its rungs (a PINN's relative L2 error) is labelled by
    its own text and ranked by the seconds to reach each rung, like an accuracy ladder."""
    rungs = [
        {"metric": "relative_l2_error", "value": v, "below": True, "text": f"relative_l2_error <= {v:g}"}
        for v in (1e-2, 1e-3, 1e-4)
    ]
    results = {"tasks": {"poisson2d": _fake_task(
        "poisson2d", rungs, {"ggn": [2.0, 4.0, None], "adamw": [1.0, 6.0, None], "sgd": [3.0, None, None]},
    )}}
    names, table = tables.rows(results)
    assert names == ["ggn", "sgd", "adamw"]
    assert table[0] == ["poisson2d (relative l2 error <= 0.01, 10 s)", "2.00 (3/3)", "3.00 (3/3)", "**1.00** (3/3)"]
    assert table[1][1].startswith("**4.00**") and table[2][1:] == ["miss (0/3)"] * 3
    summary = tables.summary_rows(results)
    assert summary == [[
        "poisson2d (10 s)", "relative l2 error <= 0.01", "`adamw` 1.00 s", "`ggn` 2.00 s (2.00x)",
        "relative l2 error <= 0.001", "`ggn` 4.00 s", "`ggn` (first)",
    ]]
    text = "<!-- results-summary poisson2d -->\n<!-- /results-summary -->\n<!-- s poisson2d 1e-3 ggn -->?<!-- /s -->"
    rendered = tables.render(text, results)
    assert "| poisson2d (10 s) |" in rendered and "-->4.00<!--" in rendered
    with pytest.raises(ValueError, match="no task heat1d"):
        tables.render("<!-- results-table heat1d -->\n<!-- /results-table -->", results)


def test_a_figure_that_disagrees_with_the_json_is_regenerated(tables, committed_results):
    text = "FNGD: <!-- s mnist 0.95 fngd -->1.5<!-- /s --> s, <!-- x mnist fngd -->1.15x<!-- /x -->."
    expected = committed_results["tasks"]["mnist"]["optimizers"]["fngd"]["summary"]
    rendered = tables.render(text, committed_results)
    assert rendered != text
    assert f"-->{expected['time_to_rungs'][1]['median']:.2f}<!--" in rendered
    assert f"-->{expected['step_time_ratio']['median']:.2f}x<!--" in rendered
    with pytest.raises(ValueError, match="no rung 0.96"):
        tables.render("<!-- s mnist 0.96 fngd -->?<!-- /s -->", committed_results)


def test_the_final_metric_figure_is_the_json_median_and_range(tables):
    """``<!-- f TASK OPT -->``: the final test metric's median [min-max] over seeds, as the
    committed results.json of the residual task poisson2d has them."""
    path = ROOT / "benchmarks" / "results" / "compare" / "poisson2d" / "results.json"
    final = json.loads(path.read_text())["tasks"]["poisson2d"]["optimizers"]["adam"]["summary"]["final_metric"]
    text = tables.render("<!-- f poisson2d adam from=poisson2d 2 -->?<!-- /f -->")
    shown = re.fullmatch(r"<!-- f poisson2d adam from=poisson2d 2 -->(\S+) \((\S+) to (\S+)\)<!-- /f -->", text)
    assert shown is not None, text
    for value, key in zip(shown.groups(), ("median", "min", "max"), strict=True):
        assert math.isclose(float(value), final[key], rel_tol=1e-2), (key, value, final[key])
