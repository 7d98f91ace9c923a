"""Grafana dashboards of connection pools, built with grafana-foundation-sdk.

Two dashboards, one set of panel builders:

- the service dashboard every k8s service ships (template/monitoring/pool-dashboard.json.jinja):
  `python -m poolwise.dashboard` writes that template from `service_dashboard()`, with Jinja
  expressions where the rendered numbers go, so the rendered file is plain Grafana JSON and the
  numbers are copier's (includes/monitoring.jinja), never a second copy of the budget formula;
- the fleet dashboard `poolwise fleet --dashboard FILE` writes: per PostgreSQL cluster, each
  service's live connections against the cluster's available connections and its declared share.

Both read the pool metrics the services export (prometheus.py: the OpenTelemetry names with '.'
as '_'); the Prometheus data source is a dashboard variable, so the JSON imports as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
)

if TYPE_CHECKING:
    from .fleet import Cluster

POOL_LABEL = "db_client_connection_pool_name"
STATE_LABEL = "db_client_connection_state"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
TEMPLATE = (
    Path(__file__).resolve().parents[2]
    / "template"
    / "{% if is_k8s %}monitoring{% endif %}"
    / "pool-dashboard.json.jinja"
)
# Where the rendered values go in the template: each placeholder becomes a Jinja expression of
# includes/monitoring.jinja (the same numbers db/topology.toml holds).
TEMPLATE_VALUES = {
    "title": "{{ project_name }}: connection pool",
    "uid": "{{ monitoring.dashboard_uid }}",
    "pool": "{{ project_name }}",
    "pod_worst_case": "{{ monitoring.pod_worst_case }}",
    "service_worst_case": "{{ monitoring.service_worst_case }}",
    "pool_timeout": "{{ pool_timeout }}",
}
TEMPLATE_HEADER = (
    "{% from 'includes/monitoring.jinja' import monitoring with context %}\n"
    "{#- Written by `python -m poolwise.dashboard` (src/poolwise/dashboard.py): edit that, not"
    " this file. -#}\n"
)


def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range()


def _panel(title: str, description: str, unit: str, queries: list[tuple[str, str]]) -> Any:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .height(8)
        .span(12)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(["lastNotNull", "max"])
        )
    )
    for number, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + number)))
    return panel


def _datasource_variable() -> builders.DatasourceVariable:
    return builders.DatasourceVariable("datasource").label("Prometheus").type("prometheus")


def service_panels(
    pool: str, pod_worst_case: str, service_worst_case: str, pool_timeout: str
) -> list[tuple[str, list[Any]]]:
    """The service dashboard's rows: (title, panels). `pool` selects the series; the other
    arguments are numbers as text (the template passes Jinja expressions)."""
    of = f'{POOL_LABEL}="{pool}"'

    def quantile(q: str, histogram: str) -> str:
        return (
            f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{of}}}"
            "[$__rate_interval])))"
        )

    connections = [
        _panel(
            "Connections by state, all pods",
            "Used and idle connections summed over the pods, against what the pods may open now"
            " (pool max) and the service's declared worst case (db/topology.toml: every pod a"
            " rollout can run, each process at pool_size + max_overflow).",
            "short",
            [
                (f"sum by ({STATE_LABEL}) (db_client_connection_count{{{of}}})", "__auto"),
                (f"sum(db_client_connection_max{{{of}}})", "pool max, all pods"),
                (f"vector({service_worst_case})", f"declared worst case ({service_worst_case})"),
            ],
        ),
        _panel(
            "Connections per pod",
            "Each pod's open connections (used + idle) against its pool max and the declared"
            " worst case of one pod (workers_per_pod x (pool_size + max_overflow)).",
            "short",
            [
                (f"sum by (instance) (db_client_connection_count{{{of}}})", "__auto"),
                (f"max(db_client_connection_max{{{of}}})", "pool max, one pod"),
                (f"vector({pod_worst_case})", f"declared per pod ({pod_worst_case})"),
            ],
        ),
    ]
    waiting = [
        _panel(
            "Pending requests per pod",
            "Requests waiting for a connection now. Above 0 for minutes: the pool is too small"
            " for the traffic or the database too slow (alert PoolRequestsWaiting).",
            "short",
            [(f"sum by (instance) (db_client_connection_pending_requests{{{of}}})", "__auto")],
        ),
        _panel(
            "Checkout wait time",
            "How long a request waited for its connection; at pool_timeout it gets 503.",
            "s",
            [
                (quantile("0.5", "db_client_connection_wait_time_seconds"), "p50"),
                (quantile("0.99", "db_client_connection_wait_time_seconds"), "p99"),
                (f"vector({pool_timeout})", f"pool_timeout ({pool_timeout} s)"),
            ],
        ),
        _panel(
            "Checkout timeouts (503s)",
            "Requests that waited pool_timeout for a connection and were answered 503 with"
            " Retry-After, per second (alert PoolCheckoutTimeouts).",
            "reqps",
            [
                (
                    f"sum by (instance) (rate(db_client_connection_timeouts_total{{{of}}}"
                    "[$__rate_interval]))",
                    "__auto",
                )
            ],
        ),
        _panel(
            "Connection use time",
            "How long a request held its connection: long holds cost connections, not traffic.",
            "s",
            [
                (quantile("0.5", "db_client_connection_use_time_seconds"), "p50"),
                (quantile("0.99", "db_client_connection_use_time_seconds"), "p99"),
            ],
        ),
        _panel(
            "Refused connects by SQLSTATE",
            "Connects the database or pooler refused, per second, by error.type (53300: no"
            " connection slot left on the cluster).",
            "reqps",
            [
                (
                    "sum by (error_type) (rate(db_client_connection_create_time_seconds_count"
                    f'{{{of},error_type!=""}}[$__rate_interval]))',
                    "__auto",
                )
            ],
        ),
    ]
    return [("Connections against the budget", connections), ("Waiting for a connection", waiting)]


def _dashboard(title: str, uid: str, tags: list[str], rows: list[tuple[str, list[Any]]]) -> Any:
    board = (
        builders.Dashboard(title)
        .uid(uid)
        .tags(tags)
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(_datasource_variable())
    )
    return board, rows


def _encode(board: Any, rows: list[tuple[str, list[Any]]]) -> dict[str, Any]:
    for title, panels in rows:
        board = board.with_row(builders.Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def service_dashboard(
    *,
    title: str,
    uid: str,
    pool: str,
    pod_worst_case: int | str,
    service_worst_case: int | str,
    pool_timeout: int | str,
) -> dict[str, Any]:
    """One service's pool dashboard as Grafana JSON (a dict)."""
    board, rows = _dashboard(
        title,
        uid,
        ["poolwise", "connection-pool"],
        # The panels select the series through the variable, whose value is the service's own.
        service_panels("$pool", str(pod_worst_case), str(service_worst_case), str(pool_timeout)),
    )
    board = board.with_variable(
        builders.CustomVariable("pool")
        .label("pool (application_name)")
        .values(pool)
        .current(VariableOption(selected=True, text=pool, value=pool))
    )
    return _encode(board, rows)


