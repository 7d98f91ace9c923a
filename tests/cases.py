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
    Case("k8s-async-psycopg-rds-proxy", {"target": "k8s-async", "pooler": "rds-proxy"}),
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
    # maxSurge as Kubernetes takes it: 30% of 4 replicas is 2 pods (rounded up).
    Case(
        "k8s-sync-surge-percentage", {"target": "k8s-sync", "replicas_max": 4, "max_surge": "30%"}
    ),
    Case(
        "batch-cron-with-names-and-steps",
        {"target": "batch", "batch_schedule": "*/10 6-22/2 * JAN-MAR,DEC MON-FRI"},
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
    # The budget is checked whole at the last question that changes it (with --defaults and
    # --data; at a prompt, each such question checks it as far as it is known).
    Refusal(
        "k8s-280-connections",
        K8S_OVER,
        "max_overflow",
        "(6 replicas_max + 0 max_surge + 1 terminating) x 2 workers_per_pod"
        " x (10 pool_size + 10 max_overflow) = 280 + 1 migration = 281 > 200 available"
        " (db_max_connections 200",
    ),
    Refusal(
        "lambda-reserved-concurrency-past-budget",
        {"target": "lambda", "lambda_reserved_concurrency": 200},
        "null_pool",
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
        "null_pool",
        "2 concurrent runs x 50 batch_parallelism x 2 batch_processes x 1 (NullPool) = 200",
    ),
    Refusal(
        "pgbouncer-server-pool-past-budget",
        {"pooler": "pgbouncer", "pgbouncer_default_pool_size": 120},
        "pgbouncer_default_pool_size",
        "pgbouncer -> database: 120 default_pool_size x 1 database x 1 user",
    ),
    Refusal(
        "rds-proxy-percent-past-budget",
        {"pooler": "rds-proxy", "rds_proxy_max_connections_percent": 100},
        "rds_proxy_max_connections_percent",
        "100% MaxConnectionsPercent of 100 db_max_connections = 100 + 1 migration = 101 > 97",
    ),
    Refusal(
        "reserved-plus-others-leave-nothing",
        {"db_max_connections": 50, "db_reserved_connections": 10, "other_consumers": 40},
        "other_consumers",
        "db_reserved_connections=10 + other_consumers=40 = 50 leaves nothing of"
        " db_max_connections=50: at least 2 must be left",
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
        "max_surge=-1 is not allowed: it must be a pod count (0 for no surge) or a percentage",
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
        "it shadows 'sqlalchemy', which the generated project installs",
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
    Refusal(
        "asyncpg-behind-rds-proxy",
        {"target": "k8s-async", "driver": "asyncpg", "pooler": "rds-proxy"},
        "driver",
        "driver=asyncpg is not allowed behind RDS Proxy: its prepared statements pin each client"
        " connection",
    ),
    Refusal("unknown-target", {"target": "ecs"}, "target", "ecs"),
    Refusal("unknown-pooler", {"pooler": "pgpool"}, "pooler", "pgpool"),
    # --- issue 10: every bad answer refused in one line naming question, value and rule.
    Refusal(
        "every-broken-hop-at-once",
        {
            "pooler": "pgbouncer",
            "pgbouncer_pool_mode": "session",
            "pool_size": 10,
            "max_overflow": 10,
            "pgbouncer_default_pool_size": 60,
            "db_max_connections": 50,
            "db_reserved_connections": 0,
        },
        "pgbouncer_default_pool_size",
        "connection budget exceeded, app -> pgbouncer session pool: (3 replicas_max + 1 max_surge"
        " + 1 terminating) x 1 workers_per_pod x (10 pool_size + 10 max_overflow) = 100 > 60"
        " server connections",
    ),
    Refusal(
        "every-broken-hop-at-once-second-hop",
        {
            "pooler": "pgbouncer",
            "pgbouncer_pool_mode": "session",
            "pool_size": 10,
            "max_overflow": 10,
            "pgbouncer_default_pool_size": 60,
            "db_max_connections": 50,
            "db_reserved_connections": 0,
        },
        "pgbouncer_default_pool_size",
        "; also exceeded, pgbouncer -> database: 60 default_pool_size x 1 database x 1 user"
        " + 0 reserve_pool_size = 60 + 1 migration = 61 > 50 available",
    ),
    # Names: `$` would match before a trailing newline (a data file's "orders-api\n").
    Refusal(
        "project-name-trailing-newline",
        {"project_name": "orders-api\n"},
        "project_name",
        'project_name="orders-api\\n" is not allowed: it must start with a letter',
    ),
    Refusal(
        "package-name-trailing-newline",
        {"package_name": "orders_api\n"},
        "package_name",
        'package_name="orders_api\\n" is not allowed: it must be a lowercase Python identifier',
    ),
    Refusal(
        "cluster-name-trailing-newline",
        {"db_cluster": "orders-db\n"},
        "db_cluster",
        'db_cluster="orders-db\\n" is not allowed',
    ),
    # Names of modules the generated project installs, however deep in its dependencies.
    Refusal(
        "package-name-shadows-a-transitive-dependency",
        {"package_name": "click"},
        "package_name",
        "package_name=\"click\" is not allowed: it shadows 'click', which the generated project"
        " installs",
    ),
    Refusal(
        "package-name-shadows-mako",
        {"package_name": "mako"},
        "package_name",
        "it shadows 'mako', which the generated project installs",
    ),
    Refusal(
        "package-name-shadows-lambda-runtime",
        {"package_name": "simplejson"},
        "package_name",
        "it shadows 'simplejson', which the generated project installs",
    ),
    Refusal(
        "package-name-conftest",
        {"package_name": "conftest"},
        "package_name",
        'package_name="conftest" is not allowed: it shadows the generated project\'s own'
        " 'conftest'",
    ),
    # Cron fields as Kubernetes (robfig/cron) reads them.
    Refusal(
        "cron-every-field-out-of-range",
        {"target": "batch", "batch_schedule": "99 99 99 99 99"},
        "batch_schedule",
        'batch_schedule="99 99 99 99 99" is not allowed: its minute field "99" is outside 0-59',
    ),
    Refusal(
        "cron-hour-24",
        {"target": "batch", "batch_schedule": "0 24 * * *"},
        "batch_schedule",
        'its hour field "24" is outside 0-23',
    ),
    Refusal(
        "cron-day-of-month-0",
        {"target": "batch", "batch_schedule": "0 0 0 * *"},
        "batch_schedule",
        'its day of month field "0" is outside 1-31',
    ),
    Refusal(
        "cron-month-13-in-a-list",
        {"target": "batch", "batch_schedule": "0 0 1 1,13 *"},
        "batch_schedule",
        'its month field "1,13" is outside 1-12',
    ),
    Refusal(
        "cron-day-of-week-7",
        {"target": "batch", "batch_schedule": "0 0 * * 7"},
        "batch_schedule",
        'its day of week field "7" is outside 0-6',
    ),
    Refusal(
        "cron-step-0",
        {"target": "batch", "batch_schedule": "*/0 * * * *"},
        "batch_schedule",
        'its minute field "*/0" has step "0", which must be a whole number >= 1',
    ),
    Refusal(
        "cron-backwards-range",
        {"target": "batch", "batch_schedule": "30-10 * * * *"},
        "batch_schedule",
        'its minute field "30-10" is a range that runs backwards',
    ),
    Refusal(
        "cron-unknown-name",
        {"target": "batch", "batch_schedule": "0 0 * * MONDAY"},
        "batch_schedule",
        'its day of week field "MONDAY" must be *, a number, a range a-b or a list of them',
    ),
    Refusal(
        "cron-four-fields",
        {"target": "batch", "batch_schedule": "* * * *"},
        "batch_schedule",
        'batch_schedule="* * * *" is not allowed: it must be five cron fields',
    ),
    # Upper bounds PostgreSQL and AWS have.
    Refusal(
        "max-connections-past-postgresql-limit",
        {"db_max_connections": 262144},
        "db_max_connections",
        "db_max_connections=262144 is not allowed: it must be between 2 and 262143",
    ),
    Refusal(
        "reserved-leaves-less-than-2",
        {"db_max_connections": 10, "db_reserved_connections": 9},
        "db_reserved_connections",
        "db_reserved_connections=9 is not allowed: it leaves 1 of db_max_connections=10, and at"
        " least 2 must be left",
    ),
    Refusal(
        "external-consumers-leave-less-than-2",
        {"db_max_connections": 20, "db_external_consumers": {"metabase": 16}},
        "db_external_consumers",
        "its 16 connections and db_reserved_connections=3 leave 1 of db_max_connections=20",
    ),
    Refusal(
        "lambda-reserved-past-account-limit",
        {"target": "lambda", "lambda_reserved_concurrency": 950, "db_max_connections": 2000},
        "lambda_reserved_concurrency",
        "lambda_reserved_concurrency=950 is not allowed: AWS keeps 100 of the account's 1000"
        " concurrent executions (lambda_account_concurrency) unreserved, so at most 900 can be"
        " reserved",
    ),
    Refusal(
        "lambda-account-limit-too-small-to-reserve",
        {"target": "lambda", "lambda_account_concurrency": 100},
        "lambda_account_concurrency",
        "lambda_account_concurrency=100 is not allowed: it must be an integer >= 101",
    ),
    Refusal(
        "proxy-percent-zero",
        {"pooler": "rds-proxy", "rds_proxy_max_connections_percent": 0},
        "rds_proxy_max_connections_percent",
        "rds_proxy_max_connections_percent=0 is not allowed: it must be between 1 and 100",
    ),
    # Whole numbers and booleans, refused by name (copier's own cast would say
    # "invalid literal for int()", truncate 5.7 to 5, or read "maybe" as true).
    Refusal(
        "pool-size-not-a-number",
        {"pool_size": "abc"},
        "pool_size",
        'pool_size="abc" is not allowed: it must be a whole number >= 1',
    ),
    Refusal(
        "pool-size-a-word",
        {"pool_size": "ten"},
        "pool_size",
        'pool_size="ten" is not allowed: it must be a whole number >= 1',
    ),
    Refusal(
        "pool-size-a-fraction",
        {"pool_size": 5.7},
        "pool_size",
        "pool_size=5.7 is not allowed: it must be a whole number >= 1",
    ),
    Refusal(
        "pool-size-a-fraction-as-text",
        {"pool_size": "5.7"},
        "pool_size",
        'pool_size="5.7" is not allowed: it must be a whole number >= 1',
    ),
    Refusal(
        "pool-size-empty",
        {"pool_size": ""},
        "pool_size",
        'pool_size="" is not allowed: it must be a whole number >= 1',
    ),
    Refusal(
        "replicas-a-boolean",
        {"replicas_max": True},
        "replicas_max",
        "replicas_max=true is not allowed: it must be a whole number >= 1",
    ),
    Refusal(
        "max-connections-not-a-number",
        {"db_max_connections": "lots"},
        "db_max_connections",
        'db_max_connections="lots" is not allowed: it must be a whole number between 2 and 262143',
    ),
    Refusal(
        "null-pool-maybe",
        {"target": "batch", "null_pool": "maybe"},
        "null_pool",
        'null_pool="maybe" is not allowed: it must be true or false',
    ),
    Refusal(
        "null-pool-a-number",
        {"target": "lambda", "null_pool": 2},
        "null_pool",
        "null_pool=2 is not allowed: it must be true or false",
    ),
    Refusal(
        "max-surge-a-word",
        {"max_surge": "abc"},
        "max_surge",
        'max_surge="abc" is not allowed: it must be a pod count (0 for no surge) or a percentage'
        " of replicas_max such as 25%",
    ),
    Refusal(
        "max-surge-a-fractional-percentage",
        {"max_surge": "12.5%"},
        "max_surge",
        'max_surge="12.5%" is not allowed',
    ),
    # --- issue 19: numbers are plain decimal digits. YAML 1.1 reads these spellings as other
    # numbers (or as no number); each is refused by name, with what YAML made of it.
    Refusal(
        "replicas-max-base-60",
        {"replicas_max": "1:30"},
        "replicas_max",
        'replicas_max="1:30" is not allowed: it must be plain decimal digits (no sign, leading 0,'
        " '_', ':', '0x' or space), and YAML reads \"1:30\" as 90; write replicas_max=90 if that"
        " is the number you mean.",
    ),
    Refusal(
        "max-connections-octal",
        {"db_max_connections": "010"},
        "db_max_connections",
        'db_max_connections="010" is not allowed: it must be plain decimal digits',
    ),
    Refusal(
        "pool-size-hexadecimal",
        {"pool_size": "0x10"},
        "pool_size",
        'YAML reads "0x10" as 16; write pool_size=16 if that is the number you mean.',
    ),
    Refusal(
        "workers-underscore",
        {"workers_per_pod": "1_0"},
        "workers_per_pod",
        'workers_per_pod="1_0" is not allowed: it must be plain decimal digits',
    ),
    Refusal(
        "pool-timeout-plus-sign",
        {"pool_timeout": "+5"},
        "pool_timeout",
        'pool_timeout="+5" is not allowed: it must be plain decimal digits',
    ),
    Refusal(
        "pool-recycle-leading-space",
        {"pool_recycle": " 1800"},
        "pool_recycle",
        'pool_recycle=" 1800" is not allowed: it must be plain decimal digits',
    ),
    Refusal(
        "max-overflow-decimal-point",
        {"max_overflow": "5.0"},
        "max_overflow",
        'max_overflow="5.0" is not allowed: it must be a whole number >= 0 in plain decimal digits',
    ),
    Refusal(
        "pgbouncer-pool-exponent",
        {"pooler": "pgbouncer", "pgbouncer_default_pool_size": "1e3"},
        "pgbouncer_default_pool_size",
        'pgbouncer_default_pool_size="1e3" is not allowed: it must be a whole number >= 1 in plain'
        " decimal digits",
    ),
    Refusal(
        "max-surge-octal",
        {"max_surge": "010"},
        "max_surge",
        'max_surge="010" is not allowed: it must be a pod count (0 for no surge) or a percentage',
    ),
    Refusal(
        "max-surge-percentage-leading-zero",
        {"max_surge": "025%"},
        "max_surge",
        'max_surge="025%" is not allowed',
    ),
    Refusal(
        "external-consumer-count-octal",
        {"db_external_consumers": "{datadog-agent: 5, metabase: 010}", "other_consumers": 13},
        "db_external_consumers",
        'db_external_consumers["metabase"]="010" is not allowed: it must be plain decimal digits'
        " (no sign, leading 0, '_', ':', '0x' or space), and YAML reads \"010\" as 8; write"
        " metabase: 8 if that is the number you mean.",
    ),
    # Package names Python itself holds: the project's tests could not import the package.
    Refusal(
        "package-name-dunder-main",
        {"package_name": "__main__"},
        "package_name",
        'package_name="__main__" is not allowed: names that start and end with "__" are'
        " Python's own",
    ),
    Refusal(
        "package-name-private-stdlib-module",
        {"package_name": "_json"},
        "package_name",
        "package_name=\"_json\" is not allowed: it shadows the standard library module '_json'",
    ),
    # A percentage is counted in pods, rounded up: 50% of 8 replicas is 4 surge pods, and the
    # 8 + 4 + 4 terminating pods of 10 connections each do not fit 97.
    Refusal(
        "max-surge-percentage-past-budget",
        {"replicas_max": 8, "max_surge": "50%"},
        "max_overflow",
        "(8 replicas_max + 4 max_surge + 4 terminating) x 1 workers_per_pod"
        " x (5 pool_size + 5 max_overflow) = 160",
    ),
    # The NetworkPolicy's namespaceSelector for the metrics port: a Kubernetes label, key=value.
    Refusal(
        "monitoring-label-without-a-value",
        {"monitoring_namespace_label": "monitoring"},
        "monitoring_namespace_label",
        'monitoring_namespace_label="monitoring" is not allowed: it must be a namespace label as'
        " key=value, for example kubernetes.io/metadata.name=monitoring",
    ),
    Refusal(
        "monitoring-label-key-not-a-label-key",
        {"monitoring_namespace_label": "Team Name=monitoring"},
        "monitoring_namespace_label",
        'its key "Team Name" is not a Kubernetes label key',
    ),
    Refusal(
        "monitoring-label-value-too-long",
        {"monitoring_namespace_label": "team=" + "m" * 64},
        "monitoring_namespace_label",
        "is not a Kubernetes label value (at most 63 letters, digits",
    ),
]
