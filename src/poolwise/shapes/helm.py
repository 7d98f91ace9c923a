"""Helm charts under ``deploy/``, rendered with Helm's own engine, one variant per values file.

Go templates are never interpreted here: the chart is rendered by Helm itself, either the
team's ``helm`` binary (``helm template``) when one is on PATH, or Helm's Go SDK through
``helm-python-sdk`` (a wheel holding ``libhelm_c``, no download, no cluster). Either way the
render's Capabilities are pinned (``--kube-version``, ``--api-versions``) so that a chart
asking ``.Capabilities`` renders the same on every machine; ``lookup`` finds nothing, as in
``helm template``.

A chart's variants: its ``values.yaml`` alone, and each further values file beside it
(``values-<name>.yaml``, ``values.<name>.yaml``, ``<name>.values.yaml``, or any file in a
``values/`` folder beside Chart.yaml) layered on it, like an overlay on a kustomize base.

What ``helm template`` does that the render step alone does not (it checks
``values.schema.json`` itself), done here as Helm does it:
values files merged in order (``pkg/cli/values/options.go``, mergeMaps), dependencies
declared in Chart.yaml required in ``charts/``
(``action.CheckDependencies``), ``NOTES.txt`` and ``_`` partials left out of the manifests
(``releaseutil.SortManifests``).
https://helm.sh/docs/helm/helm_template/
https://github.com/helm/helm/blob/main/pkg/cli/values/options.go
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from poolwise.shapes.errors import Refused

# The Kubernetes version charts see in .Capabilities.KubeVersion unless the caller names the
# platform's; and the API groups beyond Kubernetes' own that the budget reads, so a chart that
# renders a ScaledObject or a Rollout only `if .Capabilities.APIVersions.Has ...` renders it.
KUBE_VERSION = "v1.32.0"
API_VERSIONS = (
    "keda.sh/v1alpha1",
    "keda.sh/v1alpha1/ScaledObject",
    "keda.sh/v1alpha1/ScaledJob",
    "argoproj.io/v1alpha1",
    "argoproj.io/v1alpha1/Rollout",
    "postgresql.cnpg.io/v1",
    "postgresql.cnpg.io/v1/Pooler",
)
RELEASE_NAME = "release"
HELM_TIMEOUT_SECONDS = 120
FIX_RENDER = "fix the chart or its values so that `helm template` renders it"


@dataclass(frozen=True)
class ChartVariant:
    """One way a chart is deployed: its directory and the values files layered, in order."""

    name: str
    chart: Path
    values_files: tuple[Path, ...]


@dataclass(frozen=True)
class Rendered:
    """One manifest of a rendered chart and where it came from (for messages)."""

    doc: dict[str, Any]
    origin: str


def find_charts(deploy: Path) -> list[Path]:
    """Every chart directory under ``deploy`` (a folder holding Chart.yaml), excluding the
    subcharts vendored in another chart's ``charts/``, which their parent renders, and the
    charts a kustomization's ``helmCharts`` inflates from its chartHome, which kustomize
    renders as part of that kustomization."""
    charts = sorted(path.parent for path in deploy.rglob("Chart.yaml"))
    homes = _kustomize_chart_homes(deploy)
    return [
        chart
        for chart in charts
        if not any(chart.is_relative_to(parent / "charts") for parent in charts)
        and not any(chart.is_relative_to(home) for home in homes)
    ]


def _kustomize_chart_homes(deploy: Path) -> list[Path]:
    homes = []
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        for path in deploy.rglob(name):
            try:
                kustomization = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue  # the kustomize build reports it, with kustomize's reason
            if isinstance(kustomization, dict) and kustomization.get("helmCharts"):
                globals_ = kustomization.get("helmGlobals") or {}
                homes.append(path.parent / str(globals_.get("chartHome") or "charts"))
    return homes


def _is_values_file(path: Path) -> bool:
    name = path.name
    if path.suffix not in (".yaml", ".yml") or name in ("Chart.yaml", "values.yaml"):
        return False
    stem = path.stem
    return stem.startswith(("values-", "values.")) or stem.endswith(".values")


def chart_variants(chart: Path) -> list[ChartVariant]:
    """The chart's default variant and one per further values file, in name order."""
    label = chart.name
    variants = [ChartVariant(label, chart, ())]
    extra = sorted(p for p in chart.iterdir() if p.is_file() and _is_values_file(p))
    folder = chart / "values"
    if folder.is_dir():
        extra += sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
    for path in extra:
        stem = path.stem
        for cut in ("values-", "values."):
            stem = stem.removeprefix(cut)
        stem = stem.removesuffix(".values")
        variants.append(ChartVariant(f"{label}:{stem}", chart, (path,)))
    return variants


