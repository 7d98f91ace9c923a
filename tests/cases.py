"""The answer sets the template supports and the ones it refuses, in one readable table.

Every supported set is rendered and its project's own checks are run; every refused set must
fail before anything is written, with the message fragment given here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Case:
    id: str
    answers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    id: str
    answers: dict[str, Any]
    question: str
    message: str


# target x pooler x driver (and pgbouncer pool_mode where it matters), each with the defaults of
# every other question: these are the services teams start from.
SUPPORTED = [
    Case("k8s-sync-direct", {"target": "k8s-sync"}),
    Case("k8s-sync-pgbouncer-tx", {"target": "k8s-sync", "pooler": "pgbouncer"}),
    Case(
        "k8s-sync-pgbouncer-session",
        {"target": "k8s-sync", "pooler": "pgbouncer", "pgbouncer_pool_mode": "session"},
    ),
    Case("k8s-sync-rds-proxy", {"target": "k8s-sync", "pooler": "rds-proxy"}),
    Case("k8s-async-psycopg-direct", {"target": "k8s-async"}),
    Case("k8s-async-asyncpg-direct", {"target": "k8s-async", "driver": "asyncpg"}),
    Case("k8s-async-psycopg-pgbouncer-tx", {"target": "k8s-async", "pooler": "pgbouncer"}),
    Case(
        "k8s-async-asyncpg-pgbouncer-session",
        {
            "target": "k8s-async",
            "pooler": "pgbouncer",
            "pgbouncer_pool_mode": "session",
            "driver": "asyncpg",
        },
    ),
    Case(
        "k8s-async-asyncpg-rds-proxy",
        {"target": "k8s-async", "pooler": "rds-proxy", "driver": "asyncpg"},
    ),
    Case("lambda-direct", {"target": "lambda"}),
    Case(
        "lambda-pgbouncer-tiny-pool",
        {"target": "lambda", "pooler": "pgbouncer", "null_pool": False},
    ),
    Case("lambda-rds-proxy", {"target": "lambda", "pooler": "rds-proxy"}),
    Case("batch-cronjob-direct", {"target": "batch"}),
    Case(
        "batch-job-two-processes-pgbouncer",
        {"target": "batch", "pooler": "pgbouncer", "batch_schedule": "", "batch_processes": 2},
    ),
    Case(
        "batch-replace-rds-proxy-tiny-pool",
        {
            "target": "batch",
            "pooler": "rds-proxy",
            "batch_concurrency_policy": "Replace",
            "null_pool": False,
        },
    ),
    Case(
        "k8s-sync-two-workers-custom-name",
        {
            "project_name": "Orders API",
            "target": "k8s-sync",
            "workers_per_pod": 2,
            "replicas_max": 2,
        },
    ),
]

# The pinned pair: 6 replicas + 1 pod terminating in a rollout (no surge, so maxUnavailable 1),
# x 2 workers x (10 + 10) = 280 > 200; with 5 + 5 it fits.
K8S_OVER = {
    "target": "k8s-sync",
    "replicas_max": 6,
    "max_surge": 0,
    "workers_per_pod": 2,
    "pool_size": 10,
    "max_overflow": 10,
    "db_max_connections": 200,
    "db_reserved_connections": 0,
    "other_consumers": 0,
}
K8S_FITS = {**K8S_OVER, "pool_size": 5, "max_overflow": 5}

REFUSED = [
    Refusal(
        "k8s-280-connections",
        K8S_OVER,
        "other_consumers",
        "(6 replicas_max + 0 max_surge + 1 terminating) x 2 workers_per_pod"
        " x (10 pool_size + 10 max_overflow) = 280 + 1 migration = 281 > 200 available"
        " (db_max_connections 200",
    ),
    Refusal(
        "lambda-reserved-concurrency-past-budget",
        {"target": "lambda", "lambda_reserved_concurrency": 200},
        "other_consumers",
        "200 lambda_reserved_concurrency x 1 (NullPool) = 200 + 1 migration = 201 > 97 available",
    ),
    Refusal(
        "batch-parallelism-past-budget",
        {
            "target": "batch",
            "batch_parallelism": 50,
            "batch_processes": 2,
            "batch_concurrency_policy": "Replace",
        },
        "other_consumers",
        "2 concurrent runs x 50 batch_parallelism x 2 batch_processes x 1 (NullPool) = 200",
    ),
    Refusal(
        "pgbouncer-server-pool-past-budget",
        {"pooler": "pgbouncer", "pgbouncer_default_pool_size": 120},
        "other_consumers",
        "pgbouncer -> database: 120 default_pool_size x 1 database x 1 user",
    ),
    Refusal(
        "rds-proxy-percent-past-budget",
        {"pooler": "rds-proxy", "rds_proxy_max_connections_percent": 100},
        "other_consumers",
        "100% MaxConnectionsPercent of 100 db_max_connections = 100 + 1 migration = 101 > 97",
    ),
    Refusal(
        "reserved-plus-others-leave-nothing",
        {"db_max_connections": 50, "db_reserved_connections": 10, "other_consumers": 40},
        "other_consumers",
        "db_reserved_connections=10 + other_consumers=40 = 50 leaves nothing of"
        " db_max_connections=50",
    ),
    Refusal(
        "zero-replicas",
        {"replicas_max": 0},
        "replicas_max",
        "replicas_max=0 is not allowed: it must be an integer >= 1",
    ),
    Refusal(
        "negative-surge",
        {"max_surge": -1},
        "max_surge",
        "max_surge=-1 is not allowed: it must be an integer >= 0",
    ),
    Refusal(
        "zero-workers",
        {"workers_per_pod": 0},
        "workers_per_pod",
        "workers_per_pod=0 is not allowed",
    ),
    Refusal(
        "zero-pool-size",
        {"pool_size": 0},
        "pool_size",
        "pool_size=0 is not allowed: it must be an integer >= 1",
    ),
    Refusal(
        "negative-overflow", {"max_overflow": -5}, "max_overflow", "max_overflow=-5 is not allowed"
    ),
    Refusal(
        "zero-pool-timeout", {"pool_timeout": 0}, "pool_timeout", "pool_timeout=0 is not allowed"
    ),
    Refusal(
        "negative-pool-timeout",
        {"pool_timeout": -1},
        "pool_timeout",
        "pool_timeout=-1 is not allowed",
    ),
    Refusal("zero-recycle", {"pool_recycle": 0}, "pool_recycle", "pool_recycle=0 is not allowed"),
    Refusal(
        "zero-reserved-concurrency",
        {"target": "lambda", "lambda_reserved_concurrency": 0},
        "lambda_reserved_concurrency",
        "lambda_reserved_concurrency=0 is not allowed",
    ),
    Refusal(
        "zero-parallelism",
        {"target": "batch", "batch_parallelism": 0},
        "batch_parallelism",
        "batch_parallelism=0 is not allowed",
    ),
    Refusal(
        "zero-processes",
        {"target": "batch", "batch_processes": 0},
        "batch_processes",
        "batch_processes=0 is not allowed",
    ),
    Refusal(
        "bad-cron",
        {"target": "batch", "batch_schedule": "every hour"},
        "batch_schedule",
        'batch_schedule="every hour" is not allowed',
    ),
    Refusal(
        "zero-max-connections",
        {"db_max_connections": 0},
        "db_max_connections",
        "db_max_connections=0 is not allowed",
    ),
    Refusal(
        "negative-others",
        {"other_consumers": -1},
        "other_consumers",
        "other_consumers=-1 is not allowed",
    ),
    Refusal(
        "proxy-percent-over-100",
        {"pooler": "rds-proxy", "rds_proxy_max_connections_percent": 120},
        "rds_proxy_max_connections_percent",
        "rds_proxy_max_connections_percent=120 is not allowed: it must be between 1 and 100",
    ),
    Refusal(
        "package-name-not-identifier",
        {"package_name": "orders-api"},
        "package_name",
        'package_name="orders-api" is not allowed: it must be a lowercase Python identifier',
    ),
    Refusal(
        "package-name-starts-with-digit",
        {"package_name": "1orders"},
        "package_name",
        'package_name="1orders" is not allowed',
    ),
    Refusal(
        "package-name-shadows-stdlib",
        {"package_name": "logging"},
        "package_name",
        "it shadows the standard library module 'logging'",
    ),
    Refusal(
        "package-name-shadows-dependency",
        {"package_name": "sqlalchemy"},
        "package_name",
        "it shadows the dependency or project folder 'sqlalchemy'",
    ),
    Refusal(
        "package-name-keyword", {"package_name": "lambda"}, "package_name", "it is a Python keyword"
    ),
    Refusal(
        "project-name-too-long-for-kubernetes",
        {"project_name": "a" * 41},
        "project_name",
        "has 41 characters and must have at most 40",
    ),
    Refusal(
        "project-name-empty", {"project_name": ""}, "project_name", 'project_name="" is not allowed'
    ),
    Refusal(
        "asyncpg-behind-pgbouncer-transaction",
        {
            "target": "k8s-async",
            "driver": "asyncpg",
            "pooler": "pgbouncer",
            "pgbouncer_pool_mode": "transaction",
        },
        "driver",
        "driver=asyncpg is not allowed behind PgBouncer transaction mode",
    ),
    Refusal(
        "cluster-name-with-spaces",
        {"db_cluster": "Orders DB"},
        "db_cluster",
        'db_cluster="Orders DB" is not allowed: it must be a lowercase name',
    ),
    Refusal(
        "external-consumers-not-a-mapping",
        {"db_external_consumers": [5, 10]},
        "db_external_consumers",
        "db_external_consumers=[5, 10] is not allowed: it must be a mapping of client name",
    ),
    Refusal(
        "external-consumer-negative",
        {"db_external_consumers": {"metabase": -1}},
        "db_external_consumers",
        'db_external_consumers["metabase"]=-1 is not allowed: it must be a whole number',
    ),
    Refusal(
        "other-consumers-below-the-external-ones",
        {"db_external_consumers": {"datadog-agent": 5, "metabase": 10}, "other_consumers": 5},
        "other_consumers",
        "other_consumers=5 is not allowed: it must include the 15 connections of"
        " db_external_consumers (datadog-agent 5, metabase 10)",
    ),
    Refusal("unknown-target", {"target": "ecs"}, "target", "ecs"),
    Refusal("unknown-pooler", {"pooler": "pgpool"}, "pooler", "pgpool"),
]
