"""The database's own guardrail: each role capped at what the services that log in as it declare.

Every name here comes from a service's files, and the SQL built from it is run by a superuser:
identifiers and literals are composed by psycopg (`sql.Identifier`, `sql.Literal`), never
pasted, and a name that reaches a `--` comment is escaped to printable ASCII first, because a
newline there would end the comment and start a statement. A role name PostgreSQL cannot hold
(empty, a NUL, longer than 63 bytes, which it would silently truncate into another role's name)
is refused with the file and field that declare it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from psycopg import sql

from . import rule
from .services import InputError, Service

# NAMEDATALEN - 1: PostgreSQL truncates a longer identifier (with only a NOTICE).
MAX_IDENTIFIER_BYTES = 63
# The dollar-quote tag of a DO block's body; numbered when a name happens to contain it.
DOLLAR_TAG = "poolwise"


@dataclass(frozen=True)
class RoleCap:
    """One role on one cluster and the services that log in as it: its limit is their sum.

    A service counts with its allocation (db/database_limits.toml), or with its worst case
    when it has none.
    """

    role: str
    services: tuple[Service, ...]

    @property
    def limit(self) -> int:
        return sum(share(service) for service in self.services)

    @property
    def whose(self) -> str:
        """`orders-api 51 + nightly-report 3`, for lines that explain the sum (not for SQL)."""
        return " + ".join(f"{service.name} {share(service)}" for service in self.services)


def share(service: Service) -> int:
    """What the role may hold for this service: its allocation, else its worst case."""
    return service.limits.allocation or service.total


def role_caps(members: Iterable[Service]) -> list[RoleCap]:
    """One cap per role, by role name; services sharing a role share one limit, their sum."""
    by_role: dict[str, list[Service]] = {}
    for service in members:
        by_role.setdefault(service.role, []).append(service)
    return [
        RoleCap(role, tuple(sorted(grouped, key=lambda service: service.name)))
        for role, grouped in sorted(by_role.items())
    ]


def role_file(service: Service) -> Path:
    return service.root / "src" / service.package / "db" / "database_limits.toml"


def role_problem(role: str) -> str | None:
    """Why PostgreSQL cannot hold this role name, or None when it can."""
    if not role:
        return "is empty"
    if "\x00" in role:
        return "contains a NUL character, which PostgreSQL names cannot hold"
    size = len(role.encode())
    if size > MAX_IDENTIFIER_BYTES:
        return (
            f"is {size} bytes long: PostgreSQL truncates a name to {MAX_IDENTIFIER_BYTES} bytes,"
            " so it would cap another role"
        )
    return None


def check_roles(members: Iterable[Service]) -> None:
    """Refuse (InputError: file, field, rule, fix) a role name that PostgreSQL cannot hold."""
    for service in members:
        problem = role_problem(service.role)
        if problem is not None:
            raise InputError(
                f"{role_file(service)}: [database] role {service.role!r} (of {service.name!r})"
                f" {problem}; set role to the name the service logs in as"
            )


def comment(text: str) -> str:
    """Text safe inside a `--` comment: printable ASCII, everything else backslash-escaped.

    Only a newline or carriage return ends a comment for PostgreSQL and psql, but U+2028, U+0085
    and other control characters end a line for editors and terminals, so none of them is left.
    """
    return text.encode("unicode_escape").decode("ascii")


def alter_role(role: str, limit: int) -> str:
    return (
        sql.SQL("ALTER ROLE {} CONNECTION LIMIT {};")
        .format(sql.Identifier(role), sql.Literal(int(limit)))
        .as_string(None)
    )


def create_role(role: str, limit: int) -> str:
    return (
        sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT {};")
        .format(sql.Identifier(role), sql.Literal(int(limit)))
        .as_string(None)
    )


def create_or_alter_role(role: str, limit: int) -> str:
    """One idempotent statement: ALTER ROLE when the role exists, else CREATE ROLE ... LOGIN.

    `poolwise fleet --sql` runs without a server, so it cannot know which roles exist; a DO
    block decides on the server, in plain SQL (no psql `\\gexec`).
    """
    # psycopg writes a literal with a backslash as ` E'...'` (a leading space: it may follow
    # an identifier); the complete token is kept, only the space is dropped.
    name = sql.Literal(role).as_string(None).lstrip()
    body = "\n".join(
        [
            "",
            "BEGIN",
            f"  IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN",
            f"    {alter_role(role, limit)}",
            "  ELSE",
            f"    {create_role(role, limit)}",
            "  END IF;",
            "END",
            "",
        ]
    )
    # A dollar-quoted body ends at the first copy of its tag, quoted names or not.
    tag, number = f"${DOLLAR_TAG}$", 0
    while tag in body:
        number += 1
        tag = f"${DOLLAR_TAG}_{number}$"
    return f"DO {tag}{body}{tag};"


def _term(service: Service) -> str:
    """`orders-api 51 (app -> database)`, or `allocation 60 (worst case 51, ...)` with one."""
    hop = rule.database_check(service.worst.topology, service.limits).hop
    if service.limits.allocation:
        return (
            f"{comment(service.name)} allocation {service.limits.allocation}"
            f" (worst case {service.total}, {hop})"
        )
    return f"{comment(service.name)} {service.total} ({hop})"


def cluster_sql(name: str, members: list[Service]) -> str:
    """The guardrail of one cluster, to run on its primary as a superuser."""
    check_roles(members)
    lines = [
        f"-- poolwise fleet --sql: cluster {comment(name)}. Run it on that cluster's primary as a",
        "-- superuser: psql -v ON_ERROR_STOP=1. A missing role is created with LOGIN (give it a",
        "-- password); every role is capped at the allocations of the services that log in as it",
        "-- (a service without an allocation: its worst case), migrations included.",
    ]
    for cap in role_caps(members):
        hops = " + ".join(_term(service) for service in cap.services)
        total = f" = {cap.limit}, migrations" if len(cap.services) > 1 else ", migration"
        lines += [
            "",
            f"-- role {comment(cap.role)}: {hops}{total} included",
            create_or_alter_role(cap.role, cap.limit),
        ]
        for service in cap.services:
            if service.pooler == "pgbouncer":
                pool = service.worst.topology.pgbouncer_server_pool
                # The migration connects directly; PgBouncer may open the rest of the share.
                user_cap = service.limits.allocation - 1 if service.limits.allocation else pool
                lines.append(
                    f"-- {comment(service.name)} deploy/pgbouncer/pgbouncer.ini [pgbouncer]:"
                    f" max_db_connections = {pool}, max_user_connections = {user_cap}"
                )
    return "\n".join(lines)
