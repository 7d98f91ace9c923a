"""Faults: killed backends, a PostgreSQL restart and a PgBouncer restart are survived.

A light, bounded background load runs while the fault is injected; every request is recorded
with its start and end time, so "errors confined to the window" is checked per request: a
failure is only allowed if the request overlapped the fault, and every request that started
after the fault (plus a short settling slack) must succeed. The service is never restarted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from harness import PgBouncer, PostgresCluster
from loadgen import BackgroundLoad, LoadResult, items_mix, load, request
from services import RenderedProject, ServiceProcess, seed_items

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

CLIENTS = 10
SETTLE_S = 1.0  # after the fault has ended, time allowed before every request must succeed
KINDS = pytest.mark.parametrize("name", ["sync", "async"], ids=["k8s-sync", "k8s-async"])


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
    """Failures only overlap [began, ended + SETTLE_S]; the service serves before and after."""
    result, began, ended = window.result, window.began, window.ended
    outside = [r for r in result.failed() if r.end < began or r.start > ended + SETTLE_S]
    assert outside == [], [(r.status, r.start - began, r.error, r.body[:200]) for r in outside[:5]]
    before = [r for r in result.records if r.end < began]
    after = [r for r in result.records if r.start > ended + SETTLE_S]
    assert len(before) >= 20 and len(after) >= 50, (len(before), len(after), result.summary())
    assert all(200 <= r.status < 300 for r in after)
    assert service.proc is not None and service.proc.poll() is None, "the service died"


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
    assert len(after.records) >= 50


@KINDS
def test_postgres_restart_is_survived(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    service = services(project(name), database.dsn(driver=""), app_name(f"restart-{name}"))
    ids = seed_items(service, 5, "fault")
    with fault_under_load(service, ids, after=SETTLE_S + 2.5) as window:
        database.restart()  # pg_ctl restart -m fast; returns once PostgreSQL accepts connections
    took = window.ended - window.began
    print(f"{name}: restart took {took:.1f}s; {window.result.summary()}")
    assert_confined(window, service)
    assert request(service.port, "GET", "/readyz")[0] == 200


@pytest.mark.parametrize(
    "name", ["sync-tx", "async-tx"], ids=["k8s-sync-transaction", "k8s-async-transaction"]
)
def test_pgbouncer_restart_is_survived(
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
    with fault_under_load(service, ids, after=SETTLE_S + 2.5) as window:
        pgbouncer.restart()  # SIGTERM (immediate shutdown), then a new process on the same port
    took = window.ended - window.began
    print(f"{name}: PgBouncer restart took {took:.1f}s; {window.result.summary()}")
    assert_confined(window, service)
    assert request(service.port, "GET", "/readyz")[0] == 200
