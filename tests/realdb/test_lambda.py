"""Lambda: 50 invocations over 10 execution environments stay at reserved concurrency.

Each execution environment is a separate interpreter that imports the generated handler once
(the engine is built at import, as in a real cold start) and then runs invocations one at a
time, like the Lambda runtime loop. Ten of them run at once: reserved concurrency 10. Every
invocation is the event API Gateway's HTTP API sends (payload format 2.0), and every answer must
be a response it can send on.

The credentials: an environment configured as deploy/lambda/template.yaml configures the
function (no DATABASE_URL, the ARN of a Secrets Manager secret, served by moto's server) logs in
with the secret's PostgreSQL role, and keeps serving across a password rotation.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import ActivitySampler, PgBouncer, PostgresCluster, SecretsManagerServer
from psycopg import sql
from services import LambdaEnvironment, RenderedProject, response_json

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

ENVIRONMENTS = 10
INVOCATIONS = 50


def invoke_everywhere(
    environments: list[LambdaEnvironment], per_environment: int
) -> list[dict[str, Any]]:
    """Each environment creates an item, then reads it back, ... all environments in parallel."""
    responses: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(environments), timeout=60)

    def run(number: int, environment: LambdaEnvironment) -> None:
        try:
            barrier.wait()
            item_id = None
            for sequence in range(per_environment):
                if item_id is None or sequence % 2 == 0:
                    name = f"lambda-{number}-{sequence}"
                    response = environment.request("POST", "/items", {"name": name})
                    item_id = (response_json(response) or {}).get("id")
                else:
                    response = environment.request("GET", f"/items/{item_id}")
                    assert response_json(response)["id"] == item_id, response
                responses.append(response)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(number, environment), daemon=True)
        for number, environment in enumerate(environments)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    assert not any(thread.is_alive() for thread in threads)
    return responses


def run_environments(
    rendered: RenderedProject, url: str, application_name: str, database: PostgresCluster
) -> tuple[list[dict[str, Any]], int]:
    environments = [LambdaEnvironment(rendered, url, application_name) for _ in range(ENVIRONMENTS)]
    try:
        for environment in environments:
            environment.wait_ready()
        responses = invoke_everywhere(environments, INVOCATIONS // ENVIRONMENTS)
        # Every environment is still alive (warm) and holds no connection between invocations.
        assert all(environment.proc.poll() is None for environment in environments)
        between = database.connections(application_name)
    finally:
        codes = [environment.close() for environment in environments]
    assert codes == [0] * ENVIRONMENTS
    return responses, between


def test_null_pool_invocations_stay_at_reserved_concurrency(
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    app_name: Callable[[str], str],
) -> None:
    rendered = project("lambda")
    budget = rendered.budget()
    assert budget["app_total"] == ENVIRONMENTS  # reserved concurrency x 1 (NullPool)
    application = app_name("lambda")
    with ActivitySampler(database, application) as sampler:
        responses, between = run_environments(
            rendered, database.dsn(driver=""), application, database
        )
    print(f"lambda: peak {sampler.peak} connections, {between} between invocations")
    assert len(responses) == INVOCATIONS
    failed = [r for r in responses if r["statusCode"] not in (200, 201)]
    assert failed == [] and len({r["statusCode"] for r in responses}) == 2, failed[:3]
    # Every session is closed after its invocation; the peak is bounded by the environments.
    assert between == 0
    assert 2 <= sampler.peak <= budget["app_total"], sampler.samples
    assert database.connections(application) == 0


def test_behind_pgbouncer_the_server_side_stays_within_default_pool_size(
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    bouncer: Callable[[RenderedProject], PgBouncer],
    app_name: Callable[[str], str],
) -> None:
    rendered = project("lambda-tx")
    budget = rendered.budget()
    assert budget["pgbouncer_default_pool_size"] < ENVIRONMENTS  # PgBouncer must queue
    # The rendered max_client_conn (twice the app side) must absorb NullPool churn: PgBouncer
    # can accept an environment's next connection before it has processed the previous close.
    pgbouncer = bouncer(rendered)
    application = app_name("lambda-tx")
    with ActivitySampler(database, None, user=database.app_user) as server_side:
        responses, _ = run_environments(rendered, pgbouncer.dsn(driver=""), application, database)
    print(f"lambda behind PgBouncer: peak {server_side.peak} server connections")
    assert len(responses) == INVOCATIONS
    failed = [r for r in responses if r["statusCode"] not in (200, 201)]
    assert failed == [] and len({r["statusCode"] for r in responses}) == 2, failed[:3]
    assert 1 <= server_side.peak <= budget["pgbouncer_default_pool_size"], server_side.samples


ROTATED_ROLE = "lambda_rotated"


@pytest.fixture
def rotated_role(database: PostgresCluster) -> Iterator[str]:
    """A login role of its own (its password is rotated), with the service's table rights."""
    role = sql.Identifier(ROTATED_ROLE)
    database.psql(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal("unused")))
    try:
        for grant in (
            "GRANT SELECT, INSERT, UPDATE ON items TO {}",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}",
            "GRANT SELECT ON alembic_version TO {}",  # the migration reads where it stands
        ):
            database.psql(sql.SQL(grant).format(role), dbname=database.app_db)
        yield ROTATED_ROLE
    finally:
        database.psql(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
            (ROTATED_ROLE,),
        )
        database.psql(sql.SQL("DROP OWNED BY {}").format(role), dbname=database.app_db)
        database.psql(sql.SQL("DROP ROLE {}").format(role))


