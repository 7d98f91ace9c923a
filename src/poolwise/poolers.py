"""The poolers between a service and PostgreSQL: PgBouncer's ini, RDS Proxy's target group."""

from __future__ import annotations

import configparser
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


def pgbouncer_settings(
    text: str, where: str, inputs: list[Input], project: Project, findings: list[str]
) -> dict[str, Any]:
    """PgBouncer's numbers from pgbouncer.ini, with PgBouncer's defaults for what it leaves out."""
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
    numbers = [
        number(name) for name in ("max_client_conn", "default_pool_size", "reserve_pool_size")
    ]
    cap = number("max_db_connections")
    inputs += [
        Input("pgbouncer_pool_mode", pool_mode, mode_source, declared.get("pool_mode")),
        *numbers,
    ]
    values = {item.name: item.value for item in numbers}
    for item in numbers:
        try:
            rule.at_least_minimum(item.name, item.value, item.source)
        except rule.OutOfRange as refusal:
            findings.append(str(refusal))
    pooled = values["pgbouncer_default_pool_size"] + values["pgbouncer_reserve_pool_size"]
    if not 0 < cap.value <= pooled:
        findings.append(
            f"{cap.source}={cap.value} -> it must be set and <= default_pool_size +"
            f" reserve_pool_size = {pooled}, so more users or databases on this PgBouncer cannot"
            " open more server connections than the budget counts"
        )
    return {"pool_mode": pool_mode, **values}


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
