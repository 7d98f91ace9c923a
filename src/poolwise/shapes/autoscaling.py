"""The most pods a workload runs at once: replicas, autoscaler and rollout strategy together.

Each rule is the project's own, cited beside the code. The count is the peak the controller
allows, not a typical value: the budget must hold at the worst moment of a rollout.

Not counted here: pods that Kubernetes has told to stop but that still hold their connections
while they shut down (``terminationGracePeriodSeconds``); a Deployment does not count them
against ``maxSurge`` (https://github.com/kubernetes/enhancements/issues/3973), and the reader
adds them from the grace period.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from poolwise.shapes.errors import Refused

# https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/deployment-v1/#DeploymentSpec
# (strategy.rollingUpdate.maxSurge and maxUnavailable default to 25%; replicas defaults to 1)
K8S_DEFAULT_SURGE = "25%"
K8S_DEFAULT_UNAVAILABLE = "25%"
# https://keda.sh/docs/2.15/reference/scaledobject-spec/#minreplicacount--maxreplicacount
# ("maxReplicaCount: 100 # Optional. Default: 100"); ScaledJob's is the same:
# https://keda.sh/docs/2.15/reference/scaledjob-spec/#maxreplicacount
KEDA_DEFAULT_MAX_REPLICAS = 100
# https://keda.sh/docs/2.15/reference/scaledobject-spec/#pause-autoscaling
KEDA_PAUSED_REPLICAS = "autoscaling.keda.sh/paused-replicas"
# https://argo-rollouts.readthedocs.io/en/stable/features/specification/
# (canary maxSurge and maxUnavailable default to 25%; replicas defaults to 1)
ARGO_DEFAULT_SURGE = "25%"
ARGO_DEFAULT_UNAVAILABLE = "25%"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Rollout", "ReplicaSet", "ReplicationController")


@dataclass(frozen=True)
class Peak:
    """Pods of one workload alive at once at worst, and how the number was reached.

    ``replicas`` is the count between rollouts (the autoscaler's maximum where there is one);
    ``pods`` adds what the rollout strategy runs beside them; ``source`` says which fields.
    """

    pods: int
    replicas: int
    source: str

    @property
    def surge(self) -> int:
        return self.pods - self.replicas


def _name(doc: Mapping[str, Any]) -> str:
    return str((doc.get("metadata") or {}).get("name"))


def _whole(value: Any, file: str, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise Refused(
            file,
            field,
            f"{value!r} is not a whole number of at least {minimum}",
            f"write {field} as a number",
        )
    return value


def scaled(value: Any, total: int, *, round_up: bool, file: str, field: str) -> int:
    """An int-or-percent field resolved against ``total`` as Kubernetes' intstr does:
    ``GetScaledValueFromIntOrPercent`` rounds a percentage up for maxSurge and down for
    maxUnavailable; a string without ``%`` is an error there and refused here.
    https://github.com/kubernetes/apimachinery/blob/master/pkg/util/intstr/intstr.go
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return _whole(value, file, field)
    if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit():
        share = int(value[:-1]) * total
        return -(-share // 100) if round_up else share // 100
    raise Refused(
        file,
        field,
        f"{value!r} is neither a number of pods nor a percentage",
        f'write {field} as a number (2) or a percentage ("25%")',
    )


def fenceposts(
    max_surge: Any, max_unavailable: Any, replicas: int, *, file: str, field: str
) -> tuple[int, int]:
    """(surge, unavailable) for ``replicas``, as the Deployment controller's
    ``ResolveFenceposts`` computes them (Argo Rollouts has the same function): surge rounds
    up, unavailable down, and when both come to 0 unavailable becomes 1.
    https://github.com/kubernetes/kubernetes/blob/master/pkg/controller/deployment/util/deployment_util.go
    https://kubernetes.io/docs/concepts/workloads/controllers/deployment/#max-surge
    """
    surge = scaled(max_surge, replicas, round_up=True, file=file, field=f"{field}.maxSurge")
    unavailable = scaled(
        max_unavailable, replicas, round_up=False, file=file, field=f"{field}.maxUnavailable"
    )
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


# --- autoscalers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Autoscaler:
    """The most replicas an HPA or a KEDA ScaledObject can ask of its target."""

    kind: str
    name: str
    file: str
    target_kind: str
    target_name: str
    target_group: str
    max_replicas: int
    source: str


def _group(api_version: Any) -> str:
    text = str(api_version or "")
    return text.split("/", 1)[0] if "/" in text else ""


def autoscaler(doc: Mapping[str, Any], file: str) -> Autoscaler | None:
    """An HPA (any ``autoscaling/*`` version) or KEDA ``ScaledObject``; ``None`` for a resource
    that scales nothing; refused for any other resource with a ``scaleTargetRef``.

    HPA: ``spec.maxReplicas`` is required.
    https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/horizontal-pod-autoscaler-v2/
    ScaledObject: ``spec.maxReplicaCount`` (KEDA's default 100 when omitted); target kind
    defaults to Deployment and apiVersion to apps/v1; the ``paused-replicas`` annotation scales
    the target to that count whatever the maximum, and ``fallback.replicas`` is what KEDA sets
    when its scaler fails: the larger of them counts.
    https://keda.sh/docs/2.15/reference/scaledobject-spec/
    """
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    name = _name(doc)
    target = spec.get("scaleTargetRef") or {}
    if kind == "HorizontalPodAutoscaler" and _group(doc.get("apiVersion")) == "autoscaling":
        maximum = _whole(spec.get("maxReplicas"), file, "spec.maxReplicas", 1)
        return Autoscaler(
            "HorizontalPodAutoscaler",
            name,
            file,
            str(target.get("kind")),
            str(target.get("name")),
            _group(target.get("apiVersion")),
            maximum,
            f"{file}: HorizontalPodAutoscaler {name} spec.maxReplicas",
        )
    if kind == "ScaledObject" and _group(doc.get("apiVersion")) == "keda.sh":
        if "maxReplicaCount" in spec:
            maximum = _whole(spec["maxReplicaCount"], file, "spec.maxReplicaCount", 1)
            source = f"{file}: ScaledObject {name} spec.maxReplicaCount"
        else:
            maximum = KEDA_DEFAULT_MAX_REPLICAS
            source = (
                f"{file}: ScaledObject {name} has no spec.maxReplicaCount, KEDA's default"
                f" {KEDA_DEFAULT_MAX_REPLICAS}"
            )
        fallback = (spec.get("fallback") or {}).get("replicas")
        if fallback is not None and _whole(fallback, file, "spec.fallback.replicas") > maximum:
            maximum, source = fallback, f"{file}: ScaledObject {name} spec.fallback.replicas"
        paused = ((doc.get("metadata") or {}).get("annotations") or {}).get(KEDA_PAUSED_REPLICAS)
        if paused is not None:
            field = f"metadata.annotations[{KEDA_PAUSED_REPLICAS}]"
            count = _whole(int(paused) if str(paused).strip().isdigit() else paused, file, field)
            if count > maximum:
                maximum, source = count, f"{file}: ScaledObject {name} {field}"
        return Autoscaler(
            "ScaledObject",
            name,
            file,
            str(target.get("kind") or "Deployment"),
            str(target.get("name")),
            _group(target.get("apiVersion") or "apps/v1"),
            maximum,
            source,
        )
    if "scaleTargetRef" in spec:
        # Another scaler of a workload's replica count (KEDA's HTTPScaledObject, KEDA 1's
        # keda.k8s.io API, a vendor's): its maximum is not known, so nothing it scales holds.
        raise Refused(
            file,
            f"{doc.get('apiVersion')} {kind} {name}",
            f"scales {target.get('kind') or 'a workload'}"
            f" {target.get('name') or target.get('deploymentName')}, and the budget does not know"
            " the most replicas it asks for",
            "scale with a HorizontalPodAutoscaler (maxReplicas) or a KEDA ScaledObject"
            " (maxReplicaCount)",
        )
    return None


def autoscaler_for(
    workload: Mapping[str, Any], autoscalers: Iterable[Autoscaler], file: str
) -> Autoscaler | None:
    """The autoscaler that scales ``workload``; two of them are refused (KEDA's admission
    webhook refuses a second one, and without it they would fight over the count).
    https://keda.sh/docs/2.15/concepts/admission-webhooks/
    """
    group = _group(workload.get("apiVersion"))
    found = [
        a
        for a in autoscalers
        if a.target_kind == workload.get("kind")
        and a.target_name == _name(workload)
        and a.target_group == group
    ]
    if len(found) > 1:
        names = ", ".join(f"{a.kind} {a.name} ({a.file})" for a in found)
        raise Refused(
            file,
            f"{workload.get('kind')} {_name(workload)}",
            f"is scaled by {names}; only one autoscaler can own a workload",
            "keep one of them",
        )
    return found[0] if found else None


def unmatched(
    autoscalers: Iterable[Autoscaler], workloads: Iterable[Mapping[str, Any]]
) -> list[Autoscaler]:
    """Autoscalers whose target is not among ``workloads``: the reader refuses them, since
    the pods they scale are not read (a Rollout through workloadRef scales the Rollout)."""
    present = {(w.get("kind"), _name(w), _group(w.get("apiVersion"))) for w in workloads}
    return [a for a in autoscalers if (a.target_kind, a.target_name, a.target_group) not in present]


# --- workloads -------------------------------------------------------------------------------


def peak_pods(
    doc: Mapping[str, Any],
    file: str,
    *,
    autoscalers: Sequence[Autoscaler] = (),
    nodes: int | None = None,
) -> Peak:
    """The most pods ``doc`` runs at once; ``nodes`` is the node count a DaemonSet runs on,
    which only the team can declare. Kinds the budget does not know are refused."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    name = _name(doc)
    if kind == "Pod":
        return Peak(1, 1, f"{file}: Pod {name}")
    if kind == "DaemonSet":
        return _daemonset(spec, name, file, nodes)
    if kind == "Job":
        pods, source = _job_pods(spec, file, "spec", name)
        return Peak(pods, pods, source)
    if kind == "CronJob":
        return _cronjob(spec, name, file)
    if kind == "ScaledJob" and _group(doc.get("apiVersion")) == "keda.sh":
        return _scaledjob(spec, name, file)
    foreign_rollout = kind == "Rollout" and _group(doc.get("apiVersion")) != "argoproj.io"
    if kind not in WORKLOAD_KINDS or foreign_rollout:
        raise Refused(
            file,
            f"{doc.get('apiVersion')} {kind} {name}",
            "the budget does not know how many pods this kind runs",
            "run the service with a Deployment, StatefulSet, Job, CronJob or Argo Rollout",
        )
    replicas, source = _replicas(doc, spec, file, autoscalers)
    if kind == "Deployment":
        return _deployment(spec, replicas, source, file)
    if kind == "Rollout":
        return _rollout(spec, replicas, source, file)
    # StatefulSet: a rolling update deletes a pod before it creates its replacement, so it
    # never runs more than spec.replicas (maxUnavailable only lowers that).
    # https://kubernetes.io/docs/concepts/workloads/controllers/statefulset/#rolling-updates
    # ReplicaSet and ReplicationController have no rollout of their own.
    return Peak(replicas, replicas, source)


def _replicas(
    doc: Mapping[str, Any], spec: Mapping[str, Any], file: str, autoscalers: Sequence[Autoscaler]
) -> tuple[int, str]:
    """spec.replicas (default 1), or the autoscaler's maximum: the larger of the two, since the
    workload starts at spec.replicas on every apply before the autoscaler corrects it."""
    kind, name = doc.get("kind"), _name(doc)
    if "replicas" in spec:
        replicas = _whole(spec["replicas"], file, "spec.replicas")
        source = f"{file}: {kind} {name} spec.replicas"
    else:
        replicas, source = 1, f"{file}: {kind} {name} has no spec.replicas, default 1"
    scaler = autoscaler_for(doc, autoscalers, file)
    if scaler is not None and scaler.max_replicas >= replicas:
        return scaler.max_replicas, scaler.source
    if scaler is not None:
        return replicas, f"{source} (above {scaler.kind} {scaler.name}'s maximum)"
    return replicas, source


def _deployment(spec: Mapping[str, Any], replicas: int, source: str, file: str) -> Peak:
    strategy = spec.get("strategy") or {}
    if strategy.get("type") == "Recreate":
        # https://kubernetes.io/docs/concepts/workloads/controllers/deployment/#recreate-deployment
        # "All existing Pods are killed before new ones are created".
        return Peak(replicas, replicas, f"{source}; strategy Recreate")
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        raise Refused(
            file,
            "spec.strategy.type",
            f"{strategy.get('type')!r} is not a Deployment strategy",
            "write RollingUpdate or Recreate",
        )
    rolling = strategy.get("rollingUpdate") or {}
    surge, _ = fenceposts(
        rolling.get("maxSurge", K8S_DEFAULT_SURGE),
        rolling.get("maxUnavailable", K8S_DEFAULT_UNAVAILABLE),
        replicas,
        file=file,
        field="spec.strategy.rollingUpdate",
    )
    return Peak(replicas + surge, replicas, f"{source}; + maxSurge {surge} during a rollout")


def _daemonset(spec: Mapping[str, Any], name: str, file: str, nodes: int | None) -> Peak:
    if nodes is None:
        raise Refused(
            file,
            f"DaemonSet {name}",
            "a DaemonSet runs one pod per node, and the files do not say how many nodes",
            "declare the node count in topology.toml, or run the service as a Deployment",
        )
    # https://kubernetes.io/docs/tasks/manage-daemon/update-daemon-set/ : with maxSurge an
    # updated pod starts on a node before the old one stops (maxSurge defaults to 0).
    rolling = (spec.get("updateStrategy") or {}).get("rollingUpdate") or {}
    surge = scaled(
        rolling.get("maxSurge", 0),
        nodes,
        round_up=True,
        file=file,
        field="spec.updateStrategy.rollingUpdate.maxSurge",
    )
    return Peak(nodes + surge, nodes, f"{file}: DaemonSet {name} on {nodes} declared nodes")


def _job_pods(spec: Mapping[str, Any], file: str, field: str, name: str) -> tuple[int, str]:
    """A Job's pods at once: parallelism (default 1), no more than completions when set.
    https://kubernetes.io/docs/concepts/workloads/controllers/job/#controlling-parallelism"""
    parallelism = _whole(spec.get("parallelism", 1), file, f"{field}.parallelism")
    source = f"{file}: Job {name} {field}.parallelism"
    if spec.get("completions") is not None:
        completions = _whole(spec["completions"], file, f"{field}.completions")
        if completions < parallelism:
            return completions, f"{file}: Job {name} {field}.completions"
    return parallelism, source


def _cronjob(spec: Mapping[str, Any], name: str, file: str) -> Peak:
    """Pods of one run times the runs alive at once, by concurrencyPolicy:
    https://kubernetes.io/docs/concepts/workloads/controllers/cron-jobs/#concurrency-policy
    Allow (the default) lets runs overlap without bound; Forbid runs one at a time; Replace
    deletes the running Job to start the next, whose pods start while the old ones stop."""
    job_spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    pods, source = _job_pods(job_spec, file, "spec.jobTemplate.spec", name)
    policy = spec.get("concurrencyPolicy", "Allow")
    if policy == "Forbid":
        return Peak(pods, pods, f"{source}; concurrencyPolicy Forbid")
    if policy == "Replace":
        return Peak(2 * pods, pods, f"{source}; concurrencyPolicy Replace (old run stopping)")
    raise Refused(
        file,
        f"CronJob {name} spec.concurrencyPolicy",
        f"{policy} lets runs overlap without bound, so no number of pods holds",
        "set concurrencyPolicy: Forbid (or Replace)",
    )


def _scaledjob(spec: Mapping[str, Any], name: str, file: str) -> Peak:
    """KEDA starts up to maxReplicaCount Jobs (default 100) from jobTargetRef, a Job spec.
    https://keda.sh/docs/2.15/reference/scaledjob-spec/"""
    pods, _ = _job_pods(spec.get("jobTargetRef") or {}, file, "spec.jobTargetRef", name)
    if "maxReplicaCount" in spec:
        jobs = _whole(spec["maxReplicaCount"], file, "spec.maxReplicaCount", 1)
        source = f"{file}: ScaledJob {name} spec.maxReplicaCount"
    else:
        jobs = KEDA_DEFAULT_MAX_REPLICAS
        source = f"{file}: ScaledJob {name} has no spec.maxReplicaCount, KEDA's default {jobs}"
    return Peak(jobs * pods, jobs * pods, f"{source} x {pods} pods per Job")


# --- Argo Rollouts ---------------------------------------------------------------------------


def _rollout(spec: Mapping[str, Any], replicas: int, source: str, file: str) -> Peak:
    strategy = spec.get("strategy") or {}
    if "blueGreen" in strategy:
        return _blue_green(strategy["blueGreen"] or {}, replicas, source, file)
    if "canary" in strategy:
        return _canary(strategy["canary"] or {}, replicas, source, file)
    raise Refused(
        file,
        "spec.strategy",
        "a Rollout needs a canary or blueGreen strategy",
        "write strategy.canary or strategy.blueGreen",
    )


def _blue_green(bg: Mapping[str, Any], replicas: int, source: str, file: str) -> Peak:
    """Blue-green: the preview ReplicaSet (previewReplicaCount, else all replicas) runs beside
    the active one; on promotion it is scaled to full size and becomes active, and the old
    active keeps its pods for scaleDownDelaySeconds (default 30) so traffic can drain.
    https://argo-rollouts.readthedocs.io/en/stable/features/bluegreen/
    Either way both sets are at full size at once: twice the replicas. (With
    scaleDownDelayRevisionLimit unset, a second promotion inside the delay keeps one more
    old set; the budget counts one, as a rollout at a time is what teams plan for.)"""
    preview = bg.get("previewReplicaCount")
    if preview is not None:
        _whole(preview, file, "spec.strategy.blueGreen.previewReplicaCount", 1)
    return Peak(
        2 * replicas,
        replicas,
        f"{source}; blueGreen: the new set at full size beside the old one until"
        " scaleDownDelaySeconds",
    )


def _canary(canary: Mapping[str, Any], replicas: int, source: str, file: str) -> Peak:
    """Canary, as the controller sizes the ReplicaSets (utils/replicaset/canary.go):
    https://github.com/argoproj/argo-rollouts/blob/master/utils/replicaset/canary.go
    https://argo-rollouts.readthedocs.io/en/stable/features/canary/

    With trafficRouting the stable set stays at full size for the whole update and the canary
    is sized by setCanaryScale (replicas, or weight of spec.replicas, rounded up) or the
    traffic weight; at the end the canary reaches 100% beside the full stable set. Without
    trafficRouting the weight is approximated by pod counts: canary ceil(R*w/100), stable
    ceil(R*(100-w)/100), the total held to R + maxSurge (+1 when the weight does not divide R,
    since both counts are rounded up), and stable scaled up first."""
    field = "spec.strategy.canary"
    surge, _ = fenceposts(
        canary.get("maxSurge", ARGO_DEFAULT_SURGE),
        canary.get("maxUnavailable", ARGO_DEFAULT_UNAVAILABLE),
        replicas,
        file=file,
        field=field,
    )
    steps = canary.get("steps") or []
    if not isinstance(steps, list):
        raise Refused(file, f"{field}.steps", "is not a list", "write steps as a list")
    experiment_pods = 0
    for index, step in enumerate(steps):
        experiment = (step or {}).get("experiment")
        if experiment:
            # An experiment step runs its templates' ReplicaSets beside stable and canary.
            # https://argo-rollouts.readthedocs.io/en/stable/features/experiment/
            experiment_pods = max(
                experiment_pods,
                sum(
                    _whole(t.get("replicas", 1), file, f"{field}.steps[{index}].experiment")
                    for t in experiment.get("templates") or []
                ),
            )
    if canary.get("trafficRouting"):
        largest = replicas  # promotion: canary at 100% beside the full stable set
        for index, step in enumerate(steps):
            scale = (step or {}).get("setCanaryScale")
            if not scale:
                continue
            where = f"{field}.steps[{index}].setCanaryScale"
            if "replicas" in scale:
                largest = max(largest, _whole(scale["replicas"], file, f"{where}.replicas"))
            elif "weight" in scale:
                weight = _whole(scale["weight"], file, f"{where}.weight")
                largest = max(largest, math.ceil(replicas * weight / 100))
        pods = replicas + largest + experiment_pods
        return Peak(
            pods,
            replicas,
            f"{source}; canary with trafficRouting: the stable set stays at {replicas} while"
            f" the canary reaches {largest}",
        )
    weights = []
    for index, step in enumerate(steps):
        if (step or {}).get("setWeight") is not None:
            weights.append(_whole(step["setWeight"], file, f"{field}.steps[{index}].setWeight"))
    pods = _basic_canary_peak(replicas, surge, [*weights, 100]) + experiment_pods
    return Peak(
        pods,
        replicas,
        f"{source}; canary steps {weights or 'none'} with maxSurge {surge}: at most {pods}"
        " pods during an update or an abort",
    )


def _counts(replicas: int, weight: int) -> tuple[int, int]:
    """(stable, canary) pods the controller wants at ``weight`` percent."""
    if weight >= 100:
        return 0, replicas
    return math.ceil(replicas * (100 - weight) / 100), math.ceil(replicas * weight / 100)


def _basic_canary_peak(replicas: int, surge: int, weights: list[int]) -> int:
    """The most pods of stable and canary together over every step and every abort, as
    CalculateReplicaCountsForCanary scales them: each set grows no further than its target,
    and the total no further than replicas + maxSurge (+1 when the weight splits unevenly)."""

    def cap(weight: int) -> int:
        uneven = (replicas * weight) % 100 != 0
        return replicas + surge + (1 if uneven and weight < 100 else 0)

    stable, new = replicas, 0
    peak = replicas
    for weight in weights:
        want_stable, want_new = _counts(replicas, weight)
        during = min(cap(weight), max(stable, want_stable) + max(new, want_new))
        peak = max(peak, stable + new, during)
        # An abort from here scales the stable set back to full before the canary goes.
        peak = max(peak, min(cap(0), replicas + want_new))
        stable, new = want_stable, want_new
    return peak
