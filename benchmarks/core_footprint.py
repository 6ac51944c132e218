"""Footprint of ``pip install gramopt`` (the core, no extras): import time and installed size,
for the working tree against a git revision (default: main).

Import time: ``python -c "import gramopt"`` in fresh subprocesses, the two source trees in
turns (round robin, so changes of load fall on both alike), median over ``--repeats``;
also the import time of ``torch`` alone as the floor. Installed size: the files listed in
the RECORD of every installed distribution in the closure of the core requirements of
each revision's pyproject.toml (extras not followed), summed. Writes
benchmarks/results/core_footprint.json.

    python benchmarks/core_footprint.py --before main --repeats 15
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import tomllib

from bench_common import arguments, write_json

ROOT = Path(__file__).resolve().parents[1]


def core_requirements(pyproject: str) -> list[str]:
    return tomllib.loads(pyproject)["project"]["dependencies"]


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]


def closure(names: list[str]) -> dict[str, metadata.Distribution]:
    """Installed distributions reachable from ``names`` through their unconditional
    requirements (those without an environment marker naming an extra)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        key = requirement_name(todo.pop()).lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue
        found[key] = dist
        for requirement in dist.requires or []:
            marker = requirement.partition(";")[2]
            if "extra" in marker:
                continue
            if marker.strip() and not _marker_holds(marker):
                continue
            todo.append(requirement)
    return found


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def installed_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def import_seconds(src: Path, module: str) -> float:
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True)
    return time.perf_counter() - start


def extracted_source(revision: str, into: Path) -> tuple[Path, str]:
    archive = into / "src.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "-o", str(archive), revision, "src", "pyproject.toml"], check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src", (into / "pyproject.toml").read_text()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--before", default="main", help="git revision to compare with (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.quick:  # the checked-out commit against the working tree, once
        args.before, args.repeats = "HEAD", 1
    with tempfile.TemporaryDirectory() as tmp:
        before_src, before_pyproject = extracted_source(args.before, Path(tmp))
        trees = {"before": before_src, "after": ROOT / "src"}
        pyprojects = {"before": before_pyproject, "after": (ROOT / "pyproject.toml").read_text()}
        seconds: dict[str, list[float]] = {"torch": [], "before": [], "after": []}
        for _ in range(args.repeats):
            seconds["torch"].append(import_seconds(ROOT / "src", "torch"))
            for name, src in trees.items():
                seconds[name].append(import_seconds(src, "gramopt"))
    result: dict[str, object] = {
        "before_revision": args.before,
        "repeats": args.repeats,
        "python": sys.version.split()[0],
        "import_seconds_median": {name: statistics.median(values) for name, values in seconds.items()},
        "import_seconds": seconds,
    }
    sizes = {}
    for name, pyproject in pyprojects.items():
        requirements = core_requirements(pyproject)
        dists = closure(requirements)
        per_dist = {key: installed_bytes(dist) for key, dist in sorted(dists.items())}
        sizes[name] = {
            "requirements": requirements,
            "distributions": per_dist,
            "total_mib": sum(per_dist.values()) / 2**20,
            "total_without_torch_mib": sum(v for k, v in per_dist.items() if k != "torch") / 2**20,
        }
    result["installed"] = sizes
    write_json(result, args.out / "core_footprint.json")
    for name in ("torch", "before", "after"):
        print(f"import {'torch' if name == 'torch' else 'gramopt (' + name + ')'}: "
              f"{result['import_seconds_median'][name]:.3f} s median of {args.repeats}")
    for name, size in sizes.items():
        print(f"core install ({name}): {len(size['distributions'])} distributions, {size['total_mib']:.0f} MiB "
              f"({size['total_without_torch_mib']:.0f} MiB without torch)")


if __name__ == "__main__":
    main()
