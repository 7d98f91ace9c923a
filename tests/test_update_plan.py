"""`poolwise update-plan` and `update-apply` over twelve services on two clusters.

The services are generated from 0.2.0 (the real release, tests/test_update.py's
template_releases: v0.1.0, v0.2.0 and this checkout as v0.3.0), edited the way teams edit them,
and committed. The plans run the `poolwise` command as a platform CI job runs it; every test
also checks that the teams' repositories are exactly as they were (branches, HEAD, files).

A release that raises a pool size is made in a temporary clone of those releases: v0.4.0 turns
on PgBouncer's reserve pool (reserve_pool_size 0 -> 5 in pgbouncer.ini and db/topology.toml), a
default teams never answered, which each service's own budget counts but copier's validators do
not see. Only orders-db has services behind PgBouncer, and it is sized so that they push it over.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from rendering import clean_env
from test_update import (
    FIXTURE,
    GITIGNORED,
    IMPORT_ORDERS,
    LOG_LEVEL,
    ORDER_MIGRATION_TEXT,
    ORDER_MODEL,
    ORDER_REVISION,
    ORDERS_ASYNC,
    ORDERS_ROUTE,
    ORDERS_SYNC,
    TOOL_TABLE,
    commit,
    edit,
    generate,
    git,
    make_template_releases,
    replace_once,
)

# Both clusters give 190 - 3 reserved = 187. The services' worst cases (with their teams'
# edits) sum to 183 on orders-db and 155 on catalog-db, at 0.2.0 and at this release alike.
LIMITS = {"db_max_connections": 190, "db_reserved_connections": 3, "other_consumers": 100}
AVAILABLE = 187
ORDERS_DB_TOTAL, CATALOG_DB_TOTAL = 183, 155
PGBOUNCER = {"pooler": "pgbouncer"}
# Each shape is rendered once; its services are copies with their own names and cluster.
SHAPES: dict[str, dict[str, Any]] = {
    "k8s-sync": {"target": "k8s-sync"},
    "k8s-async": {"target": "k8s-async"},
    "lambda": {"target": "lambda"},
    "batch": {"target": "batch"},
    "k8s-sync-pgbouncer": {"target": "k8s-sync", **PGBOUNCER},
}
# name -> (shape, cluster): six services on each cluster, every target, two behind PgBouncer.
FLEET: dict[str, tuple[str, str]] = {
    "orders-api": ("k8s-sync", "orders-db"),
    "orders-events": ("k8s-async", "orders-db"),
    "invoice-lambda": ("lambda", "orders-db"),
    "nightly-report": ("batch", "orders-db"),
    "billing-api": ("k8s-sync-pgbouncer", "orders-db"),
    "payments-api": ("k8s-sync-pgbouncer", "orders-db"),
    "catalog-api": ("k8s-sync", "catalog-db"),
    "search-api": ("k8s-async", "catalog-db"),
    "image-lambda": ("lambda", "catalog-db"),
    "reindex-job": ("batch", "catalog-db"),
    "pricing-lambda": ("lambda", "catalog-db"),
    "stock-worker": ("batch", "catalog-db"),
}
BEHIND_PGBOUNCER = ["billing-api", "payments-api"]
RESERVE_POOL_SIZE = 5
# The shapes' name and cluster, replaced in each copy as copier renders the answers: verbatim
# (the 0.2.0 template uses project_name, package_name and db_cluster only as they are).
PLACEHOLDER = ("fleet-placeholder", "fleet_placeholder", "placeholder-db")
PGBOUNCER_INI = "template/deploy/{% if uses_pgbouncer %}pgbouncer{% endif %}/pgbouncer.ini.jinja"
TOPOLOGY = "template/src/{{package_name}}/db/topology.toml.jinja"


def package(project: Path) -> str:
    return next(project.glob("src/*/db")).parent.name


def team_edits(project: Path, target: str) -> None:
    """Edits every team makes that merge with 0.2.0 -> this release: lines at the ends of files,
    new files, a job step, and on k8s-sync a smaller pool, declared and deployed together."""
    src = project / "src" / package(project)
    for name, lines in {
        src / "models.py": ORDER_MODEL,
        project / ".gitignore": GITIGNORED,
        project / "tests" / "conftest.py": FIXTURE,
        project / "pyproject.toml": TOOL_TABLE,
    }.items():
        name.write_text(name.read_text() + lines)
    versions = src / "migrations" / "versions"
    newest = max(path.name.split("_")[0] for path in versions.glob("[0-9][0-9][0-9][0-9]_*.py"))
    (versions / f"{ORDER_REVISION}_create_orders.py").write_text(
        ORDER_MIGRATION_TEXT.format(revision=ORDER_REVISION, down_revision=newest)
    )
    (src / "orders.py").write_text(ORDERS_ASYNC if target == "k8s-async" else ORDERS_SYNC)
    if target != "lambda":
        configmap = project / "deploy" / "k8s" / "configmap.yaml"
        configmap.write_text(configmap.read_text() + LOG_LEVEL)
    if target == "k8s-sync" and "pool_size = 5\n" in (src / "db" / "topology.toml").read_text():
        edit(src / "db" / "topology.toml", replace_once(r"^pool_size = 5$", "pool_size = 4"))
        edit(
            project / "deploy" / "k8s" / "configmap.yaml",
            replace_once(r'^  POOL_SIZE: "5"$', '  POOL_SIZE: "4"'),
        )
    if target == "batch":
        edit(src / "job.py", IMPORT_ORDERS)
        edit(
            src / "job.py",
            replace_once(
                r"^        sessions = make_session_factory\(engine\)\n",
                "\\g<0>        with session_scope(sessions) as session:\n"
                '            logger.info("orders: %d", orders.count_orders(session))\n',
            ),
        )
    commit(project, "orders table, log level, a smaller pool, our job step")


def poolwise(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The `poolwise` command as a CI job runs it (this checkout's package)."""
    src = Path(__file__).resolve().parent.parent / "src"
    return subprocess.run(
        [sys.executable, "-m", "poolwise", *map(str, args)],
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(src)),
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def snapshot(repositories: Path) -> dict[str, str]:
    """Every repository's refs, HEAD and status: what a plan must leave exactly as it was."""
    state = {}
    for repo in sorted(path.parent for path in repositories.glob("*/.git")):
        state[repo.name] = "\n".join(
            [
                git(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
                git(repo, "symbolic-ref", "HEAD"),
                git(repo, "status", "--porcelain", "--untracked-files=all"),
                git(repo, "rev-parse", "HEAD"),
            ]
        )
    return state


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template_releases(tmp_path_factory.mktemp("poolwise-releases") / "poolwise")


def answers_of(name: str, cluster: str, shape: str) -> dict[str, Any]:
    return {"project_name": name, "db_cluster": cluster, **LIMITS, **SHAPES[shape]}


def renamed(shape: Path, destination: Path, name: str, cluster: str) -> Path:
    """A copy of a shape's render with the service's answers where copier would put them."""
    replacements = list(zip(PLACEHOLDER, (name, name.replace("-", "_"), cluster), strict=True))

    def replaced(text: str) -> str:
        for old, new in replacements:
            text = text.replace(old, new)
        return text

    for path in sorted(shape.rglob("*")):
        relative = path.relative_to(shape)
        if relative.parts[0] == ".git" or path.is_dir():
            continue
        target = destination / replaced(relative.as_posix())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(replaced(path.read_text()).encode())
        shutil.copymode(path, target)
    git(destination, "init", "--quiet", "--initial-branch=main")
    commit(destination, "generated by poolwise 0.2.0")
    return destination


def rendered_tree(project: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(project)): path.read_bytes()
        for path in sorted(project.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(project).parts
    }


@pytest.fixture(scope="module")
def generated(releases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The twelve services from 0.2.0 with their teams' edits, each in its own repository.

    copier renders each shape once (and catalog-api once more, to prove that a renamed copy is
    what copier renders); the services are copies with their answers filled in.
    """
    shapes = tmp_path_factory.mktemp("shapes")
    fleet = tmp_path_factory.mktemp("services")
    real = tmp_path_factory.mktemp("real") / "catalog-api"
    placeholder, _, placeholder_db = PLACEHOLDER
    renders = [(shapes / shape, answers_of(placeholder, placeholder_db, shape)) for shape in SHAPES]
    renders.append((real, answers_of("catalog-api", "catalog-db", FLEET["catalog-api"][0])))
    # Two at a time, as the machine has two cores: each copier renders in one process.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda item: generate(releases, item[0], item[1], release="v0.2.0"), renders))
    for name, (shape, cluster) in FLEET.items():
        renamed(shapes / shape, fleet / name, name, cluster)
    assert rendered_tree(fleet / "catalog-api") == rendered_tree(real)
    for name, (shape, _) in FLEET.items():
        team_edits(fleet / name, SHAPES[shape]["target"])
    return fleet


@pytest.fixture
def services(generated: Path, tmp_path: Path) -> Path:
    """A copy of the twelve repositories this test may change."""
    copy = tmp_path / "services"
    shutil.copytree(generated, copy, symlinks=True)
    return copy


@pytest.fixture(scope="module")
def raised_release(releases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of the releases with v0.4.0: PgBouncer's reserve pool on by default."""
    repo = tmp_path_factory.mktemp("poolwise-raised") / "poolwise"
    git(releases.parent, "clone", "--quiet", str(releases), str(repo))
    for name in (PGBOUNCER_INI, TOPOLOGY):
        edit(
            repo / name,
            replace_once(r"^reserve_pool_size = 0$", f"reserve_pool_size = {RESERVE_POOL_SIZE}"),
        )
    commit(repo, "pgbouncer: a reserve pool by default", tag="v0.4.0")
    return repo


def plan_json(cwd: Path, *args: str | Path) -> tuple[int, dict[str, Any]]:
    """`update-plan --json --to ARGS...` (the release, options, then the paths)."""
    result = poolwise("update-plan", "--json", "--to", *args, cwd=cwd)
    assert result.stderr == "", result.stderr
    return result.returncode, json.loads(result.stdout)


# ----------------------------------------------------------------------------- the tests


def test_an_update_to_this_release_fits_every_cluster(generated: Path) -> None:
    before = snapshot(generated)

    code, plan = plan_json(generated, "v0.3.0", "--waves", "3", generated)

    assert code == 0, json.dumps(plan, indent=2)
    # The shape platform CI relies on.
    assert [(c["name"], c["available"], c["before"], c["after"]) for c in plan["clusters"]] == [
        ("catalog-db", AVAILABLE, CATALOG_DB_TOTAL, CATALOG_DB_TOTAL),
        ("orders-db", AVAILABLE, ORDERS_DB_TOTAL, ORDERS_DB_TOTAL),
    ]
    for cluster in plan["clusters"]:
        assert {"name", "available", "before", "after"} <= cluster.keys()
        assert all(isinstance(cluster[key], int) for key in ("available", "before", "after"))
        assert cluster["after"] <= cluster["available"]
    assert sorted(service["name"] for service in plan["services"]) == sorted(FLEET)
    for service in plan["services"]:
        assert {"name", "cluster", "from", "to", "conflicts", "before", "after"} <= service.keys()
        assert service["cluster"] == FLEET[service["name"]][1]
        assert (service["from"], service["to"]) == ("v0.2.0", "v0.3.0")
        assert service["conflicts"] == []
        assert isinstance(service["before"], int) and isinstance(service["after"], int)
        assert service["files_changed"], service["name"]
        # 0.2.0 had no shares, and an update with --defaults gives none: other_consumers stays.
        assert (service["allocation_before"], service["allocation_after"]) == (0, 0)
    # The team's smaller pool survives the update: 5 pods x 1 worker x (4 + 5), plus migration.
    orders_api = next(s for s in plan["services"] if s["name"] == "orders-api")
    assert (orders_api["before"], orders_api["after"]) == (46, 46)
    # Each cluster's total is what `poolwise fleet` says of the same services.
    fleet = json.loads(poolwise("fleet", "--json", generated, cwd=generated).stdout)
    assert {c["name"]: c["total"] for c in fleet["clusters"]} == {
        c["name"]: c["before"] for c in plan["clusters"]
    }
    # Three waves of four, the smallest shares of their cluster first.
    waves = plan["waves"]
    assert [len(wave["services"]) for wave in waves] == [4, 4, 4]
    share = {
        s["name"]: s["after"]
        / next(c for c in plan["clusters"] if c["name"] == s["cluster"])["available"]
        for s in plan["services"]
    }
    ordered = [name for wave in waves for name in wave["services"]]
    assert [share[name] for name in ordered] == sorted(share.values())
    assert waves[-1]["clusters"] == [
        {"name": c["name"], "after": c["after"], "available": c["available"]}
        for c in plan["clusters"]
    ]
    assert snapshot(generated) == before


def test_a_release_that_raises_a_pool_size_overflows_one_cluster(
    services: Path, raised_release: Path
) -> None:
    # The services were generated from the releases without v0.4.0: point them at the clone,
    # as a platform team does when it moves the template (and commit, as copier needs).
    for project in services.iterdir():
        edit(
            project / ".copier-answers.yml",
            replace_once(r"^_src_path: .*$", f"_src_path: {raised_release}"),
        )
        commit(project, "poolwise: the template moved")
    before = snapshot(services)

    result = poolwise("update-plan", "--to", "v0.4.0", "--waves", "3", services, cwd=services)

    print(result.stdout)  # the plan a platform team reads: shown by pytest -rP
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""
    grown = ORDERS_DB_TOTAL + RESERVE_POOL_SIZE * len(BEHIND_PGBOUNCER)
    moved = ", ".join(f"{name} +{RESERVE_POOL_SIZE}" for name in BEHIND_PGBOUNCER)
    assert (
        f"cluster orders-db: {ORDERS_DB_TOTAL} -> {grown} of {AVAILABLE} available:"
        f" OVER by {grown - AVAILABLE}; moved by {moved}\n"
    ) in result.stdout
    assert (
        f"cluster catalog-db: {CATALOG_DB_TOTAL} -> {CATALOG_DB_TOTAL} of {AVAILABLE} available:"
        " fits; no service moves it\n"
    ) in result.stdout
    assert result.stdout.rstrip().endswith("over after the update: orders-db")
    assert snapshot(services) == before


def test_a_team_edit_that_conflicts_is_named_with_its_hunks(services: Path) -> None:
    # The orders route imports its module on app.py's `from . import items` line, which this
    # release changed too (tests/test_update.py: FIRST_UPDATE_CONFLICTS).
    project = services / "orders-api"
    app = project / "src" / package(project) / "app.py"
    edit(app, IMPORT_ORDERS)
    route = ORDERS_ROUTE.format(asynchronous="", awaited="")
    edit(app, replace_once(r"^def read_item\(.*\n(    .*\n|\n(?=    ))*", r"\g<0>" + route))
    commit(project, "our orders route")
    chosen = [services / "orders-api", services / "catalog-api"]
    before = snapshot(services)

    result = poolwise("update-plan", "--to", "v0.3.0", *chosen, cwd=services)

    print(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    conflicted = f"src/{package(project)}/app.py"
    assert f"CONFLICT in {conflicted}" in result.stdout
    # Each hunk's first lines: the team's import line, then the release's.
    assert (
        f"    conflict in {conflicted}:\n      hunk 1\n"
        "      team:    from . import items, orders, prometheus\n"
        "      release: from . import items\n"
    ) in result.stdout
    assert result.stdout.rstrip().endswith("not clean: orders-api")
    assert snapshot(services) == before

    # The same plan as JSON, in the waves the platform file names (services it does not name
    # go last).
    platform = services.parent / "orders-db.yml"
    platform.write_text("db_cluster: orders-db\nrollout_waves:\n  catalog-api: canary\n")
    code, plan = plan_json(services, "v0.3.0", "--platform", platform, *chosen)
    assert code == 1
    assert [(wave["name"], wave["services"]) for wave in plan["waves"]] == [
        ("canary", ["catalog-api"]),
        ("rest", ["orders-api"]),
    ]
    conflicts = {s["name"]: s["conflicts"] for s in plan["services"]}
    assert conflicts["catalog-api"] == []
    [conflict] = conflicts["orders-api"]
    assert conflict["file"] == conflicted
    assert conflict["hunks"][0] == {
        "team": ["from . import items, orders, prometheus"],
        "release": ["from . import items"],
    }


def test_an_unreadable_service_stops_the_plan_before_any_update(services: Path) -> None:
    project = services / "search-api"
    edit(
        project / "deploy" / "k8s" / "configmap.yaml",
        replace_once(r'^  POOL_SIZE: "\d+"$', '  POOL_SIZE: "eight"'),
    )
    commit(project, "a typo")
    before = snapshot(services)

    result = poolwise("update-plan", "--to", "v0.3.0", services, cwd=services)

    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("poolwise update-plan: ")
    assert "POOL_SIZE" in line and "eight" in line
    assert snapshot(services) == before

    missing = poolwise("update-plan", "--to", "v9.9.9", services / "orders-api", cwd=services)
    assert missing.returncode == 2
    assert missing.stderr.startswith("poolwise update-plan: --to v9.9.9: no such tag")


def test_apply_commits_clean_updates_on_a_new_branch_and_pushes_nothing(
    services: Path, tmp_path: Path
) -> None:
    # Each repository has a remote, to show that nothing reaches it.
    chosen = ["nightly-report", "orders-api"]
    for name in chosen:
        remote = tmp_path / "remotes" / f"{name}.git"
        git(services, "clone", "--quiet", "--bare", str(services / name), str(remote))
        git(services / name, "remote", "add", "origin", str(remote))
    # orders-api's team edit conflicts with the release (as above): it is not committed.
    app = services / "orders-api" / "src" / "orders_api" / "app.py"
    edit(app, IMPORT_ORDERS)
    commit(services / "orders-api", "orders on the import line")
    before = snapshot(services)

    result = poolwise(
        "update-apply",
        "--to",
        "v0.3.0",
        "--run-tests",
        *(services / n for n in chosen),
        cwd=services,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "    tests: passed\n" in result.stdout
    project = services / "nightly-report"
    assert re.search(
        rf"^nightly-report: committed poolwise-update-v0.3.0 at [0-9a-f]+ in {project}"
        r" \(not pushed\)$",
        result.stdout,
        re.M,
    )
    assert "orders-api: skipped, CONFLICT in src/orders_api/app.py\n" in result.stdout
    # The teams' branches, HEADs and files are as they were; one new branch holds the update.
    after = snapshot(services)
    new_branch = "refs/heads/poolwise-update-v0.3.0"
    branch_line = re.search(rf"^{new_branch} ([0-9a-f]+)\n", after["nightly-report"], re.M)
    assert branch_line is not None
    assert after["nightly-report"].replace(branch_line[0], "") == before["nightly-report"]
    assert {k: v for k, v in after.items() if k != "nightly-report"} == {
        k: v for k, v in before.items() if k != "nightly-report"
    }
    message = git(project, "log", "-1", "--format=%B", new_branch)
    assert message.startswith("poolwise: update to v0.3.0\n\nnightly-report on cluster orders-db:")
    assert "Tests of the updated service: passed." in message
    assert "\n_commit: v0.3.0\n" in git(project, "show", f"{new_branch}:.copier-answers.yml")
    assert git(project, "rev-parse", f"{new_branch}~1") == git(project, "rev-parse", "HEAD")
    for name in chosen:
        remote = tmp_path / "remotes" / f"{name}.git"
        assert git(remote, "for-each-ref", "--format=%(refname)").split() == ["refs/heads/main"]

    # Again: the branch exists, so the service is skipped and its branch left as it is.
    again = poolwise("update-apply", "--to", "v0.3.0", project, cwd=services)
    assert again.returncode == 1
    assert f"nightly-report: skipped, {project} already has a branch poolwise-update-v0.3.0" in (
        again.stdout
    )
    assert snapshot(services) == after
