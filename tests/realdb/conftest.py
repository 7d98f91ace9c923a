"""pytest plugin part of the realdb tier: real PostgreSQL / PgBouncer session fixtures.

Missing binaries skip the tier locally (the reason is printed in the terminal summary) but
fail it when ``CI`` is set: in CI a silently skipped tier would look green while testing
nothing.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Why: with `--import-mode=importlib` pytest does not put this directory on sys.path, and
# there is deliberately no __init__.py here; make `import harness` work in every mode. (tests/,
# for `import rendering` and `import tools`, is on it through pyproject's pytest pythonpath.)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PgBouncer, PostgresCluster, missing_requirements
from services import RenderedProject, ServiceProcess, render
from tools import in_ci

REALDB_MARKER = "realdb: needs real PostgreSQL/PgBouncer processes (tests/realdb harness)"
_skip_reasons: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    # The project's pyproject also declares the marker; registering it twice would show a
    # duplicate line in `pytest --markers`, so only add it when nobody else did.
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    if "realdb" not in declared:
        config.addinivalue_line("markers", REALDB_MARKER)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make ``--dist loadgroup`` group again under pytest 9 (pytest-xdist 3.8.0 compat shim).

    xdist groups tests by suffixing ``@<group>`` to each marked item's ``_nodeid``; pytest 9
    derives ``nodeid`` from ``_id`` instead, so that edit is silently lost and every
    ``xdist_group`` test is scheduled like a plain ``load`` test (the realdb tests ended up
    spread over both workers, each starting its own cluster, load tests overlapping). Apply
    the same suffix through ``_id`` when xdist's did not take; a no-op once xdist's works.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9: xdist's own suffix works
        return
    for item in items:
        groups = sorted(
            {
                str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                for mark in item.iter_markers("xdist_group")
            }
        )
        if groups and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Skip reasons are hidden by default (-rs is off), so say once why the tier did not run.
    for reason in sorted(_skip_reasons):
        terminalreporter.write_line(f"realdb tier skipped: {reason}", yellow=True)


def _require(*, pgbouncer: bool) -> None:
    reason = missing_requirements(pgbouncer=pgbouncer)
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"realdb tier cannot run in CI: {reason}", pytrace=False)
    _skip_reasons.add(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster (max_connections=60) shared by the session."""
    _require(pgbouncer=False)
    with PostgresCluster(max_connections=60) as cluster:
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


# --------------------------------------------------------------------------- rendered services

# Every rendered project is sized for the throwaway cluster above: max_connections 60 with
# PostgreSQL's default 3 superuser slots, and one replica with no surge. The rendered budget also
# counts a rollout's terminating pod; RenderedProject.budget() gives the budget of exactly the
# processes a test starts (one pod, no rollout).
DATABASE_ANSWERS = {"db_max_connections": 60, "db_reserved_connections": 3}
K8S_ANSWERS = {"replicas_max": 1, "max_surge": 0}

PROJECTS: dict[str, dict[str, Any]] = {
    # k8s-sync rendered with 2 workers per pod (fork-safety and multi-worker budget).
    "sync": {"target": "k8s-sync", "workers_per_pod": 2, **K8S_ANSWERS},
    "async": {"target": "k8s-async", **K8S_ANSWERS},
    # k8s-async with 2 workers per pod (pool metrics summed over workers); 5 + 5 per worker
    # fits the rendered budget with a rollout's terminating pod: 2 pods x 2 x 10 + 1 <= 57.
    "async-2w": {
        "target": "k8s-async",
        "workers_per_pod": 2,
        "pool_size": 5,
        "max_overflow": 5,
        **K8S_ANSWERS,
    },
    "async-tx": {
        "target": "k8s-async",
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "transaction",
        "pgbouncer_default_pool_size": 10,
        **K8S_ANSWERS,
    },
    "async-session": {
        "target": "k8s-async",
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "session",
        "pgbouncer_default_pool_size": 10,
        **K8S_ANSWERS,
    },
    "asyncpg-session": {
        "target": "k8s-async",
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "session",
        "driver": "asyncpg",
        "pgbouncer_default_pool_size": 10,
        **K8S_ANSWERS,
    },
    "sync-tx": {
        "target": "k8s-sync",
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "transaction",
        "pgbouncer_default_pool_size": 10,
        **K8S_ANSWERS,
    },
    "lambda": {"target": "lambda", "lambda_reserved_concurrency": 10},
    # Fewer server connections than execution environments, so PgBouncer has to queue.
    "lambda-tx": {
        "target": "lambda",
        "lambda_reserved_concurrency": 10,
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "transaction",
        "pgbouncer_default_pool_size": 5,
    },
    "batch": {"target": "batch", "batch_processes": 2, "batch_parallelism": 1},
}


