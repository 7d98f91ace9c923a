"""The shipped dashboards and alert rules, run by a real Prometheus against running services.

Debian's prometheus scrapes the metrics port of a k8s-sync service with two uvicorn workers and
of a k8s-async service (each started with `python -m <pkg>`, application_name = its
project_name, as deployed), every second, and evaluates both services' rendered
monitoring/pool-alerts.yaml. Then:

- a normal run (a few clients, well inside the pools) fires no alert;
- a saturation run (a superuser holds a lock on items, so every request holds its connection
  and more clients than connections keep retrying) fires PoolRequestsWaiting and
  PoolCheckoutTimeouts for both services;
- while saturated, the service dashboard's queries (monitoring/pool-dashboard.json, `$pool` set
  to the service) and the fleet dashboard's per-service query (`poolwise fleet --dashboard`)
  return what pg_stat_activity shows for the service: used = its `active` backends, used + idle
  = all of them. Every panel's query runs without error.

The rules are evaluated as rendered, except that the `for:` of the two alerts under test is
shortened to FOR_IN_TEST so the run stays short; the durations themselves are what `promtool
test rules` (tests/test_monitoring.py) proves. The other two alerts keep theirs (10 minutes),
so they cannot fire here: their firing and quiet cases are promtool's.

The run's numbers, queried as each panel queries them, are drawn to a PNG
(tests/realdb/dashboard_png.py); POOLWISE_DASHBOARD_PNG=path also writes it there
(docs/pool-dashboard-realdb.png was made so).

Every wait is bounded, and no tolerance is fixed in advance: a comparison is polled until the
scrape and pg_stat_activity agree, within a bound that only limits how long to look.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dashboard_png
import pytest
import yaml
from harness import PostgresCluster
from harness.prometheus import PrometheusServer
from loadgen import BackgroundLoad, repeat_get
from services import RenderedProject, ServiceProcess, items_locked, seed_items, wait_until
from tools import prometheus

from poolwise import dashboard, fleet
from poolwise import services as fleet_services

pytestmark = [
    pytest.mark.realdb,
    pytest.mark.xdist_group("realdb"),
    pytest.mark.usefixtures("quiet_database"),
]

SCRAPE_INTERVAL_S = 1
FOR_IN_TEST = "5s"
RATE_INTERVAL = "5s"
# The normal run: fewer clients than either pool has connections, for longer than FOR_IN_TEST.
NORMAL_CLIENTS = 2
NORMAL_S = 6.0
# Clients beyond the connections in the saturation run: they wait pool_timeout, get 503, retry.
EXTRA_CLIENTS = 6
# Bounds of polls (how long to look before failing, never a tolerance of a comparison).
SCRAPED_WITHIN_S = 30.0
AGREE_WITHIN_S = 30.0
ALERTS = ("PoolRequestsWaiting", "PoolCheckoutTimeouts")


def rules_for_a_short_run(project: RenderedProject, directory: Path) -> Path:
    rules = yaml.safe_load((project.root / "monitoring" / "pool-alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] in ALERTS and "for" in rule:
                rule["for"] = FOR_IN_TEST
    path = directory / f"{project.project_name}-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def panels(project: RenderedProject) -> list[dict[str, Any]]:
    """The service dashboard's panels as rendered, with their queries for this service."""
    board = json.loads((project.root / "monitoring" / "pool-dashboard.json").read_text())
    [pool] = [v for v in board["templating"]["list"] if v["name"] == "pool"]
    name = pool["current"]["value"]
    assert name == project.project_name
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        queries = [
            (
                target["expr"].replace("$pool", name).replace("$__rate_interval", RATE_INTERVAL),
                target["legendFormat"],
            )
            for target in panel["targets"]
        ]
        found.append(
            {
                "title": panel["title"],
                "unit": panel["fieldConfig"]["defaults"]["unit"],
                "queries": queries,
            }
        )
    return found


def query_of(project_panels: list[dict[str, Any]], title: str, legend: str = "__auto") -> str:
    [panel] = [panel for panel in project_panels if panel["title"] == title]
    return next(expr for expr, shown in panel["queries"] if shown == legend)


def backends(database: PostgresCluster, application_name: str) -> tuple[int, int]:
    [(active, total)] = database.psql(
        "SELECT count(*) FILTER (WHERE state = 'active'), count(*) FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' AND application_name = %s",
        (application_name,),
    )
    return int(active), int(total)


def legend(metric: dict[str, str], shown: str) -> str:
    if shown != "__auto":
        return shown
    labels = {k: v for k, v in metric.items() if k not in ("__name__", "job")}
    return ", ".join(labels.values()) or "all"


