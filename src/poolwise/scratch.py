"""Scratch copies for `poolwise update-plan`: nothing here writes to a team's repository.

A service's repository is cloned into a temporary directory and updated there. The template is
cloned once per source (`_src_path`) into the same directory, and the release is resolved to one
commit there, so every service renders the same commit from a local copy: each `copier update`
is pointed at that copy by git's `url.<copy>.insteadOf=<_src_path>`, which leaves `_src_path` in
the updated answers exactly as the team's file has it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .services import InputError

# Copier's temporary repositories commit with its own identity; a commit of `update-apply`
# uses the caller's git identity, or this one where none is configured (a CI runner).
FALLBACK_IDENTITY = {
    "GIT_AUTHOR_NAME": "poolwise update-apply",
    "GIT_AUTHOR_EMAIL": "poolwise@localhost",
    "GIT_COMMITTER_NAME": "poolwise update-apply",
    "GIT_COMMITTER_EMAIL": "poolwise@localhost",
}
CONFLICT_START = re.compile(r"^<<<<<<< ")
CONFLICT_MIDDLE = "======="
CONFLICT_END = re.compile(r"^>>>>>>> ")
# Lines of each side of a conflicting hunk shown in the plan.
HUNK_LINES = 3


class GitFailed(InputError):
    """A git command on a scratch copy failed; the message names the command and its error."""


def run_git(
    cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """A git command, its exit code left to the caller (who names what a failure means)."""
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )


def git(cwd: Path, *args: str, env: dict[str, str] | None = None, stdin: str = "") -> str:
    result = run_git(cwd, *args, env=env, stdin=stdin)
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise GitFailed(f"{cwd}: git {' '.join(args)} failed ({error})")
    return result.stdout


def copier_command() -> list[str]:
    """copier installed beside poolwise, else the one on PATH; neither is exit 2."""
    if importlib.util.find_spec("copier") is not None:
        import sys

        return [sys.executable, "-m", "copier"]
    found = shutil.which("copier")
    if found is None:
        raise InputError(
            "copier is not installed: update-plan runs `copier update`; install it beside"
            " poolwise (pip install 'copier>=9.8') or on PATH (pipx install copier)"
        )
    return [found]


@dataclass
class Template:
    """One template source, cloned once, with the release resolved to a commit in it."""

    source: str
    copy: Path
    commit: str

    def git_config(self) -> dict[str, str]:
        """Environment that makes git fetch `source` from the local copy (git >= 2.31)."""
        env = {}
        urls = git_urls(self.source)
        for index, url in enumerate(urls):
            env[f"GIT_CONFIG_KEY_{index}"] = f"url.{self.copy}.insteadOf"
            env[f"GIT_CONFIG_VALUE_{index}"] = url
        return {"GIT_CONFIG_COUNT": str(len(urls)), **env}


def git_urls(source: str) -> list[str]:
    """`_src_path` as written and as copier hands it to git (its gh:/gl: aliases, https + .git)."""
    urls = [source]
    for alias, host in (("gh:", "https://github.com/"), ("gl:", "https://gitlab.com/")):
        if source.startswith(alias):
            path = source.removeprefix(alias).lstrip("/")
            urls.append(host + (path if path.endswith(".git") else path + ".git"))
    if source.startswith("git+"):
        urls.append(source.removeprefix("git+"))
    if source.startswith("https://") and not source.endswith(".git"):
        urls.append(source + ".git")
    return urls


def clone_template(source: str, ref: str, destination: Path) -> Template:
    """A bare clone of the template (tags included) and REF's commit in it."""
    result = run_git(
        Path.cwd(),  # a relative template path is resolved where the command runs
        "clone",
        "--quiet",
        "--bare",
        "--",
        git_urls(source)[-1],
        str(destination),
    )
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise InputError(f"the template {source} cannot be cloned ({error})")
    resolved = run_git(
        destination, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"
    )
    if resolved.returncode != 0:
        raise InputError(
            f"--to {ref}: no such tag, branch or commit in the template {source}; name a release"
            " tag (git -C <template> tag --list 'v*')"
        )
    return Template(source, destination, resolved.stdout.strip())


@dataclass
class Checkout:
    """A service's repository cloned into scratch: `root` is the service inside it."""

    repository: Path
    clone: Path
    root: Path
    head: str


def repository_of(service: Path) -> tuple[Path, Path]:
    """The git top level holding a service, and the service's path inside it."""
    result = run_git(service, "rev-parse", "--show-toplevel")
    if result.returncode != 0:
        raise InputError(
            f"{service}: not in a git repository; copier update needs the service committed"
            " in git (git init && git add -A && git commit)"
        )
    top = Path(result.stdout.strip()).resolve()
    return top, service.resolve().relative_to(top)


def clone_service(service: Path, destination: Path) -> Checkout:
    """The service's repository at its HEAD, cloned (the team's branch and files untouched)."""
    top, inside = repository_of(service)
    head = run_git(top, "rev-parse", "--verify", "--quiet", "HEAD")
    if head.returncode != 0:
        raise InputError(f"{top}: the repository has no commit; commit the service first")
    git(destination.parent, "clone", "--quiet", "--", str(top), str(destination))
    return Checkout(top, destination, destination / inside, head.stdout.strip())


def changed_files(checkout: Checkout) -> list[str]:
    """Files the update changed, added or deleted in the service, relative to the service."""
    listed = git(checkout.root, "status", "--porcelain", "-z", "--untracked-files=all", ".")
    names = []
    entries = iter(listed.split("\0"))
    for entry in entries:
        if not entry:
            continue
        status, name = entry[:2], entry[3:]
        if "R" in status or "C" in status:
            next(entries, None)  # the rename's source follows its destination
        names.append(name)
    prefix = checkout.root.relative_to(checkout.clone).as_posix()
    strip = "" if prefix == "." else prefix + "/"
    return sorted(name.removeprefix(strip) for name in names)


def unmerged_files(checkout: Checkout) -> list[str]:
    """The README's conflict check: the files copier left unmerged."""
    listed = git(checkout.root, "diff", "--name-only", "--relative", "--diff-filter=U", "-z")
    return sorted(filter(None, listed.split("\0")))


def conflict_hunks(path: Path) -> list[tuple[list[str], list[str]]]:
    """Each conflict block's first lines: the team's side, then the release's."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hunks = []
    ours: list[str] | None = None
    theirs: list[str] | None = None
    for line in lines:
        if CONFLICT_START.match(line):
            ours, theirs = [], None
        elif ours is not None and theirs is None and line == CONFLICT_MIDDLE:
            theirs = []
        elif theirs is not None and CONFLICT_END.match(line):
            hunks.append((ours[:HUNK_LINES], theirs[:HUNK_LINES]))
            ours = theirs = None
        elif theirs is not None:
            theirs.append(line)
        elif ours is not None:
            ours.append(line)
    return hunks
