"""poolwise.shapes.autoscaling: the most pods a workload runs at once.

Each row: a workload (and the autoscalers beside it) as manifests write it, and its verdict
(peak pods) or the refusal's first line. The numbers follow the controllers' documented rules
(see the citations in src/poolwise/shapes/autoscaling.py); the comment on each row shows the
arithmetic.
"""

from __future__ import annotations

from typing import Any

import pytest

from poolwise.shapes import Refused
from poolwise.shapes.autoscaling import autoscaler, fenceposts, peak_pods, unmatched

FILE = "deploy/k8s/workload.yaml"
ARGO = "argoproj.io/v1alpha1"


def workload(kind: str, api: str = "apps/v1", name: str = "orders", **spec: Any) -> dict:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name}, "spec": spec}


def make_hpa(maximum: int, kind: str = "Deployment", api: str = "apps/v1", version: str = "v2"):
    return workload(
        "HorizontalPodAutoscaler",
        f"autoscaling/{version}",
        scaleTargetRef={"apiVersion": api, "kind": kind, "name": "orders"},
        minReplicas=1,
        maxReplicas=maximum,
    )


def scaled_object(
    maximum: int | None = None, kind: str | None = None, api: str | None = None, **extra: Any
):
    target: dict[str, Any] = {"name": "orders"}
    if kind:
        target["kind"] = kind
    if api:
        target["apiVersion"] = api
    spec: dict[str, Any] = {"scaleTargetRef": target, "triggers": [{"type": "cpu"}]}
    if maximum is not None:
        spec["maxReplicaCount"] = maximum
    annotations = extra.pop("annotations", None)
    spec.update(extra)
    doc = workload("ScaledObject", "keda.sh/v1alpha1", **spec)
    if annotations:
        doc["metadata"]["annotations"] = annotations
    return doc


def rolling(surge: Any = None, unavailable: Any = None) -> dict:
    update: dict[str, Any] = {}
    if surge is not None:
        update["maxSurge"] = surge
    if unavailable is not None:
        update["maxUnavailable"] = unavailable
    return {"type": "RollingUpdate", "rollingUpdate": update}


def canary(**fields: Any) -> dict:
    return {"canary": fields}


