"""Kubernetes workloads: every resource whose pods run the service's image, counted or refused.

Each built document is checked first: a kind that runs pods and is not understood is refused
(poolwise.shapes.containers). A workload is the service's when any of its containers, init
containers and native sidecars included, runs the service image's repository, whatever the
registry, tag or digest (before and after kustomize ``images:``); each such container counts
with its own environment (poolwise.shapes.environment) and its own process count
(poolwise.shapes.processes). Replicas come from the HPA or KEDA ScaledObject that targets the
workload, else spec.replicas; a rollout adds its surge and terminating pods, an Argo Rollout
what its strategy runs at its peak (poolwise.shapes.autoscaling).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import rule
from .errors import Unreadable
from .kustomize import generated_from, kustomization, origin_of
from .manifests import integer
from .poolers import PGBOUNCER_INI, RDS_PROXY_TEMPLATE, pgbouncer_settings, rds_proxy
from .reading import (
    BUDGET_VARIABLES,
    RANGE_VARIABLES,
    Env,
    Input,
    Project,
    Reading,
    env_int,
    limits_inputs,
    pool_share,
    read_text,
)
from .shapes import Refused
from .shapes.autoscaling import (
    Autoscaler,
    autoscaler,
    autoscaler_for,
    fenceposts,
    peak_pods,
    unmatched,
)
from .shapes.containers import (
    ServiceContainer,
    parse_image,
    pod_template,
    refuse_not_understood,
    runs_pods,
    service_containers,
)
from .shapes.environment import Environment, container_environment
from .shapes.processes import processes_per_pod

MIGRATION_CONTAINER = "migrate"
# The Secret key that holds the direct DSN; the pooler's DSN is under any other key.
MIGRATION_SECRET_KEY = "url"
# The rendered PgBouncer Deployment: one instance, Recreate (rule.Topology counts one).
PGBOUNCER_DECLARED = {"replicas_max": 1, "max_surge": 0}
BATCH_KINDS = ("Job", "CronJob", "ScaledJob")
# Kubernetes' defaults for a Deployment's rollout and a pod's grace period.
DEFAULT_SURGE = "25%"
DEFAULT_UNAVAILABLE = "25%"
DEFAULT_GRACE_SECONDS = 30


def refused(error: Refused) -> Unreadable:
    """A shape the readers cannot count, as the budget's one-line refusal."""
    return Unreadable(str(error))


@dataclass(frozen=True)
class Built:
    """One resource of a variant and the file (with the kustomizations that changed it)."""

    doc: dict[str, Any]
    origin: str


