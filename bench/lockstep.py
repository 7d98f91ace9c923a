"""Benchmark: why closed-loop clients on an exact query stay in step in an asyncio service.

    .venv/bin/python bench/lockstep.py --pin            # ~3 minutes
    .venv/bin/python bench/lockstep.py --pin --write    # and rewrite its RESULTS.md section

bench/efficiency.py found one point under parity: k8s-async, 10 clients on 10 connections,
an exact `pg_sleep(0.02)`, where the generated service and the hand-written code with a pool
that keeps its connections (10 + 0) both serve about 0.9x of the hand-written code whose
5 + 5 QueuePool closes and reopens half its connections. This script takes HTTP away and
runs the same requests in one process, `--clients` tasks each in a closed loop on an
AsyncEngine (psycopg, the services' driver), to tell what holds the number there:

  SQLAlchemy, N + 0     AsyncSession per request, a pool that keeps its N connections (what
                        the generated BurstPool does at this load)
  SQLAlchemy, N/2 + N/2 the same on the hand-written code's QueuePool, which closes a
                        returned burst connection whenever N/2 sit idle and opens a new one
  psycopg alone         one AsyncConnection per task: the same three round trips (BEGIN, the
                        query, COMMIT) at a fraction of the CPU per request

each with the tasks started together or spread over one query's length, and each with an
exact query or one of `--ms` +/- `--spread` ms (bench/load.py's table of durations). The
variants take turns in every round; medians of the rounds.

The model it checks: the event loop runs ready callbacks in turn, so requests whose queries
end together share the CPU for the rest of their work and end together again (processor
sharing). A cycle then lasts about MS + clients x CPU per request, not MS + CPU per request,
and nothing in a steady pool moves a request out of step; a reconnect does.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load as bench  # noqa: E402  (machine description, RESULTS.md sections, test paths)
import psycopg  # noqa: E402
from harness import PostgresCluster, missing_requirements  # noqa: E402
from sqlalchemy import event, text  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402

BEGIN = "<!-- lockstep:begin (written by bench/lockstep.py) -->"
END = "<!-- lockstep:end -->"
WORK = text("SELECT pg_sleep(:seconds)")
TIME_LIMIT = 60.0  # seconds a run may take, whatever --requests asks


@dataclass(frozen=True)
class Variant:
    driver: str  # "sqlalchemy" or "psycopg"
    steady: bool  # the pool keeps its connections (N + 0) or churns (N/2 + N/2)
    staggered: bool  # the clients start spread over one query, not together
    spread: int  # each query lasts ms - spread to ms + spread

    def label(self, clients: int) -> str:
        if self.driver == "psycopg":
            what = "psycopg alone"
        elif self.steady:
            what = f"SQLAlchemy, {clients} + 0"
        else:
            what = f"SQLAlchemy, {clients // 2} + {clients - clients // 2}"
        start = "staggered" if self.staggered else "together"
        return f"{what} | {start} | {'exact' if not self.spread else f'+/- {self.spread} ms'}"


@dataclass
class Run:
    per_second: float
    cpu_us: float  # process CPU per request
    p10: float
    p50: float
    p90: float
    sessions: int


async def run(variant: Variant, url: str, clients: int, requests: int, ms: int) -> Run:
    # bench/load.py's table of query lengths (all MS when spread is 0), as efficiency.py's runs.
    sleeps = [duration / 1000 for duration in bench.query_durations(ms, variant.spread)]
    opened = 0
    served = 0
    latencies: list[float] = []
    engine = None
    connections: list[psycopg.AsyncConnection] = []
    if variant.driver == "psycopg":
        connections = [await psycopg.AsyncConnection.connect(url) for _ in range(clients)]
        opened = clients
    else:
        keep = clients if variant.steady else clients // 2
        engine = create_async_engine(
            url.replace("postgresql://", "postgresql+psycopg://", 1),
            pool_size=keep,
            max_overflow=clients - keep,
            pool_use_lifo=True,
        )

        @event.listens_for(engine.sync_engine, "connect")
        def count_connect(dbapi_connection: object, record: object) -> None:
            nonlocal opened
            opened += 1

        factory = async_sessionmaker(engine, autoflush=False, expire_on_commit=False)
    deadline = time.monotonic() + TIME_LIMIT

    async def client(index: int) -> None:
        nonlocal served
        if variant.staggered:
            await asyncio.sleep(index * ms / 1000 / clients)
        sequence = 0
        while served < requests and time.monotonic() < deadline:
            seconds = sleeps[bench.duration_index(index, sequence)]
            sequence += 1
            started = time.perf_counter()
            if connections:
                connection = connections[index]
                await connection.execute("SELECT pg_sleep(%s)", (seconds,))
                await connection.commit()
            else:
                async with factory() as session:
                    await session.execute(WORK, {"seconds": seconds})
                    await session.commit()
            latencies.append(time.perf_counter() - started)
            served += 1

    cpu = time.process_time()
    wall = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(clients)))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    if engine is not None:
        await engine.dispose()
    for connection in connections:
        await connection.close()
    latencies.sort()
    count = len(latencies)
    return Run(
        per_second=count / wall,
        cpu_us=cpu / count * 1e6,
        p10=latencies[count // 10] * 1e3,
        p50=latencies[count // 2] * 1e3,
        p90=latencies[9 * count // 10] * 1e3,
        sessions=opened,
    )


def event_loop_runner() -> tuple[str, object]:
    """uvloop when installed, as uvicorn's default loop picks it; else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return "asyncio", asyncio.run
    return f"uvloop {uvloop.__version__}", uvloop.run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000, help="per run")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--ms", type=int, default=20)
    parser.add_argument("--spread", type=int, default=2)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="PostgreSQL on CPU 0, this process (the service) on CPU 1",
    )
    parser.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section")
    args = parser.parse_args()
    if not 0 < args.spread <= args.ms:
        parser.error(f"--spread {args.spread}: must be from 1 to --ms ({args.ms})")
    if args.clients < 2:
        parser.error(f"--clients {args.clients}: needs 2 or more to share a loop")
    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs two cores: one for PostgreSQL, one for this process")
    variants = [
        Variant(driver, steady, staggered, spread)
        for driver, steady in (("sqlalchemy", True), ("sqlalchemy", False), ("psycopg", True))
        for staggered in (False, True)
        for spread in (0, args.spread)
    ]
    loop_name, runner = event_loop_runner()
    started = time.monotonic()
    runs: dict[Variant, list[Run]] = {variant: [] for variant in variants}
    if args.pin:
        os.sched_setaffinity(0, {0})  # PostgreSQL, started next, inherits CPU 0
    with PostgresCluster(max_connections=100) as cluster:
        url = cluster.dsn(driver="")
        if args.pin:
            os.sched_setaffinity(0, {1})
        for round_ in range(args.rounds):
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                result = runner(run(variant, url, args.clients, args.requests, args.ms))
                runs[variant].append(result)
                print(f"round {round_ + 1} {variant.label(args.clients)}: {result}", flush=True)
    section = report(args, runs, loop_name, time.monotonic() - started)
    print(section)
    if args.write:
        bench.replace_section(section, BEGIN, END)
    return 0


