"""The connection budget: the most PostgreSQL connections this deployment can open at once.

This module is the one implementation of the rule. The template's copier validators mirror it
in Jinja (so `copier copy` needs no --trust) and the template's tests prove the two agree; the
generated tests/test_connection_budget.py feeds it the numbers read from deploy/.

Run ``python -m <package>.db.budget`` for the table; it exits 1 when the budget does not fit.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

# Alembic runs as one NullPool connection (the migration Job, or a one-off task) next to the app.
MIGRATION_CONNECTIONS = 1

TARGETS = ("k8s-sync", "k8s-async", "lambda", "batch")
POOLERS = ("none", "pgbouncer", "rds-proxy")
# Forbid never overlaps two runs; Replace can while the old run's pods terminate.
CONCURRENT_RUNS = {"": 1, "Forbid": 1, "Replace": 2}


@dataclass(frozen=True)
class DatabaseLimits:
    """What PostgreSQL can give this service; owned by the platform team."""

    max_connections: int
    reserved_connections: int
    other_consumers: int

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved_connections - self.other_consumers

    def describe(self) -> str:
        return (
            f"{self.available} available (db_max_connections {self.max_connections}"
            f" - db_reserved_connections {self.reserved_connections}"
            f" - other_consumers {self.other_consumers})"
        )


@dataclass(frozen=True)
class Deployment:
    """Every number that multiplies into the worst case; fields unused by a target stay default."""

    target: str
    pooler: str = "none"
    replicas_max: int = 1
    max_surge: int = 0
    workers_per_pod: int = 1
    null_pool: bool = False
    pool_size: int = 5
    max_overflow: int = 5
    lambda_reserved_concurrency: int = 1
    batch_parallelism: int = 1
    batch_processes: int = 1
    batch_concurrency_policy: str = ""
    pgbouncer_default_pool_size: int = 20
    pgbouncer_reserve_pool_size: int = 0
    pgbouncer_max_client_conn: int = 0
    rds_proxy_max_connections_percent: int = 100

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
        """Processes that can be alive at the same moment, each with its own pool."""
        if self.target == "lambda":
            return self.lambda_reserved_concurrency
        if self.target == "batch":
            return (
                CONCURRENT_RUNS[self.batch_concurrency_policy]
                * self.batch_parallelism
                * self.batch_processes
            )
        return (self.replicas_max + self.max_surge) * self.workers_per_pod

    def processes_formula(self) -> str:
        if self.target == "lambda":
            return f"{self.lambda_reserved_concurrency} lambda_reserved_concurrency"
        if self.target == "batch":
            runs = CONCURRENT_RUNS[self.batch_concurrency_policy]
            return (
                f"{runs} concurrent runs x {self.batch_parallelism} batch_parallelism"
                f" x {self.batch_processes} batch_processes"
            )
        return (
            f"({self.replicas_max} replicas_max + {self.max_surge} max_surge)"
            f" x {self.workers_per_pod} workers_per_pod"
        )

    def process_knobs(self) -> str:
        if self.target == "lambda":
            return "lambda_reserved_concurrency"
        if self.target == "batch":
            return "batch_parallelism or batch_processes"
        return "replicas_max, max_surge or workers_per_pod"

    @property
    def app_total(self) -> int:
        return self.processes * self.per_process

    def app_formula(self) -> str:
        return f"{self.processes_formula()} x {self.per_process_formula()} = {self.app_total}"


@dataclass(frozen=True)
class Check:
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


def _app_fix(deployment: Deployment, room: int) -> str:
    knobs = deployment.process_knobs()
    if deployment.null_pool:
        return f"at most {room} processes fit; lower {knobs}, or put a pooler in front"
    fitting = room // deployment.processes
    if fitting >= 1:
        return (
            f"at {deployment.processes} processes pool_size + max_overflow must be <= {fitting};"
            f" or lower {knobs}, or put a pooler in front"
        )
    return f"{deployment.processes} processes cannot each get a connection; lower {knobs}"


def database_check(deployment: Deployment, limits: DatabaseLimits) -> Check:
    """The hop that reaches PostgreSQL itself, including the migration connection."""
    room = limits.available - MIGRATION_CONNECTIONS
    if deployment.pooler == "pgbouncer":
        hop = "pgbouncer -> database"
        served = deployment.pgbouncer_default_pool_size + deployment.pgbouncer_reserve_pool_size
        formula = (
            f"{deployment.pgbouncer_default_pool_size} default_pool_size x 1 database x 1 user"
            f" + {deployment.pgbouncer_reserve_pool_size} reserve_pool_size = {served}"
        )
        fix = f"default_pool_size + reserve_pool_size must be <= {room}"
    elif deployment.pooler == "rds-proxy":
        hop = "rds-proxy -> database"
        percent = deployment.rds_proxy_max_connections_percent
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
        served = deployment.app_total
        formula = deployment.app_formula()
        fix = _app_fix(deployment, room)
    total = served + MIGRATION_CONNECTIONS
    return Check(
        hop=hop,
        formula=f"{formula} + {MIGRATION_CONNECTIONS} migration = {total}",
        total=total,
        limit=limits.available,
        limit_formula=limits.describe(),
        fix=fix,
    )


def checks(deployment: Deployment, limits: DatabaseLimits) -> list[Check]:
    """Every hop between the service and PostgreSQL, client side first."""
    hops = []
    if deployment.pooler == "pgbouncer":
        hops.append(
            Check(
                hop="app -> pgbouncer",
                formula=deployment.app_formula(),
                total=deployment.app_total,
                limit=deployment.pgbouncer_max_client_conn,
                limit_formula=f"{deployment.pgbouncer_max_client_conn} max_client_conn",
                fix=(
                    f"raise PgBouncer max_client_conn to {deployment.app_total},"
                    " or lower the process counts or the pool"
                ),
            )
        )
    hops.append(database_check(deployment, limits))
    return hops


def first_failure(deployment: Deployment, limits: DatabaseLimits) -> Check | None:
    return next((check for check in checks(deployment, limits) if not check.fits), None)


def load_limits(path: Path | None = None) -> DatabaseLimits:
    """Read the platform team's database limits (database_limits.toml beside this module)."""
    if path is None:
        text = resources.files(__package__).joinpath("database_limits.toml").read_text()
    else:
        text = path.read_text()
    data = tomllib.loads(text)["database"]
    return DatabaseLimits(
        max_connections=data["max_connections"],
        reserved_connections=data["reserved_connections"],
        other_consumers=data["other_consumers"],
    )


def render_table(deployment: Deployment, limits: DatabaseLimits) -> str:
    rows = [f"connection budget for a {deployment.target} deployment (pooler: {deployment.pooler})"]
    for check in checks(deployment, limits):
        rows.append(f"  [{'ok' if check.fits else 'OVER'}] {check.line()}")
    return "\n".join(rows)


def main() -> int:
    from .topology import RENDERED_DEPLOYMENT

    limits = load_limits()
    print(render_table(RENDERED_DEPLOYMENT, limits))
    failure = first_failure(RENDERED_DEPLOYMENT, limits)
    if failure is not None:
        print(failure.message(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
