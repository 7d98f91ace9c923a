"""What is really deployed: the connection budget's inputs, read from what deploy/ would apply.

One loader for every place that checks a budget: `poolwise budget`, `poolwise fleet`, `poolwise
doctor` and each service's tests/test_connection_budget.py read deploy/ through ``variants`` and
``read_variant``. Kubernetes files are read as ``kubectl kustomize`` builds them, the base and
every overlay each on its own (poolwise.kustomize), and every Helm chart under deploy/ as Helm's
own engine renders it, once per values file (poolwise.shapes.helm); their workloads are counted by
poolwise.workloads. A SAM template is read function by function (poolwise.sam); the pooler in
between from its own files (poolwise.poolers). Every other file under deploy/ is refused by name
unless db/topology.toml excludes it with a reason (poolwise.coverage).

Whatever cannot be interpreted is refused with one line naming the file, the field, the rule and
the fix (``Unreadable``); a missing kustomize is ``ToolMissing``, a refusal too: the budget never
passes on a number it did not read.
"""

from __future__ import annotations

from pathlib import Path

from . import declared as declared_files
from .coverage import exclusions, refuse_unread
from .errors import ToolMissing, Unreadable
from .kustomize import DEPLOY, kustomize_build, kustomize_command, kustomize_variants
from .reading import Input, Project, Reading
from .sam import SAM_TEMPLATE, SamReader
from .shapes import Refused
from .shapes.helm import ChartVariant, chart_variants, find_charts, render
from .workloads import Built, KubernetesReader, documents_of

__all__ = [
    "Input",
    "Project",
    "Reading",
    "ToolMissing",
    "Unreadable",
    "kustomize_command",
    "read_declared",
    "read_variant",
    "variants",
]


def variants(root: Path) -> list[str]:
    """What can be applied from deploy/: the SAM template, or the kustomize base and overlays
    and every chart's variants ("deploy/chart" with its values.yaml, "deploy/chart:prod" with
    values-prod.yaml layered on it)."""
    if (root / SAM_TEMPLATE).exists():
        return [SAM_TEMPLATE]
    return kustomize_variants(root) + list(_charts(root))


def _charts(root: Path) -> dict[str, ChartVariant]:
    found: dict[str, ChartVariant] = {}
    for chart in find_charts(root / DEPLOY):
        relative = chart.relative_to(root).as_posix()
        for variant in chart_variants(chart):
            _, _, values = variant.name.partition(":")
            found[f"{relative}:{values}" if values else relative] = variant
    return found


def read_variant(root: Path, variant: str, project: Project | None = None) -> Reading:
    """Read one variant into the budget's terms; raises Unreadable or ToolMissing."""
    project = project or Project.at(root)
    if variant == SAM_TEMPLATE:
        return SamReader(project, variant).read()
    excluded = exclusions(project.declared, project.topology_file, root)
    refuse_unread(root, excluded)
    charts = _charts(root)
    if variant in charts:
        documents = _rendered(root, charts[variant])
    else:
        documents = documents_of(kustomize_build(root, variant), variant)
    reading = KubernetesReader(project, variant, documents).read()
    reading.excluded = [item.line() for item in excluded]
    return reading


def _rendered(root: Path, variant: ChartVariant) -> list[Built]:
    """A chart variant's manifests as Helm renders them; Helm's own refusal is the reason.

    Helm's Go SDK (helm-python-sdk) renders unless a helm binary is on PATH, which is then
    used; either way Capabilities are pinned (poolwise.shapes.helm), so the machine does not
    change what is counted."""
    try:
        return [Built(item.doc, item.origin) for item in render(variant, root=root)]
    except Refused as error:
        raise Unreadable(str(error)) from None


def read_declared(project: Project) -> Reading:
    """The topology as the service declares it, for a service without deploy/."""
    topology = declared_files.declared_topology(project.declared)
    limits = declared_files.load_limits(project.root / project.limits_file, project.limits_file)
    return Reading(f"{project.topology_file} (declared)", topology, limits, [])