def merge_values(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's mergeMaps: maps merge key by key, anything else in ``override`` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_values(dict(out[key]), value)
        else:
            out[key] = value
    return out


def helm_binary() -> str | None:
    """The team's ``helm`` on PATH, if there is one."""
    return shutil.which("helm")


def render(
    variant: ChartVariant,
    *,
    root: Path,
    namespace: str = "default",
    kube_version: str = KUBE_VERSION,
    api_versions: Sequence[str] = API_VERSIONS,
    engine: str = "auto",
) -> list[Rendered]:
    """The manifests ``variant`` renders to, with Helm's engine; ``root`` is the project
    directory paths are shown relative to. ``engine``: ``"binary"``, ``"sdk"`` or ``"auto"``
    (the binary when on PATH). Whatever Helm refuses is refused with Helm's reason."""
    chart_label = _relative(variant.chart, root)
    binary = helm_binary() if engine in ("auto", "binary") else None
    if engine == "binary" and binary is None:
        raise Refused(chart_label, "helm", "no helm binary is on PATH", "install helm")
    if binary is not None:
        texts = _render_binary(binary, variant, chart_label, namespace, kube_version, api_versions)
    else:
        texts = _render_sdk(variant, chart_label, root, namespace, kube_version, api_versions)
    suffix = f" (values {', '.join(_relative(p, root) for p in variant.values_files)})"
    return _manifests(texts, chart_label, suffix if variant.values_files else "")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _render_sdk(
    variant: ChartVariant,
    label: str,
    root: Path,
    namespace: str,
    kube_version: str,
    api_versions: Sequence[str],
) -> dict[str, str]:
    try:
        import helm_python
        from helm_python import _native
    except ImportError:
        raise Refused(
            label,
            "Chart.yaml",
            "rendering a chart needs Helm: neither a helm binary on PATH nor helm-python-sdk"
            " is installed",
            "pip install helm-python-sdk (Helm's engine as a wheel), or install helm",
        ) from None
    try:
        with helm_python.Chart.load(variant.chart) as chart:
            _check_dependencies(chart.metadata, chart.dependencies, label)
            values: dict[str, Any] = {}
            for path in variant.values_files:
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as error:
                    raise Refused(_relative(path, root), "values", str(error), FIX_RENDER) from None
                loaded = helm_python.values_from_yaml(text) if text.strip() else {}
                values = merge_values(values, loaded or {})
            # helm-python-sdk's Chart.render() does not pass the Capabilities options its
            # library accepts (kube_version, api_versions), so the library is called as render()
            # calls it, with them added; tests/test_shapes_helm.py proves they take effect.
            options = {
                "name": RELEASE_NAME,
                "namespace": namespace,
                "is_install": True,
                "kube_version": kube_version,
                "api_versions": list(api_versions),
            }
            rendered = _native.call_string(
                "helm_render", chart._raw(), json.dumps(values), json.dumps(options)
            )
    except helm_python.HelmError as error:
        raise Refused(label, "helm template", _one_line(str(error)), FIX_RENDER) from None
    manifests: dict[str, str] = json.loads(rendered)
    return manifests


def _check_dependencies(
    metadata: Mapping[str, Any], loaded: Sequence[Mapping[str, Any]], label: str
) -> None:
    """Helm's action.CheckDependencies: every dependency in Chart.yaml must be in charts/."""
    present = {dep.get("name") for dep in loaded}
    missing = [
        dep.get("alias") or dep.get("name")
        for dep in metadata.get("dependencies") or []
        if dep.get("name") not in present
    ]
    if missing:
        raise Refused(
            label,
            "Chart.yaml dependencies",
            f"found in Chart.yaml, but missing in charts/ directory: {', '.join(missing)}",
            "run `helm dependency build` and commit charts/ (the budget renders offline)",
        )


def _render_binary(
    binary: str,
    variant: ChartVariant,
    label: str,
    namespace: str,
    kube_version: str,
    api_versions: Sequence[str],
) -> dict[str, str]:
    command = [binary, "template", RELEASE_NAME, str(variant.chart), "--namespace", namespace]
    command += ["--kube-version", kube_version]
    for api in api_versions:
        command += ["--api-versions", api]
    for path in variant.values_files:
        command += ["--values", str(path)]
    with tempfile.TemporaryDirectory() as home:
        # No kubeconfig, registry credentials or repositories of the machine's user: the
        # render is offline and the same everywhere, and the platform's credentials in the
        # environment never reach it.
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": home,
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
            "KUBECONFIG": f"{home}/kubeconfig",
        }
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=env,
                timeout=HELM_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Refused(
                label, "helm template", f"took over {HELM_TIMEOUT_SECONDS} s", FIX_RENDER
            ) from None
    if done.returncode != 0:
        raise Refused(label, "helm template", _one_line(done.stderr), FIX_RENDER)
    return _split_sources(done.stdout)


