"""Benchmark: 1 ms queries over a network, the pre-ping skipped against pool_pre_ping=True.

    .venv/bin/python bench/latency.py              # ~4 minutes on 2 cores
    .venv/bin/python bench/latency.py --write      # and rewrite its section of RESULTS.md

Run by hand, not by the test suite; it needs PostgreSQL's server binaries, like the realdb tier.
Every service reaches PostgreSQL through tests/realdb/latency_proxy.py, in a process of its own,
which delays every byte by --delay-ms each way (0.25 ms: a same-region cloud network; on
127.0.0.1 a round trip is some 0.05 ms, so the pre-ping's `SELECT 1` costs almost nothing here
without the proxy). Load: closed-loop clients on GET /work?ms=1 (``SELECT pg_sleep(0.001)``),
every service with the same 5 + 5 pool, alternating as bench/efficiency.py does.

Compared, per target:

  generated                    the generated service as shipped: db/pre_ping.py pings only a
                               connection idle POOL_PRE_PING_AFTER_SECONDS (1 s) or closed by
                               the server
  generated, ping every time   the same with POOL_PRE_PING_AFTER_SECONDS=0 (pool_pre_ping=True):
                               what the skip alone is worth
  hand-written                 bench/apps.py's careful hand-written app, pool_pre_ping=True

Under load the services' CPU share decides req/s as much as the network does, so the script
also counts what no other load on the machine changes: the messages each service sends to
PostgreSQL per request (one client, one request at a time, through an in-process proxy that
counts them): each is a round trip the request waits for, 2 x --delay-ms on this network. And
where the rest of a request's time on its connection goes: each service alone behind a proxy
that records how long the service takes to send its next message after each reply (its own
time on the connection), and how long the hand-over to the next request takes.

The proxy's own delay is measured as it runs (how late each chunk left after its due time) and
reported with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import efficiency  # noqa: E402  (the runner: services taking turns within each round)
import load as bench  # noqa: E402
from harness import PostgresCluster, missing_requirements  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402
from loadgen import load  # noqa: E402
from ports import free_port  # noqa: E402
from services import ServiceProcess, render  # noqa: E402

DEFAULT_POOL = "5+5"


def markers(pool: str) -> tuple[str, str]:
    """One RESULTS.md section per pool, so a run with another pool keeps the default's."""
    name = "latency" if pool == DEFAULT_POOL else f"latency-pool-{pool}"
    return f"<!-- {name}:begin (written by bench/latency.py) -->", f"<!-- {name}:end -->"


PROXY = BENCH.parent / "tests" / "realdb" / "latency_proxy.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--ms", type=int, default=1, help="pg_sleep per request, ms")
    parser.add_argument("--delay-ms", type=float, default=0.25, help="added each way")
    parser.add_argument("--targets", default="sync,async")
    parser.add_argument(
        "--pool",
        default=DEFAULT_POOL,
        help="pool_size+max_overflow of every service; a small one makes the pool, not the"
        " services' CPU, bound the throughput",
    )
    parser.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section")
    args = parser.parse_args()
    try:
        size, overflow = (int(part) for part in args.pool.split("+"))
    except ValueError:
        parser.error(f"--pool {args.pool!r}: expected pool_size+max_overflow, such as 5+5")
    # Read by efficiency's runner when it renders and starts each service.
    efficiency.POOL.update(pool_size=size, max_overflow=overflow)
    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="poolwise-latency-"))
    groups = []
    for target in args.targets.split(","):
        generated, handwritten, kind = efficiency.TARGETS[target]
        project = render(
            workdir / target,
            {"project_name": f"lat-{target}", "target": f"k8s-{target}", **efficiency.POOL},
        )
        groups.append(
            (
                efficiency.Variant(generated, "generated", project),
                efficiency.Variant(
                    f"{generated}, ping every time",
                    "generated",
                    project,
                    {"POOL_PRE_PING_AFTER_SECONDS": "0"},
                ),
                efficiency.Variant(handwritten, kind, project),
            )
        )
    started = time.monotonic()
    with PostgresCluster(max_connections=100) as cluster:
        groups[0][0].project.create_schema(cluster.dsn())
        with network(cluster, args.delay_ms, workdir / "proxy.txt") as dsn:
            lives = efficiency.alternate(
                groups, cluster, dsn, [args.clients], args.ms, args.seconds, args.rounds, workdir
            )
        trips = {
            variant.label: round_trips(variant, cluster, args.ms, workdir)
            for group in groups
            for variant in group
        }
        turns = service_turns(groups, cluster, args, workdir)
    delay = (workdir / "proxy.txt").read_text().strip()
    load_average = Path("/proc/loadavg").read_text().split()[:3]
    section = report(
        args, groups, lives, trips, turns, delay, time.monotonic() - started, load_average
    )
    print(section)
    if args.write:
        bench.replace_section(section, *markers(args.pool))
    return 0


