"""`copier update` carries template fixes into a generated service and keeps the team's edits.

Each test works on a throwaway git copy of this template with its own release tags:

    v1.0.0  the template as it is in this checkout (working tree, uncommitted files included)
    v1.1.0  a fix in the engine module and a new module with its test
    v1.2.0  (separate copy) tests/test_engine_profile.py moves to tests/db/, with a change, and a
            `_migrations` entry that carries the project's edits to the new path

and the real releases (template_releases): v0.1.0 and v0.2.0 as released (git tags do not travel
with a clone, so they are made from the release commits) and this checkout as v0.3.0.

A service is generated from v1.0.0 with the CLI, committed, edited the way teams edit services,
committed again, and updated with `copier update --defaults` exactly as the README documents.

POOLWISE_TEST_COPIER=/path/to/bin/copier runs these tests with another copier (see
rendering.copier_program), for example the _min_copier_version of copier.yml in its own venv.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from rendering import TEMPLATE_ROOT, copier_cli, python, run, run_checked, succeeded

PACKAGE = "poolwise_service"
# What the template needs to render; the rest of the repository is not part of a release.
TEMPLATE_PATHS = ["copier.yml", "includes", "template", "hooks"]
CONFLICT_START = "<<<<<<< before updating"
# main at the 0.1.0 and 0.2.0 releases: services generated from them must update to this checkout.
RELEASE_0_1_0 = "639afbe"
RELEASE_0_2_0 = "013d1ed"
# This checkout, tagged newer than every real release so that `copier update` picks it.
THIS_RELEASE = "v0.3.0"

ENGINE = f"src/{PACKAGE}/db/engine.py"
ENGINE_FIX = "CONNECT_TIMEOUT_SECONDS = 2"
OLD_TEST = "tests/test_engine_profile.py"
NEW_TEST = "tests/db/test_engine_profile.py"
MOVED_NOTE = "Moved to tests/db/ in 1.2.0."

POOL_STATUS = '''"""One line on the pool's state, for logs and debugging (added in 1.1.0)."""

from __future__ import annotations

from typing import Any


def pool_status(engine: Any) -> str:
    """The pool's own status line; an async engine reports its sync engine's pool."""
    return str(getattr(engine, "sync_engine", engine).pool.status())
'''

POOL_STATUS_TEST = '''"""The pool status line names the pool (added in 1.1.0)."""

from {{ package_name }}.db.engine import build_engine
from {{ package_name }}.db.pool_status import pool_status
from {{ package_name }}.settings import Settings


def test_pool_status_is_one_line(settings: Settings) -> None:
    status = pool_status(build_engine(settings))
    assert status
    assert "\\n" not in status
'''

VERSION_ENDPOINT = '''

@router.get("/version")
async def version() -> dict[str, str]:
    """The deployed build, added by the service team."""
    return {"version": "2024.06.1"}
'''

VERSION_TEST = f'''"""The team's own endpoint."""

from fastapi.testclient import TestClient

from {PACKAGE}.app import create_app
from {PACKAGE}.settings import Settings


