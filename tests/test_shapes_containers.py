"""poolwise.shapes.containers: image references, the service's containers, pod-running kinds.

Each row: the shape, and its verdict (the parts or count it gives) or the refusal's first line.
"""

from __future__ import annotations

from typing import Any

import pytest

from poolwise.shapes import Refused
from poolwise.shapes.containers import (
    ImageReference,
    parse_image,
    pod_template,
    refuse_not_understood,
    runs_image,
    runs_pods,
    service_containers,
)

DIGEST = "sha256:" + "a" * 64

# reference, (registry, repository, tag, digest)
PARSED = [
    ("orders", (None, "orders", None, None)),
    ("orders:1.2.3", (None, "orders", "1.2.3", None)),
    ("team/orders", (None, "team/orders", None, None)),
    ("ghcr.io/acme/orders:v1", ("ghcr.io", "acme/orders", "v1", None)),
    (f"registry:5000/team/app@{DIGEST}", ("registry:5000", "team/app", None, DIGEST)),
    (f"registry:5000/team/app:1.0@{DIGEST}", ("registry:5000", "team/app", "1.0", DIGEST)),
    ("localhost/orders", ("localhost", "orders", None, None)),
    ("localhost:5000/orders:dev", ("localhost:5000", "orders", "dev", None)),
    ("docker.io/library/nginx:1.27", ("docker.io", "library/nginx", "1.27", None)),
    (
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/orders:7",
        ("123456789012.dkr.ecr.eu-west-1.amazonaws.com", "orders", "7", None),
    ),
    ("[::1]:5000/orders", ("[::1]:5000", "orders", None, None)),
    ("my_team/order-service__api", (None, "my_team/order-service__api", None, None)),
]


@pytest.mark.parametrize(("reference", "parts"), PARSED, ids=[r for r, _ in PARSED])
def test_image_references_split_as_the_reference_grammar_does(reference, parts):
    assert parse_image(reference) == ImageReference(*parts)


UNPARSABLE = [
    ("Orders:1", "the repository path is not lowercase path components"),
    ("orders:", "the tag is not a valid tag"),
    ("orders@sha256:abc", "the digest is not algorithm:hex"),
    ("$(IMAGE)", "the repository path is not lowercase path components"),
    ("{{ .Values.image }}", "the repository path is not lowercase path components"),
    ("ghcr.io/", "the repository path is not lowercase path components"),
]


@pytest.mark.parametrize(("reference", "why"), UNPARSABLE, ids=[r for r, _ in UNPARSABLE])
def test_an_image_that_is_not_a_reference_is_refused(reference, why):
    with pytest.raises(Refused) as refused:
        parse_image(reference, file="deploy/k8s/deployment.yaml", field="containers[0].image")
    assert str(refused.value) == (
        f"deploy/k8s/deployment.yaml: containers[0].image: {reference!r} is not an image"
        f" reference ({why}), so the budget cannot tell whether it runs the service; fix:"
        " write [registry[:port]/]repository[:tag][@sha256:digest]"
    )


# manifest image, the service's names, runs the service?
MATCHES = [
    ("orders", ["orders"], True),
    ("orders:0.1.0", ["orders"], True),
    ("ghcr.io/acme/orders:0.1.0", ["orders"], True),
    (f"registry:5000/team/orders@{DIGEST}", ["orders"], True),
    ("registry:5000/team/orders:1", ["ghcr.io/acme/orders"], True),
    ("ghcr.io/acme/orders", ["acme/orders"], True),
    ("docker.io/library/orders", ["orders"], True),
    ("ghcr.io/acme/orders-worker", ["orders"], False),
    ("ghcr.io/acme/orders/worker", ["orders"], False),
    ("edoburu/pgbouncer:v1.25.1-p0", ["orders"], False),
    # a mirror into another registry's namespace is still the service
    ("ghcr.io/other/orders", ["acme/orders"], True),
    # after kustomize images: newName, the service goes by both names
    ("ecr.example.com/platform/orders-api:7", ["orders", "platform/orders-api"], True),
]


@pytest.mark.parametrize(("image", "names", "expected"), MATCHES, ids=[m[0] for m in MATCHES])
def test_the_service_image_is_matched_by_repository_whatever_registry_tag_or_digest(
    image, names, expected
):
    assert runs_image(image, names) is expected


def _pod(**lists: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: value for key, value in lists.items()}


POD_SHAPES = [
    (
        "app container",
        _pod(containers=[{"name": "app", "image": "orders:1"}]),
        [("container", 0, "spec.template.spec.containers[0]")],
    ),
    (
        "image with a registry host",
        _pod(containers=[{"name": "app", "image": "reg.example.com:5000/x/orders:1"}]),
        [("container", 0, "spec.template.spec.containers[0]")],
    ),
    (
        "second container runs the image",
        _pod(
            containers=[
                {"name": "proxy", "image": "envoyproxy/envoy:v1.31"},
                {"name": "worker", "image": "orders:1"},
            ]
        ),
        [("container", 1, "spec.template.spec.containers[1]")],
    ),
    (
        "native sidecar (initContainer restartPolicy Always)",
        _pod(
            initContainers=[{"name": "side", "image": "orders:1", "restartPolicy": "Always"}],
            containers=[{"name": "app", "image": "orders:1"}],
        ),
        [
            ("sidecar", 0, "spec.template.spec.initContainers[0]"),
            ("container", 0, "spec.template.spec.containers[0]"),
        ],
    ),
    (
        "init container running migrations",
        _pod(
            initContainers=[{"name": "migrate", "image": "orders:1"}],
            containers=[{"name": "app", "image": "nginx"}],
        ),
        [("init", 0, "spec.template.spec.initContainers[0]")],
    ),
    ("no container runs the image", _pod(containers=[{"name": "x", "image": "nginx"}]), []),
]


