"""Lambda: 50 invocations over 10 execution environments stay at reserved concurrency.

Each execution environment is a separate interpreter that imports the generated handler once
(the engine is built at import, as in a real cold start) and then runs invocations one at a
time, like the Lambda runtime loop. Ten of them run at once: reserved concurrency 10. Every
invocation is the event API Gateway's HTTP API sends (payload format 2.0), and every answer must
be a response it can send on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from harness import ActivitySampler, PgBouncer, PostgresCluster
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
