"""Fail closed on Kubernetes: what teams deploy is counted or refused by name, never ignored.

Each row edits a rendered k8s-sync, k8s-async or batch service the way issue 24 lists (items
1-6 and 12) and runs both readers, the generated tests/test_connection_budget.py and
`poolwise budget`, through test_effective_budget's helpers: the verdict must agree, and the
first line the CLI prints must name the file and the reason. A "fits" row must show in the CLI
table that the shape was counted right.
"""

from __future__ import annotations

import configparser
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_effective_budget import (
    APP,
    BASE,
    CONFIG,
    PACKAGE,
    Row,
    add_resource,
    app_container,
    budget_command,
    budget_test,
    dump,
    edit,
    in_project,
    judge,
    load,
    path_without_kustomize,
    set_data,
)
from test_effective_budget import rendered as rendered  # the session's rendered projects
from tools import kubectl

DEPLOYMENT = f"{BASE}/deployment.yaml"
HPA = f"{BASE}/hpa.yaml"
MIGRATION = f"{BASE}/migration-job.yaml"
CONFIGMAP = f"{BASE}/configmap.yaml"
TOPOLOGY = f"src/{PACKAGE}/db/topology.toml"
CHART = "deploy/chart"


def deployment(project: Path) -> dict[str, Any]:
    return load(project, DEPLOYMENT)


def worker(name: str, image: str, replicas: int, **extra: Any) -> dict[str, Any]:
    """A second Deployment of the service, as a team adds one for a queue worker."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "worker",
                            "image": image,
                            "envFrom": [{"configMapRef": {"name": CONFIG}}],
                            **extra,
                        }
                    ]
                },
            },
        },
    }


def add_document(relative: str, document: dict[str, Any]) -> Callable[[Path], None]:
    def change(project: Path) -> None:
        dump(project, relative, document)
        add_resource(project, BASE, Path(relative).name)

    return change


# ----------------------------------------------------------------------------- item 1


def plain_folder(project: Path) -> None:
    dump(project, "deploy/extra/worker.yaml", worker("extra", APP, 60))


def plain_folder_excluded(project: Path) -> None:
    plain_folder(project)
    with (project / TOPOLOGY).open("a") as toml:
        toml.write(
            '\n[[excluded]]\npath = "deploy/extra"\nreason = "applied by the data team, not us"\n'
        )


def knative_service(project: Path) -> None:
    add_document(
        f"{BASE}/knative.yaml",
        {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": "edge"},
            "spec": {"template": {"spec": {"containers": [{"image": APP}]}}},
        },
    )(project)


def statefulset(project: Path) -> None:
    document = worker("ledger", APP, 60)
    document["kind"] = "StatefulSet"
    del document["spec"]["strategy"]
    document["spec"]["serviceName"] = "ledger"
    add_document(f"{BASE}/statefulset.yaml", document)(project)


# ----------------------------------------------------------------------------- item 2


def registry_host_image(project: Path) -> None:
    image = f"registry.example.com:5000/team/{APP}:1.2.3@sha256:{'a' * 64}"
    add_document(f"{BASE}/worker.yaml", worker("queue", image, 8))(project)


def renamed_by_images(project: Path) -> None:
    # kustomize `images:` gives the repository a registry; a workload written with that name
    # (not the one the base's manifests use) is still the service.
    edit(
        project,
        f"{BASE}/kustomization.yaml",
        lambda k: k["images"][0].update(newName=f"ghcr.io/acme/{APP}"),
    )
    add_document(f"{BASE}/worker.yaml", worker("queue", f"ghcr.io/acme/{APP}:2", 8))(project)


def native_sidecar(project: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        pod = document["spec"]["template"]["spec"]
        sidecar = {
            "name": "outbox",
            "image": APP,
            "restartPolicy": "Always",
            "command": ["python", "-m", f"{PACKAGE}"],
            "env": [{"name": "WEB_CONCURRENCY", "value": "1"}, {"name": "POOL_SIZE", "value": "5"}],
        }
        pod["initContainers"] = [sidecar]

    edit(project, DEPLOYMENT, change)
    edit(project, HPA, lambda hpa: hpa["spec"].update(maxReplicas=6))


def init_container_own_env(project: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        pod = document["spec"]["template"]["spec"]
        pod["initContainers"] = [
            {
                "name": "warm",
                "image": f"{APP}:0.1.0",
                "command": ["python", "-m", PACKAGE],
                "env": [{"name": "POOL_SIZE", "value": "40"}],
            }
        ]

    edit(project, DEPLOYMENT, change)


def batch_job_with_registry_host(project: Path) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "backfill"},
        "spec": {
            "parallelism": 100,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "backfill",
                            "image": f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/{APP}:7",
                            "envFrom": [{"configMapRef": {"name": CONFIG}}],
                        }
                    ],
                }
            },
        },
    }
    add_document(f"{BASE}/backfill.yaml", job)(project)


# ----------------------------------------------------------------------------- item 3

CHART_YAML = {"apiVersion": "v2", "name": "svc", "version": "0.1.0"}
CHART_TEMPLATE = f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{{{ .Release.Name }}}}-svc
spec:
  replicas: {{{{ .Values.replicas }}}}
  strategy:
    type: Recreate
  selector:
    matchLabels: {{app: svc}}
  template:
    metadata:
      labels: {{app: svc}}
    spec:
      containers:
        - name: web
          image: "{{{{ .Values.image }}}}"
          command: ["python", "-m", "{PACKAGE}"]
          env:
            - {{name: POOL_SIZE, value: "5"}}
            - {{name: POOL_MAX_OVERFLOW, value: "5"}}
            - {{name: WEB_CONCURRENCY, value: "1"}}
"""


