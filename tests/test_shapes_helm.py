"""poolwise.shapes.helm: charts rendered with Helm's own engine (helm-python-sdk here: no
helm binary is installed on this machine or in CI), Capabilities pinned, one variant per
values file; and helmCharts in a kustomization, refused by name where they cannot be built.

The chart is tests/charts/orders, a small chart as teams write them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from poolwise.shapes import Refused, helm

CHARTS = Path(__file__).parent / "charts"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    """A copy of the orders chart under a project's deploy/, to change per test."""
    copy = tmp_path / "deploy" / "chart"
    shutil.copytree(CHARTS / "orders", copy)
    return copy


def kinds(rendered: list[helm.Rendered]) -> list[tuple[str, str]]:
    return [(r.doc["kind"], r.origin) for r in rendered]


def variant(chart: Path, name: str) -> helm.ChartVariant:
    return next(v for v in helm.chart_variants(chart) if v.name == name)


def test_each_values_file_is_its_own_variant(chart):
    assert [(v.name, [p.name for p in v.values_files]) for v in helm.chart_variants(chart)] == [
        ("chart", []),
        ("chart:prod", ["values-prod.yaml"]),
        ("chart:staging", ["staging.yaml"]),
    ]


# variant, what it renders (kind and the file each came from)
VARIANTS = [
    ("chart", [("Deployment", "deploy/chart/templates/deployment.yaml")]),
    (
        "chart:prod",
        [
            (
                "Deployment",
                "deploy/chart/templates/deployment.yaml (values deploy/chart/values-prod.yaml)",
            ),
            (
                "ScaledObject",
                "deploy/chart/templates/scaledobject.yaml (values deploy/chart/values-prod.yaml)",
            ),
        ],
    ),
    (
        "chart:staging",
        [
            (
                "Deployment",
                "deploy/chart/templates/deployment.yaml (values deploy/chart/values/staging.yaml)",
            ),
            (
                "HorizontalPodAutoscaler",
                "deploy/chart/templates/hpa.yaml (values deploy/chart/values/staging.yaml)",
            ),
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_a_chart_renders_with_helms_engine_per_variant(chart, name, expected):
    rendered = helm.render(variant(chart, name), root=chart.parent.parent, engine="sdk")
    assert kinds(rendered) == expected


def test_values_files_layer_on_the_chart_defaults(chart):
    rendered = helm.render(variant(chart, "chart:prod"), root=chart.parent.parent, engine="sdk")
    deployment = rendered[0].doc
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/acme/orders:0.1.0"  # values.yaml
    assert container["args"] == ["uvicorn", "orders.app:app", "--workers", "4"]  # values-prod
    assert "replicas" not in deployment["spec"]  # the ScaledObject owns the count
    assert rendered[1].doc["spec"]["maxReplicaCount"] == 20
    assert "NOTES" not in json.dumps([r.origin for r in rendered])


def test_capabilities_are_pinned_not_taken_from_the_machine(chart):
    deploy = chart.parent.parent
    default = helm.render(variant(chart, "chart:staging"), root=deploy, engine="sdk")
    annotations = default[0].doc["metadata"]["annotations"]
    assert annotations["orders.example.com/kube-version"] == helm.KUBE_VERSION
    assert default[1].doc["apiVersion"] == "autoscaling/v2"
    older = helm.render(
        variant(chart, "chart:staging"), root=deploy, engine="sdk", kube_version="v1.22.0"
    )
    assert older[0].doc["metadata"]["annotations"]["orders.example.com/kube-version"] == "v1.22.0"
    assert older[1].doc["apiVersion"] == "autoscaling/v2beta2"


def test_an_api_group_the_chart_checks_for_is_pinned_too(chart):
    deploy = chart.parent.parent
    without_keda = helm.render(
        variant(chart, "chart:prod"), root=deploy, engine="sdk", api_versions=()
    )
    assert [kind for kind, _ in kinds(without_keda)] == ["Deployment"]
    with_keda = helm.render(variant(chart, "chart:prod"), root=deploy, engine="sdk")
    assert [kind for kind, _ in kinds(with_keda)] == ["Deployment", "ScaledObject"]


def test_the_render_does_not_read_the_users_kubeconfig_or_helm_settings(
    chart, monkeypatch, tmp_path
):
    (tmp_path / "kubeconfig").write_text("not: [a kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.setenv("HELM_KUBEVERSION", "v1.20.0")
    rendered = helm.render(variant(chart, "chart"), root=chart.parent.parent, engine="sdk")
    annotations = rendered[0].doc["metadata"]["annotations"]
    assert annotations["orders.example.com/kube-version"] == helm.KUBE_VERSION


def refusal(chart: Path, name: str = "chart") -> str:
    with pytest.raises(Refused) as refused:
        helm.render(variant(chart, name), root=chart.parent.parent, engine="sdk")
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_chart_that_does_not_render_fails_with_helms_reason(chart):
    (chart / "values.yaml").write_text(
        (chart / "values.yaml").read_text().replace('tag: "0.1.0"', "tag: null")
    )
    assert refusal(chart) == (
        "deploy/chart: helm template: execution error at"
        " (orders/templates/deployment.yaml:24:52): image.tag is required; fix: fix the chart or"
        " its values so that `helm template` renders it"
    )


def test_a_template_error_is_helms_own_message(chart):
    (chart / "templates" / "broken.yaml").write_text("{{ .Values.missing.field }}\n")
    assert refusal(chart).startswith(
        "deploy/chart: helm template: orders/templates/broken.yaml:1:10 executing"
        ' "orders/templates/broken.yaml" at <.Values.missing.field>: nil pointer evaluating'
        " interface {}.field; fix:"
    )


def test_values_against_the_charts_schema_are_checked(chart):
    (chart / "values-bad.yaml").write_text("workers: 0\n")
    message = refusal(chart, "chart:bad")
    assert message.startswith("deploy/chart: helm template: ")
    assert "workers" in message and "minimum" in message


def test_a_dependency_missing_from_charts_is_refused_as_helm_does(chart):
    metadata = yaml.safe_load((chart / "Chart.yaml").read_text())
    metadata["dependencies"] = [
        {
            "name": "redis",
            "version": "19.0.0",
            "repository": "oci://registry-1.docker.io/bitnamicharts",
        }
    ]
    (chart / "Chart.yaml").write_text(yaml.safe_dump(metadata))
    assert refusal(chart) == (
        "deploy/chart: Chart.yaml dependencies: found in Chart.yaml, but missing in charts/"
        " directory: redis; fix: run `helm dependency build` and commit charts/ (the budget"
        " renders offline)"
    )


def test_a_vendored_subchart_renders_with_its_parent_and_is_not_a_chart_of_its_own(chart):
    sub = chart / "charts" / "worker"
    shutil.copytree(CHARTS / "orders", sub)
    metadata = yaml.safe_load((sub / "Chart.yaml").read_text())
    metadata["name"] = "worker"
    (sub / "Chart.yaml").write_text(yaml.safe_dump(metadata))
    parent = yaml.safe_load((chart / "Chart.yaml").read_text())
    parent["dependencies"] = [{"name": "worker", "version": "0.1.0"}]
    (chart / "Chart.yaml").write_text(yaml.safe_dump(parent))
    assert helm.find_charts(chart.parent) == [chart]
    rendered = helm.render(variant(chart, "chart"), root=chart.parent.parent, engine="sdk")
    assert kinds(rendered) == [
        ("Deployment", "deploy/chart/charts/worker/templates/deployment.yaml"),
        ("Deployment", "deploy/chart/templates/deployment.yaml"),
    ]


def test_rendered_text_that_is_not_a_manifest_is_refused(chart):
    (chart / "templates" / "notes.yaml").write_text("just: [text\n")
    assert refusal(chart).startswith("deploy/chart/templates/notes.yaml: rendered YAML: ")


def test_the_binary_engine_is_refused_by_name_where_there_is_no_helm(chart, monkeypatch):
    monkeypatch.setenv("PATH", str(chart))  # no helm there
    with pytest.raises(Refused) as refused:
        helm.render(variant(chart, "chart"), root=chart.parent.parent, engine="binary")
    assert str(refused.value) == "deploy/chart: helm: no helm binary is on PATH; fix: install helm"


KUSTOMIZATION = {"resources": ["deployment.yaml"]}


def test_a_kustomization_without_helm_charts_needs_no_flags(tmp_path):
    assert helm.kustomize_helm_flags(KUSTOMIZATION, tmp_path, tmp_path) == []


def test_helm_charts_in_a_kustomization_need_a_helm_binary(tmp_path, monkeypatch):
    overlay = tmp_path / "deploy" / "k8s"
    shutil.copytree(CHARTS / "orders", overlay / "charts" / "orders")
    kustomization = {"helmCharts": [{"name": "orders", "releaseName": "orders"}]}
    monkeypatch.setenv("PATH", str(tmp_path))  # no helm there
    with pytest.raises(Refused) as refused:
        helm.kustomize_helm_flags(kustomization, overlay, tmp_path)
    assert str(refused.value) == (
        "deploy/k8s/kustomization.yaml: helmCharts: kustomize renders helmCharts by running a"
        " helm binary, and none is on PATH; fix: install helm where the budget runs, or move the"
        " chart to its own folder under deploy/ with its values files, where poolwise renders it"
        " with Helm's engine"
    )


def test_helm_charts_in_a_kustomization_must_be_vendored(tmp_path):
    overlay = tmp_path / "deploy" / "k8s"
    overlay.mkdir(parents=True)
    kustomization = {
        "helmCharts": [
            {"name": "redis", "repo": "https://charts.bitnami.com/bitnami", "version": "19.0.0"}
        ]
    }
    with pytest.raises(Refused) as refused:
        helm.kustomize_helm_flags(kustomization, overlay, tmp_path)
    assert str(refused.value).startswith(
        "deploy/k8s/kustomization.yaml: helmCharts[0] (redis): the chart is not under"
        " deploy/k8s/charts/, and kustomize would download it; the budget builds offline; fix:"
    )


def test_a_chart_vendored_where_kustomize_puts_a_versioned_chart_is_found(tmp_path, monkeypatch):
    overlay = tmp_path / "deploy" / "k8s"
    shutil.copytree(CHARTS / "orders", overlay / "helm" / "orders-0.1.0" / "orders")
    kustomization = {
        "helmGlobals": {"chartHome": "helm"},
        "helmCharts": [{"name": "orders", "version": "0.1.0"}],
    }
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    helm_path = fake_bin / "helm"
    helm_path.write_text("#!/bin/sh\nexit 1\n")
    helm_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    assert helm.kustomize_helm_flags(kustomization, overlay, tmp_path) == [
        "--enable-helm",
        "--helm-command",
        str(helm_path),
    ]


def test_every_chart_under_deploy_is_found(tmp_path):
    for name in ("api", "worker"):
        shutil.copytree(CHARTS / "orders", tmp_path / "deploy" / name)
    assert helm.find_charts(tmp_path / "deploy") == [
        tmp_path / "deploy" / "api",
        tmp_path / "deploy" / "worker",
    ]
    assert helm.merge_values({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"c": 3}, "d": {"e": 1}}) == {
        "a": {"b": 1, "c": 3},
        "d": {"e": 1},
    }


def test_a_chart_a_kustomization_inflates_is_not_a_variant_of_its_own(tmp_path):
    deploy = tmp_path / "deploy"
    shutil.copytree(CHARTS / "orders", deploy / "k8s" / "charts" / "orders")
    shutil.copytree(CHARTS / "orders", deploy / "api")
    (deploy / "k8s" / "kustomization.yaml").write_text(
        yaml.safe_dump({"helmCharts": [{"name": "orders", "releaseName": "orders"}]})
    )
    assert helm.find_charts(deploy) == [deploy / "api"]
    (deploy / "k8s" / "kustomization.yaml").write_text(yaml.safe_dump({"resources": []}))
    assert helm.find_charts(deploy) == [deploy / "api", deploy / "k8s" / "charts" / "orders"]
