"""Finding generated services on disk and reading what each one declares and deploys.

A service is a directory with a `.copier-answers.yml` whose `src/<package>/db/` holds the budget
rule. Services generated from 0.2.0 on declare their topology in `db/topology.toml`; older ones
only in their answers, which are turned into the same data here. Either way `deploy/` is read by
poolwise.deployed, the one loader: `poolwise budget`, `fleet`, `doctor` and every service's
generated budget test read it through `read_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import declared as declared_files
from . import deployed, rule

ANSWERS_FILE = ".copier-answers.yml"
# Directories never searched for services.
SKIPPED_DIRECTORIES = {".git", ".venv", "venv", "node_modules", "__pycache__", ".tox"}
DEFAULT_CLUSTER = "main"
CONTAINERS = {"k8s-sync": "api", "k8s-async": "api", "batch": "job", "lambda": "ServiceFunction"}


class InputError(Exception):
    """A path that is not a readable service; the message names the path and the reason."""


@dataclass
class Service:
    """One generated service: its identity, its limits and its worst case per deployed variant."""

    root: Path
    name: str
    package: str
    target: str
    pooler: str
    driver: str
    pool_mode: str
    cluster: str
    role: str
    limits: rule.DatabaseLimits
    external_consumers: dict[str, int]
    template_version: str
    readings: list[deployed.Reading] = field(default_factory=list)
    declared_in: str = ""

    @property
    def application_names(self) -> tuple[str, ...]:
        """The application_name of its processes and of its migration (settings, migration Job)."""
        return (self.name, f"{self.name}-migrate")

    @property
    def worst(self) -> deployed.Reading:
        """The variant of deploy/ that can open the most connections to PostgreSQL."""
        return max(self.readings, key=lambda reading: self.database_total(reading))

    def database_total(self, reading: deployed.Reading) -> int:
        return rule.database_check(reading.topology, reading.limits).total

    @property
    def total(self) -> int:
        """Connections this service can hold on its cluster at once, migration included."""
        return self.database_total(self.worst)


def find(paths: list[Path]) -> list[Path]:
    """Every service directory at or below the given paths, in a stable order."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if (path / ANSWERS_FILE).is_file():
            found.append(path.resolve())
            continue
        for answers in sorted(path.rglob(ANSWERS_FILE)):
            parts = set(answers.relative_to(path).parts[:-1])
            if not parts & SKIPPED_DIRECTORIES:
                found.append(answers.parent.resolve())
    unique = list(dict.fromkeys(found))
    if not unique:
        raise InputError(
            f"{', '.join(map(str, paths))}: no generated service found (a directory with"
            f" {ANSWERS_FILE} and src/<package>/db/)"
        )
    return unique


def _declared_from_answers(answers: dict[str, Any]) -> dict[str, Any]:
    """db/topology.toml's data for a service generated before it existed (0.1.0)."""
    target = answers["target"]
    pooler = answers.get("pooler", "none")
    null_pool = target in ("lambda", "batch") and bool(answers.get("null_pool", True))
    pool: dict[str, Any] = {"null_pool": null_pool}
    if not null_pool:
        for key in ("pool_size", "max_overflow", "pool_timeout", "pool_recycle"):
            pool[key] = answers[key]
    if target == "lambda":
        processes = {"lambda_reserved_concurrency": answers["lambda_reserved_concurrency"]}
    elif target == "batch":
        processes = {
            "batch_parallelism": answers["batch_parallelism"],
            "batch_processes": answers["batch_processes"],
            "batch_concurrency_policy": (
                answers.get("batch_concurrency_policy", "Forbid")
                if answers.get("batch_schedule")
                else ""
            ),
        }
    else:
        processes = {key: answers[key] for key in ("replicas_max", "max_surge", "workers_per_pod")}
    declared: dict[str, Any] = {
        "service": {
            "name": answers["project_name"],
            "target": target,
            "pooler": pooler,
            "driver": answers.get("driver", "psycopg") if target == "k8s-async" else "psycopg",
            "container": CONTAINERS[target],
        },
        "pool": pool,
        "processes": processes,
    }
    if pooler == "pgbouncer":
        declared["pgbouncer"] = {
            "pool_mode": answers.get("pgbouncer_pool_mode", "transaction"),
            "default_pool_size": answers.get("pgbouncer_default_pool_size", 20),
            "reserve_pool_size": 0,
        }
    if pooler == "rds-proxy":
        percent = answers.get("rds_proxy_max_connections_percent", 100)
        declared["rds_proxy"] = {"max_connections_percent": percent}
    return declared


