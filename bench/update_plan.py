"""Benchmark: `poolwise update-plan` over 10 to 200 generated services, against one service.

    .venv/bin/python bench/update_plan.py              # sizes 10, 50, 200; prints the table
    .venv/bin/python bench/update_plan.py --write      # and rewrites its section of RESULTS.md

Run by hand, not by the test suite. The template is tests/test_update.py's release repository
(0.1.0 and 0.2.0 as released, this working tree as v0.3.0) in a temporary directory. One
k8s-sync service is generated from v0.2.0 and copied under other names (as
tests/test_update_plan.py does), each copy with the teams' edits of that test, in its own
repository. Every update goes from v0.2.0 to v0.3.0.

The baseline, measured in the same run (median of --rounds): one service's `copier update
--defaults` as update-plan runs it, plus reading its budget before and after (services.load,
in this process). Each plan is `poolwise update-plan --to v0.3.0 --json DIR` in a fresh
process with the default --jobs (the number of CPUs). The table gives wall and CPU time (the
process and all its children, from getrusage), per service, and each per-service figure's
ratio to the baseline's. CPU time is the steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
BEGIN = "<!-- update-plan:begin (written by bench/update_plan.py) -->"
END = "<!-- update-plan:end -->"
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from test_update import generate, make_template_releases  # noqa: E402
from test_update_plan import LIMITS, PLACEHOLDER, renamed, team_edits  # noqa: E402

from poolwise import scratch, services  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fleet(shape: Path, destination: Path, count: int) -> Path:
    destination.mkdir()
    for index in range(count):
        project = renamed(shape, destination / f"svc-{index:03d}", f"svc-{index:03d}", "bench-db")
        team_edits(project, "k8s-sync")
    return destination


def baseline(shape: Path, work: Path, rounds: int) -> tuple[float, float]:
    """One service: budget before, copier update as update-plan runs it, budget after."""
    walls, cpus = [], []
    for round_ in range(rounds):
        project = fleet(shape, work / f"baseline-{round_}", 1) / "svc-000"
        wall, cpu = time.perf_counter(), self_cpu() + children_cpu()
        services.load(project)
        argv = [*scratch.copier_command(), "update", "--defaults", "--quiet"]
        argv += ["--conflict", "inline", "--vcs-ref", "v0.3.0"]
        subprocess.run(argv, cwd=project, check=True, capture_output=True)
        after = services.load(project)
        walls.append(time.perf_counter() - wall)
        cpus.append(self_cpu() + children_cpu() - cpu)
        assert after.template_version == "v0.3.0", after.template_version
    return statistics.median(walls), statistics.median(cpus)


def plan(directory: Path, count: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    wall, cpu = time.perf_counter(), children_cpu()
    result = subprocess.run(
        [sys.executable, "-m", "poolwise", "update-plan", "--to", "v0.3.0", "--json", directory],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall, cpu = time.perf_counter() - wall, children_cpu() - cpu
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(json.loads(result.stdout)["services"]) == count
    return wall, cpu


def table(base: tuple[float, float], rows: list[tuple[int, float, float]]) -> list[str]:
    base_wall, base_cpu = base
    lines = [
        "| services | wall s | wall / service s | x baseline | CPU s | CPU / service s"
        " | x baseline | wall vs first size |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| 1 (baseline: copier update + budget, median) | {base_wall:.1f} | {base_wall:.2f}"
        f" | 1.00 | {base_cpu:.1f} | {base_cpu:.2f} | 1.00 | |",
    ]
    first_count, first_wall, _ = rows[0]
    for count, wall, cpu in rows:
        growth = (wall / first_wall) / (count / first_count)
        lines.append(
            f"| {count} | {wall:.1f} | {wall / count:.2f} | {wall / count / base_wall:.2f}"
            f" | {cpu:.1f} | {cpu / count:.2f} | {cpu / count / base_cpu:.2f}"
            f" | {wall / first_wall:.1f}x for {count / first_count:.0f}x the services"
            f" ({growth:.2f} per service) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--rounds", type=int, default=3, help="baseline rounds (median)")
    parser.add_argument("--write", action="store_true", help="rewrite the section of RESULTS.md")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="poolwise-bench-update-") as tmp:
        work = Path(tmp)
        (work / "template").mkdir()
        template = make_template_releases(work / "template" / "poolwise")
        placeholder, _, placeholder_db = PLACEHOLDER
        shape = generate(
            template,
            work / "shape",
            {"project_name": placeholder, "db_cluster": placeholder_db, **LIMITS},
            release="v0.2.0",
        )
        # One cluster big enough for 200 services of 46 connections.
        limits = shape / "src" / PLACEHOLDER[1] / "db" / "database_limits.toml"
        limits.write_text(
            limits.read_text().replace("max_connections = 190", "max_connections = 10000")
        )
        base = baseline(shape, work, args.rounds)
        print(f"baseline: {base[0]:.1f} s wall, {base[1]:.1f} s CPU", flush=True)
        rows: list[tuple[int, float, float]] = []
        for count in sizes:
            directory = fleet(shape, work / f"fleet-{count}", count)
            wall, cpu = plan(directory, count)
            rows.append((count, wall, cpu))
            print(f"{count} services: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
            shutil.rmtree(directory)
            # Written after each size, so a long run leaves what it measured.
            report(args, base, rows)


def report(
    args: argparse.Namespace, base: tuple[float, float], rows: list[tuple[int, float, float]]
) -> None:
    load = os.getloadavg()
    header = [
        BEGIN,
        f"Command: `.venv/bin/python bench/update_plan.py --sizes {args.sizes}"
        f" --rounds {args.rounds}`, {dt.date.today()}, {platform.platform()},"
        f" {os.cpu_count()} CPUs, Python {platform.python_version()}; load average when the"
        f" last size ended {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min).",
        "",
    ]
    lines = [*header, *table(base, rows), END]
    print("\n".join(lines), flush=True)
    if args.write:
        text = RESULTS.read_text()
        if BEGIN in text:
            start, end = text.index(BEGIN), text.index(END) + len(END)
            text = text[:start] + "\n".join(lines) + text[end:]
        else:
            text = text.rstrip("\n") + "\n\n## poolwise update-plan (bench/update_plan.py)\n\n"
            text += "\n".join(lines) + "\n"
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