def helm_chart(prod_replicas: int) -> Callable[[Path], None]:
    def change(project: Path) -> None:
        chart = project / CHART
        (chart / "templates").mkdir(parents=True)
        dump(project, f"{CHART}/Chart.yaml", CHART_YAML)
        dump(project, f"{CHART}/values.yaml", {"replicas": 2, "image": f"{APP}:1.0"})
        dump(project, f"{CHART}/values-prod.yaml", {"replicas": prod_replicas})
        (chart / "templates" / "deployment.yaml").write_text(CHART_TEMPLATE)

    return change


def broken_chart(project: Path) -> None:
    helm_chart(2)(project)
    (project / CHART / "values-prod.yaml").unlink()  # one variant: one line from the CLI
    (project / CHART / "templates" / "deployment.yaml").write_text("{{ .Values.nope.deeper }}\n")


# ----------------------------------------------------------------------------- item 4


def keda_in_place_of_hpa(max_replica_count: int | None) -> Callable[[Path], None]:
    def change(project: Path) -> None:
        spec: dict[str, Any] = {
            "scaleTargetRef": {"name": APP},
            "triggers": [{"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}],
        }
        if max_replica_count is not None:
            spec["maxReplicaCount"] = max_replica_count
        dump(
            project,
            HPA,
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "ScaledObject",
                "metadata": {"name": APP},
                "spec": spec,
            },
        )

    return change


def rollout(strategy: dict[str, Any], replicas: int) -> Callable[[Path], None]:
    """The Deployment turned into an Argo Rollout with its own template, the HPA on it."""

    def change(project: Path) -> None:
        document = deployment(project)
        document["apiVersion"] = "argoproj.io/v1alpha1"
        document["kind"] = "Rollout"
        document["spec"]["strategy"] = strategy
        dump(project, DEPLOYMENT, document)
        edit(
            project,
            HPA,
            lambda hpa: hpa["spec"].update(
                maxReplicas=replicas,
                scaleTargetRef={
                    "apiVersion": "argoproj.io/v1alpha1",
                    "kind": "Rollout",
                    "name": APP,
                },
            ),
        )

    return change


def rollout_workload_ref(project: Path) -> None:
    """A Rollout that takes its pods from the Deployment (workloadRef), the HPA moved onto it."""
    add_document(
        f"{BASE}/rollout.yaml",
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Rollout",
            "metadata": {"name": f"{APP}-rollout"},
            "spec": {
                "replicas": 4,
                "workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
                "strategy": {"blueGreen": {"activeService": APP}},
            },
        },
    )(project)
    edit(project, DEPLOYMENT, lambda d: d["spec"].update(replicas=0))
    edit(
        project,
        HPA,
        lambda hpa: hpa["spec"].update(
            scaleTargetRef={
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Rollout",
                "name": f"{APP}-rollout",
            }
        ),
    )


