"""`copier update` carries template fixes into a generated service and keeps the team's edits.

Each test works on a throwaway git copy of this template with its own release tags:

    v1.0.0  the template as it is in this checkout (working tree, uncommitted files included)
    v1.1.0  a fix in the engine module and a new module with its test
    v1.2.0  (separate copy) tests/test_engine_profile.py moves to tests/db/, with a change, and a
            `_migrations` entry that carries the project's edits to the new path

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
# main at the 0.1.0 release: services generated from it must update to this checkout.
RELEASE_0_1_0 = "639afbe"

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
    commit(repo, "engine: fail a connect in 2 s; pool_status()", tag="v1.1.0")


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
def template_0_1_0_and_this(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 0.1.0 release (main at RELEASE_0_1_0) as v0.1.0, this checkout as v0.2.0."""
    found = sh(["git", "cat-file", "-e", f"{RELEASE_0_1_0}^{{commit}}"], TEMPLATE_ROOT, False)
    assert found.returncode == 0, (
        f"commit {RELEASE_0_1_0} (release 0.1.0) is not in this clone's history; clone the"
        " repository with its history (not --depth 1) to run the update tests"
    )
    repo = tmp_path_factory.mktemp("poolwise-0.1.0") / "poolwise"
    repo.mkdir()
    subprocess.run(
        f"git archive --format=tar {RELEASE_0_1_0} {' '.join(TEMPLATE_PATHS)} | tar -x -C {repo}",
        shell=True,
        cwd=TEMPLATE_ROOT,
        check=True,
        timeout=120,
    )
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit(repo, "poolwise 0.1.0", tag="v0.1.0")
    for name in TEMPLATE_PATHS:
        path = repo / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    copy_working_tree(repo)
    commit(repo, "poolwise 0.2.0", tag="v0.2.0")
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
    commit(project, "our endpoint, a smaller pool, orjson")


def assert_team_edits_kept(project: Path, engine_profile_test: str = OLD_TEST) -> None:
    package = project / "src" / PACKAGE
    assert '@router.get("/version")' in (package / "app.py").read_text()
    assert (project / "tests" / "test_version.py").read_text() == VERSION_TEST
    assert "\npool_size = 4\n" in (package / "db" / "topology.toml").read_text()
    assert '  POOL_SIZE: "4"\n' in (project / "deploy" / "k8s" / "configmap.yaml").read_text()
    assert "    assert pool.size() == 4\n" in (project / engine_profile_test).read_text()
    assert NEW_DEPENDENCY in (project / "pyproject.toml").read_text()


def assert_release_1_1_arrived(project: Path) -> None:
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
    template_0_1_0_and_this: Path, tmp_path: Path
) -> None:
    project = generate(template_0_1_0_and_this, tmp_path / "orders", release="v0.1.0")
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

    assert "Updating to template version 0.2.0" in result.stderr
    assert unmerged(project) == []
    # The rendered snapshot (Python) is replaced by data and the loader of deploy/.
    assert not (package / "db" / "topology.py").exists()
    assert "\npool_size = 5\n" in (package / "db" / "topology.toml").read_text()
    assert (package / "db" / "deployed.py").is_file()
    assert '@router.get("/version")' in (package / "app.py").read_text()
    assert NEW_DEPENDENCY in (project / "pyproject.toml").read_text()
    assert '  POOL_SIZE: "4"\n' in configmap.read_text()
    assert "minReadySeconds: 30" in (project / "deploy" / "k8s" / "deployment.yaml").read_text()
    assert_project_checks_pass(project)


def test_an_async_service_on_the_0_1_0_defaults_is_told_how_to_fit_the_rollout_term(
    template_0_1_0_and_this: Path, tmp_path: Path
) -> None:
    project = generate(
        template_0_1_0_and_this, tmp_path / "events", {"target": "k8s-async"}, release="v0.1.0"
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
