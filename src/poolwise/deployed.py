"""What is really deployed: the connection budget's inputs, read from what deploy/ would apply.

One loader for every place that checks a budget: `poolwise budget`, `poolwise fleet`, `poolwise
doctor` and each service's tests/test_connection_budget.py read deploy/ through ``variants`` and
``read_variant``. Kubernetes files are read as ``kubectl kustomize`` builds them, the base and
every overlay each on its own (poolwise.kustomize, poolwise.workloads); a SAM template function
by function (poolwise.sam); the pooler in between from its own files (poolwise.poolers).

Whatever cannot be interpreted is refused with one line naming the file, the field, the rule and
the fix (``Unreadable``): the budget never passes on a number it did not read.
"""

from __future__ import annotations

from pathlib import Path

from . import declared as declared_files
from .errors import ToolMissing, Unreadable
from .kustomize import kustomize_command, kustomize_variants
from .reading import Input, Project, Reading
from .sam import SAM_TEMPLATE, SamReader
from .workloads import KubernetesReader

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
    """What can be applied from deploy/: the SAM template, or the kustomize base and overlays."""
    if (root / SAM_TEMPLATE).exists():
        return [SAM_TEMPLATE]
    return kustomize_variants(root)


def read_variant(root: Path, variant: str, project: Project | None = None) -> Reading:
    """Read one variant into the budget's terms; raises Unreadable or ToolMissing."""
    project = project or Project.at(root)
    if variant == SAM_TEMPLATE:
        return SamReader(project, variant).read()
    return KubernetesReader(project, variant).read()


def read_declared(project: Project) -> Reading:
    """The topology as the service declares it, for a service without deploy/."""
    topology = declared_files.declared_topology(project.declared)
    limits = declared_files.load_limits(project.root / project.limits_file, project.limits_file)
    return Reading(f"{project.topology_file} (declared)", topology, limits, [])