def template_text() -> str:
    """The service dashboard as the Jinja template copier renders (placeholders as Jinja)."""
    sentinels = {name: f"@@{name}@@" for name in TEMPLATE_VALUES}
    text = json.dumps(service_dashboard(**sentinels), indent=2) + "\n"
    if re.search(r"\{\{|\}\}|\{%|%\}|\{#|#\}", text):
        raise ValueError("the dashboard holds Jinja delimiters; Grafana legends use __auto")
    for name, expression in TEMPLATE_VALUES.items():
        text = text.replace(sentinels[name], expression)
    return TEMPLATE_HEADER + text


def fleet_dashboard(clusters: list[Cluster]) -> dict[str, Any]:
    """Per cluster: each service's live connections against the cluster and its share."""
    rows = []
    for cluster in clusters:
        # A regular expression in a PromQL string: its backslashes are escaped once more.
        names = "|".join(re.escape(service.name) for service in cluster.services)
        names = names.replace("\\", "\\\\")
        of = f'{POOL_LABEL}=~"{names}"'
        available = cluster.limits.available
        total = [
            (f"sum by ({POOL_LABEL}) (db_client_connection_count{{{of}}})", "__auto"),
            (f"vector({available})", f"available on {cluster.name} ({available})"),
            (f"vector({cluster.total})", f"declared worst case, all consumers ({cluster.total})"),
        ]
        external = ", ".join(
            f"{name} {count}" for name, count in cluster.limits.external_consumers.items()
        )
        panels = [
            _panel(
                f"{cluster.name}: live connections per service",
                f"max_connections {cluster.limits.max_connections} - reserved"
                f" {cluster.limits.reserved_connections} = {available} available; declared"
                f" consumers that are not services: {external or 'none'}. Lambda and batch"
                " services export no Prometheus metrics: their share is in the declared total.",
                "short",
                total,
            )
        ]
        for service in cluster.services:
            share = service.total
            percent = f"{100 * cluster.share(share):.0f}%"
            panels.append(
                _panel(
                    f"{service.name} ({service.target}): live against declared share",
                    f"{service.name} may hold {share} of {cluster.name}'s {available}"
                    f" connections ({percent}), migration included.",
                    "short",
                    [
                        (
                            f'sum(db_client_connection_count{{{POOL_LABEL}="{service.name}"}})',
                            "live",
                        ),
                        (
                            f'sum(db_client_connection_max{{{POOL_LABEL}="{service.name}"}})',
                            "pool max",
                        ),
                        (f"vector({share})", f"declared share ({share})"),
                    ],
                )
            )
        rows.append((f"Cluster {cluster.name}", panels))
    board, rows = _dashboard(
        "poolwise fleet: connections per cluster", "poolwise-fleet", ["poolwise", "fleet"], rows
    )
    return _encode(board, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m poolwise.dashboard",
        description="Write the service dashboard template (monitoring/pool-dashboard.json.jinja).",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the template is stale")
    args = parser.parse_args(argv)
    text = template_text()
    if args.check:
        if TEMPLATE.read_text() != text:
            print(f"{TEMPLATE}: stale; run python -m poolwise.dashboard", file=sys.stderr)
            return 1
        return 0
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
