"""PgBouncer session mode: every client connection pins a server connection for its whole life.

The budget rule this pins, on a real PgBouncer: behind ``pool_mode = session`` PgBouncer links a
server connection to a client at the client's first query and keeps it linked until the client
disconnects, idle or not. A SQLAlchemy QueuePool keeps up to ``pool_size`` connections open
after they are checked in, so the app side's worst case, processes x (pool_size + max_overflow),
must fit PgBouncer's server pool, default_pool_size + reserve_pool_size. One client more waits
for a server connection nobody will give back, and PgBouncer closes it after query_wait_timeout
although nothing is running. Transaction mode links a server connection per transaction only, so
there the app side only has to fit max_client_conn.

Every engine here is a "process" of the app side with its own QueuePool; its connections carry
the application_name ``<test prefix>-p<i>``, and a linked server connection shows that name in
pg_stat_activity (see the docstring of harness/pgbouncer.py), so counts never mix with other
tests' connections. Only the session-scoped ``postgres`` cluster is shared (no rendered project
is needed here).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from harness import PgBouncer, PoolMode, PostgresCluster

pytestmark = [pytest.mark.realdb, pytest.mark.xdist_group("realdb")]

SERVER_POOL = 4
"""default_pool_size (+ reserve_pool_size) of every PgBouncer below: the N of the rule."""
QUERY_WAIT_TIMEOUT_S = 2
"""PgBouncer's query_wait_timeout here (default 120 s): how long a client waits for a server."""
RESERVE_POOL_TIMEOUT_S = 0.5
"""A client waiting this long may take a reserve connection (default 5 s > the wait above)."""
POOL_TIMEOUT_S = 5
"""QueuePool pool_timeout: bounds every checkout; no test here should ever hit it."""


@dataclass(frozen=True)
class AppSide:
    """processes x QueuePool(pool_size, max_overflow): the app side of the budget."""

    processes: int
    pool_size: int
    max_overflow: int

    @property
    def worst_case(self) -> int:
        return self.processes * (self.pool_size + self.max_overflow)


APP_NAMES: weakref.WeakKeyDictionary[sa.Engine, str] = weakref.WeakKeyDictionary()
"""application_name each engine's connections carry (set by the ``engines`` fixture)."""

# Two processes whose pools keep every connection open when idle: worst case 2 x (2 + 0) = 4.
IDLE_POOLS = AppSide(processes=2, pool_size=2, max_overflow=0)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def start_bouncer(postgres: PostgresCluster) -> Iterator[Callable[..., PgBouncer]]:
    """PgBouncer on 127.0.0.1 with a short query_wait_timeout; stopped at teardown."""
    started: list[PgBouncer] = []

    def start(pool_mode: PoolMode, *, default_pool_size: int, reserve_pool_size: int = 0):
        bouncer = PgBouncer(
            postgres,
            pool_mode=pool_mode,
            default_pool_size=default_pool_size,
            max_client_conn=50,
            settings={
                "query_wait_timeout": str(QUERY_WAIT_TIMEOUT_S),
                "reserve_pool_size": str(reserve_pool_size),
                "reserve_pool_timeout": str(RESERVE_POOL_TIMEOUT_S),
            },
        )
        started.append(bouncer)
        return bouncer.start()

    yield start
    for bouncer in started:
        bouncer.stop()


@pytest.fixture
def engines(
    start_bouncer: Callable[..., PgBouncer], app_name: Callable[[str], str]
) -> Iterator[Callable[..., list[sa.Engine]]]:
    """``make(bouncer, app_side)``: one QueuePool engine per process; disposed at teardown.

    Depends on ``start_bouncer`` so the engines are disposed before PgBouncer stops.
    """
    made: list[sa.Engine] = []
    counter = iter(range(1, 1000))

    def make(bouncer: PgBouncer, app: AppSide) -> list[sa.Engine]:
        prefix = app_name("pgb-session-budget")
        batch = []
        for _ in range(app.processes):
            name = f"{prefix}-p{next(counter)}"
            engine = sa.create_engine(
                bouncer.dsn(),
                pool_size=app.pool_size,
                max_overflow=app.max_overflow,
                pool_timeout=POOL_TIMEOUT_S,
                pool_pre_ping=True,
                connect_args={
                    "application_name": name,
                    "connect_timeout": 10,
                    # As the template renders it behind transaction mode; harmless in session.
                    "prepare_threshold": None,
                },
            )
            APP_NAMES[engine] = name
            made.append(engine)
            batch.append(engine)
        return batch

    yield make
    for engine in made:
        engine.dispose()


