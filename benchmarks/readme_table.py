"""The results tables of the README and the docs from ``gramopt compare`` results (``results.json``).

One row per task and rung: the median (over seeds) optimizer-clock seconds of each
optimizer's selected setting to reach the rung, ``(n/N)`` seeds that reached it, "miss"
when the median seed did not, bold for the fastest; then the step time relative to
SGD-momentum (median of the interleaved timing).

    python benchmarks/readme_table.py benchmarks/results/compare/results.json [more.json ...]
    python benchmarks/readme_table.py --leaders ...   # also the report's "First per rung" table per task
    python benchmarks/readme_table.py --work ...      # also in SGD-momentum steps' worth of work

``--work`` is for runs made under different loads (several processes, other jobs on the
machine): seconds then differ between processes by up to ~2x for the same work (measured:
SGD-momentum's fashion-mnist step 16.8 ms alone, 21 ms beside a second comparison, 31-48 ms
with further jobs), while steps times the interleaved step-time ratio do not. It charges a
method the ratio of its first steps (FNGD's estimation phase, not its cheaper sharing phase).

Files that hold the same task with other optimizers (one comparison split over several
processes) are merged into one set of rows when their rungs, budget and seeds agree.
``--replace`` lets a later file's optimizer take the place of an earlier file's (a re-run
of some optimizers of a task, e.g. GGN after a change to it); without it a repeated
optimizer is refused.

The README, docs/results.md and the guides (:data:`PAGES`) show the committed comparison
(:data:`COMMITTED`, merged with ``--replace``) between markers, which ``--update``
regenerates in place (and tests/test_docs.py checks):

    python benchmarks/readme_table.py --update             # every page of PAGES
    python benchmarks/readme_table.py --update README.md   # the pages named

- ``<!-- results-table [TASK ...] -->`` ... ``<!-- /results-table -->``: the seconds table
  above, of the tasks named (every task without a name);
- ``<!-- results-work-table TASK ... -->`` ... ``<!-- /results-work-table -->``: the work
  table's rows of those tasks;
- ``<!-- results-summary [TASK ...] -->`` ... ``<!-- /results-summary -->``: one row per
  task: its first rung and the hardest rung some optimizer's median seed reached, each with
  the first optimizer there and the fastest of gramopt's methods (``source`` "gramopt" in
  the JSON) with its seconds over the first's;
- inline, one figure: ``<!-- s TASK RUNG OPT -->`` seconds to the rung (median over seeds,
  "miss" when the median seed missed), ``<!-- w TASK RUNG OPT -->`` the work to the rung,
  ``<!-- n TASK RUNG OPT -->`` the seeds that reached it, ``<!-- x TASK OPT -->`` the step
  time over SGD-momentum's, ``<!-- d TASK[,TASK...] OPT -->`` "D of N": the runs of every
  setting of its grid that diverged, ``<!-- f TASK OPT -->`` the final test metric, median
  (min to max) over seeds, in scientific notation (DIGITS: significant digits after the
  first, default 1); each closed by ``<!-- /s -->`` (``/w``, ``/n``, ``/x``, ``/d``,
  ``/f``). RUNG is
  the rung's threshold as its text gives it (``0.95``, ``3e-3`` for 0.003); an optional
  DIGITS (decimals; default 2 for s and x, 0 for w) and ``from=DIR`` (one directory under
  benchmarks/results/compare instead of :data:`COMMITTED`, e.g. a ``--grid full`` run).

A rung is met from above or below as its JSON says (``below``: a train loss or a relative
L2 error falls to it, an accuracy rises to it); every table reads the seconds to reach it,
so lower is faster whichever way the metric points, and a rung's label is its own text
(``train loss <= 0.01``, ``test accuracy >= 0.95``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from gramopt.compare.report import LEADER_COLUMNS, leader_rows
from gramopt.compare.run import to_target_spread


def _seconds(summary: dict[str, Any]) -> float:
    value = summary.get("median_with_misses", summary.get("median"))
    return math.inf if value is None else float(value)


def _cell(summary: dict[str, Any], best: bool) -> str:
    seconds = _seconds(summary)
    text = "miss" if not math.isfinite(seconds) else f"{seconds:.2f}"
    text = f"**{text}**" if best and math.isfinite(seconds) else text
    return f"{text} ({summary['n']}/{summary['of']})"


#: Column order: gramopt's methods, then the peers as `gramopt compare --optimizers all` lists them.
ORDER = ("ggn", "fngd", "seng", "sgd", "adamw", "muon", "ikfac", "singd", "soap", "shampoo", "muon-po")


def rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(optimizer names, table rows) over every task in ``results``."""
    names: list[str] = []
    for task in results["tasks"].values():
        names += [n for n in [*task["optimizers"], *task.get("skipped", {})] if n not in names]
    names.sort(key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    table = []
    for task in results["tasks"].values():
        optimizers = task["optimizers"]
        for index, rung in enumerate(task["rungs"]):
            summaries = {n: o["summary"]["time_to_rungs"][index] for n, o in optimizers.items()}
            fastest = min((_seconds(s) for s in summaries.values()), default=math.inf)
            label = _label(task, rung)
            cells = [
                _cell(summaries[n], _seconds(summaries[n]) == fastest) if n in summaries
                else ("not run" if n in task.get("skipped", {}) else "")
                for n in names
            ]
            table.append([label, *cells])
        ratios = []
        for n in names:
            timing = optimizers.get(n, {}).get("summary", {}).get("step_time_ratio")
            ratios.append("" if timing is None else f"{float(timing['median']):.2f}x")
        table.append([f"{task['task']['name']}: step time / SGD", *ratios])
    return names, table


def _label(task: dict[str, Any], rung: dict[str, Any]) -> str:
    return f"{task['task']['name']} ({rung['text'].replace('_', ' ')}, {task['budget']['seconds']:g} s)"


def _steps_to_rung(run: dict[str, Any], index: int) -> float | None:
    """The optimizer steps a run had taken at the evaluation that met rung ``index``
    (None: not reached)."""
    seconds = (run.get("time_to_rungs") or [None] * (index + 1))[index]
    return next((float(r["step"]) for r in run["history"] if r["seconds"] == seconds), None)


def work_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Like :func:`rows`, in a unit the machine's load does not change: the steps each
    optimizer's selected setting took to a rung times its step-time ratio to
    SGD-momentum (measured in turns in one process), i.e. SGD-momentum steps' worth of
    work; median over seeds (a missed seed counting as infinite)."""
    names, _ = rows(results)
    table = []
    for task in results["tasks"].values():
        optimizers = task["optimizers"]
        for index, rung in enumerate(task["rungs"]):
            work: dict[str, dict[str, Any]] = {}
            for name, method in optimizers.items():
                ratio = (method["summary"].get("step_time_ratio") or {}).get("median")
                if ratio is None:  # no interleaved timing: no work figure
                    continue
                steps = [_steps_to_rung(run, index) for run in method["settings"][method["winner"]]["runs"]]
                work[name] = to_target_spread([None if s is None else s * ratio for s in steps])
            fastest = min((_seconds(w) for w in work.values()), default=math.inf)
            label = _label(task, rung)
            cells = []
            for n in names:
                if n not in work:
                    cells.append("not run" if n in task.get("skipped", {}) else "n/a" if n in optimizers else "")
                    continue
                value = _seconds(work[n])
                text = f"{value:.0f}" if math.isfinite(value) else "miss"
                text = f"**{text}**" if value == fastest and math.isfinite(value) else text
                cells.append(f"{text} ({work[n]['n']}/{work[n]['of']})")
            table.append([label, *cells])
    return names, table


def markdown(names: list[str], table: list[list[str]]) -> str:
    return _markdown_table(["task (rung, budget)", *(f"`{n}`" for n in names)], table)


def _markdown_table(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


#: The columns of :func:`summary_rows`.
SUMMARY_COLUMNS = (
    "task (budget)", "first rung", "first there", "gramopt's fastest",
    "hardest rung reached", "first there", "gramopt's fastest",
)


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per task (:data:`SUMMARY_COLUMNS`): its first rung and the hardest rung
    that some optimizer's median seed reached, each with the first optimizer there (ties
    listed) and the fastest of gramopt's methods (the optimizers whose ``source`` is
    "gramopt"), its median seconds and their ratio to the first's."""
    table = []
    for task in results["tasks"].values():
        medians = [
            {n: _seconds(o["summary"]["time_to_rungs"][index]) for n, o in task["optimizers"].items()}
            for index in range(len(task["rungs"]))
        ]
        reached = [i for i, m in enumerate(medians) if any(math.isfinite(v) for v in m.values())]
        cells = [f"{task['task']['name']} ({task['budget']['seconds']:g} s)"]
        for index in (0, reached[-1] if reached else None):
            if index is None:
                cells += ["none", "nobody", "-"]
                continue
            cells += [task["rungs"][index]["text"].replace("_", " "), *_first_and_gramopt(task, medians[index])]
        table.append(cells)
    return table


def _first_and_gramopt(task: dict[str, Any], medians: dict[str, float]) -> list[str]:
    first = min(medians.values(), default=math.inf)
    if not math.isfinite(first):
        return ["nobody", "-"]
    leaders = ", ".join(f"`{n}`" for n, v in medians.items() if v == first)
    own = sorted((v, n) for n, v in medians.items() if task["optimizers"][n].get("source") == "gramopt")
    if not own:
        gramopt = "not run"
    elif not math.isfinite(own[0][0]):
        gramopt = "none reaches it"
    elif own[0][0] == first:
        gramopt = f"`{own[0][1]}` (first)"
    else:
        gramopt = f"`{own[0][1]}` {own[0][0]:.2f} s ({own[0][0] / first:.2f}x)"
    return [f"{leaders} {first:.2f} s", gramopt]


COMPARE_DIR = Path(__file__).resolve().parent / "results" / "compare"
#: What ``--quick`` reads: two committed comparisons (a smoke run of every table).
QUICK_RESULTS = [COMPARE_DIR / task / "results.json" for task in ("teacher", "digits")]

#: The committed comparison the README, docs/results.md and the guides show: directories under
#: benchmarks/results/compare in merge order (a later directory's run of an optimizer
#: replaces an earlier one's: re-runs of some optimizers of a task).
COMMITTED = (
    "teacher", "diabetes", "digits", "mnist", "recall", "recall-ggn-sgd", "charlm", "charlm-ggn-sgd",
    "fashion-mnist-ggn-sgd", "fashion-mnist-fngd-adamw", "fashion-mnist-seng-soap",
    "fashion-mnist-muon-ikfac-singd-shampoo-muonpo", "fashion-resnet-fngd-seng", "fashion-resnet-sgd-adamw-soap",
    "fashion-resnet-muon-ikfac-singd", "fashion-resnet-shampoo-muonpo-ggn", "poisson2d", "heat",
)

#: The pages whose marked tables and figures ``--update`` regenerates by default, relative
#: to the repository root (tests/test_docs.py checks that no other page holds a marker).
PAGES = ("README.md", "docs/results.md", "docs/guides/which-method.md")
ROOT = Path(__file__).resolve().parents[1]

# A table's markers: the opening one (group 1, with the task names in group 2), the old
# table (possibly empty) and the closing one (group 3).
_TABLE = re.compile(r"(<!-- results-table(?: ([^>]*?))? -->\n)(?:.*?\n)??(<!-- /results-table -->)", re.S)
_WORK_TABLE = re.compile(r"(<!-- results-work-table ([^>]*?) -->\n)(?:.*?\n)??(<!-- /results-work-table -->)", re.S)
_SUMMARY = re.compile(r"(<!-- results-summary(?: ([^>]*?))? -->\n)(?:.*?\n)??(<!-- /results-summary -->)", re.S)
_FIGURE = re.compile(r"(<!-- (s|w|n|x|d|f) ([^>\n]*?) -->)([^<\n]*)(<!-- /\2 -->)")


def load(directories: tuple[str, ...] = COMMITTED, root: Path = COMPARE_DIR) -> dict[str, Any]:
    """The tasks of ``root/DIR/results.json`` for each directory, merged in order (a later
    directory's optimizers replace an earlier one's)."""
    merged: dict[str, Any] = {"tasks": {}}
    for directory in directories:
        path = root / directory / "results.json"
        for name, task in json.loads(path.read_text())["tasks"].items():
            merge_task(merged["tasks"], name, task, path, replace=True)
    return merged


def _rung_index(task: dict[str, Any], threshold: str) -> int:
    wanted = float(threshold)
    for index, rung in enumerate(task["rungs"]):
        if math.isclose(float(rung["value"]), wanted, rel_tol=1e-9):
            return index
    raise ValueError(f"task {task['task']['name']!r} has no rung {threshold} ({[r['value'] for r in task['rungs']]})")


def figure(kind: str, args: list[str], results: dict[str, Any], root: Path = COMPARE_DIR) -> str:
    """The text of one inline figure (see the module docstring)."""
    source = next((a.removeprefix("from=") for a in args if a.startswith("from=")), None)
    args = [a for a in args if not a.startswith("from=")]
    if source is not None:
        results = load((source,), root)
    positional = 2 if kind in ("x", "d", "f") else 3
    if len(args) not in (positional, positional + 1):
        raise ValueError(f"<!-- {kind} ... --> takes {positional} names and optional digits, got {args}")
    digits = int(args[positional]) if len(args) > positional else {"w": 0, "n": 0, "f": 1}.get(kind, 2)
    task_name, optimizer = args[0], args[positional - 1]
    if kind == "d":
        statuses = [
            run["status"] for name in task_name.split(",")
            for setting in _method(results, name, optimizer)["settings"] for run in setting["runs"]
        ]
        return f"{statuses.count('diverged')} of {len(statuses)}"
    _method(results, task_name, optimizer)
    task = results["tasks"][task_name]
    if kind == "x":
        return f"{float(task['optimizers'][optimizer]['summary']['step_time_ratio']['median']):.{digits}f}x"
    if kind == "f":
        final = task["optimizers"][optimizer]["summary"]["final_metric"]
        return f"{final['median']:.{digits}e} ({final['min']:.{digits}e} to {final['max']:.{digits}e})"
    index = _rung_index(task, args[1])
    if kind == "w":
        names, table = work_rows({"tasks": {task_name: task}})
        cell = table[index][1 + names.index(optimizer)]
    else:
        summary = task["optimizers"][optimizer]["summary"]["time_to_rungs"][index]
        if kind == "n":
            return str(summary["n"])
        seconds = _seconds(summary)
        return f"{seconds:.{digits}f}" if math.isfinite(seconds) else "miss"
    value = cell.split(" (")[0].strip("*")
    return value if value in ("miss", "n/a", "not run") else f"{float(value):.{digits}f}"


def _method(results: dict[str, Any], task_name: str, optimizer: str) -> dict[str, Any]:
    if task_name not in results["tasks"]:
        raise ValueError(f"no task {task_name!r} in the results")
    if optimizer not in results["tasks"][task_name]["optimizers"]:
        raise ValueError(f"task {task_name!r} has no optimizer {optimizer!r} in the results")
    return results["tasks"][task_name]["optimizers"][optimizer]


def render(text: str, results: dict[str, Any] | None = None, root: Path = COMPARE_DIR) -> str:
    """``text`` with every marked table and figure regenerated from ``results`` (default:
    :func:`load` of :data:`COMMITTED`)."""
    if results is None:
        results = load(root=root)
    text = _TABLE.sub(lambda m: m.group(1) + markdown(*rows(_tasks(results, m))) + "\n" + m.group(3), text)

    def work_table(match: re.Match[str]) -> str:
        tasks = match.group(2).split()
        names, table = work_rows(_tasks(results, match))
        picked = [row for row in table if row[0].split(" (")[0] in tasks]
        return match.group(1) + markdown(names, picked) + "\n" + match.group(3)

    text = _WORK_TABLE.sub(work_table, text)
    def summary(match: re.Match[str]) -> str:
        table = _markdown_table(list(SUMMARY_COLUMNS), summary_rows(_tasks(results, match)))
        return match.group(1) + table + "\n" + match.group(3)

    text = _SUMMARY.sub(summary, text)
    return _FIGURE.sub(lambda m: m.group(1) + figure(m.group(2), m.group(3).split(), results, root) + m.group(5), text)


def _tasks(results: dict[str, Any], marker: re.Match[str]) -> dict[str, Any]:
    """The tasks a table's marker names (every task when it names none), in its order."""
    names = (marker.group(2) or "").split()
    if not names:
        return results
    missing = [n for n in names if n not in results["tasks"]]
    if missing:
        kind = marker.group(1).split()[1]
        raise ValueError(f"{kind}: no task {', '.join(missing)} in the results")
    return {"tasks": {n: results["tasks"][n] for n in names}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path)
    parser.add_argument(
        "--update", nargs="*", type=Path, metavar="MARKDOWN",
        help="regenerate the marked tables and figures of these Markdown files (default: "
        + ", ".join(PAGES) + ") from the committed results",
    )
    parser.add_argument("--leaders", action="store_true", help="also the first optimizer per rung, per (merged) task")
    parser.add_argument(
        "--work", action="store_true", help="also the table in SGD-momentum steps' worth of work (load-independent)"
    )
    parser.add_argument(
        "--replace", action="store_true", help="a later file's optimizer replaces an earlier file's of the same task"
    )
    parser.add_argument("--quick", action="store_true", help="every table of the committed teacher and digits results")
    parser.add_argument("--out", type=Path, help="(writes no file: the tables go to stdout)")
    args = parser.parse_args()
    if args.quick:
        args.results, args.leaders, args.work = args.results or QUICK_RESULTS, True, True
    if args.update is not None:
        results = load()
        for path in args.update or [ROOT / page for page in PAGES]:
            text = path.read_text()
            new = render(text, results)
            if new != text:
                path.write_text(new)
                print(f"updated {path}")
        return
    if not args.results:
        parser.error("give results.json files, or --update [MARKDOWN ...]")
    merged: dict[str, Any] = {"tasks": {}}
    for path in args.results:
        for name, task in json.loads(path.read_text())["tasks"].items():
            merge_task(merged["tasks"], name, task, path, replace=args.replace)
    print(markdown(*rows(merged)))
    if args.work:
        print("\nSGD-momentum steps' worth of work to each rung (steps x step-time ratio):\n")
        print(markdown(*work_rows(merged)))
    if args.leaders:
        for name, task in merged["tasks"].items():
            print(f"\n{name}:\n")
            print("| " + " | ".join(LEADER_COLUMNS) + " |")
            print("| --- " * len(LEADER_COLUMNS) + "|")
            for row in leader_rows(task):
                print("| " + " | ".join(row) + " |")


def merge_task(tasks: dict[str, Any], name: str, task: dict[str, Any], path: Path, replace: bool = False) -> None:
    """Add ``task`` to ``tasks``; a task already there (runs of one task split over
    several processes) takes the new optimizers if both have the same rungs, budget and
    seeds, and is refused otherwise, as is an optimizer that both ran (unless
    ``replace``: then the new file's run of it is kept)."""
    if name not in tasks:
        tasks[name] = task
        return
    kept = tasks[name]
    for key in ("rungs", "budget", "seeds"):
        if kept[key] != task[key]:
            raise SystemExit(f"{path}: task {name!r} has other {key} than an earlier file; cannot merge")
    both = set(kept["optimizers"]) & set(task["optimizers"])
    if both and not replace:
        raise SystemExit(f"{path}: task {name!r} repeats optimizer(s) {', '.join(sorted(both))}; cannot merge")
    kept["optimizers"] = {**kept["optimizers"], **task["optimizers"]}
    kept["skipped"] = {**kept.get("skipped", {}), **task.get("skipped", {})}


if __name__ == "__main__":
    main()
