"""Saturation fails fast: a pool held by slow queries answers 503 after one pool_timeout.

The services have no slow endpoint, on purpose. A superuser transaction takes an ACCESS
EXCLUSIVE lock on the items table, so every GET /items/{id} blocks inside PostgreSQL while
holding its pooled connection: pool_size + max_overflow such requests hold the whole pool. New
requests must then fail fast with 503 + Retry-After, never hang, and once the lock is released
the held requests finish and the service serves normally again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from harness import ActivitySampler, PostgresCluster
from loadgen import load, repeat_get, request
from services import (
    RenderedProject,
    ServiceProcess,
    held_requests,
    items_locked,
    seed_items,
    wait_until,
)

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]


@pytest.mark.parametrize("name", ["sync", "async"], ids=["k8s-sync", "k8s-async"])
def test_saturated_pool_answers_503_fast_and_recovers(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    rendered = project(name)
    settings = rendered.settings()
    capacity = settings["pool_size"] + settings["max_overflow"]
    pool_timeout = settings["pool_timeout"]
    service = services(
        rendered, database.dsn(driver=""), app_name(f"sat-{name}"), WEB_CONCURRENCY=1
    )
    [item] = seed_items(service, 1, "contended")
    path = f"/items/{item}"

    with ActivitySampler(database, service.application_name) as sampler:
        with items_locked(database):
            # Exactly enough slow requests to hold every connection of the pool.
            held = held_requests(service, path, capacity, timeout=60)
            assert wait_until(
                lambda: database.connections(service.application_name) == capacity, 15
            )

            # The pool is saturated: every new request gets 503 after one pool_timeout.
            extra = load(
                service.port,
                repeat_get(path),
                clients=20,
                duration=0.5,
                max_requests=20,
                timeout=pool_timeout + 10,
            )
            print(f"{name} saturated: {extra.summary()}")
            assert extra.statuses == {503: 20}, extra.summary()
            # One wait of pool_timeout, not two (at the gate, then again at the pool): the
            # answer's own time on the machine is far below a second pool_timeout at any load.
            assert max(r.latency for r in extra.records) < 2 * pool_timeout, extra.summary()
            # It waited for a connection for pool_timeout, it did not just refuse.
            assert min(r.latency for r in extra.records) >= pool_timeout - 0.5
            assert {r.retry_after for r in extra.records} == {str(pool_timeout)}
            # Liveness does not touch the database and stays up meanwhile.
            assert request(service.port, "GET", "/healthz", timeout=2)[0] == 200
        released = time.monotonic()
        held_result = held.join(30)
        assert held_result.statuses == {200: capacity}, held_result.summary()
        # Released requests finish promptly (the pool did not lose track of its connections).
        assert all(r.end - released < 5 for r in held_result.records)

        after = load(
            service.port,
            repeat_get(path),
            clients=20,
            duration=3,
            max_requests=300,
            timeout=10,
        )
    print(f"{name} after the load stopped: {after.summary()}")
    assert after.statuses == {200: len(after.records)} and len(after.records) >= 100
    assert after.percentile(99) < 2.0, after.summary()
    assert sampler.peak == capacity, sampler.peak
