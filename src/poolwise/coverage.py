"""Everything under deploy/ is read as part of a variant, excluded by the team, or refused.

A file the readers do not read would let the budget pass on what it never saw, so the Kubernetes
reader refuses the first such file by name. Read are: every file a kustomization under deploy/
reads (itself, resources, patches, generators' files), every file of a Helm chart, the pooler's
files (pgbouncer.ini, the RDS Proxy template) and the SAM template. A team that keeps something
under deploy/ on purpose (a manifest for another image, a chart it does not deploy) declares it
in db/topology.toml, and every report lists it:

    [[excluded]]
    path = "deploy/legacy"            # a file or folder under deploy/
    reason = "the old worker, deployed by the data team's pipeline"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Unreadable
from .kustomize import DEPLOY, kustomization_files
from .poolers import PGBOUNCER_INI, RDS_PROXY_TEMPLATE
from .shapes.helm import find_charts

# Files under deploy/ that hold no resources: documentation and VCS bookkeeping.
NOT_MANIFESTS = (".md", ".txt", ".rst")
NOT_MANIFEST_NAMES = (".gitignore", ".gitkeep", ".helmignore", "LICENSE", "OWNERS", "CODEOWNERS")


@dataclass(frozen=True)
class Exclusion:
    path: str
    reason: str

    def line(self) -> str:
        return f"  {self.path}: {self.reason}"


def exclusions(declared: dict[str, Any], topology_file: str, root: Path) -> list[Exclusion]:
    """The team's [[excluded]] entries of db/topology.toml, each checked: a path under deploy/
    that exists, and a reason."""
    entries = declared.get("excluded", [])
    if not isinstance(entries, list):
        raise Unreadable(
            f"{topology_file}: excluded is not a list of tables -> write [[excluded]] with path"
            " and reason"
        )
    found = []
    for index, entry in enumerate(entries):
        where = f"{topology_file}: excluded[{index}]"
        if not isinstance(entry, dict):
            raise Unreadable(f"{where} is not a table -> write [[excluded]] with path and reason")
        path, reason = entry.get("path"), entry.get("reason")
        if not isinstance(path, str) or not path.startswith(f"{DEPLOY}/") or ".." in path:
            raise Unreadable(
                f"{where}.path={path!r} -> an exclusion names a file or folder under deploy/;"
                " fix the path"
            )
        if not (root / path).exists():
            raise Unreadable(
                f"{where}.path={path!r} does not exist -> remove the stale exclusion or fix"
                " the path"
            )
        if not isinstance(reason, str) or not reason.strip():
            raise Unreadable(
                f"{where} ({path}) has no reason -> say why the budget need not read it"
            )
        found.append(Exclusion(path.rstrip("/"), reason.strip()))
    return found


def unread(root: Path, excluded: list[Exclusion]) -> list[str]:
    """Files under deploy/ that no variant reads and no exclusion names, relative to root."""
    deploy = root / DEPLOY
    read: set[Path] = set()
    for path in deploy.rglob("*"):
        if path.name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
            read |= kustomization_files(path.parent)
    for chart in find_charts(deploy):
        read |= {path.resolve() for path in chart.rglob("*") if path.is_file()}
    for relative in (PGBOUNCER_INI, RDS_PROXY_TEMPLATE, "deploy/lambda/template.yaml"):
        read.add((root / relative).resolve())
    skipped = [(root / item.path).resolve() for item in excluded]
    missing = []
    for path in sorted(deploy.rglob("*")):
        if not path.is_file() or path.resolve() in read:
            continue
        if path.suffix in NOT_MANIFESTS or path.name in NOT_MANIFEST_NAMES:
            continue
        if any(path.resolve().is_relative_to(folder) for folder in skipped):
            continue
        missing.append(path.relative_to(root).as_posix())
    return missing


def refuse_unread(root: Path, excluded: list[Exclusion]) -> None:
    missing = unread(root, excluded)
    if missing:
        more = (
            f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})" if len(missing) > 1 else ""
        )
        raise Unreadable(
            f"{missing[0]}: no kustomization or Helm chart under deploy/ reads it{more} -> the"
            " budget would pass without counting what it runs; list it in a kustomization's"
            " resources, or declare it in db/topology.toml as [[excluded]] with path and reason"
        )
