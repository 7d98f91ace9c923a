"""The database enforces each service's allocation: a role's CONNECTION LIMIT from the guardrail.

Two services share one private PostgreSQL, each given its allocation by one platform mapping
(db_allocations) and each connecting as its own role, capped by running exactly what
`poolwise fleet --sql` prints. orders-api is then run past its allocation, as a hand-made
`kubectl scale` beyond its HorizontalPodAutoscaler would: three pods where one is declared.
While every query on items is held behind a lock, its pods open connections until PostgreSQL
refuses the role the next one: the role never holds more than its allocation, the refused
requests fail with the role named in the service's log, and search-api, with its own share,
keeps answering with database round trips. `poolwise doctor` sees the role at its allocation.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ADMIN_APP_NAME, PostgresCluster
from loadgen import request
from psycopg import sql
from rendering import clean_env
from services import (
    REPO_ROOT,
    RenderedProject,
    ServiceProcess,
    held_requests,
    items_locked,
    render,
    seed_items,
    wait_until,
)

pytestmark = [pytest.mark.realdb, pytest.mark.xdist_group("realdb")]

CLUSTER = "orders-db"
MAX_CONNECTIONS = 40
RESERVED = 3  # PostgreSQL's default superuser_reserved_connections
ALLOCATIONS = {"orders-api": 12, "search-api": 12}
# One pod of one worker, no surge: (1 + 0 + 1 terminating) x (2 + 3) + 1 migration = 11 <= 12.
SERVICE = {
    "target": "k8s-sync",
    "replicas_max": 1,
    "max_surge": 0,
    "workers_per_pod": 1,
    "pool_size": 2,
    "max_overflow": 3,
}
PODS_RUN = 3  # orders-api scaled by hand past its declared replicas_max of 1
PER_POD = SERVICE["pool_size"] + SERVICE["max_overflow"]
DOCTOR_ROLE, DOCTOR_PASSWORD = "poolwise_doctor", "doctor-secret"


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


@pytest.fixture(scope="module")
def projects(
    realdb_binaries: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, RenderedProject]:
    base = tmp_path_factory.mktemp("allocations")
    platform = {
        "db_cluster": CLUSTER,
        "db_max_connections": MAX_CONNECTIONS,
        "db_reserved_connections": RESERVED,
        "db_allocations": ALLOCATIONS,
    }
    return {
        name: render(base / name, {"project_name": name, **platform, **SERVICE})
        for name in ALLOCATIONS
    }


@contextlib.contextmanager
def capped_cluster(projects: dict[str, RenderedProject]) -> Iterator[PostgresCluster]:
    """PostgreSQL with one login role per service, capped by the fleet's guardrail SQL."""
    paths = [str(project.root) for project in projects.values()]
    guardrail = poolwise("fleet", "--sql", *paths)
    assert guardrail.returncode == 0, guardrail.stderr
    with PostgresCluster(max_connections=MAX_CONNECTIONS) as postgres:
        for project in projects.values():
            # Same password as the harness's app role, so its URL helpers work for every role;
            # members of app, which owns the tables.
            postgres.psql(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(project.package),
                    sql.Literal(postgres.app_password),
                    sql.Identifier(postgres.app_user),
                )
            )
        postgres.psql(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE pg_monitor").format(
                sql.Identifier(DOCTOR_ROLE), sql.Literal(DOCTOR_PASSWORD)
            )
        )
        with postgres.connect(dbname="postgres") as superuser:
            superuser.execute(guardrail.stdout)  # type: ignore[call-overload]
        print(f"\n$ poolwise fleet --sql ...\n{guardrail.stdout}")
        yield postgres


def role_connections(postgres: PostgresCluster, role: str) -> int:
    return len(postgres.backends(user=role))