class KubernetesReader:
    def __init__(self, project: Project, variant: str, documents: list[Built]) -> None:
        self.project = project
        self.variant = variant
        self.built = documents
        self.findings: list[str] = []
        self.inputs: list[Input] = []

    def read(self) -> Reading:
        try:
            return self._read()
        except Refused as error:
            raise refused(error) from None

    def _read(self) -> Reading:
        for item in self.built:
            if not is_cnpg_pooler(item.doc):  # PgBouncer's pods: counted by _cnpg_pooler
                refuse_not_understood(item.doc, item.origin)
        config_maps = {
            str(item.doc.get("metadata", {}).get("name")): _string_data(item)
            for item in self.built
            if item.doc.get("kind") == "ConfigMap"
        }
        self.config_map_origins = {
            str(item.doc.get("metadata", {}).get("name")): item.origin
            for item in self.built
            if item.doc.get("kind") == "ConfigMap"
        }
        autoscalers = [found for item in self.built if (found := autoscaler(item.doc, item.origin))]
        stray = unmatched(autoscalers, [item.doc for item in self.built])
        if stray:
            scaler = stray[0]
            raise Unreadable(
                f"{scaler.file}: {scaler.kind} {scaler.name} scales {scaler.target_kind}"
                f" {scaler.target_name}, which is not in {self.variant} -> the budget cannot count"
                " the pods it scales; add the workload to the same kustomization or fix"
                " scaleTargetRef"
            )
        images = self._service_images()
        resources = [(item.doc, item.origin) for item in self.built]
        workloads = []
        pooler = self.project.declared["service"]["pooler"]
        for item in self.built:
            if is_cnpg_pooler(item.doc) and pooler != "pgbouncer":
                raise Unreadable(
                    f"{item.origin}: a CloudNativePG Pooler runs PgBouncer, but"
                    f" {self.project.topology_file} says pooler = {pooler!r} -> the budget"
                    " would not count its server connections; answer pooler=pgbouncer"
                    " (copier update) or keep the Pooler out of this service's deploy/"
                )
            if not runs_pods(item.doc) or _is_pgbouncer(item.doc) or is_cnpg_pooler(item.doc):
                continue
            template = pod_template(item.doc, item.origin, resources)
            found = service_containers(
                template.spec, sorted(images), file=item.origin, field=template.field
            )
            for container in found:
                where = f"{item.origin}: {container.field}"
                if self._is_migration(container.container):
                    self._check_migration(item, container, where)
                    continue
                env = container_environment(
                    container.container,
                    file=item.origin,
                    field=container.field,
                    config_maps=config_maps,
                )
                alone = len(found) == 1 or all(
                    self._is_migration(other.container) for other in found if other != container
                )
                workloads.append(
                    self._workload(item, template.spec, container, env, autoscalers, where, alone)
                )
        if not workloads:
            raise Unreadable(
                f"{self.variant}: no workload runs the service image ({', '.join(sorted(images))})"
                " -> the budget cannot find the service; keep the image's repository name"
            )
        topology = self._topology(tuple(workloads), autoscalers)
        limits = limits_inputs(self.project, self.inputs)
        return Reading(
            self.variant,
            topology,
            limits,
            self.inputs,
            self.findings,
            [item.doc for item in self.built],
        )

    # -- which containers are the service

    def _service_images(self) -> set[str]:
        """The service image's repositories: the images of the containers named as the service
        and its migration (as written and after kustomize ``images:``), and the names the
        kustomizations under deploy/ give it."""
        names = {self.project.container, MIGRATION_CONTAINER}
        images: set[str] = set()
        # This variant's resources, and the manifests under deploy/ as written: a chart variant
        # is the service's when it runs the image the service's own manifests name.
        documents = [item.doc for item in self.built] + _written(self.project.root / "deploy")
        for doc in documents:
            if not runs_pods(doc):
                continue
            for key in ("containers", "initContainers"):
                for container in _pod_containers(doc, key):
                    if container.get("name") in names and container.get("image"):
                        images.add(str(container["image"]))
        # kustomize `images:` renames the repository; a workload written with either name runs
        # the service (a file read before the rename, a chart that writes the new one).
        for path in sorted((self.project.root / "deploy").rglob("kustomization.y*ml")):
            for entry in kustomization(path.parent).get("images", []) or []:
                old, new = entry.get("name"), entry.get("newName")
                if not old:
                    continue
                repositories = {_repository(str(image)) for image in images}
                if _repository(str(old)) in repositories or (
                    new and _repository(str(new)) in repositories
                ):
                    images.update(str(name) for name in (old, new) if name)
        if not images:
            raise Unreadable(
                f"{self.variant}: no container is named {self.project.container!r} ->"
                f" {self.project.topology_file} [service] container names the service's"
                " container; keep the container's name"
            )
        return images

    @staticmethod
    def _is_migration(container: Mapping[str, Any]) -> bool:
        command = [str(part) for part in container.get("command", []) or []]
        return container.get("name") == MIGRATION_CONTAINER or "alembic" in command[:1]

    def _check_migration(self, item: Built, container: ServiceContainer, where: str) -> None:
        doc = item.doc
        if doc["kind"] != "Job":
            raise Unreadable(
                f"{where} runs the migration in a {doc['kind']} -> the budget counts one migration"
                " connection, from one Job pod; run migrations as a Job"
            )
        source = f"{item.origin}: spec.parallelism"
        parallelism = integer(doc.get("spec", {}).get("parallelism", 1), source)
        if parallelism > rule.MIGRATION_CONNECTIONS:
            self.findings.append(
                f"{source}={parallelism} -> the connection budget counts"
                f" {rule.MIGRATION_CONNECTIONS} migration connection; run one migration pod"
            )
        for index, env in enumerate(container.container.get("env", []) or []):
            key = (env.get("valueFrom") or {}).get("secretKeyRef", {}).get("key")
            if env.get("name") == "DATABASE_URL" and key not in (None, MIGRATION_SECRET_KEY):
                self.findings.append(
                    f"{where}.env[{index}] DATABASE_URL from Secret key {key!r} -> migrations"
                    " must connect to PostgreSQL directly (key 'url'), never through a pooler;"
                    " use key url"
                )

    # -- one workload

    def _workload(
        self,
        item: Built,
        pod: Mapping[str, Any],
        container: ServiceContainer,
        env: Environment,
        autoscalers: list[Autoscaler],
        where: str,
        alone: bool,
    ) -> rule.Workload:
        doc = item.doc
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if not alone:
            # Several containers of one pod run the image: name each by its field.
            name += f" {container.field.rsplit('.', 1)[-1]} {container.container.get('name')}"
        plain = _budget_env(env, item.origin, self.config_map_origins)
        inputs, pool_size, max_overflow = pool_share(self.project, self.findings, plain)
        for variable in RANGE_VARIABLES:
            if variable in plain.values:
                env_int(self.project, self.findings, plain, variable, 1, None)
        if doc["kind"] in BATCH_KINDS:
            workload = self._batch(item, plain, inputs)
        else:
            workload = self._pods(item, pod, container, env, autoscalers, where, inputs)
        self.inputs += inputs
        return rule.Workload(
            name=name,
            null_pool=bool(self.project.declared["pool"]["null_pool"]),
            pool_size=pool_size,
            max_overflow=max_overflow,
            **workload,
        )

    def _processes(
        self, container: ServiceContainer, env: Environment, where: str, inputs: list[Input]
    ) -> int:
        declared = self.project.declared_value("processes", "workers_per_pod")
        origin = where.split(": spec", 1)[0]
        found = processes_per_pod(
            container.container,
            env,
            file=origin,
            field=container.field,
            package=self.project.package,
            default=declared or 1,
            image_cmd=("python", "-m", self.project.package),
        )
        source = found.source
        variable = source.rsplit(": ", 1)[-1]
        if env.get(variable) is not None:
            # A count from the environment: name the ConfigMap key or env entry that set it.
            source = env_source(env, variable, origin, self.config_map_origins)
        item = Input("workers_per_pod", found.count, source, declared)
        inputs.append(item)
        try:
            rule.at_least_minimum("workers_per_pod", found.count, source)
        except rule.OutOfRange as refusal:
            self.findings.append(str(refusal))
        if declared is not None and found.count > declared:
            self.findings.append(
                f"{item.source}={item.value} -> more worker processes than"
                f" {self.project.topology_file} declares (workers_per_pod = {declared}), and each"
                " process refuses to start past it (db/guard.py); change [processes] there too"
            )
        return found.count

    def _pods(
        self,
        item: Built,
        pod: Mapping[str, Any],
        container: ServiceContainer,
        env: Environment,
        autoscalers: list[Autoscaler],
        where: str,
        inputs: list[Input],
    ) -> dict[str, Any]:
        pods = pods_at_once(item, pod, autoscalers, self.project, self.findings)
        inputs += pods.inputs
        processes = self._processes(container, env, where, inputs)
        return {
            "kind": "k8s",
            "replicas": pods.replicas,
            "max_surge": pods.surge,
            "terminating": pods.terminating,
            "processes_per_pod": processes,
        }

    def _batch(self, item: Built, env: Env, inputs: list[Input]) -> dict[str, Any]:
        doc, origin = item.doc, item.origin
        declared = self.project.declared.get("processes", {})
        runs = 1
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
            job, job_path = (
                doc["spec"].get("jobTemplate", {}).get("spec", {}),
                "spec.jobTemplate.spec",
            )
            runs = rule.CONCURRENT_RUNS[policy]
            source = f"{origin}: {job_path}.parallelism"
            parallelism = integer(job.get("parallelism", 1), source)
        elif doc["kind"] == "Job":
            source = f"{origin}: spec.parallelism"
            parallelism = integer(doc.get("spec", {}).get("parallelism", 1), source)
        else:
            peak = peak_pods(doc, origin)
            parallelism, source = peak.pods, peak.source
        rule.at_least_minimum("batch_parallelism", parallelism, source)
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
        self, workloads: tuple[rule.Workload, ...], autoscalers: list[Autoscaler]
    ) -> rule.Topology:
        declared = self.project.declared
        pooler = declared["service"]["pooler"]
        extra: dict[str, Any] = {}
        if pooler == "pgbouncer":
            extra = self._pgbouncer(autoscalers)
        elif pooler == "rds-proxy":
            extra = rds_proxy(self.project, RDS_PROXY_TEMPLATE, self.inputs, self.findings)
        return rule.Topology(
            target=declared["service"]["target"],
            workloads=workloads,
            pooler=pooler,
            driver=declared["service"]["driver"],
            **extra,
        )

    def _pgbouncer(self, autoscalers: list[Autoscaler]) -> dict[str, Any]:
        poolers = [item for item in self.built if is_cnpg_pooler(item.doc)]
        deployments = [
            item
            for item in self.built
            if runs_pods(item.doc) and _is_pgbouncer(item.doc) and not is_cnpg_pooler(item.doc)
        ]
        if poolers and deployments:
            raise Unreadable(
                f"{poolers[0].origin} and {deployments[0].origin} both run PgBouncer for the"
                " service -> each opens its own server pools, with settings of its own; keep"
                " one (the Pooler, or deploy/pgbouncer)"
            )
        if poolers:
            return self._cnpg_pooler(poolers, autoscalers)
        ini = next(
            (
                item
                for item in self.built
                if item.doc.get("kind") == "ConfigMap"
                and "pgbouncer.ini" in (item.doc.get("data") or {})
            ),
            None,
        )
        if ini is None:
            text, where = read_text(self.project, PGBOUNCER_INI), PGBOUNCER_INI
        else:
            text = ini.doc["data"]["pgbouncer.ini"]
            generated = generated_from(self.project.root, ini.doc, "pgbouncer.ini")
            where = generated or f"{ini.origin}: data.pgbouncer.ini"
        settings = pgbouncer_settings(text, where, self.inputs, self.project, self.findings)
        instances = 0
        for item in deployments:
            if item.doc["kind"] != "Deployment":
                raise Unreadable(
                    f"{item.origin} runs PgBouncer in a {item.doc['kind']} -> the"
                    " budget counts PgBouncer Deployments and CloudNativePG Poolers; use one"
                )
            pod = pod_template(item.doc, item.origin).spec
            pods = pods_at_once(item, pod, autoscalers, self.project, self.findings, "pgbouncer_")
            self.inputs += pods.inputs
            instances += pods.replicas + pods.surge + pods.terminating
        settings["pgbouncer_instances"] = max(instances, 1)
        return settings

    def _cnpg_pooler(self, poolers: list[Built], autoscalers: list[Autoscaler]) -> dict[str, Any]:
        """PgBouncer run by CloudNativePG's operator: a Pooler's own settings and instances.

        The operator writes each Pooler's pgbouncer.ini from spec.pgbouncer (poolMode, default
        session, and parameters), so deploy/pgbouncer/pgbouncer.ini is not what it runs; its
        pods are a Deployment of spec.instances (default 1) with spec.deploymentStrategy, which an
        HPA or ScaledObject can scale (the Pooler has a scale subresource).
        https://cloudnative-pg.io/documentation/current/connection_pooling/
        """
        if len(poolers) > 1:
            names = ", ".join(item.origin for item in poolers)
            raise Unreadable(
                f"{names}: more than one Pooler -> the budget counts one PgBouncer per service;"
                " keep one Pooler, or keep the others out of this service's deploy/"
            )
        [item] = poolers
        spec = item.doc.get("spec") or {}
        pgbouncer = spec.get("pgbouncer") or {}
        parameters = pgbouncer.get("parameters") or {}
        where = f"{item.origin}: spec.pgbouncer"
        if not isinstance(parameters, Mapping):
            raise Unreadable(f"{where}.parameters: not a mapping; write name: value pairs")
        lines = [f"pool_mode = {pgbouncer.get('poolMode', 'session')}"]
        lines += [f"{name} = {value}" for name, value in parameters.items()]
        text = "[pgbouncer]\n" + "\n".join(lines) + "\n"
        settings = pgbouncer_settings(text, where, self.inputs, self.project, self.findings)
        pods = pooler_pods(item, autoscalers)
        self.inputs += pods.inputs
        settings["pgbouncer_instances"] = max(pods.replicas + pods.surge + pods.terminating, 1)
        return settings