@pytest.mark.parametrize(("shape", "pod", "expected"), POD_SHAPES, ids=[p[0] for p in POD_SHAPES])
def test_every_container_of_the_pod_that_runs_the_image_counts(shape, pod, expected):
    found = service_containers(pod, ["orders"], file="f.yaml", field="spec.template.spec")
    assert [(c.role, c.index, c.field) for c in found] == expected


def _doc(kind: str, api: str = "apps/v1", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": "orders"}, "spec": spec}


TEMPLATE = {"template": {"spec": {"containers": [{"name": "app", "image": "orders"}]}}}

# kind, does it run pods, does the budget understand it
KINDS = [
    (_doc("Deployment", **TEMPLATE), True, True),
    (_doc("StatefulSet", **TEMPLATE), True, True),
    (_doc("DaemonSet", **TEMPLATE), True, True),
    (_doc("ReplicaSet", **TEMPLATE), True, True),
    (_doc("ReplicationController", "v1", **TEMPLATE), True, True),
    (_doc("Job", "batch/v1", **TEMPLATE), True, True),
    (_doc("CronJob", "batch/v1", jobTemplate={"spec": TEMPLATE}), True, True),
    (_doc("Pod", "v1", containers=[{"name": "a", "image": "orders"}]), True, True),
    (_doc("Rollout", "argoproj.io/v1alpha1", **TEMPLATE), True, True),
    (_doc("ScaledJob", "keda.sh/v1alpha1", jobTargetRef=TEMPLATE), True, True),
    # pod templates the budget does not know how to count
    (_doc("Rollout", "example.com/v1", **TEMPLATE), True, False),
    (_doc("Service", "serving.knative.dev/v1", **TEMPLATE), True, False),
    (_doc("CloneSet", "apps.kruise.io/v1alpha1", **TEMPLATE), True, False),
    (
        _doc("Workflow", "argoproj.io/v1alpha1", templates=[{"container": {"image": "orders"}}]),
        True,
        False,
    ),
    (_doc("Pooler", "postgresql.cnpg.io/v1", instances=2, **TEMPLATE), True, False),
    # no pods
    (_doc("Service", "v1", ports=[{"port": 80}]), False, False),
    (_doc("ConfigMap", "v1"), False, False),
    (_doc("HorizontalPodAutoscaler", "autoscaling/v2", maxReplicas=3), False, False),
    (_doc("ScaledObject", "keda.sh/v1alpha1", scaleTargetRef={"name": "x"}), False, False),
]


@pytest.mark.parametrize(
    ("doc", "runs", "known"), KINDS, ids=[f"{d['apiVersion']} {d['kind']}" for d, _, _ in KINDS]
)
def test_pod_running_kinds_are_understood_or_refused_by_name(doc, runs, known):
    assert runs_pods(doc) is runs
    if runs and not known:
        with pytest.raises(Refused) as refused:
            refuse_not_understood(doc, "deploy/k8s/x.yaml")
        assert str(refused.value).startswith(
            f"deploy/k8s/x.yaml: {doc['apiVersion']} {doc['kind']} orders: a {doc['kind']} runs"
            " pods, and the budget does not know how many it runs at once; fix:"
        )
    else:
        refuse_not_understood(doc, "deploy/k8s/x.yaml")  # returns quietly
        if runs:
            assert pod_template(doc, "x.yaml").spec


def test_a_rollout_workload_ref_reads_the_deployment_pod_template():
    deployment = _doc("Deployment", replicas=0, **TEMPLATE)
    rollout = _doc(
        "Rollout",
        "argoproj.io/v1alpha1",
        workloadRef={"apiVersion": "apps/v1", "kind": "Deployment", "name": "orders"},
    )
    found = pod_template(rollout, "rollout.yaml", [(deployment, "deployment.yaml")])
    assert (found.file, found.field) == ("deployment.yaml", "spec.template.spec")
    assert found.spec["containers"][0]["image"] == "orders"


def test_a_rollout_workload_ref_to_a_missing_deployment_is_refused():
    rollout = _doc(
        "Rollout",
        "argoproj.io/v1alpha1",
        workloadRef={"apiVersion": "apps/v1", "kind": "Deployment", "name": "gone"},
    )
    with pytest.raises(Refused) as refused:
        pod_template(rollout, "rollout.yaml", [])
    assert str(refused.value) == (
        "rollout.yaml: spec.workloadRef: names Deployment gone, which is not among this"
        " variant's resources, so its pods cannot be read; fix: add the referenced Deployment"
        " to the same kustomization (or chart)"
    )
