"""Benchmark: requests per second at equal connections, generated services against hand-written.

    .venv/bin/python bench/efficiency.py --targets sync          # ~3 minutes on 2 cores
    .venv/bin/python bench/efficiency.py --ms 0 --clients 50     # a short query
    .venv/bin/python bench/efficiency.py --write                 # and rewrite RESULTS.md

Run by hand, not by the test suite; it needs PostgreSQL's server binaries, like the realdb tier.
Every service gets the same pool (POOL_SIZE + POOL_MAX_OVERFLOW = 5 + 5 = 10 connections, the
same pool_timeout, LIFO) against the same throwaway cluster, and the same load: closed-loop
clients on GET /work?ms=MS (``SELECT pg_sleep(MS / 1000)`` in the request's session), at each
client count of --clients in turn. At 20 ms the pool's physical limit is 10 connections / 20 ms
= 500 requests per second, whatever the code; at 0 ms the services' CPU decides.

Compared, taking turns within one run so drift hits both alike:

  sync    the generated k8s-sync service  vs  hand-written: ``with SessionLocal() as session:``
          inside a plain ``def`` endpoint (bench/apps.py handwritten_sync_app)
  async   the generated k8s-async service vs  hand-written: ``async with SessionLocal() as
          session:`` in an ``async def`` endpoint (bench/apps.py handwritten_async_app)

A round starts every service (each on a database of its own, copied from the app database),
warms each up, and then at every client count measures one after the other, the order rotating
at every count and every round: the runs compared are seconds apart, not a whole round.
(Until 2026-12-04 each service served all client counts in one life, one after the other, and
the runs compared were half a minute apart; on a shared 2-core machine that left per-round
ratios spread by up to 0.6 at one client count.) Only the service being measured gets
requests; the other sits idle with its connections open.

    --control    also runs a second copy of each hand-written service and compares it with the
                 first, in the same rounds: the spread of a comparison where nothing differs,
                 against which to read the generated service's.
    --together   loads the compared services at the same time, each with its own clients,
                 instead of in turn: no time between the runs compared, but the services share
                 the cores with each other.
    --steady     also runs each hand-written service with a pool that never closes a connection
                 it has opened (pool_size 10, max_overflow 0: the same 10 connections), compared
                 with the first: what QueuePool's closing and reopening of burst connections,
                 which the generated pool does not do, is worth at each load.
    --pin        gives the services a core of their own (CPU 1) and leaves the other (CPU 0) to
                 the load generator and PostgreSQL, as a deployed service has its own CPU and
                 its database another machine's: the service measured no longer competes with
                 the load it is given. Each core's busy share is reported, to show which one
                 bounded the number.

    --spread N   makes each query last MS - N to MS + N ms, drawn from a fixed table so every
                 service gets the same durations, instead of exactly MS: pg_sleep is exact,
                 and a closed loop of as many clients as connections on an exact query falls
                 into step (every request finishes and queues for the service's CPU with the
                 others, every time) unless something, such as a pool reopening connections,
                 knocks it out of step. Real queries vary. bench/lockstep.py measures the
                 lock without HTTP.

Reported per client count: requests per second (median of the rounds), the ratio generated /
hand-written of the medians and its spread over the rounds (each round's own ratio), the service
process's CPU use (user + system seconds per wall second, from /proc), and the PostgreSQL
sessions each service process opened over its life (pg_stat_database of its own database, read
once the process has exited): 10 for a pool of 10 that never churns.

bench/latency.py reuses this script's runner with a latency proxy in front of PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from psycopg import sql

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load as bench  # noqa: E402  (bench/load.py: the shared service runner)
from harness import ActivitySampler, PostgresCluster, missing_requirements  # noqa: E402
from loadgen import LoadResult, load, run_load  # noqa: E402
from services import RenderedProject, ServiceProcess, render  # noqa: E402

T = TypeVar("T")
POOL = {"pool_size": 5, "max_overflow": 5}
CONNECTIONS = POOL["pool_size"] + POOL["max_overflow"]
TARGETS = {
    "sync": ("generated k8s-sync", "hand-written sync", "handwritten_sync"),
    "async": ("generated k8s-async", "hand-written async", "handwritten_async"),
}


@dataclass
class Run:
    label: str
    round: int
    clients: int
    ok_per_second: float
    cpu: float
    machine: float
    peak: int
    errors: dict[str, int]
    cores: list[float] = field(default_factory=list)  # busy share of each core during the run


@dataclass
class Life:
    """One service process of one round: its runs and the sessions it opened."""

    label: str
    round: int
    runs: list[Run] = field(default_factory=list)
    sessions: int = 0


@dataclass
class Variant:
    label: str
    kind: str  # the bench/apps.py factory
    project: RenderedProject
    env: dict[str, str] = field(default_factory=dict)


def core_busy() -> list[tuple[float, float]]:
    """(busy, total) jiffies of all cores together, then of each core, from /proc/stat."""
    counters = []
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        values = [int(value) for value in line.split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        counters.append((sum(values) - idle, sum(values)))
    return counters


def busy_between(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> list[float]:
    """Busy share of each counter of core_busy() between two readings."""
    return [
        (busy_after - busy_before) / max(total_after - total_before, 1)
        for (busy_before, total_before), (busy_after, total_after) in zip(
            before, after, strict=True
        )
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / 100.0


def database_for(cluster: PostgresCluster, label: str) -> str:
    """A database of the variant's own, copied from the app database (schema included).

    Every service of a round runs at once, so pg_stat_database can count each one's sessions
    only if each has a database of its own.
    """
    name = "eff_" + "".join(ch if ch.isalnum() else "_" for ch in label.lower())
    exists = cluster.psql("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if not exists:
        cluster.psql(
            sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE {}").format(
                sql.Identifier(name),
                sql.Identifier(cluster.app_user),
                sql.Identifier(cluster.app_db),
            )
        )
    return name


def sessions_opened(cluster: PostgresCluster, database: str) -> int:
    """Sessions PostgreSQL has started for one database."""
    rows = cluster.psql("SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,))
    return int(rows[0][0])


def start(
    variant: Variant, cluster: PostgresCluster, dsn: str, round_: int, workdir: Path
) -> tuple[ServiceProcess, str, int]:
    """Start one variant's service on its own database: (service, database, sessions before)."""
    database = database_for(cluster, variant.label)
    application_name = f"eff-{variant.label.replace(' ', '-').replace(',', '')}-{round_}"
    service = ServiceProcess(
        variant.project,
        f"{dsn.rsplit('/', 1)[0]}/{database}",
        application_name,
        workdir,
        argv=[str(BENCH / "serve.py"), variant.kind],
        **{
            "BENCH_PACKAGE": variant.project.package,
            "PYTHONPATH": f"{BENCH}:{variant.project.root / 'src'}",
            "POOL_SIZE": POOL["pool_size"],
            "POOL_MAX_OVERFLOW": POOL["max_overflow"],
            **variant.env,  # a variant's own settings win
        },
    )
    return service, database, sessions_opened(cluster, database)


