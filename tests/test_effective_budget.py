"""The effective budget: what deploy/ would really apply, edited the ways teams edit it.

Each row renders one answer set (once per worker), copies it, edits deploy/ (or the platform's
limits) the way the issue lists, then runs both readers of poolwise.deployed in the project: the
generated `pytest tests/test_connection_budget.py` and `poolwise budget`.
They must agree on the verdict, and both must name the file and field that moved the budget.
Edits the loader handles (a sidecar, two documents in one file, ...) must keep passing, with the
CLI table showing that they were counted right. A few rows restore deploy/ and pass again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from rendering import clean_env, render
from tools import kubectl

PACKAGE = "poolwise_service"
APP = "poolwise-service"
CONFIG = f"{APP}-config"
BUDGET_TEST = "tests/test_connection_budget.py"
FITS_TEST = f"{BUDGET_TEST}::test_the_deployment_fits_the_connection_budget"
LIMITS = f"src/{PACKAGE}/db/database_limits.toml"
BASE = "deploy/k8s"
SAM = "deploy/lambda/template.yaml"
OVERLAY = "deploy/overlays/prod"

ANSWERS: dict[str, dict[str, Any]] = {
    "k8s-sync": {"target": "k8s-sync"},
    "k8s-async": {"target": "k8s-async"},
    "batch-cronjob": {"target": "batch"},
    "batch-job": {"target": "batch", "batch_schedule": ""},
    "lambda": {"target": "lambda"},
    "pgbouncer-tx": {"target": "k8s-sync", "pooler": "pgbouncer"},
    "pgbouncer-session": {
        "target": "k8s-sync",
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "session",
    },
    "asyncpg-pgbouncer-session": {
        "target": "k8s-async",
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "session",
        "driver": "asyncpg",
    },
    "lambda-pgbouncer-pool": {"target": "lambda", "pooler": "pgbouncer", "null_pool": False},
    "rds-proxy": {"target": "k8s-sync", "pooler": "rds-proxy"},
    "lambda-rds-proxy": {"target": "lambda", "pooler": "rds-proxy"},
}
# The generated pytest's exit code and the CLI's: past the budget both exit 1; a deploy/ that
# cannot be read fails the test and is the CLI's exit 2 ("unreadable"), never a pass.
VERDICTS = {"fits": (0, 0), "over": (1, 1), "unreadable": (1, 2)}


# ----------------------------------------------------------------------------- editing helpers


def replace_once(project: Path, relative: str, old: str, new: str) -> None:
    path = project / relative
    text = path.read_text()
    assert text.count(old) == 1, f"{relative} should hold {old!r} once"
    path.write_text(text.replace(old, new))


def load(project: Path, relative: str) -> dict[str, Any]:
    return yaml.safe_load((project / relative).read_text())


def dump(project: Path, relative: str, *documents: dict[str, Any]) -> None:
    path = project / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))


def edit(project: Path, relative: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Load one YAML document, change it in place, write it back."""
    document = load(project, relative)
    change(document)
    dump(project, relative, document)


def add_resource(project: Path, directory: str, entry: str) -> None:
    edit(project, f"{directory}/kustomization.yaml", lambda k: k["resources"].append(entry))


def remove_resource(project: Path, directory: str, entry: str) -> None:
    edit(project, f"{directory}/kustomization.yaml", lambda k: k["resources"].remove(entry))
    (project / directory / entry).unlink()


def app_container(document: dict[str, Any]) -> dict[str, Any]:
    if document["kind"] == "CronJob":
        pod = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    else:
        pod = document["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] in ("api", "job"))


def containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] == "CronJob":
        return document["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return document["spec"]["template"]["spec"]["containers"]


def hpa_patch(target: str, max_replicas: int) -> dict[str, Any]:
    """A kustomize JSON6902 patch of one HPA's maxReplicas."""
    return {
        "target": {"kind": "HorizontalPodAutoscaler", "name": target},
        "patch": f"- op: replace\n  path: /spec/maxReplicas\n  value: {max_replicas}\n",
    }


def set_data(project: Path, relative: str, **values: str) -> None:
    def change(configmap: dict[str, Any]) -> None:
        configmap["data"].update(values)

    edit(project, relative, change)


# ----------------------------------------------------------------------------- the edits


def patch_hpa_in_base(project: Path) -> None:
    edit(
        project,
        f"{BASE}/kustomization.yaml",
        lambda k: k.setdefault("patches", []).append(hpa_patch(APP, 60)),
    )


def add_prod_overlay(project: Path) -> None:
    dump(
        project,
        f"{OVERLAY}/kustomization.yaml",
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../k8s"],
            "patches": [hpa_patch(APP, 30)],
            # The base's ConfigMap, merged: under any other name kustomize refuses the overlay.
            "configMapGenerator": [
                {
                    "name": CONFIG,
                    "namespace": APP,
                    "behavior": "merge",
                    "literals": ["POOL_SIZE=3"],
                }
            ],
        },
    )