def _pod_containers(doc: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """The containers under ``key`` of every pod template in ``doc`` (for finding images)."""
    found: list[Mapping[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for name, value in node.items():
                if name == key and isinstance(value, list):
                    found.extend(entry for entry in value if isinstance(entry, Mapping))
                else:
                    walk(value)
        elif isinstance(node, list):
            for entry in node:
                walk(entry)

    walk(doc.get("spec"))
    return found


def _written(deploy: Path) -> list[dict[str, Any]]:
    """The YAML documents under deploy/ outside Helm charts (whose templates are not YAML)."""
    charts = [path.parent for path in deploy.rglob("Chart.yaml")]
    documents: list[dict[str, Any]] = []
    for path in sorted([*deploy.rglob("*.yaml"), *deploy.rglob("*.yml")]):
        if any(path.is_relative_to(chart) for chart in charts):
            continue
        try:
            documents += [
                doc for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)
            ]
        except (yaml.YAMLError, UnicodeDecodeError):
            continue  # the build that includes the file refuses it with the parser's reason
    return documents


def _is_pgbouncer(doc: Mapping[str, Any]) -> bool:
    return any(
        "pgbouncer" in _repository(str(container.get("image", "")))
        for container in _pod_containers(doc, "containers")
    )


def _repository(image: str) -> str:
    """The last part of an image's repository name ("api" of registry:5000/team/api:1.2)."""
    try:
        return parse_image(image).repository.rsplit("/", 1)[-1]
    except Refused:
        return image


def _string_data(item: Built) -> dict[str, str]:
    data = item.doc.get("data") or {}
    return {str(key): str(value) for key, value in data.items()}


def env_source(env: Environment, variable: str, origin: str, config_maps: Mapping[str, str]) -> str:
    """Where ``variable`` is set, as the reports name it: the ConfigMap's file and key, or the
    workload's file and the env entry."""
    value = env.get(variable)
    assert value is not None
    found = re.search(r"\((configMapRef|configMapKeyRef) ([^)/]+)(?:/([^)]+))?\)", value.source)
    if found:
        key = found.group(3) or variable
        return f"{config_maps.get(found.group(2), origin)}: data.{key}"
    return f"{origin}: {value.source} {variable}"


def _budget_env(env: Environment, origin: str, config_maps: Mapping[str, str]) -> Env:
    """The budget's inputs from a container's environment, each with the file and field that
    set it; one from a Secret or from what the build does not hold is refused by name."""
    plain = Env()
    for variable in (*BUDGET_VARIABLES, *RANGE_VARIABLES):
        text = env.require(
            variable, fix=f"set {variable} with value: or from a ConfigMap under deploy/"
        )
        if text is not None:
            plain.values[variable] = (text, env_source(env, variable, origin, config_maps))
    return plain


@dataclass
class _Pods:
    replicas: int
    surge: int
    terminating: int
    inputs: list[Input]


def pods_at_once(
    item: Built,
    pod: Mapping[str, Any],
    autoscalers: list[Autoscaler],
    project: Project,
    findings: list[str],
    prefix: str = "",
) -> _Pods:
    """The pods of a workload that can hold connections at once, rollouts included.

    Steady state is the autoscaler's maximum (HPA maxReplicas, KEDA maxReplicaCount), else
    spec.replicas. A Deployment's RollingUpdate adds maxSurge new pods (Kubernetes'
    fenceposts: surge rounds up, unavailable down), and old pods that are terminating are not
    counted against maxSurge while their grace period runs: with minReadySeconds >=
    terminationGracePeriodSeconds each step's old pods are gone before the next step, so at
    most maxSurge + maxUnavailable terminate at once; otherwise every old pod may. Recreate
    stops every old pod before starting new ones. Other kinds (Argo Rollouts, StatefulSets)
    take their peak from poolwise.shapes.autoscaling; their old pods may all be terminating.
    """
    doc, origin = item.doc, item.origin
    spec = doc.get("spec", {}) or {}
    declared = project.declared.get("processes", {}) if not prefix else PGBOUNCER_DECLARED
    scaler = autoscaler_for(doc, autoscalers, origin)
    if doc.get("kind") != "Deployment":
        peak = peak_pods(doc, origin, autoscalers=autoscalers)
        replicas_source, _, strategy = peak.source.partition("; ")
        # A StatefulSet replaces a pod only after the old one has stopped; a blueGreen Rollout's
        # old set is already counted whole beside the new one (peak_pods). Other old pods (a
        # canary's) may all be stopping while the new ones run.
        blue_green = "blueGreen" in ((spec.get("strategy") or {}) if spec else {})
        stopping = doc.get("kind") in ("StatefulSet", "Pod", "ReplicaSet") or blue_green
        terminating = 0 if stopping else peak.replicas
        inputs = [
            Input(
                f"{prefix}replicas_max",
                peak.replicas,
                replicas_source,
                declared.get("replicas_max"),
            ),
            Input(f"{prefix}max_surge", peak.surge, f"{origin}: {strategy or 'no rollout surge'}"),
            Input(
                f"{prefix}terminating",
                terminating,
                f"{origin}: "
                + ("none beyond the pods counted" if stopping else "every old pod may be stopping"),
            ),
        ]
        return _Pods(peak.replicas, peak.surge, terminating, inputs)
    if scaler is not None:
        field = scaler.source.removeprefix(f"{scaler.file}: {scaler.kind} {scaler.name} ")
        if field.startswith("has no "):
            field = f"spec.maxReplicaCount (not set: KEDA's default {scaler.max_replicas})"
        source = f"{scaler.file}: {field}"
        replicas = scaler.max_replicas
        if "replicas" in spec and integer(spec["replicas"], f"{origin}: spec.replicas") > replicas:
            findings.append(
                f"{origin}: spec.replicas={spec['replicas']} -> more pods than {source}={replicas},"
                " which the connection budget counts; remove replicas (the autoscaler owns the"
                " count) or keep it <= its maximum"
            )
    else:
        source = f"{origin}: spec.replicas" + ("" if "replicas" in spec else " (not set: 1)")
        replicas = integer(spec.get("replicas", 1), source)
    rule.at_least_minimum("replicas_max", max(replicas, 1), source)
    inputs = [Input(f"{prefix}replicas_max", replicas, source, declared.get("replicas_max"))]
    return _rollout(
        origin,
        replicas,
        spec.get("strategy", {}) or {},
        "spec.strategy",
        pod,
        integer(spec.get("minReadySeconds", 0), f"{origin}: spec.minReadySeconds"),
        inputs,
        prefix,
        declared,
    )


def _rollout(
    origin: str,
    replicas: int,
    strategy: Mapping[str, Any],
    field: str,
    pod: Mapping[str, Any],
    ready: int | None,
    inputs: list[Input],
    prefix: str,
    declared: Mapping[str, Any],
) -> _Pods:
    """A Deployment's pods at once during a rollout of ``replicas`` pods (pods_at_once);
    ``ready`` is its minReadySeconds, None where the team cannot set it."""
    if strategy.get("type", "RollingUpdate") == "Recreate":
        inputs.append(Input(f"{prefix}max_surge", 0, f"{origin}: {field}.type=Recreate"))
        return _Pods(replicas, 0, 0, inputs)
    rolling = strategy.get("rollingUpdate", {}) or {}
    surge_source = f"{origin}: {field}.rollingUpdate.maxSurge"
    surge, unavailable = fenceposts(
        rolling.get("maxSurge", DEFAULT_SURGE),
        rolling.get("maxUnavailable", DEFAULT_UNAVAILABLE),
        replicas,
        file=origin,
        field=f"{field}.rollingUpdate",
    )
    inputs.append(Input(f"{prefix}max_surge", surge, surge_source, declared.get("max_surge")))
    grace = integer(
        pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS),
        f"{origin}: terminationGracePeriodSeconds",
    )
    if ready is None:
        terminating = replicas
        why = f"{origin}: every old pod (the Deployment it runs sets no minReadySeconds)"
    elif ready >= grace:
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


CNPG_GROUPS = ("postgresql.cnpg.io", "postgresql.k8s.enterprisedb.io")


def is_cnpg_pooler(doc: Mapping[str, Any]) -> bool:
    """A CloudNativePG (or EDB Postgres for Kubernetes) Pooler: PgBouncer run by the operator."""
    group = str(doc.get("apiVersion", "")).split("/", 1)[0]
    return doc.get("kind") == "Pooler" and group in CNPG_GROUPS


def pooler_pods(item: Built, autoscalers: list[Autoscaler]) -> _Pods:
    """A Pooler's PgBouncer pods at once: its instances, or its autoscaler's maximum, and the
    rollout of the Deployment the operator makes of it (spec.deploymentStrategy; Kubernetes'
    RollingUpdate 25 % / 25 % when it is left out)."""
    doc, origin = item.doc, item.origin
    spec = doc.get("spec") or {}
    scaler = autoscaler_for(doc, autoscalers, origin)
    if scaler is not None:
        replicas = scaler.max_replicas
        source = scaler.source
    else:
        source = f"{origin}: spec.instances" + (
            "" if "instances" in spec else " (not set: CloudNativePG's default 1)"
        )
        replicas = integer(spec.get("instances", 1), source)
    rule.at_least_minimum("replicas_max", max(replicas, 1), source)
    inputs = [
        Input("pgbouncer_replicas_max", replicas, source, PGBOUNCER_DECLARED.get("replicas_max"))
    ]
    template = spec.get("template") or {}
    pod = template.get("spec") or {} if isinstance(template, Mapping) else {}
    return _rollout(
        origin,
        replicas,
        spec.get("deploymentStrategy") or {},
        "spec.deploymentStrategy",
        pod,
        None,  # the operator's Deployment sets no minReadySeconds
        inputs,
        "pgbouncer_",
        PGBOUNCER_DECLARED,
    )


def documents_of(built: list[dict[str, Any]], variant: str) -> list[Built]:
    """A kustomize build's resources, each with the file it came from."""
    return [Built(doc, origin_of(doc, variant)) for doc in built]
