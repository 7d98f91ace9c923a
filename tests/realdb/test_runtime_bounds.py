"""Bounded queries and leak-proof sessions, on real PostgreSQL.

The service runs as its own role, whose timeouts the migration step set (1 s each here, through
STATEMENT_TIMEOUT and IDLE_IN_TRANSACTION_TIMEOUT when `alembic upgrade head` ran): that is how
the bounds reach every session, PgBouncer's and RDS Proxy's included. Then each way a request can
go wrong (a statement stuck behind a lock, a transaction left idle, an exception in the endpoint,
a client that hangs up mid-request, a cancelled async task) runs under concurrent load, and
afterwards the pool has nothing checked out (the service's own /readyz counter) and PostgreSQL
shows no backend of the service idle in a transaction.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import PostgresCluster
from loadgen import BackgroundLoad, items_mix, load, repeat_get, request
from psycopg import sql
from services import RenderedProject, ServiceProcess, items_locked, seed_items

pytestmark = [pytest.mark.realdb, pytest.mark.xdist_group("realdb")]

ROLE, PASSWORD = "rdb_bounded", "bounded-secret"
BOUND_S = 1  # the role's statement_timeout and idle_in_transaction_session_timeout
KINDS = pytest.mark.parametrize("name", ["sync", "async"], ids=["k8s-sync", "k8s-async"])
FAULT_APP = Path(__file__).resolve().parent / "faultapp.py"


@pytest.fixture(scope="module")
def bounded_role(
    database: PostgresCluster, project: Callable[[str], RenderedProject]
) -> Iterator[str]:
    """A role for the service, whose timeouts are delivered by the project's migration step."""
    database.psql(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(ROLE), sql.Literal(PASSWORD)
        )
    )
    grants = [
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO {}",
        "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {}",
    ]
    for grant in grants:
        database.psql(sql.SQL(grant).format(sql.Identifier(ROLE)), dbname=database.app_db)
    url = database.dsn(user=ROLE, password=PASSWORD, driver="")
    for name in ("sync", "async"):  # both migration environments deliver the same settings
        rendered = project(name)
        migrated = subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=rendered.root,
            env=rendered.env(
                DATABASE_URL=url, STATEMENT_TIMEOUT=BOUND_S, IDLE_IN_TRANSACTION_TIMEOUT=BOUND_S
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr[-3000:]
    yield url
    database.psql(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
        (ROLE,),
    )
    database.psql(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(ROLE)), dbname=database.app_db)
    database.psql(sql.SQL("DROP ROLE {}").format(sql.Identifier(ROLE)))


@pytest.fixture
def faulty(
    bounded_role: str,
    project: Callable[[str], RenderedProject],
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> Callable[[str], ServiceProcess]:
    """A rendered service with the /fault endpoints (faultapp.py), running as the bounded role."""

    def start(name: str) -> ServiceProcess:
        rendered = project(name)
        return services(
            rendered,
            bounded_role,
            app_name(f"bounds-{name}"),
            argv=[str(FAULT_APP)],
            PACKAGE=rendered.package,
            WEB_CONCURRENCY=1,
        )

    return start


def checked_out(service: ServiceProcess) -> int:
    status, _headers, body = request(service.port, "GET", "/readyz", timeout=5)
    assert status == 200, body
    return int(body["pool"]["checked_out"])


def idle_in_transaction(database: PostgresCluster, service: ServiceProcess) -> int:
    rows = database.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND state LIKE 'idle in transaction%%'",
        (service.application_name,),
    )
    return int(rows[0][0])


def assert_nothing_leaked(database: PostgresCluster, service: ServiceProcess) -> None:
    # Bounded wait: a connection is returned when its request's task or thread finishes.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if checked_out(service) == 0 and idle_in_transaction(database, service) == 0:
            return
        time.sleep(0.1)
    assert checked_out(service) == 0
    assert idle_in_transaction(database, service) == 0


@contextlib.contextmanager
def background_load(service: ServiceProcess, ids: list[int]) -> Iterator[None]:
    running = BackgroundLoad(
        service.port, items_mix(ids), clients=5, duration=30, max_requests=20_000, timeout=15
    ).start()
    try:
        yield
    finally:
        result = running.stop(timeout=20)
        # The healthy requests around the faults were served.
        assert result.statuses[200] + result.statuses[201] > 0, result.summary()


def test_the_migration_step_sets_the_roles_timeouts(
    bounded_role: str, database: PostgresCluster
) -> None:
    (config,) = database.psql("SELECT rolconfig FROM pg_roles WHERE rolname = %s", (ROLE,))[0]
    assert f"statement_timeout={BOUND_S}s" in config
    assert f"idle_in_transaction_session_timeout={BOUND_S}s" in config


