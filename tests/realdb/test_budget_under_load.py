"""The connection budget holds under load, and every worker process has its own connections.

Each test renders a project, runs its real entry point (``python -m <pkg>``: uvicorn with
WEB_CONCURRENCY workers) against the throwaway PostgreSQL, and watches pg_stat_activity for the
service's application_name every 50 ms from a background thread.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import ActivitySampler, PostgresCluster
from loadgen import items_mix, load
from services import RenderedProject, ServiceProcess, postgres_sockets, seed_items, wait_until

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

CLIENTS = 200
SECONDS = float(os.environ.get("REALDB_LOAD_SECONDS", "10"))
MAX_REQUESTS = 50_000  # a count bound next to the time bound


@pytest.mark.parametrize(
    ("name", "workers"),
    [("sync", 2), ("async", 1)],
    ids=["k8s-sync-2-workers", "k8s-async"],
)
def test_peak_connections_stay_within_the_budget_under_load(
    name: str,
    workers: int,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    rendered = project(name)
    budget = rendered.budget()  # the rendered topology is one replica, no surge
    assert budget["processes"] == workers
    service = services(
        rendered, database.dsn(driver=""), app_name(f"load-{name}"), WEB_CONCURRENCY=workers
    )
    ids = seed_items(service, 20, "seed")

    with ActivitySampler(database, service.application_name) as sampler:
        result = load(
            service.port,
            items_mix(ids),
            clients=CLIENTS,
            duration=SECONDS,
            max_requests=MAX_REQUESTS,
            timeout=30,
        )
    print(f"{name}: {result.summary()}; peak {sampler.peak} of budget {budget['app_total']}")

    assert sampler.errors == 0 and len(sampler.samples) >= SECONDS * 5, sampler.samples
    # The database never saw more connections than poolwise.rule allows this replica...
    assert sampler.peak <= budget["app_total"], (sampler.peak, budget)
    # ...and the load really reached the pools: more than one process's worth (sync, 2
    # workers) or more than pool_size, i.e. into max_overflow (async).
    assert sampler.peak > (budget["per_process"] if workers > 1 else budget["pool_size"])
    # Saturation may shed load as 503 + Retry-After; nothing else may fail.
    unexpected = [r for r in result.failed() if r.status != 503]
    assert unexpected == [], unexpected[:5]
    assert all(r.retry_after for r in result.records if r.status == 503)
    assert len(result.ok()) > 0.9 * len(result.records), result.summary()
    assert "Traceback" not in service.log()


def test_every_worker_has_its_own_backend(
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    """workers_per_pod=2: each uvicorn worker opens its own connections; the parent none."""
    rendered = project("sync")
    service = services(rendered, database.dsn(driver=""), app_name("fork"), WEB_CONCURRENCY=2)
    children = service.children()
    # uvicorn's workers are spawned multiprocessing children (a resource tracker may be another).
    workers = [
        pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 2, children
    ids = seed_items(service, 5, "seed")
    # Enough concurrent requests that both workers take some (the kernel spreads accepts).
    for _ in range(10):  # bounded
        load(service.port, items_mix(ids), clients=40, duration=2, max_requests=400)
        if all(postgres_sockets(workers, database.port).values()):
            break

    def snapshot() -> tuple[dict[int, list[int]], dict[int, int]]:
        backends = database.backends(service.application_name)
        return (
            postgres_sockets([service.pid, *children], database.port),
            {port: pid for pid, _, _, port, _ in backends},
        )

    # Overflow connections close as the load drains; compare once nothing moves any more.
    previous = snapshot()
    for _ in range(50):  # bounded: 50 x 0.1 s
        time.sleep(0.1)
        current = snapshot()
        if current == previous:
            break
        previous = current
    owned, backends = current

    holders = [pid for pid in (service.pid, *children) if owned[pid] and pid not in workers]
    assert holders == [], f"a non-worker process holds a PostgreSQL connection: {owned}"
    for worker in workers:
        assert owned[worker], f"worker {worker} never connected: {owned}"
    ports = [port for worker in workers for port in owned[worker]]
    # No socket is shared: every client port belongs to exactly one worker...
    assert len(ports) == len(set(ports)), owned
    # ...and each is a distinct backend (pg_stat_activity.pid is that backend's pg_backend_pid()).
    assert set(ports) == set(backends), (owned, backends)
    assert len(set(backends.values())) == len(backends)


FORK_PROBE = """
import asyncio, json, os
from sqlalchemy import text
from {package}.db.engine import build_engine
from {package}.settings import Settings

engine = build_engine(Settings.from_env())
ASYNC = {is_async}

async def backend_pid():
    async with engine.connect() as connection:
        return (await connection.execute(text("SELECT pg_backend_pid()"))).scalar()

def sync_backend_pid():
    with engine.connect() as connection:
        return connection.execute(text("SELECT pg_backend_pid()")).scalar()

def query():
    return asyncio.run(backend_pid()) if ASYNC else sync_backend_pid()

def dispose():
    if ASYNC:
        asyncio.run(engine.dispose())
    else:
        engine.dispose()

parent = query()  # the parent's connection is now idle in its pool
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.close(read)
    try:
        os.write(write, json.dumps({{"child": query()}}).encode())
        dispose()
    finally:
        os._exit(0)
os.close(write)
_, status = os.waitpid(child, 0)
answer = json.loads(os.read(read, 1000) or b"{{}}")
print(json.dumps({{"parent": parent, "again": query(), "status": status, **answer}}))
dispose()
"""


@pytest.mark.parametrize("name", ["sync", "async"], ids=["k8s-sync", "k8s-async"])
def test_forked_child_never_uses_the_parents_connection(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    app_name: Callable[[str], str],
) -> None:
    """A pre-forking server (gunicorn --preload) forks after the engine exists: the child must
    dial its own backend, and the parent's pooled connection must survive the child's exit."""
    rendered = project(name)
    application = app_name(f"fork-{name}")
    code = FORK_PROBE.format(package=rendered.package, is_async=name == "async")
    output = rendered.python(
        code, DATABASE_URL=database.dsn(driver=""), APPLICATION_NAME=application, timeout=60
    )
    pids = json.loads(output.stdout.strip().splitlines()[-1])
    assert pids["status"] == 0
    assert pids["child"] != pids["parent"], pids
    # close=False: the child's dispose did not close (or talk on) the parent's socket.
    assert pids["again"] == pids["parent"], pids
    assert wait_until(lambda: database.connections(application) == 0, timeout=5)
