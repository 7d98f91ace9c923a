"""Shutdown: SIGTERM drains in-flight work, the process exits in time, no connection remains.

"No connection remains" is checked twice: pg_stat_activity has no backend with the service's
application_name right after the process exits, and the server log has no "unexpected EOF on
client connection with an open transaction", which PostgreSQL writes when a client vanishes
mid-transaction instead of rolling back and closing its connection.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import ActivitySampler, PostgresCluster
from services import (
    RenderedProject,
    ServiceProcess,
    held_requests,
    items_locked,
    run_job,
    seed_items,
    wait_until,
)

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

ABANDONED = "unexpected EOF on client connection"


def grace_period(rendered: RenderedProject) -> int:
    main = (rendered.root / "src" / rendered.package / "__main__.py").read_text()
    match = re.search(r"^GRACEFUL_SHUTDOWN_SECONDS = (\d+)", main, re.MULTILINE)
    assert match, "__main__.py no longer declares GRACEFUL_SHUTDOWN_SECONDS"
    return int(match.group(1))


@pytest.mark.parametrize(
    ("name", "workers"), [("sync", 2), ("async", 1)], ids=["k8s-sync-2-workers", "k8s-async"]
)
def test_sigterm_drains_in_flight_requests_and_closes_every_connection(
    name: str,
    workers: int,
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    app_name: Callable[[str], str],
) -> None:
    rendered = project(name)
    grace = grace_period(rendered)
    service = services(
        rendered, database.dsn(driver=""), app_name(f"term-{name}"), WEB_CONCURRENCY=workers
    )
    [item] = seed_items(service, 1, "in-flight")
    path = f"/items/{item}"
    in_flight = 8
    log_offset = database.log_offset()

    with items_locked(database):
        # Requests that are inside PostgreSQL (blocked on a lock) when SIGTERM arrives.
        held = held_requests(service, path, in_flight, timeout=grace + 10)
        assert wait_until(
            lambda: database.connections(service.application_name) >= in_flight, 15
        ), database.backends(service.application_name)
        service.terminate()
        signalled = time.monotonic()
        time.sleep(1.5)  # the requests are still running: the process must wait for them
        assert service.proc is not None and service.proc.poll() is None, service.log()[-2000:]

    result = held.join(grace + 15)
    exit_code = service.wait(grace + 10)
    exited = time.monotonic()
    remaining = database.connections(service.application_name)
    print(
        f"{name}: in flight {result.summary()}; exit {exit_code} after"
        f" {exited - signalled:.1f}s; {remaining} connections left"
    )
    assert result.statuses == {200: in_flight}, result.summary()
    assert exit_code is not None, "the service did not exit within its grace period"
    # uvicorn re-raises SIGTERM after its graceful shutdown (single process), or exits 0
    # (the multi-worker supervisor).
    assert exit_code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), exit_code
    assert exited - signalled < grace
    # The lifespan disposed the engine before the process ended: nothing is left behind.
    assert wait_until(lambda: database.connections(service.application_name) == 0, 1.0), (
        database.backends(service.application_name)
    )
    assert "engine disposed" in service.log() or workers > 1, service.log()[-2000:]
    assert ABANDONED not in database.log_since(log_offset)
    service.kill()


# --------------------------------------------------------------------------- batch jobs

JOB_ITEMS = 3000


@pytest.fixture
def job_items(database: PostgresCluster) -> Iterator[str]:
    """JOB_ITEMS unprocessed items, named with a fresh prefix; everything else processed."""
    prefix = f"job-{time.monotonic_ns()}-"
    database.psql("UPDATE items SET processed = true WHERE NOT processed", dbname="app")
    database.psql(
        "INSERT INTO items (name, processed) SELECT %s || g, false FROM generate_series(1, %s) g",
        (prefix, JOB_ITEMS),
        dbname="app",
    )
    yield prefix
    database.psql("DROP TRIGGER IF EXISTS realdb_fault ON items", dbname="app")
    database.psql("DROP FUNCTION IF EXISTS realdb_fault()", dbname="app")


def processed(database: PostgresCluster, prefix: str) -> int:
    rows = database.psql(
        "SELECT count(*) FROM items WHERE processed AND name LIKE %s", (prefix + "%",), dbname="app"
    )
    return int(rows[0][0])


def add_trigger(database: PostgresCluster, body: str) -> None:
    """A BEFORE UPDATE trigger on items: the database injects the fault, not the job's code."""
    database.psql(
        f"CREATE FUNCTION realdb_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body}"
        " RETURN NEW; END $$",
        dbname="app",
    )
    database.psql(
        "CREATE TRIGGER realdb_fault BEFORE UPDATE ON items FOR EACH ROW"
        " EXECUTE FUNCTION realdb_fault()",
        dbname="app",
    )


