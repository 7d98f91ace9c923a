"""The monitoring a service ships: dashboard, Prometheus alert rules, Lambda alarms.

- The service dashboard template is what src/poolwise/dashboard.py (grafana-foundation-sdk)
  writes today, and each rendered dashboard is that builder's dashboard with the numbers the
  service's own budget reads from what deploy/ applies (not a second formula).
- Every k8s answer set renders rules that `promtool check rules` accepts and whose unit tests
  (`promtool test rules`, rendered with them) pass; the PrometheusRule that deploy/k8s applies
  holds the same groups.
- The Lambda SAM template alarms on the EMF metrics (cfn-lint runs in tests/test_deploy.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cases import SUPPORTED, Case
from rendering import run
from test_deploy import app_name, kustomize, load_cloudformation
from tools import promtool

from poolwise import dashboard, services

K8S_CASES = [case for case in SUPPORTED if case.answers.get("target", "k8s-sync").startswith("k8s")]


def test_the_dashboard_template_is_what_the_builder_writes() -> None:
    assert dashboard.TEMPLATE.read_text() == dashboard.template_text(), (
        "template/monitoring/pool-dashboard.json.jinja is stale: run `python -m poolwise.dashboard`"
    )


def expected_dashboard(project: Path) -> dict:
    """The builder's dashboard with the numbers the service's budget reads from deploy/."""
    service = services.load(project)
    topology = service.worst.topology
    [workload] = topology.workloads
    declared = yaml.safe_load((project / ".copier-answers.yml").read_text())
    return dashboard.service_dashboard(
        title=f"{service.name}: connection pool",
        uid=f"{app_name(service.name)[:35]}-pool",
        pool=service.name,
        pod_worst_case=workload.processes_per_pod * workload.per_process,
        service_worst_case=topology.app_total,
        pool_timeout=declared["pool_timeout"],
    )


def promtool_ok(project: Path, *args: str) -> str:
    result = run([promtool("the rendered alert rules"), *args], project / "monitoring", timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("case", K8S_CASES, ids=lambda case: case.id)
def test_k8s_services_ship_a_dashboard_and_alert_rules_promtool_proves(render, case: Case) -> None:
    project = render({"batch_schedule": "*/15 * * * *", **case.answers})
    rendered = json.loads((project / "monitoring" / "pool-dashboard.json").read_text())
    assert rendered == expected_dashboard(project)
    assert {"datasource", "pool"} == {v["name"] for v in rendered["templating"]["list"]}
    for panel in rendered["panels"]:
        for target in panel.get("targets", []):
            assert "$pool" in target["expr"] or target["expr"].startswith("vector("), target

    assert "SUCCESS: 4 rules found" in promtool_ok(project, "check", "rules", "pool-alerts.yaml")
    promtool_ok(project, "test", "rules", "pool-alerts.test.yaml")

    rules = yaml.safe_load((project / "monitoring" / "pool-alerts.yaml").read_text())
    [applied] = [doc for doc in kustomize(project) if doc["kind"] == "PrometheusRule"]
    assert applied["apiVersion"] == "monitoring.coreos.com/v1"
    assert applied["spec"] == rules
    assert [rule["alert"] for rule in rules["groups"][0]["rules"]] == [
        "PoolRequestsWaiting",
        "PoolCheckoutTimeouts",
        "PoolAboveDeclaredWorstCase",
        "PoolMetricsAbsent",
    ]
    readme = (project / "README.md").read_text()
    for rule in rules["groups"][0]["rules"]:
        assert f"**{rule['alert']}**" in readme, f"no runbook line for {rule['alert']}"


def test_the_promtool_unit_tests_fail_when_an_alert_misbehaves(render, tmp_path: Path) -> None:
    """Not vacuous: a rule that can never fire, or fires at once, fails its unit tests."""
    project = render({"target": "k8s-sync"})
    rules_file = project / "monitoring" / "pool-alerts.yaml"
    original = rules_file.read_text()
    for broken in (
        original.replace("}) > 0'", "}) > 1000'", 1),  # PoolRequestsWaiting never fires
        original.replace("for: 10m", "for: 1m", 1),  # PoolAboveDeclaredWorstCase too early
        original.replace("> 0.9 *", "> 0.5 *"),  # quiet below 90 % no more
    ):
        assert broken != original
        rules_file.write_text(broken)
        result = run(
            [promtool("the rendered alert rules"), "test", "rules", "pool-alerts.test.yaml"],
            project / "monitoring",
            timeout=60,
        )
        assert result.returncode != 0, broken


def test_batch_services_ship_no_prometheus_monitoring(render) -> None:
    project = render({"target": "batch"})
    assert not (project / "monitoring").exists()
    docs = kustomize(project)
    assert "PrometheusRule" not in {doc["kind"] for doc in docs}


def test_lambda_alarms_watch_the_emf_metrics_and_throttles(render) -> None:
    project = render({"target": "lambda"})
    template = load_cloudformation(project / "deploy" / "lambda" / "template.yaml")
    alarms = {
        name: resource["Properties"]
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert set(alarms) == {"ConnectErrorsAlarm", "ConnectLatencyAlarm", "ThrottlesAlarm"}
    errors = alarms["ConnectErrorsAlarm"]["Metrics"]
    watched = [m["MetricStat"]["Metric"] for m in errors if "MetricStat" in m]
    assert {m["Namespace"] for m in watched} == {"DatabaseConnections"}
    assert {m["MetricName"] for m in watched} == {"db.client.connection.create_time"}
    codes = {d["Value"] for m in watched for d in m["Dimensions"] if d["Name"] == "error.type"}
    assert "53300" in codes
    latency = alarms["ConnectLatencyAlarm"]
    assert latency["MetricName"] == "db.client.connection.create_time"
    assert latency["Namespace"] == "DatabaseConnections"
    assert alarms["ThrottlesAlarm"]["MetricName"] == "Throttles"
    assert alarms["ThrottlesAlarm"]["Namespace"] == "AWS/Lambda"
    readme = (project / "README.md").read_text()
    for name in alarms:
        assert f"**{name}**" in readme, f"no runbook line for {name}"
