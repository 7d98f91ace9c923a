"""Faults: killed backends, a PostgreSQL restart and a PgBouncer restart are survived.

A light, bounded background load runs while the fault is injected; every request is recorded
with its start and end time, so "errors confined to the window" is checked per request: a
failure is only allowed if the request overlapped the fault, and once a request that started
after the fault has succeeded, every request that starts later must succeed too (the pool has
recovered). The service is never restarted.

A restart (of PostgreSQL, of PgBouncer, or of PostgreSQL behind PgBouncer) is a 503 with
Retry-After for the requests it fails, never a 500: the service log holds no traceback, and one
line per worker opens the incident and one closes it with the count of requests answered 503,
which must equal the 503s the clients received for a lost connection.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from harness import PgBouncer, PostgresCluster
from loadgen import BackgroundLoad, LoadResult, items_mix, load, request
from services import RenderedProject, ServiceProcess, seed_items, wait_until

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

CLIENTS = 10
KINDS = pytest.mark.parametrize("name", ["sync", "async"], ids=["k8s-sync", "k8s-async"])
# (project, driver in DATABASE_URL: "" is the project's own): k8s-async takes either driver.
DIRECT = pytest.mark.parametrize(
    ("name", "driver"),
    [("sync", ""), ("async", ""), ("async", "asyncpg")],
    ids=["k8s-sync-psycopg", "k8s-async-psycopg", "k8s-async-asyncpg"],
)
# Behind PgBouncer; asyncpg in session mode (PgBouncer 1.18 cannot keep its prepared statements
# in transaction mode).
BOUNCED = pytest.mark.parametrize(
    "name",
    ["sync-tx", "async-tx", "asyncpg-session"],
    ids=["k8s-sync-transaction", "k8s-async-transaction", "k8s-async-asyncpg-session"],
)
# The service's log lines for an incident (db/outage.py), and its answer to a lost connection.
INCIDENT_OPENED = "database connection lost ("
INCIDENT_OVER = re.compile(r"database connection errors stopped: (\d+) requests? answered 503")
LOST_BODY = b"the connection to the database was lost"


@dataclass
class FaultWindow:
    """When the fault began and ended, and every request of the load around it."""

    began: float
    ended: float = field(init=False)
    result: LoadResult = field(init=False)  # set once the load has stopped


@contextmanager
def fault_under_load(
    service: ServiceProcess, ids: list[int], *, after: float
) -> Iterator[FaultWindow]:
    """The with-block injects the fault into a running load; the window times it.

    The load runs 2 s before the block; it is stopped ``after`` seconds after the block.
    """
    running = BackgroundLoad(
        service.port,
        items_mix(ids),
        clients=CLIENTS,
        duration=30,  # stopped by the test long before; the bound if it is not
        max_requests=100_000,
        timeout=15,
    ).start()
    time.sleep(2)
    window = FaultWindow(began=time.monotonic())
    yield window
    window.ended = time.monotonic()
    time.sleep(after)
    window.result = running.stop(30)


def assert_confined(window: FaultWindow, service: ServiceProcess) -> None:
    """Failures only overlap the fault; the service serves before it and recovers after it.

    Recovered means: once a request that started after the fault ended has succeeded, every
    request that starts later succeeds. The moment is measured in this run, not allowed for.
    """
    result, began, ended = window.result, window.began, window.ended
    recovered = min((r.end for r in result.ok() if r.start > ended), default=None)
    assert recovered is not None, f"nothing succeeded after the fault: {result.summary()}"
    outside = [r for r in result.failed() if r.end < began or r.start > recovered]
    assert outside == [], [(r.status, r.start - began, r.error, r.body[:200]) for r in outside[:5]]
    before = [r for r in result.records if r.end < began]
    after = [r for r in result.records if r.start > recovered]
    assert len(before) >= 20 and len(after) >= 50, (len(before), len(after), result.summary())
    assert service.proc is not None and service.proc.poll() is None, "the service died"


def assert_answered_503(window: FaultWindow, service: ServiceProcess) -> None:
    """Every failed request was a 503 with Retry-After, logged as one incident per worker.

    Waits (bounded) for each worker's closing line: it comes once no request has failed for a
    few seconds.
    """
    records = window.result.records
    wrong = [r for r in records if not (200 <= r.status < 300 or r.status == 503)]
    assert wrong == [], [(r.status, r.error, r.body[:200]) for r in wrong[:5]]
    assert all(r.retry_after for r in records if r.status == 503), "a 503 without Retry-After"
    lost = [r for r in records if r.status == 503 and LOST_BODY in r.body]
    assert lost, f"no request failed on the lost connection: {window.result.summary()}"

    def closed() -> bool:
        log = service.log()
        return log.count(INCIDENT_OPENED) == len(INCIDENT_OVER.findall(log))

    wait_until(closed, 60)
    log = service.log()
    assert "Traceback" not in log, log[-3000:]
    workers = int(service.project.settings()["web_concurrency"])
    opened = log.count(INCIDENT_OPENED)
    counts = [int(count) for count in INCIDENT_OVER.findall(log)]
    assert 1 <= opened <= workers and len(counts) == opened, log[-3000:]
    assert sum(counts) == len(lost), (counts, len(lost), log[-3000:])


@KINDS
def test_terminated_backends_are_replaced_by_pre_ping(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    service = services(project(name), database.dsn(driver=""), app_name(f"kill-{name}"))
    ids = seed_items(service, 5, "fault")

    # Mid-run: every backend of the service is killed while requests are in flight.
    with fault_under_load(service, ids, after=2) as window:
        killed = database.terminate_backends(service.application_name)
    print(f"{name}: killed {killed} mid-run; {window.result.summary()}")
    assert killed >= 1
    # Only requests that were using a connection at that moment may fail, each at most once.
    failed = window.result.failed()
    assert len(failed) <= killed, [(r.status, r.body[:200]) for r in failed]
    assert all(r.start <= window.ended for r in failed)
    assert_confined(window, service)

    # Idle: the pool is full of connections the server has killed; pre_ping must notice every
    # one of them at checkout, so not a single request fails.
    warm = load(service.port, items_mix(ids), clients=CLIENTS, duration=1, max_requests=200)
    assert warm.failed() == []
    killed = database.terminate_backends(service.application_name)
    assert killed >= 1
    after = load(service.port, items_mix(ids), clients=CLIENTS, duration=2, max_requests=200)
    print(f"{name}: killed {killed} idle; then {after.summary()}")
    assert after.failed() == [], [(r.status, r.body[:200]) for r in after.failed()[:5]]
    # Served, not stalled: at least half the rate of the warm run just before it, on the same
    # machine at the same load (a pool waiting on dead connections answers next to nothing).
    assert len(after.records) >= len(warm.records), (warm.summary(), after.summary())


@DIRECT
def test_postgres_restart_is_a_503_and_survived(
    name: str,
    driver: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    dsn = database.dsn(driver=driver)
    service = services(project(name), dsn, app_name(f"restart-{name}-{driver or 'default'}"))
    ids = seed_items(service, 5, "fault")
    with fault_under_load(service, ids, after=3.5) as window:
        database.restart()  # pg_ctl restart -m fast; returns once PostgreSQL accepts connections
    took = window.ended - window.began
    print(f"{name} {driver}: restart took {took:.1f}s; {window.result.summary()}")
    assert_confined(window, service)
    assert_answered_503(window, service)
    assert request(service.port, "GET", "/readyz")[0] == 200


@BOUNCED
def test_pgbouncer_restart_is_a_503_and_survived(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    bouncer: Callable[[RenderedProject], PgBouncer],
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    rendered = project(name)
    pgbouncer = bouncer(rendered)
    service = services(rendered, pgbouncer.dsn(driver=""), app_name(f"bouncer-{name}"))
    ids = seed_items(service, 5, "fault")
    with fault_under_load(service, ids, after=3.5) as window:
        pgbouncer.restart()  # SIGTERM (immediate shutdown), then a new process on the same port
    took = window.ended - window.began
    print(f"{name}: PgBouncer restart took {took:.1f}s; {window.result.summary()}")
    assert_confined(window, service)
    assert_answered_503(window, service)
    assert request(service.port, "GET", "/readyz")[0] == 200


@BOUNCED
def test_postgres_restart_behind_pgbouncer_is_a_503_and_survived(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    bouncer: Callable[[RenderedProject], PgBouncer],
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    rendered = project(name)
    pgbouncer = bouncer(rendered)
    service = services(rendered, pgbouncer.dsn(driver=""), app_name(f"behind-{name}"))
    ids = seed_items(service, 5, "fault")
    with fault_under_load(service, ids, after=3.5) as window:
        database.restart()  # PgBouncer's server connections are cut; its clients' are not
    took = window.ended - window.began
    print(f"{name}: restart behind PgBouncer took {took:.1f}s; {window.result.summary()}")
    assert_confined(window, service)
    assert_answered_503(window, service)
    assert request(service.port, "GET", "/readyz")[0] == 200