def served_per_second(result: LoadResult, seconds: float) -> float:
    """Successful requests per second within the run's window; the drain after it not counted."""
    window_end = result.started + seconds
    return sum(1 for record in result.ok() if record.end <= window_end) / seconds


def measure(
    turn: list[tuple[str, ServiceProcess]],
    cluster: PostgresCluster,
    clients: int,
    ms: int,
    seconds: float,
    round_: int,
    spread: int = 0,
) -> list[Run]:
    """Load every service of `turn` at once, `clients` clients each, for `seconds`: one Run each."""
    before = [cpu_seconds(service.pid) for _label, service in turn]
    cores_before = core_busy()
    with contextlib.ExitStack() as stack:
        samplers = [
            stack.enter_context(
                ActivitySampler(cluster, service.application_name, max_duration=120)
            )
            for _label, service in turn
        ]
        results = asyncio.run(
            load_at_once([service.port for _label, service in turn], clients, ms, seconds, spread)
        )
    used = [
        cpu_seconds(service.pid) - start
        for (_label, service), start in zip(turn, before, strict=True)
    ]
    machine, *cores = busy_between(cores_before, core_busy())
    runs = []
    for (label, _service), result, sampler, cpu in zip(turn, results, samplers, used, strict=True):
        errors: dict[str, int] = {}
        for record in result.failed():
            key = {-1: "timeout", 0: "transport"}.get(record.status, str(record.status))
            errors[key] = errors.get(key, 0) + 1
        run = Run(
            label,
            round_,
            clients,
            served_per_second(result, seconds),
            cpu / result.duration,
            machine,
            sampler.peak,
            errors,
            cores,
        )
        print(
            f"  round {round_} {label:<28} {clients:4d} clients {run.ok_per_second:7.1f} req/s"
            f"  cpu {run.cpu:.2f}  machine {run.machine:.0%}"
            f" ({', '.join(f'{share:.0%}' for share in cores)})  peak {run.peak}"
            f"  errors {errors or 'none'}",
            flush=True,
        )
        runs.append(run)
    return runs


