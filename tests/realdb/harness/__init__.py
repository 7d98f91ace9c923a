"""Real PostgreSQL + PgBouncer processes for the ``realdb`` test tier (no mocks).

Every server is a throw-away instance: a fresh temporary directory, ``127.0.0.1`` only,
free ports picked at runtime, no Unix-domain sockets, and everything removed on stop.
One module per concern: ``processes`` finds the binaries and runs them (as the service user
when we are root), ``postgres`` is a cluster, ``pgbouncer`` a pooler in front of one (its
docstring has what was learnt about PgBouncer 1.18), ``sampling`` watches pg_stat_activity,
``secretsmanager`` serves the Lambda target's database secret (moto's server), ``prometheus``
scrapes running services and evaluates their alert rules (imported as ``harness.prometheus``).
"""

# One port picker for every server the tests start (tests/ports.py), below the ephemeral range.
from ports import free_port, free_ports

from .pgbouncer import PgBouncer, PoolMode
from .postgres import PostgresCluster
from .processes import (
    ADMIN_APP_NAME,
    BOUNCER_PROBE_APP_NAME,
    HOST,
    SAMPLER_APP_NAME,
    child_pids,
    find_pg_bin,
    find_pgbouncer,
    missing_requirements,
    pid_alive,
)
from .sampling import ActivitySampler
from .secretsmanager import SecretsManagerServer

__all__ = [
    "ADMIN_APP_NAME",
    "BOUNCER_PROBE_APP_NAME",
    "HOST",
    "SAMPLER_APP_NAME",
    "ActivitySampler",
    "PgBouncer",
    "PoolMode",
    "PostgresCluster",
    "SecretsManagerServer",
    "child_pids",
    "find_pg_bin",
    "find_pgbouncer",
    "free_port",
    "free_ports",
    "missing_requirements",
    "pid_alive",
]