def overlay_merges_an_unknown_configmap(project: Path) -> None:
    add_prod_overlay(project)
    edit(
        project,
        f"{OVERLAY}/kustomization.yaml",
        lambda k: k["configMapGenerator"][0].update(name=f"{APP}-settings"),
    )


def replicas_entry(count: int) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        edit(
            project,
            f"{BASE}/kustomization.yaml",
            lambda k: k.setdefault("replicas", []).append({"name": APP, "count": count}),
        )

    return apply


def add_worker_deployment(project: Path) -> None:
    labels = {"app.kubernetes.io/name": f"{APP}-worker"}
    dump(
        project,
        f"{BASE}/worker.yaml",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": f"{APP}-worker"},
            "spec": {
                "replicas": 20,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "worker",
                                "image": APP,
                                "envFrom": [{"configMapRef": {"name": CONFIG}}],
                            }
                        ]
                    },
                },
            },
        },
    )
    add_resource(project, BASE, "worker.yaml")


def sidecar_first(workload_file: str) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        sidecar = {"name": "log-shipper", "image": "fluent/fluent-bit:3.0"}
        edit(project, f"{BASE}/{workload_file}", lambda doc: containers(doc).insert(0, sidecar))

    return apply


def pool_size_from_another_configmap(project: Path) -> None:
    dump(
        project,
        f"{BASE}/pool-configmap.yaml",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{APP}-pool"},
            "data": {"POOL_SIZE": "50"},
        },
    )
    add_resource(project, BASE, "pool-configmap.yaml")
    reference = {"configMapKeyRef": {"name": f"{APP}-pool", "key": "POOL_SIZE"}}
    edit(
        project,
        f"{BASE}/deployment.yaml",
        lambda doc: app_container(doc)["env"].append({"name": "POOL_SIZE", "valueFrom": reference}),
    )


def workers_in_command(module: str) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        command = ["uvicorn", module, "--factory", "--workers", "8"]
        edit(
            project,
            f"{BASE}/deployment.yaml",
            lambda doc: app_container(doc).update(command=command),
        )

    return apply


def hpa_on_pgbouncer(project: Path) -> None:
    name = f"{APP}-pgbouncer"
    dump(
        project,
        "deploy/pgbouncer/hpa.yaml",
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": 1,
                "maxReplicas": 5,
            },
        },
    )
    add_resource(project, "deploy/pgbouncer", "hpa.yaml")


def second_sam_function(project: Path) -> None:
    function = (
        "  WorkerFunction:\n"
        "    Type: AWS::Serverless::Function\n"
        "    Metadata:\n"
        "      Dockerfile: Dockerfile\n"
        "      DockerContext: ../..\n"
        "    Properties:\n"
        "      PackageType: Image\n"
        "      ImageConfig:\n"
        "        Command:\n"
        f"          - {PACKAGE}.handler.handler\n"
        "      ReservedConcurrentExecutions: 200\n"
        "\n"
    )
    marker = "  # Alembic `upgrade head`"
    replace_once(project, SAM, marker, function + marker)


def second_batch_workload(workload_file: str, parallelism: int = 60) -> Callable[[Path], None]:
    """A copy of the CronJob (or Job) under another name, with more pods at once."""

    def apply(project: Path) -> None:
        document = load(project, f"{BASE}/{workload_file}")
        document["metadata"]["name"] = f"{APP}-backfill"
        job = (
            document["spec"]["jobTemplate"]["spec"]
            if document["kind"] == "CronJob"
            else (document["spec"])
        )
        job["parallelism"] = parallelism
        dump(project, f"{BASE}/backfill.yaml", document)
        add_resource(project, BASE, "backfill.yaml")

    return apply


def backfill_replaces_its_last_run(project: Path) -> None:
    edit(
        project,
        f"{BASE}/backfill.yaml",
        lambda cronjob: cronjob["spec"].update(concurrencyPolicy="Replace"),
    )


def no_hpa_and_replicas(count: int) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        remove_resource(project, BASE, "hpa.yaml")
        edit(project, f"{BASE}/deployment.yaml", lambda doc: doc["spec"].update(replicas=count))

    return apply


def delete_configmap(project: Path) -> None:
    remove_resource(project, BASE, "configmap.yaml")


def two_documents_in_one_file(into: str, moved: str) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        second = (project / BASE / moved).read_text()
        target = project / BASE / into
        target.write_text(f"{target.read_text()}---\n{second}")
        remove_resource(project, BASE, moved)

    return apply


def pool_below_minimum(project: Path) -> None:
    set_data(project, f"{BASE}/configmap.yaml", POOL_SIZE="0", POOL_MAX_OVERFLOW="-1")


