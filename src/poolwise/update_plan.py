"""`poolwise update-plan` and `update-apply`: a template release tried on every service first.

Each service's repository is cloned into a scratch directory and updated there with `copier
update --defaults` to one commit of the template (scratch.py); its budget is read before and
after through services.load, the reader `poolwise fleet` uses, and summed per cluster the way
fleet sums it. Services are ordered in waves, smallest share of their cluster first, and each
wave's cluster totals are shown as they would stand once it is rolled out.

`update-apply` runs the same plan and commits each clean update on a new branch of the team's
repository, fetched from the scratch copy: the team's working tree and current branch are never
touched and nothing is pushed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from . import allocations, fleet, scratch, services
from .services import InputError, Service

T = TypeVar("T")
R = TypeVar("R")
# copier's exit code when a release needs --trust (its _migrations run template code).
COPIER_NEEDS_TRUST = 4
# One service's update takes seconds; an hour means copier hangs (a prompt, a lock, a network).
COPIER_TIMEOUT = 3600
TEST_COMMAND = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
WAVES_KEY = "rollout_waves"
UNNAMED_WAVE = "rest"


@dataclass
class Conflict:
    file: str
    hunks: list[tuple[list[str], list[str]]]


@dataclass
class Planned:
    """One service: where it starts, what `copier update` did to its scratch copy, and after."""

    path: Path
    checkout: scratch.Checkout
    before: Service
    from_ref: str
    to_ref: str = ""
    after: Service | None = None
    files: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    refused: str = ""
    after_error: str = ""
    tests: str = ""
    wave: str = ""

    @property
    def name(self) -> str:
        return self.before.name

    @property
    def cluster(self) -> str:
        return (self.after or self.before).cluster

    @property
    def counted_after(self) -> Service:
        """The service as its cluster counts it after the update (before, when unknown)."""
        return self.after or self.before

    @property
    def change(self) -> int:
        return self.counted_after.total - self.before.total

    @property
    def clean(self) -> bool:
        return not (
            self.conflicts or self.refused or self.after_error or self.tests.startswith("failed")
        )

    def status(self) -> str:
        if self.refused:
            return f"REFUSED: {self.refused}"
        if self.conflicts:
            return f"CONFLICT in {', '.join(conflict.file for conflict in self.conflicts)}"
        if self.after_error:
            return f"UNREADABLE after the update: {self.after_error}"
        if self.tests.startswith("failed"):
            return f"TESTS FAILED after the update: {self.tests}"
        if not self.files:
            return "already there, nothing changes"
        return f"clean, {len(self.files)} files changed"


@dataclass
class ClusterPlan:
    name: str
    available: int
    before: int
    after: int
    moved_by: list[tuple[str, int]]

    @property
    def fits(self) -> bool:
        return self.after <= self.available


@dataclass
class Wave:
    name: str
    members: list[Planned]
    totals: list[ClusterPlan] = field(default_factory=list)


@dataclass
class Plan:
    to: str
    commit: str
    services: list[Planned]
    clusters: list[ClusterPlan]
    waves: list[Wave]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(cluster.fits for cluster in self.clusters) and all(
            total.fits for wave in self.waves for total in wave.totals
        )

    @property
    def clean(self) -> bool:
        return all(planned.clean for planned in self.services)

    @property
    def exit_code(self) -> int:
        if any(planned.after_error for planned in self.services):
            return 2
        return 0 if self.fits and self.clean else 1


# ----------------------------------------------------------------------------- planning


def _answers(root: Path) -> dict[str, Any]:
    try:
        answers = yaml.safe_load((root / services.ANSWERS_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{root / services.ANSWERS_FILE}: cannot be read ({error})") from None
    if not isinstance(answers, dict) or not answers.get("_src_path"):
        raise InputError(
            f"{root / services.ANSWERS_FILE}: no _src_path, so copier cannot update it;"
            " generate the service with copier (the file is copier's, never edited by hand)"
        )
    return answers


def _parallel(work: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(work, items))


def _load(checkout: scratch.Checkout, root: Path) -> Service:
    """services.load on the scratch copy; an error names the team's path, not the copy."""
    try:
        return services.load(checkout.root)
    except InputError as error:
        raise InputError(str(error).replace(str(checkout.root), str(root))) from None