@pytest.fixture(scope="session")
def realdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("realdb")


@pytest.fixture(scope="session")
def project(realdb_dir: Path) -> Callable[[str], RenderedProject]:
    """Render (once per session) the project named in PROJECTS; project_name rdb-<name>."""
    cache: dict[str, RenderedProject] = {}

    def get(name: str) -> RenderedProject:
        if name not in cache:
            answers = {"project_name": f"rdb-{name}", **DATABASE_ANSWERS, **PROJECTS[name]}
            cache[name] = render(realdb_dir / "projects" / name, answers)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def database(
    postgres: PostgresCluster, project: Callable[[str], RenderedProject]
) -> PostgresCluster:
    """The cluster with the generated schema (the project's migrations, or its models)."""
    how = project("sync").create_schema(postgres.dsn())
    print(f"realdb schema created with {how}")
    return postgres


@pytest.fixture
def quiet_database(database: PostgresCluster) -> Iterator[PostgresCluster]:
    """Start each test with no connections of the application role left over.

    Idle server connections that a session-scoped PgBouncer keeps (up to its default_pool_size,
    for 10 minutes) would otherwise eat into max_connections=60 and into counts by role.
    PgBouncer drops a terminated idle server connection and dials a new one when needed.
    """

    def settle() -> None:
        database.psql(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE usename = %s AND backend_type = 'client backend'",
            (database.app_user,),
        )

    settle()
    yield database
    settle()


_names = itertools.count(1)


@pytest.fixture
def app_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A fresh application_name per service run, so counts never mix two runs."""

    def make(prefix: str) -> str:
        return f"{prefix}-{next(_names)}"[:63]

    return make


@pytest.fixture
def services(realdb_dir: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start services through their real entry point; all are stopped at teardown."""
    started: list[ServiceProcess] = []
    log_dir = realdb_dir / "logs"
    log_dir.mkdir(exist_ok=True)

    def start(
        project: RenderedProject, database_url: str, application_name: str, **env: Any
    ) -> ServiceProcess:
        service = ServiceProcess(project, database_url, application_name, log_dir, **env)
        started.append(service)
        service.start()
        service.wait_ready()
        return service

    yield start
    for service in started:
        service.kill()


@pytest.fixture
def bouncer(database: PostgresCluster) -> Iterator[Callable[[RenderedProject], PgBouncer]]:
    """A PgBouncer configured with the numbers the rendered project's budget uses."""
    _require(pgbouncer=True)
    started: list[PgBouncer] = []

    def start(project: RenderedProject, *, max_client_conn: int | None = None) -> PgBouncer:
        numbers = project.budget()
        # The pool numbers of the project's own deploy/pgbouncer/pgbouncer.ini (the budget's
        # numbers when a project renders none); listen address, auth and logging stay the
        # harness's, so it runs unprivileged on 127.0.0.1.
        ini = project.pgbouncer_ini() or {}
        mode = ini.get("pool_mode", project.answers["pgbouncer_pool_mode"])
        default_pool_size = int(
            ini.get("default_pool_size", numbers["pgbouncer_default_pool_size"])
        )
        assert default_pool_size == numbers["pgbouncer_default_pool_size"], (ini, numbers)
        rendered_clients = int(ini.get("max_client_conn", numbers["pgbouncer_max_client_conn"]))
        assert rendered_clients == numbers["pgbouncer_max_client_conn"], (ini, numbers)
        if max_client_conn is None:
            # Rendered as exactly the app side's worst case; +1 leaves room for the harness's
            # own readiness probe, so a service that opened more would be refused.
            max_client_conn = rendered_clients + 1
        started.append(
            PgBouncer(
                database,
                pool_mode=mode,  # type: ignore[arg-type]
                default_pool_size=default_pool_size,
                max_client_conn=max_client_conn,
                max_db_connections=int(ini.get("max_db_connections", 0)),
                settings={"reserve_pool_size": ini.get("reserve_pool_size", "0")},
            ).start()
        )
        return started[-1]

    yield start
    for bouncer in started:
        bouncer.stop()
