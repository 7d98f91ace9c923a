"""`poolwise doctor`: the running PostgreSQL (and PgBouncer) against what the fleet declared.

Everything is read, nothing is changed: the server through a role with pg_monitor (settings,
pg_stat_activity, pg_roles) in a read-only transaction, PgBouncer through its admin console.
Reading (`read_server`, `read_pgbouncer`) is kept apart from judging (`examine`), which is pure:
it takes what was read and the declared cluster and returns one verdict per check.

A connection belongs to a service when its application_name is one of the service's (its
processes and its migration set them, and PgBouncer passes the client's name on to the server
connection it links); an unnamed connection of a role that only a PgBouncer-fronted service uses
is that PgBouncer's server connection (PgBouncer logs in without a name and session mode's
DISCARD ALL clears it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from argparse import Namespace
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import allocations, fleet, guardrail, rule, services

APPLICATION_NAME = "poolwise-doctor"
HEALTHY, FINDINGS, UNREACHABLE = 0, 1, 2
CONNECT_TIMEOUT_SECONDS = 5
# PostgreSQL 16 added reserved_connections (for pg_use_reserved_connections) beside the
# superuser's; both are taken away from max_connections before any ordinary role gets one.
RESERVED_SETTINGS = ("superuser_reserved_connections", "reserved_connections")
IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")
ADMIN_DATABASE = "pgbouncer"
FLEET_SQL = "poolwise fleet --sql --cluster NAME PATH... | psql -v ON_ERROR_STOP=1"
PGBOUNCER_CHECKS = (
    "pgbouncer_pool_mode",
    "pgbouncer_driver",
    "pgbouncer_pool_size",
    "pgbouncer_waiting_clients",
)
# How an empty application_name or role is shown in a line.
EMPTY = "''"


class Unreachable(Exception):
    """A server or PgBouncer that cannot be read; the message is one line naming which."""


# ----------------------------------------------------------------------------- what was read


@dataclass(frozen=True)
class Backend:
    """One client backend of pg_stat_activity."""

    application_name: str
    role: str
    state: str
    client_addr: str = ""
    state_seconds: float = 0.0


@dataclass
class ServerState:
    label: str
    version: str
    settings: dict[str, int]
    backends: list[Backend]
    # rolconnlimit of each role asked for; a role that does not exist is absent.
    role_limits: dict[str, int]

    @property
    def reserved(self) -> int:
        return sum(self.settings.get(name, 0) for name in RESERVED_SETTINGS)


@dataclass
class PgBouncerState:
    label: str
    version: str
    config: dict[str, str]
    databases: list[dict[str, Any]]
    pools: list[dict[str, Any]]
    users: list[dict[str, Any]] = field(default_factory=list)

    def server_pool(self, pool: dict[str, Any]) -> tuple[int, int]:
        """(pool_size, reserve pool) PgBouncer applies to one pool, as its pool_pool_size() does.

        A user's own pool_size (SHOW USERS, PgBouncer 1.23+) wins over the database's, which
        SHOW DATABASES already shows with default_pool_size filled in. Its reserve column is
        reserve_pool up to 1.23 and reserve_pool_size from 1.24 on.
        """
        database = next((row for row in self.databases if row["name"] == pool["database"]), {})
        user = next((row for row in self.users if row["name"] == pool["user"]), {})
        sizes = []
        for user_key, database_keys, setting in (
            ("pool_size", ("pool_size",), "default_pool_size"),
            ("reserve_pool_size", ("reserve_pool_size", "reserve_pool"), "reserve_pool_size"),
        ):
            if str(user.get(user_key) or "").strip():
                sizes.append(int(str(user[user_key]).strip()))
                continue
            found = [database[key] for key in database_keys if database.get(key) is not None]
            sizes.append(int(found[0]) if found else int(self.config.get(setting, 0) or 0))
        return sizes[0], sizes[1]


@dataclass(frozen=True)
class Verdict:
    """One check: a line with the numbers, and the same numbers for machines.

    A check that could not run says so (skipped, never a finding) with the reason and how to
    run it, so a quiet report is never mistaken for a full one.
    """

    kind: str
    subject: str
    finding: bool
    line: str
    data: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        status = "FINDING" if self.finding else "skipped" if self.skipped else "ok"
        return f"{status:<7}  {self.line}"


def _skipped(kind: str, subject: str, line: str, reason: str, checks: list[str]) -> Verdict:
    return Verdict(kind, subject, False, line, {"reason": reason, "checks": checks}, skipped=True)


# ----------------------------------------------------------------------------- reading


def _conninfo(dsn: str) -> str:
    """A libpq connection string; a SQLAlchemy URL (postgresql+psycopg://) is accepted too."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", dsn.strip())


def describe_dsn(dsn: str) -> str:
    """user@host:port/dbname of a DSN, never its password."""
    try:
        parts = conninfo_to_dict(_conninfo(dsn))
    except psycopg.Error:
        return "an unparsable DSN"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or parts.get("hostaddr") or "(local socket)"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"{user}{host}{port}/{parts.get('dbname', '')}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _connect(dsn: str, what: str, **options: Any) -> psycopg.Connection[Any]:
    label = describe_dsn(dsn)
    conninfo = _conninfo(dsn)
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.Error:
        # libpq's parse error quotes the string around the mistake, which may be the password.
        raise Unreachable(
            f"cannot connect to {what}: its DSN is neither a postgresql:// URL nor a libpq"
            " key=value string"
        ) from None
    if "connect_timeout" not in parts:
        options["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    try:
        return psycopg.connect(conninfo, application_name=APPLICATION_NAME, **options)
    except psycopg.Error as error:
        raise Unreachable(f"cannot connect to {what} {label}: {_one_line(error)}") from None


def read_server(dsn: str, roles: list[str]) -> ServerState:
    """Settings, client backends and role limits, in one read-only transaction."""
    label = describe_dsn(dsn)
    with _connect(dsn, "PostgreSQL") as connection:
        connection.read_only = True
        try:
            can_see_all = connection.execute(
                "SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')"
            ).fetchone()
            if not (can_see_all and can_see_all[0]):
                # Without it pg_stat_activity hides the state of every other role's sessions.
                raise Unreachable(
                    f"PostgreSQL {label}: the role cannot read other sessions' state;"
                    f" GRANT pg_monitor TO {connection.info.user}"
                )
            version = connection.execute("SHOW server_version").fetchone()
            settings = connection.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["max_connections", *RESERVED_SETTINGS],),
            ).fetchall()
            backends = connection.execute(
                "SELECT coalesce(application_name, ''), coalesce(usename, ''),"
                " coalesce(state, ''), coalesce(host(client_addr), ''),"
                " coalesce(extract(epoch FROM clock_timestamp() - state_change), 0)::float8"
                " FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
            limits = connection.execute(
                "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname = ANY(%s)", (roles,)
            ).fetchall()
        except psycopg.Error as error:
            raise Unreachable(f"cannot read PostgreSQL {label}: {_one_line(error)}") from None
        finally:
            # A connection that broke mid-read cannot roll back; the error above says why.
            with contextlib.suppress(psycopg.Error):
                connection.rollback()
    return ServerState(
        label=label,
        version=str(version[0]) if version else "",
        settings={name: int(value) for name, value in settings},
        backends=[Backend(*row) for row in backends],
        role_limits={name: int(limit) for name, limit in limits},
    )


def _show(connection: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    # The admin console only speaks the simple query protocol: psycopg uses it for a query
    # without parameters that it does not prepare (prepare=True gets "extended query protocol
    # not supported by admin console").
    cursor = connection.execute(command, prepare=False)
    names = [column.name for column in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def read_pgbouncer(dsn: str) -> PgBouncerState:
    """SHOW VERSION, CONFIG, DATABASES, USERS and POOLS (a stats_users or admin_users login)."""
    label = describe_dsn(dsn)
    with _connect(dsn, "PgBouncer", autocommit=True, prepare_threshold=None) as connection:
        try:
            version = _show(connection, "SHOW VERSION")
            config = {row["key"]: str(row["value"]) for row in _show(connection, "SHOW CONFIG")}
            databases = _show(connection, "SHOW DATABASES")
            users = _show(connection, "SHOW USERS")
            pools = _show(connection, "SHOW POOLS")
        except psycopg.Error as error:
            raise Unreachable(
                f"cannot read PgBouncer's admin console {label} (connect to database"
                f" {ADMIN_DATABASE} as a stats_users or admin_users login): {_one_line(error)}"
            ) from None
    return PgBouncerState(
        label=label,
        version=str(next(iter(version[0].values()))) if version else "",
        config=config,
        databases=databases,
        pools=pools,
        users=users,
    )


# ----------------------------------------------------------------------------- judging


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _breakdown(counts: Counter[str]) -> str:
    return ", ".join(f"{key or EMPTY} {n}" for key, n in sorted(counts.items()))


def _who(backends: list[Backend]) -> dict[str, Any]:
    return {
        "connections": len(backends),
        "states": dict(Counter(backend.state for backend in backends)),
        "roles": dict(Counter(backend.role for backend in backends)),
        "client_addrs": sorted({backend.client_addr for backend in backends} - {""}),
    }


def _who_text(backends: list[Backend]) -> str:
    if not backends:
        return _count(0, "connection")
    states = _breakdown(Counter(backend.state for backend in backends))
    roles = _breakdown(Counter(backend.role for backend in backends))
    return f"{_count(len(backends), 'connection')} ({states}; role {roles})"


def _settings_verdict(cluster: fleet.Cluster, server: ServerState) -> Verdict:
    declared = cluster.limits
    live_max = server.settings.get("max_connections", 0)
    reserved_terms = (
        " + ".join(
            f"{name} {server.settings[name]}"
            for name in RESERVED_SETTINGS
            if name in server.settings
        )
        or "no reserved settings"
    )
    available = live_max - server.reserved
    differs = (
        live_max != declared.max_connections or server.reserved != declared.reserved_connections
    )
    line = (
        f"cluster {cluster.name} settings: max_connections {live_max} (declared"
        f" {declared.max_connections}), reserved {server.reserved} = {reserved_terms} (declared"
        f" {declared.reserved_connections}); {available} available for the fleet's"
        f" {cluster.total}"
    )
    if differs:
        line += f"; fix the limits in {declared.source}, or the server, so they agree"
    if cluster.total > available:
        line += f": the fleet does not fit the live server by {cluster.total - available}"
    return Verdict(
        "server_settings",
        cluster.name,
        differs or cluster.total > available,
        line,
        {
            "max_connections": live_max,
            "declared_max_connections": declared.max_connections,
            "reserved_connections": server.reserved,
            "declared_reserved_connections": declared.reserved_connections,
            "available": available,
            "fleet_total": cluster.total,
        },
    )


def _owners(
    cluster: fleet.Cluster,
) -> tuple[dict[str, services.Service], dict[str, services.Service]]:
    """Services by application_name, and by role where the role is one PgBouncer service's."""
    by_name = {name: service for service in cluster.services for name in service.application_names}
    roles = Counter(service.role for service in cluster.services)
    pooled_roles = {
        service.role: service
        for service in cluster.services
        if service.pooler == "pgbouncer" and roles[service.role] == 1
    }
    return by_name, pooled_roles


def _connection_verdicts(cluster: fleet.Cluster, server: ServerState) -> list[Verdict]:
    by_name, pooled_roles = _owners(cluster)
    external = cluster.limits.external_consumers
    of_service: dict[str, list[Backend]] = {service.name: [] for service in cluster.services}
    unnamed_server_side: Counter[str] = Counter()
    of_external: dict[str, list[Backend]] = {name: [] for name in external}
    unknown: dict[str, list[Backend]] = {}
    for backend in server.backends:
        name = backend.application_name
        if name == APPLICATION_NAME:
            continue  # another run of the doctor (a schedule overlapping a person)
        if name in by_name:
            of_service[by_name[name].name].append(backend)
        elif name in external:
            of_external[name].append(backend)
        elif name == "" and backend.role in pooled_roles:
            owner = pooled_roles[backend.role].name
            of_service[owner].append(backend)
            unnamed_server_side[owner] += 1
        else:
            unknown.setdefault(name, []).append(backend)

    verdicts = []
    for service in cluster.services:
        backends = of_service[service.name]
        over = len(backends) > service.total
        unnamed = unnamed_server_side[service.name]
        line = (
            f"{service.name}: {_who_text(backends)}"
            + (f", {unnamed} of them unnamed PgBouncer server connections" if unnamed else "")
            + f" {'>' if over else '<='} {service.total} declared worst case"
            f" ({rule.database_check(service.worst.topology, service.limits).hop},"
            " migration included)"
        )
        if over:
            addresses = ", ".join(_who(backends)["client_addrs"]) or "no client address"
            line += (
                f"; {len(backends) - service.total} more than declared, from {addresses}: find"
                " who opens them, or declare the real topology and rerun poolwise fleet"
            )
        verdicts.append(
            Verdict(
                "service_connections",
                service.name,
                over,
                line,
                {**_who(backends), "declared": service.total, "unnamed_server_side": unnamed},
            )
        )
    for name, declared in external.items():
        backends = of_external[name]
        over = len(backends) > declared
        verdicts.append(
            Verdict(
                "external_consumer_connections",
                name,
                over,
                f"external consumer {name}: {_who_text(backends)}"
                f" {'>' if over else '<='} {declared} declared",
                {**_who(backends), "declared": declared},
            )
        )
    for name, backends in sorted(unknown.items()):
        where = ", ".join(_who(backends)["client_addrs"]) or "no client address"
        if name:
            kind = "application_name_unknown"
            line = (
                f"application_name {name!r}: {_who_text(backends)} from {where}, in no"
                " service's answers and no declared external consumer; declare it in"
                " db_external_consumers with its worst case, or stop it"
            )
        else:
            kind = "application_name_empty"
            line = (
                f"empty application_name: {_who_text(backends)} from {where}; nothing"
                " accounts for them: set application_name in every client"
            )
        verdicts.append(Verdict(kind, name, True, line, _who(backends)))
    return verdicts


def _idle_in_transaction_verdict(
    cluster: fleet.Cluster, server: ServerState, threshold: float
) -> Verdict:
    idle = [backend for backend in server.backends if backend.state in IDLE_IN_TRANSACTION]
    too_long = [backend for backend in idle if backend.state_seconds > threshold]
    oldest = max(idle, key=lambda backend: backend.state_seconds, default=None)
    line = f"cluster {cluster.name}: {_count(len(idle), 'session')} idle in transaction"
    if oldest is not None:
        line += (
            f", oldest {oldest.state_seconds:.1f} s ({oldest.application_name or EMPTY},"
            f" role {oldest.role})"
        )
    line += f"; {len(too_long)} longer than {threshold:g} s"
    if too_long:
        line += (
            ": they hold a connection (and locks) while doing nothing; commit or roll back"
            " sooner, or set idle_in_transaction_session_timeout"
        )
    return Verdict(
        "idle_in_transaction",
        cluster.name,
        bool(too_long),
        line,
        {
            "sessions": len(idle),
            "longer_than_threshold": len(too_long),
            "threshold_seconds": threshold,
            "oldest_seconds": round(oldest.state_seconds, 3) if oldest else None,
            "oldest_application_name": oldest.application_name if oldest else None,
        },
    )


def _allocation_verdicts(cluster: fleet.Cluster, server: ServerState) -> list[Verdict]:
    """Live connections against the allocations: per role (the sum of its services' shares, as
    the guardrail caps it) and per service with one; near is allocations.NEAR of it or more.

    Over is a finding; near is reported (data "near") without one: the service still fits.
    """
    by_name, pooled_roles = _owners(cluster)
    verdicts = []

    def verdict(kind: str, subject: str, live: int, share: int, whose: str) -> Verdict:
        over, near = live > share, live >= allocations.NEAR * share
        state = "OVER its allocation" if over else "near its allocation" if near else "within"
        return Verdict(
            kind,
            subject,
            over,
            f"{subject}: {_count(live, 'connection')} now {'>' if over else '<='} {share}"
            f" allocated ({whose}), {live / share:.0%}: {state}"
            + (
                "; find who opens them, or raise its allocation in the platform file"
                if over
                else ""
            ),
            {"connections": live, "allocated": share, "near": near and not over, "over": over},
        )

    for cap in guardrail.role_caps(cluster.services):
        if any(allocations.allocation(service) for service in cap.services):
            live = sum(1 for backend in server.backends if backend.role == cap.role)
            verdicts.append(
                verdict("role_allocation", f"role {cap.role}", live, cap.limit, cap.whose)
            )
    for service in cluster.services:
        share = allocations.allocation(service)
        if share:
            live = sum(
                1
                for backend in server.backends
                if by_name.get(backend.application_name) is service
                or (backend.application_name == "" and pooled_roles.get(backend.role) is service)
            )
            verdicts.append(
                verdict("service_allocation", service.name, live, share, "db_allocation")
            )
    return verdicts


def _role_verdicts(cluster: fleet.Cluster, server: ServerState) -> list[Verdict]:
    """Each role's rolconnlimit against the summed allocations of the services using it (the
    worst case of a service without one).

    The fix is the one statement the live state needs: CREATE ROLE for a missing role (ALTER
    ROLE would fail on it), ALTER ROLE for one with another limit.
    """
    verdicts = []
    for cap in guardrail.role_caps(cluster.services):
        declared = cap.limit
        # A role of services with allocations is capped at them; of others at their worst case.
        what = (
            "allocated"
            if any(allocations.allocation(service) for service in cap.services)
            else "declared worst case"
        )
        limit = server.role_limits.get(cap.role)
        fix = (
            guardrail.create_role(cap.role, declared)
            if limit is None
            else guardrail.alter_role(cap.role, declared)
        )
        if limit is None:
            state = f"does not exist (declared for {cap.whose})"
        elif limit == -1:
            state = f"has no CONNECTION LIMIT (-1), {what} {declared} ({cap.whose})"
        elif limit > declared:
            state = (
                f"CONNECTION LIMIT {limit} > {declared} {what} ({cap.whose}): the"
                f" database lets it open {limit - declared} more than the fleet counts"
            )
        elif limit < declared:
            state = (
                f"CONNECTION LIMIT {limit} < {declared} {what} ({cap.whose}): it is"
                f" refused {_count(declared - limit, 'connection')} its budget allows"
            )
        else:
            state = f"CONNECTION LIMIT {limit} = {declared} {what} ({cap.whose})"
        finding = limit != declared
        line = f"role {cap.role}: {state}" + (
            f"; fix, as a superuser: {fix} (or {FLEET_SQL})" if finding else ""
        )
        verdicts.append(
            Verdict(
                "role_connection_limit",
                cap.role,
                finding,
                line,
                {
                    "exists": limit is not None,
                    "rolconnlimit": limit,
                    "declared": declared,
                    "services": [service.name for service in cap.services],
                    "fix_sql": fix if finding else None,
                },
            )
        )
    return verdicts


def _prepares_server_side(service: services.Service) -> bool:
    """Whether the service's driver prepares statements on the server connection it has.

    asyncpg always does; the rendered psycopg engine turns it off only when it was generated
    for transaction mode (prepare_threshold None), so one generated for session mode does too.
    """
    return service.driver == "asyncpg" or service.pool_mode != "transaction"


def _pgbouncer_verdicts(cluster: fleet.Cluster, bouncer: PgBouncerState) -> list[Verdict]:
    config = bouncer.config
    pools_of: dict[str, list[dict[str, Any]]] = {}
    for pool in bouncer.pools:
        if pool["database"] != ADMIN_DATABASE:
            pools_of.setdefault(str(pool["user"]), []).append(pool)
    fronted = [service for service in cluster.services if service.pooler == "pgbouncer"]
    served = [service for service in fronted if service.role in pools_of]
    if not served and len(fronted) == 1:
        # No client of its role has connected yet (PgBouncer makes pools on demand): the one
        # service declared behind PgBouncer is the one this PgBouncer is for.
        served = fronted
    if not served:
        roles = ", ".join(f"{service.name} ({service.role})" for service in fronted) or "none"
        return [
            Verdict(
                "pgbouncer_services",
                bouncer.label,
                True,
                f"PgBouncer {bouncer.label}: no pool of any PgBouncer service's role (declared:"
                f" {roles}; pools: {', '.join(sorted(pools_of)) or 'none'}): is this the"
                " right PgBouncer, or the right --cluster?",
                {"pool_users": sorted(pools_of), "declared_roles": [s.role for s in fronted]},
            )
        ]
    prepared_supported = "max_prepared_statements" in config
    max_prepared = int(config.get("max_prepared_statements", "0") or 0)
    verdicts = []
    for service in fronted:
        if service not in served:
            reason = (
                f"PgBouncer {bouncer.label} has no pool of its role {service.role} (no client"
                " has connected through it yet, or it is behind another PgBouncer)"
            )
            verdicts.append(
                _skipped(
                    "pgbouncer_checks",
                    service.name,
                    f"{service.name} PgBouncer checks: {reason}; run poolwise doctor with the"
                    " --pgbouncer-dsn of its PgBouncer",
                    reason,
                    list(PGBOUNCER_CHECKS),
                )
            )
    for service in served:
        pools = pools_of.get(service.role, [])
        where = (
            ", ".join(f"{pool['database']}/{pool['user']}" for pool in pools)
            or f"no pool for role {service.role} yet, [pgbouncer] settings"
        )
        topology = service.worst.topology

        modes = sorted({str(pool["pool_mode"]) for pool in pools} or {config.get("pool_mode", "")})
        mode_differs = modes != [service.pool_mode]
        verdicts.append(
            Verdict(
                "pgbouncer_pool_mode",
                service.name,
                mode_differs,
                f"{service.name} PgBouncer pool_mode {', '.join(modes)} ({where}),"
                f" declared {service.pool_mode}"
                + ("; set pool_mode in pgbouncer.ini as declared" if mode_differs else ""),
                {"pool_mode": modes, "declared_pool_mode": service.pool_mode},
            )
        )

        # The driver against the mode PgBouncer really runs, not the declared one.
        breaks = []
        for mode in modes:
            live = topology._replace(pool_mode=mode)
            if mode == "transaction" and _prepares_server_side(service) and max_prepared == 0:
                breaks.append(
                    rule.driver_error(live)
                    or f"psycopg generated for pool_mode={service.pool_mode} prepares"
                    " statements on the server, and transaction mode hands the next"
                    " statement another server connection; regenerate for transaction mode"
                )
        prepared = (
            f"max_prepared_statements {max_prepared}"
            if prepared_supported
            else f"no max_prepared_statements ({bouncer.version} keeps no prepared statements)"
        )
        verdicts.append(
            Verdict(
                "pgbouncer_driver",
                service.name,
                bool(breaks),
                f"{service.name} driver {service.driver} behind pool_mode {', '.join(modes)},"
                f" {prepared}: " + ("; ".join(breaks) if breaks else "works"),
                {
                    "driver": service.driver,
                    "pool_mode": modes,
                    "max_prepared_statements": max_prepared if prepared_supported else None,
                },
            )
        )

        declared_pool = topology.pgbouncer_default_pool_size
        declared_reserve = topology.pgbouncer_reserve_pool_size
        if pools:
            sizes = sorted({bouncer.server_pool(pool) for pool in pools})
        else:
            sizes = [
                (int(config.get("default_pool_size", 0)), int(config.get("reserve_pool_size", 0)))
            ]
        size_differs = sizes != [(declared_pool, declared_reserve)]
        live_sizes = ", ".join(
            f"pool_size {size} + reserve_pool {reserve} = {size + reserve}"
            for size, reserve in sizes
        )
        verdicts.append(
            Verdict(
                "pgbouncer_pool_size",
                service.name,
                size_differs,
                f"{service.name} PgBouncer {live_sizes} server connections ({where}), declared"
                f" {declared_pool} default_pool_size + {declared_reserve} reserve_pool_size ="
                f" {declared_pool + declared_reserve}"
                + (
                    "; the budget counts the declared numbers: make pgbouncer.ini agree"
                    if size_differs
                    else ""
                ),
                {
                    "pools": [list(pair) for pair in sizes],
                    "declared_default_pool_size": declared_pool,
                    "declared_reserve_pool_size": declared_reserve,
                    "max_db_connections": int(config.get("max_db_connections", 0) or 0),
                    "max_user_connections": int(config.get("max_user_connections", 0) or 0),
                },
            )
        )

        waiting = sum(int(pool["cl_waiting"]) for pool in pools)
        max_wait = max(
            (int(pool["maxwait"]) + int(pool.get("maxwait_us", 0)) / 1e6 for pool in pools),
            default=0.0,
        )
        verdicts.append(
            Verdict(
                "pgbouncer_waiting_clients",
                service.name,
                waiting > 0,
                f"{service.name} PgBouncer: {_count(waiting, 'client')} waiting for a server"
                f" connection (longest {max_wait:.1f} s; {where})"
                + (
                    "; its server pool is too small for the load, or server connections are"
                    " held idle (session mode, idle in transaction)"
                    if waiting
                    else ""
                ),
                {"cl_waiting": waiting, "maxwait_seconds": max_wait},
            )
        )
    return verdicts


def examine(
    cluster: fleet.Cluster,
    server: ServerState,
    bouncer: PgBouncerState | None = None,
    idle_in_transaction_seconds: float = 30.0,
) -> list[Verdict]:
    """Every check of the live state against the declared cluster; findings have finding=True."""
    verdicts = [_settings_verdict(cluster, server)]
    verdicts += _connection_verdicts(cluster, server)
    verdicts.append(_idle_in_transaction_verdict(cluster, server, idle_in_transaction_seconds))
    verdicts += _role_verdicts(cluster, server)
    verdicts += _allocation_verdicts(cluster, server)
    if bouncer is not None:
        verdicts += _pgbouncer_verdicts(cluster, bouncer)
    else:
        for service in cluster.services:
            if service.pooler == "pgbouncer":
                reason = "no --pgbouncer-dsn"
                verdicts.append(
                    _skipped(
                        "pgbouncer_checks",
                        service.name,
                        f"{service.name} PgBouncer checks ({', '.join(PGBOUNCER_CHECKS)}):"
                        f" {reason}; pass the URL of its PgBouncer's admin console to run them",
                        reason,
                        list(PGBOUNCER_CHECKS),
                    )
                )
    for service in cluster.services:
        if service.pooler == "rds-proxy":
            reason = "poolwise doctor reads PostgreSQL and PgBouncer, not RDS Proxy"
            verdicts.append(
                _skipped(
                    "rds_proxy_checks",
                    service.name,
                    f"{service.name} RDS Proxy checks: {reason}; compare the proxy's"
                    " MaxConnectionsPercent with rds_proxy.max_connections_percent in"
                    f" {service.declared_in or 'db/topology.toml'}",
                    reason,
                    ["rds_proxy_max_connections_percent"],
                )
            )
    return verdicts


def other_clusters_skipped(found: list[fleet.Cluster], checked: fleet.Cluster) -> list[Verdict]:
    """The clusters of the paths that this run's DSN is not: none of their checks ran."""
    verdicts = []
    for cluster in found:
        if cluster.name != checked.name:
            names = ", ".join(service.name for service in cluster.services)
            reason = f"the DSN is cluster {checked.name}'s (--cluster {checked.name})"
            verdicts.append(
                _skipped(
                    "cluster_checks",
                    cluster.name,
                    f"cluster {cluster.name} ({names}): {reason}; run poolwise doctor with its"
                    f" DSN and --cluster {cluster.name}",
                    reason,
                    ["server_settings", "service_connections", "role_connection_limit"],
                )
            )
    return verdicts


# ----------------------------------------------------------------------------- the command


def choose_cluster(found: list[fleet.Cluster], name: str | None) -> fleet.Cluster:
    names = [cluster.name for cluster in found]
    if name is not None:
        for cluster in found:
            if cluster.name == name:
                return cluster
        raise services.InputError(f"--cluster {name}: the paths hold only {', '.join(names)}")
    if len(found) > 1:
        raise services.InputError(
            f"the paths hold the clusters {', '.join(names)}; the DSN is one of them:"
            " pass --cluster NAME"
        )
    return found[0]


def header(cluster: fleet.Cluster, server: ServerState, bouncer: PgBouncerState | None) -> str:
    text = (
        f"poolwise doctor: cluster {cluster.name} is PostgreSQL {server.version} at"
        f" {server.label}, {len(server.backends)} other client backends now"
    )
    if bouncer is not None:
        text += f"; {bouncer.version} at {bouncer.label}"
    return text


def run(args: Namespace) -> int:
    try:
        found = [services.load(root) for root in services.find(args.paths)]
        every_cluster = fleet.clusters(found)
        cluster = choose_cluster(every_cluster, getattr(args, "cluster", None))
        guardrail.check_roles(cluster.services)
    except services.InputError as error:
        print(f"poolwise doctor: {error}", file=sys.stderr)
        return UNREACHABLE
    roles = sorted({service.role for service in cluster.services})
    try:
        server = read_server(args.dsn, roles)
        bouncer = read_pgbouncer(args.pgbouncer_dsn) if args.pgbouncer_dsn else None
    except Unreachable as error:
        print(f"poolwise doctor: {error}", file=sys.stderr)
        return UNREACHABLE
    verdicts = examine(cluster, server, bouncer, args.idle_in_transaction_seconds)
    verdicts += other_clusters_skipped(every_cluster, cluster)
    findings = [verdict for verdict in verdicts if verdict.finding]
    skipped = [verdict for verdict in verdicts if verdict.skipped]
    if args.json:
        print(json.dumps([verdict.as_json() for verdict in verdicts], indent=2))
    else:
        print(header(cluster, server, bouncer))
        for verdict in verdicts:
            print(verdict.text())
        summary = _count(len(findings), "finding") if findings else "healthy: no findings"
        if skipped:
            summary += f" ({len(skipped)} skipped: see the skipped lines)"
        print(summary)
    return FINDINGS if findings else HEALTHY
