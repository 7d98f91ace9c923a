"""The connection budget rule: the most PostgreSQL connections a service can open at once.

Pure code: it reads no file and imports nothing of a service. Its inputs are the records below,
which poolwise.declared builds from a service's db/topology.toml and db/database_limits.toml
and poolwise.deployed from what deploy/ would apply. The template's copier validators mirror
this rule in Jinja (includes/budget.jinja, so `copier copy` needs no --trust) and the
template's tests prove the two agree (tests/test_budget_mirror.py).
"""

from __future__ import annotations

from typing import NamedTuple

# Alembic runs as one NullPool connection (the migration Job, or a one-off task) next to the app.
MIGRATION_CONNECTIONS = 1

TARGETS = ("k8s-sync", "k8s-async", "lambda", "batch")
POOLERS = ("none", "pgbouncer", "rds-proxy")
POOL_MODES = ("transaction", "session")
# A Job is one run; Forbid never overlaps two runs; Replace can while the old run's pods stop.
CONCURRENT_RUNS = {"": 1, "Forbid": 1, "Replace": 2}

# Command-line flags that set a worker count (uvicorn --workers, gunicorn -w), and shells whose
# `-c` string holds the real command line.
# The smallest value each number may take. SQLAlchemy reads pool_size 0 and max_overflow -1 as
# "no limit", so a smaller value is not a small pool but an unbounded one.
MINIMUMS = {
    "pool_size": 1,
    "max_overflow": 0,
    "pool_timeout": 1,
    "pool_recycle": 1,
    "statement_timeout": 1,
    "idle_in_transaction_timeout": 1,
    "workers_per_pod": 1,
    "replicas_max": 1,
    "max_surge": 0,
    "lambda_reserved_concurrency": 1,
    "batch_parallelism": 1,
    "batch_processes": 1,
    "batch_size": 1,
    "pgbouncer_default_pool_size": 1,
    "pgbouncer_reserve_pool_size": 0,
    "pgbouncer_max_client_conn": 1,
}


class OutOfRange(ValueError):
    """A number is below the smallest value the rule can reason about."""


def at_least_minimum(name: str, value: int, where: str) -> int:
    """Return value, or raise OutOfRange with one line naming where it was set."""
    minimum = MINIMUMS[name]
    if value < minimum:
        raise OutOfRange(
            f"{where}={value} -> {name} must be >= {minimum}"
            + (
                "; SQLAlchemy reads smaller values as an unbounded pool"
                if name in ("pool_size", "max_overflow")
                else ""
            )
        )
    return value


# The records below are NamedTuples: immutable, and `_replace` gives a changed copy (the tests
# swap one field of a declared topology).
class DatabaseLimits(NamedTuple):
    """What PostgreSQL can give this service; owned by the platform team.

    allocation is the service's share of the cluster, from the platform file (0: none). A
    service with one is checked against it alone; one without (generated before allocations)
    against what the cluster has left after other_consumers.
    """

    max_connections: int
    reserved_connections: int
    other_consumers: int
    allocation: int = 0

    @property
    def available(self) -> int:
        if self.allocation:
            return self.allocation
        return self.max_connections - self.reserved_connections - self.other_consumers

    def describe(self) -> str:
        if self.allocation:
            return f"allocation {self.allocation} (db/database_limits.toml)"
        return (
            f"{self.available} available (db_max_connections {self.max_connections}"
            f" - db_reserved_connections {self.reserved_connections}"
            f" - other_consumers {self.other_consumers})"
        )


