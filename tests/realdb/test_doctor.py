"""`poolwise doctor` against a running fleet: it reports exactly what differs from the declaration.

One private PostgreSQL (max_connections 60, 3 reserved, as the services were rendered for) holds
cluster orders-db with three generated services running under load through their real entry
points: orders-api (k8s-sync, direct), billing-api (k8s-async behind a real PgBouncer in
transaction mode) and invoice-lambda (three Lambda execution environments, NullPool).

Each service connects as its own role, the one its database_limits.toml declares (`role`, its
package name), and those roles are capped by running what `poolwise fleet --sql` prints: the
role checks are then the real guardrail, not a shared `app` role that three ALTER ROLE lines
would overwrite. The roles are members of `app`, which owns the tables the migration created.
The doctor logs in as `poolwise_doctor` with pg_monitor, and into PgBouncer's admin console as
one of its stats_users, exactly as the README tells a platform team to set it up.

Then two processes no declaration knows about: a report with its own application_name, and a
script that opens more connections under invoice-lambda's name than that service declares
(as `app`: under the service's own capped role PostgreSQL would refuse them, which is what the
guardrail is for). The doctor must name exactly those two, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import (
    ADMIN_APP_NAME,
    BOUNCER_PROBE_APP_NAME,
    PgBouncer,
    PostgresCluster,
    find_pg_bin,
    free_port,
)
from loadgen import BackgroundLoad, items_mix
from psycopg import sql
from rendering import clean_env
from services import (
    REPO_ROOT,
    LambdaEnvironment,
    RenderedProject,
    ServiceProcess,
    render,
    seed_items,
)

from poolwise import fleet
from poolwise import services as fleet_services

pytestmark = [pytest.mark.realdb, pytest.mark.xdist_group("realdb")]

CLUSTER = "orders-db"
MAX_CONNECTIONS = 60
RESERVED = 3  # PostgreSQL's default superuser_reserved_connections
K8S = {"replicas_max": 1, "max_surge": 0}
LAMBDA_ENVIRONMENTS = 3
SERVICES: dict[str, dict[str, Any]] = {
    "orders-api": {"target": "k8s-sync", **K8S},
    "billing-api": {
        "target": "k8s-async",
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "transaction",
        "pgbouncer_default_pool_size": 5,
        **K8S,
    },
    "invoice-lambda": {"target": "lambda", "lambda_reserved_concurrency": LAMBDA_ENVIRONMENTS},
}
DOCTOR_ROLE, DOCTOR_PASSWORD = "poolwise_doctor", "doctor-secret"
DOCTOR_APP_NAME = "poolwise-doctor"
ROGUE = "rogue-report"
OVER_BUDGET = "invoice-lambda"
# Load is bounded three ways: per-burst seconds, a request count, and a per-request timeout.
LOAD_SECONDS = 20.0
LOAD_CLIENTS = 16
LOAD_MAX_REQUESTS = 20_000
LAMBDA_MAX_INVOCATIONS = 2_000
OUTPUT_FILE = Path("/tmp/doctor-scenario.txt")

EXPECTED_CHECKS = {
    ("server_settings", CLUSTER),
    ("service_connections", "orders-api"),
    ("service_connections", "billing-api"),
    ("service_connections", "invoice-lambda"),
    ("idle_in_transaction", CLUSTER),
    ("role_connection_limit", "orders_api"),
    ("role_connection_limit", "billing_api"),
    ("role_connection_limit", "invoice_lambda"),
    ("pgbouncer_pool_mode", "billing-api"),
    ("pgbouncer_driver", "billing-api"),
    ("pgbouncer_pool_size", "billing-api"),
    ("pgbouncer_waiting_clients", "billing-api"),
}


def poolwise(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command, as a platform job runs it (from this checkout, not installed)."""
    return subprocess.run(
        [sys.executable, "-m", "poolwise", *args],
        cwd=REPO_ROOT,
        env=clean_env(without_pg=True, PYTHONPATH=str(REPO_ROOT / "src")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@dataclass
class Fleet:
    """Everything the scenario runs; the doctor sees what is open at the moment it reads."""

    postgres: PostgresCluster
    bouncer: PgBouncer
    projects: dict[str, RenderedProject]
    declared: dict[str, fleet_services.Service]
    http_services: dict[str, ServiceProcess]
    lambdas: list[LambdaEnvironment]
    observer: psycopg.Connection[Any]
    item_ids: list[int]
    fleet_text: str = ""
    fleet_sql: str = ""

    @property
    def paths(self) -> list[str]:
        return [str(project.root) for project in self.projects.values()]

    def doctor(self, *extra: str) -> subprocess.CompletedProcess[str]:
        postgres = self.postgres.dsn("postgres", DOCTOR_ROLE, password=DOCTOR_PASSWORD, driver="")
        admin = (
            f"postgresql://{DOCTOR_ROLE}:{DOCTOR_PASSWORD}@{self.bouncer.host}:{self.bouncer.port}"
            "/pgbouncer"
        )
        return poolwise("doctor", "--dsn", postgres, "--pgbouncer-dsn", admin, *extra, *self.paths)

    def client_backends(self) -> list[tuple[str, str]]:
        """(application_name, role) of every client backend but the observer's own."""
        rows = self.observer.execute(
            "SELECT application_name, usename FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()
        return [(str(name), str(role)) for name, role in rows]

    def wait_for(
        self, predicate: Callable[[list[tuple[str, str]]], bool], what: str, timeout: float = 20.0
    ) -> None:
        """Bounded wait until the client backends satisfy ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            backends = self.client_backends()
            if predicate(backends):
                return
            time.sleep(0.1)
        raise AssertionError(f"{what} did not happen in {timeout} s: {backends}")


def _answers(name: str, other_consumers: int) -> dict[str, Any]:
    return {
        "project_name": name,
        "db_cluster": CLUSTER,
        "db_max_connections": MAX_CONNECTIONS,
        "db_reserved_connections": RESERVED,
        "other_consumers": other_consumers,
        **SERVICES[name],
    }


def render_fleet(base: Path) -> dict[str, RenderedProject]:
    """Render the three services, each told what the other two can hold (its other_consumers).

    A first rendering with other_consumers 0 gives every service's worst case; the fleet's
    sum is what each one's own budget test must leave room for, as `poolwise fleet` advises.
    """
    drafts = [render(base / "draft" / name, _answers(name, 0)) for name in SERVICES]
    [cluster] = fleet.clusters([fleet_services.load(draft.root) for draft in drafts])
    others = {service.name: cluster.total - service.total for service in cluster.services}
    return {name: render(base / name, _answers(name, others[name])) for name in SERVICES}


def _create_roles(postgres: PostgresCluster, declared: dict[str, Any]) -> None:
    # As the README tells a platform team: a login with pg_monitor and nothing else.
    postgres.psql(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(DOCTOR_ROLE), sql.Literal(DOCTOR_PASSWORD)
        )
    )
    postgres.psql(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(DOCTOR_ROLE)))
    for service in declared.values():
        # Same password as the harness's app role, so its URL helpers work for every role.
        postgres.psql(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(service.role),
                sql.Literal(postgres.app_password),
                sql.Identifier(postgres.app_user),
            )
        )


def _bouncer(postgres: PostgresCluster, project: RenderedProject, role: str) -> PgBouncer:
    """PgBouncer (not started) with the pool numbers of the project's own pgbouncer.ini."""
    ini = project.pgbouncer_ini()
    assert ini is not None, "billing-api renders deploy/pgbouncer/pgbouncer.ini"
    return PgBouncer(
        postgres,
        pool_mode=ini["pool_mode"],  # type: ignore[arg-type]
        default_pool_size=int(ini["default_pool_size"]),
        max_client_conn=int(ini["max_client_conn"]) + 1,  # +1: the harness's readiness probe
        max_db_connections=int(ini["max_db_connections"]),
        settings={"reserve_pool_size": ini["reserve_pool_size"], "stats_users": DOCTOR_ROLE},
        users=(role, DOCTOR_ROLE),
    )


@pytest.fixture(scope="module")
def scenario(realdb_binaries: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("doctor")
    projects = render_fleet(base)
    declared = {name: fleet_services.load(project.root) for name, project in projects.items()}
    fleet_text = poolwise("fleet", *(str(p.root) for p in projects.values()))
    assert fleet_text.returncode == 0, fleet_text.stdout + fleet_text.stderr
    fleet_sql = poolwise("fleet", "--sql", *(str(p.root) for p in projects.values()))
    assert fleet_sql.returncode == 0, fleet_sql.stderr

    log_dir = base / "logs"
    log_dir.mkdir()
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(PostgresCluster(max_connections=MAX_CONNECTIONS))
        _create_roles(postgres, declared)
        # The guardrail exactly as printed: each existing role altered to its worst case.
        with postgres.connect(dbname="postgres") as superuser:
            superuser.execute(fleet_sql.stdout)  # type: ignore[call-overload]
        projects["orders-api"].create_schema(postgres.dsn())
        bouncer = stack.enter_context(
            _bouncer(postgres, projects["billing-api"], declared["billing-api"].role)
        )
        # The harness's readiness probe left a server connection named after itself in
        # PgBouncer's pool for `app`; it is test plumbing, not part of any fleet.
        postgres.terminate_backends(BOUNCER_PROBE_APP_NAME)

        def url(name: str, via: PostgresCluster | PgBouncer) -> str:
            return via.dsn(driver="", user=declared[name].role)

        http_services = {}
        for name, via in (("orders-api", postgres), ("billing-api", bouncer)):
            # APPLICATION_NAME is the service's name, as the generated settings default to.
            process = ServiceProcess(projects[name], url(name, via), name, log_dir)
            stack.callback(process.kill)
            http_services[name] = process.start()
            process.wait_ready()
        lambdas = []
        for _ in range(LAMBDA_ENVIRONMENTS):
            environment = LambdaEnvironment(
                projects["invoice-lambda"], url("invoice-lambda", postgres), "invoice-lambda"
            )
            stack.callback(environment.close)
            lambdas.append(environment)
        for environment in lambdas:
            environment.wait_ready()
        observer = stack.enter_context(
            psycopg.connect(
                postgres.dsn("postgres", DOCTOR_ROLE, password=DOCTOR_PASSWORD, driver=""),
                application_name=DOCTOR_APP_NAME,
                autocommit=True,
            )
        )
        running = Fleet(
            postgres=postgres,
            bouncer=bouncer,
            projects=projects,
            declared=declared,
            http_services=http_services,
            lambdas=lambdas,
            observer=observer,
            item_ids=seed_items(http_services["orders-api"], 20, "doctor"),
            fleet_text=fleet_text.stdout,
            fleet_sql=fleet_sql.stdout,
        )
        # The harness's own superuser sessions of the setup are gone before any doctor runs.
        running.wait_for(
            lambda backends: all(name != ADMIN_APP_NAME for name, _ in backends),
            "the harness's setup sessions ending",
        )
        yield running


@contextlib.contextmanager
def under_load(running: Fleet) -> Iterator[None]:
    """HTTP load on both APIs and invocations in every Lambda environment, until the block ends."""
    loads = [
        BackgroundLoad(
            service.port,
            items_mix(running.item_ids),
            clients=LOAD_CLIENTS,
            duration=LOAD_SECONDS,
            max_requests=LOAD_MAX_REQUESTS,
            timeout=30,
        ).start()
        for service in running.http_services.values()
    ]
    stop = threading.Event()
    deadline = time.monotonic() + LOAD_SECONDS
    failures: list[Any] = []

    def invoke(number: int, environment: LambdaEnvironment) -> None:
        for sequence in range(LAMBDA_MAX_INVOCATIONS // LAMBDA_ENVIRONMENTS):
            if stop.is_set() or time.monotonic() > deadline:
                return
            item_id = running.item_ids[sequence % len(running.item_ids)]
            try:
                if sequence % 3 == 0:
                    name = f"lambda-{number}-{sequence}"
                    response = environment.request("POST", "/items", {"name": name})
                else:
                    response = environment.request("GET", f"/items/{item_id}")
            except (OSError, RuntimeError, TimeoutError, ValueError) as error:
                failures.append(repr(error))
                return
            if response.get("statusCode") not in (200, 201):
                failures.append(response)

    threads = [
        threading.Thread(target=invoke, args=item, daemon=True)
        for item in enumerate(running.lambdas)
    ]
    for thread in threads:
        thread.start()
    try:
        # The pools have filled: both APIs hold connections (billing-api's through PgBouncer).
        running.wait_for(
            lambda backends: {"orders-api", "billing-api"} <= {name for name, _ in backends},
            "the APIs connecting under load",
        )
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        results = [load.stop(timeout=60) for load in loads]
    assert not any(thread.is_alive() for thread in threads)
    assert failures == [], failures[:3]
    for name, result in zip(running.http_services, results, strict=True):
        print(f"{name} load: {result.summary()}")
        # Saturation may shed load as 503; nothing else may fail, and most requests succeed.
        assert [r for r in result.failed() if r.status != 503] == [], result.summary()
        assert len(result.ok()) > 0.9 * len(result.records) > 0, result.summary()


def by_check(verdicts: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(verdict["kind"], verdict["subject"]): verdict for verdict in verdicts}


def findings(verdicts: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(verdict["kind"], verdict["subject"]) for verdict in verdicts if verdict["finding"]}


def assert_services_seen(checks: dict[tuple[str, str], dict[str, Any]], running: Fleet) -> None:
    """The doctor counted the APIs' real connections, each under the service's own role."""
    orders = checks[("service_connections", "orders-api")]["data"]
    assert orders["connections"] >= 1 and orders["roles"] == {"orders_api": orders["connections"]}
    # PgBouncer passes the client's application_name on to the server connections it links:
    # billing-api's server side is counted by name, none of it attributed by role alone.
    billing = checks[("service_connections", "billing-api")]["data"]
    pool = running.declared["billing-api"].worst.topology.pgbouncer_default_pool_size
    assert 1 <= billing["connections"] <= pool, billing
    assert billing["roles"] == {"billing_api": billing["connections"]}, billing
    assert billing["unnamed_server_side"] == 0, billing


def test_fleet_fits_and_the_guardrail_is_applied(scenario: Fleet) -> None:
    print(f"\n$ poolwise fleet ...\n{scenario.fleet_text}\n$ poolwise fleet --sql ...")
    print(scenario.fleet_sql)
    totals = {name: service.total for name, service in scenario.declared.items()}
    assert f"cluster {CLUSTER}: {sum(totals.values())} of {MAX_CONNECTIONS - RESERVED}" in (
        scenario.fleet_text
    )
    # Every service was rendered with the other_consumers the fleet told it: no advice left.
    assert "note:" not in scenario.fleet_text
    limits = dict(
        scenario.observer.execute(
            "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname = ANY(%s)",
            ([service.role for service in scenario.declared.values()],),
        ).fetchall()
    )
    assert limits == {service.role: service.total for service in scenario.declared.values()}


def test_a_fleet_as_declared_is_healthy(scenario: Fleet) -> None:
    with under_load(scenario):
        as_json = scenario.doctor("--json")
        as_text = scenario.doctor()
    print(f"\n$ poolwise doctor ... (healthy)\n{as_text.stdout}{as_text.stderr}")
    assert as_json.returncode == 0, as_json.stdout + as_json.stderr
    verdicts = json.loads(as_json.stdout)
    assert findings(verdicts) == set()
    checks = by_check(verdicts)
    assert set(checks) == EXPECTED_CHECKS
    assert_services_seen(checks, scenario)
    assert as_text.returncode == 0, as_text.stdout + as_text.stderr
    lines = as_text.stdout.splitlines()
    assert lines[-1] == "healthy: no findings"
    assert len([line for line in lines if line.startswith("ok ")]) == len(EXPECTED_CHECKS)


def test_doctor_reports_exactly_the_undeclared_process_and_the_one_over_budget(
    scenario: Fleet,
) -> None:
    declared_lambda = scenario.declared[OVER_BUDGET].total
    excess = declared_lambda + 1  # over its worst case even with no invocation running
    app_url = scenario.postgres.dsn(driver="")
    with contextlib.ExitStack() as undeclared:
        rogue = undeclared.enter_context(psycopg.connect(app_url, application_name=ROGUE))
        rogue.execute("SELECT count(*) FROM items")
        rogue.commit()
        for _ in range(excess):
            script = undeclared.enter_context(
                psycopg.connect(app_url, application_name=OVER_BUDGET, autocommit=True)
            )
            script.execute("SELECT 1")
        with under_load(scenario):
            as_json = scenario.doctor("--json")
            as_text = scenario.doctor()
    # Gone again, so any test after this one starts from the declared fleet.
    scenario.wait_for(
        lambda backends: not {(ROGUE, "app"), (OVER_BUDGET, "app")} & set(backends),
        "the undeclared connections closing",
    )

    report = f"$ poolwise fleet ...\n{scenario.fleet_text}\n$ poolwise doctor ...\n{as_text.stdout}"
    print(f"\n{report}{as_text.stderr}")
    OUTPUT_FILE.write_text(report)

    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    verdicts = json.loads(as_json.stdout)
    assert findings(verdicts) == {
        ("application_name_unknown", ROGUE),
        ("service_connections", OVER_BUDGET),
    }
    checks = by_check(verdicts)
    assert set(checks) == EXPECTED_CHECKS | {("application_name_unknown", ROGUE)}
    rogue_seen = checks[("application_name_unknown", ROGUE)]["data"]
    assert rogue_seen["connections"] == 1 and rogue_seen["roles"] == {"app": 1}, rogue_seen
    over = checks[("service_connections", OVER_BUDGET)]["data"]
    assert over["declared"] == declared_lambda
    assert over["roles"]["app"] == excess and over["connections"] > declared_lambda, over
    assert_services_seen(checks, scenario)

    assert as_text.returncode == 1, as_text.stderr
    lines = as_text.stdout.splitlines()
    flagged = [line for line in lines if line.startswith("FINDING")]
    assert len(flagged) == 2 and lines[-1] == "2 findings", as_text.stdout
    assert any(f"application_name {ROGUE!r}: 1 connection (" in line for line in flagged)
    assert any(
        line.startswith(f"FINDING  {OVER_BUDGET}: ") and f"> {declared_lambda} declared" in line
        for line in flagged
    )


def test_an_unreachable_or_unprivileged_dsn_is_one_line_and_exit_2(scenario: Fleet) -> None:
    closed = free_port()  # nothing listens there
    password = "never-printed"
    result = poolwise(
        "doctor",
        "--dsn",
        f"postgresql://{DOCTOR_ROLE}:{password}@127.0.0.1:{closed}/postgres",
        *scenario.paths,
    )
    print(result.stderr)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"poolwise doctor: cannot connect to PostgreSQL {DOCTOR_ROLE}@127.0.0.1:{closed}/postgres:"
    )
    assert password not in line and "Traceback" not in result.stderr

    # The server answers, its PgBouncer does not: the line names PgBouncer's DSN.
    result = poolwise(
        "doctor",
        "--dsn",
        scenario.postgres.dsn("postgres", DOCTOR_ROLE, password=DOCTOR_PASSWORD, driver=""),
        "--pgbouncer-dsn",
        f"postgresql://{DOCTOR_ROLE}:{password}@127.0.0.1:{closed}/pgbouncer",
        *scenario.paths,
    )
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"poolwise doctor: cannot connect to PgBouncer {DOCTOR_ROLE}@127.0.0.1:{closed}/pgbouncer:"
    )
    assert password not in line

    # A login without pg_monitor would see other roles' sessions without their state.
    result = poolwise(
        "doctor", "--dsn", scenario.postgres.dsn("postgres", driver=""), *scenario.paths
    )
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.endswith("the role cannot read other sessions' state; GRANT pg_monitor TO app")


# ----------------------------------------------------------------------------- the guardrail SQL

# Names a service repository could hold, each trying to end the comment, identifier, literal or
# dollar quote it is written into, or to reach a psql meta-command, and run something as the
# superuser who pipes `poolwise fleet --sql` into psql.
INJECTED = "ALTER ROLE app SUPERUSER; --"
HOSTILE_CLUSTER = f"orders-db\n{INJECTED}"
HOSTILE = [  # (service name, role)
    (f"newline\n{INJECTED}", f"r-newline\n; {INJECTED}"),
    (f"carriage-return\r{INJECTED}", f'r-quote"; {INJECTED}'),
    ("comment */ ALTER ROLE app SUPERUSER; /*", f"r-literal'); {INJECTED}"),
    (f"quotes ' \" ; {INJECTED}", "r-backslash\\'; \\gexec \\! touch pwned"),
    ("backslash \\ \\! touch pwned", f"r-dollar $poolwise$; {INJECTED} $poolwise$"),
    (f"line-separator\u2028{INJECTED}", "r-separators\u2028\u0085*/;"),
    (f"next-line\u0085{INJECTED}", "found"),  # PL/pgSQL's own variable in every DO block
    (f"nul\x00{INJECTED}", "r-format %I %L %s :app"),  # format() and a psql variable
]


@dataclass
class Guardrail:
    """A private PostgreSQL, and two rendered services that no role has been made for yet."""

    postgres: PostgresCluster
    projects: dict[str, RenderedProject]
    declared: dict[str, fleet_services.Service]
    observer: psycopg.Connection[Any]

    def settle(self) -> None:
        """Bounded wait until no session but the observer's is open (the setup's have ended)."""
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            others = self.observer.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
            if others is not None and others[0] == 0:
                return
            time.sleep(0.1)
        raise AssertionError("sessions of the setup still open after 20 s")

    def roles(self) -> dict[str, tuple[bool, bool, int]]:
        """Every role but the built-in pg_* ones: (rolsuper, rolcanlogin, rolconnlimit)."""
        rows = self.observer.execute(
            "SELECT rolname, rolsuper, rolcanlogin, rolconnlimit FROM pg_roles"
            " WHERE rolname !~ '^pg_'"
        ).fetchall()
        return {name: (superuser, login, limit) for name, superuser, login, limit in rows}

    def doctor(self, *extra: str) -> subprocess.CompletedProcess[str]:
        dsn = self.postgres.dsn("postgres", DOCTOR_ROLE, password=DOCTOR_PASSWORD, driver="")
        paths = [str(project.root) for project in self.projects.values()]
        return poolwise("doctor", "--dsn", dsn, *extra, *paths)


@pytest.fixture(scope="module")
def guardrail(
    realdb_binaries: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guardrail]:
    base = tmp_path_factory.mktemp("guardrail")
    projects = {
        name: render(base / name, _answers(name, 0)) for name in ("orders-api", "billing-api")
    }
    declared = {name: fleet_services.load(project.root) for name, project in projects.items()}
    with PostgresCluster(max_connections=MAX_CONNECTIONS) as postgres:
        postgres.psql(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(DOCTOR_ROLE), sql.Literal(DOCTOR_PASSWORD)
            )
        )
        postgres.psql(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(DOCTOR_ROLE)))
        with psycopg.connect(
            postgres.dsn("postgres", DOCTOR_ROLE, password=DOCTOR_PASSWORD, driver=""),
            application_name=DOCTOR_APP_NAME,
            autocommit=True,
        ) as observer:
            yield Guardrail(postgres, projects, declared, observer)


def hostile_copy(project: RenderedProject, destination: Path, name: str, role: str) -> Path:
    """The project with a hostile service name, cluster and role in its files (TOML escapes)."""
    shutil.copytree(project.root, destination, symlinks=True)
    [db] = destination.glob("src/*/db")
    for file, values in (
        (db / "topology.toml", {"name": name}),
        (db / "database_limits.toml", {"cluster": HOSTILE_CLUSTER, "role": role}),
    ):
        text = file.read_text()
        for key, value in values.items():
            # json.dumps of a string without astral characters is a TOML basic string.
            text, count = re.subn(
                rf"(?m)^{key} = .*$",
                lambda _, v=value, k=key: f"{k} = {json.dumps(v)}",
                text,
                count=1,
            )
            assert count == 1, (file, key)
        file.write_text(text)
    return destination


def run_psql(postgres: PostgresCluster, script: Path) -> subprocess.CompletedProcess[str]:
    """psql as the README runs it: the superuser, stop at the first error, no ~/.psqlrc."""
    bin_dir = find_pg_bin()
    assert bin_dir is not None
    return subprocess.run(
        [
            str(bin_dir / "psql"),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            postgres.dsn("postgres", postgres.superuser, driver=""),
            "-f",
            str(script),
        ],
        cwd=script.parent,  # where `\! touch pwned` would leave its file
        env=clean_env(without_pg=True),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hostile_names_in_service_files_cannot_run_sql_through_psql(
    guardrail: Guardrail, tmp_path: Path
) -> None:
    template = guardrail.projects["orders-api"]
    copies = [
        hostile_copy(template, tmp_path / f"service-{index}", name, role)
        for index, (name, role) in enumerate(HOSTILE)
    ]
    # One hostile role exists already (NOLOGIN, another limit): its branch is ALTER ROLE.
    existing = HOSTILE[0][1]
    guardrail.postgres.psql(
        sql.SQL("CREATE ROLE {} NOLOGIN CONNECTION LIMIT 99").format(sql.Identifier(existing))
    )
    before = guardrail.roles()
    printed = poolwise("fleet", "--sql", *map(str, copies))
    # Eight copies of orders-api are over the 57 connections: exit 1, the SQL printed all the same.
    assert printed.returncode == 1 and printed.stderr == "", printed.stderr
    script = tmp_path / "guardrail.sql"
    script.write_text(printed.stdout)
    print(f"\n$ poolwise fleet --sql ... | psql\n{printed.stdout}")

    applied = run_psql(guardrail.postgres, script)
    after = guardrail.roles()
    # Nothing became a superuser, nothing ran in a shell, no other role was touched.
    assert [role for role, (superuser, _, _) in after.items() if superuser] == [
        guardrail.postgres.superuser
    ], after
    assert not (tmp_path / "pwned").exists()
    assert applied.returncode == 0, applied.stdout + applied.stderr
    worst_case = guardrail.declared["orders-api"].total
    expected = {role: worst_case for _, role in HOSTILE}
    assert {role: after[role][2] for role in expected} == expected
    assert after[existing] == (False, False, worst_case)  # altered: still NOLOGIN
    assert all(after[role] == (False, True, worst_case) for role in expected if role != existing)
    assert set(after) == set(before) | set(expected)
    assert {role: after[role] for role in before if role not in expected} == {
        role: state for role, state in before.items() if role not in expected
    }
    # Idempotent: run again, every role exists now and is altered to the same limit.
    again = run_psql(guardrail.postgres, script)
    assert again.returncode == 0, again.stderr
    assert guardrail.roles() == after


def test_a_nul_in_a_role_is_refused_before_any_sql(guardrail: Guardrail, tmp_path: Path) -> None:
    copy = hostile_copy(guardrail.projects["orders-api"], tmp_path / "nul", "nul", "app\x00x")
    for command in (["fleet", "--sql"], ["doctor", "--dsn", "postgresql://127.0.0.1:1/x"]):
        result = poolwise(*command, str(copy))
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        [line] = result.stderr.splitlines()
        assert "database_limits.toml: [database] role 'app\\x00x'" in line, line
        assert "contains a NUL character" in line


def role_verdict(verdicts: list[dict[str, Any]], role: str) -> dict[str, Any]:
    return by_check(verdicts)[("role_connection_limit", role)]


def test_doctor_fixes_a_missing_role_with_create_role_and_lists_what_it_skipped(
    guardrail: Guardrail,
) -> None:
    orders, billing = guardrail.declared["orders-api"], guardrail.declared["billing-api"]
    # billing_api exists with another limit; orders_api does not exist at all.
    guardrail.postgres.psql(
        sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1").format(sql.Identifier(billing.role))
    )
    guardrail.settle()
    first = guardrail.doctor("--json")
    assert first.returncode == 1, first.stdout + first.stderr
    verdicts = json.loads(first.stdout)
    assert findings(verdicts) == {
        ("role_connection_limit", orders.role),
        ("role_connection_limit", billing.role),
    }
    create = role_verdict(verdicts, orders.role)["data"]["fix_sql"]
    alter = role_verdict(verdicts, billing.role)["data"]["fix_sql"]
    assert create == f'CREATE ROLE "{orders.role}" LOGIN CONNECTION LIMIT {orders.total};'
    assert alter == f'ALTER ROLE "{billing.role}" CONNECTION LIMIT {billing.total};'
    # No --pgbouncer-dsn: billing-api's PgBouncer checks are listed as skipped, not passed.
    [skip] = [verdict for verdict in verdicts if verdict["skipped"]]
    assert (skip["kind"], skip["subject"], skip["finding"]) == (
        "pgbouncer_checks",
        "billing-api",
        False,
    )
    assert skip["data"]["reason"] == "no --pgbouncer-dsn"

    # The suggested statements, as a superuser runs them: both succeed and fix both roles.
    for statement in (create, alter):
        guardrail.postgres.psql(statement)
    guardrail.settle()
    second = guardrail.doctor()
    print(f"\n$ poolwise doctor ...\n{first.stdout}\n$ poolwise doctor ...\n{second.stdout}")
    assert second.returncode == 0, second.stdout + second.stderr
    lines = second.stdout.splitlines()
    assert f"ok       role {orders.role}: CONNECTION LIMIT {orders.total} = {orders.total}" in (
        "\n".join(lines)
    )
    assert any(
        line.startswith("skipped  billing-api PgBouncer checks (pgbouncer_pool_mode,")
        and "no --pgbouncer-dsn" in line
        for line in lines
    ), second.stdout
    assert lines[-1] == "healthy: no findings (1 skipped: see the skipped lines)"