# shape, workload, autoscalers, peak pods
COUNTED: list[tuple[str, dict, list[dict], int]] = [
    ("Deployment 3, default 25% surge: 3 + ceil(0.75)", workload("Deployment", replicas=3), [], 4),
    ("Deployment 10, default: 10 + ceil(2.5)", workload("Deployment", replicas=10), [], 13),
    ("Deployment without replicas: 1 + 1", workload("Deployment"), [], 2),
    (
        "maxSurge 34% rounds up: 10 + ceil(3.4)",
        workload("Deployment", replicas=10, strategy=rolling("34%")),
        [],
        14,
    ),
    ("maxSurge 2", workload("Deployment", replicas=10, strategy=rolling(2)), [], 12),
    (
        "maxSurge 0, maxUnavailable 10%",
        workload("Deployment", replicas=10, strategy=rolling(0, "10%")),
        [],
        10,
    ),
    ("Recreate", workload("Deployment", replicas=4, strategy={"type": "Recreate"}), [], 4),
    ("HPA max 10: 10 + ceil(2.5)", workload("Deployment", replicas=2), [make_hpa(10)], 13),
    ("HPA autoscaling/v1", workload("Deployment", replicas=2), [make_hpa(4, version="v1")], 5),
    (
        "spec.replicas above the HPA max: 6 + ceil(1.5)",
        workload("Deployment", replicas=6),
        [make_hpa(4)],
        8,
    ),
    ("KEDA without maxReplicaCount: 100 + 25", workload("Deployment"), [scaled_object()], 125),
    ("KEDA maxReplicaCount 20: 20 + 5", workload("Deployment"), [scaled_object(20)], 25),
    (
        "KEDA target kind and apiVersion given",
        workload("Deployment"),
        [scaled_object(8, "Deployment", "apps/v1")],
        10,
    ),
    (
        "KEDA paused-replicas 30 above max 20: 30 + ceil(7.5)",
        workload("Deployment"),
        [scaled_object(20, annotations={"autoscaling.keda.sh/paused-replicas": "30"})],
        38,
    ),
    (
        "KEDA fallback replicas 40 above max 20: 40 + 10",
        workload("Deployment"),
        [scaled_object(20, fallback={"failureThreshold": 3, "replicas": 40})],
        50,
    ),
    (
        "HPA for another Deployment does not apply",
        workload("Deployment", replicas=2),
        [
            {
                **make_hpa(50),
                "spec": {
                    **make_hpa(50)["spec"],
                    "scaleTargetRef": {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": "other",
                    },
                },
            }
        ],
        3,
    ),
    ("StatefulSet: no surge", workload("StatefulSet", replicas=5), [], 5),
    ("StatefulSet with HPA", workload("StatefulSet", replicas=2), [make_hpa(8, "StatefulSet")], 8),
    (
        "StatefulSet with KEDA",
        workload("StatefulSet"),
        [scaled_object(6, "StatefulSet", "apps/v1")],
        6,
    ),
    ("ReplicaSet", workload("ReplicaSet", replicas=3), [], 3),
    ("Pod", workload("Pod", "v1"), [], 1),
    ("Job default parallelism", workload("Job", "batch/v1"), [], 1),
    ("Job parallelism 2 (a migration Job)", workload("Job", "batch/v1", parallelism=2), [], 2),
    (
        "Job parallelism above completions",
        workload("Job", "batch/v1", parallelism=5, completions=2),
        [],
        2,
    ),
    (
        "CronJob Forbid",
        workload(
            "CronJob",
            "batch/v1",
            concurrencyPolicy="Forbid",
            jobTemplate={"spec": {"parallelism": 3}},
        ),
        [],
        3,
    ),
    (
        "CronJob Replace: the old run stops while the new starts",
        workload(
            "CronJob",
            "batch/v1",
            concurrencyPolicy="Replace",
            jobTemplate={"spec": {"parallelism": 2}},
        ),
        [],
        4,
    ),
    ("KEDA ScaledJob default: 100 Jobs", workload("ScaledJob", "keda.sh/v1alpha1"), [], 100),
    (
        "KEDA ScaledJob 5 Jobs of parallelism 2",
        workload(
            "ScaledJob", "keda.sh/v1alpha1", maxReplicaCount=5, jobTargetRef={"parallelism": 2}
        ),
        [],
        10,
    ),
    # Argo Rollouts, canary without traffic routing: total held to R + maxSurge (+1 uneven)
    (
        "canary 20/40/60/80 on 5, default surge ceil(1.25)=2: 5 + 2",
        workload(
            "Rollout",
            ARGO,
            replicas=5,
            strategy=canary(steps=[{"setWeight": w} for w in (20, 40, 60, 80)]),
        ),
        [],
        7,
    ),
    (
        "canary maxSurge 0 on 10, weight 10 divides evenly: 10",
        workload(
            "Rollout",
            ARGO,
            replicas=10,
            strategy=canary(maxSurge=0, maxUnavailable=1, steps=[{"setWeight": 10}]),
        ),
        [],
        10,
    ),
    (
        "canary maxSurge 0 on 3, weight 50 rounds both sets up: 3 + 1",
        workload(
            "Rollout",
            ARGO,
            replicas=3,
            strategy=canary(maxSurge=0, maxUnavailable=1, steps=[{"setWeight": 50}, {"pause": {}}]),
        ),
        [],
        4,
    ),
    (
        "canary maxSurge 1 on 3, weight 50 uneven: the surge grows by one, 3 + 1 + 1",
        workload(
            "Rollout",
            ARGO,
            replicas=3,
            strategy=canary(maxSurge=1, maxUnavailable=0, steps=[{"setWeight": 50}]),
        ),
        [],
        5,
    ),
    (
        "canary without steps acts like maxSurge: 4 + 1",
        workload("Rollout", ARGO, replicas=4, strategy=canary()),
        [],
        5,
    ),
    (
        "canary maxSurge 100%: 4 + 4",
        workload(
            "Rollout", ARGO, replicas=4, strategy=canary(maxSurge="100%", steps=[{"setWeight": 50}])
        ),
        [],
        8,
    ),
    (
        "canary experiment step runs 2 + 1 more pods: 7 + 3",
        workload(
            "Rollout",
            ARGO,
            replicas=5,
            strategy=canary(
                steps=[
                    {
                        "experiment": {
                            "templates": [
                                {"name": "baseline", "specRef": "stable", "replicas": 2},
                                {"name": "canary", "specRef": "canary"},
                            ]
                        }
                    },
                    {"setWeight": 20},
                ]
            ),
        ),
        [],
        10,
    ),
    # canary with traffic routing: the stable set stays full while the canary grows to 100%
    (
        "canary trafficRouting on 4: 4 + 4",
        workload(
            "Rollout",
            ARGO,
            replicas=4,
            strategy=canary(
                trafficRouting={"nginx": {"stableIngress": "orders"}}, steps=[{"setWeight": 20}]
            ),
        ),
        [],
        8,
    ),
    (
        "canary setCanaryScale replicas 10 on 4: 4 + 10",
        workload(
            "Rollout",
            ARGO,
            replicas=4,
            strategy=canary(
                trafficRouting={"istio": {}},
                steps=[{"setCanaryScale": {"replicas": 10}}, {"setWeight": 10}],
            ),
        ),
        [],
        14,
    ),
    (
        "canary setCanaryScale weight 50 on 4: 4 + max(4, 2)",
        workload(
            "Rollout",
            ARGO,
            replicas=4,
            strategy=canary(
                trafficRouting={"istio": {}}, steps=[{"setCanaryScale": {"weight": 50}}]
            ),
        ),
        [],
        8,
    ),
    (
        "canary with HPA max 6 on the Rollout: 6 + ceil(1.5)",
        workload("Rollout", ARGO, replicas=2, strategy=canary()),
        [make_hpa(6, "Rollout", ARGO)],
        8,
    ),
    # blueGreen: the new set at full size beside the old one until scaleDownDelaySeconds
    (
        "blueGreen on 3: 2 x 3",
        workload("Rollout", ARGO, replicas=3, strategy={"blueGreen": {"activeService": "a"}}),
        [],
        6,
    ),
    (
        "blueGreen previewReplicaCount 1 still promotes to full size: 2 x 3",
        workload(
            "Rollout",
            ARGO,
            replicas=3,
            strategy={"blueGreen": {"activeService": "a", "previewReplicaCount": 1}},
        ),
        [],
        6,
    ),
    (
        "blueGreen with KEDA on the Rollout: 2 x 10",
        workload("Rollout", ARGO, strategy={"blueGreen": {"activeService": "a"}}),
        [scaled_object(10, "Rollout", ARGO)],
        20,
    ),
    (
        "Rollout through workloadRef, blueGreen on 2: 2 x 2",
        workload(
            "Rollout",
            ARGO,
            replicas=2,
            workloadRef={"apiVersion": "apps/v1", "kind": "Deployment", "name": "orders"},
            strategy={"blueGreen": {"activeService": "a"}},
        ),
        [],
        4,
    ),
]


