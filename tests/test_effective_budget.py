"""The effective budget: what deploy/ would really apply, edited the ways teams edit it.

Each row renders one answer set (once per worker), copies it, edits deploy/ (or the platform's
limits) the way the issue lists, then runs both readers of db/deployed.py in the project: the
generated `pytest tests/test_connection_budget.py` and `python -m poolwise_service.db.budget`.
They must agree on the verdict, and both must name the file and field that moved the budget.
Edits the loader handles (a sidecar, two documents in one file, ...) must keep passing, with the
CLI table showing that they were counted right. A few rows restore deploy/ and pass again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import copier
import pytest
import yaml
from rendering import TEMPLATE_ROOT

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
}
# The generated pytest's exit code and the CLI's: a variant past the budget fails both (1); one
# deploy/ cannot be read fails the test and is exit 2 of the CLI ("unreadable", never "fits").
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
            # The base's ConfigMap, merged: same name and namespace, else kustomize adds one.
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


def second_batch_workload(workload_file: str) -> Callable[[Path], None]:
    """A copy of the CronJob (or Job) under another name, running 60 pods at once."""

    def apply(project: Path) -> None:
        document = load(project, f"{BASE}/{workload_file}")
        document["metadata"]["name"] = f"{APP}-backfill"
        job = document["spec"]["jobTemplate"]["spec"] if document["kind"] == "CronJob" else (
            document["spec"]
        )
        job["parallelism"] = 60
        dump(project, f"{BASE}/backfill.yaml", document)
        add_resource(project, BASE, "backfill.yaml")

    return apply


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
    Row("placeholder", "k8s-sync", patch_hpa_in_base, "over", ()),
]


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each answer set rendered once per worker, from the working tree (uncommitted included)."""
    cache: dict[str, Path] = {}

    def project(answers: str) -> Path:
        if answers not in cache:
            destination = tmp_path_factory.mktemp(f"rendered-{answers}") / "project"
            copier.run_copy(
                str(TEMPLATE_ROOT),
                str(destination),
                data=ANSWERS[answers],
                defaults=True,
                vcs_ref="HEAD",
                quiet=True,
            )
            cache[answers] = destination
        return cache[answers]

    return project


def in_project(
    project: Path, *args: str, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["PYTHONPATH"] = "src"
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def budget_test(project: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """The generated budget test; -rA lists every test's outcome by id."""
    return in_project(
        project, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", BUDGET_TEST, path=path
    )


def budget_command(project: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    return in_project(project, "-m", f"{PACKAGE}.db.budget", path=path)


def restore(project: Path, pristine: Path) -> None:
    """Put back every file an edit can touch: deploy/ and the platform's limits."""
    shutil.rmtree(project / "deploy")
    shutil.copytree(pristine / "deploy", project / "deploy")
    shutil.copy(pristine / LIMITS, project / LIMITS)


def check(project: Path, row: Row) -> tuple[str, str]:
    tested, command = budget_test(project), budget_command(project)
    test_output = tested.stdout + tested.stderr
    command_output = command.stdout + command.stderr
    shown = f"--- pytest:\n{test_output[-5000:]}\n--- CLI:\n{command_output[-5000:]}"
    assert (tested.returncode, command.returncode) == VERDICTS[row.verdict], shown
    if row.verdict == "fits":
        assert f"PASSED {FITS_TEST}[{row.variant}]" in test_output, shown
        assert "FAILED" not in test_output and "SKIPPED" not in test_output, shown
        for fragment in row.fragments:
            assert fragment in command_output, shown
    else:
        assert f"FAILED {FITS_TEST}[{row.variant}]" in test_output, shown
        for fragment in row.fragments:
            assert fragment in test_output, shown
            assert fragment in command_output, shown
    return test_output, command_output


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_an_edit_of_deploy_is_judged_by_what_it_applies(
    rendered: Callable[[str], Path], tmp_path: Path, row: Row
) -> None:
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
