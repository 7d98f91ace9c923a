"""Which resources run pods, and which of their containers run the service's image.

A workload is the service's when any container of its pod runs the service's image: the image
is matched by its repository name, whatever the registry host (and port), tag or digest, so
``orders``, ``orders:1.2``, ``ghcr.io/acme/orders@sha256:...`` and
``registry:5000/team/orders:1.2`` all run ``orders``. Every container of the pod counts:
``containers``, ``initContainers`` and native sidecars (an init container with
``restartPolicy: Always``, which keeps running beside the app containers).

Image references follow the grammar of the distribution project's reference package, the one
Docker, containerd and Kubernetes parse with:
https://github.com/distribution/reference/blob/main/reference.go
Native sidecars: https://kubernetes.io/docs/concepts/workloads/pods/sidecar-containers/
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from poolwise.shapes.errors import Refused

# reference.go: a path component is lowercase alphanumerics joined by one separator
# ("." "_" "__" or any run of "-"); a tag is up to 128 word characters, "." and "-" (not
# leading); a digest is algorithm ":" at least 32 hex digits.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN = re.compile(
    r"(?:localhost|\[[0-9A-Fa-f:]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
# Docker Hub's names: "nginx" is "docker.io/library/nginx" (reference.go, normalize.go).
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class ImageReference:
    """An image reference split into its parts; ``repository`` is the path without registry."""

    registry: str | None
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name_components(self) -> tuple[str, ...]:
        """The repository path, Docker Hub's implicit ``library/`` removed, for matching."""
        parts = tuple(self.repository.split("/"))
        if (self.registry is None or self.registry in _DOCKER_HUB) and parts[0] == "library":
            parts = parts[1:]
        return parts


def parse_image(reference: str, *, file: str = "", field: str = "image") -> ImageReference:
    """Split ``[registry[:port]/]path[:tag][@digest]``; anything else is refused.

    The first component is a registry when it holds a "." or a ":" or is ``localhost``, as
    reference.go decides; so ``team/app`` is a path and ``registry:5000/team/app`` has one.
    """
    if not isinstance(reference, str) or not reference:
        raise Refused(file, field, "no image is named", "give the container an image")
    rest, digest = reference, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise _unparsable(reference, file, field, "the digest is not algorithm:hex")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise _unparsable(reference, file, field, "the tag is not a valid tag")
    registry = None
    first, sep, remainder = rest.partition("/")
    if sep and (("." in first or ":" in first) or first == "localhost"):
        if not _DOMAIN.fullmatch(first):
            raise _unparsable(reference, file, field, "the registry host is not a host[:port]")
        registry, rest = first, remainder
    if not _PATH.fullmatch(rest):
        raise _unparsable(
            reference, file, field, "the repository path is not lowercase path components"
        )
    return ImageReference(registry=registry, repository=rest, tag=tag, digest=digest)


def _unparsable(reference: str, file: str, field: str, why: str) -> Refused:
    # The reference is the team's own text from a manifest, not a secret: naming it helps.
    return Refused(
        file,
        field,
        f"{reference!r} is not an image reference ({why}), so the budget cannot tell whether"
        " it runs the service",
        "write [registry[:port]/]repository[:tag][@sha256:digest]",
    )


def runs_image(reference: str, service_images: Iterable[str], *, file: str = "") -> bool:
    """Whether ``reference`` names one of the service's images: the same repository name (the
    last component of the repository path), whatever the registry, namespace, tag or digest.

    ``service_images`` are the names the service's image goes by (the name in its manifests
    and, after kustomize ``images:``, its ``newName``). So ``registry:5000/team/orders`` and
    ``ghcr.io/acme/orders@sha256:...`` both run the service ``orders``, and a copy mirrored
    into another registry's namespace still counts. Matching on the name alone errs towards
    counting: a workload counted that is not the service's costs a refusal the team answers
    in topology.toml, one missed is a budget passed silently.
    """
    image = parse_image(reference, file=file).name_components[-1]
    return any(
        parse_image(name, file=file, field="service image").name_components[-1] == image
        for name in service_images
    )


Role = Literal["container", "init", "sidecar"]


@dataclass(frozen=True)
class ServiceContainer:
    """One container of a pod that runs the service's image, and where it is written.

    ``role``: ``container`` runs for the pod's life; ``sidecar`` is an init container with
    ``restartPolicy: Always`` that runs beside them; ``init`` runs to completion before the
    app containers start (one at a time, each after the sidecars declared before it).
    """

    role: Role
    index: int
    container: Mapping[str, Any]
    field: str


def service_containers(
    pod_spec: Mapping[str, Any],
    service_images: Sequence[str],
    *,
    file: str,
    field: str,
) -> list[ServiceContainer]:
    """Every container of ``pod_spec`` (at ``field`` in ``file``) that runs the service."""
    found: list[ServiceContainer] = []
    for key in ("initContainers", "containers"):
        listed = pod_spec.get(key) or []
        if not isinstance(listed, list):
            raise Refused(file, f"{field}.{key}", "is not a list", f"write {key} as a list")
        for index, container in enumerate(listed):
            where = f"{field}.{key}[{index}]"
            if not isinstance(container, Mapping):
                raise Refused(file, where, "is not a container", "write name and image")
            if not runs_image(container.get("image"), service_images, file=f"{file}: {where}"):
                continue
            role: Role = "container"
            if key == "initContainers":
                role = "sidecar" if container.get("restartPolicy") == "Always" else "init"
            found.append(ServiceContainer(role, index, container, where))
    return found