def sam_pool_below_minimum(project: Path) -> None:
    replace_once(project, SAM, 'POOL_SIZE: "1"\n', 'POOL_SIZE: "0"\n')
    replace_once(project, SAM, 'POOL_MAX_OVERFLOW: "0"\n', 'POOL_MAX_OVERFLOW: "-1"\n')


def batch_below_minimum(project: Path) -> None:
    set_data(project, f"{BASE}/configmap.yaml", BATCH_SIZE="0", BATCH_PROCESSES="0")


def hpa_max_replicas(count: int) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        replace_once(project, f"{BASE}/hpa.yaml", "maxReplicas: 3\n", f"maxReplicas: {count}\n")

    return apply


def pgbouncer_transaction_mode(project: Path) -> None:
    replace_once(
        project,
        "deploy/pgbouncer/pgbouncer.ini",
        "pool_mode = session\n",
        "pool_mode = transaction\n",
    )


def no_min_ready_seconds(project: Path) -> None:
    edit(project, f"{BASE}/deployment.yaml", lambda doc: doc["spec"].pop("minReadySeconds"))


def pgbouncer_rolling_update(project: Path) -> None:
    replace_once(
        project,
        "deploy/pgbouncer/deployment.yaml",
        "    type: Recreate\n",
        "    type: RollingUpdate\n",
    )


def other_consumers(count: int) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        replace_once(project, LIMITS, "other_consumers = 0\n", f"other_consumers = {count}\n")

    return apply


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        for change in edits:
            change(project)

    return apply


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    id: str
    answers: str
    edit: Callable[[Path], None]
    verdict: str
    # In the generated pytest's output and in the CLI's; for "fits", in the CLI's table.
    fragments: tuple[str, ...]
    # The variant whose budget test must report the verdict (FAILED / PASSED).
    variant: str = BASE
    # Restore deploy/ and the limits afterwards, and both must pass again.
    restore: bool = False