@pytest.mark.parametrize(
    ("shape", "doc", "scalers", "expected"), COUNTED, ids=[c[0] for c in COUNTED]
)
def test_peak_pods(shape, doc, scalers, expected):
    found = [a for s in scalers if (a := autoscaler(s, "deploy/k8s/hpa.yaml")) is not None]
    assert peak_pods(doc, FILE, autoscalers=found).pods == expected


@pytest.mark.parametrize(
    ("nodes", "surge", "expected"), [(4, None, 4), (4, "50%", 6), (3, 1, 4), (5, "10%", 6)]
)
def test_a_daemonset_counts_the_declared_nodes_and_its_surge(nodes, surge, expected):
    spec: dict[str, Any] = {}
    if surge is not None:
        spec["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge}}
    doc = workload("DaemonSet", **spec)
    assert peak_pods(doc, FILE, nodes=nodes).pods == expected


REFUSED = [
    (
        "DaemonSet without a declared node count",
        workload("DaemonSet"),
        [],
        f"{FILE}: DaemonSet orders: a DaemonSet runs one pod per node, and the files do not say"
        " how many nodes; fix: declare the node count in topology.toml",
    ),
    (
        "CronJob default concurrencyPolicy Allow",
        workload("CronJob", "batch/v1", jobTemplate={"spec": {}}),
        [],
        f"{FILE}: CronJob orders spec.concurrencyPolicy: Allow lets runs overlap without bound,"
        " so no number of pods holds; fix: set concurrencyPolicy: Forbid (or Replace)",
    ),
    (
        "maxSurge string without %",
        workload("Deployment", replicas=3, strategy=rolling("1")),
        [],
        f"{FILE}: spec.strategy.rollingUpdate.maxSurge: '1' is neither a number of pods nor a"
        " percentage; fix:",
    ),
    (
        "negative replicas",
        workload("Deployment", replicas=-1),
        [],
        f"{FILE}: spec.replicas: -1 is not a whole number of at least 0",
    ),
    (
        "replicas as a string",
        workload("Deployment", replicas="3"),
        [],
        f"{FILE}: spec.replicas: '3' is not a whole number of at least 0",
    ),
    (
        "unknown Deployment strategy",
        workload("Deployment", strategy={"type": "BlueGreen"}),
        [],
        f"{FILE}: spec.strategy.type: 'BlueGreen' is not a Deployment strategy",
    ),
    (
        "Rollout without a strategy",
        workload("Rollout", ARGO, replicas=2),
        [],
        f"{FILE}: spec.strategy: a Rollout needs a canary or blueGreen strategy",
    ),
    (
        "Rollout canary maxSurge string without %",
        workload("Rollout", ARGO, strategy=canary(maxSurge="1")),
        [],
        f"{FILE}: spec.strategy.canary.maxSurge: '1' is neither a number of pods nor a percentage",
    ),
    (
        "Rollout of another API group",
        workload("Rollout", "example.com/v1", strategy=canary()),
        [],
        f"{FILE}: example.com/v1 Rollout orders: the budget does not know how many pods this kind"
        " runs",
    ),
    (
        "Knative Service",
        workload("Service", "serving.knative.dev/v1"),
        [],
        f"{FILE}: serving.knative.dev/v1 Service orders: the budget does not know how many pods",
    ),
    (
        "an HPA and a ScaledObject on one Deployment",
        workload("Deployment", replicas=2),
        [make_hpa(4), scaled_object(5)],
        f"{FILE}: Deployment orders: is scaled by HorizontalPodAutoscaler orders"
        " (deploy/k8s/hpa.yaml), ScaledObject orders (deploy/k8s/hpa.yaml); only one autoscaler"
        " can own a workload; fix: keep one of them",
    ),
]


@pytest.mark.parametrize(("shape", "doc", "scalers", "first"), REFUSED, ids=[r[0] for r in REFUSED])
def test_what_cannot_be_counted_is_refused(shape, doc, scalers, first):
    found = [a for s in scalers if (a := autoscaler(s, "deploy/k8s/hpa.yaml")) is not None]
    with pytest.raises(Refused) as refused:
        peak_pods(doc, FILE, autoscalers=found)
    assert str(refused.value).startswith(first), str(refused.value)


def test_an_hpa_without_max_replicas_is_refused():
    doc = make_hpa(3)
    del doc["spec"]["maxReplicas"]
    with pytest.raises(Refused) as refused:
        autoscaler(doc, "deploy/k8s/hpa.yaml")
    assert str(refused.value).startswith(
        "deploy/k8s/hpa.yaml: spec.maxReplicas: None is not a whole number of at least 1"
    )


def test_an_autoscaler_whose_target_is_not_read_is_reported():
    scalers = [
        autoscaler(make_hpa(5, "Rollout", ARGO), "hpa.yaml"),
        autoscaler(scaled_object(5), "so.yaml"),
    ]
    deployment = workload("Deployment")
    left = unmatched(scalers, [deployment])
    assert [(a.kind, a.target_kind, a.file) for a in left] == [
        ("HorizontalPodAutoscaler", "Rollout", "hpa.yaml")
    ]


# maxSurge rounds up, maxUnavailable down; both 0 makes unavailable 1 (ResolveFenceposts)
FENCEPOSTS = [
    ("25%", "25%", 10, (3, 2)),
    ("25%", "25%", 3, (1, 0)),
    ("10%", "10%", 5, (1, 0)),
    (0, "30%", 5, (0, 1)),
    (0, "10%", 5, (0, 1)),
    ("0%", "0%", 4, (0, 1)),
    ("50%", "75%", 7, (4, 5)),
    (2, 1, 10, (2, 1)),
]


@pytest.mark.parametrize(("surge", "unavailable", "replicas", "expected"), FENCEPOSTS)
def test_fenceposts_round_as_the_deployment_controller_does(surge, unavailable, replicas, expected):
    assert fenceposts(surge, unavailable, replicas, file=FILE, field="f") == expected


UNKNOWN_SCALERS = [
    (
        "KEDA HTTP add-on HTTPScaledObject",
        workload(
            "HTTPScaledObject",
            "http.keda.sh/v1alpha1",
            scaleTargetRef={"name": "orders", "kind": "Deployment", "apiVersion": "apps/v1"},
            replicas={"min": 1},
        ),
        "deploy/k8s/hpa.yaml: http.keda.sh/v1alpha1 HTTPScaledObject orders: scales Deployment"
        " orders, and the budget does not know the most replicas it asks for; fix: scale with a"
        " HorizontalPodAutoscaler (maxReplicas) or a KEDA ScaledObject (maxReplicaCount)",
    ),
    (
        "KEDA 1 ScaledObject (keda.k8s.io)",
        workload(
            "ScaledObject",
            "keda.k8s.io/v1alpha1",
            scaleTargetRef={"deploymentName": "orders"},
            maxReplicaCount=5,
        ),
        "deploy/k8s/hpa.yaml: keda.k8s.io/v1alpha1 ScaledObject orders: scales a workload orders,"
        " and the budget does not know the most replicas it asks for; fix:",
    ),
]


@pytest.mark.parametrize(
    ("shape", "doc", "first"), UNKNOWN_SCALERS, ids=[u[0] for u in UNKNOWN_SCALERS]
)
def test_a_scaler_the_budget_does_not_know_is_refused(shape, doc, first):
    with pytest.raises(Refused) as refused:
        autoscaler(doc, "deploy/k8s/hpa.yaml")
    assert str(refused.value).startswith(first)


def test_resources_that_scale_nothing_are_not_autoscalers():
    vpa = workload(
        "VerticalPodAutoscaler",
        "autoscaling.k8s.io/v1",
        targetRef={"apiVersion": "apps/v1", "kind": "Deployment", "name": "orders"},
    )
    assert autoscaler(vpa, "vpa.yaml") is None
    assert autoscaler(workload("Service", "v1"), "svc.yaml") is None