async def load_at_once(
    ports: list[int], clients: int, ms: int, seconds: float, spread: int = 0
) -> list[LoadResult]:
    """Closed-loop load on every port at once, from one event loop (the load generator's CPU
    is shared alike)."""
    return list(
        await asyncio.gather(
            *(
                run_load(
                    port,
                    bench.work(ms, spread),
                    clients=clients,
                    duration=seconds,
                    max_requests=200_000,
                    timeout=30,
                )
                for port in ports
            )
        )
    )


def rotated(items: list[T], shift: int) -> list[T]:
    """`items` rotated left by `shift`: each one comes first in turn as `shift` counts up."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def alternate(
    groups: list[tuple[Variant, ...]],
    cluster: PostgresCluster,
    dsn: str,
    clients: list[int],
    ms: int,
    seconds: float,
    rounds: int,
    workdir: Path,
    together: bool = False,
    spread: int = 0,
) -> list[Life]:
    """Every group, every round: its services run at once, taking turns at each client count.

    A round starts one process per variant (each on a database of its own) and warms each up;
    then, at every client count, each variant is measured in turn, the order rotating at every
    count and every round (each variant first, middle and last alike: with three variants and
    the baseline always in the middle, a second copy of it measured 0.91x of it in all seven
    rounds at one client count), so the runs compared are seconds apart and drift on a shared
    machine hits both alike. Only the variant being measured gets requests: the others sit
    idle with their connections open.

    spread: each query lasts ms - spread to ms + spread (bench/load.py work), the same
    durations for every variant.

    together: at every client count the variants are loaded at the same time instead, each
    with its own `clients` clients, so they share the same machine in the same seconds: no
    drift between the runs compared at all, at the price of sharing the cores with each other.
    """
    lives = []
    for round_ in range(1, rounds + 1):
        for group in groups:
            order = rotated(list(group), round_)
            with contextlib.ExitStack() as stack:
                running = []
                for variant in order:
                    service, database, before = start(variant, cluster, dsn, round_, workdir)
                    stack.enter_context(service)
                    service.wait_ready()
                    load(
                        service.port,
                        bench.work(ms, spread),
                        clients=10,
                        duration=2,
                        max_requests=5_000,
                    )
                    running.append(
                        (variant, service, database, before, Life(variant.label, round_))
                    )
                life_of = {variant.label: life for variant, _s, _d, _b, life in running}
                for index, count in enumerate(clients):
                    # running is already rotated by the round: together, by round + index.
                    order_now = rotated(running, index)
                    entries = [(variant.label, service) for variant, service, *_ in order_now]
                    turns = [entries] if together else [[entry] for entry in entries]
                    for turn in turns:
                        time.sleep(0.5)
                        for run in measure(turn, cluster, count, ms, seconds, round_, spread):
                            life_of[run.label].runs.append(run)
            time.sleep(1.0)  # the backends' exit reports reach pg_stat_database
            for variant, _service, database, before, life in running:
                life.sessions = sessions_opened(cluster, database) - before
                print(
                    f"  round {round_} {variant.label}: {life.sessions} sessions opened", flush=True
                )
                lives.append(life)
    return lives


def ratio_table(lives: list[Life], pairs: list[tuple[str, str]], clients: list[int]) -> list[str]:
    """Per baseline and client count: a row per service compared with it, then its own row.

    Each row: req/s (median of the rounds), ratio of medians, the per-round ratios, CPU.
    """
    runs = [run for life in lives for run in life.runs]
    lines = [
        "| clients | service | req/s (median) | x baseline | per-round ratios (min - max) | CPU"
        " | peak conns | errors |",
        "|---:|---|---:|---:|---|---:|---:|---|",
    ]
    compared: dict[str, list[str]] = {}
    for label, baseline in pairs:
        compared.setdefault(baseline, []).append(label)

    def rounds_of(label: str, count: int) -> dict[int, Run]:
        return {r.round: r for r in runs if r.label == label and r.clients == count}

    def row(
        count: int, label: str, measured: dict[int, Run], base_median: float, spread: str
    ) -> str:
        value = statistics.median(r.ok_per_second for r in measured.values())
        errors: dict[str, int] = {}
        for run in measured.values():
            for key, number in run.errors.items():
                errors[key] = errors.get(key, 0) + number
        return (
            f"| {count} | {label} | {value:.0f} | {value / base_median:.2f}x | {spread}"
            f" | {statistics.median(r.cpu for r in measured.values()):.2f}"
            f" | {max(r.peak for r in measured.values())} | {errors or 'none'} |"
        )

    for baseline, labels in compared.items():
        for count in clients:
            base = rounds_of(baseline, count)
            base_median = statistics.median(r.ok_per_second for r in base.values())
            for label in labels:
                mine = rounds_of(label, count)
                ratios = sorted(
                    mine[n].ok_per_second / base[n].ok_per_second
                    for n in mine
                    if n in base and base[n].ok_per_second
                )
                spread = (
                    f"{', '.join(f'{x:.2f}' for x in ratios)} ({ratios[0]:.2f} - {ratios[-1]:.2f})"
                    if ratios
                    else ""
                )
                lines.append(row(count, label, mine, base_median, spread))
            lines.append(row(count, baseline, base, base_median, ""))
    return lines


def sessions_line(lives: list[Life]) -> str:
    by_label: dict[str, list[int]] = {}
    for life in lives:
        by_label.setdefault(life.label, []).append(life.sessions)
    return "Sessions opened per service process (each round): " + "; ".join(
        f"{label} {', '.join(str(n) for n in counts)}" for label, counts in by_label.items()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--clients", default="10,30,60,100,200,400")
    parser.add_argument("--ms", type=int, default=20, help="pg_sleep per request, ms")
    parser.add_argument(
        "--spread",
        type=int,
        default=0,
        help="each query lasts MS - SPREAD to MS + SPREAD ms (the same durations for every"
        " service) instead of exactly MS: real queries vary",
    )
    parser.add_argument("--targets", default="sync,async")
    parser.add_argument(
        "--together",
        action="store_true",
        help="load the compared services at the same time, each with its own clients,"
        " instead of in turn",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run a second copy of each hand-written service, compared with the first:"
        " what the spread is when nothing differs",
    )
    parser.add_argument(
        "--steady",
        action="store_true",
        help="also run each hand-written service with a 10 + 0 pool (no burst connections to"
        " close), compared with the first",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the services on CPU 1, the load generator and PostgreSQL on CPU 0",
    )
    parser.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section")
    args = parser.parse_args()
    if not 0 <= args.spread <= args.ms:
        parser.error(f"--spread {args.spread}: must be from 0 to --ms ({args.ms})")
    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    service_env = pin_cores() if args.pin else {}
    clients = [int(count) for count in args.clients.split(",")]
    targets = args.targets.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="poolwise-efficiency-"))
    groups = []
    for target in targets:
        generated, handwritten, kind = TARGETS[target]
        project = render(
            workdir / target, {"project_name": f"eff-{target}", "target": f"k8s-{target}", **POOL}
        )
        group = (
            Variant(generated, "generated", project, service_env),
            Variant(handwritten, kind, project, service_env),
        )
        if args.control:
            group += (Variant(f"{handwritten}, second copy", kind, project, service_env),)
        if args.steady:
            steady = {**service_env, "POOL_SIZE": str(CONNECTIONS), "POOL_MAX_OVERFLOW": "0"}
            group += (Variant(f"{handwritten}, {CONNECTIONS} + 0 pool", kind, project, steady),)
        groups.append(group)
    started = time.monotonic()
    with PostgresCluster(max_connections=100) as cluster:
        groups[0][0].project.create_schema(cluster.dsn())
        lives = alternate(
            groups,
            cluster,
            cluster.dsn(driver=""),
            clients,
            args.ms,
            args.seconds,
            args.rounds,
            workdir,
            together=args.together,
            spread=args.spread,
        )
    load_average = Path("/proc/loadavg").read_text().split()[:3]
    section = report(args, groups, lives, clients, time.monotonic() - started, load_average)
    print(section)
    if args.write:
        begin, end = markers(args.ms, args.targets, args.together, args.pin, args.spread)
        bench.replace_section(section, begin, end)
    return 0


def pin_cores() -> dict[str, str]:
    """Keep this process (the load generator) and what it starts next (PostgreSQL) on CPU 0;
    the environment that puts a service on CPU 1 (bench/serve.py reads BENCH_CPUS)."""
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs two cores: one for the services, one for the rest")
    os.sched_setaffinity(0, {0})
    return {"BENCH_CPUS": "1"}


def cores_line(lives: list[Life]) -> str:
    """How busy each core was during the runs: which one bounded the numbers."""
    runs = [run for life in lives for run in life.runs]
    names = ["core 0 (load generator, PostgreSQL)", "core 1 (the service measured)"]
    parts = []
    for index, name in enumerate(names):
        shares = sorted(run.cores[index] for run in runs if len(run.cores) > index)
        if shares:
            parts.append(
                f"{name} median {statistics.median(shares):.0%}"
                f" ({shares[0]:.0%} - {shares[-1]:.0%})"
            )
    return "Busy share of each core during the runs: " + "; ".join(parts) + "."


def markers(
    ms: int, targets: str, together: bool = False, pin: bool = False, spread: int = 0
) -> tuple[str, str]:
    """One RESULTS.md section per query length, targets, way of taking turns and placement on
    the cores, so runs of each stay side by side."""
    name = (
        f"efficiency-{ms}ms"
        + (f"-spread{spread}" if spread else "")
        + f"-{targets.replace(',', '-')}"
        + ("-together" if together else "")
        + ("-pinned" if pin else "")
    )
    return f"<!-- {name}:begin (written by bench/efficiency.py) -->", f"<!-- {name}:end -->"


def report(
    args: argparse.Namespace,
    groups: list[tuple[Variant, ...]],
    lives: list[Life],
    clients: list[int],
    elapsed: float,
    load_average: list[str],
) -> str:
    info = bench.machine()
    begin, end = markers(args.ms, args.targets, args.together, args.pin, args.spread)
    query = (
        f"`SELECT pg_sleep(x)`, x from {(args.ms - args.spread) / 1000:g} to"
        f" {(args.ms + args.spread) / 1000:g} s (uniform, the same sequence for every service)"
        if args.spread
        else f"`SELECT pg_sleep({args.ms / 1000:g})`"
    )
    limit = f"; physical limit {CONNECTIONS / (args.ms / 1000):.0f} req/s" if args.ms else ""
    lines = [
        begin,
        f"## Requests per second at equal connections, `pg_sleep({args.ms / 1000:g}"
        + (f" ± {args.spread / 1000:g}" if args.spread else "")
        + ")`,"
        f" {args.targets.replace(',', ' and ')}"
        + (", served at the same time" if args.together else "")
        + (", the service on a core of its own" if args.pin else "")
        + " (bench/efficiency.py)",
        "",
        f"`.venv/bin/python bench/efficiency.py --ms {args.ms}"
        + (f" --spread {args.spread}" if args.spread else "")
        + f" --clients {args.clients}"
        f" --targets {args.targets} --rounds {args.rounds} --seconds {args.seconds:g}"
        + (" --together" if args.together else "")
        + (" --control" if args.control else "")
        + (" --steady" if args.steady else "")
        + (" --pin" if args.pin else "")
        + " --write`,"
        f" {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min. Machine:"
        f" {info['cpu']} ({info['speed']}), {info['memory']}; {info['python']}; {info['postgres']};"
        f" {info['packages']}. Load average at the end {' '.join(load_average)}. Read the"
        + (
            " ratios (the services are loaded at the same time, each with its own clients, and"
            " share the two cores with each other, PostgreSQL and the load generator), not the"
            " absolute numbers."
            if args.together
            else " ratios (the services take turns at each client count, seconds apart), not"
            " the absolute numbers: the service has CPU 1 to itself, and the load generator"
            " and PostgreSQL share CPU 0."
            if args.pin
            else " ratios (the services take turns at each client count, seconds apart), not"
            " the absolute numbers: the service shares two cores with PostgreSQL and the load"
            " generator."
        ),
        "",
        f"Every service: {CONNECTIONS} connections (5 + 5 unless named), pool_timeout 5 s;"
        " closed-loop clients"
        f" on {query}{limit}. Median of {args.rounds} rounds of"
        f" {args.seconds:g} s per client count, "
        + ("both services at once" if args.together else "the services taking turns")
        + "; CPU is the service process's user + system seconds per wall second."
        + (
            " The second copy of each hand-written service is the control: the same code"
            " compared with itself in the same rounds, so its ratios are the spread the"
            " machine alone gives."
            if args.control
            else ""
        )
        + (
            f" The hand-written service with a {CONNECTIONS} + 0 pool is the same code with a"
            " pool that keeps every connection it opens: QueuePool 5 + 5 closes a returned"
            " burst connection whenever 5 sit idle and opens a new one at the next burst; the"
            " generated pool does not."
            if args.steady
            else ""
        ),
        "",
    ]
    lines += ratio_table(
        lives,
        [
            (variant.label, group[1].label)
            for group in groups
            for variant in group
            if variant is not group[1]
        ],
        clients,
    )
    lines += ["", sessions_line(lives)]
    if args.pin:
        lines += ["", cores_line(lives)]
    lines.append(end)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