def hpa_on_missing_target(project: Path) -> None:
    edit(project, HPA, lambda hpa: hpa["spec"]["scaleTargetRef"].update(name="not-here"))


# ----------------------------------------------------------------------------- item 5


def uvicorn_workers(project: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        app_container(document)["command"] = ["uvicorn", f"{PACKAGE}.app:create_app", "--factory"]

    edit(project, DEPLOYMENT, change)
    set_data(project, CONFIGMAP, UVICORN_WORKERS="4")


def gunicorn_command(project: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        app_container(document)["command"] = [
            "gunicorn",
            "-k",
            "uvicorn.workers.UvicornWorker",
            f"{PACKAGE}.app:create_app()",
        ]

    edit(project, DEPLOYMENT, change)
    set_data(project, CONFIGMAP, GUNICORN_CMD_ARGS="--workers 3 --timeout 30")


def shell_form_workers(project: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        app_container(document)["command"] = [
            "sh",
            "-c",
            f"alembic current && exec uvicorn {PACKAGE}.app:create_app --factory -w 1 --workers=$N",
        ]
        app_container(document).setdefault("env", []).append({"name": "N", "value": "5"})

    edit(project, DEPLOYMENT, change)


# ----------------------------------------------------------------------------- item 6


def env_from_secret(project: Path) -> None:
    edit(
        project,
        DEPLOYMENT,
        lambda d: app_container(d)["envFrom"].append({"secretRef": {"name": f"{APP}-tuning"}}),
    )


def secret_key_ref(project: Path) -> None:
    edit(
        project,
        DEPLOYMENT,
        lambda d: app_container(d)["env"].append(
            {
                "name": "POOL_SIZE",
                "valueFrom": {"secretKeyRef": {"name": f"{APP}-tuning", "key": "pool"}},
            }
        ),
    )


# ----------------------------------------------------------------------------- item 12


def max_unavailable_percentage(project: Path) -> None:
    edit(
        project,
        DEPLOYMENT,
        lambda d: d["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable="50%"),
    )


def migration_parallelism(project: Path) -> None:
    edit(project, MIGRATION, lambda job: job["spec"].update(parallelism=2))


def migration_through_pooler(project: Path) -> None:
    def change(job: dict[str, Any]) -> None:
        container = job["spec"]["template"]["spec"]["containers"][0]
        for item in container["env"]:
            if item["name"] == "DATABASE_URL":
                item["valueFrom"]["secretKeyRef"]["key"] = "pgbouncer-url"

    edit(project, MIGRATION, change)


# ----------------------------------------------------------------------------- item 8

POOLER = f"{BASE}/pooler.yaml"
POOLER_NAME = f"{APP}-pooler"


def pgbouncer_numbers(project: Path) -> dict[str, str]:
    """The rendered pgbouncer.ini's numbers, as a Pooler's spec.pgbouncer.parameters."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, allow_no_value=True)
    parser.read_string((project / "deploy/pgbouncer/pgbouncer.ini").read_text())
    names = ("max_client_conn", "default_pool_size", "reserve_pool_size", "max_db_connections")
    return {name: parser["pgbouncer"][name] for name in names}


def cnpg_pooler(
    instances: int | None, strategy: dict[str, Any] | None = None, keep_pgbouncer: bool = False
) -> Callable[[Path], None]:
    """PgBouncer run by CloudNativePG in place of deploy/pgbouncer, with the same numbers."""

    def change(project: Path) -> None:
        parameters = pgbouncer_numbers(project)
        if not keep_pgbouncer:
            edit(
                project,
                f"{BASE}/kustomization.yaml",
                lambda k: k["resources"].remove("../pgbouncer"),
            )
            shutil.rmtree(project / "deploy/pgbouncer")
        spec: dict[str, Any] = {
            "cluster": {"name": "main"},
            "type": "rw",
            "pgbouncer": {"poolMode": "transaction", "parameters": parameters},
        }
        if instances is not None:
            spec["instances"] = instances
        if strategy is not None:
            spec["deploymentStrategy"] = strategy
        pooler = {
            "apiVersion": "postgresql.cnpg.io/v1",
            "kind": "Pooler",
            "metadata": {"name": POOLER_NAME},
            "spec": spec,
        }
        add_document(POOLER, pooler)(project)

    return change


def cnpg_pooler_scaled_by_hpa(project: Path) -> None:
    cnpg_pooler(1, {"type": "Recreate"})(project)
    scaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": POOLER_NAME},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "postgresql.cnpg.io/v1",
                "kind": "Pooler",
                "name": POOLER_NAME,
            },
            "minReplicas": 1,
            "maxReplicas": 5,
        },
    }
    add_document(f"{BASE}/pooler-hpa.yaml", scaler)(project)


def cnpg_pooler_without_pgbouncer_answer(project: Path) -> None:
    pooler = {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Pooler",
        "metadata": {"name": POOLER_NAME},
        "spec": {"cluster": {"name": "main"}, "instances": 2, "type": "rw", "pgbouncer": {}},
    }
    add_document(POOLER, pooler)(project)


DEPLOY_ORIGIN = f"{DEPLOYMENT} (Deployment/{APP})"
CONTAINER = f"{DEPLOY_ORIGIN}: spec.template.spec.containers[0]"

ROWS = [
    # 1. Nothing unread.
    Row(
        "plain-manifests-without-kustomization",
        "k8s-sync",
        plain_folder,
        "unreadable",
        ("deploy/extra/worker.yaml: no kustomization or Helm chart under deploy/ reads it",),
    ),
    Row(
        "plain-manifests-excluded-with-a-reason",
        "k8s-sync",
        plain_folder_excluded,
        "fits",
        ("excluded by db/topology.toml [[excluded]], not counted:", "deploy/extra: applied by"),
    ),
    Row(
        "knative-service-runs-pods",
        "k8s-async",
        knative_service,
        "unreadable",
        (
            f"{BASE}/knative.yaml (Service/edge): serving.knative.dev/v1 Service edge:"
            " a Service runs",
        ),
    ),
    Row(
        "statefulset-counted",
        "k8s-sync",
        statefulset,
        "over",
        ("StatefulSet/ledger",),
    ),
    # 2. Which workloads are the service's.
    Row(
        "second-workload-with-registry-host-and-digest",
        "k8s-sync",
        registry_host_image,
        "over",
        ("connection budget exceeded", "Deployment/queue"),
    ),
    Row(
        "workload-written-with-the-images-newName",
        "k8s-async",
        renamed_by_images,
        "over",
        ("connection budget exceeded", "Deployment/queue"),
    ),
    Row(
        "batch-job-with-a-registry-host-image",
        "batch-job",
        batch_job_with_registry_host,
        "over",
        (
            f"{BASE}/backfill.yaml (Job/backfill): spec.parallelism=100"
            " -> connection budget exceeded",
        ),
    ),
    Row(
        "native-sidecar-runs-the-image",
        "k8s-sync",
        native_sidecar,
        "over",
        ("connection budget exceeded", f"Deployment/{APP} initContainers[0] outbox"),
    ),
    Row(
        "init-container-counts-with-its-own-env",
        "k8s-sync",
        init_container_own_env,
        "over",
        (f"{DEPLOY_ORIGIN}: spec.template.spec.initContainers[0].env[0] POOL_SIZE=40",),
    ),
    # 3. Helm.
    Row(
        "helm-chart-values-file-is-a-variant",
        "k8s-sync",
        helm_chart(60),
        "over",
        ("connection budget exceeded", "(values deploy/chart/values-prod.yaml)"),
        variant=f"{CHART}:prod",
    ),
    Row(
        "helm-chart-default-values-fit",
        "k8s-sync",
        helm_chart(2),
        "fits",
        ("Deployment/release-svc", "deploy/chart/templates/deployment.yaml"),
        variant=CHART,
    ),
    Row(
        "helm-chart-that-does-not-render",
        "k8s-sync",
        broken_chart,
        "unreadable",
        ("deploy/chart",),
        variant=CHART,
    ),
    # 4. Autoscalers and progressive delivery.
    Row(
        "keda-scaledobject-without-max-is-kedas-100",
        "k8s-sync",
        keda_in_place_of_hpa(None),
        "over",
        (
            f"{HPA} (ScaledObject/{APP}): spec.maxReplicaCount (not set: KEDA's default 100)=100"
            " -> connection budget exceeded",
        ),
    ),
    Row(
        "keda-scaledobject-max-replica-count",
        "k8s-async",
        keda_in_place_of_hpa(3),
        "fits",
        (f"replicas_max = 3  ({HPA} (ScaledObject/{APP}): spec.maxReplicaCount)",),
    ),
    Row(
        "argo-rollout-bluegreen-doubles",
        "k8s-sync",
        rollout({"blueGreen": {"activeService": APP}}, 5),
        "over",
        ("connection budget exceeded", "blueGreen"),
    ),
    Row(
        "argo-rollout-canary-steps",
        "k8s-sync",
        rollout({"canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}}, 3),
        "fits",
        (f"Rollout/{APP}",),
    ),
    Row(
        "argo-rollout-workload-ref",
        "k8s-sync",
        rollout_workload_ref,
        "fits",
        (f"Rollout/{APP}-rollout", "blueGreen"),
    ),
    Row(
        "hpa-on-a-workload-not-in-the-build",
        "k8s-sync",
        hpa_on_missing_target,
        "unreadable",
        (f"{HPA} (HorizontalPodAutoscaler/{APP}): HorizontalPodAutoscaler {APP} scales",),
    ),
    # 5. Processes per pod.
    Row(
        "uvicorn-workers-variable",
        "k8s-sync",
        uvicorn_workers,
        "over",
        ("data.UVICORN_WORKERS=4 -> more worker processes",),
    ),
    Row(
        "gunicorn-cmd-args",
        "k8s-async",
        gunicorn_command,
        "over",
        ("GUNICORN_CMD_ARGS --workers=3 -> more worker processes",),
    ),
    Row(
        "shell-form-last-workers-wins",
        "k8s-sync",
        shell_form_workers,
        "over",
        (f"{CONTAINER}.command/args --workers=5 -> more worker processes",),
    ),
    # 6. Secrets, both ways.
    Row(
        "env-from-secret-ref-may-set-pool-size",
        "k8s-sync",
        env_from_secret,
        "unreadable",
        ("POOL_SIZE comes from a Secret",),
    ),
    Row(
        "secret-key-ref-pool-size",
        "k8s-async",
        secret_key_ref,
        "unreadable",
        ("POOL_SIZE comes from a Secret",),
    ),
    # 8. Poolers: PgBouncer run by CloudNativePG's operator.
    Row(
        "cnpg-pooler-one-instance-recreate",
        "pgbouncer-tx",
        cnpg_pooler(1, {"type": "Recreate"}),
        "fits",
        (
            f"pgbouncer_replicas_max = 1  ({POOLER} (Pooler/{POOLER_NAME}): spec.instances)",
            f"{POOLER} (Pooler/{POOLER_NAME}): spec.pgbouncer [pgbouncer] default_pool_size",
        ),
    ),
    Row(
        "cnpg-pooler-instances-multiply-server-connections",
        "pgbouncer-tx",
        cnpg_pooler(5, {"type": "Recreate"}),
        "over",
        (f"{POOLER} (Pooler/{POOLER_NAME}): spec.instances=5", "connection budget exceeded"),
    ),
    Row(
        "cnpg-pooler-default-rollout-surges",
        "pgbouncer-tx",
        cnpg_pooler(None),
        "fits",
        (
            "3 pgbouncer instances x (20 default_pool_size",
            "pgbouncer_replicas_max = 1  (deploy/k8s/pooler.yaml (Pooler/poolwise-service-pooler):"
            " spec.instances (not set: CloudNativePG's default 1))",
            "pgbouncer_max_surge = 1  (deploy/k8s/pooler.yaml (Pooler/poolwise-service-pooler):"
            " spec.deploymentStrategy.rollingUpdate.maxSurge, declared 0)",
            "pgbouncer_terminating = 1  (deploy/k8s/pooler.yaml (Pooler/poolwise-service-pooler):"
            " every old pod (the Deployment it runs sets no minReadySeconds))",
        ),
    ),
    Row(
        "cnpg-pooler-scaled-by-an-hpa",
        "pgbouncer-tx",
        cnpg_pooler_scaled_by_hpa,
        "over",
        ("spec.maxReplicas=5", "connection budget exceeded"),
    ),
    Row(
        "cnpg-pooler-beside-the-pgbouncer-deployment",
        "pgbouncer-tx",
        cnpg_pooler(1, keep_pgbouncer=True),
        "unreadable",
        (f"{POOLER} (Pooler/{POOLER_NAME}) and deploy/pgbouncer/deployment.yaml",),
    ),
    Row(
        "cnpg-pooler-in-a-service-without-pgbouncer",
        "k8s-sync",
        cnpg_pooler_without_pgbouncer_answer,
        "unreadable",
        (f"{POOLER} (Pooler/{POOLER_NAME}): a CloudNativePG Pooler runs PgBouncer",),
    ),
    # 12. Branches no test pinned.
    Row(
        "max-unavailable-percentage-rounds-down",
        "k8s-sync",
        max_unavailable_percentage,
        "fits",
        ("(3 replicas_max + 1 max_surge + 2 terminating)", "maxSurge 1 + maxUnavailable 1"),
    ),
    Row(
        "migration-job-parallelism-2",
        "k8s-sync",
        migration_parallelism,
        "over",
        (f"{MIGRATION} (Job/{APP}-migrate): spec.parallelism=2 -> the connection budget counts 1",),
    ),
    Row(
        "migration-job-through-the-pooler",
        "pgbouncer-tx",
        migration_through_pooler,
        "over",
        ("DATABASE_URL from Secret key 'pgbouncer-url' -> migrations must connect",),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_a_k8s_shape_is_counted_or_refused_by_name(
    rendered: Callable[[str], Path], tmp_path: Path, row: Row
) -> None:
    judge(rendered, tmp_path, row)


def test_a_missing_kustomize_fails_never_skips(
    rendered: Callable[[str], Path], tmp_path: Path
) -> None:
    """Without kubectl or kustomize nothing is read: the generated test fails and the CLI
    exits 2, both with the fix."""
    project = tmp_path / "project"
    shutil.copytree(rendered("k8s-sync"), project)
    path = path_without_kustomize(tmp_path)
    missing = f"{BASE}: building it needs kustomize"
    tested = budget_test(project, path=path, verbose=True)
    assert tested.returncode == 1, tested.stdout[-4000:]
    assert "SKIPPED" not in tested.stdout and missing in tested.stdout, tested.stdout[-4000:]
    assert "install kubectl" in tested.stdout, tested.stdout[-4000:]
    command = budget_command(project, path=path)
    assert command.returncode == 2, command.stdout + command.stderr
    assert command.stderr.startswith(f"cannot read {BASE}: {missing}"), command.stderr


def test_exclusion_without_a_reason_is_refused(
    rendered: Callable[[str], Path], tmp_path: Path
) -> None:
    kubectl("an exclusion checked against deploy/")
    project = tmp_path / "project"
    shutil.copytree(rendered("k8s-sync"), project)
    plain_folder(project)
    with (project / TOPOLOGY).open("a") as toml:
        toml.write('\n[[excluded]]\npath = "deploy/extra"\nreason = ""\n')
    command = budget_command(project)
    assert command.returncode == 2, command.stdout + command.stderr
    first = command.stderr.splitlines()[0]
    assert "excluded[0] (deploy/extra) has no reason" in first, command.stderr


# ----------------------------------------------------------------------------- item 9

# What `poolwise fleet` and `doctor` carry in their environment on the platform's machines.
PLATFORM_SECRET = "platform-pw-0f3a9c"


def generated_pool_size(
    project: Path, entry: str, field: str = "files", kind: str = "configMapGenerator"
) -> None:
    """A generator the base reads POOL_SIZE from, and a container that takes it."""

    def generate(kustomization: dict[str, Any]) -> None:
        generator = {"name": f"{APP}-extra", "options": {"disableNameSuffixHash": True}}
        generator[field] = [entry]
        kustomization.setdefault(kind, []).append(generator)

    edit(project, f"{BASE}/kustomization.yaml", generate)
    reference = "secretRef" if kind == "secretGenerator" else "configMapRef"
    edit(
        project,
        DEPLOYMENT,
        lambda d: app_container(d)["envFrom"].append({reference: {"name": f"{APP}-extra"}}),
    )


@pytest.mark.parametrize(
    ("source", "first_line"),
    [
        ("process-environment", "security; file '/proc/self/environ' is not in or below"),
        ("symlink-out-of-deploy", "is not in or below"),
        ("secret-generator", "POOL_SIZE comes from a Secret"),
    ],
)
def test_what_comes_from_outside_deploy_or_a_secret_is_refused_and_never_echoed(
    rendered: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    first_line: str,
) -> None:
    """Item 9: kustomize keeps its default load restrictions, so a generator cannot read the
    process's environment or a file outside the service through a symlink; a Secret's value is
    named, never shown. The budget test, `poolwise budget` and `poolwise fleet` all refuse it,
    and none of them prints the secret."""
    kubectl("kustomize's load restrictions")
    monkeypatch.setenv("POOLWISE_PLATFORM_DSN", f"postgresql://platform:{PLATFORM_SECRET}@db/app")
    project = tmp_path / "project"
    shutil.copytree(rendered("k8s-sync"), project)
    if source == "process-environment":
        generated_pool_size(project, "POOL_SIZE=/proc/self/environ")
    elif source == "symlink-out-of-deploy":
        outside = tmp_path / "platform.env"
        outside.write_text(f"{PLATFORM_SECRET}\n")
        (project / BASE / "pool-size.txt").symlink_to(outside)
        generated_pool_size(project, "POOL_SIZE=pool-size.txt")
    else:
        generated_pool_size(project, f"POOL_SIZE={PLATFORM_SECRET}", "literals", "secretGenerator")
    tested = budget_test(project)
    command = budget_command(project)
    fleet = in_project(project, "-m", "poolwise", "fleet", str(project))
    shown = "\n".join(
        f"--- {name}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
        for name, run in (("pytest", tested), ("budget", command), ("fleet", fleet))
    )
    assert (tested.returncode, command.returncode, fleet.returncode) == (1, 2, 2), shown
    assert first_line in command.stderr.splitlines()[0], shown
    assert first_line in fleet.stdout + fleet.stderr, shown
    assert PLATFORM_SECRET not in shown, shown