def report(
    args: argparse.Namespace, runs: dict[Variant, list[Run]], loop_name: str, seconds: float
) -> str:
    info = bench.machine()
    pinned = " --pin" if args.pin else ""
    lines = [
        BEGIN,
        "## Closed-loop clients in step on an asyncio loop (bench/lockstep.py)",
        "",
        f"`.venv/bin/python bench/lockstep.py --rounds {args.rounds} --requests {args.requests}"
        f" --clients {args.clients} --ms {args.ms} --spread {args.spread}{pinned} --write`,"
        f" {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min. Machine:"
        f" {info['cpu']} ({info['speed']}), {info['python']}; {info['postgres']};"
        f" {info['packages']}; {loop_name}."
        + (" PostgreSQL on CPU 0, this process on CPU 1." if args.pin else ""),
        "",
        f"No HTTP: {args.clients} tasks in one process, each a closed loop of requests (a"
        f" session, `SELECT pg_sleep`, commit) on {args.clients} connections, {args.requests}"
        " requests per run, the variants taking turns; medians of the rounds. Latency is one"
        " request's, in ms. The model's two bounds for the median latency: every request"
        f" alone on the CPU (MS + CPU per request) and all {args.clients} in step (MS +"
        f" {args.clients} x CPU per request).",
        "",
        "| pool | start | query | req/s | CPU per request | latency p10 / p50 / p90"
        " | model: alone - in step | sessions opened |",
        "|---|---|---|---:|---:|---|---|---:|",
    ]
    for variant, results in runs.items():
        rate = [run.per_second for run in results]
        median = {
            name: statistics.median(getattr(run, name) for run in results)
            for name in ("cpu_us", "p10", "p50", "p90", "sessions")
        }
        alone = args.ms + median["cpu_us"] / 1000
        in_step = args.ms + args.clients * median["cpu_us"] / 1000
        lines.append(
            f"| {variant.label(args.clients)} | {statistics.median(rate):.0f}"
            f" ({min(rate):.0f} - {max(rate):.0f}) | {median['cpu_us']:.0f} us"
            f" | {median['p10']:.1f} / {median['p50']:.1f} / {median['p90']:.1f}"
            f" | {alone:.1f} - {in_step:.1f} | {median['sessions']:.0f} |"
        )
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
