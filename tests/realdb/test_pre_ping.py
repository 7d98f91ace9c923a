"""The pre-ping skipped for a connection used a moment ago (db/pre_ping.py) is just as safe.

A k8s service pings a pooled connection at checkout only when it sat idle for
POOL_PRE_PING_AFTER_SECONDS (default 1 s; 30 s here) or when the server has closed it. Two ways
a connection dies a moment after its last use:

* the server ends it (pg_terminate_backend; a restart does the same to every connection): its
  goodbye waits unread in the socket, so the checkout sees it, replaces the connection without
  a round trip, and the request succeeds;
* the network forgets it (a NAT or firewall that dropped its state, here the latency proxy's
  drop_silently): nothing tells the client until it sends, so the request that uses it fails.
  That request answers 503 with Retry-After (a lost connection, db/outage.py), never 500, and
  the requests after it succeed on new connections.

test_faults.py's restart and terminate tests cover the connections killed while idle or in use
under load; they run unchanged against the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from harness import PostgresCluster
from latency_proxy import LatencyProxy
from loadgen import request
from ports import free_port
from services import RenderedProject, ServiceProcess, seed_items

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

KINDS = pytest.mark.parametrize("name", ["sync", "async"], ids=["k8s-sync", "k8s-async"])
LOST_BODY = "the connection to the database was lost"
# Longer than any gap between two requests of a test on a loaded machine, so that only the
# server-closed check can make a checkout ping (the default, 1 s, is not that long there).
PRE_PING_AFTER = 30.0


def one_worker(
    services: Callable[..., ServiceProcess], project: RenderedProject, dsn: str, name: str
) -> ServiceProcess:
    """The service with one worker and a long POOL_PRE_PING_AFTER_SECONDS.

    One worker: with two, the kernel may hand the next request to the worker that never opened
    a connection, and it would open a fresh one (a 200 that proves nothing about the pool).
    """
    return services(
        project, dsn, name, POOL_PRE_PING_AFTER_SECONDS=str(PRE_PING_AFTER), WEB_CONCURRENCY="1"
    )


def used_once(service: ServiceProcess, item_id: int) -> None:
    """One request, alone: with LIFO the next request gets this same connection back."""
    status, _, body = request(service.port, "GET", f"/items/{item_id}")
    assert status == 200, body


def assert_served(service: ServiceProcess, item_id: int) -> None:
    for _ in range(5):
        status, _, body = request(service.port, "GET", f"/items/{item_id}")
        assert status == 200, (body, service.log()[-3000:])
    log = service.log()
    assert "Traceback" not in log, log[-3000:]


@KINDS
def test_a_connection_the_server_ended_a_moment_ago_is_replaced_before_use(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    service = one_worker(
        services, project(name), database.dsn(driver=""), app_name(f"ping-end-{name}")
    )
    [item_id] = seed_items(service, 1, "ping")
    used_once(service, item_id)
    started = time.monotonic()
    killed = database.terminate_backends(service.application_name)
    status, _, body = request(service.port, "GET", f"/items/{item_id}")
    since = time.monotonic() - started
    print(f"{name}: killed {killed}; next request {status} {since * 1000:.0f} ms after the kill")
    assert killed >= 1
    # Well inside POOL_PRE_PING_AFTER_SECONDS: the time rule alone would not have pinged.
    assert since < PRE_PING_AFTER / 2, f"the request came {since:.2f} s after the kill"
    assert status == 200, (status, body)
    assert_served(service, item_id)


@KINDS
def test_a_connection_the_network_dropped_a_moment_ago_answers_503_and_the_pool_recovers(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    with LatencyProxy(database.port, 0.0, free_port()) as proxy:
        dsn = database.dsn(driver="").replace(f":{database.port}/", f":{proxy.port}/")
        service = one_worker(services, project(name), dsn, app_name(f"ping-drop-{name}"))
        [item_id] = seed_items(service, 1, "ping")
        used_once(service, item_id)
        started = time.monotonic()
        dropped = proxy.drop_silently()
        status, headers, body = request(service.port, "GET", f"/items/{item_id}")
        since = time.monotonic() - started
        print(f"{name}: dropped {dropped}; next request {status} {since * 1000:.0f} ms after")
        assert dropped >= 1
        assert since < PRE_PING_AFTER / 2, f"the request came {since:.2f} s after the drop"
        assert status == 503, (status, body)
        assert headers.get("retry-after"), headers
        assert LOST_BODY in body["detail"], body
        # One worker, one pool: the dropped connection failed once; every later request is served.
        after = [request(service.port, "GET", f"/items/{item_id}") for _ in range(10)]
        served = [s for s, _, _ in after if s == 200]
        print(f"{name}: then {len(served)} of {len(after)} served")
        assert len(served) == len(after), after
        assert "Traceback" not in service.log(), service.log()[-3000:]