# Kinds whose pod template the budget reads, and where the template is.
POD_TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    # Argo Rollouts: a template of its own, or spec.workloadRef to a Deployment's.
    "Rollout": ("spec", "template", "spec"),
    # KEDA runs a Job per event from spec.jobTargetRef, a Job spec.
    "ScaledJob": ("spec", "jobTargetRef", "template", "spec"),
}
# The group each understood kind must come from: a "Rollout" of another API is not Argo's.
_GROUPS = {"Rollout": "argoproj.io", "ScaledJob": "keda.sh"}


def _group(doc: Mapping[str, Any]) -> str:
    api = str(doc.get("apiVersion") or "")
    return api.split("/", 1)[0] if "/" in api else ""


def understood(doc: Mapping[str, Any]) -> bool:
    """Whether ``doc`` is a pod-running kind whose pods the budget knows how to count."""
    kind = doc.get("kind")
    if kind not in POD_TEMPLATE_FIELDS:
        return False
    group = _GROUPS.get(kind)
    return group is None or _group(doc) == group


def runs_pods(doc: Mapping[str, Any]) -> bool:
    """Whether ``doc`` can run pods: an understood kind, or any resource holding a pod
    template (``spec.template``, ``spec.jobTemplate``) or a container with an image anywhere
    in its spec (Knative Services, Argo Workflows, operators' custom resources)."""
    if understood(doc):
        return True
    spec = doc.get("spec")
    if isinstance(spec, Mapping) and ("template" in spec or "jobTemplate" in spec):
        return True
    return _holds_container(spec)


def _holds_container(node: Any) -> bool:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if (
                key in ("containers", "initContainers")
                and isinstance(value, list)
                and any(isinstance(item, Mapping) and "image" in item for item in value)
            ):
                return True
            if key == "container" and isinstance(value, Mapping) and "image" in value:
                return True
            if _holds_container(value):
                return True
    elif isinstance(node, list):
        return any(_holds_container(item) for item in node)
    return False


def refuse_not_understood(doc: Mapping[str, Any], file: str) -> None:
    """Raise :class:`Refused` when ``doc`` runs pods the budget cannot count; else return."""
    if not runs_pods(doc) or understood(doc):
        return
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    raise Refused(
        file,
        f"{doc.get('apiVersion')} {kind} {name}",
        f"a {kind} runs pods, and the budget does not know how many it runs at once",
        "run the service with a Deployment, StatefulSet, Job, CronJob or Argo Rollout, or, if"
        " this resource does not run the service's image, list it in topology.toml with a"
        " reason",
    )


def _walk(doc: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


@dataclass(frozen=True)
class PodTemplate:
    """A pod spec and the file and field it was read from (for messages)."""

    spec: Mapping[str, Any]
    file: str
    field: str


def pod_template(
    doc: Mapping[str, Any],
    file: str,
    resources: Iterable[tuple[Mapping[str, Any], str]] = (),
) -> PodTemplate:
    """The pod spec an understood kind runs; a Rollout's ``workloadRef`` is followed to the
    Deployment it names among ``resources`` (``(doc, file)`` pairs of the same variant).

    https://argo-rollouts.readthedocs.io/en/stable/features/specification/ (workloadRef)
    """
    if not understood(doc):
        refuse_not_understood(doc, file)
        raise Refused(file, "kind", f"{doc.get('kind')} does not run pods", "nothing to count")
    kind = doc["kind"]
    spec = doc.get("spec") or {}
    if kind == "Rollout" and "workloadRef" in spec:
        if spec.get("template"):
            raise Refused(
                file,
                "spec.workloadRef",
                "a Rollout takes its pods from template or from workloadRef, not both",
                "keep one of them",
            )
        ref = spec["workloadRef"] or {}
        for other, other_file in resources:
            if (
                other.get("kind") == ref.get("kind", "Deployment")
                and (other.get("metadata") or {}).get("name") == ref.get("name")
                and str(other.get("apiVersion")) == str(ref.get("apiVersion", "apps/v1"))
            ):
                target = _walk(other, ("spec", "template", "spec"))
                if isinstance(target, Mapping):
                    return PodTemplate(target, other_file, "spec.template.spec")
        raise Refused(
            file,
            "spec.workloadRef",
            f"names {ref.get('kind', 'Deployment')} {ref.get('name')}, which is not among"
            " this variant's resources, so its pods cannot be read",
            "add the referenced Deployment to the same kustomization (or chart)",
        )
    path = POD_TEMPLATE_FIELDS[kind]
    spec_node = _walk(doc, path)
    if not isinstance(spec_node, Mapping):
        raise Refused(file, ".".join(path), "is missing", f"give the {kind} a pod template")
    return PodTemplate(spec_node, file, ".".join(path))