ROWS = [
    # 1. A kustomize patch in the base raises the HPA.
    Row(
        "patch-raises-hpa-max-replicas",
        "k8s-sync",
        patch_hpa_in_base,
        "over",
        (
            "deploy/k8s/hpa.yaml (HorizontalPodAutoscaler/poolwise-service, changed by"
            " deploy/k8s/kustomization.yaml): spec.maxReplicas=60 -> connection budget exceeded,"
            " app -> database: Deployment/poolwise-service: (60 replicas_max + 1 max_surge"
            " + 1 terminating) x 1 workers_per_pod x (5 pool_size + 5 max_overflow) = 620",
        ),
        restore=True,
    ),
    Row(
        "patch-raises-hpa-max-replicas-async",
        "k8s-async",
        patch_hpa_in_base,
        "over",
        (
            "deploy/k8s/hpa.yaml (HorizontalPodAutoscaler/poolwise-service, changed by"
            " deploy/k8s/kustomization.yaml): spec.maxReplicas=60 -> connection budget exceeded",
            "(60 replicas_max + 1 max_surge + 1 terminating) x 1 workers_per_pod"
            " x (8 pool_size + 8 max_overflow) = 992",
        ),
    ),
    # 2. An overlay the base does not know about is a variant of its own; the base still fits.
    Row(
        "overlay-patch-and-configmap-merge",
        "k8s-sync",
        add_prod_overlay,
        "over",
        (
            "deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config, changed by"
            " deploy/overlays/prod/kustomization.yaml): data.POOL_SIZE=3;"
            " deploy/k8s/hpa.yaml (HorizontalPodAutoscaler/poolwise-service, changed by"
            " deploy/overlays/prod/kustomization.yaml): spec.maxReplicas=30 -> connection budget"
            " exceeded, app -> database: Deployment/poolwise-service: (30 replicas_max"
            " + 1 max_surge + 1 terminating) x 1 workers_per_pod x (3 pool_size + 5 max_overflow)"
            " = 256",
        ),
        variant=OVERLAY,
        restore=True,
    ),
    Row(
        "overlay-merge-of-an-unknown-configmap",
        "k8s-sync",
        overlay_merges_an_unknown_configmap,
        "unreadable",
        (
            "deploy/overlays/prod: kustomize cannot build it",
            "poolwise-service-settings",
            "does not exist; cannot merge or replace",
        ),
        variant=OVERLAY,
    ),
    # 3. A replicas: entry sets spec.replicas above the HPA's maxReplicas.
    Row(
        "replicas-entry-above-hpa",
        "k8s-sync",
        replicas_entry(30),
        "over",
        (
            "deploy/k8s/deployment.yaml (Deployment/poolwise-service, changed by"
            " deploy/k8s/kustomization.yaml): spec.replicas=30 -> more pods than"
            " deploy/k8s/hpa.yaml (HorizontalPodAutoscaler/poolwise-service, changed by"
            " deploy/k8s/kustomization.yaml): spec.maxReplicas=3",
        ),
    ),
    # 4. Every Deployment running the image counts, each with its own pools.
    Row(
        "second-deployment-is-summed",
        "k8s-sync",
        add_worker_deployment,
        "over",
        (
            "deploy/k8s/worker.yaml (Deployment/poolwise-service-worker): spec.replicas=20;",
            "[Deployment/poolwise-service: (3 replicas_max + 1 max_surge + 1 terminating)"
            " x 1 workers_per_pod x (5 pool_size + 5 max_overflow) = 50]"
            " + [Deployment/poolwise-service-worker: (20 replicas_max + 5 max_surge"
            " + 20 terminating) x 1 workers_per_pod x (5 pool_size + 5 max_overflow) = 450]"
            " = 500 + 1 migration = 501 > 97 available",
        ),
    ),
    # 5. A sidecar placed first: the app container is found by name, the sidecar not counted.
    Row(
        "sidecar-first-is-not-the-app",
        "k8s-sync",
        sidecar_first("deployment.yaml"),
        "fits",
        (
            "[ok] app -> database: Deployment/poolwise-service: (3 replicas_max + 1 max_surge"
            " + 1 terminating) x 1 workers_per_pod x (5 pool_size + 5 max_overflow) = 50"
            " + 1 migration = 51 <= 97",
        ),
    ),
    Row(
        "sidecar-first-is-not-the-batch-job",
        "batch-cronjob",
        sidecar_first("cronjob.yaml"),
        "fits",
        (
            "[ok] app -> database: CronJob/poolwise-service: 1 concurrent runs"
            " x 2 batch_parallelism x 1 batch_processes x 1 (NullPool) = 2 + 1 migration = 3",
        ),
    ),
    # 6. env valueFrom.configMapKeyRef is read from the ConfigMap it names.
    Row(
        "pool-size-from-config-map-key-ref",
        "k8s-sync",
        pool_size_from_another_configmap,
        "over",
        (
            "deploy/k8s/pool-configmap.yaml (ConfigMap/poolwise-service-pool): data.POOL_SIZE=50"
            " and deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config):"
            " data.POOL_MAX_OVERFLOW=5 -> 55 connections per process",
            "deploy/k8s/pool-configmap.yaml (ConfigMap/poolwise-service-pool): data.POOL_SIZE=50"
            " -> connection budget exceeded, app -> database:",
        ),
    ),
    Row(
        "pool-size-from-config-map-key-ref-behind-pgbouncer",
        "pgbouncer-tx",
        pool_size_from_another_configmap,
        "over",
        (
            "deploy/k8s/pool-configmap.yaml (ConfigMap/poolwise-service-pool): data.POOL_SIZE=50"
            " and deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config):"
            " data.POOL_MAX_OVERFLOW=2 -> 52 connections per process",
            "data.POOL_SIZE=50 -> connection budget exceeded, app -> pgbouncer:",
        ),
    ),
    # 7. --workers in the container's command multiplies like WEB_CONCURRENCY.
    Row(
        "workers-in-command",
        "k8s-sync",
        workers_in_command(f"{PACKAGE}.app:create_app"),
        "over",
        (
            "deploy/k8s/deployment.yaml (Deployment/poolwise-service):"
            " spec.template.spec.containers[0].command/args --workers=8 -> more worker processes"
            " than src/poolwise_service/db/topology.toml declares (workers_per_pod = 1)",
            "--workers=8 -> connection budget exceeded, app -> database:"
            " Deployment/poolwise-service: (3 replicas_max + 1 max_surge + 1 terminating)"
            " x 8 workers_per_pod",
        ),
    ),
    Row(
        "workers-in-command-async",
        "k8s-async",
        workers_in_command(f"{PACKAGE}.app:create_app"),
        "over",
        (
            "deploy/k8s/deployment.yaml (Deployment/poolwise-service):"
            " spec.template.spec.containers[0].command/args --workers=8 -> more worker processes",
        ),
    ),
    # 8. Every PgBouncer instance opens its own server pool.
    Row(
        "hpa-on-pgbouncer",
        "pgbouncer-tx",
        hpa_on_pgbouncer,
        "over",
        (
            "deploy/pgbouncer/hpa.yaml (HorizontalPodAutoscaler/poolwise-service-pgbouncer):"
            " spec.maxReplicas=5 -> connection budget exceeded, pgbouncer -> database:"
            " 5 pgbouncer instances x (20 default_pool_size x 1 database x 1 user"
            " + 0 reserve_pool_size) = 100 + 1 migration = 101 > 97 available",
        ),
    ),
    # 9. Every SAM function running the image counts.
    Row(
        "second-sam-function",
        "lambda",
        second_sam_function,
        "over",
        (
            "deploy/lambda/template.yaml: Resources.WorkerFunction.Properties"
            ".ReservedConcurrentExecutions=200 -> connection budget exceeded, app -> database:"
            " [Function/ServiceFunction: 10 lambda_reserved_concurrency x 1 (NullPool) = 10]"
            " + [Function/WorkerFunction: 200 lambda_reserved_concurrency x 1 (NullPool) = 200]"
            " = 210 + 1 migration = 211 > 97 available",
        ),
        variant=SAM,
        restore=True,
    ),
    Row(
        "second-sam-function-behind-pgbouncer",
        "lambda-pgbouncer-pool",
        second_sam_function,
        "over",
        (
            "deploy/lambda/template.yaml: Resources.WorkerFunction.Properties"
            ".ReservedConcurrentExecutions=200 -> connection budget exceeded, app -> pgbouncer:",
            "[Function/WorkerFunction: 200 lambda_reserved_concurrency"
            " x (1 pool_size + 0 max_overflow) = 200] = 210 > 20 max_client_conn",
        ),
        variant=SAM,
    ),
    # 10. Every CronJob and Job running the image counts. With NullPool a second CronJob of 60
    # pods still fits 97 (2 + 60 + 1 migration); as Replace it counts two runs and does not.
    Row(
        "second-cronjob-is-summed",
        "batch-cronjob",
        second_batch_workload("cronjob.yaml"),
        "fits",
        (
            "[ok] app -> database: [CronJob/poolwise-service: 1 concurrent runs"
            " x 2 batch_parallelism x 1 batch_processes x 1 (NullPool) = 2]"
            " + [CronJob/poolwise-service-backfill: 1 concurrent runs x 60 batch_parallelism"
            " x 1 batch_processes x 1 (NullPool) = 60] = 62 + 1 migration = 63 <= 97",
        ),
    ),
    Row(
        "second-cronjob-replace-is-over",
        "batch-cronjob",
        both(second_batch_workload("cronjob.yaml"), backfill_replaces_its_last_run),
        "over",
        (
            "deploy/k8s/backfill.yaml (CronJob/poolwise-service-backfill):"
            " spec.concurrencyPolicy=Replace; deploy/k8s/backfill.yaml"
            " (CronJob/poolwise-service-backfill): spec.jobTemplate.spec.parallelism=60"
            " -> connection budget exceeded, app -> database:",
            "[CronJob/poolwise-service-backfill: 2 concurrent runs x 60 batch_parallelism"
            " x 1 batch_processes x 1 (NullPool) = 120] = 122 + 1 migration = 123 > 97",
        ),
    ),
    Row(
        "second-job-is-summed-and-over",
        "batch-job",
        second_batch_workload("job.yaml", parallelism=100),
        "over",
        (
            "deploy/k8s/backfill.yaml (Job/poolwise-service-backfill): spec.parallelism=100"
            " -> connection budget exceeded, app -> database: [Job/poolwise-service:",
            "= 102 + 1 migration = 103 > 97 available",
        ),
    ),
    # 11. Without an HPA spec.replicas is the count: a formula, never a crash.
    Row(
        "no-hpa-replicas-30",
        "k8s-sync",
        no_hpa_and_replicas(30),
        "over",
        (
            "deploy/k8s/deployment.yaml (Deployment/poolwise-service): spec.replicas=30 ->"
            " connection budget exceeded, app -> database: Deployment/poolwise-service:"
            " (30 replicas_max + 1 max_surge + 1 terminating) x 1 workers_per_pod"
            " x (5 pool_size + 5 max_overflow) = 320 + 1 migration = 321 > 97",
        ),
        restore=True,
    ),
    Row(
        "no-hpa-replicas-30-async",
        "k8s-async",
        no_hpa_and_replicas(30),
        "over",
        ("deploy/k8s/deployment.yaml (Deployment/poolwise-service): spec.replicas=30 ->",),
    ),
    Row(
        "no-hpa-replicas-2",
        "k8s-sync",
        no_hpa_and_replicas(2),
        "fits",
        (
            "(2 replicas_max + 1 max_surge + 1 terminating) x 1 workers_per_pod"
            " x (5 pool_size + 5 max_overflow) = 40 + 1 migration = 41 <= 97",
            "replicas_max = 2  (deploy/k8s/deployment.yaml (Deployment/poolwise-service):"
            " spec.replicas, declared 3)",
        ),
    ),
    # 12. A missing ConfigMap is one line naming the envFrom reference.
    Row(
        "configmap-deleted",
        "k8s-sync",
        delete_configmap,
        "unreadable",
        (
            "deploy/k8s/deployment.yaml (Deployment/poolwise-service): envFrom[0] of"
            " spec.template.spec.containers[0] (configMapRef poolwise-service-config): the"
            " ConfigMap is not under deploy/, and it may set POOL_SIZE; fix: set POOL_SIZE with"
            " value: or from a ConfigMap under deploy/",
        ),
        restore=True,
    ),
    Row(
        "configmap-deleted-batch",
        "batch-cronjob",
        delete_configmap,
        "unreadable",
        (
            "deploy/k8s/cronjob.yaml (CronJob/poolwise-service): envFrom[0] of"
            " spec.jobTemplate.spec.template.spec.containers[0] (configMapRef"
            " poolwise-service-config): the ConfigMap is not under deploy/",
        ),
    ),
    # 13. A file of two YAML documents: both are read.
    Row(
        "service-in-deployment-file",
        "k8s-sync",
        two_documents_in_one_file("deployment.yaml", "service.yaml"),
        "fits",
        ("= 50 + 1 migration = 51 <= 97",),
    ),
    Row(
        "hpa-in-deployment-file",
        "k8s-sync",
        two_documents_in_one_file("deployment.yaml", "hpa.yaml"),
        "fits",
        (
            "replicas_max = 3  (deploy/k8s/deployment.yaml"
            " (HorizontalPodAutoscaler/poolwise-service): spec.maxReplicas)",
        ),
    ),
    Row(
        "configmap-in-cronjob-file",
        "batch-cronjob",
        two_documents_in_one_file("cronjob.yaml", "configmap.yaml"),
        "fits",
        (
            "batch_processes = 1  (deploy/k8s/cronjob.yaml (ConfigMap/poolwise-service-config):"
            " data.BATCH_PROCESSES)",
        ),
    ),
    # 14. A pool SQLAlchemy reads as unbounded.
    Row(
        "pool-below-minimum",
        "k8s-sync",
        pool_below_minimum,
        "over",
        (
            "deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config): data.POOL_SIZE=0"
            " -> pool_size must be >= 1; SQLAlchemy reads smaller values as an unbounded pool",
            "deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config):"
            " data.POOL_MAX_OVERFLOW=-1 -> max_overflow must be >= 0",
        ),
    ),
    Row(
        "pool-below-minimum-lambda",
        "lambda-pgbouncer-pool",
        sam_pool_below_minimum,
        "over",
        (
            "deploy/lambda/template.yaml: Resources.ServiceFunction.Properties.Environment"
            ".Variables.POOL_SIZE=0 -> pool_size must be >= 1",
            "deploy/lambda/template.yaml: Resources.ServiceFunction.Properties.Environment"
            ".Variables.POOL_MAX_OVERFLOW=-1 -> max_overflow must be >= 0",
        ),
        variant=SAM,
    ),
    # 15. Batch numbers below their minimum.
    Row(
        "batch-below-minimum-cronjob",
        "batch-cronjob",
        batch_below_minimum,
        "over",
        (
            "deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config): data.BATCH_SIZE=0"
            " -> batch_size must be >= 1; fix BATCH_SIZE",
            "deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config):"
            " data.BATCH_PROCESSES=0 -> batch_processes must be >= 1; fix BATCH_PROCESSES",
        ),
    ),
    Row(
        "batch-below-minimum-job",
        "batch-job",
        batch_below_minimum,
        "over",
        (
            "data.BATCH_SIZE=0 -> batch_size must be >= 1",
            "data.BATCH_PROCESSES=0 -> batch_processes must be >= 1",
        ),
    ),
    # 16. Session mode pins a server connection per client connection.
    Row(
        "session-mode-hpa-10",
        "pgbouncer-session",
        hpa_max_replicas(10),
        "over",
        (
            "deploy/k8s/hpa.yaml (HorizontalPodAutoscaler/poolwise-service): spec.maxReplicas=10"
            " -> connection budget exceeded, app -> pgbouncer: Deployment/poolwise-service:"
            " (10 replicas_max + 1 max_surge + 1 terminating) x 1 workers_per_pod"
            " x (2 pool_size + 2 max_overflow) = 48 > 40 max_client_conn",
            "spec.maxReplicas=10 -> connection budget exceeded, app -> pgbouncer session pool:"
            " Deployment/poolwise-service: (10 replicas_max + 1 max_surge + 1 terminating)"
            " x 1 workers_per_pod x (2 pool_size + 2 max_overflow) = 48 > 20 server connections",
        ),
    ),
    # 17. asyncpg cannot run behind transaction mode.
    Row(
        "asyncpg-behind-transaction-mode",
        "asyncpg-pgbouncer-session",
        pgbouncer_transaction_mode,
        "over",
        (
            "deploy/pgbouncer/pgbouncer.ini (via deploy/pgbouncer/kustomization.yaml) [pgbouncer]"
            " pool_mode=transaction: asyncpg behind PgBouncer pool_mode=transaction -> asyncpg"
            " prepares statements on the server",
        ),
    ),
    # 18. Without minReadySeconds every old pod may still hold its pool during a rollout.
    Row(
        "no-min-ready-seconds",
        "k8s-sync",
        no_min_ready_seconds,
        "fits",
        (
            "(3 replicas_max + 1 max_surge + 3 terminating) x 1 workers_per_pod"
            " x (5 pool_size + 5 max_overflow) = 70 + 1 migration = 71 <= 97",
            "terminating = 3  (deploy/k8s/deployment.yaml (Deployment/poolwise-service): every"
            " old pod (spec.minReadySeconds 0 < terminationGracePeriodSeconds 30",
        ),
    ),
    # 19. A rolling PgBouncer runs its surge pod next to the old one.
    Row(
        "pgbouncer-rolling-update",
        "pgbouncer-tx",
        pgbouncer_rolling_update,
        "fits",
        (
            "[ok] pgbouncer -> database: 3 pgbouncer instances x (20 default_pool_size"
            " x 1 database x 1 user + 0 reserve_pool_size) = 60 + 1 migration = 61 <= 97",
            "pgbouncer_max_surge = 1  (deploy/pgbouncer/deployment.yaml"
            " (Deployment/poolwise-service-pgbouncer): spec.strategy.rollingUpdate.maxSurge,"
            " declared 0)",
        ),
    ),
    Row(
        "pgbouncer-rolling-update-past-a-smaller-database",
        "pgbouncer-tx",
        both(pgbouncer_rolling_update, other_consumers(40)),
        "over",
        (
            "deploy/pgbouncer/deployment.yaml (Deployment/poolwise-service-pgbouncer):"
            " spec.strategy.rollingUpdate.maxSurge=1;"
            " src/poolwise_service/db/database_limits.toml: database.other_consumers=40"
            " -> connection budget exceeded, pgbouncer -> database: 3 pgbouncer instances",
        ),
    ),
    # 20. The platform's limits shrink.
    Row(
        "other-consumers-80",
        "k8s-sync",
        other_consumers(80),
        "over",
        (
            "src/poolwise_service/db/database_limits.toml: database.other_consumers=80 ->"
            " connection budget exceeded, app -> database: Deployment/poolwise-service:"
            " (3 replicas_max + 1 max_surge + 1 terminating) x 1 workers_per_pod"
            " x (5 pool_size + 5 max_overflow) = 50 + 1 migration = 51 > 17 available",
        ),
        restore=True,
    ),
    Row(
        "other-consumers-80-pgbouncer",
        "pgbouncer-tx",
        other_consumers(80),
        "over",
        (
            "src/poolwise_service/db/database_limits.toml: database.other_consumers=80 ->"
            " connection budget exceeded, pgbouncer -> database: 20 default_pool_size",
        ),
    ),
    Row(
        "other-consumers-90-lambda",
        "lambda",
        other_consumers(90),
        "over",
        (
            "src/poolwise_service/db/database_limits.toml: database.other_consumers=90 ->"
            " connection budget exceeded, app -> database: Function/ServiceFunction:"
            " 10 lambda_reserved_concurrency x 1 (NullPool) = 10 + 1 migration = 11 > 7",
        ),
        variant=SAM,
    ),
    Row(
        "other-consumers-95-batch-job",
        "batch-job",
        other_consumers(95),
        "over",
        (
            "src/poolwise_service/db/database_limits.toml: database.other_consumers=95 ->"
            " connection budget exceeded, app -> database: Job/poolwise-service:"
            " 1 concurrent runs x 2 batch_parallelism x 1 batch_processes x 1 (NullPool) = 2"
            " + 1 migration = 3 > 2",
        ),
    ),
    # RDS Proxy's borrow timeout at its 120 s default: saturation hangs instead of failing fast.
    Row(
        "rds-proxy-borrow-timeout-default",
        "rds-proxy",
        lambda project: replace_once(
            project,
            "deploy/rds-proxy/template.yaml",
            "ConnectionBorrowTimeout: 5\n",
            "ConnectionBorrowTimeout: 120\n",
        ),
        "over",
        (
            "deploy/rds-proxy/template.yaml: Resources.ProxyTargetGroup.Properties"
            ".ConnectionPoolConfigurationInfo.ConnectionBorrowTimeout=120 -> a client waits for"
            " the proxy longer than the app waits for its own pool (pool_timeout 5 s)",
        ),
        restore=True,
    ),
    Row(
        "lambda-rds-proxy-borrow-past-the-function-timeout",
        "lambda-rds-proxy",
        lambda project: replace_once(
            project, SAM, "ConnectionBorrowTimeout: 5\n", "ConnectionBorrowTimeout: 30\n"
        ),
        "over",
        (
            "ConnectionPoolConfigurationInfo.ConnectionBorrowTimeout=30 -> a client waits for"
            " the proxy longer than the app waits for its own pool (pool_timeout 5 s)",
            "ConnectionPoolConfigurationInfo.ConnectionBorrowTimeout=30 -> not below"
            " deploy/lambda/template.yaml: Resources.ServiceFunction.Properties.Timeout=30 s",
        ),
        variant=SAM,
    ),
]


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each answer set rendered once per worker, from the working tree (uncommitted included)."""
    cache: dict[str, Path] = {}

    def project(answers: str) -> Path:
        if answers not in cache:
            destination = tmp_path_factory.mktemp(f"rendered-{answers}") / "project"
            cache[answers] = render(destination, ANSWERS[answers])
        return cache[answers]

    return project


def in_project(
    project: Path, *args: str, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run this interpreter in the project with its src/ importable (and PATH, when given)."""
    env = clean_env(PYTHONPATH="src", **({"PATH": path} if path is not None else {}))
    return subprocess.run(
        [sys.executable, *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def budget_test(
    project: Path, path: str | None = None, verbose: bool = False
) -> subprocess.CompletedProcess[str]:
    """The generated budget test; -rA lists every outcome (-v: with the test's id) and reason."""
    flags = ["-v"] if verbose else ["-q"]
    return in_project(
        project, "-m", "pytest", *flags, "-rA", "-p", "no:cacheprovider", BUDGET_TEST, path=path
    )


def budget_command(project: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    return in_project(project, "-m", "poolwise", "budget", path=path)


def restore(project: Path, pristine: Path) -> None:
    """Put back every file an edit can touch: deploy/ and the platform's limits."""
    shutil.rmtree(project / "deploy")
    shutil.copytree(pristine / "deploy", project / "deploy")
    shutil.copy(pristine / LIMITS, project / LIMITS)


def check(project: Path, row: Row) -> None:
    """Both readers give the row's verdict; the fragments are in both outputs (fits: the CLI's)."""
    tested, command = budget_test(project), budget_command(project)
    test_output = tested.stdout + tested.stderr
    command_output = command.stdout + command.stderr
    shown = f"--- pytest:\n{test_output[-6000:]}\n--- CLI:\n{command_output[-6000:]}"
    assert (tested.returncode, command.returncode) == VERDICTS[row.verdict], shown
    if row.verdict == "fits":
        assert f"PASSED {FITS_TEST}[{row.variant}]" in test_output, shown
        assert "FAILED" not in test_output and "SKIPPED" not in test_output, shown
        assert command.stderr == "", shown
        for fragment in row.fragments:
            assert fragment in command_output, shown
        return
    assert f"FAILED {FITS_TEST}[{row.variant}]" in test_output, shown
    for fragment in row.fragments:
        assert fragment in test_output, shown
        assert fragment in command_output, shown
    # The first fragment is in the first line the CLI prints: the line the release notes show.
    problems = command.stderr.splitlines()
    assert problems and row.fragments[0] in problems[0], shown
    if row.verdict == "unreadable":
        assert len(problems) == 1, shown


def judge(rendered: Callable[[str], Path], tmp_path: Path, row: Row) -> None:
    """The row's edit on a copy of its rendered project, judged by both readers; with
    ``row.restore``, undoing it fits again."""
    if ANSWERS[row.answers]["target"] != "lambda":
        kubectl("an edit of deploy/ as kustomize applies it")
    pristine = rendered(row.answers)
    project = tmp_path / "project"
    shutil.copytree(pristine, project)
    row.edit(project)
    check(project, row)
    if row.restore:
        restore(project, pristine)
        tested, command = budget_test(project), budget_command(project)
        assert tested.returncode == 0, tested.stdout[-3000:]
        assert command.returncode == 0, command.stdout[-3000:] + command.stderr[-3000:]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_an_edit_of_deploy_is_judged_by_what_it_applies(
    rendered: Callable[[str], Path], tmp_path: Path, row: Row
) -> None:
    judge(rendered, tmp_path, row)


def path_without_kustomize(tmp_path: Path) -> str:
    """A PATH with this interpreter and git (pytest-copie needs it to load), without kubectl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    git = shutil.which("git")
    assert git is not None
    (bin_dir / "git").symlink_to(git)
    path = str(bin_dir)
    assert shutil.which("kubectl", path=path) is None
    assert shutil.which("kustomize", path=path) is None
    return path


def test_without_kustomize_every_variant_fails_never_skips(
    rendered: Callable[[str], Path], tmp_path: Path
) -> None:
    """Without kustomize nothing is built, so nothing is read: the base and the overlay both
    fail with the fix (the files alone are not what is applied), and the CLI exits 2."""
    project = tmp_path / "project"
    shutil.copytree(rendered("k8s-sync"), project)
    add_prod_overlay(project)
    path = path_without_kustomize(tmp_path)
    tested = budget_test(project, path=path, verbose=True)
    shown = tested.stdout[-6000:] + tested.stderr[-3000:]
    assert tested.returncode == 1, shown
    assert "SKIPPED" not in tested.stdout and "PASSED" not in tested.stdout.split("short test")[0]
    for variant in (BASE, OVERLAY):
        assert f"FAILED {FITS_TEST}[{variant}]" in tested.stdout, shown
        assert f"{variant}: building it needs kustomize" in tested.stdout, shown
    command = budget_command(project, path=path)
    assert command.returncode == 2, command.stdout + command.stderr
    for variant in (BASE, OVERLAY):
        assert f"cannot read {variant}: {variant}: building it needs kustomize" in command.stderr
