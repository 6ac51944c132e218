"""The README's Results table from ``gramopt compare`` results (``results.json``).

One row per task and rung: the median (over seeds) optimizer-clock seconds of each
optimizer's selected setting to reach the rung, ``(n/N)`` seeds that reached it, "miss"
when the median seed did not, bold for the fastest; then the step time relative to
SGD-momentum (median of the interleaved timing).

    python benchmarks/readme_table.py benchmarks/results/compare/results.json [more.json ...]
    python benchmarks/readme_table.py --leaders ...   # also the report's "First per rung" table per task

Files that hold the same task with other optimizers (one comparison split over several
processes) are merged into one set of rows when their rungs, budget and seeds agree.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def _seconds(summary: dict[str, Any]) -> float:
    value = summary.get("median_with_misses", summary.get("median"))
    return math.inf if value is None else float(value)


def _cell(summary: dict[str, Any], best: bool) -> str:
    seconds = _seconds(summary)
    text = "miss" if not math.isfinite(seconds) else f"{seconds:.2f}"
    text = f"**{text}**" if best and math.isfinite(seconds) else text
    return f"{text} ({summary['n']}/{summary['of']})"


def rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(optimizer names, table rows) over every task in ``results``."""
    names: list[str] = []
    for task in results["tasks"].values():
        names += [n for n in task["optimizers"] if n not in names]
    table = []
    for task in results["tasks"].values():
        budget = task["budget"]["seconds"]
        optimizers = task["optimizers"]
        for index, rung in enumerate(task["rungs"]):
            summaries = {n: o["summary"]["time_to_rungs"][index] for n, o in optimizers.items()}
            fastest = min((_seconds(s) for s in summaries.values()), default=math.inf)
            label = f"{task['task']['name']} ({rung['text'].replace('_', ' ')}, {budget:g} s)"
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


def markdown(names: list[str], table: list[list[str]]) -> str:
    header = "| task (rung, budget) | " + " | ".join(f"`{n}`" for n in names) + " |"
    lines = [header, "| --- " * (len(names) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--leaders", action="store_true", help="also the first optimizer per rung, per (merged) task")
    args = parser.parse_args()
    merged: dict[str, Any] = {"tasks": {}}
    for path in args.results:
        for name, task in json.loads(path.read_text())["tasks"].items():
            merge_task(merged["tasks"], name, task, path)
    print(markdown(*rows(merged)))
    if args.leaders:
        from gramopt.compare.report import leader_rows

        for name, task in merged["tasks"].items():
            print(f"\n{name}:\n")
            print("| rung | first | runner-up (margin) | first seed by seed | fastest gramopt method |")
            print("| --- | --- | --- | --- | --- |")
            for row in leader_rows(task):
                print("| " + " | ".join(row) + " |")


def merge_task(tasks: dict[str, Any], name: str, task: dict[str, Any], path: Path) -> None:
    """Add ``task`` to ``tasks``; a task already there (runs of one task split over
    several processes) takes the new optimizers if both have the same rungs, budget and
    seeds, and is refused otherwise, as is an optimizer that both ran."""
    if name not in tasks:
        tasks[name] = task
        return
    kept = tasks[name]
    for key in ("rungs", "budget", "seeds"):
        if kept[key] != task[key]:
            raise SystemExit(f"{path}: task {name!r} has other {key} than an earlier file; cannot merge")
    both = set(kept["optimizers"]) & set(task["optimizers"])
    if both:
        raise SystemExit(f"{path}: task {name!r} repeats optimizer(s) {', '.join(sorted(both))}; cannot merge")
    kept["optimizers"] = {**kept["optimizers"], **task["optimizers"]}
    kept["skipped"] = {**kept.get("skipped", {}), **task.get("skipped", {})}


if __name__ == "__main__":
    main()