def _split_sources(stream: str) -> dict[str, str]:
    """``helm template`` output, back into {template path: text} by its ``# Source:`` lines."""
    files: dict[str, str] = {}
    current = "helm template"
    for document in stream.split("\n---"):
        lines = document.lstrip("-\n").splitlines()
        if lines and lines[0].startswith("# Source: "):
            current = lines[0].removeprefix("# Source: ").strip()
            lines = lines[1:]
        files[current] = files.get(current, "") + "\n---\n" + "\n".join(lines)
    return files


def _one_line(text: str) -> str:
    return " ".join(text.replace("Error: ", "").split()) or "helm failed without a reason"


def _manifests(texts: Mapping[str, str], chart_label: str, suffix: str) -> list[Rendered]:
    """The manifests of the rendered templates, as ``helm template`` prints them."""
    out: list[Rendered] = []
    for path in sorted(texts):
        base = path.rsplit("/", 1)[-1]
        text = texts[path]
        if base == "NOTES.txt" or base.startswith("_") or not text.strip():
            continue
        # Helm names templates "<chart name>/templates/..."; shown as the file in the project.
        origin = f"{chart_label}/{path.split('/', 1)[-1]}{suffix}"
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as error:
            raise Refused(origin, "rendered YAML", _one_line(str(error)), FIX_RENDER) from None
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise Refused(origin, "rendered YAML", "is not a Kubernetes object", FIX_RENDER)
            out.append(Rendered(doc, origin))
    return out


# --- helmCharts in a kustomization --------------------------------------------------------


def kustomize_helm_flags(
    kustomization: Mapping[str, Any], directory: Path, root: Path
) -> list[str]:
    """The flags ``kustomize build`` needs for the kustomization at ``directory``: none without
    ``helmCharts``; with them, ``--enable-helm`` and the helm binary, which kustomize runs
    (it has no engine of its own). Refused by name without a helm binary, and when a chart is
    not vendored under ``helmChartInflationGenerator``'s chartHome (kustomize would download
    it; the budget builds offline).
    https://kubectl.docs.kubernetes.io/references/kustomize/builtins/#_helmchartinflationgenerator_
    """
    charts = kustomization.get("helmCharts") or []
    if not charts:
        return []
    label = _relative(directory / "kustomization.yaml", root)
    home = directory / str(kustomization.get("helmGlobals", {}).get("chartHome") or "charts")
    for index, entry in enumerate(charts):
        name, version = entry.get("name"), entry.get("version")
        candidates = [home / str(name)]
        if version:
            candidates.insert(0, home / f"{name}-{version}" / str(name))
        if not any((candidate / "Chart.yaml").is_file() for candidate in candidates):
            raise Refused(
                label,
                f"helmCharts[{index}] ({name})",
                f"the chart is not under {_relative(home, root)}/, and kustomize would"
                " download it; the budget builds offline",
                f"vendor it: helm pull --untar --untardir {_relative(home, root)} ... and commit"
                " it",
            )
    binary = helm_binary()
    if binary is None:
        raise Refused(
            label,
            "helmCharts",
            "kustomize renders helmCharts by running a helm binary, and none is on PATH",
            "install helm where the budget runs, or move the chart to its own folder under"
            " deploy/ with its values files, where poolwise renders it with Helm's engine",
        )
    return ["--enable-helm", "--helm-command", binary]
