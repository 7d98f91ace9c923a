"""A service's declared facts: db/topology.toml and db/database_limits.toml, as the rule's records.

Both files carry `schema = 1` at the top since 0.3.0. A file without it is read as 0.2.0 wrote
it (the same tables); services from 0.1.0 have no topology.toml and are declared from their
answers (poolwise.services). Any other schema is refused with the file, the version found and
the fix, never guessed at.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import Unreadable
from .rule import CONCURRENT_RUNS, POOLERS, TARGETS, DatabaseLimits, Topology, Workload

# The layout of both data files this release writes and reads; None is 0.2.0's (no key).
SCHEMA = 1
READABLE_SCHEMAS = (None, SCHEMA)


def read_data_file(path: Path, relative: str | None = None) -> dict[str, Any]:
    """One data file as a table, after checking its schema; Unreadable names what is wrong."""
    where = relative or str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise Unreadable(f"{where}: cannot be read ({error.strerror}); restore it") from None
    except tomllib.TOMLDecodeError as error:
        raise Unreadable(f"{where}: not valid TOML ({error}); fix the file") from None
    found = data.get("schema")
    if found not in READABLE_SCHEMAS:
        raise Unreadable(
            f"{where}: schema = {found!r} -> this poolwise reads schema {SCHEMA} and files"
            " without one (0.2.0); install the poolwise release the service pins in"
            " pyproject.toml, or fix the value"
        )
    return data


def _whole_number(table: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    """table[key] as a whole number >= 0, or Unreadable naming the file, the key and the fix."""
    if key not in table:
        if default is not None:
            return default
        raise Unreadable(
            f"{where}: database.{key} is missing -> the connection budget needs it; restore it"
            " (copy it from the platform's data file)"
        )
    value = table[key]
    # TOML keeps "100" a string and true a boolean: neither is a number of connections.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Unreadable(
            f"{where}: database.{key} = {value!r} -> it must be a whole number of connections"
            f" (>= 0), not {type(value).__name__}; write it without quotes"
        )
    return value


def load_limits(path: Path, relative: str | None = None) -> DatabaseLimits:
    """The platform team's database limits (a service's db/database_limits.toml)."""
    where = relative or str(path)
    data = read_data_file(path, relative).get("database")
    if not isinstance(data, dict):
        raise Unreadable(
            f"{where}: the [database] table is missing -> the connection budget needs it;"
            " restore the file from the platform's data file"
        )
    # A file with an allocation needs no other_consumers; one without (0.1.0, 0.2.0) needs it.
    allocation = _whole_number(data, "allocation", where, default=0)
    limits = DatabaseLimits(
        max_connections=_whole_number(data, "max_connections", where),
        reserved_connections=_whole_number(data, "reserved_connections", where),
        other_consumers=_whole_number(data, "other_consumers", where, 0 if allocation else None),
        allocation=allocation,
    )
    if limits.max_connections < 1:
        raise Unreadable(
            f"{where}: database.max_connections = {limits.max_connections} -> PostgreSQL needs at"
            " least 1; set the cluster's max_connections"
        )
    return limits


# What db/topology.toml must hold for the readers, and each value's type: a mistyped value
# (`pool_size = "2"`, `target = 3`) is refused here by name, never read as something else.
DECLARED_FIELDS: dict[str, dict[str, type]] = {
    "service": {"name": str, "target": str, "pooler": str, "driver": str, "container": str},
    "pool": {"null_pool": bool},
}
# Optional numbers: when present they are whole numbers (bool is not one).
DECLARED_NUMBERS = {
    "pool": ("pool_size", "max_overflow", "pool_timeout", "pool_recycle"),
    "timeouts": ("statement", "idle_in_transaction"),
    "processes": (
        "replicas_max",
        "max_surge",
        "workers_per_pod",
        "lambda_reserved_concurrency",
        "batch_parallelism",
        "batch_processes",
        "batch_size",
    ),
    "pgbouncer": ("default_pool_size", "reserve_pool_size", "max_client_conn"),
    "rds_proxy": ("max_connections_percent",),
}


def load_declared(path: Path, relative: str | None = None) -> dict[str, Any]:
    """A service's declared topology (its db/topology.toml), as data, its fields type-checked."""
    where = relative or str(path)
    data = read_data_file(path, relative)
    fix = "fix it, or answer again with `copier update`"
    for section, fields in DECLARED_FIELDS.items():
        table = data.get(section)
        if not isinstance(table, dict):
            raise Unreadable(f"{where}: the [{section}] table is missing -> {fix}")
        for key, kind in fields.items():
            if key not in table:
                raise Unreadable(f"{where}: {section}.{key} is missing -> {fix}")
            if not isinstance(table[key], kind):
                raise Unreadable(
                    f"{where}: {section}.{key} = {table[key]!r} -> it must be a"
                    f" {'true/false' if kind is bool else 'quoted string'}; {fix}"
                )
    service = data["service"]
    for key, allowed in (("target", TARGETS), ("pooler", POOLERS)):
        if service[key] not in allowed:
            raise Unreadable(
                f"{where}: service.{key} = {service[key]!r} -> one of {', '.join(allowed)}; {fix}"
            )
    for section, keys in DECLARED_NUMBERS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise Unreadable(f"{where}: [{section}] is not a table -> {fix}")
        for key in keys:
            value = table.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise Unreadable(
                    f"{where}: {section}.{key} = {value!r} -> it must be a whole number, written"
                    f" without quotes; {fix}"
                )
    if not data["pool"]["null_pool"]:
        for key in ("pool_size", "max_overflow"):
            if key not in data["pool"]:
                raise Unreadable(f"{where}: pool.{key} is missing -> {fix}")
    return data


