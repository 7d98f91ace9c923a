"""Kubernetes workloads: every Deployment, CronJob and Job that runs the service's image.

The HPA that targets a Deployment gives its replicas (spec.replicas when there is none), the
rollout its surge and terminating pods; the app container is found by name, its environment is
resolved from env, valueFrom and envFrom, and its worker count from its command and args.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import rule
from .errors import ToolMissing, Unreadable
from .kustomize import K8S_BASE, generated_from, kustomize_build, origin_of, read_resources
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

MIGRATION_CONTAINER = "migrate"
# The rendered PgBouncer Deployment: one instance, Recreate (rule.Topology counts one).
PGBOUNCER_DECLARED = {"replicas_max": 1, "max_surge": 0}
WORKLOAD_KINDS = ("Deployment", "CronJob", "Job")
UNCOUNTED_KINDS = ("StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "ReplicationController")
# Kubernetes' defaults for a Deployment's rollout and a pod's grace period.
DEFAULT_SURGE = "25%"
DEFAULT_UNAVAILABLE = "25%"
DEFAULT_GRACE_SECONDS = 30


def pod_spec(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    if doc["kind"] == "CronJob":
        return doc.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get(
            "spec", {}
        ), "spec.jobTemplate.spec.template.spec"
    if doc["kind"] == "Pod":
        return doc.get("spec", {}), "spec"
    return doc.get("spec", {}).get("template", {}).get("spec", {}), "spec.template.spec"


def containers(doc: dict[str, Any]) -> list[tuple[int, dict[str, Any], str]]:
    pod, path = pod_spec(doc)
    return [
        (index, container, f"{path}.containers[{index}]")
        for index, container in enumerate(pod.get("containers", []) or [])
    ]


class KubernetesReader:
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
            for _, container, path in containers(doc):
                if not self._is_service(container, images):
                    continue
                where = f"{origin_of(doc, self.variant)}: {path}"
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
        limits = limits_inputs(self.project, self.inputs)
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
            for _, container, _ in containers(doc)
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
        if parallelism > rule.MIGRATION_CONNECTIONS:
            origin = origin_of(doc, self.variant)
            self.findings.append(
                f"{origin}: spec.parallelism={parallelism} -> the connection budget counts"
                f" {rule.MIGRATION_CONNECTIONS} migration connection; run one migration pod"
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
    ) -> Env:
        env = Env()
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
            origin = origin_of(configmap, self.variant)
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
                    origin = origin_of(configmap, self.variant)  # type: ignore[arg-type]
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
        env: Env,
        hpas: dict[tuple[Any, Any], dict[str, Any]],
        where: str,
    ) -> rule.Workload:
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
        return rule.Workload(
            name=name,
            null_pool=bool(self.project.declared["pool"]["null_pool"]),
            pool_size=pool_size,
            max_overflow=max_overflow,
            **workload,
        )

    def _processes_per_pod(
        self, container: dict[str, Any], env: Env, where: str, inputs: list[Input]
    ) -> int:
        declared = self.project.declared_value("processes", "workers_per_pod")
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        try:
            workers = rule.workers_in_command(argv, env.plain())
        except ValueError as error:
            raise Unreadable(
                f"{where}.command/args: {error} -> the budget cannot count the workers; write"
                " --workers N or set WEB_CONCURRENCY"
            ) from None
        if workers is not None:
            item = Input("workers_per_pod", workers, f"{where}.command/args --workers", declared)
            rule.at_least_minimum("workers_per_pod", workers, item.source)
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
        env: Env,
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
        self, doc: dict[str, Any], env: Env, name: str, inputs: list[Input]
    ) -> dict[str, Any]:
        origin = origin_of(doc, self.variant)
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
            runs = rule.CONCURRENT_RUNS[policy]
        else:
            job, job_path, runs = doc.get("spec", {}), "spec", 1
        source = f"{origin}: {job_path}.parallelism"
        parallelism = integer(job.get("parallelism", 1), source)
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
        self,
        workloads: tuple[rule.Workload, ...],
        documents: list[dict[str, Any]],
        hpas: dict[tuple[Any, Any], dict[str, Any]],
    ) -> rule.Topology:
        declared = self.project.declared
        pooler = declared["service"]["pooler"]
        extra: dict[str, Any] = {}
        if pooler == "pgbouncer":
            extra = self._pgbouncer(documents, hpas)
        elif pooler == "rds-proxy":
            extra = rds_proxy(self.project, RDS_PROXY_TEMPLATE, self.inputs, self.findings)
        return rule.Topology(
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
            text, where = read_text(self.project, PGBOUNCER_INI), PGBOUNCER_INI
        else:
            text = ini["data"]["pgbouncer.ini"]
            generated = generated_from(self.project.root, ini, "pgbouncer.ini")
            where = generated or f"{origin_of(ini, self.variant)}: data.pgbouncer.ini"
        settings = pgbouncer_settings(text, where, self.inputs, self.project, self.findings)
        instances = 0
        for doc in documents:
            if doc.get("kind") not in ("Deployment", *UNCOUNTED_KINDS):
                continue
            if not any(
                "pgbouncer" in str(container.get("image", ""))
                for _, container, _ in containers(doc)
            ):
                continue
            if doc["kind"] != "Deployment":
                raise Unreadable(
                    f"{origin_of(doc, self.variant)} runs PgBouncer in a {doc['kind']} -> the"
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
    origin = origin_of(doc, variant)
    spec = doc.get("spec", {}) or {}
    name = doc["metadata"]["name"]
    declared = project.declared.get("processes", {}) if not prefix else PGBOUNCER_DECLARED
    hpa = hpas.get(("Deployment", name))
    if hpa is not None:
        source = f"{origin_of(hpa, variant)}: spec.maxReplicas"
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
    rule.at_least_minimum("replicas_max", max(replicas, 1), source)
    inputs = [Input(f"{prefix}replicas_max", replicas, source, declared.get("replicas_max"))]
    strategy = spec.get("strategy", {}) or {}
    if strategy.get("type", "RollingUpdate") == "Recreate":
        inputs.append(Input(f"{prefix}max_surge", 0, f"{origin}: spec.strategy.type=Recreate"))
        return _Pods(replicas, 0, 0, inputs)
    rolling = strategy.get("rollingUpdate", {}) or {}
    surge_source = f"{origin}: spec.strategy.rollingUpdate.maxSurge"
    try:
        surge = rule.surge_count(rolling.get("maxSurge", DEFAULT_SURGE), replicas)
        unavailable = rule.unavailable_count(
            rolling.get("maxUnavailable", DEFAULT_UNAVAILABLE), replicas
        )
    except ValueError:
        raise Unreadable(
            f"{origin}: spec.strategy.rollingUpdate={rolling} -> maxSurge and maxUnavailable"
            " must be a count or a percentage; fix them"
        ) from None
    inputs.append(Input(f"{prefix}max_surge", surge, surge_source, declared.get("max_surge")))
    pod, _ = pod_spec(doc)
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
