"""What is really deployed: the connection budget's inputs, read from what deploy/ would apply.

One loader for every place that checks the budget: tests/test_connection_budget.py, the
``python -m <package>.db.budget`` command and the platform's tools all read deploy/ through
``read_variant``. Kubernetes files are read as ``kubectl kustomize`` builds them (the base and
every overlay, each on its own), so patches, ``replicas:`` entries, generators and overlays count;
every Deployment, CronJob and Job that runs the service's image is summed; the HPA that targets a
Deployment gives its replicas (``spec.replicas`` when there is none); the app container is found
by name; its environment is resolved from ``env``, ``valueFrom`` and ``envFrom``; worker counts
come from its command and args. The SAM template is read function by function, Globals included.

Whatever cannot be interpreted is refused with one line naming the file, the field, the rule and
the fix (``Unreadable``): the budget never passes on a number it did not read.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import budget

DEPLOY = "deploy"
K8S_BASE = "deploy/k8s"
SAM_TEMPLATE = "deploy/lambda/template.yaml"
RDS_PROXY_TEMPLATE = "deploy/rds-proxy/template.yaml"
PGBOUNCER_INI = "deploy/pgbouncer/pgbouncer.ini"
MIGRATION_CONTAINER = "migrate"
# copier's record of the answers, database limits included (copier.yml _answers_file).
ANSWERS_FILE = ".copier-answers.yml"
# The rendered PgBouncer Deployment: one instance, Recreate (budget.Topology counts one).
PGBOUNCER_DECLARED = {"replicas_max": 1, "max_surge": 0}
WORKLOAD_KINDS = ("Deployment", "CronJob", "Job")
UNCOUNTED_KINDS = ("StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "ReplicationController")
# Environment variables that multiply into the budget, and the rule each one is checked against.
BUDGET_VARIABLES = {
    "POOL_SIZE": "pool_size",
    "POOL_MAX_OVERFLOW": "max_overflow",
    "WEB_CONCURRENCY": "workers_per_pod",
    "BATCH_PROCESSES": "batch_processes",
}
RANGE_VARIABLES = {
    "POOL_TIMEOUT": "pool_timeout",
    "POOL_RECYCLE": "pool_recycle",
    "BATCH_SIZE": "batch_size",
}
# PgBouncer's own defaults for what pgbouncer.ini leaves out.
PGBOUNCER_DEFAULTS = {
    "pool_mode": "session",
    "max_client_conn": "100",
    "default_pool_size": "20",
    "reserve_pool_size": "0",
    "max_db_connections": "0",
}
# Kubernetes' defaults for a Deployment's rollout and a pod's grace period.
DEFAULT_SURGE = "25%"
DEFAULT_UNAVAILABLE = "25%"
DEFAULT_GRACE_SECONDS = 30
CHANGING_TRANSFORMERS = (
    "PatchTransformer",
    "PatchStrategicMergeTransformer",
    "PatchJson6902Transformer",
    "ReplicaCountTransformer",
)


class Unreadable(Exception):
    """Something in deploy/ the budget cannot interpret; the message names file, field and fix."""


class ToolMissing(Exception):
    """Building the Kubernetes files needs kustomize (``kubectl kustomize``), which is missing."""


@dataclass(frozen=True)
class Input:
    """One number of the formula, where it was read and what db/topology.toml declares."""

    name: str
    value: Any
    source: str
    declared: Any = None

    @property
    def changed(self) -> bool:
        return self.declared is not None and self.value != self.declared

    def row(self) -> str:
        since = f", declared {self.declared}" if self.changed else ""
        return f"  {self.name} = {self.value}  ({self.source}{since})"


@dataclass
class Reading:
    """One variant of what would be deployed, read into the budget's terms."""

    variant: str
    topology: budget.Topology
    limits: budget.DatabaseLimits
    inputs: list[Input]
    findings: list[str] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)
    # Why part of this variant could not be read as it would be applied (a missing tool).
    incomplete: str = ""

    def problems(self) -> list[str]:
        """Every reason this variant does not fit, one line each; empty when it fits."""
        changed = "; ".join(f"{item.source}={item.value}" for item in self.inputs if item.changed)
        lines = list(self.findings)
        driver = budget.driver_error(self.topology)
        if driver:
            mode = next((item for item in self.inputs if item.name == "pgbouncer_pool_mode"), None)
            lines.append(f"{mode.source}={mode.value}: {driver}" if mode else driver)
        for check in budget.failures(self.topology, self.limits):
            lines.append(f"{changed} -> {check.message()}" if changed else check.message())
        return lines

    def report(self) -> str:
        rows = [f"{self.variant}:", budget.render_table(self.topology, self.limits)]
        rows.append("the inputs of the formula and where they are set:")
        rows += [item.row() for item in self.inputs]
        if self.incomplete:
            rows.append(f"not read as applied: {self.incomplete}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------- the project


@dataclass(frozen=True)
class Project:
    """A generated service's directory and its declared facts."""

    root: Path
    package: str
    declared: dict[str, Any]
    # Where `declared` comes from; services generated before 0.2.0 declare it in their answers.
    declared_file: str = ""

    @classmethod
    def at(cls, root: Path) -> Project:
        matches = sorted(root.glob("src/*/db/topology.toml"))
        if not matches:
            raise Unreadable(
                f"{root}: src/<package>/db/topology.toml is missing -> not a poolwise service;"
                " run this from the service's directory"
            )
        path = matches[0]
        return cls(root, path.parent.parent.name, budget.load_declared(path))

    @property
    def limits_file(self) -> str:
        return f"src/{self.package}/db/database_limits.toml"

    @property
    def topology_file(self) -> str:
        return self.declared_file or f"src/{self.package}/db/topology.toml"

    @property
    def container(self) -> str:
        return self.declared["service"]["container"]

    def declared_value(self, section: str, name: str) -> Any:
        return self.declared.get(section, {}).get(name)


def variants(root: Path) -> list[str]:
    """What can be applied from deploy/: the SAM template, or the kustomize base and overlays.

    An overlay is a kustomization under deploy/ that no other kustomization includes; the base
    (deploy/k8s) is always checked on its own as well.
    """
    if (root / SAM_TEMPLATE).exists():
        return [SAM_TEMPLATE]
    directories = sorted(
        path.parent
        for path in (root / DEPLOY).rglob("kustomization.y*ml")
        if path.name in ("kustomization.yaml", "kustomization.yml")
    )
    included: set[Path] = set()
    for directory in directories:
        spec = _kustomization(directory)
        for entry in [*spec.get("resources", []), *spec.get("components", [])]:
            candidate = (directory / str(entry)).resolve()
            if candidate.is_dir():
                included.add(candidate)
    names = [K8S_BASE] if (root / K8S_BASE).is_dir() else []
    for directory in directories:
        name = directory.relative_to(root).as_posix()
        if directory.resolve() not in included and name not in names:
            names.append(name)
    return names


def read_variant(root: Path, variant: str, project: Project | None = None) -> Reading:
    """Read one variant into the budget's terms; raises Unreadable or ToolMissing."""
    project = project or Project.at(root)
    if variant.endswith(".yaml") and "lambda" in variant:
        reading = _SamReader(project, variant).read()
    else:
        reading = _KubernetesReader(project, variant).read()
    return reading


def read_declared() -> Reading:
    """The topology as this package's db/topology.toml declares it, without deploy/."""
    topology = budget.declared_topology(budget.load_declared())
    return Reading("db/topology.toml (declared)", topology, budget.load_limits(), [])


# ----------------------------------------------------------------------------- shared readers


def _yaml() -> Any:
    # Imported here so a running service (which never reads deploy/) does not need PyYAML.
    import yaml

    return yaml


def _load_all(path: Path, relative: str) -> list[dict[str, Any]]:
    yaml = _yaml()
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise Unreadable(f"{relative}:{where} is not valid YAML ({error}); fix the file") from None
    for doc in documents:
        if not isinstance(doc, dict):
            raise Unreadable(f"{relative}: a document is not a mapping; fix the file")
    return documents


def _kustomization(directory: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml"):
        path = directory / name
        if path.exists():
            documents = _load_all(path, str(path))
            return documents[0] if documents else {}
    return {}


def integer(value: Any, where: str) -> int:
    """An integer field, or Unreadable naming it."""
    if isinstance(value, bool):
        raise Unreadable(f"{where}={value!r} -> not an integer; write a whole number")
    try:
        return int(str(value).strip())
    except ValueError:
        raise Unreadable(f"{where}={value!r} -> not an integer; write a whole number") from None


# ----------------------------------------------------------------------------- Kubernetes


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build", "--load-restrictor", "LoadRestrictionsNone"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone"]
    return None


def kustomize_build(root: Path, variant: str) -> list[dict[str, Any]]:
    """`kustomize build` of one variant, each resource annotated with the file it came from."""
    command = kustomize_command()
    if command is None:
        raise ToolMissing(
            f"{variant}: building it needs kustomize (`kubectl kustomize` or `kustomize build`),"
            " which is not installed; install kubectl to check what this variant applies"
        )
    # A wrapper kustomization adds origin annotations without touching the team's files.
    with tempfile.TemporaryDirectory(prefix=".budget-build-", dir=root) as wrapper:
        relative = Path("..") / variant
        (Path(wrapper) / "kustomization.yaml").write_text(
            "resources:\n"
            f"  - {relative.as_posix()}\n"
            "buildMetadata: [originAnnotations, transformerAnnotations]\n"
        )
        result = subprocess.run(
            [*command, wrapper], capture_output=True, text=True, timeout=120, check=False
        )
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        raise Unreadable(f"{variant}: kustomize cannot build it ({detail}); fix the kustomization")
    yaml = _yaml()
    return [doc for doc in yaml.safe_load_all(result.stdout) if isinstance(doc, dict)]


def read_resources(root: Path, directory: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The resources a kustomization lists, read without kustomize (patches are not applied)."""
    spec = _kustomization(directory)
    documents: list[dict[str, Any]] = []
    relative_dir = directory.relative_to(root).as_posix()
    for entry in spec.get("resources", []):
        path = directory / str(entry)
        if path.is_dir():
            documents += read_resources(root, path, notes)
        elif path.exists():
            relative = path.relative_to(root).as_posix()
            for doc in _load_all(path, relative):
                doc.setdefault("metadata", {}).setdefault("annotations", {})[
                    "config.kubernetes.io/origin"
                ] = f"path: {relative}\n"
                documents.append(doc)
        else:
            raise Unreadable(
                f"{relative_dir}/kustomization.yaml: resources lists {entry}, which does not"
                " exist; fix the entry"
            )
    for generator in spec.get("configMapGenerator", []):
        data = {}
        for item in generator.get("files", []):
            key, _, name = str(item).rpartition("=")
            file = directory / name
            data[key or Path(name).name] = file.read_text()
        for literal in generator.get("literals", []):
            key, _, value = str(literal).partition("=")
            data[key] = value
        documents.append(
            {
                "kind": "ConfigMap",
                "metadata": {
                    "name": generator["name"],
                    "annotations": {
                        "config.kubernetes.io/origin": f"path: {relative_dir}/kustomization.yaml\n"
                    },
                },
                "data": data,
            }
        )
    for key in ("patches", "patchesStrategicMerge", "patchesJson6902", "replicas", "components"):
        if spec.get(key):
            notes.append(f"{relative_dir}/kustomization.yaml: {key}")
    return documents


def _origin(doc: dict[str, Any], variant: str) -> str:
    """The file a built resource came from, and the kustomizations that changed it."""
    annotations = doc.get("metadata", {}).get("annotations", {}) or {}
    origin = _yaml().safe_load(annotations.get("config.kubernetes.io/origin", "") or "") or {}
    path = origin.get("path") or origin.get("configuredIn") or variant
    where = _project_relative(str(path))
    changes = _yaml().safe_load(
        annotations.get("alpha.config.kubernetes.io/transformations", "") or ""
    )
    by = sorted(
        {
            _project_relative(str(change.get("configuredIn", "")))
            for change in changes or []
            if change.get("configuredBy", {}).get("kind") in CHANGING_TRANSFORMERS
        }
    )
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    suffix = f", changed by {', '.join(by)}" if by else ""
    return f"{where} ({name}{suffix})"


def _generated_from(root: Path, doc: dict[str, Any], key: str) -> str | None:
    """The file a configMapGenerator read a ConfigMap's key from, with the generator."""
    annotations = doc.get("metadata", {}).get("annotations", {}) or {}
    origin = _yaml().safe_load(annotations.get("config.kubernetes.io/origin", "") or "") or {}
    if (origin.get("configuredBy") or {}).get("kind") != "ConfigMapGenerator":
        return None
    kustomization = PurePosixPath(_project_relative(str(origin.get("configuredIn", ""))))
    for generator in _kustomization(root / kustomization.parent).get("configMapGenerator", []):
        if str(generator.get("name")) not in str(doc.get("metadata", {}).get("name")):
            continue
        for item in generator.get("files", []) or []:
            name, _, file = str(item).rpartition("=")
            if (name or PurePosixPath(file).name) == key:
                return f"{(kustomization.parent / file).as_posix()} (via {kustomization})"
    return None


def _project_relative(path: str) -> str:
    # Paths in the build are relative to the wrapper directory, one level below the project.
    parts = PurePosixPath(path).parts
    return PurePosixPath(*parts[1:]).as_posix() if parts and parts[0] == ".." else path


def _pod_spec(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    if doc["kind"] == "CronJob":
        return doc.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get(
            "spec", {}
        ), "spec.jobTemplate.spec.template.spec"
    if doc["kind"] == "Pod":
        return doc.get("spec", {}), "spec"
    return doc.get("spec", {}).get("template", {}).get("spec", {}), "spec.template.spec"


def _containers(doc: dict[str, Any]) -> list[tuple[int, dict[str, Any], str]]:
    pod, path = _pod_spec(doc)
    return [
        (index, container, f"{path}.containers[{index}]")
        for index, container in enumerate(pod.get("containers", []) or [])
    ]


@dataclass
class _Env:
    """A container's environment: each variable's value and the file and field that set it."""

    values: dict[str, tuple[str, str]] = field(default_factory=dict)

    def plain(self) -> dict[str, str]:
        return {name: value for name, (value, _) in self.values.items()}


def env_int(
    project: Project, findings: list[str], env: _Env, variable: str, default: int, declared: Any
) -> Input:
    """A number from the environment (or its declared default), range-checked by its rule."""
    rule = BUDGET_VARIABLES.get(variable) or RANGE_VARIABLES[variable]
    if variable in env.values:
        raw, source = env.values[variable]
        value = integer(raw, source)
    else:
        source = f"{project.topology_file}: default, {variable} is not set"
        value = default
    try:
        budget.at_least_minimum(rule, value, source)
    except budget.OutOfRange as refusal:
        findings.append(f"{refusal}; fix {variable}")
    return Input(rule, value, source, declared)


def pool_share(project: Project, findings: list[str], env: _Env) -> tuple[list[Input], int, int]:
    """(inputs, pool_size, max_overflow) of one process, from its environment or the declared
    pool; more than the declared share is a finding, since the process would refuse to start
    (db/guard.py). NullPool has no numbers to read."""
    pool = project.declared["pool"]
    if pool["null_pool"]:
        return [], 0, 0
    size = env_int(project, findings, env, "POOL_SIZE", pool["pool_size"], pool["pool_size"])
    overflow = env_int(
        project, findings, env, "POOL_MAX_OVERFLOW", pool["max_overflow"], pool["max_overflow"]
    )
    declared_share = pool["pool_size"] + pool["max_overflow"]
    if size.value + overflow.value > declared_share:
        findings.append(
            f"{size.source}={size.value} and {overflow.source}={overflow.value} ->"
            f" {size.value + overflow.value} connections per process, but"
            f" {project.topology_file} declares pool_size + max_overflow ="
            f" {declared_share} and each process refuses to start past it (db/guard.py);"
            " change [pool] there too, so the budget and the guard agree"
        )
    return [size, overflow], size.value, overflow.value


class _KubernetesReader:
    def __init__(self, project: Project, variant: str) -> None:
        self.project = project
        self.variant = variant
        self.findings: list[str] = []
        self.inputs: list[Input] = []

    def documents(self) -> tuple[list[dict[str, Any]], str]:
        root = self.project.root
        try:
            return kustomize_build(root, self.variant), ""
        except ToolMissing as missing:
            if self.variant != K8S_BASE:
                raise
            notes: list[str] = []
            documents = read_resources(root, root / K8S_BASE, notes)
            reason = f"{missing}; read the files without kustomize"
            if notes:
                reason += f", not applying {', '.join(notes)}"
            return documents, reason

    def read(self) -> Reading:
        documents, incomplete = self.documents()
        configmaps = {
            doc["metadata"]["name"]: doc for doc in documents if doc.get("kind") == "ConfigMap"
        }
        hpas = {
            (
                doc.get("spec", {}).get("scaleTargetRef", {}).get("kind"),
                doc.get("spec", {}).get("scaleTargetRef", {}).get("name"),
            ): doc
            for doc in documents
            if doc.get("kind") == "HorizontalPodAutoscaler"
        }
        images = self._service_images(documents)
        workloads = []
        for doc in documents:
            kind = doc.get("kind")
            if kind not in WORKLOAD_KINDS and kind not in UNCOUNTED_KINDS:
                continue
            for _, container, path in _containers(doc):
                if not self._is_service(container, images):
                    continue
                where = f"{_origin(doc, self.variant)}: {path}"
                if self._is_migration(container):
                    self._check_migration(doc, container, where)
                    continue
                if kind in UNCOUNTED_KINDS:
                    raise Unreadable(
                        f"{where} runs the service image in a {kind} -> the budget counts"
                        " Deployments, CronJobs and Jobs; run it as one of those"
                    )
                env = self._env(container, configmaps, where)
                workloads.append(self._workload(doc, container, env, hpas, where))
        if not workloads:
            raise Unreadable(
                f"{self.variant}: no Deployment, CronJob or Job runs a container named"
                f" {self.project.container!r} -> the budget cannot find the service; keep the"
                " container's name"
            )
        topology = self._topology(tuple(workloads), documents, hpas)
        limits = _limits_inputs(self.project, self.inputs)
        return Reading(
            self.variant,
            topology,
            limits,
            self.inputs,
            self.findings,
            documents,
            incomplete,
        )

    # -- which containers are the service

    def _service_images(self, documents: list[dict[str, Any]]) -> set[str]:
        names = {self.project.container, MIGRATION_CONTAINER}
        return {
            str(container.get("image"))
            for doc in documents
            for _, container, _ in _containers(doc)
            if container.get("name") in names and container.get("image")
        }

    def _is_service(self, container: dict[str, Any], images: set[str]) -> bool:
        return container.get("name") == self.project.container or container.get("image") in images

    @staticmethod
    def _is_migration(container: dict[str, Any]) -> bool:
        command = [str(part) for part in container.get("command", []) or []]
        return container.get("name") == MIGRATION_CONTAINER or "alembic" in command[:1]

    def _check_migration(self, doc: dict[str, Any], container: dict[str, Any], where: str) -> None:
        if doc["kind"] != "Job":
            raise Unreadable(
                f"{where} runs the migration in a {doc['kind']} -> the budget counts one migration"
                " connection, from one Job pod; run migrations as a Job"
            )
        parallelism = integer(doc.get("spec", {}).get("parallelism", 1), f"{where} parallelism")
        if parallelism > budget.MIGRATION_CONNECTIONS:
            origin = _origin(doc, self.variant)
            self.findings.append(
                f"{origin}: spec.parallelism={parallelism} -> the connection budget counts"
                f" {budget.MIGRATION_CONNECTIONS} migration connection; run one migration pod"
            )
        for item in container.get("env", []) or []:
            key = item.get("valueFrom", {}).get("secretKeyRef", {}).get("key")
            if item.get("name") == "DATABASE_URL" and key not in (None, "url"):
                self.findings.append(
                    f"{where}.env DATABASE_URL from Secret key {key!r} -> migrations must connect"
                    " to PostgreSQL directly (key 'url'), never through a pooler; use key url"
                )

    # -- environment

    def _env(
        self, container: dict[str, Any], configmaps: dict[str, dict[str, Any]], where: str
    ) -> _Env:
        env = _Env()
        for index, source in enumerate(container.get("envFrom", []) or []):
            ref = source.get("configMapRef")
            if not ref:
                continue
            configmap = configmaps.get(ref.get("name"))
            if configmap is None:
                if ref.get("optional"):
                    continue
                raise Unreadable(
                    f"{where}.envFrom[{index}].configMapRef.name={ref.get('name')} -> no ConfigMap"
                    " of that name is in the build; add it to the kustomization or fix the name"
                )
            origin = _origin(configmap, self.variant)
            prefix = source.get("prefix", "")
            for key, value in (configmap.get("data") or {}).items():
                env.values[prefix + key] = (str(value), f"{origin}: data.{key}")
        for index, item in enumerate(container.get("env", []) or []):
            name = item.get("name")
            field_where = f"{where}.env[{index}] {name}"
            if "value" in item:
                env.values[name] = (str(item["value"]), field_where)
                continue
            ref = (item.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                configmap = configmaps.get(ref.get("name"))
                data = (configmap or {}).get("data") or {}
                if ref.get("key") in data:
                    origin = _origin(configmap, self.variant)  # type: ignore[arg-type]
                    env.values[name] = (str(data[ref["key"]]), f"{origin}: data.{ref['key']}")
                elif not ref.get("optional") and name in {**BUDGET_VARIABLES, **RANGE_VARIABLES}:
                    raise Unreadable(
                        f"{field_where}: configMapKeyRef {ref.get('name')}/{ref.get('key')} is"
                        " not in the build -> the budget cannot read it; add the ConfigMap key"
                    )
                continue
            if name in BUDGET_VARIABLES or name in RANGE_VARIABLES:
                raise Unreadable(
                    f"{field_where} is set from {sorted(item.get('valueFrom') or {})} -> the"
                    " budget can only read a value or a ConfigMap; set it with value: or"
                    " configMapKeyRef"
                )
        return env

    # -- one workload

    def _workload(
        self,
        doc: dict[str, Any],
        container: dict[str, Any],
        env: _Env,
        hpas: dict[tuple[Any, Any], dict[str, Any]],
        where: str,
    ) -> budget.Workload:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        inputs, pool_size, max_overflow = pool_share(self.project, self.findings, env)
        for variable in RANGE_VARIABLES:
            if variable in env.values:
                env_int(self.project, self.findings, env, variable, 1, None)
        if doc["kind"] == "Deployment":
            workload = self._deployment(doc, container, env, hpas, where, name, inputs)
        else:
            workload = self._batch(doc, env, name, inputs)
        self.inputs += inputs
        return budget.Workload(
            name=name,
            null_pool=bool(self.project.declared["pool"]["null_pool"]),
            pool_size=pool_size,
            max_overflow=max_overflow,
            **workload,
        )

    def _processes_per_pod(
        self, container: dict[str, Any], env: _Env, where: str, inputs: list[Input]
    ) -> int:
        declared = self.project.declared_value("processes", "workers_per_pod")
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        try:
            workers = budget.workers_in_command(argv, env.plain())
        except ValueError as error:
            raise Unreadable(
                f"{where}.command/args: {error} -> the budget cannot count the workers; write"
                " --workers N or set WEB_CONCURRENCY"
            ) from None
        if workers is not None:
            item = Input("workers_per_pod", workers, f"{where}.command/args --workers", declared)
            budget.at_least_minimum("workers_per_pod", workers, item.source)
        else:
            item = env_int(
                self.project, self.findings, env, "WEB_CONCURRENCY", declared or 1, declared
            )
        inputs.append(item)
        if declared is not None and item.value > declared:
            self.findings.append(
                f"{item.source}={item.value} -> more worker processes than"
                f" {self.project.topology_file} declares (workers_per_pod = {declared}), and each"
                " process refuses to start past it (db/guard.py); change [processes] there too"
            )
        return item.value

    def _deployment(
        self,
        doc: dict[str, Any],
        container: dict[str, Any],
        env: _Env,
        hpas: dict[tuple[Any, Any], dict[str, Any]],
        where: str,
        name: str,
        inputs: list[Input],
    ) -> dict[str, int]:
        pods = pods_at_once(doc, hpas, self.variant, self.project, self.findings)
        inputs += pods.inputs
        processes = self._processes_per_pod(container, env, where, inputs)
        return {
            "kind": "k8s",
            "replicas": pods.replicas,
            "max_surge": pods.surge,
            "terminating": pods.terminating,
            "processes_per_pod": processes,
        }  # type: ignore[return-value]

    def _batch(
        self, doc: dict[str, Any], env: _Env, name: str, inputs: list[Input]
    ) -> dict[str, Any]:
        origin = _origin(doc, self.variant)
        declared = self.project.declared.get("processes", {})
        if doc["kind"] == "CronJob":
            policy = doc.get("spec", {}).get("concurrencyPolicy", "Allow")
            source = f"{origin}: spec.concurrencyPolicy"
            if policy not in ("Forbid", "Replace"):
                raise Unreadable(
                    f"{source}={policy} -> scheduled runs can overlap without bound, so no"
                    " connection budget holds; use Forbid (one run at a time) or Replace"
                    " (counted as two runs)"
                )
            inputs.append(
                Input(
                    "batch_concurrency_policy",
                    policy,
                    source,
                    declared.get("batch_concurrency_policy"),
                )
            )
            job = doc["spec"].get("jobTemplate", {}).get("spec", {})
            job_path = "spec.jobTemplate.spec"
            runs = budget.CONCURRENT_RUNS[policy]
        else:
            job, job_path, runs = doc.get("spec", {}), "spec", 1
        source = f"{origin}: {job_path}.parallelism"
        parallelism = integer(job.get("parallelism", 1), source)
        budget.at_least_minimum("batch_parallelism", parallelism, source)
        inputs.append(
            Input("batch_parallelism", parallelism, source, declared.get("batch_parallelism"))
        )
        default = declared.get("batch_processes", 1)
        processes = env_int(
            self.project,
            self.findings,
            env,
            "BATCH_PROCESSES",
            default,
            declared.get("batch_processes"),
        )
        inputs.append(processes)
        if processes.value > default:
            self.findings.append(
                f"{processes.source}={processes.value} -> more processes per pod than"
                f" {self.project.topology_file} declares (batch_processes = {default}), and the"
                " job refuses to start past it (db/guard.py); change [processes] there too"
            )
        return {
            "kind": "batch",
            "replicas": parallelism,
            "runs": runs,
            "processes_per_pod": processes.value,
        }

    # -- the path to PostgreSQL

    def _topology(
        self,
        workloads: tuple[budget.Workload, ...],
        documents: list[dict[str, Any]],
        hpas: dict[tuple[Any, Any], dict[str, Any]],
    ) -> budget.Topology:
        declared = self.project.declared
        pooler = declared["service"]["pooler"]
        extra: dict[str, Any] = {}
        if pooler == "pgbouncer":
            extra = self._pgbouncer(documents, hpas)
        elif pooler == "rds-proxy":
            extra = _rds_proxy(self.project, RDS_PROXY_TEMPLATE, self.inputs, self.findings)
        return budget.Topology(
            target=declared["service"]["target"],
            workloads=workloads,
            pooler=pooler,
            driver=declared["service"]["driver"],
            **extra,
        )

    def _pgbouncer(
        self, documents: list[dict[str, Any]], hpas: dict[tuple[Any, Any], dict[str, Any]]
    ) -> dict[str, Any]:
        ini = next(
            (
                doc
                for doc in documents
                if doc.get("kind") == "ConfigMap" and "pgbouncer.ini" in (doc.get("data") or {})
            ),
            None,
        )
        if ini is None:
            text, where = _read_text(self.project, PGBOUNCER_INI), PGBOUNCER_INI
        else:
            text = ini["data"]["pgbouncer.ini"]
            generated = _generated_from(self.project.root, ini, "pgbouncer.ini")
            where = generated or f"{_origin(ini, self.variant)}: data.pgbouncer.ini"
        settings = pgbouncer_settings(text, where, self.inputs, self.project, self.findings)
        instances = 0
        for doc in documents:
            if doc.get("kind") not in ("Deployment", *UNCOUNTED_KINDS):
                continue
            if not any(
                "pgbouncer" in str(container.get("image", ""))
                for _, container, _ in _containers(doc)
            ):
                continue
            if doc["kind"] != "Deployment":
                raise Unreadable(
                    f"{_origin(doc, self.variant)} runs PgBouncer in a {doc['kind']} -> the"
                    " budget counts PgBouncer Deployments; use a Deployment"
                )
            pods = pods_at_once(doc, hpas, self.variant, self.project, self.findings, "pgbouncer_")
            self.inputs += pods.inputs
            instances += pods.replicas + pods.surge + pods.terminating
        settings["pgbouncer_instances"] = max(instances, 1)
        return settings


@dataclass
class _Pods:
    replicas: int
    surge: int
    terminating: int
    inputs: list[Input]


def pods_at_once(
    doc: dict[str, Any],
    hpas: dict[tuple[Any, Any], dict[str, Any]],
    variant: str,
    project: Project,
    findings: list[str],
    prefix: str = "",
) -> _Pods:
    """The pods of a Deployment that can hold connections at once, rollouts included.

    Steady state is the HPA's maxReplicas (spec.replicas without an HPA). A RollingUpdate adds
    maxSurge new pods, and old pods that are terminating are not counted against maxSurge while
    their grace period runs: with minReadySeconds >= terminationGracePeriodSeconds each step's
    old pods are gone before the next step, so at most maxSurge + maxUnavailable terminate at
    once; otherwise every old pod may. Recreate stops every old pod before starting new ones.
    """
    origin = _origin(doc, variant)
    spec = doc.get("spec", {}) or {}
    name = doc["metadata"]["name"]
    declared = project.declared.get("processes", {}) if not prefix else PGBOUNCER_DECLARED
    hpa = hpas.get(("Deployment", name))
    if hpa is not None:
        source = f"{_origin(hpa, variant)}: spec.maxReplicas"
        replicas = integer(hpa.get("spec", {}).get("maxReplicas"), source)
        if "replicas" in spec and integer(spec["replicas"], f"{origin}: spec.replicas") > replicas:
            findings.append(
                f"{origin}: spec.replicas={spec['replicas']} -> more pods than {source}={replicas},"
                " which the connection budget counts; remove replicas (the HPA owns the count)"
                " or keep it <= maxReplicas"
            )
    else:
        source = f"{origin}: spec.replicas" + ("" if "replicas" in spec else " (not set: 1)")
        replicas = integer(spec.get("replicas", 1), source)
    budget.at_least_minimum("replicas_max", max(replicas, 1), source)
    inputs = [Input(f"{prefix}replicas_max", replicas, source, declared.get("replicas_max"))]
    strategy = spec.get("strategy", {}) or {}
    if strategy.get("type", "RollingUpdate") == "Recreate":
        inputs.append(Input(f"{prefix}max_surge", 0, f"{origin}: spec.strategy.type=Recreate"))
        return _Pods(replicas, 0, 0, inputs)
    rolling = strategy.get("rollingUpdate", {}) or {}
    surge_source = f"{origin}: spec.strategy.rollingUpdate.maxSurge"
    try:
        surge = budget.surge_count(rolling.get("maxSurge", DEFAULT_SURGE), replicas)
        unavailable = budget.unavailable_count(
            rolling.get("maxUnavailable", DEFAULT_UNAVAILABLE), replicas
        )
    except ValueError:
        raise Unreadable(
            f"{origin}: spec.strategy.rollingUpdate={rolling} -> maxSurge and maxUnavailable"
            " must be a count or a percentage; fix them"
        ) from None
    inputs.append(Input(f"{prefix}max_surge", surge, surge_source, declared.get("max_surge")))
    pod, _ = _pod_spec(doc)
    grace = integer(
        pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS),
        f"{origin}: terminationGracePeriodSeconds",
    )
    ready = integer(spec.get("minReadySeconds", 0), f"{origin}: spec.minReadySeconds")
    if ready >= grace:
        terminating = min(replicas, surge + unavailable)
        why = (
            f"{origin}: maxSurge {surge} + maxUnavailable {unavailable}"
            f" (minReadySeconds {ready} >= terminationGracePeriodSeconds {grace})"
        )
    else:
        terminating = replicas
        why = (
            f"{origin}: every old pod (spec.minReadySeconds {ready} < terminationGracePeriodSeconds"
            f" {grace}; raise minReadySeconds to {grace} to count only maxSurge + maxUnavailable)"
        )
    inputs.append(Input(f"{prefix}terminating", terminating, why))
    return _Pods(replicas, surge, terminating, inputs)


def _read_text(project: Project, relative: str) -> str:
    path = project.root / relative
    if not path.exists():
        raise Unreadable(f"{relative} is missing -> the connection budget needs it; restore it")
    return path.read_text()


def pgbouncer_settings(
    text: str, where: str, inputs: list[Input], project: Project, findings: list[str]
) -> dict[str, Any]:
    """PgBouncer's numbers from pgbouncer.ini, with PgBouncer's defaults for what it leaves out."""
    parser = configparser.ConfigParser(interpolation=None, allow_no_value=True, strict=False)
    try:
        parser.read_string(text)
    except configparser.Error as error:
        raise Unreadable(f"{where}: not a valid ini file ({error}); fix it") from None
    if not parser.has_section("pgbouncer"):
        raise Unreadable(f"{where}: the [pgbouncer] section is missing; restore it")
    section = parser["pgbouncer"]
    declared = project.declared.get("pgbouncer", {})

    def number(name: str) -> Input:
        source = f"{where} [pgbouncer] {name}"
        value = integer(section.get(name, PGBOUNCER_DEFAULTS[name]), source)
        return Input(f"pgbouncer_{name}", value, source, declared.get(name))

    mode_source = f"{where} [pgbouncer] pool_mode"
    pool_mode = str(section.get("pool_mode", PGBOUNCER_DEFAULTS["pool_mode"])).strip()
    if pool_mode not in budget.POOL_MODES:
        raise Unreadable(
            f"{mode_source}={pool_mode} -> the budget supports transaction and session mode;"
            " use one of them"
        )
    numbers = [
        number(name) for name in ("max_client_conn", "default_pool_size", "reserve_pool_size")
    ]
    cap = number("max_db_connections")
    inputs += [
        Input("pgbouncer_pool_mode", pool_mode, mode_source, declared.get("pool_mode")),
        *numbers,
    ]
    values = {item.name: item.value for item in numbers}
    for item in numbers:
        try:
            budget.at_least_minimum(item.name, item.value, item.source)
        except budget.OutOfRange as refusal:
            findings.append(str(refusal))
    pooled = values["pgbouncer_default_pool_size"] + values["pgbouncer_reserve_pool_size"]
    if not 0 < cap.value <= pooled:
        findings.append(
            f"{cap.source}={cap.value} -> it must be set and <= default_pool_size +"
            f" reserve_pool_size = {pooled}, so more users or databases on this PgBouncer cannot"
            " open more server connections than the budget counts"
        )
    return {"pool_mode": pool_mode, **values}


def _limits_inputs(project: Project, inputs: list[Input]) -> budget.DatabaseLimits:
    path = project.root / project.limits_file
    if not path.exists():
        raise Unreadable(f"{project.limits_file} is missing -> the budget needs it; restore it")
    limits = budget.load_limits(path)
    # The limits the project was generated with (copier's answers), to say which number moved.
    answers = project.root / ANSWERS_FILE
    generated = _yaml().safe_load(answers.read_text()) if answers.exists() else None
    generated = generated if isinstance(generated, dict) else {}
    # With an allocation the budget is the allocation alone; without, other_consumers is used.
    share = (
        ("db_allocation", "allocation", limits.allocation)
        if limits.allocation
        else ("other_consumers", "other_consumers", limits.other_consumers)
    )
    for name, field_name, value in (
        ("db_max_connections", "max_connections", limits.max_connections),
        ("db_reserved_connections", "reserved_connections", limits.reserved_connections),
        share,
    ):
        source = f"{project.limits_file}: database.{field_name}"
        inputs.append(Input(name, value, source, generated.get(name)))
    return limits


# ----------------------------------------------------------------------------- AWS SAM


def _cloudformation_load(path: Path, relative: str) -> dict[str, Any]:
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        """Reads CloudFormation's short tags (!Ref, !Sub, !GetAtt) as plain values."""

    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        return loader.construct_mapping(node)  # type: ignore[arg-type]

    Loader.add_multi_constructor("!", construct)
    if not path.exists():
        raise Unreadable(f"{relative} is missing -> the connection budget needs it; restore it")
    try:
        document = yaml.load(path.read_text(), Loader=Loader)
    except yaml.YAMLError as error:
        raise Unreadable(f"{relative}: not valid YAML ({error}); fix the file") from None
    if not isinstance(document, dict):
        raise Unreadable(f"{relative}: not a CloudFormation template; fix the file")
    return document


# RDS Proxy's ConnectionBorrowTimeout when the template leaves it out, and the wait for a pooled
# connection of a process without a pool (NullPool): a connect that waits longer is refused.
DEFAULT_BORROW_SECONDS = 120
NULL_POOL_WAIT_SECONDS = 5


def _rds_proxy(
    project: Project,
    relative: str,
    inputs: list[Input],
    findings: list[str],
    deadline: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """The proxy's share of max_connections; its borrow timeout must fail faster than the app.

    deadline is the tightest (seconds, where) a caller gives up on a request: a Lambda
    function's Timeout. A borrow that waits longer shows as killed invocations, not errors.
    """
    template = _cloudformation_load(project.root / relative, relative)
    groups = [
        (name, resource)
        for name, resource in (template.get("Resources") or {}).items()
        if resource.get("Type") == "AWS::RDS::DBProxyTargetGroup"
    ]
    if not groups:
        raise Unreadable(
            f"{relative}: no AWS::RDS::DBProxyTargetGroup -> the budget needs the proxy's"
            " MaxConnectionsPercent; restore the target group"
        )
    total = 0
    for name, resource in groups:
        pool = (resource.get("Properties") or {}).get("ConnectionPoolConfigurationInfo") or {}
        source = (
            f"{relative}: Resources.{name}.Properties.ConnectionPoolConfigurationInfo"
            ".MaxConnectionsPercent"
        )
        # RDS Proxy's own default is 100: all of max_connections.
        percent = integer(pool.get("MaxConnectionsPercent", 100), source)
        declared = project.declared_value("rds_proxy", "max_connections_percent")
        inputs.append(Input("rds_proxy_max_connections_percent", percent, source, declared))
        total += percent
        borrow_source = source.replace("MaxConnectionsPercent", "ConnectionBorrowTimeout")
        borrow = integer(pool.get("ConnectionBorrowTimeout", DEFAULT_BORROW_SECONDS), borrow_source)
        wait = project.declared_value("pool", "pool_timeout") or NULL_POOL_WAIT_SECONDS
        if borrow > wait:
            findings.append(
                f"{borrow_source}={borrow} -> a client waits for the proxy longer than the app"
                f" waits for its own pool (pool_timeout {wait} s), so proxy saturation hangs"
                f" requests instead of failing them fast; set it to {wait}"
            )
        if deadline is not None and borrow >= deadline[0]:
            findings.append(
                f"{borrow_source}={borrow} -> not below {deadline[1]}={deadline[0]} s: a"
                " saturated proxy kills invocations instead of answering an error; lower it"
            )
    return {"rds_proxy_max_connections_percent": total}


class _SamReader:
    def __init__(self, project: Project, variant: str) -> None:
        self.project = project
        self.variant = variant
        self.inputs: list[Input] = []
        self.findings: list[str] = []
        # The service function with the shortest Timeout (seconds, where), if any sets one.
        self.shortest_timeout: tuple[int, str] | None = None

    def read(self) -> Reading:
        relative = self.variant
        template = _cloudformation_load(self.project.root / relative, relative)
        globals_ = ((template.get("Globals") or {}).get("Function")) or {}
        workloads = []
        for name, resource in (template.get("Resources") or {}).items():
            if resource.get("Type") not in ("AWS::Serverless::Function", "AWS::Lambda::Function"):
                continue
            properties = {**globals_, **(resource.get("Properties") or {})}
            variables = {
                **((globals_.get("Environment") or {}).get("Variables") or {}),
                **(
                    ((resource.get("Properties") or {}).get("Environment") or {}).get("Variables")
                    or {}
                ),
            }
            if properties.get("PackageType") != "Image":
                continue
            where = f"{relative}: Resources.{name}.Properties"
            command = [
                str(part) for part in (properties.get("ImageConfig") or {}).get("Command", [])
            ]
            if any(part.endswith("migrations.handler") for part in command):
                reserved = properties.get("ReservedConcurrentExecutions")
                if reserved != budget.MIGRATION_CONNECTIONS:
                    self.findings.append(
                        f"{where}.ReservedConcurrentExecutions={reserved} -> the connection budget"
                        f" counts {budget.MIGRATION_CONNECTIONS} migration connection; reserve"
                        " exactly that"
                    )
                continue
            workloads.append(self._function(name, properties, variables, where))
            # Lambda's own default Timeout is 3 s.
            timeout = integer(properties.get("Timeout", 3), f"{where}.Timeout")
            if self.shortest_timeout is None or timeout < self.shortest_timeout[0]:
                self.shortest_timeout = (timeout, f"{where}.Timeout")
        if not workloads:
            raise Unreadable(
                f"{relative}: no image function runs the service -> the budget cannot find it;"
                " restore ServiceFunction"
            )
        declared = self.project.declared
        pooler = declared["service"]["pooler"]
        extra: dict[str, Any] = {}
        if pooler == "pgbouncer":
            extra = pgbouncer_settings(
                _read_text(self.project, PGBOUNCER_INI),
                PGBOUNCER_INI,
                self.inputs,
                self.project,
                self.findings,
            )
        elif pooler == "rds-proxy":
            extra = _rds_proxy(
                self.project, relative, self.inputs, self.findings, self.shortest_timeout
            )
        topology = budget.Topology(
            target=declared["service"]["target"],
            workloads=tuple(workloads),
            pooler=pooler,
            driver=declared["service"]["driver"],
            **extra,
        )
        limits = _limits_inputs(self.project, self.inputs)
        return Reading(relative, topology, limits, self.inputs, self.findings)

    def _function(
        self, name: str, properties: dict[str, Any], variables: dict[str, Any], where: str
    ) -> budget.Workload:
        declared = self.project.declared
        field_where = f"{where}.ReservedConcurrentExecutions"
        if "ReservedConcurrentExecutions" not in properties:
            raise Unreadable(
                f"{field_where} is missing -> an unreserved function scales to the account's"
                " concurrency limit, and no connection budget holds; set it"
            )
        reserved = integer(properties["ReservedConcurrentExecutions"], field_where)
        budget.at_least_minimum("lambda_reserved_concurrency", max(reserved, 1), field_where)
        self.inputs.append(
            Input(
                "lambda_reserved_concurrency",
                reserved,
                field_where,
                declared["processes"].get("lambda_reserved_concurrency"),
            )
        )
        prefix = f"{where}.Environment.Variables"
        env = _Env({key: (str(value), f"{prefix}.{key}") for key, value in variables.items()})
        numbers, pool_size, max_overflow = pool_share(self.project, self.findings, env)
        self.inputs += numbers
        return budget.Workload(
            kind="lambda",
            name=f"Function/{name}",
            replicas=reserved,
            null_pool=bool(declared["pool"]["null_pool"]),
            pool_size=pool_size,
            max_overflow=max_overflow,
        )


# ----------------------------------------------------------------------------- the command


def project_root(start: Path) -> Path | None:
    """The service directory at or above start (it holds deploy/ and src/*/db/topology.toml)."""
    for directory in (start, *start.parents):
        if (directory / DEPLOY).is_dir() and list(directory.glob("src/*/db/topology.toml")):
            return directory
    return None


def main(argv: list[str] | None = None) -> int:
    """Print the budget of every variant of deploy/; 0 all fit, 1 one does not, 2 unreadable."""
    args = sys.argv[1:] if argv is None else argv
    start = Path(args[0]).resolve() if args else Path.cwd()
    root = project_root(start)
    readings: list[Reading] = []
    status = 0
    if root is None:
        print(f"no deploy/ at or above {start}: checking the declared topology only")
        readings.append(read_declared())
    for variant in variants(root) if root is not None else []:
        try:
            readings.append(read_variant(root, variant))  # type: ignore[arg-type]
        except (Unreadable, ToolMissing) as error:
            # The other variants are still read and printed.
            print(f"cannot read {variant}: {error}", file=sys.stderr)
            status = 2
    for reading in readings:
        print(reading.report(), end="\n\n")
        problems = reading.problems()
        for line in problems:
            print(line, file=sys.stderr)
        status = max(status, 1 if problems else 0, 2 if reading.incomplete else 0)
    return status
