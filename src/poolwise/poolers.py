"""The poolers between a service and PostgreSQL: PgBouncer's ini, RDS Proxy's target group."""

from __future__ import annotations

import configparser
import re
from typing import Any

from . import rule
from .errors import Unreadable
from .manifests import cloudformation_load, integer
from .reading import Input, Project

PGBOUNCER_INI = "deploy/pgbouncer/pgbouncer.ini"
RDS_PROXY_TEMPLATE = "deploy/rds-proxy/template.yaml"
# PgBouncer's own defaults for what pgbouncer.ini leaves out.
PGBOUNCER_DEFAULTS = {
    "pool_mode": "session",
    "max_client_conn": "100",
    "default_pool_size": "20",
    "reserve_pool_size": "0",
    "max_db_connections": "0",
}


# A [databases] or [users] line is libpq-style key=value pairs; values may be single-quoted.
_PAIR = re.compile(r"([A-Za-z_]+)\s*=\s*('(?:[^']|'')*'|\S+)")
# The per-database and per-user settings that change how many server connections PgBouncer
# opens (https://www.pgbouncer.org/config.html, "Section [databases]" and "Section [users]").
# reserve_pool is the name PgBouncer documents for a database's reserve; reserve_pool_size is
# accepted too, as newer releases spell it.
DATABASE_NUMBERS = ("pool_size", "reserve_pool", "reserve_pool_size", "max_db_connections")
USER_NUMBERS = ("pool_size", "reserve_pool_size", "max_user_connections")


def _entry_numbers(
    parser: configparser.ConfigParser, section: str, names: tuple[str, ...], where: str
) -> dict[str, dict[str, Input]]:
    """Each entry of a [databases] or [users] section: its budget numbers, where each is set.

    Only these numbers are kept: the rest of a line (host, password, ...) is never echoed.
    """
    entries: dict[str, dict[str, Input]] = {}
    if not parser.has_section(section):
        return entries
    for key, line in parser.items(section):
        if key.startswith("%"):
            continue
        numbers = {}
        for name, raw in _PAIR.findall(line or ""):
            name = name.lower()
            if name in names:
                source = f"{where} [{section}] {key} {name}"
                numbers[name] = Input(name, integer(raw.strip("'"), source), source)
        entries[key] = numbers
    return entries


def pgbouncer_settings(
    text: str, where: str, inputs: list[Input], project: Project, findings: list[str]
) -> dict[str, Any]:
    """PgBouncer's numbers from pgbouncer.ini, with PgBouncer's defaults for what it leaves out.

    PgBouncer keeps one server pool per database and user. A user's pool_size overrides its
    database's, which overrides default_pool_size; a database's max_db_connections overrides
    the global one. The service's pool is counted at the largest size any of them allows (which
    user it logs in as is in a Secret), and every other database listed adds its own pool.
    """
    parser = configparser.ConfigParser(interpolation=None, allow_no_value=True, strict=False)
    try:
        parser.read_string(text)
    except configparser.Error as error:
        raise Unreadable(f"{where}: not a valid ini file ({error}); fix it") from None
    if not parser.has_section("pgbouncer"):
        raise Unreadable(f"{where}: the [pgbouncer] section is missing; restore it")
    section = parser["pgbouncer"]
    declared = project.declared.get("pgbouncer", {})

    def number(name: str) -> Input:
        source = f"{where} [pgbouncer] {name}"
        value = integer(section.get(name, PGBOUNCER_DEFAULTS[name]), source)
        return Input(f"pgbouncer_{name}", value, source, declared.get(name))

    mode_source = f"{where} [pgbouncer] pool_mode"
    pool_mode = str(section.get("pool_mode", PGBOUNCER_DEFAULTS["pool_mode"])).strip()
    if pool_mode not in rule.POOL_MODES:
        raise Unreadable(
            f"{mode_source}={pool_mode} -> the budget supports transaction and session mode;"
            " use one of them"
        )
    client, default, reserve = (
        number(name) for name in ("max_client_conn", "default_pool_size", "reserve_pool_size")
    )
    cap = number("max_db_connections")
    users = _entry_numbers(parser, "users", USER_NUMBERS, where)
    databases = _entry_numbers(parser, "databases", DATABASE_NUMBERS, where)
    if "*" in databases:
        findings.append(
            f"{where} [databases] * -> a fallback database gives every database name a client"
            " asks for its own server pool, so no budget holds; list the databases instead"
        )
        del databases["*"]
    # A user's numbers apply in every database: the largest of them is what one pool can reach.
    user_pool = max(
        (entry["pool_size"] for entry in users.values() if "pool_size" in entry),
        key=lambda item: item.value,
        default=None,
    )
    user_reserve = max(
        (entry["reserve_pool_size"] for entry in users.values() if "reserve_pool_size" in entry),
        key=lambda item: item.value,
        default=None,
    )

    def pool_of(entry: dict[str, Input]) -> tuple[Input, Input, Input]:
        """(pool_size, reserve, max_db_connections) one database's pool really runs with."""
        size = entry.get("pool_size", default)
        if user_pool is not None and user_pool.value > size.value:
            size = user_pool
        own_reserve = entry.get("reserve_pool", entry.get("reserve_pool_size", reserve))
        if user_reserve is not None and user_reserve.value > own_reserve.value:
            own_reserve = user_reserve
        return size, own_reserve, entry.get("max_db_connections", cap)

    # The database the service uses is in a Secret (%include) or one of the lines: without an
    # %include, the largest listed pool is counted as the service's, the rest as other pools.
    included = (
        any(key.startswith("%") for key in parser.options("databases"))
        if (parser.has_section("databases"))
        else False
    )
    pools = [pool_of(entry) for entry in databases.values()]
    if included or not pools:
        pools.append(pool_of({}))
    pools.sort(key=lambda pool: pool[0].value + pool[1].value, reverse=True)
    size, own_reserve, _ = pools[0]
    other_pools = sum(pool[0].value + pool[1].value for pool in pools[1:])
    numbers = [
        client,
        Input("pgbouncer_default_pool_size", size.value, size.source, default.declared),
        Input(
            "pgbouncer_reserve_pool_size", own_reserve.value, own_reserve.source, reserve.declared
        ),
    ]
    inputs += [
        Input("pgbouncer_pool_mode", pool_mode, mode_source, declared.get("pool_mode")),
        *numbers,
    ]
    if other_pools:
        inputs.append(
            Input(
                "pgbouncer_other_pools", other_pools, f"{where} [databases]: {len(pools) - 1} more"
            )
        )
    for item in numbers:
        try:
            rule.at_least_minimum(item.name, item.value, item.source)
        except rule.OutOfRange as refusal:
            findings.append(str(refusal))
    for pool_size, pool_reserve, pool_cap in pools:
        pooled = pool_size.value + pool_reserve.value
        if not 0 < pool_cap.value <= pooled:
            findings.append(
                f"{pool_cap.source}={pool_cap.value} -> it must be set and <= pool_size +"
                f" reserve_pool_size = {pooled}, so more users or databases on this PgBouncer"
                " cannot open more server connections than the budget counts"
            )
    values = {item.name: item.value for item in numbers}
    return {"pool_mode": pool_mode, **values, "pgbouncer_other_pools": other_pools}