def rds_secret(database: PostgresCluster, username: str, password: str) -> dict[str, Any]:
    """The JSON RDS keeps for a database user (the rotation functions' format)."""
    return {
        "engine": "postgres",
        "host": database.host,
        "port": database.port,
        "dbname": database.app_db,
        "username": username,
        "password": password,
    }


def test_credentials_come_from_secrets_manager_and_survive_a_rotation(
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    app_name: Callable[[str], str],
    rotated_role: str,
) -> None:
    rendered = project("lambda")
    first, second = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    database.psql(
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(rotated_role), sql.Literal(first)
        )
    )
    application = app_name("lambda-secret")
    with SecretsManagerServer() as aws:
        arn = aws.create_secret(f"{application}-db", rds_secret(database, rotated_role, first))
        function_config = {
            "DATABASE_SECRET_ARN": arn,
            "DATABASE_HOST": database.host,
            "DATABASE_PORT": str(database.port),
            "DATABASE_NAME": database.app_db,
            **aws.sdk_env(),
        }
        environment = LambdaEnvironment(rendered, None, application, **function_config)
        try:
            environment.wait_ready()
            assert aws.calls("GetSecretValue") == 1  # at init
            created = environment.request("POST", "/items", {"name": "before rotation"})
            assert created["statusCode"] == 201, created
            item_id = response_json(created)["id"]
            read = environment.request("GET", f"/items/{item_id}")
            assert read["statusCode"] == 200, read
            assert aws.calls("GetSecretValue") == 1  # kept across invocations

            # The rotation's steps: the database's password first, then the secret.
            database.psql(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(rotated_role), sql.Literal(second)
                )
            )
            aws.put_secret(arn, rds_secret(database, rotated_role, second))

            after = environment.request("POST", "/items", {"name": "after rotation"})
            assert after["statusCode"] == 201, (after, environment.stderr())
            assert aws.calls("GetSecretValue") == 2  # read again once, after the refusal
            again = environment.request("GET", f"/items/{response_json(after)['id']}")
            assert again["statusCode"] == 200, again
            assert aws.calls("GetSecretValue") == 2  # and kept again
            # The invocation's first connect was refused (its EMF line says so), the retry's
            # connect opened: exactly one refusal, as invalid_password.
            refused = [line for line in environment.emf() if line.get("error.type") is not None]
            assert [line["error.type"] for line in refused] == ["28P01"], environment.stderr()
        finally:
            code = environment.close()
        assert code == 0, environment.stderr()
        logs = environment.stderr()
        assert first not in logs and second not in logs  # no password in what it logs
        owners = database.psql(
            "SELECT usename FROM pg_stat_activity WHERE application_name = %s", (application,)
        )
        assert owners == []  # NullPool: nothing held once the environment is gone

        # The MigrationFunction, configured the same way, reads the current secret on its run.
        migrate = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import json; from {rendered.package}.migrations import handler;"
                " print(json.dumps(handler({}, None)))",
            ],
            cwd=rendered.root,
            env=rendered.env(APPLICATION_NAME=f"{application}-migrate", **function_config),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stderr
        assert json.loads(migrate.stdout.splitlines()[-1])["statusCode"] == 200
        assert aws.calls("GetSecretValue") == 3
    # It logged in as the secret's role: the role's timeouts are set on that role.
    settings = database.psql("SELECT rolconfig FROM pg_roles WHERE rolname = %s", (rotated_role,))[
        0
    ][0]
    assert any(entry.startswith("statement_timeout=") for entry in settings or []), settings