@KINDS
def test_each_migration_path_alone_sets_the_roles_timeouts(
    name: str,
    bounded_role: str,
    database: PostgresCluster,
    project: Callable[[str], RenderedProject],
) -> None:
    """One project's `alembic upgrade head` on a role no other path touched.

    bounded_role migrates sync and async onto one role, so either path masks the other: here
    each runs alone, and the role it leaves must carry both timeouts.
    """
    role = f"rdb_timeouts_{name}"
    database.psql(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(PASSWORD)
        )
    )
    try:
        # The schema is at head already (bounded_role): the step reads alembic_version only.
        database.psql(
            sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role)),
            dbname=database.app_db,
        )
        migrated = subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=project(name).root,
            env=project(name).env(
                DATABASE_URL=database.dsn(user=role, password=PASSWORD, driver=""),
                STATEMENT_TIMEOUT=7,
                IDLE_IN_TRANSACTION_TIMEOUT=9,
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr[-3000:]
        (config,) = database.psql("SELECT rolconfig FROM pg_roles WHERE rolname = %s", (role,))[0]
        assert config is not None, f"the {name} migration step set nothing on {role}"
        assert "statement_timeout=7s" in config, config
        assert "idle_in_transaction_session_timeout=9s" in config, config
    finally:
        database.psql(
            sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)), dbname=database.app_db
        )
        database.psql(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@KINDS
def test_a_statement_stuck_behind_a_lock_is_cancelled_and_answered_503(
    name: str, faulty: Callable[[str], ServiceProcess], database: PostgresCluster
) -> None:
    service = faulty(name)
    ids = seed_items(service, 5, "bounds")
    with items_locked(database):
        # Twice the pool's connections, for longer than the bound, while the lock is held.
        result = load(
            service.port,
            repeat_get(f"/items/{ids[0]}"),
            clients=20,
            duration=2.5,
            max_requests=400,
            timeout=15,
        )
    statuses = result.statuses
    assert statuses[503] > 0 and set(statuses) == {503}, result.summary()
    assert all(record.retry_after for record in result.records)
    # Without the bound each request waited for the lock; with it, every request gets a
    # connection that a cancelled statement frees, so none waits out pool_timeout for one (that
    # would be the saturation 503, whatever the machine's load).
    assert result.bodies_containing("saturated") == [], result.summary()
    pool_timeout = service.project.settings()["pool_timeout"]
    assert max(record.latency for record in result.records) < pool_timeout, result.summary()
    assert_nothing_leaked(database, service)
    assert request(service.port, "GET", f"/items/{ids[0]}", timeout=5)[0] == 200


@KINDS
def test_a_transaction_left_idle_is_ended_by_the_server_and_the_pool_recovers(
    name: str, faulty: Callable[[str], ServiceProcess], database: PostgresCluster
) -> None:
    service = faulty(name)
    ids = seed_items(service, 5, "bounds")
    with background_load(service, ids):
        result = load(
            service.port,
            repeat_get(f"/fault/idle?ms={BOUND_S * 2000}"),
            clients=3,
            max_requests=3,
            duration=10,
            timeout=15,
        )
    assert all(record.status >= 500 for record in result.records), result.summary()
    assert_nothing_leaked(database, service)
    assert request(service.port, "GET", f"/items/{ids[0]}", timeout=5)[0] == 200


@KINDS
def test_an_exception_in_the_endpoint_rolls_back_and_returns_the_connection(
    name: str, faulty: Callable[[str], ServiceProcess], database: PostgresCluster
) -> None:
    service = faulty(name)
    ids = seed_items(service, 5, "bounds")
    with background_load(service, ids):
        result = load(
            service.port, repeat_get("/fault/raise"), clients=10, max_requests=50, duration=10
        )
    assert set(result.statuses) == {500}, result.summary()
    assert_nothing_leaked(database, service)


def hang_up_mid_request(port: int, path: str, after: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        time.sleep(after)


@KINDS
def test_a_client_that_hangs_up_mid_request_leaks_nothing(
    name: str, faulty: Callable[[str], ServiceProcess], database: PostgresCluster
) -> None:
    service = faulty(name)
    ids = seed_items(service, 5, "bounds")
    with background_load(service, ids):
        for _ in range(10):  # each inside its query when the client goes away
            hang_up_mid_request(service.port, "/fault/sleep?ms=700", after=0.2)
        time.sleep(1)
    assert_nothing_leaked(database, service)


def test_a_cancelled_query_task_leaks_nothing(
    faulty: Callable[[str], ServiceProcess], database: PostgresCluster
) -> None:
    service = faulty("async")
    ids = seed_items(service, 5, "bounds")
    with background_load(service, ids):
        result = load(
            service.port,
            repeat_get("/fault/cancel?ms=700"),
            clients=5,
            max_requests=20,
            duration=10,
            timeout=15,
        )
    # The cancelled query took the transaction with it: the session refuses to commit
    # (PendingRollbackError), so the request cannot claim success, and the connection is
    # rolled back and returned like any failed one.
    assert set(result.statuses) == {500}, result.summary()
    assert_nothing_leaked(database, service)
