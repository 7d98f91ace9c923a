"""README's release-tags command recreates the tags a clone came without, from CHANGELOG.md.

Git tags do not travel with every copy of this repository, and every release ref the README
documents (`copier update`, `--vcs-ref v0.2.0`, `pip install ...@v0.2.0`) needs them. The
command is taken from README.md as written and run with bash in a `git clone --no-tags` of this
checkout, whose CHANGELOG.md is the one in the working tree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rendering import TEMPLATE_ROOT, run, succeeded

# The commits main was at when each release was made; CHANGELOG.md must name the same ones.
RELEASES = {
    "v0.1.0": "639afbeee22bcd4a7c3507e7528e524e08800785",
    "v0.2.0": "013d1ed8f0545caf2f986be4f0b2b23cd68780b2",
}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "poolwise test",
    "GIT_AUTHOR_EMAIL": "test@poolwise.invalid",
    "GIT_COMMITTER_NAME": "poolwise test",
    "GIT_COMMITTER_EMAIL": "test@poolwise.invalid",
}


def readme_command() -> str:
    """The README's one bash block that creates tags from CHANGELOG.md."""
    blocks = re.findall(
        r"^```bash\n(.*?)^```$", (TEMPLATE_ROOT / "README.md").read_text(), re.M | re.S
    )
    found = [block for block in blocks if "CHANGELOG.md" in block and "git tag -a" in block]
    assert len(found) == 1, "README.md has no (or more than one) release-tags command"
    return found[0]


def git(clone: Path, *args: str) -> str:
    return succeeded(run(["git", *args], clone, env=GIT_IDENTITY), clone).stdout


def tags(clone: Path) -> dict[str, tuple[str, str]]:
    """Each tag's object type and the commit it points at."""
    listed = git(clone, "for-each-ref", "refs/tags", "--format=%(refname:short) %(objecttype)")
    return {
        name: (kind, git(clone, "rev-parse", f"{name}^{{commit}}").strip())
        for name, kind in (line.split() for line in listed.splitlines())
    }


def run_command(clone: Path) -> subprocess.CompletedProcess[str]:
    return run(["bash", "-c", readme_command()], clone, env=GIT_IDENTITY)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clone of this repository without tags, with this working tree's CHANGELOG.md."""
    for commit in RELEASES.values():
        found = run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], TEMPLATE_ROOT)
        assert found.returncode == 0, (
            f"commit {commit} (a release) is not in this clone's history; clone the repository"
            " with its history (not --depth 1) to run this test"
        )
    clone = tmp_path / "poolwise"
    git(tmp_path, "clone", "--quiet", "--no-tags", str(TEMPLATE_ROOT), str(clone))
    shutil.copy2(TEMPLATE_ROOT / "CHANGELOG.md", clone / "CHANGELOG.md")
    assert tags(clone) == {}
    return clone


def test_the_command_creates_every_release_tag_at_its_commit_and_is_idempotent(
    clone: Path,
) -> None:
    first = run_command(clone)

    assert first.returncode == 0, first.stderr
    created = tags(clone)
    assert created == {tag: ("tag", commit) for tag, commit in RELEASES.items()}
    assert sorted(first.stdout.splitlines()) == [
        f"created {tag} at {commit}" for tag, commit in sorted(RELEASES.items())
    ]
    objects = git(clone, "for-each-ref", "refs/tags", "--format=%(refname) %(objectname)")

    second = run_command(clone)

    assert second.returncode == 0, second.stderr
    assert second.stdout == ""
    assert git(clone, "for-each-ref", "refs/tags", "--format=%(refname) %(objectname)") == objects


def test_a_tag_at_another_commit_is_refused_and_left_alone(clone: Path) -> None:
    head = git(clone, "rev-parse", "HEAD").strip()
    git(clone, "tag", "v0.2.0", head)

    result = run_command(clone)

    assert result.returncode == 1
    assert (
        f"v0.2.0 is at {head}, CHANGELOG.md says {RELEASES['v0.2.0']}: left alone" in result.stderr
    )
    assert tags(clone)["v0.2.0"] == ("commit", head)