def project_root(start: Path) -> Path | None:
    """The service directory at or above start: it holds src/<package>/db/ and its answers."""
    for directory in (start, *start.parents):
        if list(directory.glob("src/*/db/topology.toml")) or (
            (directory / ANSWERS_FILE).is_file()
            and list(directory.glob("src/*/db/database_limits.toml"))
        ):
            return directory
    return None


def project(root: Path) -> deployed.Project:
    """A service's declared facts: db/topology.toml, or its answers before 0.2.0 wrote one."""
    if list(root.glob("src/*/db/topology.toml")):
        return deployed.Project.at(root)
    try:
        answers = yaml.safe_load((root / ANSWERS_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{root / ANSWERS_FILE}: cannot be read ({error})") from None
    limits_files = sorted(root.glob("src/*/db/database_limits.toml"))
    if not isinstance(answers, dict) or "target" not in answers or not limits_files:
        raise InputError(
            f"{root}: not a poolwise service ({ANSWERS_FILE} without a target, or no"
            " src/<package>/db/database_limits.toml)"
        )
    package = limits_files[0].parent.parent.name
    return deployed.Project(
        root, package, _declared_from_answers(answers), declared_file=ANSWERS_FILE
    )


def read_budget(root: Path) -> tuple[deployed.Project, list[deployed.Reading]]:
    """A service's declared facts and its budget, one reading per variant of deploy/.

    The one entry point for a service's budget: its worst case is the reading with the largest
    ``rule.database_check(reading.topology, reading.limits).total`` (``Service.worst``).
    Raises InputError, naming the file, when anything cannot be read.
    """
    try:
        found = project(root)
        readings = [
            deployed.read_variant(root, variant, found) for variant in deployed.variants(root)
        ]
    except (deployed.Unreadable, deployed.ToolMissing, KeyError) as error:
        raise InputError(f"{root}: {error}") from None
    if not readings:
        raise InputError(f"{root}: deploy/ holds nothing to read (no kustomization, no SAM)")
    return found, readings


def load(root: Path) -> Service:
    """Read one service: answers, limits, and every variant of deploy/ through the loader."""
    try:
        answers = yaml.safe_load((root / ANSWERS_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{root / ANSWERS_FILE}: cannot be read ({error})") from None
    if (
        not isinstance(answers, dict)
        or "target" not in answers
        or not list(root.glob("src/*/db/database_limits.toml"))
    ):
        raise InputError(
            f"{root}: not a poolwise service ({ANSWERS_FILE} without a target, or no"
            " src/<package>/db/database_limits.toml)"
        )
    found, readings = read_budget(root)
    limits_file = found.root / found.limits_file
    try:
        data = declared_files.read_data_file(limits_file, found.limits_file)
    except deployed.Unreadable as error:
        raise InputError(f"{root}: {error}") from None
    database = data.get("database", {})
    declared = found.declared
    return Service(
        root=root,
        name=declared["service"]["name"],
        package=found.package,
        target=declared["service"]["target"],
        pooler=declared["service"]["pooler"],
        driver=declared["service"]["driver"],
        pool_mode=declared.get("pgbouncer", {}).get("pool_mode", ""),
        cluster=database.get("cluster") or answers.get("db_cluster") or DEFAULT_CLUSTER,
        role=database.get("role") or found.package,
        limits=readings[0].limits,
        external_consumers=dict(data.get("external_consumers", {})),
        template_version=str(answers.get("_commit", "")),
        readings=readings,
        declared_in=found.topology_file,
    )