def declared_workload(declared: dict[str, Any]) -> Workload:
    """The one workload the service was generated with, from topology.toml."""
    service, pool, processes = declared["service"], declared["pool"], declared["processes"]
    target = service["target"]
    common = {
        "null_pool": pool["null_pool"],
        "pool_size": pool.get("pool_size", 0),
        "max_overflow": pool.get("max_overflow", 0),
    }
    if target == "lambda":
        return Workload(kind="lambda", replicas=processes["lambda_reserved_concurrency"], **common)
    if target == "batch":
        return Workload(
            kind="batch",
            replicas=processes["batch_parallelism"],
            runs=CONCURRENT_RUNS[processes["batch_concurrency_policy"]],
            processes_per_pod=processes["batch_processes"],
            **common,
        )
    replicas, surge = processes["replicas_max"], processes["max_surge"]
    return Workload(
        kind="k8s",
        replicas=replicas,
        max_surge=surge,
        # The rendered Deployment waits minReadySeconds >= terminationGracePeriodSeconds, and
        # its maxUnavailable is 0 with a surge (else 1): one step's old pods still terminate.
        terminating=min(replicas, surge + (0 if surge > 0 else 1)),
        processes_per_pod=processes["workers_per_pod"],
        **common,
    )


def declared_topology(declared: dict[str, Any]) -> Topology:
    """The topology the service was generated for, before anything in deploy/ is read."""
    service = declared["service"]
    pgbouncer = declared.get("pgbouncer", {})
    return Topology(
        target=service["target"],
        workloads=(declared_workload(declared),),
        pooler=service["pooler"],
        pool_mode=pgbouncer.get("pool_mode", "transaction"),
        driver=service["driver"],
        pgbouncer_default_pool_size=pgbouncer.get("default_pool_size", 20),
        pgbouncer_reserve_pool_size=pgbouncer.get("reserve_pool_size", 0),
        pgbouncer_max_client_conn=pgbouncer.get("max_client_conn", 0),
        rds_proxy_max_connections_percent=declared.get("rds_proxy", {}).get(
            "max_connections_percent", 100
        ),
    )