def test_version_endpoint(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get("/version").json() == {{"version": "2024.06.1"}}
'''

NEW_DEPENDENCY = '"orjson>=3.10",'
ACCEPTED_CHECK = "| `CKV_K8S_21` default namespace | added in 1.1.0 |\n"
# The commits of the tests and of `copier update` must not depend on the machine's git config.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "poolwise test",
    "GIT_AUTHOR_EMAIL": "test@poolwise.invalid",
    "GIT_COMMITTER_NAME": "poolwise test",
    "GIT_COMMITTER_EMAIL": "test@poolwise.invalid",
}


# ----------------------------------------------------------------------------- helpers


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would: no pytest variables, a git identity for commits."""
    result = run(args, cwd, env=GIT_IDENTITY)
    return succeeded(result, cwd) if check else result


def git(cwd: Path, *args: str) -> str:
    return sh(["git", *args], cwd).stdout


def commit(repo: Path, message: str, tag: str | None = None) -> None:
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--no-verify", "-m", message)
    if tag:
        git(repo, "tag", "--annotate", tag, "-m", f"poolwise {tag}")


def edit(path: Path, change: Callable[[str], str]) -> None:
    before = path.read_text()
    after = change(before)
    assert after != before, f"the edit of {path} changed nothing; has the template changed?"
    path.write_text(after)


def replace_once(pattern: str, replacement: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        new, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
        assert count == 1, f"{pattern!r} not found"
        return new

    return change


def copier(
    command: Literal["copy", "update"], *args: str, cwd: Path, check: bool = True, **options: Any
) -> subprocess.CompletedProcess[str]:
    """The copier CLI with --defaults (rendering.copier_cli), run like sh()."""
    result = copier_cli(command, *args, cwd=cwd, env=GIT_IDENTITY, **options)
    return succeeded(result, cwd) if check else result


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def tree(project: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(project)): path.read_bytes()
        for path in sorted(project.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(project).parts
    }


# ------------------------------------------------------------------------- the template's releases


def copy_working_tree(repo: Path) -> None:
    """This checkout's template files, uncommitted and untracked ones included, into repo."""
    listed = git(
        TEMPLATE_ROOT,
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
        "--",
        *TEMPLATE_PATHS,
    )
    for name in filter(None, listed.split("\0")):
        source = TEMPLATE_ROOT / name
        if source.is_file():  # deleted but not yet committed files are listed too
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)


def release_1_0(repo: Path) -> None:
    """This checkout's template files as v1.0.0."""
    copy_working_tree(repo)
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit(repo, "poolwise 1.0.0", tag="v1.0.0")


def release_1_1(repo: Path) -> None:
    """A fix in the engine module and a new file."""
    engine = repo / "template/src/{{package_name}}/db/engine.py.jinja"
    edit(engine, replace_once(r"^CONNECT_TIMEOUT_SECONDS = (?!2$)\d+$", ENGINE_FIX))
    (repo / "template/src/{{package_name}}/db/pool_status.py").write_text(POOL_STATUS)
    (repo / "template/tests/test_pool_status.py.jinja").write_text(POOL_STATUS_TEST)
    # A new last row of the README's last table, right where teams append their notes.
    edit(
        repo / "template/README.md.jinja",
        replace_once(r"(?=\n## Notes from the team\n)|\Z", ACCEPTED_CHECK),
    )
    commit(repo, "engine: fail a connect in 2 s; pool_status(); a checkov exception", tag="v1.1.0")


def release_1_2(repo: Path) -> None:
    """Move a rendered file that teams edit, change it, and migrate the edits across."""
    old = repo / "template" / f"{OLD_TEST}.jinja"
    new = repo / "template" / f"{NEW_TEST}.jinja"
    new.parent.mkdir(parents=True)
    old.rename(new)
    edit(new, replace_once(r'^"""(.*)"""$', rf'"""\1 {MOVED_NOTE}"""'))
    migration = (
        "_migrations:\n"
        '  - version: "1.2.0"\n'
        "    when: \"{{ _stage == 'after' }}\"\n"
        '    command: ["{{ _copier_python }}", "{{ _copier_conf.src_path }}/hooks/migrate.py",'
        f' "move-file", "{OLD_TEST}", "{NEW_TEST}"]\n'
    )
    edit(repo / "copier.yml", replace_once(r"^_migrations: \[\]\n", migration))
    commit(repo, "tests: engine profile tests move to tests/db/", tag="v1.2.0")


@pytest.fixture(scope="module")
def template_1_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("poolwise-template")
    release_1_0(repo)
    release_1_1(repo)
    return repo


@pytest.fixture(scope="module")
def template_1_2(template_1_1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("poolwise-template-1.2") / "poolwise"
    git(template_1_1.parent, "clone", "--quiet", str(template_1_1), str(repo))
    release_1_2(repo)
    return repo


@pytest.fixture(scope="module")
def template_releases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.1.0 and 0.2.0 as released (main at their commits), this checkout as THIS_RELEASE."""
    return make_template_releases(tmp_path_factory.mktemp("poolwise-releases") / "poolwise")


def make_template_releases(repo: Path) -> Path:
    """The template_releases repository at ``repo`` (tests/test_update_plan.py makes one too)."""
    for release in (RELEASE_0_1_0, RELEASE_0_2_0):
        found = sh(["git", "cat-file", "-e", f"{release}^{{commit}}"], TEMPLATE_ROOT, False)
        assert found.returncode == 0, (
            f"commit {release} (a release) is not in this clone's history; clone the"
            " repository with its history (not --depth 1) to run the update tests"
        )
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    for source, tag in ((RELEASE_0_1_0, "v0.1.0"), (RELEASE_0_2_0, "v0.2.0"), (None, THIS_RELEASE)):
        for name in TEMPLATE_PATHS:
            path = repo / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if source is None:
            copy_working_tree(repo)
        else:
            subprocess.run(
                f"git archive --format=tar {source} {' '.join(TEMPLATE_PATHS)} | tar -x -C {repo}",
                shell=True,
                cwd=TEMPLATE_ROOT,
                check=True,
                timeout=120,
            )
        assert git(repo, "status", "--porcelain"), (
            f"{tag} has the same template files as the release before it"
        )
        commit(repo, f"poolwise {tag[1:]}", tag=tag)
    return repo


# ----------------------------------------------------------------------------- a generated service


def generate(
    template: Path,
    project: Path,
    answers: dict[str, Any] | None = None,
    *,
    data_file: Path | None = None,
    release: str = "v1.0.0",
) -> Path:
    """`copier copy` from a release (v1.0.0 unless given), then the team's first commit."""
    copier(
        "copy",
        template=template,
        destination=project,
        vcs_ref=release,
        answers=answers,
        data_file=data_file,
        cwd=project.parent,
    )
    git(project, "init", "--quiet", "--initial-branch=main")
    commit(project, f"generated by poolwise {release[1:]}")
    return project


def team_edits(project: Path) -> None:
    """What teams do next: an endpoint, a smaller pool (within budget), a dependency."""
    package = project / "src" / PACKAGE
    edit(
        package / "app.py",
        replace_once(r"^router = APIRouter\(.*\)\n", r"\g<0>" + VERSION_ENDPOINT),
    )
    (project / "tests" / "test_version.py").write_text(VERSION_TEST)
    # A smaller pool is declared in db/topology.toml and deployed in the ConfigMap, together.
    edit(package / "db" / "topology.toml", replace_once(r"^pool_size = 5$", "pool_size = 4"))
    edit(
        project / "deploy" / "k8s" / "configmap.yaml",
        replace_once(r'^  POOL_SIZE: "5"$', '  POOL_SIZE: "4"'),
    )
    edit(
        project / OLD_TEST,
        replace_once(r"^    assert pool\.size\(\) == 5$", "    assert pool.size() == 4"),
    )
    edit(
        project / "pyproject.toml",
        replace_once(r"^dependencies = \[\n", rf"\g<0>    {NEW_DEPENDENCY}\n"),
    )
    readme = project / "README.md"
    readme.write_text(readme.read_text() + RUNBOOK)
    commit(project, "our endpoint, a smaller pool, orjson, our runbook")


def assert_team_edits_kept(project: Path, engine_profile_test: str = OLD_TEST) -> None:
    package = project / "src" / PACKAGE
    assert '@router.get("/version")' in (package / "app.py").read_text()
    assert (project / "tests" / "test_version.py").read_text() == VERSION_TEST
    assert "\npool_size = 4\n" in (package / "db" / "topology.toml").read_text()
    assert '  POOL_SIZE: "4"\n' in (project / "deploy" / "k8s" / "configmap.yaml").read_text()
    assert "    assert pool.size() == 4\n" in (project / engine_profile_test).read_text()
    assert NEW_DEPENDENCY in (project / "pyproject.toml").read_text()
    assert (project / "README.md").read_text().endswith(NOTES_FROM_THE_TEAM + RUNBOOK)


def assert_release_1_1_arrived(project: Path) -> None:
    assert f"\n{ACCEPTED_CHECK}\n" in (project / "README.md").read_text()
    assert f"\n{ENGINE_FIX}\n" in (project / ENGINE).read_text()
    assert (project / "src" / PACKAGE / "db" / "pool_status.py").read_text() == POOL_STATUS
    assert (project / "tests" / "test_pool_status.py").is_file()


def assert_project_checks_pass(project: Path) -> None:
    assert not sh(["git", "grep", "-n", CONFLICT_START], project, check=False).stdout
    run_checked(python("-m", "ruff", "check", "--no-cache", "."), project)
    output = run_checked(python("-m", "pytest", "-q", "-p", "no:cacheprovider"), project)
    assert " passed" in output
    assert "failed" not in output


def unmerged(project: Path) -> list[str]:
    """The README's conflict check: files copier left with conflict markers."""
    return git(project, "diff", "--name-only", "--diff-filter=U").split()


# ----------------------------------------------------------------------------- the tests


def test_update_brings_the_fix_and_keeps_the_teams_edits(
    template_1_1: Path, tmp_path: Path
) -> None:
    project = generate(template_1_1, tmp_path / "orders")
    team_edits(project)

    result = copier("update", cwd=project)

    assert "Updating to template version 1.1.0" in result.stderr
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["_commit"] == "v1.1.0"
    assert answers["_src_path"] == str(template_1_1)
    assert unmerged(project) == []
    assert_team_edits_kept(project)
    assert_release_1_1_arrived(project)
    assert_project_checks_pass(project)


def test_a_real_conflict_is_left_as_markers_and_listed_as_unmerged(
    template_1_1: Path, tmp_path: Path
) -> None:
    project = generate(template_1_1, tmp_path / "orders")
    edit(
        project / ENGINE,
        replace_once(r"^CONNECT_TIMEOUT_SECONDS = \d+$", "CONNECT_TIMEOUT_SECONDS = 10"),
    )
    commit(project, "our database is far away")

    result = copier("update", cwd=project)

    # Copier exits 0 with a conflict; the README's check is what finds it.
    assert result.returncode == 0
    assert unmerged(project) == [ENGINE]
    engine = (project / ENGINE).read_text()
    assert (
        f"{CONFLICT_START}\nCONNECT_TIMEOUT_SECONDS = 10\n=======\n{ENGINE_FIX}\n"
        ">>>>>>> after updating\n"
    ) in engine
    assert "Unmerged paths" in git(project, "status")
    # Everything without a conflict was still updated.
    assert (project / "src" / PACKAGE / "db" / "pool_status.py").is_file()


def test_an_answer_that_breaks_the_budget_is_refused_like_at_copy_time(
    template_1_1: Path, tmp_path: Path
) -> None:
    # The budget's factors are pinned here, so the message below does not follow the defaults.
    topology = {"replicas_max": 3, "max_surge": 1, "pool_size": 5, "max_overflow": 5}
    limits = {"db_max_connections": 110, "db_reserved_connections": 3, "other_consumers": 40}
    project = generate(template_1_1, tmp_path / "orders", {**topology, **limits})
    before = tree(project)
    head = git(project, "rev-parse", "HEAD")

    # Pods: 3 + 1 surge + 1 terminating. 8 workers: 5 x 8 x (5 + 5) = 400 > 67. 2 workers:
    # 101 > 67, but it would fit the 107 left if the recorded other_consumers=40 were lost.
    for workers in ("8", "2"):
        update = copier("update", answers={"workers_per_pod": workers}, cwd=project, check=False)
        copy = copier(
            "copy",
            template=template_1_1,
            destination=tmp_path / f"copy-{workers}",
            vcs_ref="v1.1.0",
            answers={**topology, **limits, "workers_per_pod": workers},
            cwd=tmp_path,
            check=False,
        )

        assert update.returncode == 1
        assert last_line(update) == last_line(copy)
        assert last_line(update).startswith(
            "ValueError: Validation error for question 'max_overflow': connection budget"
            " exceeded, app -> database: (3 replicas_max + 1 max_surge + 1 terminating)"
            f" x {workers}"
            " workers_per_pod x (5 pool_size + 5 max_overflow)"
        )
        assert "- other_consumers 40)" in last_line(update)
        assert tree(project) == before
        assert git(project, "status", "--porcelain") == ""
        assert git(project, "rev-parse", "HEAD") == head

    # An answer change within budget goes through and is checked by the project's own tests.
    copier("update", answers={"workers_per_pod": 1, "pool_size": 4}, cwd=project)
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert (answers["other_consumers"], answers["pool_size"]) == (40, 4)
    declared = (project / "src" / PACKAGE / "db" / "topology.toml").read_text()
    assert "\npool_size = 4\n" in declared
    assert_project_checks_pass(project)


def test_a_moved_file_keeps_the_teams_edits_through_the_migration(
    template_1_2: Path, tmp_path: Path
) -> None:
    project = generate(template_1_2, tmp_path / "orders")
    team_edits(project)
    before = tree(project)

    # The migration runs Python from the template: copier asks for --trust, changes nothing.
    refused = copier("update", cwd=project, check=False)
    assert refused.returncode == 4
    assert "migrations" in refused.stderr
    assert tree(project) == before

    result = copier("update", "--trust", cwd=project)

    assert "Updating to template version 1.2.0" in result.stderr
    assert f"poolwise migration: moved {OLD_TEST} -> {NEW_TEST}, kept your edits" in result.stderr
    assert not (project / OLD_TEST).exists()
    assert MOVED_NOTE in (project / NEW_TEST).read_text()
    assert unmerged(project) == []
    assert_team_edits_kept(project, engine_profile_test=NEW_TEST)
    assert_release_1_1_arrived(project)
    assert_project_checks_pass(project)


def test_an_edit_that_collides_with_the_moved_files_change_is_a_conflict(
    template_1_2: Path, tmp_path: Path
) -> None:
    project = generate(template_1_2, tmp_path / "orders")
    edit(project / OLD_TEST, replace_once(r'^"""(.*)"""$', r'"""\1 Ours."""'))
    commit(project, "our note on the engine tests")

    result = copier("update", "--trust", cwd=project)

    assert "1 conflict(s) between your edits and the release" in result.stderr
    assert unmerged(project) == [NEW_TEST]
    moved = (project / NEW_TEST).read_text()
    assert moved.startswith(f"{CONFLICT_START}\n")
    assert ' Ours."""\n=======\n' in moved
    assert f'{MOVED_NOTE}"""\n>>>>>>> after updating\n' in moved
    assert not (project / OLD_TEST).exists()


def test_the_platform_team_rolls_out_new_limits_with_its_data_file(
    template_1_1: Path, tmp_path: Path
) -> None:
    platform = TEMPLATE_ROOT / "examples" / "platform.yml"
    project = generate(template_1_1, tmp_path / "orders", data_file=platform)
    limits = project / "src" / PACKAGE / "db" / "database_limits.toml"
    assert "max_connections = 400\n" in limits.read_text()
    before = tree(project)

    # Another service moved onto the database: 370 others leave 27, this service needs 51.
    crowded = tmp_path / "platform-crowded.yml"
    crowded.write_text(
        re.sub(r"(?m)^other_consumers: \d+$", "other_consumers: 370", platform.read_text())
    )
    refused = copier("update", data_file=crowded, cwd=project, check=False)
    copy = copier(
        "copy",
        template=template_1_1,
        destination=tmp_path / "copy",
        vcs_ref="v1.1.0",
        data_file=crowded,
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 1
    assert last_line(refused) == last_line(copy)
    assert "- other_consumers 370). Fix:" in last_line(refused)
    assert tree(project) == before

    # The database grew instead: the update records the new limits and brings the release.
    bigger = tmp_path / "platform-bigger.yml"
    bigger.write_text(
        re.sub(r"(?m)^db_max_connections: \d+$", "db_max_connections: 800", platform.read_text())
    )
    copier("update", data_file=bigger, cwd=project)
    assert "max_connections = 800\n" in limits.read_text()
    assert (
        yaml.safe_load((project / ".copier-answers.yml").read_text())["db_max_connections"] == 800
    )
    assert_release_1_1_arrived(project)


def test_a_service_generated_from_0_1_0_updates_to_this_release(
    template_releases: Path, tmp_path: Path
) -> None:
    project = generate(template_releases, tmp_path / "orders", release="v0.1.0")
    package = project / "src" / PACKAGE
    assert (package / "db" / "topology.py").is_file()
    # What teams did on 0.1.0: an endpoint, a dependency, a smaller pool in the ConfigMap.
    edit(
        package / "app.py",
        replace_once(r"^router = APIRouter\(.*\)\n", r"\g<0>" + VERSION_ENDPOINT),
    )
    (project / "tests" / "test_version.py").write_text(VERSION_TEST)
    edit(
        project / "pyproject.toml",
        replace_once(r"^dependencies = \[\n", rf"\g<0>    {NEW_DEPENDENCY}\n"),
    )
    configmap = project / "deploy" / "k8s" / "configmap.yaml"
    edit(configmap, replace_once(r'^  POOL_SIZE: "5"$', '  POOL_SIZE: "4"'))
    commit(project, "our endpoint, orjson, a smaller pool")

    result = copier("update", cwd=project)

    assert f"Updating to template version {THIS_RELEASE[1:]}" in result.stderr
    assert unmerged(project) == []
    # The rendered snapshot (Python) is replaced by data; the rule and the loader of deploy/ are
    # poolwise's, a pinned dev dependency, and leave the service.
    assert not (package / "db" / "topology.py").exists()
    assert "\npool_size = 5\n" in (package / "db" / "topology.toml").read_text()
    assert not (package / "db" / "budget.py").exists()
    assert not (package / "db" / "deployed.py").exists()
    assert f'"poolwise=={THIS_RELEASE[1:]}"' in (project / "pyproject.toml").read_text()
    assert '@router.get("/version")' in (package / "app.py").read_text()
    assert NEW_DEPENDENCY in (project / "pyproject.toml").read_text()
    assert '  POOL_SIZE: "4"\n' in configmap.read_text()
    assert "minReadySeconds: 30" in (project / "deploy" / "k8s" / "deployment.yaml").read_text()
    assert_project_checks_pass(project)


def test_an_async_service_on_the_0_1_0_defaults_is_told_how_to_fit_the_rollout_term(
    template_releases: Path, tmp_path: Path
) -> None:
    project = generate(
        template_releases, tmp_path / "events", {"target": "k8s-async"}, release="v0.1.0"
    )
    before = tree(project)

    # 0.1.0 counted 4 pods x 20; with the pod still terminating in a rollout it is 5 x 20 > 97.
    refused = copier("update", cwd=project, check=False)
    assert refused.returncode == 1
    assert "(3 replicas_max + 1 max_surge + 1 terminating) x 1 workers_per_pod" in last_line(
        refused
    )
    assert "Fix: at 5 processes pool_size + max_overflow must be <= 19" in last_line(refused)
    assert tree(project) == before

    copier("update", answers={"pool_size": 8, "max_overflow": 8}, cwd=project)
    assert unmerged(project) == []
    assert '  POOL_SIZE: "8"\n' in (project / "deploy" / "k8s" / "configmap.yaml").read_text()
    assert_project_checks_pass(project)


# ------------------------------------------- every target, from each real release to this one

TARGETS = ["k8s-sync", "k8s-async", "lambda", "batch"]

RUNBOOK = """
## Runbook

Page #orders-oncall when a deploy fails the connection budget test.
"""

ORDER_MODEL = '''

class Order(Base):
    """An order: the team's own table."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    reference: Mapped[str] = mapped_column(String(40))
'''

# Named the way `alembic revision --autogenerate -m "create orders"` names it (alembic.ini).
ORDER_REVISION = "5c1e8a2f7d34"
ORDER_MIGRATION = f"src/{PACKAGE}/migrations/versions/{ORDER_REVISION}_create_orders.py"
ORDER_MIGRATION_TEXT = '''"""Create the orders table.

Revision ID: {revision}
Revises: {down_revision}
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "{revision}"
down_revision: str | None = "{down_revision}"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("orders")
'''

ORDERS_SYNC = '''"""Queries on the team's orders table."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Order


def count_orders(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Order)) or 0
'''

ORDERS_ASYNC = '''"""Queries on the team's orders table."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from .models import Order


async def count_orders(session: AsyncSession) -> int:
    return await session.scalar(select(func.count()).select_from(Order)) or 0
'''

ORDERS_ROUTE = '''

@router.get("/orders/count")
{asynchronous}def count_orders(session: SessionDep) -> dict[str, int]:
    """How many orders there are: the team's own endpoint."""
    return {{"orders": {awaited}orders.count_orders(session)}}
'''

ORDERS_ROUTE_TEST = f'''"""The team's own endpoint."""

from fastapi.testclient import TestClient

from {PACKAGE}.app import create_app
from {PACKAGE}.settings import Settings


def test_orders_are_counted(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get("/orders/count").json() == {{"orders": 0}}
'''

ORDERS_TEST = f'''"""The team's orders table and its query."""

from {PACKAGE}.db.engine import build_engine
from {PACKAGE}.db.schema import create_local_schema
from {PACKAGE}.db.session import make_session_factory, session_scope
from {PACKAGE}.models import Order
from {PACKAGE}.orders import count_orders
from {PACKAGE}.settings import Settings


def test_orders_are_counted(settings: Settings) -> None:
    engine = build_engine(settings)
    try:
        create_local_schema(engine)
        sessions = make_session_factory(engine)
        with session_scope(sessions) as session:
            session.add(Order(reference="A-1"))
        with session_scope(sessions) as session:
            assert count_orders(session) == 1
    finally:
        engine.dispose()
'''

# Lambda, 0.1.0: the handler dispatched on the event's keys.
HANDLER_BRANCH_0_1_0 = """\\g<0>        if "orders" in event:
            return {"statusCode": 200, "orders": orders.count_orders(session)}
"""
# Lambda, 0.2.0 on: one more HTTP API route.
COUNT_ORDERS_ROUTE = 'COUNT_ORDERS = "GET /orders/count"'
COUNT_ORDERS_FUNCTION = """def count_orders() -> Response:
    with session_scope(SessionFactory) as session:
        return respond(200, {"orders": orders.count_orders(session)})


"""
HANDLER_BRANCH = """\\g<1>if key == COUNT_ORDERS:
\\g<1>    return count_orders()
\\g<0>"""
JOB_STEP = """\\g<0>        with session_scope(sessions) as session:
            logger.info("shard %d/%d: %d orders", shard, shards, orders.count_orders(session))
"""
LOG_LEVEL = '  LOG_LEVEL: "INFO"\n'
SAM_LOG_LEVEL = '          LOG_LEVEL: "INFO"'
GITIGNORED = ".env\n"
TOOL_TABLE = """
[tool.coverage.run]
branch = true
"""
FIXTURE = """

@pytest.fixture
def order_reference() -> str:
    return "A-1"
"""
IMPORT_ORDERS = replace_once(r"^from \. import items", r"\g<0>, orders")
APP = f"src/{PACKAGE}/app.py"
HANDLER = f"src/{PACKAGE}/handler.py"
JOB = f"src/{PACKAGE}/job.py"
SAM_TEMPLATE = "deploy/lambda/template.yaml"
ORDERS = f"src/{PACKAGE}/orders.py"
ORDERS_TEST_FILE = "tests/test_orders.py"
ADDED_FILES = [ORDER_MIGRATION, ORDERS, ORDERS_TEST_FILE]
NOTES_FROM_THE_TEAM = (
    "## Notes from the team\n\nThis section is yours: poolwise releases never change it, so"
    " `copier update` keeps your notes.\n"
)
# Conflicts a team meets once, on its first update to THIS_RELEASE, besides README.md (the
# team's appended sections meet the "Notes from the team" section added at the same place).
# Each is in lines both the team and 0.2.0 changed; no later release can take it back.
FIRST_UPDATE_CONFLICTS: dict[str, dict[str, list[str]]] = {
    # k8s-sync 0.1.0 had this release's `from . import items` line, so the team's import merges.
    # This release replaced the SAM template's DATABASE_URL line, next to the team's variable.
    "v0.1.0": {"k8s-async": [APP], "lambda": [SAM_TEMPLATE, HANDLER]},
    # This release moved /metrics off the API router: app.py's `from . import` line changed.
    "v0.2.0": {"k8s-sync": [APP], "k8s-async": [APP], "lambda": [SAM_TEMPLATE]},
}


def newest_revision(project: Path) -> str:
    """The head of the release's migrations (each revises the one before: 0001, 0002, ...)."""
    versions = project / "src" / PACKAGE / "migrations" / "versions"
    return max(path.name.split("_")[0] for path in versions.glob("[0-9][0-9][0-9][0-9]_*.py"))


def appended_lines(target: str) -> dict[str, str]:
    """What teams append to the end of generated files, by file."""
    appended = {
        "README.md": RUNBOOK,
        f"src/{PACKAGE}/models.py": ORDER_MODEL,
        ".gitignore": GITIGNORED,
        "tests/conftest.py": FIXTURE,
        "pyproject.toml": TOOL_TABLE,
    }
    if target != "lambda":
        appended["deploy/k8s/configmap.yaml"] = LOG_LEVEL
    return appended


def edits_of_every_team(project: Path, target: str) -> None:
    """What teams do to a service on any target: lines at the ends of files, new files."""
    for name, lines in appended_lines(target).items():
        path = project / name
        path.write_text(path.read_text() + lines)
    migration = ORDER_MIGRATION_TEXT.format(
        revision=ORDER_REVISION, down_revision=newest_revision(project)
    )
    (project / ORDER_MIGRATION).write_text(migration)
    (project / ORDERS).write_text(ORDERS_ASYNC if target == "k8s-async" else ORDERS_SYNC)
    test = ORDERS_ROUTE_TEST if target.startswith("k8s") else ORDERS_TEST
    (project / ORDERS_TEST_FILE).write_text(test)


def edit_the_handler(project: Path, release: str) -> None:
    """A handler branch for the orders: an event key on 0.1.0, an HTTP API route since."""
    handler = project / HANDLER
    if "from . import items, orders" not in handler.read_text():
        edit(handler, IMPORT_ORDERS)
    if release == "v0.1.0":
        edit(
            handler,
            replace_once(
                r"^    with session_scope\(SessionFactory\) as session:\n", HANDLER_BRANCH_0_1_0
            ),
        )
        return
    edit(handler, replace_once(r"^READ_ITEM = .*\n", rf"\g<0>{COUNT_ORDERS_ROUTE}\n"))
    edit(
        handler,
        replace_once(r"in \(CREATE_ITEM, READ_ITEM\)", "in (CREATE_ITEM, READ_ITEM, COUNT_ORDERS)"),
    )
    edit(handler, replace_once(r"^@invocation_metrics", COUNT_ORDERS_FUNCTION + r"\g<0>"))
    edit(handler, replace_once(r"^( +)if key == CREATE_ITEM:\n", HANDLER_BRANCH))


def edits_of_the_target(project: Path, target: str, release: str) -> None:
    """The target's own edit: a route, a handler branch or a job step (and Lambda's setting)."""
    if target.startswith("k8s"):
        asynchronous = target == "k8s-async"
        route = ORDERS_ROUTE.format(
            asynchronous="async " if asynchronous else "", awaited="await " if asynchronous else ""
        )
        edit(project / APP, IMPORT_ORDERS)
        # After the router's last endpoint, where FastAPI's docs add one.
        last_endpoint = r"^(async )?def read_item\(.*\n(    .*\n|\n(?=    ))*"
        edit(project / APP, replace_once(last_endpoint, r"\g<0>" + route.lstrip("\n") + "\n\n"))
    elif target == "lambda":
        edit_the_handler(project, release)
        edit(
            project / SAM_TEMPLATE,
            replace_once(
                r'^          APPLICATION_NAME: "poolwise-service"\n', rf"\g<0>{SAM_LOG_LEVEL}\n"
            ),
        )
    else:
        edit(project / JOB, IMPORT_ORDERS)
        edit(
            project / JOB,
            replace_once(r"^        sessions = make_session_factory\(engine\)\n", JOB_STEP),
        )


def assert_the_target_edits_kept(project: Path, target: str) -> None:
    if target.startswith("k8s"):
        assert '@router.get("/orders/count")' in (project / APP).read_text()
    elif target == "lambda":
        handler = (project / HANDLER).read_text()
        assert f"\n{COUNT_ORDERS_ROUTE}\n" in handler
        assert "        if key == COUNT_ORDERS:\n" in handler
        assert f"\n{SAM_LOG_LEVEL}\n" in (project / SAM_TEMPLATE).read_text()
    else:
        assert "orders.count_orders(session)" in (project / JOB).read_text()


CONFLICT_BLOCK = re.compile(
    rf"^{CONFLICT_START}\n(.*?)^=======\n(.*?)^>>>>>>> after updating\n", re.MULTILINE | re.DOTALL
)


def take_sides(text: str, resolve: Callable[[str, str], str]) -> str:
    """``text`` with each conflict block replaced by ``resolve(ours, the release's)``."""
    return CONFLICT_BLOCK.sub(lambda block: resolve(block[1], block[2]), text)


def resolve_the_first_update(project: Path, target: str, release: str) -> None:
    """What a team does with FIRST_UPDATE_CONFLICTS, as the CHANGELOG says, then commits."""
    readme = project / "README.md"
    # The release's "Notes from the team" section, then what the team had appended.
    readme.write_text(take_sides(readme.read_text(), lambda ours, new: f"{new}\n{ours.lstrip()}"))
    if APP in FIRST_UPDATE_CONFLICTS[release].get(target, []):
        app = project / APP
        edit(app, lambda text: take_sides(text, lambda ours, new: new))
        edit(app, replace_once(r"^from \. import items$", "from . import items, orders"))
    if SAM_TEMPLATE in FIRST_UPDATE_CONFLICTS[release].get(target, []):
        # The team's variables stay; the DATABASE_URL line the release replaced goes.
        edit(
            project / SAM_TEMPLATE,
            lambda text: take_sides(
                text,
                lambda ours, new: (
                    "".join(
                        line
                        for line in ours.splitlines(keepends=True)
                        if not line.lstrip().startswith("DATABASE_URL:")
                    )
                    + new
                ),
            ),
        )
    if release == "v0.1.0" and target == "lambda":
        # 0.2.0 rewrote the handler for the HTTP API: the branch becomes one of its routes.
        edit(project / HANDLER, lambda text: take_sides(text, lambda ours, new: new))
        edit_the_handler(project, "v0.2.0")
    git(project, "add", "--all")
    if release == "v0.1.0":
        # 0.2.0's 0002 and the team's revision both revise 0001: one merge revision joins them.
        heads = run_checked(python("-m", "alembic", "heads"), project)
        assert sorted(line.split()[0] for line in heads.splitlines()) == ["0002", ORDER_REVISION]
        run_checked(python("-m", "alembic", "merge", "heads", "-m", "poolwise 0.2.0"), project)
    commit(project, f"poolwise: update to {THIS_RELEASE}")


@pytest.mark.parametrize("release", ["v0.1.0", "v0.2.0"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_service_of_every_target_updates_from_each_release_with_the_teams_edits(
    template_releases: Path, tmp_path: Path, target: str, release: str
) -> None:
    answers: dict[str, Any] = {"target": target}
    project = generate(template_releases, tmp_path / "orders", answers, release=release)
    edits_of_every_team(project, target)
    edits_of_the_target(project, target, release)
    commit(project, "our runbook, orders table, route, fixture and log level")
    ours = tree(project)

    update: dict[str, Any] = {}
    if target == "k8s-async" and release == "v0.1.0":
        # 0.2.0's rollout term: the 0.1.0 defaults no longer fit (CHANGELOG, Action needed).
        update = {"pool_size": 8, "max_overflow": 8}
    result = copier("update", answers=update, cwd=project)

    assert f"Updating to template version {THIS_RELEASE[1:]}" in result.stderr
    # Only where the team and a release changed the same lines, and each one only this once.
    conflicts = FIRST_UPDATE_CONFLICTS[release].get(target, [])
    assert unmerged(project) == ["README.md", *conflicts]
    readme = (project / "README.md").read_text()
    teams_side = [block[0].strip("\n") for block in CONFLICT_BLOCK.findall(readme)]
    assert teams_side == [RUNBOOK.strip("\n")]
    assert readme.endswith(f"{NOTES_FROM_THE_TEAM}>>>>>>> after updating\n")
    assert sh(["git", "grep", "-l", CONFLICT_START], project, check=False).stdout.split() == [
        "README.md",
        *conflicts,
    ]
    # Everything else the team added or appended merged, kept as it was.
    for name in ADDED_FILES:
        assert (project / name).read_bytes() == ours[name], name
    for name, appended in appended_lines(target).items():
        if name != "README.md":
            assert (project / name).read_text().endswith(appended), name

    resolve_the_first_update(project, target, release)

    readme = (project / "README.md").read_text()
    assert readme.endswith(NOTES_FROM_THE_TEAM + RUNBOOK)
    assert_the_target_edits_kept(project, target)
    output = run_checked(python("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"), project)
    assert " passed" in output


def test_a_0_2_0_service_keeps_other_consumers_or_moves_to_an_allocation(
    template_releases: Path, tmp_path: Path
) -> None:
    answers = {"db_max_connections": 100, "db_reserved_connections": 3, "other_consumers": 40}
    project = generate(template_releases, tmp_path / "orders", answers, release="v0.2.0")
    limits = project / "src" / PACKAGE / "db" / "database_limits.toml"
    recorded = project / ".copier-answers.yml"

    # Without an allocation the service keeps counting other_consumers, as 0.2.0 did.
    copier("update", cwd=project)
    assert unmerged(project) == []
    assert "\nother_consumers = 40\n" in limits.read_text()
    assert "\nallocation =" not in limits.read_text()
    assert yaml.safe_load(recorded.read_text())["other_consumers"] == 40
    commit(project, f"poolwise: update to {THIS_RELEASE}")

    # A team given its share moves to it: other_consumers is no longer asked nor written.
    copier("update", answers={"db_allocation": 55}, cwd=project)
    moved = yaml.safe_load(recorded.read_text())
    assert (moved["db_allocation"], "other_consumers" in moved) == (55, False)
    assert "\nallocation = 55\n" in limits.read_text()
    assert "other_consumers =" not in limits.read_text()
    budget_test = run_checked(
        python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_connection_budget.py"),
        project,
    )
    assert " passed" in budget_test and "failed" not in budget_test
    table = run_checked(python("-m", "poolwise", "budget"), project / "src")
    assert "= 51 <= allocation 55 (db/database_limits.toml)" in table
    commit(project, "poolwise: our allocation")

    # The platform file's db_allocations owns the number: a new share there replaces the
    # recorded one on the next update with the file.
    platform = tmp_path / "platform.yml"
    platform.write_text(
        "db_max_connections: 100\ndb_reserved_connections: 3\n"
        "db_allocations: {poolwise-service: 60, search-api: 30}\n"
    )
    copier("update", data_file=platform, cwd=project)
    assert yaml.safe_load(recorded.read_text())["db_allocation"] == 60
    assert "\nallocation = 60\n" in limits.read_text()
    # No service carries another's numbers: the mapping itself is not recorded.
    assert "search-api" not in recorded.read_text() + limits.read_text()
    assert_project_checks_pass(project)
