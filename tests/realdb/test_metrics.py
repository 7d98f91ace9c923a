"""Pool metrics under saturation match the pool's own state, on a real PostgreSQL.

As in test_saturation.py, a superuser transaction locks the items table, so every
GET /items/{id} blocks inside PostgreSQL holding its pooled connection. More clients than the
pod has connections send one request each at once: `used` of them hold a connection, the rest
wait and, after pool_timeout, get 503. What GET /metrics on the metrics port exports (the pod's
one metrics server, summed over its uvicorn workers) is compared with what is known without it:

- db.client.connection.count{state=used} with the service's backends that are `active` in
  pg_stat_activity (blocked on the lock), used + idle with all of its backends (overflow
  connections included);
- pending_requests with the clients still waiting (sent - used), until pool_timeout;
- max and idle.max with workers x (pool_size + max_overflow) (a burst's connections stay idle
  until they age out, db/pool.py);
- timeouts with the 503s the clients received; the counts of wait_time and use_time with the
  200s (one checkout each); use_time's sum with how long those requests took.

Tolerance: every count must match exactly, and no time allowance is fixed in advance; each
bound comes from what this run measured, so it holds on a loaded machine:

- "the pool is saturated" is polled until the first waiter can have timed out (pool_timeout
  after the requests were sent), and "every waiter timed out" until the held statements can
  have been cancelled (statement_timeout after they were sent);
- totals are read once every client has its answer: each worker writes a checkout's numbers
  (prometheus_client's multiprocess files, summed by the pod's metrics server) before the
  request's response is sent, so no wait for a worker to publish is needed;
- use_time's sum lies between the time each held request certainly held its connection (from
  the moment the test saw all of them checked out to the moment it released the lock) and the
  held requests' summed latency.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import PostgresCluster
from loadgen import load, repeat_get
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from services import (
    LambdaEnvironment,
    RenderedProject,
    ServiceProcess,
    held_requests,
    items_locked,
    response_json,
    seed_items,
    wait_until,
)

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

# Clients beyond the pod's connections: they wait for pool_timeout, then get 503.
EXTRA_CLIENTS = 6


def scrape(service: ServiceProcess) -> dict[str, float]:
    """The service's pool numbers from GET /metrics on its metrics port (its pool's series)."""
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    numbers: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("db_client_connection_pool_name", None) != service.application_name:
                continue
            state = labels.pop("db_client_connection_state", None)
            if labels:
                continue  # buckets, and connects by error.type
            numbers[sample.name + (f"{{{state}}}" if state else "")] = sample.value
    return numbers


def listening(pids: list[int], port: int) -> list[int]:
    """The pids among `pids` that hold a socket listening on 127.0.0.1:`port` (from /proc)."""
    inodes = {
        fields[9]
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port  # 0A: LISTEN
    }
    holders = []
    for pid in pids:
        targets = set()
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):  # closed since the listing
                    targets.add(os.readlink(fd))
        if any(f"socket:[{inode}]" in targets for inode in inodes):
            holders.append(pid)
    return holders


def used(numbers: dict[str, float]) -> float:
    return numbers["db_client_connection_count{used}"]


def idle(numbers: dict[str, float]) -> float:
    return numbers["db_client_connection_count{idle}"]


TOTALS = (
    "db_client_connection_timeouts_total",
    "db_client_connection_wait_time_seconds_count",
    "db_client_connection_use_time_seconds_count",
    "db_client_connection_use_time_seconds_sum",
)


def backends(database: PostgresCluster, application_name: str) -> tuple[int, int]:
    """(active, all) client backends of the service in pg_stat_activity."""
    [(active, total)] = database.psql(
        "SELECT count(*) FILTER (WHERE state = 'active'), count(*) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND application_name = %s",
        (application_name,),
    )
    return int(active), int(total)


@pytest.mark.parametrize(
    ("name", "workers"),
    [("sync", 1), ("sync", 2), ("async", 1), ("async-2w", 2)],
    ids=["k8s-sync-1-worker", "k8s-sync-2-workers", "k8s-async-1-worker", "k8s-async-2-workers"],
)
def test_exported_pool_metrics_match_the_pool_past_its_capacity(
    name: str,
    workers: int,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    rendered = project(name)
    settings = rendered.settings()
    capacity = settings["pool_size"] + settings["max_overflow"]
    pool_timeout = settings["pool_timeout"]
    statement_timeout = settings["statement_timeout"]
    service = services(
        rendered, database.dsn(driver=""), app_name(f"metrics-{name}"), WEB_CONCURRENCY=workers
    )
    [item] = seed_items(service, 1, "metered")
    sent = workers * capacity + EXTRA_CLIENTS
    # The API port serves no metrics: they are on the metrics port alone.
    with pytest.raises(urllib.error.HTTPError) as on_the_api_port:
        urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=5)
    assert on_the_api_port.value.code == 404
    # One metrics server per pod: the process that started uvicorn (its supervisor with several
    # workers), never a worker, so every scrape is the whole pod's, once.
    processes = [service.pid, *service.children()]
    assert len(processes) > (workers if workers > 1 else 0), processes  # the workers are there
    assert listening(processes, service.metrics_port) == [service.pid], processes
    # Every worker serves requests before the measurement, so each has instrumented its pool and
    # paid its one-time costs (first imports on the request path) outside the measured requests.
    warm = load(
        service.port, repeat_get(f"/items/{item}"), clients=sent, duration=1, max_requests=200
    )
    assert warm.ok() and not warm.failed(), warm.summary()
    before = scrape(service)
    assert before["db_client_connection_max"] == workers * capacity  # every worker is counted
    # The pool keeps a burst's connections idle until they age out (db/pool.py).
    assert before["db_client_connection_idle_max"] == workers * capacity
    report: dict[str, object] = {"sent": sent}

    with items_locked(database):
        # Taken before any request is sent: no waiter times out before started + pool_timeout,
        # and no held statement is cancelled before started + statement_timeout.
        started = time.monotonic()
        held = held_requests(service, f"/items/{item}", sent, timeout=60)

        def saturated() -> bool:
            numbers = scrape(service)
            active, total = backends(database, service.application_name)
            pending = numbers["db_client_connection_pending_requests"]
            report["saturated"] = {
                "used": used(numbers),
                "idle": idle(numbers),
                "pending": pending,
                "pg_active": active,
                "pg_total": total,
            }
            return (
                active > 0
                and used(numbers) == active
                and used(numbers) + idle(numbers) == total
                and used(numbers) + pending == sent
            )

        # Before pool_timeout: the pool's connections are in use, the other clients wait.
        # Once a waiter has timed out, used + pending < sent: a late scrape cannot pass.
        assert wait_until(saturated, pool_timeout - (time.monotonic() - started)), report
        # Every request that will be a 200 holds its connection from here to the release.
        all_held = time.monotonic()
        holding = report["saturated"]["used"]  # type: ignore[index]
        assert holding <= workers * capacity

        def timed_out() -> bool:
            numbers = scrape(service)
            timeouts = numbers["db_client_connection_timeouts_total"] - before.get(TOTALS[0], 0)
            report["timed_out"] = {
                "timeouts": timeouts,
                "pending": numbers["db_client_connection_pending_requests"],
                "used": used(numbers),
            }
            return (
                timeouts == sent - holding
                and numbers["db_client_connection_pending_requests"] == 0
                and used(numbers) == holding
            )

        # After pool_timeout: every waiter has timed out; the held connections are still used
        # until statement_timeout would cancel them.
        time.sleep(max(0.0, pool_timeout - (time.monotonic() - started)))
        assert wait_until(timed_out, statement_timeout - (time.monotonic() - started)), report
        released = time.monotonic()  # the lock is released as the block ends, after this
    result = held.join(30)
    ok = result.ok()
    rejected = [record for record in result.records if record.status == 503]
    assert len(ok) + len(rejected) == sent, result.summary()
    assert len(ok) == holding, f"{result.summary()}\n{report}\n{service.log()[-3000:]}"

    after = scrape(service)
    _, total = backends(database, service.application_name)
    delta = {name: after[name] - before.get(name, 0) for name in TOTALS}
    report["after"] = {**delta, "used": used(after), "idle": idle(after), "pg_total": total}
    latency = sum(record.latency for record in ok)
    report["clients"] = {"200": len(ok), "503": len(rejected), "200 latency sum": latency}
    # Each 200 held its connection at least from all_held to released (measured here), and at
    # most for as long as its client waited for the answer.
    held_at_least = len(ok) * (released - all_held)
    report["use_time bounds"] = (held_at_least, latency)
    print(f"{name} x{workers} workers: {report}")
    assert delta["db_client_connection_timeouts_total"] == len(rejected), report
    assert delta["db_client_connection_wait_time_seconds_count"] == len(ok), report
    assert delta["db_client_connection_use_time_seconds_count"] == len(ok), report
    assert used(after) == 0 and idle(after) == total, report
    use_time = delta["db_client_connection_use_time_seconds_sum"]
    assert held_at_least <= use_time <= latency, report


CREATE_TIME = "db.client.connection.create_time"
ROLE_LIMIT = 3


def test_lambda_reports_each_connect_and_each_refusal_by_its_sqlstate(
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    app_name: Callable[[str], str],
) -> None:
    """More execution environments than the role may open connections: the refused connects
    come back as EMF values under error.type 53300, one per failed invocation, and every
    invocation that connected leaves one create_time value (NullPool: one connection each)."""
    rendered = project("lambda")
    role = f"metered_{int(time.time() * 1000)}"
    database.psql(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'metered' CONNECTION LIMIT {} IN ROLE {}").format(
            sql.Identifier(role), sql.Literal(ROLE_LIMIT), sql.Identifier(database.app_user)
        )
    )
    url = database.dsn(user=role, password="metered", driver="")
    name = app_name("metrics-lambda")
    environments = [LambdaEnvironment(rendered, url, name) for _ in range(2 * ROLE_LIMIT)]
    responses: list[dict[str, Any]] = []
    try:
        for environment in environments:
            environment.wait_ready()
        created = environments[0].request("POST", "/items", {"name": "metered"})
        assert created["statusCode"] == 201, created
        path = f"/items/{response_json(created)['id']}"
        assert wait_until(lambda: not database.backends(user=role), 10)

        def invoke(environment: LambdaEnvironment) -> None:
            responses.append(environment.request("GET", path))

        with items_locked(database):
            # ROLE_LIMIT invocations connect and block on the lock, holding every slot ...
            holders = [
                threading.Thread(target=invoke, args=(environment,), daemon=True)
                for environment in environments[:ROLE_LIMIT]
            ]
            for thread in holders:
                thread.start()
            assert wait_until(lambda: len(database.backends(user=role)) == ROLE_LIMIT, 10)
            # ... so the other environments' connects are refused at once.
            for environment in environments[ROLE_LIMIT:]:
                invoke(environment)
        for thread in holders:
            thread.join(timeout=30)
    finally:
        codes = [environment.close() for environment in environments]
        database.psql(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    assert codes == [0] * len(environments)

    refused = [response for response in responses if response["statusCode"] == 599]
    served = [response for response in responses if response["statusCode"] == 200]
    assert len(refused) == ROLE_LIMIT and len(served) == ROLE_LIMIT, responses
    assert all("too many connections" in response["error"] for response in refused), refused
    records = [record for environment in environments for record in environment.emf()]
    opened = [
        value for record in records if "error.type" not in record for value in record[CREATE_TIME]
    ]
    by_sqlstate: dict[str, int] = {}
    for record in records:
        if "error.type" in record:
            by_sqlstate[record["error.type"]] = by_sqlstate.get(record["error.type"], 0) + len(
                record[CREATE_TIME]
            )
    print(f"lambda: {len(opened)} connects, refused by SQLSTATE {by_sqlstate}")
    # The POST and each served GET opened one connection; each refused GET one 53300.
    assert len(opened) == 1 + len(served), records
    assert by_sqlstate == {"53300": len(refused)}, records
    assert all(record["db.client.connection.pool.name"] == name for record in records)
