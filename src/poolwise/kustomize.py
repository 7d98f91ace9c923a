"""The Kubernetes files as `kubectl kustomize` builds them, with the file each resource came from.

Each variant (the base, every overlay) is built on its own through a wrapper kustomization that
adds origin annotations without touching the team's files. Without kustomize nothing is read:
the files alone are not what is applied, so the variant is refused with the fix (ToolMissing).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from .errors import ToolMissing, Unreadable
from .manifests import load_all

DEPLOY = "deploy"
K8S_BASE = "deploy/k8s"
_KLOG_ERROR = re.compile(r'^E\d{4} [\d:.]+ +\d+ \S+\] "command failed" err="(.*)"$')
CHANGING_TRANSFORMERS = (
    "PatchTransformer",
    "PatchStrategicMergeTransformer",
    "PatchJson6902Transformer",
    "ReplicaCountTransformer",
)


def kustomization(directory: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml"):
        path = directory / name
        if path.exists():
            documents = load_all(path, str(path))
            return documents[0] if documents else {}
    return {}


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def kustomize_build(root: Path, variant: str) -> list[dict[str, Any]]:
    """`kustomize build` of one variant, each resource annotated with the file it came from."""
    command = kustomize_command()
    if command is None:
        raise ToolMissing(
            f"{variant}: building it needs kustomize (`kubectl kustomize` or `kustomize build`),"
            " which is not installed -> the budget cannot read what this variant applies; install"
            " kubectl (or kustomize) where the budget runs"
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
        # kubectl wraps kustomize's reason in a klog line: keep the reason alone.
        detail = _KLOG_ERROR.sub(r"\1", detail)
        raise Unreadable(f"{variant}: kustomize cannot build it ({detail}); fix the kustomization")
    return [doc for doc in yaml.safe_load_all(result.stdout) if isinstance(doc, dict)]


def kustomization_files(directory: Path) -> set[Path]:
    """Every file a kustomization reads from its own directory: itself, its resources (and the
    kustomizations they name, recursively), patches, generators' files and components."""
    files: set[Path] = set()
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).exists():
            files.add(directory / name)
    spec = kustomization(directory)

    def entries() -> list[str]:
        found: list[str] = []
        for key in ("resources", "components", "crds", "patchesStrategicMerge", "bases"):
            found += [str(entry) for entry in spec.get(key, []) or []]
        for key in ("patches", "patchesJson6902", "replacements"):
            found += [
                str(e["path"])
                for e in spec.get(key, []) or []
                if isinstance(e, dict) and "path" in e
            ]
        for key in ("configMapGenerator", "secretGenerator"):
            for generator in spec.get(key, []) or []:
                for item in [*(generator.get("files") or []), *(generator.get("envs") or [])]:
                    found.append(str(item).rpartition("=")[2])
                if generator.get("env"):
                    found.append(str(generator["env"]))
        for key in ("generators", "transformers", "validators"):
            found += [str(entry) for entry in spec.get(key, []) or [] if isinstance(entry, str)]
        return found

    for entry in entries():
        path = (directory / entry).resolve()
        if path.is_dir():
            files |= kustomization_files(path)
        elif path.is_file():
            files.add(path)
    if spec.get("helmCharts"):
        home = (spec.get("helmGlobals") or {}).get("chartHome") or "charts"
        files |= {path for path in (directory / str(home)).rglob("*") if path.is_file()}
    return {path.resolve() for path in files}


def origin_of(doc: dict[str, Any], variant: str) -> str:
    """The file a built resource came from, and the kustomizations that changed it."""
    annotations = doc.get("metadata", {}).get("annotations", {}) or {}
    origin = yaml.safe_load(annotations.get("config.kubernetes.io/origin", "") or "") or {}
    path = origin.get("path") or origin.get("configuredIn") or variant
    where = project_relative(str(path))
    changes = yaml.safe_load(
        annotations.get("alpha.config.kubernetes.io/transformations", "") or ""
    )
    by = sorted(
        {
            project_relative(str(change.get("configuredIn", "")))
            for change in changes or []
            if change.get("configuredBy", {}).get("kind") in CHANGING_TRANSFORMERS
        }
    )
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    suffix = f", changed by {', '.join(by)}" if by else ""
    return f"{where} ({name}{suffix})"


def generated_from(root: Path, doc: dict[str, Any], key: str) -> str | None:
    """The file a configMapGenerator read a ConfigMap's key from, with the generator."""
    annotations = doc.get("metadata", {}).get("annotations", {}) or {}
    origin = yaml.safe_load(annotations.get("config.kubernetes.io/origin", "") or "") or {}
    if (origin.get("configuredBy") or {}).get("kind") != "ConfigMapGenerator":
        return None
    configured_in = PurePosixPath(project_relative(str(origin.get("configuredIn", ""))))
    for generator in kustomization(root / configured_in.parent).get("configMapGenerator", []):
        if str(generator.get("name")) not in str(doc.get("metadata", {}).get("name")):
            continue
        for item in generator.get("files", []) or []:
            name, _, file = str(item).rpartition("=")
            if (name or PurePosixPath(file).name) == key:
                return f"{(configured_in.parent / file).as_posix()} (via {configured_in})"
    return None


def project_relative(path: str) -> str:
    # Paths in the build are relative to the wrapper directory, one level below the project.
    parts = PurePosixPath(path).parts
    return PurePosixPath(*parts[1:]).as_posix() if parts and parts[0] == ".." else path


def kustomize_variants(root: Path) -> list[str]:
    """The base (deploy/k8s, always checked on its own) and every overlay under deploy/.

    An overlay is a kustomization under deploy/ that no other kustomization includes.
    """
    directories = sorted(
        path.parent
        for path in (root / DEPLOY).rglob("kustomization.y*ml")
        if path.name in ("kustomization.yaml", "kustomization.yml")
    )
    included: set[Path] = set()
    for directory in directories:
        spec = kustomization(directory)
        for entry in [*(spec.get("resources") or []), *(spec.get("components") or [])]:
            candidate = (directory / str(entry)).resolve()
            if candidate.is_dir():
                included.add(candidate)
    names = [K8S_BASE] if (root / K8S_BASE).is_dir() else []
    for directory in directories:
        name = directory.relative_to(root).as_posix()
        if directory.resolve() not in included and name not in names:
            names.append(name)
    return names