class Workload(NamedTuple):
    """A group of identical processes that can be alive at once, each with its own pool.

    kind "k8s" is a Deployment's pods (replicas is the HPA's maxReplicas or spec.replicas, plus
    the pods a rollout adds: surge, and the old pods still terminating); "batch" is a CronJob's
    or Job's runs; "lambda" is a function's execution environments (replicas is its reserved
    concurrency).
    """

    kind: str
    name: str = ""
    replicas: int = 1
    max_surge: int = 0
    terminating: int = 0
    runs: int = 1
    processes_per_pod: int = 1
    null_pool: bool = False
    pool_size: int = 5
    max_overflow: int = 5

    @property
    def per_process(self) -> int:
        """Connections one process can hold: its whole pool, or one per session with NullPool."""
        return 1 if self.null_pool else self.pool_size + self.max_overflow

    def per_process_formula(self) -> str:
        if self.null_pool:
            return "1 (NullPool)"
        return f"({self.pool_size} pool_size + {self.max_overflow} max_overflow)"

    @property
    def processes(self) -> int:
        if self.kind == "lambda":
            return self.replicas
        if self.kind == "batch":
            return self.runs * self.replicas * self.processes_per_pod
        return (self.replicas + self.max_surge + self.terminating) * self.processes_per_pod

    def processes_formula(self) -> str:
        if self.kind == "lambda":
            return f"{self.replicas} lambda_reserved_concurrency"
        if self.kind == "batch":
            return (
                f"{self.runs} concurrent runs x {self.replicas} batch_parallelism"
                f" x {self.processes_per_pod} batch_processes"
            )
        return (
            f"({self.replicas} replicas_max + {self.max_surge} max_surge"
            f" + {self.terminating} terminating) x {self.processes_per_pod} workers_per_pod"
        )

    def knobs(self) -> str:
        if self.kind == "lambda":
            return "lambda_reserved_concurrency"
        if self.kind == "batch":
            return "batch_parallelism or batch_processes"
        return "replicas_max, max_surge or workers_per_pod"

    @property
    def total(self) -> int:
        return self.processes * self.per_process

    def formula(self) -> str:
        prefix = f"{self.name}: " if self.name else ""
        return f"{prefix}{self.processes_formula()} x {self.per_process_formula()} = {self.total}"


class Topology(NamedTuple):
    """Everything that multiplies into the worst case: the workloads and the path to PostgreSQL."""

    target: str
    workloads: tuple[Workload, ...]
    pooler: str = "none"
    pool_mode: str = "transaction"
    driver: str = "psycopg"
    pgbouncer_instances: int = 1
    pgbouncer_default_pool_size: int = 20
    pgbouncer_reserve_pool_size: int = 0
    pgbouncer_max_client_conn: int = 0
    # Server connections of the other databases pgbouncer.ini's [databases] lists: each database
    # has its own pool, and all of them reach the same PostgreSQL (poolwise.poolers).
    pgbouncer_other_pools: int = 0
    rds_proxy_max_connections_percent: int = 100

    @property
    def app_total(self) -> int:
        return sum(workload.total for workload in self.workloads)

    def app_formula(self) -> str:
        if len(self.workloads) == 1:
            return self.workloads[0].formula()
        terms = " + ".join(f"[{workload.formula()}]" for workload in self.workloads)
        return f"{terms} = {self.app_total}"

    @property
    def pgbouncer_server_pool(self) -> int:
        return self.pgbouncer_default_pool_size + self.pgbouncer_reserve_pool_size


class Check(NamedTuple):
    """One hop of the path to PostgreSQL: what can arrive, against what may arrive."""

    hop: str
    formula: str
    total: int
    limit: int
    limit_formula: str
    fix: str

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    def line(self) -> str:
        relation = "<=" if self.fits else ">"
        return f"{self.hop}: {self.formula} {relation} {self.limit_formula}"

    def message(self) -> str:
        """One line for a refusal: the formula with every factor, and what to change."""
        return f"connection budget exceeded, {self.line()}. Fix: {self.fix}"


def _app_fix(topology: Topology, room: int) -> str:
    if len(topology.workloads) != 1:
        return f"the workloads together must stay within {room}; shrink the largest"
    workload = topology.workloads[0]
    knobs = workload.knobs()
    if workload.null_pool:
        return f"at most {room} processes fit; lower {knobs}, or put a pooler in front"
    fitting = room // workload.processes
    if fitting >= 1:
        return (
            f"at {workload.processes} processes pool_size + max_overflow must be <= {fitting};"
            f" or lower {knobs}, or put a pooler in front"
        )
    return f"{workload.processes} processes cannot each get a connection; lower {knobs}"


def _pgbouncer_served_formula(topology: Topology) -> str:
    pool = (
        f"{topology.pgbouncer_default_pool_size} default_pool_size x 1 database x 1 user"
        f" + {topology.pgbouncer_reserve_pool_size} reserve_pool_size"
        + (
            f" + {topology.pgbouncer_other_pools} of the other [databases]"
            if topology.pgbouncer_other_pools
            else ""
        )
    )
    served = topology.pgbouncer_instances * (
        topology.pgbouncer_server_pool + topology.pgbouncer_other_pools
    )
    if topology.pgbouncer_instances == 1:
        return f"{pool} = {served}"
    return f"{topology.pgbouncer_instances} pgbouncer instances x ({pool}) = {served}"


