"""Benchmark: requests per connection, generated services against hand-written ones.

    .venv/bin/python bench/efficiency.py              # ~3 minutes on 2 cores
    .venv/bin/python bench/efficiency.py --write      # and rewrite its section of RESULTS.md

Run by hand, not by the test suite; it needs PostgreSQL's server binaries, like the realdb tier.
Every service gets the same pool (POOL_SIZE + POOL_MAX_OVERFLOW = 5 + 5 = 10 connections, the
same pool_timeout, pre_ping, LIFO) against the same throwaway cluster, and the same load: closed-
loop clients on GET /work?ms=20 (``SELECT pg_sleep(0.02)`` in the request's session). So the
pool's physical limit is 10 connections / 20 ms = 500 requests per second, whatever the code.

Compared, alternating within one run (A B A B ...) so drift hits both alike:

  sync    the generated k8s-sync service  vs  hand-written: ``with SessionLocal() as session:``
          inside a plain ``def`` endpoint (bench/apps.py handwritten_sync_app)
  async   the generated k8s-async service vs  hand-written: ``async with SessionLocal() as
          session:`` in an ``async def`` endpoint (bench/apps.py handwritten_async_app)

Reported: requests per second in the window (median of the rounds), the ratio generated /
hand-written, the share of the physical limit, and the service process's CPU use (user + system
seconds per wall second, from /proc), which says whether the CPU or the pool bounded the number.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load as bench  # noqa: E402  (bench/load.py: the shared service runner)
from harness import ActivitySampler, PostgresCluster, missing_requirements  # noqa: E402
from loadgen import load  # noqa: E402
from services import ServiceProcess, render  # noqa: E402

BEGIN = "<!-- efficiency:begin (written by bench/efficiency.py) -->"
END = "<!-- efficiency:end -->"
POOL = {"pool_size": 5, "max_overflow": 5}
CONNECTIONS = POOL["pool_size"] + POOL["max_overflow"]
WORK_MS = 20


@dataclass
class Run:
    label: str
    round: int
    ok_per_second: float
    cpu: float
    machine: float
    loadgen: float
    peak: int
    errors: dict[str, int]


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core, from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / 100.0


def measure(
    label: str,
    kind: str,
    project,
    cluster: PostgresCluster,
    clients: int,
    seconds: float,
    round_: int,
    workdir: Path,
) -> Run:
    application_name = f"eff-{label.replace(' ', '-')}-{round_}"
    service = ServiceProcess(
        project,
        cluster.dsn(driver=""),
        application_name,
        workdir,
        argv=[str(BENCH / "serve.py"), kind],
        BENCH_PACKAGE=project.package,
        PYTHONPATH=f"{BENCH}:{project.root / 'src'}",
        POOL_SIZE=POOL["pool_size"],
        POOL_MAX_OVERFLOW=POOL["max_overflow"],
    )
    with service:
        service.wait_ready()
        load(service.port, bench.work(WORK_MS), clients=10, duration=2, max_requests=5_000)
        time.sleep(0.5)
        before = cpu_seconds(service.pid)
        machine_before = machine_busy()
        loadgen_before = time.process_time()
        with ActivitySampler(cluster, application_name, max_duration=120) as sampler:
            result = load(
                service.port,
                bench.work(WORK_MS),
                clients=clients,
                duration=seconds,
                max_requests=200_000,
                timeout=30,
            )
        used = cpu_seconds(service.pid) - before
        loadgen = time.process_time() - loadgen_before
        busy_after, total_after = machine_busy()
        machine = (busy_after - machine_before[0]) / max(total_after - machine_before[1], 1)
    window_end = result.started + seconds
    ok = sum(1 for record in result.ok() if record.end <= window_end)
    errors: dict[str, int] = {}
    for record in result.failed():
        key = {-1: "timeout", 0: "transport"}.get(record.status, str(record.status))
        errors[key] = errors.get(key, 0) + 1
    run = Run(
        label,
        round_,
        ok / seconds,
        used / result.duration,
        machine,
        loadgen / result.duration,
        sampler.peak,
        errors,
    )
    print(
        f"  round {round_} {label:<22} {run.ok_per_second:7.1f} req/s  service cpu {run.cpu:.2f}"
        f"  load generator cpu {run.loadgen:.2f}  machine {run.machine:.0%}"
        f"  peak {run.peak} connections  errors {errors or 'none'}",
        flush=True,
    )
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--sync-clients", type=int, default=200)
    parser.add_argument("--async-clients", type=int, default=100)
    parser.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="poolwise-efficiency-"))
    sync = render(workdir / "sync", {"project_name": "eff-sync", "target": "k8s-sync", **POOL})
    async_ = render(workdir / "async", {"project_name": "eff-async", "target": "k8s-async", **POOL})
    pairs = [
        (
            "sync",
            args.sync_clients,
            [
                ("generated k8s-sync", "generated", sync),
                ("hand-written sync", "handwritten_sync", sync),
            ],
        ),
        (
            "async",
            args.async_clients,
            [
                ("generated k8s-async", "generated", async_),
                ("hand-written async", "handwritten_async", async_),
            ],
        ),
    ]
    runs: list[Run] = []
    started = time.monotonic()
    with PostgresCluster(max_connections=100) as cluster:
        sync.create_schema(cluster.dsn())
        for round_ in range(1, args.rounds + 1):
            for _name, clients, services in pairs:
                # Alternate which one goes first, so neither always runs on a warmer machine.
                ordered = services if round_ % 2 else list(reversed(services))
                for label, kind, project in ordered:
                    runs.append(
                        measure(
                            label, kind, project, cluster, clients, args.seconds, round_, workdir
                        )
                    )
    section = report(args, runs, time.monotonic() - started)
    print(section)
    if args.write:
        bench.replace_section(section, BEGIN, END)
    return 0


def report(args: argparse.Namespace, runs: list[Run], elapsed: float) -> str:
    info = bench.machine()
    limit = CONNECTIONS / (WORK_MS / 1000)

    def median(label: str, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in runs if run.label == label)

    lines = [
        BEGIN,
        "## Efficiency at equal connections (bench/efficiency.py)",
        "",
        f"`.venv/bin/python bench/efficiency.py --rounds {args.rounds} --seconds {args.seconds:g}"
        f" --write`, {dt.date.today().isoformat()}, {elapsed / 60:.1f} min. Machine: {info['cpu']},"
        f" {info['memory']}; {info['python']}; {info['postgres']}; {info['packages']}.",
        "",
        f"Every service: {CONNECTIONS} connections (5 + 5), pool_timeout 5 s; load: closed-loop"
        f" clients on `SELECT pg_sleep(0.02)`; physical limit {limit:.0f} req/s. Median of"
        f" {args.rounds} alternating rounds of {args.seconds:g} s; CPU is the service process's"
        " user + system seconds per wall second (1.00 = one core busy); load gen. the same for"
        " the load generator (this process); machine is the share of all cores busy.",
        "",
        "| target | clients | service | req/s | ratio | of the limit | CPU | load gen. | machine"
        " | peak conns |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, clients, generated, handwritten in (
        ("sync", args.sync_clients, "generated k8s-sync", "hand-written sync"),
        ("async", args.async_clients, "generated k8s-async", "hand-written async"),
    ):
        base = median(handwritten, "ok_per_second")
        for label in (generated, handwritten):
            value = median(label, "ok_per_second")
            peak = max(run.peak for run in runs if run.label == label)
            lines.append(
                f"| {name} | {clients} | {label} | {value:.0f} | {value / base:.2f}x"
                f" | {value / limit:.0%} | {median(label, 'cpu'):.2f}"
                f" | {median(label, 'loadgen'):.2f} | {median(label, 'machine'):.0%} | {peak} |"
            )
    lines += ["", "Every round:", ""]
    lines += [
        f"- round {run.round} {run.label}: {run.ok_per_second:.1f} req/s, CPU {run.cpu:.2f},"
        f" load gen. {run.loadgen:.2f}, machine {run.machine:.0%}, peak {run.peak},"
        f" errors {run.errors or 'none'}"
        for run in runs
    ]
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
