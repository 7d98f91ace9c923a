"""Tests of the realdb harness itself, against real PostgreSQL and PgBouncer processes.

Every wait here is bounded in time (and every loop in count) so a broken server turns into
a failure within seconds, never a hung CI job.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from harness import (
    ActivitySampler,
    PgBouncer,
    PostgresCluster,
    child_pids,
    pid_alive,
)

pytestmark = [pytest.mark.realdb, pytest.mark.xdist_group("realdb")]

POOL_SIZE = 10  # the conftest fixtures' default_pool_size


def _connect(dsn: str, app: str, *, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(dsn, application_name=app, connect_timeout=10, autocommit=autocommit)


@pytest.fixture
def held() -> Iterator[ExitStack]:
    """Connections opened in a test are closed even when the test fails halfway."""
    with ExitStack() as stack:
        yield stack


def test_cluster_starts_and_dsn_is_a_working_sqlalchemy_url(postgres: PostgresCluster) -> None:
    assert postgres.host == "127.0.0.1"
    assert postgres.dsn() == f"postgresql+psycopg://app:secret@127.0.0.1:{postgres.port}/app"
    assert postgres.psql("SHOW max_connections") == [("60",)]
    assert postgres.psql("SHOW listen_addresses") == [("127.0.0.1",)]
    engine = sa.create_engine(postgres.dsn(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT current_user, current_database()")).one()
    finally:
        engine.dispose()
    assert tuple(row) == ("app", "app")


def test_superuser_is_password_protected_over_tcp(postgres: PostgresCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.dsn(user=postgres.superuser, password="wrong", driver=""))
    assert postgres.psql("SELECT current_user") == [(postgres.superuser,)]


def test_application_name_visible_and_sampler_peak(
    postgres: PostgresCluster, held: ExitStack
) -> None:
    n = 5
    with ActivitySampler(postgres, "harness-probe") as sampler:
        for _ in range(n):
            held.enter_context(_connect(postgres.dsn(driver=""), "harness-probe"))
        assert sampler.wait_for(lambda s: s.peak >= n, timeout=5), sampler.samples[-5:]
        assert postgres.connections("harness-probe") == n
        assert postgres.connections("harness-", prefix=True) == n
        held.close()
        assert sampler.wait_for(lambda s: s.last == 0, timeout=5), sampler.samples[-5:]
    assert sampler.peak == n
    assert sampler.errors == 0
    assert not sampler.running


def test_sampler_stops_itself_after_max_duration(postgres: PostgresCluster) -> None:
    sampler = ActivitySampler(postgres, "nobody", max_duration=0.3).start()
    assert sampler.running
    for _ in range(100):  # bounded: 100 x 50 ms
        if not sampler.running:
            break
        time.sleep(0.05)
    assert not sampler.running
    assert 1 <= len(sampler.samples) <= 10
    assert set(sampler.samples) == {0}
    sampler.stop()


def test_terminate_backends(postgres: PostgresCluster, held: ExitStack) -> None:
    conns = [held.enter_context(_connect(postgres.dsn(driver=""), "harness-victim")) for _ in "ab"]
    bystander = held.enter_context(_connect(postgres.dsn(driver=""), "harness-bystander"))
    assert postgres.connections("harness-victim") == 2
    assert postgres.terminate_backends("harness-victim") == 2
    assert postgres.connections("harness-victim") == 0
    for conn in conns:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    assert postgres.terminate_backends("harness-victim") == 0


def _assert_routes_to_server(bouncer: PgBouncer, app: str) -> None:
    with _connect(bouncer.dsn(driver=""), app) as conn:
        row = conn.execute(
            "SELECT inet_server_port(), current_setting('application_name')"
        ).fetchone()
    # The query ran on *our* cluster, and the client's application_name reached the server.
    assert row == (bouncer.cluster.port, app)
    engine = sa.create_engine(bouncer.dsn(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_user")).scalar() == "app"
    finally:
        engine.dispose()


def test_transaction_pool_routes_and_caps_server_connections(
    postgres: PostgresCluster, pgbouncer_transaction: PgBouncer, held: ExitStack
) -> None:
    bouncer, app = pgbouncer_transaction, "bouncer-tx-load"
    assert bouncer.pool_mode == "transaction"
    _assert_routes_to_server(bouncer, "bouncer-tx-route")

    clients = [
        held.enter_context(_connect(bouncer.dsn(driver=""), app, autocommit=True))
        for _ in range(3 * POOL_SIZE)
    ]
    barrier = threading.Barrier(len(clients), timeout=10)
    failures: list[Exception] = []

    def work(conn: psycopg.Connection) -> None:
        try:
            barrier.wait()
            for _ in range(2):
                conn.execute("SELECT pg_sleep(0.2)")
        except (psycopg.Error, threading.BrokenBarrierError) as exc:  # asserted below
            failures.append(exc)

    with ActivitySampler(postgres, app) as sampler:
        threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        assert sampler.wait_for(lambda s: len(s.samples) >= 2, timeout=2)
    assert failures == []
    # 30 clients, one shared pool: the server never saw more than default_pool_size
    # backends for them, yet more than one ran at once (real concurrency, real pooling).
    assert 2 <= sampler.peak <= POOL_SIZE, sampler.samples
    assert postgres.connections(app) <= POOL_SIZE


def test_session_pool_routes_caps_and_queues(
    postgres: PostgresCluster, pgbouncer_session: PgBouncer, held: ExitStack
) -> None:
    bouncer, app = pgbouncer_session, "bouncer-session-load"
    assert bouncer.pool_mode == "session"
    _assert_routes_to_server(bouncer, "bouncer-session-route")

    # All 30 logins succeed (PgBouncer answers them itself); a server connection is only
    # bound to a client at its first query, and then for the whole session.
    clients = [
        held.enter_context(_connect(bouncer.dsn(driver=""), app, autocommit=True))
        for _ in range(3 * POOL_SIZE)
    ]
    with ActivitySampler(postgres, app) as sampler:
        for conn in clients[:POOL_SIZE]:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert postgres.connections(app) == POOL_SIZE

        # The 11th session must wait for a free server connection...
        done = threading.Event()

        def eleventh() -> None:
            clients[POOL_SIZE].execute("SELECT 1")
            done.set()

        waiter = threading.Thread(target=eleventh, daemon=True)
        waiter.start()
        assert not done.wait(0.5), "session pool handed out more than default_pool_size"
        # ...and gets one as soon as another session ends.
        clients[0].close()
        assert done.wait(10)
        waiter.join(timeout=5)
        assert sampler.wait_for(lambda s: len(s.samples) >= 2, timeout=2)
    assert sampler.peak <= POOL_SIZE, sampler.samples
    assert postgres.connections(app) == POOL_SIZE


def test_asyncpg_through_transaction_pool(pgbouncer_transaction: PgBouncer) -> None:
    async def probe() -> tuple[str, int]:
        # statement_cache_size=0: PgBouncer 1.18 cannot pool prepared statements.
        conn = await asyncpg.connect(
            pgbouncer_transaction.dsn(driver=""),
            server_settings={"application_name": "harness-asyncpg"},
            statement_cache_size=0,
            timeout=10,
        )
        try:
            row = await conn.fetchrow(
                "SELECT current_setting('application_name') AS name, "
                "(SELECT count(*) FROM pg_stat_activity "
                " WHERE application_name = 'harness-asyncpg') AS seen"
            )
            assert row is not None
            return row["name"], row["seen"]
        finally:
            await conn.close()

    name, seen = asyncio.run(asyncio.wait_for(probe(), timeout=20))
    assert (name, seen) == ("harness-asyncpg", 1)


def test_pgbouncer_restart(pgbouncer_transaction: PgBouncer, held: ExitStack) -> None:
    bouncer = pgbouncer_transaction
    old = held.enter_context(_connect(bouncer.dsn(driver=""), "bouncer-restart"))
    old_pid = bouncer.pid
    bouncer.restart()
    assert bouncer.pid != old_pid
    assert old_pid is not None and not pid_alive(old_pid)
    with pytest.raises(psycopg.OperationalError):
        old.execute("SELECT 1")
    with _connect(bouncer.dsn(driver=""), "bouncer-restart") as new:
        assert new.execute("SELECT 1").fetchone() == (1,)


def test_cluster_restart(
    postgres: PostgresCluster, pgbouncer_transaction: PgBouncer, held: ExitStack
) -> None:
    old = held.enter_context(_connect(postgres.dsn(driver=""), "harness-restart"))
    old_pid = postgres.postmaster_pid
    started = postgres.psql("SELECT pg_postmaster_start_time()")
    postgres.restart()
    assert postgres.postmaster_pid != old_pid
    assert postgres.psql("SELECT pg_postmaster_start_time()") != started
    with pytest.raises(psycopg.OperationalError):
        old.execute("SELECT 1")
    with _connect(postgres.dsn(driver=""), "harness-restart") as new:
        assert new.execute("SELECT 1").fetchone() == (1,)
    # PgBouncer drops the pooled connections the restart killed and dials new ones.
    _assert_routes_to_server(pgbouncer_transaction, "bouncer-after-pg-restart")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_stop_removes_everything(realdb_binaries: None) -> None:
    with (
        PostgresCluster(max_connections=10) as cluster,
        PgBouncer(cluster, default_pool_size=2) as bouncer,
    ):
        dirs = [cluster.tmpdir, bouncer.tmpdir]
        postmaster, bouncer_pid = cluster.postmaster_pid, bouncer.pid
        assert postmaster is not None and bouncer_pid is not None
        backends = child_pids(postmaster)
        assert pid_alive(postmaster) and pid_alive(bouncer_pid) and backends
        assert all(d is not None and d.is_dir() for d in dirs)
        ports = [cluster.port, bouncer.port]
    assert not any(d is not None and d.exists() for d in dirs)
    assert [p for p in (postmaster, bouncer_pid, *backends) if pid_alive(p)] == []
    assert [p for d in dirs for p in _processes_mentioning(str(d))] == []
    for port in ports:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=port, user="app", connect_timeout=2)
    # stop() is idempotent.
    cluster.stop()
    bouncer.stop()