# --------------------------------------------------------------------------- helpers


def server_connections(postgres: PostgresCluster, engines: list[sa.Engine]) -> list[tuple]:
    """(application_name, state) of every server connection linked to these engines' clients."""
    rows = postgres.psql(
        "SELECT application_name, state FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND application_name = ANY(%s) ORDER BY 1",
        ([APP_NAMES[engine] for engine in engines],),
    )
    return [tuple(row) for row in rows]


def show_pools(bouncer: PgBouncer) -> dict[str, Any]:
    """PgBouncer's own view of the ``app`` pool (admin console ``SHOW POOLS``)."""
    cluster = bouncer.cluster
    with psycopg.connect(
        host=bouncer.host,
        port=bouncer.port,
        user=cluster.app_user,
        password=cluster.app_password,
        dbname="pgbouncer",
        autocommit=True,
        connect_timeout=5,
    ) as admin:
        cursor = admin.execute("SHOW POOLS")
        names = [column.name for column in cursor.description or []]
        for row in cursor.fetchall():
            pool = dict(zip(names, row, strict=True))
            if pool["database"] == cluster.app_db:
                return pool
    raise AssertionError(f"PgBouncer has no pool for database {cluster.app_db!r}")


def counts(pools: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: pools[key] for key in keys}


def warm(engine: sa.Engine, connections: int) -> None:
    """Check out ``connections`` at once, query on each, check them all back in."""
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(engine.connect()) for _ in range(connections)]
        for connection in held:
            assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1


def timed_query(engine: sa.Engine) -> float:
    """Seconds one checkout + ``SELECT 1`` took (raises what the driver raised)."""
    started = time.monotonic()
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1
    return time.monotonic() - started


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("default_pool_size", "reserve_pool_size"),
    [(SERVER_POOL, 0), (SERVER_POOL - 1, 1)],
    ids=["default_pool_size=4", "default_pool_size=3+reserve_pool_size=1"],
)
def test_session_mode_idle_pooled_clients_hold_every_server_connection(
    default_pool_size: int,
    reserve_pool_size: int,
    postgres: PostgresCluster,
    start_bouncer: Callable[..., PgBouncer],
    engines: Callable[..., list[sa.Engine]],
) -> None:
    assert default_pool_size + reserve_pool_size == SERVER_POOL == IDLE_POOLS.worst_case
    bouncer = start_bouncer(
        "session", default_pool_size=default_pool_size, reserve_pool_size=reserve_pool_size
    )
    processes = engines(bouncer, IDLE_POOLS)
    for engine in processes:
        warm(engine, IDLE_POOLS.pool_size)
        # Checked in, kept open: QueuePool holds pool_size idle connections per process.
        assert (engine.pool.checkedin(), engine.pool.checkedout()) == (IDLE_POOLS.pool_size, 0)

    # Nothing is running, yet every server connection is linked to an idle client.
    linked = server_connections(postgres, processes)
    assert len(linked) == SERVER_POOL, linked
    assert {state for _, state in linked} == {"idle"}, linked
    pools = show_pools(bouncer)
    print(f"session, {default_pool_size}+{reserve_pool_size}, warmed: {pools}")
    assert counts(pools, "cl_active", "cl_waiting", "sv_active", "sv_idle") == {
        "cl_active": SERVER_POOL,
        "cl_waiting": 0,
        "sv_active": SERVER_POOL,  # linked to a client, though the client is idle
        "sv_idle": 0,
    }
    # The reserve is part of the server pool: the last warm-up client waited for it.
    log = bouncer.log_file.read_text()
    assert ("taking connection from reserve_pool" in log) == (reserve_pool_size > 0)

    # One client more (a third process): it waits for a server connection and is cut off.
    [extra] = engines(bouncer, AppSide(processes=1, pool_size=1, max_overflow=0))
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError) as refused:
        timed_query(extra)
    waited = time.monotonic() - started
    error = refused.value.orig
    print(f"session, {default_pool_size}+{reserve_pool_size}, extra: {waited:.2f} s, {error!r}")
    assert "query_wait_timeout" in str(error)
    # It waited query_wait_timeout for a server (PgBouncer checks about once a second).
    assert QUERY_WAIT_TIMEOUT_S - 0.25 <= waited <= QUERY_WAIT_TIMEOUT_S + 3
    assert "closing because: query_wait_timeout" in bouncer.log_file.read_text()

    # The idle clients were holding it: once one process disposes its pool, the extra succeeds.
    processes[0].dispose()
    assert timed_query(extra) < QUERY_WAIT_TIMEOUT_S
    assert len(server_connections(postgres, [*processes, extra])) <= SERVER_POOL