def test_a_roles_connection_limit_stops_a_service_past_its_allocation(
    projects: dict[str, RenderedProject], tmp_path: Path
) -> None:
    paths = [str(project.root) for project in projects.values()]
    fleet_text = poolwise("fleet", *paths)
    assert fleet_text.returncode == 0, fleet_text.stdout + fleet_text.stderr
    assert "allocations: 24 allocated to 2 services = 24 <= 37 available" in fleet_text.stdout
    transcript = [f"$ poolwise fleet ...\n{fleet_text.stdout}"]

    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(capped_cluster(projects))
        limits = dict(
            postgres.psql(
                "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname = ANY(%s)",
                ([project.package for project in projects.values()],),
            )
        )
        assert limits == {"orders_api": 12, "search_api": 12}
        projects["orders-api"].create_schema(postgres.dsn())

        def start(name: str, log_dir: Path) -> ServiceProcess:
            url = postgres.dsn(driver="", user=projects[name].package)
            process = ServiceProcess(projects[name], url, name, log_dir)
            stack.callback(process.kill)
            process.start()
            process.wait_ready()
            return process

        pods = []
        for number in range(PODS_RUN):
            log_dir = tmp_path / f"orders-api-pod-{number}"
            log_dir.mkdir()
            pods.append(start("orders-api", log_dir))
        search = start("search-api", tmp_path)
        [item] = seed_items(search, 1, "shares")
        path = f"/items/{item}"
        postgres.wait_for_connections(ADMIN_APP_NAME, 0)

        samples: list[int] = []
        with items_locked(postgres):
            # Every pod fills its pool with requests blocked on the lock: 3 x 5 = 15 wanted.
            held = [held_requests(pod, path, PER_POD, timeout=60) for pod in pods]
            # PostgreSQL admits the role's 12 and refuses the rest at connect, at once.
            assert wait_until(
                lambda: (
                    samples.append(role_connections(postgres, "orders_api"))
                    or samples[-1] == ALLOCATIONS["orders-api"]
                ),
                30,
            ), samples
            refused_at = time.monotonic()
            assert wait_until(
                lambda: sum("too many connections for role" in pod.log() for pod in pods) >= 1,
                30,
            )
            for _ in range(20):  # the role stays at its limit while the pods keep asking
                samples.append(role_connections(postgres, "orders_api"))
                time.sleep(0.05)
            # search-api, on its own share, keeps making database round trips meanwhile.
            ready = [request(search.port, "GET", "/readyz", timeout=10)[0] for _ in range(5)]
            assert ready == [200] * 5
            assert role_connections(postgres, "search_api") >= 1
            doctor = poolwise(
                "doctor",
                "--json",
                "--dsn",
                postgres.dsn("postgres", DOCTOR_ROLE, password=DOCTOR_PASSWORD, driver=""),
                *paths,
            )
            doctor_text = poolwise(
                "doctor",
                "--dsn",
                postgres.dsn("postgres", DOCTOR_ROLE, password=DOCTOR_PASSWORD, driver=""),
                *paths,
            )
        results = [load.stop(timeout=90) for load in held]
        assert time.monotonic() - refused_at < 90

        # Never a connection past the allocation, however many the pods asked for.
        assert max(samples) == ALLOCATIONS["orders-api"], samples
        records = [record for result in results for record in result.records]
        ok = [record for record in records if record.status == 200]
        failed = [record for record in records if record.status != 200]
        assert len(records) == PODS_RUN * PER_POD
        assert len(ok) == ALLOCATIONS["orders-api"], [r.status for r in records]
        assert len(failed) == PODS_RUN * PER_POD - ALLOCATIONS["orders-api"]
        # Refused past the share: 503 with Retry-After (db/outage.py), like a saturated pool.
        assert {record.status for record in failed} == {503}, [r.body[:200] for r in failed]
        refusals = [
            line
            for pod in pods
            for line in pod.log().splitlines()
            if "database refused a new connection" in line
            and 'too many connections for role "orders_api"' in line
        ]
        assert refusals, "\n".join(pod.log()[-2000:] for pod in pods)
        # The other service kept working and serves its reads once the lock is gone.
        assert request(search.port, "GET", path, timeout=10)[0] == 200

        verdicts = {(v["kind"], v["subject"]): v for v in json.loads(doctor.stdout)}
        role = verdicts[("role_allocation", "role orders_api")]
        assert role["data"]["connections"] == 12 and role["data"]["allocated"] == 12
        assert role["data"]["near"] is True and role["finding"] is False
        assert verdicts[("role_connection_limit", "orders_api")]["finding"] is False

        transcript += [
            f"rolconnlimit: {limits}",
            f"orders-api pods run: {PODS_RUN} x pool {PER_POD} = {PODS_RUN * PER_POD} wanted;"
            f" role orders_api connections sampled: max {max(samples)}",
            f"held requests: {len(ok)} answered 200, {len(failed)} failed with status"
            f" {sorted({record.status for record in failed})}",
            "orders-api logs (refused connections):",
            *sorted(set(refusals))[:4],
            f"search-api /readyz meanwhile: {ready}",
            f"$ poolwise doctor ...\n{doctor_text.stdout}",
        ]
    output = "\n".join(transcript)
    print(output)
    (tmp_path / "allocation-enforced.txt").write_text(output + "\n")  # kept with the run
