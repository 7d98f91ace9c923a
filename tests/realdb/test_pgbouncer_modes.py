"""PgBouncer pool modes: 500 concurrent requests with no prepared-statement errors.

Transaction mode hands every transaction whichever server connection is free, so a statement
prepared server-side on one connection is missing (or already exists) on the next. The template
renders psycopg with prepare_threshold=None there, and refuses asyncpg behind transaction mode;
asyncpg is exercised behind session mode instead, where it is allowed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable

import psycopg
import pytest
from harness import ActivitySampler, PgBouncer, PostgresCluster
from loadgen import items_mix, load
from rendering import render
from services import RenderedProject, ServiceProcess, seed_items

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

REQUESTS = 500
PREPARED = "prepared statement"


@pytest.mark.parametrize(
    "name",
    ["async-tx", "async-session", "asyncpg-session", "sync-tx"],
    ids=[
        "k8s-async-psycopg-transaction",
        "k8s-async-psycopg-session",
        "k8s-async-asyncpg-session",
        "k8s-sync-psycopg-transaction",
    ],
)
def test_500_concurrent_requests_without_prepared_statement_errors(
    name: str,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    bouncer: Callable[[RenderedProject], PgBouncer],
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    rendered = project(name)
    budget = rendered.budget()
    pgbouncer = bouncer(rendered)
    service = services(rendered, pgbouncer.dsn(driver=""), app_name(f"pgb-{name}"))
    ids = seed_items(service, 10, "pgb")

    with (
        ActivitySampler(database, service.application_name) as by_name,
        ActivitySampler(database, None, user=database.app_user) as server_side,
    ):
        # 500 clients, one request each, all at once; then a second, sustained round so every
        # statement runs many times on every server connection (psycopg would prepare after 5).
        burst = load(
            service.port, items_mix(ids), clients=REQUESTS, duration=30, max_requests=REQUESTS
        )
        sustained = load(
            service.port, items_mix(ids), clients=REQUESTS, duration=3, max_requests=20 * REQUESTS
        )
    print(f"{name} burst: {burst.summary()}\n{name} sustained: {sustained.summary()}")
    print(f"{name}: peak {by_name.peak} by name, {server_side.peak} server connections")

    for result in (burst, sustained):
        assert result.bodies_containing(PREPARED) == []
        assert [r for r in result.failed() if r.status != 503] == [], result.summary()
    assert len(burst.records) == REQUESTS
    assert len(burst.ok()) >= 0.95 * REQUESTS, burst.summary()
    assert PREPARED not in service.log()
    assert "Traceback" not in service.log(), service.log()[-3000:]
    # The app side stays within its pool; the server side within default_pool_size.
    assert 1 <= by_name.peak <= budget["per_process"]
    assert server_side.peak <= budget["pgbouncer_default_pool_size"]


def test_the_failure_mode_is_real_psycopg_prepares_through_transaction_mode(
    database: PostgresCluster, bouncer: Callable[[RenderedProject], PgBouncer], project
) -> None:
    """Control: the same harness does produce the error the template's setting prevents."""
    pgbouncer = bouncer(project("async-tx"))
    errors: list[str] = []
    barrier = threading.Barrier(4, timeout=10)

    def client() -> None:
        # prepare_threshold=0 prepares at once, as psycopg's default (5) does after 5 runs.
        with psycopg.connect(
            pgbouncer.dsn(driver=""), prepare_threshold=0, autocommit=True, connect_timeout=10
        ) as connection:
            barrier.wait()
            for number in range(50):
                try:
                    connection.execute("SELECT %s::int + pg_backend_pid() * 0", (number,))
                except psycopg.Error as exc:
                    errors.append(str(exc))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert any(PREPARED in error for error in errors), errors[:3]


def test_asyncpg_behind_transaction_mode_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="asyncpg is not allowed behind PgBouncer transaction"):
        render(
            tmp_path / "refused",
            {
                "target": "k8s-async",
                "pooler": "pgbouncer",
                "pgbouncer_pool_mode": "transaction",
                "driver": "asyncpg",
            },
        )
    assert not (tmp_path / "refused" / "src").exists()


def test_asyncpg_behind_transaction_mode_is_refused_at_start_up_too(
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    bouncer: Callable[[RenderedProject], PgBouncer],
) -> None:
    # Rendered with psycopg; a DATABASE_URL naming asyncpg would fail per query in this mode.
    rendered = project("async-tx")
    pgbouncer = bouncer(rendered)
    started = subprocess.run(
        [sys.executable, "-m", rendered.package],
        cwd=rendered.root,
        env=rendered.env(DATABASE_URL=pgbouncer.dsn(driver="asyncpg"), PORT=1),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 2, started.stderr[-3000:]
    (line,) = started.stderr.strip().splitlines()
    assert line.startswith(
        "refusing to start: DATABASE_URL=postgresql+asyncpg://...: asyncpg behind PgBouncer"
        " pool_mode=transaction"
    ), line
