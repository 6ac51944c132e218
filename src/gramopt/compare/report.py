"""The comparison's tables: ``report.md`` and the table printed at the end.

Both are made from the results dictionary alone (what ``results.json`` holds), so they
can be made again from a saved ``results.json``. Each cell is the median over seeds
with the spread ``[min-max]``; ``(n/N)`` tells how many seeds a value exists for.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

COLUMNS = (
    "optimizer",
    "final train loss",
    "final {metric}",
    "step time / {reference}",
    "peak memory (MiB)",
    "winning setting",
)


def _number(value: float) -> str:
    return f"{value:.3g}"


def _spread(summary: dict[str, Any], scale: float = 1.0) -> str:
    if summary["n"] == 0:
        return "n/a"
    med, low, high = (summary[k] * scale for k in ("median", "min", "max"))
    text = f"{_number(med)} [{_number(low)}-{_number(high)}]"
    return text if summary["n"] == summary["of"] else f"{text} ({summary['n']}/{summary['of']})"


def _to_target(summary: dict[str, Any]) -> str:
    """Median counting a missed seed as infinitely slow; the range over the seeds."""
    n, of, median = summary["n"], summary["of"], summary["median_with_misses"]
    if n == 0:
        return f"not reached (0/{of})"
    med = "not reached" if median is None else _number(median)
    high = _number(summary["max"]) if n == of else "not reached"
    return f"{med} [{_number(summary['min'])}-{high}] ({n}/{of})"


#: The library's own methods, named beside the leader of each rung.
GRAMOPT_METHODS = ("ggn", "seng", "fngd", "gauss-newton")
#: The columns of :func:`leader_rows`.
LEADER_COLUMNS = ("rung", "first", "runner-up (margin)", "first seed by seed", "fastest gramopt method")


def _median_seconds(summary: dict[str, Any]) -> float:
    """Median seconds to a rung over seeds, a missed seed counting as infinitely slow."""
    value = summary.get("median_with_misses")
    return float("inf") if value is None else float(value)


def _seed_leaders(task: dict[str, Any], rung: int) -> dict[str, int]:
    """Per optimizer, the seeds in which its selected setting reached the rung first
    (ties: each tied optimizer counts the seed)."""
    per_seed: dict[int, dict[str, float]] = {}
    for name, method in task["optimizers"].items():
        for run in method["settings"][method["winner"]]["runs"]:
            value = (run.get("time_to_rungs") or [None] * (rung + 1))[rung]
            per_seed.setdefault(run["seed"], {})[name] = float("inf") if value is None else float(value)
    counts: dict[str, int] = {}
    for times in per_seed.values():
        best = min(times.values(), default=float("inf"))
        for name, value in times.items():
            if value == best and value != float("inf"):
                counts[name] = counts.get(name, 0) + 1
    return counts


def leader_rows(task: dict[str, Any]) -> list[list[str]]:
    """Per rung: the first optimizer (median seconds), the runner-up and the margin
    (runner-up's median over the first's), who was first seed by seed, and the fastest
    of gramopt's methods with its distance to the first."""
    out = []
    seeds = len(task["seeds"])
    for index, rung in enumerate(task.get("rungs", [])):
        medians = {n: _median_seconds(m["summary"]["time_to_rungs"][index]) for n, m in task["optimizers"].items()}
        ranked = sorted((v, n) for n, v in medians.items() if v != float("inf"))
        counts = _seed_leaders(task, index)
        by_seed = (
            ", ".join(f"{n} {c}/{seeds}" for n, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"
        )
        if not ranked:
            out.append([rung["text"], "nobody (median seed)", "-", by_seed, "-"])
            continue
        (first_s, first), rest = ranked[0], ranked[1:]
        tied = [n for v, n in rest if v == first_s]
        first_text = f"{' = '.join([first, *tied])} ({_number(first_s)} s)"
        later = [(v, n) for v, n in rest if v != first_s]
        runner = f"{later[0][1]} ({_number(later[0][0])} s, {later[0][0] / first_s:.2f}x)" if later else "-"
        own = sorted((v, n) for n, v in medians.items() if n in GRAMOPT_METHODS)
        if not own:
            gramopt = "not run"
        elif own[0][0] == float("inf"):
            gramopt = "none reaches it (median seed)"
        elif own[0][0] == first_s:
            gramopt = f"{own[0][1]} (first)"
        else:
            gramopt = f"{own[0][1]} ({_number(own[0][0])} s, {own[0][0] / first_s:.2f}x the first)"
        out.append([rung["text"], first_text, runner, by_seed, gramopt])
    return out


def _setting(hyper: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyper.items() if v is not None)


def rows(task: dict[str, Any]) -> list[list[str]]:
    """One row per optimizer (its winning setting): the time to each rung, then the
    columns of :data:`COLUMNS` after the first."""
    out = []
    flagged = {flag["optimizer"] for flag in task.get("flags", [])}
    for name, method in task["optimizers"].items():
        s = method["summary"]
        label = name
        trouble = [f"{s[k]}/{s['final_train_loss']['of']} {k}" for k in ("diverged", "failed") if s[k]]
        if name in flagged:
            trouble.append("step time flagged")
        if trouble:
            label += f" ({', '.join(trouble)})"
        out.append(
            [
                label,
                *(_to_target(r) for r in s.get("time_to_rungs", [])),
                _spread(s["final_train_loss"]),
                _spread(s["final_metric"]),
                _spread(s["step_time_ratio"]),
                _spread(s["peak_memory_bytes"], 1 / 2**20),
                _setting(method["settings"][method["winner"]]["hyper"]),
            ]
        )
    return out


def _headers(task: dict[str, Any]) -> list[str]:
    rungs = [f"s to {rung['metric'].replace('_', ' ')} {'<=' if rung['below'] else '>='} {rung['value']:g}"
             for rung in task.get("rungs", [])]
    reference = {"sgd": "SGD", "adam": "Adam"}.get(task.get("timing_reference", "sgd"), task.get("timing_reference"))
    columns = [c.format(metric=task["task"]["metric"], reference=reference) for c in COLUMNS]
    return [columns[0], *rungs, *columns[1:]]


def _varied(method: dict[str, Any]) -> str:
    """The winning values of the hyper-parameters that the grid varies; the whole setting
    where the grid has one setting only (``--grid base``: nothing varies, all is the task's)."""
    settings = [s["hyper"] for s in method["settings"]]
    winner = settings[method["winner"]]
    if len(settings) == 1:
        return _setting(winner)
    keys = [k for k in winner if len({repr(s.get(k)) for s in settings}) > 1]
    return _setting({k: winner[k] for k in keys})


def rich_table(task: dict[str, Any]) -> Table:
    """The printed summary: report.md's table, of the winning setting only what the
    grid varies. Its cells fold to the terminal's width, never cut (a reader without a
    terminal gets :func:`plain_table`)."""
    table = Table(title=f"{task['task']['name']}: seconds to each rung; budget {task['budget']['text']}")
    for header in _headers(task):
        table.add_column(header, overflow="fold")
    for row, method in zip(rows(task), task["optimizers"].values(), strict=True):
        row[-1] = _varied(method)
        table.add_row(*row)
    return table


def plain_table(task: dict[str, Any]) -> str:
    """The printed summary as a Markdown table (for a reader without a terminal)."""
    body = rows(task)
    for row, method in zip(body, task["optimizers"].values(), strict=True):
        row[-1] = _varied(method)
    title = f"{task['task']['name']}: seconds to each rung; budget {task['budget']['text']}"
    return "\n".join([title, "", *markdown_table(_headers(task), body)])


def _leaders_title(task: dict[str, Any]) -> str:
    return f"{task['task']['name']}: first per rung (median seconds over seeds of each selected setting)"


def rich_leaders(task: dict[str, Any]) -> Table:
    """The printed first-per-rung table (:func:`leader_rows`), as report.md has it."""
    table = Table(title=_leaders_title(task))
    for header in LEADER_COLUMNS:
        table.add_column(header, overflow="fold")
    for row in leader_rows(task):
        table.add_row(*row)
    return table


def plain_leaders(task: dict[str, Any]) -> str:
    """The first-per-rung table as Markdown (for a reader without a terminal)."""
    return "\n".join([_leaders_title(task), "", *markdown_table(list(LEADER_COLUMNS), leader_rows(task))])


def markdown_table(headers: list[str], body: list[list[str]]) -> list[str]:
    """The lines of a Markdown table (``|`` in a cell becomes ``/``)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return lines


def _grid_rows(task: dict[str, Any]) -> list[list[str]]:
    out = []
    for name, method in task["optimizers"].items():
        for i, setting in enumerate(method["settings"]):
            runs = setting["runs"]
            score = setting["score"]
            statuses = {status: sum(r["status"] == status for r in runs) for status in ("diverged", "failed")}
            val = score.get("median_val_time_to_rungs", [])
            reasons = sorted({r["reason"].split(":")[0] for r in runs if r["status"] != "ok" and r["reason"]})
            out.append(
                [
                    name + (" (winner)" if i == method["winner"] else ""),
                    _setting(setting["hyper"]),
                    " / ".join("-" if v is None else _number(v) for v in val) or "n/a",
                    "n/a" if score.get("median_final_val_loss") is None else _number(score["median_final_val_loss"]),
                    "n/a" if score["median_final_train_loss"] is None else _number(score["median_final_train_loss"]),
                    f"{statuses['diverged']}/{len(runs)}" + (f" ({'; '.join(reasons)})" if reasons else ""),
                    f"{statuses['failed']}/{len(runs)}",
                ]
            )
    return out


def flag_lines(task: dict[str, Any]) -> list[str]:
    """The task's flagged step times (``compare.flags``), a sentence each."""
    return [flag["text"] for flag in task.get("flags", [])]


def _cpu(env: dict[str, Any]) -> str:
    """The CPU's model and bfloat16 matmul, where the results record them."""
    if "cpu_model" not in env:
        return "CPU model not recorded"
    flags = ", ".join(env.get("cpu_bfloat16_flags") or []) or "none"
    matmul = env.get("bfloat16_matmul") or {}
    return f"CPU {env['cpu_model']} (bfloat16 flags: {flags}; {matmul.get('text', 'bfloat16 matmul not measured')})"


def _flag_rule(results: dict[str, Any]) -> str:
    rule = results.get("step_time_flags")
    if rule is None:
        return "- Step times were not checked against expectations in this run."
    costs = ", ".join(f"{name} {cost:g}x" for name, cost in rule["expected_step_cost"].items())
    return (
        "- Step time flagged: the median step time over SGD-momentum's exceeds "
        f"{rule['margin']:g} times the cost the optimizer's arithmetic predicts ({costs}; others "
        f"{rule['default_expected_step_cost']:g}x; reasons in `gramopt.compare.config`). Such a row's seconds "
        "measure a slow path of this machine more than the method; each flag names the likely cause where one is known."
    )


def _load(env: dict[str, Any]) -> str:
    """The machine's load average at the start and the end, where the results record it."""
    load = env.get("load_average")
    if not load or not load.get("start"):
        return ""
    text = "/".join(f"{v:g}" for v in load["start"])
    if load.get("end"):
        text += " at the start, " + "/".join(f"{v:g}" for v in load["end"]) + " at the end"
    return f" Load average (1/5/15 min): {text}."


def _task_line(info: dict[str, Any], task: dict[str, Any], target: str) -> str:
    rungs = "; ".join(r["text"] for r in task.get("rungs", [])) or target
    if info.get("kind") == "residual":
        reference = task.get("timing_reference", "adam")
        return (
            f"{info['description']}. Residual task: full batch, loss 1/2 sum of squared residuals; {info['points']}; "
            f"seeds {task['seeds']}. Rungs: {rungs}. Budget: {task['budget']['text']}. An epoch is one step. Step "
            f"times are ratios to {reference}'s step and are not flagged (the expected costs are those of "
            "supervised steps)."
        )
    return (
        f"{info['description']}. Loss: {info['loss']}; batch {info['batch_size']}; seeds {task['seeds']}. "
        f"Rungs: {rungs}. Budget: {task['budget']['text']}. "
        f"Training on {info.get('train_samples', '?')} samples; validation set of {info.get('val_samples', '?')} "
        "carved from the training data (fixed per seed)."
        + (f" Evaluated on fixed random subsets of {info['eval_samples']} train and test samples."
           if info.get("eval_samples") else "")
    )


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        "# gramopt compare",
        "",
        f"Machine: {env['platform']}, {_cpu(env)}, {env['cpu_count']} CPUs, {env['threads']} torch thread(s); "
        f"Python {env['python']}; {versions}. Whole comparison: {results['wall_seconds']:.0f} s of wall-clock time."
        + _load(env),
        "",
        "How to read it:",
        "",
        "- Every cell is the median over seeds and `[min-max]` over seeds, for each optimizer's winning setting; "
        "`(n/N)`: the number of seeds the value exists for (reached the rung, did not diverge). The test figures "
        "are those of the runs of the setting selected on validation.",
        f"- Each optimizer tried {results['grid_size']} setting(s) ({results.get('grid', 'quick')} grid: "
        + {"full": "learning rate x damping for the second-order methods, x weight decay for AdamW, x momentum for SGD "
           "and Muon; see below", "base": "the task's setting for the optimizer alone, untuned in this run"}.get(
            results.get("grid", "quick"), "one knob: the damping for GGN and Gauss-Newton, the learning rate for the "
            "others") + "), every seed each. "
        f"Winner: {results['selection']}.",
        f"- Diverged: {results.get('divergence_rule', 'non-finite loss')}.",
        "- Seconds to each rung: seconds of the optimizer clock (training steps only: forward, backward pass(es), "
        "update; "
        "evaluation, data loading and the display are outside it) at the first evaluation that meets the rung. "
        f"Each run is evaluated at {results['evaluations_per_run']} evenly spaced points of its budget; "
        "a median counts a seed that missed the target as infinitely slow.",
        f"- Step time / SGD: a fresh model and optimizer per method, their steps timed in turns (round robin, "
        f"{results['timing']['rounds']} rounds of {results['timing']['steps_per_round']} steps) in one process, "
        "the ratio to SGD-momentum's step in the same round (median over rounds), per seed.",
        _flag_rule(results),
        f"- Peak memory: resident memory added during {results['memory_steps']} training steps of a fresh model and "
        "optimizer (activations, gradients, optimizer state, temporaries; not the model or data), read from "
        "Linux's peak resident-set counter after resetting it (/proc/self/clear_refs), freed memory returned to "
        "the system first.",
        "- Final train loss and the test metric: at the end of the budget, on the whole train and test sets "
        "(or, where a task says so, on fixed random subsets of them).",
        "",
    ]
    for task in results["tasks"].values():
        info = task["task"]
        target = task["target"]["text"] if task["target"] else "none defined"
        lines += [
            f"## {info['name']}",
            "",
            _task_line(info, task, target),
            "",
        ]
        lines += markdown_table(_headers(task), rows(task))
        if task.get("flags"):
            lines += ["", "Flagged step times:", ""] + [f"- {text}" for text in flag_lines(task)]
        if task.get("rungs"):
            lines += [
                "",
                "First per rung (median over seeds of each selected setting; margin: the runner-up's median over the "
                "first's):",
                "",
            ]
            lines += markdown_table(list(LEADER_COLUMNS), leader_rows(task))
        for name, reason in task.get("skipped", {}).items():
            lines += ["", f"Skipped: {name}, which cannot train this task ({reason_line(reason)})."]
        lines += ["", "Grids (median over seeds per setting):", ""]
        lines += markdown_table(
            [
                "optimizer",
                "setting",
                "validation s to each rung",
                "final val loss",
                "final train loss",
                "diverged",
                "failed",
            ],
            _grid_rows(task),
        )
        lines.append("")
    return "\n".join(lines)


def reason_line(reason: str, limit: int = 300) -> str:
    """A multi-line error message on one line (its first lines joined), at most ``limit`` characters."""
    text = " ".join(line.strip(" -") for line in reason.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
