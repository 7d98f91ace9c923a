"""The tables behind the one-answer validators stay current with what they describe."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from cases import SUPPORTED
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from rendering import TEMPLATE_ROOT
from test_budget_mirror import answer_context, render

PYPROJECT = TEMPLATE_ROOT / "template" / "pyproject.toml.jinja"
NAMES = TEMPLATE_ROOT / "includes" / "names.jinja"
PACKAGE_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
# This repository's own package, which every generated project's dev dependencies pin: the test
# environment imports it from src/ instead of installing it, so its requirements are read from
# pyproject.toml.
THIS_PACKAGE = "poolwise"


def listed(name: str) -> set[str]:
    """The names of one `{%- set name = "...".split() -%}` list in includes/names.jinja."""
    return set(NAMES.read_text().split(f'set {name} = "')[1].split('"')[0].split())


def generated_requirements() -> set[str]:
    """Every requirement (runtime and dev) of the projects the supported answer sets render."""
    requirements: set[str] = set()
    for case in SUPPORTED:
        project = tomllib.loads(render(PYPROJECT.read_text(), answer_context(case.answers)))
        requirements |= set(project["project"]["dependencies"])
        requirements |= set(project["project"]["optional-dependencies"]["dev"])
    return requirements


def installed_closure(requirements: set[str]) -> set[str]:
    """Distribution names installed for the requirements, dependencies of dependencies included.

    The template's dev environment installs every generated project's dependencies (pyproject's
    dev group), so a requirement that is not installed here fails this test by name.
    """
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [Requirement(line) for line in requirements]
    while pending:
        requirement = pending.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        if key[0] == THIS_PACKAGE:
            found.add(THIS_PACKAGE)
            project = tomllib.loads((TEMPLATE_ROOT / "pyproject.toml").read_text())["project"]
            pending += [Requirement(line) for line in project["dependencies"]]
            continue
        distribution = metadata.distribution(requirement.name)
        found.add(canonicalize_name(distribution.metadata["Name"]))
        extras = requirement.extras or {""}
        for line in distribution.requires or []:
            dependency = Requirement(line)
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                pending.append(dependency)
    return found


def test_every_module_a_generated_project_installs_is_a_refused_package_name() -> None:
    distributions = installed_closure(generated_requirements())
    modules = {
        module
        for module, owners in metadata.packages_distributions().items()
        if PACKAGE_NAME.match(module)
        and any(canonicalize_name(owner) in distributions for owner in owners)
    }
    assert THIS_PACKAGE in distributions
    modules.add(THIS_PACKAGE)
    # Sanity: the closure reaches past direct dependencies (click comes with uvicorn).
    assert {"sqlalchemy", "click", "mako", "greenlet", "simplejson"} <= modules
    assert modules == listed("dependency_modules")


def test_the_generated_projects_own_top_level_names_are_refused_package_names() -> None:
    assert {"conftest", "tests", "src"} <= listed("project_modules")