@contextlib.contextmanager
def network(
    cluster: PostgresCluster, delay_ms: float, report: Path, turns: Path | None = None
) -> Iterator[str]:
    """The latency proxy in a process of its own, in front of the cluster: its DSN.

    On exit the proxy writes the delay it added to `report` (and the clients' turns to `turns`).
    """
    port = free_port()
    command = [
        sys.executable,
        str(PROXY),
        "--upstream-port",
        str(cluster.port),
        "--port",
        str(port),
        "--delay-ms",
        str(delay_ms),
        "--seconds",
        "900",
        "--report",
        str(report),
    ]
    if turns is not None:
        command += ["--turns", str(turns)]
    proxy = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""}
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "listening"
        yield cluster.dsn(driver="").replace(f":{cluster.port}/", f":{port}/")
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=30)


@dataclass
class Turns:
    """One service's time on its connections per request, from the proxy's view of them."""

    label: str
    per_second: list[float] = field(default_factory=list)
    own_ms: list[float] = field(default_factory=list)  # service's time per request, all turns
    between_ms: list[float] = field(default_factory=list)  # median turn after a COMMIT


def service_turns(
    groups: list[tuple[efficiency.Variant, ...]],
    cluster: PostgresCluster,
    args: argparse.Namespace,
    workdir: Path,
) -> list[Turns]:
    """Where a request's time on a connection goes: the service's own turns, per variant.

    Each variant runs alone behind a proxy of its own, the order flipping each round, under the
    main run's load (--clients, --ms, --seconds). The proxy records, for every message a
    service sends, how long after the last reply it spoke: summed per request (one COMMIT
    each), the time the service itself kept the connection busy. The turn after a COMMIT's
    reply is the hand-over: the connection's return to the pool and the next request's
    checkout, its pre-ping decision included.
    """
    measured = {variant.label: Turns(variant.label) for group in groups for variant in group}
    variants = [variant for group in groups for variant in group]
    for round_ in range(1, args.rounds + 1):
        for index, variant in enumerate(variants if round_ % 2 else variants[::-1]):
            path = workdir / f"turns-{round_}-{index}.json"
            with network(cluster, args.delay_ms, workdir / "turns-proxy.txt", path) as dsn:
                service, _database, _before = efficiency.start(
                    variant, cluster, dsn, round_, workdir
                )
                with service:
                    service.wait_ready()
                    result = load(
                        service.port,
                        bench.work(args.ms),
                        clients=args.clients,
                        duration=args.seconds,
                        max_requests=200_000,
                        timeout=30,
                    )
            seen = json.loads(path.read_text())
            requests = len(seen["between"])
            if not requests:
                continue
            entry = measured[variant.label]
            entry.per_second.append(efficiency.served_per_second(result, args.seconds))
            entry.own_ms.append((sum(seen["between"]) + sum(seen["within"])) / requests * 1000)
            entry.between_ms.append(statistics.median(seen["between"]) * 1000)
            print(
                f"  turns round {round_} {variant.label:<36} {entry.per_second[-1]:6.1f} req/s"
                f"  own {entry.own_ms[-1]:.2f} ms/request  hand-over {entry.between_ms[-1]:.2f} ms",
                flush=True,
            )
    return list(measured.values())