def test_transaction_mode_idle_pooled_clients_hold_no_server_connection(
    postgres: PostgresCluster,
    start_bouncer: Callable[..., PgBouncer],
    engines: Callable[..., list[sa.Engine]],
) -> None:
    """The same clients as above, one more included, all succeed behind transaction mode."""
    bouncer = start_bouncer("transaction", default_pool_size=SERVER_POOL)
    processes = engines(bouncer, IDLE_POOLS)
    for engine in processes:
        warm(engine, IDLE_POOLS.pool_size)
        assert (engine.pool.checkedin(), engine.pool.checkedout()) == (IDLE_POOLS.pool_size, 0)

    # Idle clients hold no server connection: all of them are back in PgBouncer's pool.
    pools = show_pools(bouncer)
    print(f"transaction, warmed: {pools}")
    assert counts(pools, "cl_active", "cl_waiting", "sv_active") == {
        "cl_active": SERVER_POOL,
        "cl_waiting": 0,
        "sv_active": 0,
    }
    assert 1 <= pools["sv_idle"] <= SERVER_POOL

    [extra] = engines(bouncer, AppSide(processes=1, pool_size=1, max_overflow=0))
    waited = timed_query(extra)
    print(f"transaction, extra client: {waited:.2f} s")
    assert waited < QUERY_WAIT_TIMEOUT_S
    # And every client, the extra one included, keeps being served, a few rounds over.
    clients = [*processes, extra]
    for _round in range(3):
        for engine in clients:
            assert timed_query(engine) < QUERY_WAIT_TIMEOUT_S
    assert len(server_connections(postgres, clients)) <= SERVER_POOL
    assert "query_wait_timeout" not in bouncer.log_file.read_text()


@pytest.mark.parametrize(
    "app",
    [
        IDLE_POOLS,
        AppSide(processes=2, pool_size=1, max_overflow=1),
        AppSide(processes=1, pool_size=2, max_overflow=1),
    ],
    ids=["2x(2+0)=4", "2x(1+1)=4", "1x(2+1)=3"],
)
def test_session_mode_clients_within_the_server_pool_all_succeed(
    app: AppSide,
    postgres: PostgresCluster,
    start_bouncer: Callable[..., PgBouncer],
    engines: Callable[..., list[sa.Engine]],
) -> None:
    assert app.worst_case <= SERVER_POOL
    bouncer = start_bouncer("session", default_pool_size=SERVER_POOL)
    processes = engines(bouncer, app)
    capacity = app.pool_size + app.max_overflow
    peak = 0
    for _round in range(3):
        with contextlib.ExitStack() as stack:
            # Every process checks out its whole pool, overflow included: the worst case at once.
            held = [
                stack.enter_context(engine.connect())
                for engine in processes
                for _ in range(capacity)
            ]
            for connection in held:
                started = time.monotonic()
                assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1
                assert time.monotonic() - started < QUERY_WAIT_TIMEOUT_S
            peak = max(peak, len(server_connections(postgres, processes)))
        # Checked in: overflow connections close, pool_size of them stay open (and linked).
        for engine in processes:
            assert engine.pool.checkedin() == app.pool_size
    pools = show_pools(bouncer)
    print(f"session, {app}: peak {peak} server connections, {pools}")
    assert peak == app.worst_case
    assert pools["cl_waiting"] == 0
    assert pools["sv_active"] == app.processes * app.pool_size
    assert "query_wait_timeout" not in bouncer.log_file.read_text()