def run_batch(
    rendered: RenderedProject,
    database: PostgresCluster,
    application_name: str,
    log_dir: Path,
    *,
    sigterm_after: float | None = None,
) -> tuple[int, float, int, str]:
    """Run the job's real entry point; (exit code, seconds after exit/signal, peak, log)."""
    log_offset = database.log_offset()
    with ActivitySampler(database, application_name) as sampler:
        job = run_job(rendered, database.dsn(driver=""), application_name, log_dir)
        try:
            if sigterm_after is not None:
                assert wait_until(lambda: sampler.peak >= 2, 15), "the job never connected"
                time.sleep(sigterm_after)
                assert job.poll() is None, "the job finished before it could be signalled"
                job.send_signal(signal.SIGTERM)
            started = time.monotonic()
            exit_code = job.wait(timeout=60)
            took = time.monotonic() - started
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait(10)
            raise
        assert wait_until(lambda: database.connections(application_name) == 0, 1.0), (
            database.backends(application_name)
        )
    assert ABANDONED not in database.log_since(log_offset)
    log = (log_dir / f"{application_name}.log").read_text()
    return exit_code, took, sampler.peak, log


@pytest.fixture
def batch(project: Callable[[str], RenderedProject], realdb_dir: Path) -> RenderedProject:
    (realdb_dir / "logs").mkdir(exist_ok=True)
    return project("batch")


@pytest.fixture
def batch_job(
    batch: RenderedProject,
    database: PostgresCluster,
    app_name: Callable[[str], str],
    realdb_dir: Path,
) -> Callable[..., tuple[int, float, int, str]]:
    """`run_batch` for the batch project, under a fresh application_name with this prefix."""

    def run(prefix: str, *, sigterm_after: float | None = None) -> tuple[int, float, int, str]:
        return run_batch(
            batch, database, app_name(prefix), realdb_dir / "logs", sigterm_after=sigterm_after
        )

    return run


def test_batch_job_success_disposes_everything(
    batch: RenderedProject,
    batch_job: Callable[..., tuple[int, float, int, str]],
    database: PostgresCluster,
    job_items: str,
) -> None:
    budget = batch.budget()
    exit_code, _, peak, log = batch_job("job-ok")
    assert exit_code == 0, log[-3000:]
    assert processed(database, job_items) == JOB_ITEMS
    # BATCH_PROCESSES=2 NullPool processes: at most one connection each, as budgeted.
    assert 1 <= peak <= budget["app_total"], (peak, budget)


def test_batch_job_exception_disposes_everything(
    batch_job: Callable[..., tuple[int, float, int, str]],
    database: PostgresCluster,
    job_items: str,
) -> None:
    # One poisoned row makes its shard's UPDATE fail halfway through the job.
    add_trigger(
        database,
        f"IF NEW.name = '{job_items}{JOB_ITEMS // 2}' THEN RAISE EXCEPTION 'poisoned row'; END IF;",
    )
    exit_code, _, _, log = batch_job("job-err")
    assert exit_code != 0
    assert "poisoned row" in log
    done = processed(database, job_items)
    # The failing batch rolled back; the other shard and earlier batches were committed.
    assert 0 < done < JOB_ITEMS, done


def test_batch_job_sigterm_disposes_everything(
    batch_job: Callable[..., tuple[int, float, int, str]],
    database: PostgresCluster,
    job_items: str,
) -> None:
    # 5 ms per row keeps each 100-row batch transaction busy for ~0.5 s: SIGTERM lands while
    # both processes are inside a transaction.
    add_trigger(database, "PERFORM pg_sleep(0.005);")
    exit_code, took, _, log = batch_job("job-term", sigterm_after=1.0)
    print(f"batch SIGTERM: exit {exit_code} {took:.2f}s after the signal")
    assert exit_code == 128 + signal.SIGTERM, log[-3000:]
    assert took < 5, "the job did not stop promptly on SIGTERM"
    assert processed(database, job_items) < JOB_ITEMS