def database_check(topology: Topology, limits: DatabaseLimits) -> Check:
    """The hop that reaches PostgreSQL itself, including the migration connection."""
    room = limits.available - MIGRATION_CONNECTIONS
    if topology.pooler == "pgbouncer":
        hop = "pgbouncer -> database"
        served = topology.pgbouncer_instances * (
            topology.pgbouncer_server_pool + topology.pgbouncer_other_pools
        )
        formula = _pgbouncer_served_formula(topology)
        fix = f"default_pool_size + reserve_pool_size must be <= {room}"
        if topology.pgbouncer_instances > 1:
            fix = f"run one PgBouncer instance, or {fix} across all instances"
    elif topology.pooler == "rds-proxy":
        hop = "rds-proxy -> database"
        percent = topology.rds_proxy_max_connections_percent
        served = percent * limits.max_connections // 100
        formula = (
            f"{percent}% MaxConnectionsPercent of {limits.max_connections} db_max_connections"
            f" = {served}"
        )
        fix = (
            "rds_proxy_max_connections_percent must be <="
            f" {max(room, 0) * 100 // limits.max_connections}"
        )
    else:
        hop = "app -> database"
        served = topology.app_total
        formula = topology.app_formula()
        fix = _app_fix(topology, room)
    total = served + MIGRATION_CONNECTIONS
    return Check(
        hop=hop,
        formula=f"{formula} + {MIGRATION_CONNECTIONS} migration = {total}",
        total=total,
        limit=limits.available,
        limit_formula=limits.describe(),
        fix=fix,
    )


def pgbouncer_checks(topology: Topology) -> list[Check]:
    """The client side of PgBouncer: connections it admits, and in session mode, serves."""
    hops = [
        Check(
            hop="app -> pgbouncer",
            formula=topology.app_formula(),
            total=topology.app_total,
            limit=topology.pgbouncer_max_client_conn,
            limit_formula=f"{topology.pgbouncer_max_client_conn} max_client_conn",
            fix=(
                f"raise PgBouncer max_client_conn to {topology.app_total},"
                " or lower the process counts or the pool"
            ),
        )
    ]
    if topology.pool_mode == "session":
        # In session mode a client keeps its server connection for as long as it stays
        # connected, and a pooled connection stays connected while idle: every client past the
        # server pool waits in PgBouncer until query_wait_timeout, even with no load at all.
        hops.append(
            Check(
                hop="app -> pgbouncer session pool",
                formula=topology.app_formula(),
                total=topology.app_total,
                limit=topology.pgbouncer_server_pool,
                limit_formula=(
                    f"{topology.pgbouncer_server_pool} server connections"
                    f" ({topology.pgbouncer_default_pool_size} default_pool_size"
                    f" + {topology.pgbouncer_reserve_pool_size} reserve_pool_size;"
                    " session mode pins one per client connection)"
                ),
                fix=(
                    f"default_pool_size + reserve_pool_size must be >= {topology.app_total},"
                    " or lower the process counts or the pool, or use pool_mode transaction"
                ),
            )
        )
    return hops


def checks(topology: Topology, limits: DatabaseLimits) -> list[Check]:
    """Every hop between the service and PostgreSQL, client side first."""
    hops = pgbouncer_checks(topology) if topology.pooler == "pgbouncer" else []
    hops.append(database_check(topology, limits))
    return hops


def failures(topology: Topology, limits: DatabaseLimits) -> list[Check]:
    return [check for check in checks(topology, limits) if not check.fits]


def first_failure(topology: Topology, limits: DatabaseLimits) -> Check | None:
    return next(iter(failures(topology, limits)), None)


def driver_error(topology: Topology) -> str:
    """A driver the pooler cannot serve, as one line; empty when the pairing works."""
    if (
        topology.pooler == "pgbouncer"
        and topology.pool_mode == "transaction"
        and topology.driver == "asyncpg"
    ):
        return (
            "asyncpg behind PgBouncer pool_mode=transaction -> asyncpg prepares statements on"
            " the server, and transaction mode hands the next statement another server"
            " connection (prepared statement does not exist); use the psycopg driver, or"
            " pool_mode = session"
        )
    if topology.pooler == "rds-proxy" and topology.driver == "asyncpg":
        return (
            "asyncpg behind RDS Proxy -> its prepared statements pin each client connection to"
            " its own database connection, so the proxy stops multiplexing and"
            " MaxConnectionsPercent no longer bounds the service; use the psycopg driver"
        )
    return ""


def render_table(topology: Topology, limits: DatabaseLimits) -> str:
    rows = [f"connection budget for a {topology.target} service (pooler: {topology.pooler})"]
    for check in checks(topology, limits):
        rows.append(f"  [{'ok' if check.fits else 'OVER'}] {check.line()}")
    return "\n".join(rows)
