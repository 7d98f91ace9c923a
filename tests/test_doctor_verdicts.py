"""`poolwise doctor`'s verdicts (doctor.examine) on server states made up for each case.

The realdb tier (tests/realdb/test_doctor.py) runs the command against a real fleet; these are
the differences that scenario does not stage: settings, roles, idle transactions, unnamed and
empty application names, and PgBouncer's mode, driver, pool size and queue.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from poolwise import deployed, doctor, fleet, rule, services

LIMITS = rule.DatabaseLimits(max_connections=100, reserved_connections=3, other_consumers=0)


def service(
    name: str,
    *,
    pooler: str = "none",
    driver: str = "psycopg",
    pool_mode: str = "",
    role: str | None = None,
    pool: tuple[int, int] = (5, 5),
    pgbouncer_pool: tuple[int, int] = (5, 0),
    external: dict[str, int] | None = None,
) -> services.Service:
    """A k8s service of one replica (plus one terminating pod): 2 x sum(pool) + 1 migration."""
    workload = rule.Workload(
        kind="k8s", replicas=1, terminating=1, pool_size=pool[0], max_overflow=pool[1]
    )
    topology = rule.Topology(
        target="k8s-sync",
        workloads=(workload,),
        pooler=pooler,
        pool_mode=pool_mode or "transaction",
        driver=driver,
        pgbouncer_default_pool_size=pgbouncer_pool[0],
        pgbouncer_reserve_pool_size=pgbouncer_pool[1],
    )
    return services.Service(
        root=Path("/services") / name,
        name=name,
        package=name.replace("-", "_"),
        target="k8s-sync",
        pooler=pooler,
        driver=driver,
        pool_mode=pool_mode,
        cluster="orders-db",
        role=role or name.replace("-", "_"),
        limits=LIMITS,
        external_consumers=external or {},
        template_version="test",
        readings=[deployed.Reading("deploy/k8s", topology, LIMITS, inputs=[])],
    )


def cluster(*members: services.Service) -> fleet.Cluster:
    [result] = fleet.clusters(list(members))
    return result


def backend(name: str, role: str = "app", state: str = "idle", seconds: float = 0.0):
    return doctor.Backend(name, role, state, "10.0.0.7", seconds)


def server(backends: list[doctor.Backend], roles: dict[str, int], **settings: int):
    return doctor.ServerState(
        label="doctor@db:5432/postgres",
        version="16.4",
        settings={"max_connections": 100, "superuser_reserved_connections": 3, **settings},
        backends=backends,
        role_limits=roles,
    )


def findings(verdicts: list[doctor.Verdict]) -> dict[tuple[str, str], doctor.Verdict]:
    return {(verdict.kind, verdict.subject): verdict for verdict in verdicts if verdict.finding}


ORDERS = service("orders-api")  # worst case 2 x (5 + 5) + 1 = 21
CAPPED = {"orders_api": 21}


def test_a_server_as_declared_has_no_findings() -> None:
    live = server([backend("orders-api", "orders_api")] * 10, CAPPED)
    verdicts = doctor.examine(cluster(ORDERS), live)
    assert findings(verdicts) == {}
    assert {verdict.kind for verdict in verdicts} == {
        "server_settings",
        "service_connections",
        "idle_in_transaction",
        "role_connection_limit",
    }


@pytest.mark.parametrize(
    ("settings", "available"),
    [({"max_connections": 90}, 87), ({"reserved_connections": 5}, 92)],
    ids=["max_connections", "pg16-reserved_connections"],
)
def test_settings_that_differ_from_the_limits_are_a_finding(
    settings: dict[str, int], available: int
) -> None:
    verdicts = doctor.examine(cluster(ORDERS), server([], CAPPED, **settings))
    [(key, verdict)] = findings(verdicts).items()
    assert key == ("server_settings", "orders-db")
    assert verdict.data["available"] == available
    assert f"{available} available for the fleet's 21" in verdict.line


def test_a_service_over_its_worst_case_counts_its_migration_name_too() -> None:
    live = server(
        [backend("orders-api", "orders_api")] * 21 + [backend("orders-api-migrate", "orders_api")],
        CAPPED,
    )
    verdict = findings(doctor.examine(cluster(ORDERS), live))[("service_connections", "orders-api")]
    assert verdict.data["connections"] == 22 and verdict.data["declared"] == 21
    assert "22 connections" in verdict.line and "> 21 declared worst case" in verdict.line


def test_unknown_and_empty_application_names_are_findings_but_not_the_doctor() -> None:
    live = server(
        [
            backend("metabase"),
            backend("metabase", state="active"),
            backend(""),
            backend(doctor.APPLICATION_NAME, "poolwise_doctor"),
        ],
        CAPPED,
    )
    found = findings(doctor.examine(cluster(ORDERS), live))
    assert set(found) == {("application_name_unknown", "metabase"), ("application_name_empty", "")}
    assert found[("application_name_unknown", "metabase")].data["connections"] == 2
    assert "from 10.0.0.7" in found[("application_name_empty", "")].line


def test_a_declared_external_consumer_is_counted_against_its_own_number() -> None:
    orders = service("orders-api", external={"metabase": 1})
    live = server([backend("metabase"), backend("metabase")], CAPPED)
    found = findings(doctor.examine(cluster(orders), live))
    assert set(found) == {("external_consumer_connections", "metabase")}
    assert "2 connections" in found[("external_consumer_connections", "metabase")].line


def test_unnamed_connections_of_a_pgbouncer_service_role_are_its_server_side() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="session")  # 5 + 0 + 1
    live = server([backend("", "events_api")] * 6 + [backend("", "other")], {"events_api": 6}, **{})
    checks = {(v.kind, v.subject): v for v in doctor.examine(cluster(events), live)}
    events_seen = checks[("service_connections", "events-api")]
    assert not events_seen.finding and events_seen.data["unnamed_server_side"] == 6
    assert checks[("application_name_empty", "")].data["roles"] == {"other": 1}


def test_idle_in_transaction_past_the_threshold_is_a_finding() -> None:
    live = server(
        [
            backend("orders-api", "orders_api", "idle in transaction", 3.0),
            backend("orders-api", "orders_api", "idle in transaction (aborted)", 45.5),
        ],
        CAPPED,
    )
    assert findings(doctor.examine(cluster(ORDERS), live, None, 60.0)) == {}
    verdict = findings(doctor.examine(cluster(ORDERS), live, None, 30.0))[
        ("idle_in_transaction", "orders-db")
    ]
    assert verdict.data["sessions"] == 2 and verdict.data["longer_than_threshold"] == 1
    assert "oldest 45.5 s" in verdict.line


ALTER = 'ALTER ROLE "orders_api" CONNECTION LIMIT 21;'


@pytest.mark.parametrize(
    ("roles", "says", "fix"),
    [
        # ALTER ROLE fails on a role that does not exist: the fix creates it.
        ({}, "does not exist", 'CREATE ROLE "orders_api" LOGIN CONNECTION LIMIT 21;'),
        ({"orders_api": -1}, "no CONNECTION LIMIT", ALTER),
        ({"orders_api": 30}, "9 more than the fleet counts", ALTER),
        ({"orders_api": 20}, "refused 1 connection its budget allows", ALTER),
    ],
    ids=["missing", "unlimited", "above", "below"],
)
def test_a_role_limit_other_than_the_worst_case_is_a_finding(
    roles: dict[str, int], says: str, fix: str
) -> None:
    found = findings(doctor.examine(cluster(ORDERS), server([], roles)))
    assert set(found) == {("role_connection_limit", "orders_api")}
    verdict = found[("role_connection_limit", "orders_api")]
    assert says in verdict.line
    assert f"; fix, as a superuser: {fix} (or {doctor.FLEET_SQL})" in verdict.line
    assert verdict.data["fix_sql"] == fix


def test_services_sharing_a_role_share_its_limit() -> None:
    billing = service("billing-api", role="orders_api", pool=(2, 0))  # 2 x 2 + 1 = 5
    shared = cluster(ORDERS, billing)
    found = findings(doctor.examine(shared, server([], {"orders_api": 26})))
    assert found == {}
    # The sum the doctor expects is the one limit fleet --sql sets, once, for both.
    guardrail_sql = fleet.sql([shared])
    assert guardrail_sql.count('ALTER ROLE "orders_api" CONNECTION LIMIT 26;') == 1
    assert "CONNECTION LIMIT 21" not in guardrail_sql
    [verdict] = findings(doctor.examine(shared, server([], {"orders_api": 21}))).values()
    assert verdict.data["fix_sql"] == 'ALTER ROLE "orders_api" CONNECTION LIMIT 26;'
    assert "(billing-api 5 + orders-api 21)" in verdict.line


def test_a_role_name_is_quoted_in_the_fix() -> None:
    hostile = service("orders-api", role='app"; ALTER ROLE app SUPERUSER; --')
    [verdict] = findings(doctor.examine(cluster(hostile), server([], {}))).values()
    assert verdict.data["fix_sql"] == (
        'CREATE ROLE "app""; ALTER ROLE app SUPERUSER; --" LOGIN CONNECTION LIMIT 21;'
    )


# ----------------------------------------------------------------------------- what was skipped


def skipped(verdicts: list[doctor.Verdict]) -> dict[tuple[str, str], doctor.Verdict]:
    return {(verdict.kind, verdict.subject): verdict for verdict in verdicts if verdict.skipped}


def test_without_a_pgbouncer_dsn_its_checks_are_listed_as_skipped() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="transaction")
    verdicts = doctor.examine(cluster(ORDERS, events), server([], {**CAPPED, **EVENTS_ROLE}))
    assert findings(verdicts) == {}
    [((kind, subject), verdict)] = skipped(verdicts).items()
    assert (kind, subject, verdict.finding) == ("pgbouncer_checks", "events-api", False)
    assert verdict.data == {"reason": "no --pgbouncer-dsn", "checks": list(doctor.PGBOUNCER_CHECKS)}
    assert verdict.text().startswith("skipped  events-api PgBouncer checks (pgbouncer_pool_mode,")
    assert verdict.as_json()["skipped"] is True
    # A service without PgBouncer has nothing to skip.
    assert skipped(doctor.examine(cluster(ORDERS), server([], CAPPED))) == {}


def test_a_pgbouncer_service_this_pgbouncer_does_not_serve_is_skipped() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="transaction")
    billing = service("billing-api", pooler="pgbouncer", pool_mode="transaction")
    live = server([], {"events_api": 6, "billing_api": 6})
    verdicts = doctor.examine(cluster(events, billing), live, bouncer([pool("events_api")]))
    assert findings(verdicts) == {}
    [verdict] = skipped(verdicts).values()
    assert (verdict.kind, verdict.subject) == ("pgbouncer_checks", "billing-api")
    assert "has no pool of its role billing_api" in verdict.line
    assert {v.subject for v in verdicts if v.kind == "pgbouncer_pool_size"} == {"events-api"}


def test_rds_proxy_and_other_clusters_are_listed_as_skipped() -> None:
    proxied = dataclasses.replace(service("orders-api"), pooler="rds-proxy")
    [verdict] = skipped(doctor.examine(cluster(proxied), server([], CAPPED))).values()
    assert (verdict.kind, verdict.subject) == ("rds_proxy_checks", "orders-api")
    assert "poolwise doctor reads PostgreSQL and PgBouncer, not RDS Proxy" in verdict.line

    ledger = dataclasses.replace(service("ledger-api"), cluster="ledger-db")
    found = fleet.clusters([ORDERS, ledger])
    checked = doctor.choose_cluster(found, "orders-db")
    [verdict] = doctor.other_clusters_skipped(found, checked)
    assert (verdict.kind, verdict.subject, verdict.skipped) == ("cluster_checks", "ledger-db", True)
    assert verdict.line == (
        "cluster ledger-db (ledger-api): the DSN is cluster orders-db's (--cluster orders-db);"
        " run poolwise doctor with its DSN and --cluster ledger-db"
    )


# ----------------------------------------------------------------------------- PgBouncer


def bouncer(pools: list[dict[str, Any]], **config: str) -> doctor.PgBouncerState:
    return doctor.PgBouncerState(
        label="doctor@pgbouncer:6432/pgbouncer",
        version="PgBouncer 1.18.0",
        config={"pool_mode": "transaction", "default_pool_size": "5", **config},
        databases=[{"name": "app", "pool_size": 5, "reserve_pool": 0}],
        pools=pools,
    )


def pool(user: str, **values: Any) -> dict[str, Any]:
    return {
        "database": "app",
        "user": user,
        "pool_mode": "transaction",
        "cl_waiting": 0,
        "maxwait": 0,
        "maxwait_us": 0,
        **values,
    }


EVENTS_ROLE = {"events_api": 6}


def pgbouncer_findings(events: services.Service, state: doctor.PgBouncerState) -> dict:
    return findings(doctor.examine(cluster(events), server([], EVENTS_ROLE), state))


def test_a_pgbouncer_as_declared_has_no_findings() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="transaction")
    verdicts = doctor.examine(
        cluster(events), server([], EVENTS_ROLE), bouncer([pool("events_api")])
    )
    assert findings(verdicts) == {}
    assert {v.kind for v in verdicts if v.kind.startswith("pgbouncer")} == {
        "pgbouncer_pool_mode",
        "pgbouncer_driver",
        "pgbouncer_pool_size",
        "pgbouncer_waiting_clients",
    }


def test_a_psycopg_service_generated_for_session_mode_breaks_behind_transaction_mode() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="session")
    found = pgbouncer_findings(events, bouncer([pool("events_api")]))
    assert set(found) == {
        ("pgbouncer_pool_mode", "events-api"),
        ("pgbouncer_driver", "events-api"),
    }
    assert "pool_mode transaction (app/events_api), declared session" in (
        found[("pgbouncer_pool_mode", "events-api")].line
    )


def test_asyncpg_behind_transaction_mode_needs_max_prepared_statements() -> None:
    events = service("events-api", pooler="pgbouncer", driver="asyncpg", pool_mode="transaction")
    found = pgbouncer_findings(events, bouncer([pool("events_api")]))
    assert set(found) == {("pgbouncer_driver", "events-api")}
    assert "asyncpg prepares statements" in found[("pgbouncer_driver", "events-api")].line
    # PgBouncer 1.21+ keeps protocol-level prepared statements per client when this is > 0.
    newer = bouncer([pool("events_api")], max_prepared_statements="200")
    assert pgbouncer_findings(events, newer) == {}


def test_a_pool_size_other_than_declared_and_waiting_clients_are_findings() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="transaction")
    state = bouncer([pool("events_api", cl_waiting=3, maxwait=2, maxwait_us=500_000)])
    state.databases = [{"name": "app", "pool_size": 8, "reserve_pool": 2}]
    found = pgbouncer_findings(events, state)
    assert set(found) == {
        ("pgbouncer_pool_size", "events-api"),
        ("pgbouncer_waiting_clients", "events-api"),
    }
    assert "pool_size 8 + reserve_pool 2 = 10" in found[("pgbouncer_pool_size", "events-api")].line
    waiting = found[("pgbouncer_waiting_clients", "events-api")]
    assert waiting.data == {"cl_waiting": 3, "maxwait_seconds": 2.5}


def test_a_user_pool_size_wins_over_the_database_one_as_in_pgbouncer() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="transaction")
    state = bouncer([pool("events_api")])
    # PgBouncer 1.23+: reserve_pool_size in SHOW DATABASES, per-user sizes in SHOW USERS.
    state.databases = [{"name": "app", "pool_size": 20, "reserve_pool_size": 0}]
    state.users = [{"name": "events_api", "pool_size": "        5", "reserve_pool_size": ""}]
    assert pgbouncer_findings(events, state) == {}
    state.users = [{"name": "events_api", "pool_size": "", "reserve_pool_size": "2"}]
    found = pgbouncer_findings(events, state)
    assert "pool_size 20 + reserve_pool 2 = 22" in found[("pgbouncer_pool_size", "events-api")].line


def test_without_a_pool_the_only_pgbouncer_service_is_checked_against_the_settings() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="transaction")
    found = pgbouncer_findings(events, bouncer([], default_pool_size="20"))
    assert set(found) == {("pgbouncer_pool_size", "events-api")}


def test_a_pgbouncer_serving_none_of_several_pgbouncer_services_is_a_finding() -> None:
    events = service("events-api", pooler="pgbouncer", pool_mode="transaction")
    billing = service("billing-api", pooler="pgbouncer", pool_mode="transaction")
    state = bouncer([pool("someone_else")])
    live = server([], {"events_api": 6, "billing_api": 6})
    found = findings(doctor.examine(cluster(events, billing), live, state))
    assert set(found) == {("pgbouncer_services", state.label)}


# ----------------------------------------------------------------------------- the command


def test_several_clusters_need_cluster_and_an_unknown_name_is_refused() -> None:
    other = dataclasses.replace(service("ledger-api"), cluster="ledger-db")
    found = fleet.clusters([ORDERS, other])
    with pytest.raises(services.InputError, match="pass --cluster NAME"):
        doctor.choose_cluster(found, None)
    with pytest.raises(services.InputError, match="hold only ledger-db, orders-db"):
        doctor.choose_cluster(found, "nowhere")
    assert doctor.choose_cluster(found, "ledger-db").name == "ledger-db"


@pytest.mark.parametrize(
    ("dsn", "label"),
    [
        (
            "postgresql://doctor:s3cret@db.internal:5433/postgres",
            "doctor@db.internal:5433/postgres",
        ),
        ("postgresql+psycopg://doctor:s3cret@db/postgres", "doctor@db/postgres"),
        ("host=db user=doctor password=s3cret dbname=postgres", "doctor@db/postgres"),
        ("user=doctor dbname=postgres", "doctor@(local socket)/postgres"),
    ],
)
def test_a_dsn_is_described_without_its_password(dsn: str, label: str) -> None:
    assert doctor.describe_dsn(dsn) == label


def test_an_unparsable_dsn_is_refused_without_repeating_it() -> None:
    # libpq's own message for this one quotes the whole URI, password included.
    with pytest.raises(doctor.Unreachable) as refused:
        doctor.read_server("postgresql://doctor:s3cret@[db/postgres", ["orders_api"])
    assert "s3cret" not in str(refused.value)
    assert str(refused.value).startswith("cannot connect to PostgreSQL: its DSN is neither")


def with_allocation(member: services.Service, share: int) -> services.Service:
    return dataclasses.replace(member, limits=member.limits._replace(allocation=share))


def test_live_connections_near_or_over_an_allocation_are_reported_per_role_and_service() -> None:
    # orders-api's share is 20, billing-api's 10, and both log in as app (capped at 30).
    orders = with_allocation(service("orders-api", role="app"), 20)
    billing = with_allocation(service("billing-api", role="app", pool=(2, 2)), 10)
    state = server(
        [backend("orders-api", "app")] * 19 + [backend("billing-api", "app")] * 11,
        {"app": 30},
    )
    checks = {
        (verdict.kind, verdict.subject): verdict
        for verdict in doctor.examine(cluster(orders, billing), state)
    }
    role = checks[("role_allocation", "role app")]
    # 30 of the role's 30 (20 + 10): near, not over; the database enforces the sum.
    assert (role.finding, role.data["near"], role.data["connections"]) == (False, True, 30)
    assert "30 connections now <= 30 allocated (billing-api 10 + orders-api 20)" in role.line
    near = checks[("service_allocation", "orders-api")]
    assert (near.finding, near.data["near"]) == (False, True)
    assert near.line.endswith("95%: near its allocation")
    over = checks[("service_allocation", "billing-api")]
    assert over.finding and over.data["over"]
    assert over.line.startswith("billing-api: 11 connections now > 10 allocated (db_allocation)")
    limit = checks[("role_connection_limit", "app")]
    assert not limit.finding and "CONNECTION LIMIT 30 = 30 allocated" in limit.line


def test_services_without_an_allocation_get_no_allocation_verdicts() -> None:
    verdicts = doctor.examine(cluster(service("orders-api")), server([], {"orders_api": 21}))
    assert not [v for v in verdicts if v.kind in ("role_allocation", "service_allocation")]