def test_dashboard_queries_match_pg_stat_activity_and_alerts_fire_only_when_saturated(
    project: Callable[[str], RenderedProject],
    database: PostgresCluster,
    services: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    binary = prometheus("the dashboards' queries and the alert rules against a real Prometheus")
    rendered = {"sync": project("sync"), "async": project("async")}
    running = {
        "sync": services(
            rendered["sync"],
            database.dsn(driver=""),
            rendered["sync"].project_name,
            WEB_CONCURRENCY=2,
        ),
        "async": services(
            rendered["async"], database.dsn(driver=""), rendered["async"].project_name
        ),
    }
    names = {key: rendered[key].project_name for key in rendered}
    items = {key: seed_items(service, 1, "dashboard")[0] for key, service in running.items()}
    boards = {key: panels(rendered[key]) for key in rendered}
    capacity = {}
    for key, project_ in rendered.items():
        settings = project_.settings()
        workers = 2 if key == "sync" else 1
        capacity[key] = workers * (settings["pool_size"] + settings["max_overflow"])
    cluster = fleet.clusters([fleet_services.load(project_.root) for project_ in rendered.values()])
    fleet_board = dashboard.fleet_dashboard(cluster)
    fleet_live = {
        key: next(
            target["expr"]
            for panel in fleet_board["panels"]
            if panel["type"] != "row" and panel["title"].startswith(f"{names[key]} (")
            for target in panel["targets"]
            if target["legendFormat"] == "live"
        )
        for key in rendered
    }

    server = PrometheusServer(
        binary,
        tmp_path,
        [f"127.0.0.1:{service.metrics_port}" for service in running.values()],
        [rules_for_a_short_run(project_, tmp_path) for project_ in rendered.values()],
        interval=f"{SCRAPE_INTERVAL_S}s",
    )
    with server:
        started = time.time()

        def scraped() -> bool:
            return all(
                server.query(
                    query_of(boards[key], "Connections by state, all pods", "pool max, all pods")
                )
                == [{"metric": {}, "value": float(capacity[key])}]
                for key in rendered
            )

        assert wait_until(scraped, SCRAPED_WITHIN_S, interval=0.2), server.log()[-2000:]
        # Every panel's every query is valid PromQL on this Prometheus (api() raises otherwise).
        for key in rendered:
            for panel in boards[key]:
                for expr, _ in panel["queries"]:
                    server.query(expr)

        # A normal run: no alert fires, during it or for the `for:` window after it.
        normal_started = time.time()
        normal = {
            key: BackgroundLoad(
                service.port,
                repeat_get(f"/items/{items[key]}"),
                clients=NORMAL_CLIENTS,
                duration=NORMAL_S,
                max_requests=5000,
            ).start()
            for key, service in running.items()
        }
        for key, background in normal.items():
            result = background.join(NORMAL_S + 30)
            assert result.ok() and not result.failed(), (key, result.summary())
        # Long enough for a condition that held at the load's end to fire.
        time.sleep(int(FOR_IN_TEST.rstrip("s")) + 2 * SCRAPE_INTERVAL_S)
        quiet_for = int(time.time() - normal_started) + 1
        fired = server.query(
            f'count_over_time(ALERTS{{alertstate="firing",service=~"{"|".join(names.values())}"}}'
            f"[{quiet_for}s])"
        )
        scrapes = server.query(f"min_over_time(up[{quiet_for}s])")
        slowest = server.query(f"max_over_time(scrape_duration_seconds[{quiet_for}s])")
        assert fired == [], (fired, scrapes, slowest)
        print(f"normal run: up {scrapes}, slowest scrape {slowest}")

        # The saturation run: every connection blocked on the lock, more clients retrying.
        report: dict[str, Any] = {}
        with items_locked(database):
            saturation_started = time.time()
            saturating = {
                key: BackgroundLoad(
                    service.port,
                    repeat_get(f"/items/{items[key]}"),
                    clients=capacity[key] + EXTRA_CLIENTS,
                    duration=90,
                    max_requests=5000,
                    timeout=60,
                ).start()
                for key, service in running.items()
            }

            def agree(key: str) -> bool:
                states = {
                    item["metric"].get("db_client_connection_state", "?"): item["value"]
                    for item in server.query(
                        query_of(boards[key], "Connections by state, all pods")
                    )
                }
                per_pod = server.query(query_of(boards[key], "Connections per pod"))
                [live] = server.query(fleet_live[key]) or [{"value": -1}]
                active, total = backends(database, names[key])
                report[key] = {
                    "prometheus": states,
                    "per_pod": per_pod,
                    "fleet": live["value"],
                    "pg_active": active,
                    "pg_total": total,
                }
                return (
                    active > 0
                    and states.get("used") == active
                    and states.get("used", 0) + states.get("idle", 0) == total
                    and [item["value"] for item in per_pod] == [total]
                    and live["value"] == total
                )

            for key in rendered:
                assert wait_until(lambda key=key: agree(key), AGREE_WITHIN_S, interval=0.2), report

            expected = {(alert, names[key]) for alert in ALERTS for key in rendered}
            bound = (
                2 * int(FOR_IN_TEST.rstrip("s"))
                + 2 * rendered["sync"].settings()["pool_timeout"]
                + 30
            )
            assert wait_until(lambda: expected <= server.firing(), bound, interval=0.5), (
                server.firing(),
                server.api("alerts"),
            )
            saturated = time.time()
        # The lock is released: the held requests end, and the clients stop.
        results = {key: background.stop(60) for key, background in saturating.items()}
        for key, result in results.items():
            assert result.statuses[503] > 0, (key, result.summary())
        print(f"dashboards on a real Prometheus: {report}")
        print(
            f"normal run from {normal_started - started:.1f} s, saturation from"
            f" {saturation_started - started:.1f} s to {saturated - started:.1f} s"
        )

        # The run as each panel of the k8s-sync service's dashboard shows it.
        ended = time.time()
        drawn = []
        for panel in boards["sync"]:
            series = []
            for expr, shown in panel["queries"]:
                for item in server.query_range(expr, started, ended, SCRAPE_INTERVAL_S):
                    series.append(
                        {"label": legend(item["metric"], shown), "values": item["values"]}
                    )
            drawn.append({"title": panel["title"], "unit": panel["unit"], "series": series})
        (tmp_path / "panels.json").write_text(
            json.dumps({"start": started, "end": ended, "panels": drawn})
        )
        title = f"{names['sync']} (k8s-sync, 2 workers): a normal run, then saturation"
        targets = [tmp_path / "pool-dashboard.png"]
        if os.environ.get("POOLWISE_DASHBOARD_PNG"):
            targets.append(Path(os.environ["POOLWISE_DASHBOARD_PNG"]))
        for path in targets:
            dashboard_png.draw(title, drawn, path, started, ended)
        assert (tmp_path / "pool-dashboard.png").stat().st_size > 0
