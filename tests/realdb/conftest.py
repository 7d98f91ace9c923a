"""pytest plugin part of the realdb tier: real PostgreSQL / PgBouncer session fixtures.

Missing binaries skip the tier locally (the reason is printed in the terminal summary) but
fail it when ``CI`` is set: in CI a silently skipped tier would look green while testing
nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Why: with `--import-mode=importlib` pytest does not put this directory on sys.path, and
# there is deliberately no __init__.py here; make `import harness` work in every mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PgBouncer, PostgresCluster, missing_requirements

REALDB_MARKER = "realdb: needs real PostgreSQL/PgBouncer processes (tests/realdb harness)"
_skip_reasons: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    # The project's pyproject also declares the marker; registering it twice would show a
    # duplicate line in `pytest --markers`, so only add it when nobody else did.
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    if "realdb" not in declared:
        config.addinivalue_line("markers", REALDB_MARKER)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Skip reasons are hidden by default (-rs is off), so say once why the tier did not run.
    for reason in sorted(_skip_reasons):
        terminalreporter.write_line(f"realdb tier skipped: {reason}", yellow=True)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require(*, pgbouncer: bool) -> None:
    reason = missing_requirements(pgbouncer=pgbouncer)
    if reason is None:
        return
    if _ci():
        pytest.fail(f"realdb tier cannot run in CI: {reason}", pytrace=False)
    _skip_reasons.add(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster (max_connections=40) shared by the session."""
    _require(pgbouncer=False)
    with PostgresCluster(max_connections=40) as cluster:
        yield cluster


def _bouncer(cluster: PostgresCluster, pool_mode: str) -> Iterator[PgBouncer]:
    _require(pgbouncer=True)
    with PgBouncer(cluster, pool_mode=pool_mode) as bouncer:  # type: ignore[arg-type]
        yield bouncer


@pytest.fixture(scope="session")
def pgbouncer_transaction(postgres: PostgresCluster) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode (default_pool_size=10) in front of `postgres`."""
    yield from _bouncer(postgres, "transaction")


@pytest.fixture(scope="session")
def pgbouncer_session(postgres: PostgresCluster) -> Iterator[PgBouncer]:
    """PgBouncer in session pooling mode (default_pool_size=10) in front of `postgres`."""
    yield from _bouncer(postgres, "session")


@pytest.fixture(scope="session")
def realdb_binaries() -> None:
    """Skip/fail like the fixtures above, for tests that build their own private servers."""
    _require(pgbouncer=True)