# RDS Proxy's ConnectionBorrowTimeout when the template leaves it out, and the wait for a pooled
# connection of a process without a pool (NullPool): a connect that waits longer is refused.
DEFAULT_BORROW_SECONDS = 120
NULL_POOL_WAIT_SECONDS = 5


def rds_proxy(
    project: Project,
    relative: str,
    inputs: list[Input],
    findings: list[str],
    deadline: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """The proxy's share of max_connections; its borrow timeout must fail faster than the app.

    deadline is the tightest (seconds, where) a caller gives up on a request: a Lambda
    function's Timeout. A borrow that waits longer shows as killed invocations, not errors.
    """
    template = cloudformation_load(project.root / relative, relative)
    groups = [
        (name, resource)
        for name, resource in (template.get("Resources") or {}).items()
        if resource.get("Type") == "AWS::RDS::DBProxyTargetGroup"
    ]
    if not groups:
        raise Unreadable(
            f"{relative}: no AWS::RDS::DBProxyTargetGroup -> the budget needs the proxy's"
            " MaxConnectionsPercent; restore the target group"
        )
    total = 0
    for name, resource in groups:
        pool = (resource.get("Properties") or {}).get("ConnectionPoolConfigurationInfo") or {}
        source = (
            f"{relative}: Resources.{name}.Properties.ConnectionPoolConfigurationInfo"
            ".MaxConnectionsPercent"
        )
        # RDS Proxy's own default is 100: all of max_connections.
        percent = integer(pool.get("MaxConnectionsPercent", 100), source)
        declared = project.declared_value("rds_proxy", "max_connections_percent")
        inputs.append(Input("rds_proxy_max_connections_percent", percent, source, declared))
        total += percent
        borrow_source = source.replace("MaxConnectionsPercent", "ConnectionBorrowTimeout")
        borrow = integer(pool.get("ConnectionBorrowTimeout", DEFAULT_BORROW_SECONDS), borrow_source)
        wait = project.declared_value("pool", "pool_timeout") or NULL_POOL_WAIT_SECONDS
        if borrow > wait:
            findings.append(
                f"{borrow_source}={borrow} -> a client waits for the proxy longer than the app"
                f" waits for its own pool (pool_timeout {wait} s), so proxy saturation hangs"
                f" requests instead of failing them fast; set it to {wait}"
            )
        if deadline is not None and borrow >= deadline[0]:
            findings.append(
                f"{borrow_source}={borrow} -> not below {deadline[1]}={deadline[0]} s: a"
                " saturated proxy kills invocations instead of answering an error; lower it"
            )
    return {"rds_proxy_max_connections_percent": total}