def round_trips(
    variant: efficiency.Variant, cluster: PostgresCluster, ms: int, workdir: Path
) -> tuple[float, float]:
    """(messages to PostgreSQL per request, median latency in ms) for one request at a time."""
    with LatencyProxy(cluster.port, 0.0, free_port()) as proxy:
        dsn = cluster.dsn(driver="").replace(f":{cluster.port}/", f":{proxy.port}/")
        service = ServiceProcess(
            variant.project,
            dsn,
            f"trips-{variant.label.replace(' ', '-').replace(',', '')}",
            workdir,
            argv=[str(BENCH / "serve.py"), variant.kind],
            BENCH_PACKAGE=variant.project.package,
            PYTHONPATH=f"{BENCH}:{variant.project.root / 'src'}",
            POOL_SIZE=efficiency.POOL["pool_size"],
            POOL_MAX_OVERFLOW=efficiency.POOL["max_overflow"],
            **variant.env,
        )
        with service:
            service.wait_ready()
            load(service.port, bench.work(ms), clients=1, duration=5, max_requests=20)
            before = proxy.sent_to_server
            result = load(service.port, bench.work(ms), clients=1, duration=20, max_requests=200)
            sent = proxy.sent_to_server - before
    done = len(result.records)
    assert done and not result.failed(), result.summary()
    latencies = sorted(record.latency for record in result.records)
    return sent / done, latencies[done // 2] * 1000


def report(
    args: argparse.Namespace,
    groups: list[tuple[efficiency.Variant, ...]],
    lives: list[efficiency.Life],
    trips: dict[str, tuple[float, float]],
    turns: list[Turns],
    delay: str,
    elapsed: float,
    load_average: list[str],
) -> str:
    info = bench.machine()
    pairs = []
    for generated, every_time, handwritten in groups:
        pairs += [(generated.label, handwritten.label), (every_time.label, handwritten.label)]
    begin, end = markers(args.pool)
    size, overflow = efficiency.POOL["pool_size"], efficiency.POOL["max_overflow"]
    pool = "" if args.pool == DEFAULT_POOL else f" --pool {args.pool}"
    lines = [
        begin,
        f"## {args.ms:g} ms queries over a {args.delay_ms:g} ms network, {size + overflow}"
        " connections: the pre-ping skipped (bench/latency.py)",
        "",
        f"`.venv/bin/python bench/latency.py --clients {args.clients} --ms {args.ms}"
        f" --delay-ms {args.delay_ms:g} --targets {args.targets}{pool} --rounds {args.rounds}"
        f" --seconds {args.seconds:g} --write`, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC,"
        f" {elapsed / 60:.1f} min. Machine: {info['cpu']} ({info['speed']}), {info['memory']};"
        f" {info['python']}; {info['postgres']}; {info['packages']}. Load average at the end"
        f" {' '.join(load_average)}.",
        "",
        f"Every service: {size + overflow} connections ({size} + {overflow}) through the latency"
        f" proxy ({args.delay_ms:g} ms"
        f" added each way; {delay}); {args.clients} closed-loop clients on"
        f" `SELECT pg_sleep({args.ms / 1000:g})`; median of {args.rounds} rounds of"
        f" {args.seconds:g} s, the services taking turns. The ratio is to the hand-written"
        " service with pool_pre_ping=True, in the same rounds.",
        "",
    ]
    lines += efficiency.ratio_table(lives, pairs, [args.clients])
    lines += [
        "",
        efficiency.sessions_line(lives),
        "",
        "Messages to PostgreSQL per request, one request at a time (each a round trip the"
        f" request waits on; at {args.delay_ms:g} ms each way, {2 * args.delay_ms:g} ms each):",
        "",
        "| service | messages per request | their network time | median latency, 1 client |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {sent:.2f} | {sent * 2 * args.delay_ms:.2f} ms | {latency:.1f} ms |"
        for label, (sent, latency) in trips.items()
    ]
    lines += [
        "",
        "The services' own time on their connections, seen from the proxy (each service alone"
        f" behind it, the same load, {args.rounds} rounds; medians): after each reply, how long"
        " the service took to send its next message, summed per request; and the turn after a"
        " COMMIT's reply, the hand-over of the connection to the next request (its return to"
        " the pool, the next checkout, the pre-ping decision):",
        "",
    ]
    # With one connection, always busy under this load, 1 / req/s is the time each request holds
    # it: the service's own turns plus the network, the proxy and the server.
    single = size + overflow == 1
    lines += [
        "| service | req/s alone | own time per request | hand-over (median) |"
        + (" held per request (1 / req/s) | of it network, proxy, server |" if single else ""),
        "|---|---:|---:|---:|" + ("---:|---:|" if single else ""),
    ]
    for entry in turns:
        if not entry.per_second:
            continue
        rate, own = statistics.median(entry.per_second), statistics.median(entry.own_ms)
        held = 1000 / rate if rate else float("nan")
        lines.append(
            f"| {entry.label} | {rate:.0f} | {own:.2f} ms"
            f" | {statistics.median(entry.between_ms):.2f} ms |"
            + (f" {held:.2f} ms | {held - own:.2f} ms |" if single else "")
        )
    lines.append(end)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
