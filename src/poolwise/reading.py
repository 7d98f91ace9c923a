"""One reading of a service: its project, the inputs of the formula and where each was read.

The numbers every process shares whatever deploys it (the pool, from the environment or
db/topology.toml) and the database limits are read here for the Kubernetes and SAM readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import declared as declared_files
from . import rule
from .errors import Unreadable
from .manifests import integer

# copier's record of the answers, database limits included (copier.yml _answers_file).
ANSWERS_FILE = ".copier-answers.yml"
# Environment variables that multiply into the budget, and the rule each one is checked against.
BUDGET_VARIABLES = {
    "POOL_SIZE": "pool_size",
    "POOL_MAX_OVERFLOW": "max_overflow",
    "WEB_CONCURRENCY": "workers_per_pod",
    "BATCH_PROCESSES": "batch_processes",
}
RANGE_VARIABLES = {
    "POOL_TIMEOUT": "pool_timeout",
    "POOL_RECYCLE": "pool_recycle",
    "BATCH_SIZE": "batch_size",
}
# PgBouncer's own defaults for what pgbouncer.ini leaves out.


@dataclass(frozen=True)
class Input:
    """One number of the formula, where it was read and what db/topology.toml declares."""

    name: str
    value: Any
    source: str
    declared: Any = None

    @property
    def changed(self) -> bool:
        return self.declared is not None and self.value != self.declared

    def row(self) -> str:
        since = f", declared {self.declared}" if self.changed else ""
        return f"  {self.name} = {self.value}  ({self.source}{since})"


@dataclass
class Reading:
    """One variant of what would be deployed, read into the budget's terms."""

    variant: str
    topology: rule.Topology
    limits: rule.DatabaseLimits
    inputs: list[Input]
    findings: list[str] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)
    # Why part of this variant could not be read as it would be applied; no reader sets it
    # today (a missing tool is refused instead), and every caller treats it as unreadable.
    incomplete: str = ""
    # What db/topology.toml keeps out of the budget on purpose ([[excluded]]), one line each.
    excluded: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every reason this variant does not fit, one line each; empty when it fits."""
        changed = "; ".join(f"{item.source}={item.value}" for item in self.inputs if item.changed)
        lines = list(self.findings)
        driver = rule.driver_error(self.topology)
        if driver:
            mode = next((item for item in self.inputs if item.name == "pgbouncer_pool_mode"), None)
            lines.append(f"{mode.source}={mode.value}: {driver}" if mode else driver)
        for check in rule.failures(self.topology, self.limits):
            lines.append(f"{changed} -> {check.message()}" if changed else check.message())
        return lines

    def report(self) -> str:
        rows = [f"{self.variant}:", rule.render_table(self.topology, self.limits)]
        rows.append("the inputs of the formula and where they are set:")
        rows += [item.row() for item in self.inputs]
        if self.excluded:
            rows.append("excluded by db/topology.toml [[excluded]], not counted:")
            rows += self.excluded
        if self.incomplete:
            rows.append(f"not read as applied: {self.incomplete}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------- the project


@dataclass(frozen=True)
class Project:
    """A generated service's directory and its declared facts."""

    root: Path
    package: str
    declared: dict[str, Any]
    # Where `declared` comes from; services generated before 0.2.0 declare it in their answers.
    declared_file: str = ""

    @classmethod
    def at(cls, root: Path) -> Project:
        matches = sorted(root.glob("src/*/db/topology.toml"))
        if not matches:
            raise Unreadable(
                f"{root}: src/<package>/db/topology.toml is missing -> not a poolwise service;"
                " run this from the service's directory"
            )
        path = matches[0]
        return cls(
            root,
            path.parent.parent.name,
            declared_files.load_declared(path, path.relative_to(root).as_posix()),
        )

    @property
    def limits_file(self) -> str:
        return f"src/{self.package}/db/database_limits.toml"

    @property
    def topology_file(self) -> str:
        return self.declared_file or f"src/{self.package}/db/topology.toml"

    @property
    def container(self) -> str:
        return self.declared["service"]["container"]

    def declared_value(self, section: str, name: str) -> Any:
        return self.declared.get(section, {}).get(name)


@dataclass
class Env:
    """A container's environment: each variable's value and the file and field that set it."""

    values: dict[str, tuple[str, str]] = field(default_factory=dict)

    def plain(self) -> dict[str, str]:
        return {name: value for name, (value, _) in self.values.items()}


def env_int(
    project: Project, findings: list[str], env: Env, variable: str, default: int, declared: Any
) -> Input:
    """A number from the environment (or its declared default), range-checked by its rule."""
    name = BUDGET_VARIABLES.get(variable) or RANGE_VARIABLES[variable]
    if variable in env.values:
        raw, source = env.values[variable]
        value = integer(raw, source)
    else:
        source = f"{project.topology_file}: default, {variable} is not set"
        value = default
    try:
        rule.at_least_minimum(name, value, source)
    except rule.OutOfRange as refusal:
        findings.append(f"{refusal}; fix {variable}")
    return Input(name, value, source, declared)


def pool_share(project: Project, findings: list[str], env: Env) -> tuple[list[Input], int, int]:
    """(inputs, pool_size, max_overflow) of one process, from its environment or the declared
    pool; more than the declared share is a finding, since the process would refuse to start
    (db/guard.py). NullPool has no numbers to read."""
    pool = project.declared["pool"]
    if pool["null_pool"]:
        return [], 0, 0
    size = env_int(project, findings, env, "POOL_SIZE", pool["pool_size"], pool["pool_size"])
    overflow = env_int(
        project, findings, env, "POOL_MAX_OVERFLOW", pool["max_overflow"], pool["max_overflow"]
    )
    declared_share = pool["pool_size"] + pool["max_overflow"]
    if size.value + overflow.value > declared_share:
        findings.append(
            f"{size.source}={size.value} and {overflow.source}={overflow.value} ->"
            f" {size.value + overflow.value} connections per process, but"
            f" {project.topology_file} declares pool_size + max_overflow ="
            f" {declared_share} and each process refuses to start past it (db/guard.py);"
            " change [pool] there too, so the budget and the guard agree"
        )
    return [size, overflow], size.value, overflow.value


def read_text(project: Project, relative: str) -> str:
    path = project.root / relative
    if not path.exists():
        raise Unreadable(f"{relative} is missing -> the connection budget needs it; restore it")
    return path.read_text()


def limits_inputs(project: Project, inputs: list[Input]) -> rule.DatabaseLimits:
    path = project.root / project.limits_file
    if not path.exists():
        raise Unreadable(f"{project.limits_file} is missing -> the budget needs it; restore it")
    limits = declared_files.load_limits(path, project.limits_file)
    # The limits the project was generated with (copier's answers), to say which number moved.
    answers = project.root / ANSWERS_FILE
    generated = yaml.safe_load(answers.read_text()) if answers.exists() else None
    generated = generated if isinstance(generated, dict) else {}
    # With an allocation the budget is the allocation alone; without, other_consumers is used.
    share = (
        ("db_allocation", "allocation", limits.allocation)
        if limits.allocation
        else ("other_consumers", "other_consumers", limits.other_consumers)
    )
    for name, field_name, value in (
        ("db_max_connections", "max_connections", limits.max_connections),
        ("db_reserved_connections", "reserved_connections", limits.reserved_connections),
        share,
    ):
        source = f"{project.limits_file}: database.{field_name}"
        inputs.append(Input(name, value, source, generated.get(name)))
    return limits