def _read_before(root: Path, workdir: Path, index: int) -> Planned:
    checkout = scratch.clone_service(root, workdir / "services" / f"{index:04d}")
    before = _load(checkout, root)
    answers = _answers(checkout.root)
    return Planned(root, checkout, before, from_ref=str(answers.get("_commit", "")))


def _update(
    planned: Planned,
    template: scratch.Template,
    copier: list[str],
    cache: Path,
    trust: bool,
    run_tests: bool,
    test_timeout: float,
) -> Planned:
    root = planned.checkout.root
    argv = [*copier, "update", "--defaults", "--quiet", "--conflict", "inline"]
    argv += ["--vcs-ref", template.commit, *(["--trust"] if trust else [])]
    env = {**os.environ, **template.git_config(), "COPIER_CACHE_DIR": str(cache)}
    try:
        result = subprocess.run(
            argv,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COPIER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        planned.refused = f"copier update did not finish within {COPIER_TIMEOUT} s"
        planned.to_ref = planned.from_ref
        return planned
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        if result.returncode == COPIER_NEEDS_TRUST:
            last = f"the release runs migrations, pass --trust after reading its CHANGELOG ({last})"
        planned.refused = last
        planned.to_ref = planned.from_ref
        return planned
    planned.files = scratch.changed_files(planned.checkout)
    planned.conflicts = [
        Conflict(name, scratch.conflict_hunks(root / name))
        for name in scratch.unmerged_files(planned.checkout)
    ]
    try:
        planned.to_ref = str(_answers(root).get("_commit", ""))
        planned.after = _load(planned.checkout, planned.path)
    except InputError as error:
        if not planned.conflicts:
            planned.after_error = str(error)
    if run_tests and planned.clean and planned.files:
        planned.tests = _run_tests(root, test_timeout)
    return planned


def _run_tests(root: Path, timeout: float) -> str:
    try:
        result = subprocess.run(
            TEST_COMMAND,
            cwd=root,
            # The service's tests import its own src/ (its pytest config) and, for the budget
            # test, this poolwise (the dev dependency the update pins): nothing else a
            # PYTHONPATH set for poolwise points at.
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"failed (still running after {timeout:.0f} s)"
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1].strip("= ")
    return "passed" if result.returncode == 0 else f"failed ({summary})"


def _cluster_plans(plans: list[Planned]) -> list[ClusterPlan]:
    before = {cluster.name: cluster for cluster in fleet.clusters([p.before for p in plans])}
    after = {cluster.name: cluster for cluster in fleet.clusters([p.counted_after for p in plans])}
    result = []
    for name in sorted(before.keys() | after.keys()):
        now, then = before.get(name), after.get(name)
        moved = sorted(
            ((p.name, p.change) for p in plans if p.cluster == name and p.change),
            key=lambda pair: (-pair[1], pair[0]),
        )
        limits = (then or now).limits  # type: ignore[union-attr]
        result.append(
            ClusterPlan(
                name,
                limits.available,
                now.total if now else 0,
                then.total if then else 0,
                moved,
            )
        )
    return result


def _share(planned: Planned, available: dict[str, int]) -> float:
    room = available.get(planned.cluster, 0)
    return planned.counted_after.total / room if room > 0 else math.inf


def waves_by_count(plans: list[Planned], count: int, clusters: list[ClusterPlan]) -> list[Wave]:
    """N waves, smallest share of its cluster first; earlier waves are never the larger ones."""
    available = {cluster.name: cluster.available for cluster in clusters}
    ordered = sorted(plans, key=lambda p: (_share(p, available), p.name))
    count = max(1, min(count, len(ordered)))
    base, extra = divmod(len(ordered), count)
    waves, start = [], 0
    for index in range(count):
        size = base + (1 if index >= count - extra else 0)
        waves.append(Wave(str(index + 1), ordered[start : start + size]))
        start += size
    return waves


def load_named_waves(paths: list[Path]) -> dict[str, str]:
    """Service name -> wave name, from `rollout_waves` in platform data files."""
    named: dict[str, str] = {}
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise InputError(f"{path}: cannot be read ({error})") from None
        entries = data.get("clusters", [data]) if isinstance(data, dict) else []
        for entry in entries if isinstance(entries, list) else []:
            waves = entry.get(WAVES_KEY, {}) if isinstance(entry, dict) else {}
            if not isinstance(waves, dict) or not all(
                isinstance(value, str | int) for value in waves.values()
            ):
                raise InputError(
                    f"{path}: {WAVES_KEY} must map each service's project_name to a wave name"
                    " (orders-api: canary)"
                )
            for service, wave in waves.items():
                named[str(service)] = str(wave)
    if not named:
        raise InputError(
            f"{', '.join(map(str, paths))}: no {WAVES_KEY} (project_name: wave) in the platform"
            " file; add it, or pass --waves N"
        )
    return named


def waves_by_name(plans: list[Planned], named: dict[str, str]) -> tuple[list[Wave], list[str]]:
    """Waves in the order the platform file first names them; unnamed services go last."""
    order = list(dict.fromkeys(named.values()))
    if UNNAMED_WAVE in order:
        order.remove(UNNAMED_WAVE)
    members: dict[str, list[Planned]] = {name: [] for name in [*order, UNNAMED_WAVE]}
    for planned in sorted(plans, key=lambda p: p.name):
        members[named.get(planned.name, UNNAMED_WAVE)].append(planned)
    notes = [
        f"the platform file names {service} (wave {wave}), which is not among the services"
        for service, wave in named.items()
        if service not in {p.name for p in plans}
    ]
    waves = [Wave(name, group) for name, group in members.items() if group]
    return waves, notes


def _wave_totals(plans: list[Planned], waves: list[Wave]) -> None:
    """Each wave's cluster totals: its services and every earlier wave's updated, the rest not."""
    done: set[int] = set()
    for wave in waves:
        done |= {id(p) for p in wave.members}
        mixed = [
            Planned(p.path, p.checkout, p.counted_after if id(p) in done else p.before, "")
            for p in plans
        ]
        wave.totals = _cluster_plans(mixed)
        for p in wave.members:
            p.wave = wave.name


def plan(
    paths: list[Path],
    to: str,
    workdir: Path,
    *,
    jobs: int,
    waves: int | None = None,
    platform: list[Path] | None = None,
    run_tests: bool = False,
    trust: bool = False,
    test_timeout: float = 900,
) -> Plan:
    """Every service at PATHS updated to TO in scratch copies under WORKDIR, and the budgets.

    An unreadable service raises InputError before any update runs: a plan without it could
    not say what its cluster holds.
    """
    roots = services.find(paths)
    named = load_named_waves(platform) if platform else None
    copier = scratch.copier_command()
    for root in roots:
        scratch.repository_of(root)
    (workdir / "services").mkdir(parents=True)
    read = _parallel(lambda pair: _read_before(pair[1], workdir, pair[0]), enumerate(roots), jobs)

    sources = list(dict.fromkeys(str(_answers(p.checkout.root)["_src_path"]) for p in read))
    templates = {
        source: scratch.clone_template(source, to, workdir / "templates" / f"{index}.git")
        for index, source in enumerate(sources)
    }
    commits = {template.commit for template in templates.values()}

    def update(pair: tuple[int, Planned]) -> Planned:
        index, planned = pair
        template = templates[str(_answers(planned.checkout.root)["_src_path"])]
        cache = workdir / "copier-cache" / f"{index:04d}"
        return _update(planned, template, copier, cache, trust, run_tests, test_timeout)

    planned = _parallel(update, enumerate(read), jobs)
    clusters = _cluster_plans(planned)
    notes: list[str] = []
    if named is not None:
        ordered, notes = waves_by_name(planned, named)
    else:
        ordered = waves_by_count(planned, waves or 1, clusters)
    _wave_totals(planned, ordered)
    return Plan(to, ", ".join(sorted(commits)), planned, clusters, ordered, notes)


# ----------------------------------------------------------------------------- output


def _verdict(cluster: ClusterPlan) -> str:
    return "fits" if cluster.fits else f"OVER by {cluster.after - cluster.available}"


def _variants(planned: Planned) -> list[tuple[str, int | None, int | None]]:
    before = {r.variant: planned.before.database_total(r) for r in planned.before.readings}
    after = (
        {r.variant: planned.after.database_total(r) for r in planned.after.readings}
        if planned.after
        else {}
    )
    names = list(dict.fromkeys([*before, *after]))
    return [(name, before.get(name), after.get(name) if planned.after else None) for name in names]


def _allocations(planned: Planned) -> tuple[int, int | None]:
    """The service's share of its cluster before and after (0: none; None: not read after)."""
    after = allocations.allocation(planned.after) if planned.after else None
    return allocations.allocation(planned.before), after


def _number(value: int | None) -> str:
    return "?" if value is None else str(value)


def text(result: Plan) -> str:
    lines = [
        f"poolwise update-plan: {len(result.services)} services to {result.to}"
        f" (template commit {result.commit[:12]})",
        "",
    ]
    for cluster in result.clusters:
        moved = ", ".join(f"{name} {change:+d}" for name, change in cluster.moved_by)
        lines.append(
            f"cluster {cluster.name}: {cluster.before} -> {cluster.after} of {cluster.available}"
            f" available: {_verdict(cluster)}"
            + (f"; moved by {moved}" if moved else "; no service moves it")
        )
    lines.append("")
    for wave in result.waves if len(result.waves) > 1 else []:
        names = ", ".join(planned.name for planned in wave.members)
        lines.append(f"wave {wave.name}: {names}")
        totals = ", ".join(
            f"{total.name} {total.after} of {total.available}"
            + ("" if total.fits else f" OVER by {total.after - total.available}")
            for total in wave.totals
        )
        lines.append(f"  after it: {totals}")
    if len(result.waves) > 1:
        lines.append("")
    width = max(len(planned.name) for planned in result.services)
    for planned in sorted(result.services, key=lambda p: (p.cluster, p.name)):
        after = _number(planned.after.total if planned.after else None)
        lines.append(
            f"{planned.name:<{width}}  {planned.cluster}  {planned.from_ref} -> {planned.to_ref}"
            f"  {planned.before.total} -> {after}  {planned.status()}"
        )
        for variant, before, after_total in _variants(planned):
            lines.append(f"    {variant}: {_number(before)} -> {_number(after_total)}")
        share_before, share_after = _allocations(planned)
        if share_before or share_after:
            after_text = "?" if share_after is None else str(share_after or "none")
            lines.append(f"    allocation: {share_before or 'none'} -> {after_text}")
        for conflict in planned.conflicts:
            lines.append(f"    conflict in {conflict.file}:")
            for number, (ours, theirs) in enumerate(conflict.hunks, start=1):
                lines.append(f"      hunk {number}")
                lines += [f"      team:    {line}" for line in ours or ["(nothing)"]]
                lines += [f"      release: {line}" for line in theirs or ["(nothing)"]]
        if planned.tests:
            lines.append(f"    tests: {planned.tests}")
    lines += [f"note: {note}" for note in result.notes]
    over = [cluster.name for cluster in result.clusters if not cluster.fits]
    blocked = [planned.name for planned in result.services if not planned.clean]
    over_in_wave = [
        f"{total.name} after wave {wave.name}"
        for wave in result.waves
        for total in wave.totals
        if not total.fits and total.name not in over
    ]
    lines.append("")
    if result.exit_code == 0:
        lines.append("every update applies cleanly and every cluster fits after it")
    else:
        if over:
            lines.append(f"over after the update: {', '.join(over)}")
        if over_in_wave:
            lines.append(f"over during the rollout: {', '.join(over_in_wave)}")
        if blocked:
            lines.append(f"not clean: {', '.join(blocked)}")
    return "\n".join(lines)


def as_json(result: Plan) -> dict[str, Any]:
    return {
        "to": result.to,
        "commit": result.commit,
        "fits": result.fits,
        "clean": result.clean,
        "clusters": [
            {
                "name": cluster.name,
                "available": cluster.available,
                "before": cluster.before,
                "after": cluster.after,
                "fits": cluster.fits,
                "moved_by": [{"name": name, "change": change} for name, change in cluster.moved_by],
            }
            for cluster in result.clusters
        ],
        "services": [
            {
                "name": planned.name,
                "path": str(planned.path),
                "cluster": planned.cluster,
                "from": planned.from_ref,
                "to": planned.to_ref,
                "files_changed": planned.files,
                "conflicts": [
                    {
                        "file": conflict.file,
                        "hunks": [
                            {"team": ours, "release": theirs} for ours, theirs in conflict.hunks
                        ],
                    }
                    for conflict in planned.conflicts
                ],
                "refused": planned.refused or None,
                "unreadable_after": planned.after_error or None,
                "before": planned.before.total,
                "after": planned.after.total if planned.after else None,
                # db_allocation (0: none) before and after; None after when it cannot be read.
                "allocation_before": _allocations(planned)[0],
                "allocation_after": _allocations(planned)[1],
                "variants": [
                    {"variant": variant, "before": before, "after": after}
                    for variant, before, after in _variants(planned)
                ],
                "tests": planned.tests or None,
                "wave": planned.wave,
            }
            for planned in result.services
        ],
        "waves": [
            {
                "name": wave.name,
                "services": [planned.name for planned in wave.members],
                "clusters": [
                    {"name": total.name, "after": total.after, "available": total.available}
                    for total in wave.totals
                ],
            }
            for wave in result.waves
        ],
        "notes": result.notes,
    }


# ----------------------------------------------------------------------------- apply


def summary(planned: Planned) -> str:
    """The commit message: what the plan said about this service."""
    lines = [
        f"poolwise: update to {planned.to_ref}",
        "",
        f"{planned.name} on cluster {planned.cluster}: {planned.from_ref} -> {planned.to_ref},"
        f" worst case {planned.before.total} -> {planned.counted_after.total} connections.",
    ]
    for variant, before, after in _variants(planned):
        lines.append(f"- {variant}: {_number(before)} -> {_number(after)}")
    if planned.tests:
        lines.append(f"Tests of the updated service: {planned.tests}.")
    lines += ["", "Files changed:", *(f"- {name}" for name in planned.files)]
    lines += ["", "Planned and committed by poolwise update-apply; not pushed."]
    return "\n".join(lines) + "\n"


def skip_reason(planned: Planned, result: Plan) -> str:
    """Why an update is not committed, or '' when it is."""
    if not planned.clean:
        return planned.status()
    wave = next(wave for wave in result.waves if planned in wave.members)
    for total in wave.totals:
        if total.name == planned.cluster and not total.fits and planned.change > 0:
            return (
                f"it raises cluster {total.name} by {planned.change}, which would be"
                f" {total.after} of {total.available} after wave {wave.name}"
            )
    return ""


def apply(result: Plan, branch: str, wave: str | None) -> tuple[list[str], int]:
    """Commit each clean update of the chosen wave on BRANCH of its repository; never push."""
    names = [w.name for w in result.waves]
    if wave is not None and wave not in names:
        raise InputError(f"--wave {wave}: the plan's waves are {', '.join(names)}")
    lines, code = [], 0
    for planned in sorted(result.services, key=lambda p: p.name):
        if wave is not None and planned.wave != wave:
            continue
        reason = skip_reason(planned, result)
        if reason:
            lines.append(f"{planned.name}: skipped, {reason}")
            code = 1
            continue
        if not planned.files:
            lines.append(f"{planned.name}: already at {planned.to_ref}, nothing to commit")
            continue
        repository = planned.checkout.repository
        exists = subprocess.run(
            ["git", "show-ref", "--verify", "--quiet", f"refs/heads/{branch}"],
            cwd=repository,
            check=False,
        )
        if exists.returncode == 0:
            lines.append(
                f"{planned.name}: skipped, {repository} already has a branch {branch};"
                " delete it or pass --branch"
            )
            code = 1
            continue
        clone = planned.checkout.clone
        # The caller's git identity commits; a runner without one commits as poolwise.
        configured = subprocess.run(
            ["git", "config", "user.email"], cwd=clone, capture_output=True, check=False
        )
        env = None if configured.returncode == 0 else scratch.FALLBACK_IDENTITY
        scratch.git(clone, "switch", "--quiet", "-c", branch)
        scratch.git(clone, "add", "--all")
        message = summary(planned)
        scratch.git(clone, "commit", "--quiet", "--no-verify", "-F", "-", env=env, stdin=message)
        scratch.git(repository, "fetch", "--quiet", "--", str(clone), f"{branch}:{branch}")
        commit = scratch.git(repository, "rev-parse", "--short", branch).strip()
        lines.append(f"{planned.name}: committed {branch} at {commit} in {repository} (not pushed)")
    return lines, code


def scratch_directory() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="poolwise-update-")
