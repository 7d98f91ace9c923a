"""The one place the template's tests render a project, run copier, and run a project's tools.

Three ways to render, each for its reason:

* :func:`render_with_copie` - pytest-copie, the project's standard rendering path (the ``render``
  fixture of tests/conftest.py and the refusal tests);
* :func:`render` - copier's Python API, for code that renders outside a test's fixtures (the
  realdb tier, session-wide caches, the benchmarks) or asserts on copier's own exceptions;
* :func:`copier_cli` - the ``copier`` command as a team types it, for exit codes, messages on
  stderr, prompts in a terminal, and ``copier update``.

Every subprocess of a rendered project (or of copier) gets :func:`clean_env`: what the test run
put in this process's environment must not leak into the project under test. It does get this
checkout's `poolwise`, which a project's dev dependencies pin to this release: the shared
virtualenv stands for the project's own, and this checkout is the release under test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import copier

TEMPLATE_ROOT = Path(__file__).resolve().parent.parent
# The `poolwise` package of this checkout, importable as a project's dev install makes it.
POOLWISE_SRC = TEMPLATE_ROOT / "src"
# POOLWISE_TEST_COPIER=/path/to/bin/copier runs the CLI tests with another copier, for example the
# _min_copier_version of copier.yml in its own virtualenv.
COPIER_OVERRIDE = "POOLWISE_TEST_COPIER"
# Leftover Jinja in a rendered file means an undefined variable rendered as nothing or a tag
# that was not closed; the rendered project must contain none.
JINJA_LEFTOVER = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")
# No exception for CloudFormation dynamic references ({{resolve:...}}): none is rendered, since a
# resolved secret would land in the functions' configuration.


# ----------------------------------------------------------------------------- environment


def clean_env(
    *, without_pg: bool = False, with_poolwise: bool = True, **overrides: str
) -> dict[str, str]:
    """This process's environment without what the test run put there, plus ``overrides``.

    PYTEST_* variables (PYTEST_ADDOPTS, PYTEST_XDIST_WORKER, ...) would change how a rendered
    project's own pytest runs, and PYTHONPATH would make it import something other than its
    own src/; callers that need a PYTHONPATH pass one. ``with_poolwise`` appends this
    checkout's `poolwise` (POOLWISE_SRC) to it, the dev dependency a project's tests import;
    what installs a project as its image does passes False. ``without_pg`` also drops libpq's
    PG* variables, for processes that connect to a database: a developer's PGHOST or PGUSER
    must not redirect them away from the DATABASE_URL the test gives.
    """
    prefixes = ("PYTEST_", "PG") if without_pg else ("PYTEST_",)
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env.pop("PYTHONPATH", None)
    env.update(overrides)
    if with_poolwise:
        paths = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        env["PYTHONPATH"] = os.pathsep.join([*paths, str(POOLWISE_SRC)])
    return env


# ----------------------------------------------------------------------------- rendering


def render(
    destination: Path,
    answers: Mapping[str, Any],
    *,
    vcs_ref: str = "HEAD",
    template: Path = TEMPLATE_ROOT,
    **options: Any,
) -> Path:
    """Render ``answers`` with copier's Python API and return the project directory.

    HEAD of this checkout renders the working tree, uncommitted changes included, which is what
    is under test. No --trust (``unsafe=False``), as a team renders. copier's own exceptions
    propagate, so a test can assert on a refusal with ``pytest.raises``.
    """
    copier.run_copy(
        src_path=str(template),
        dst_path=destination,
        data=dict(answers),
        defaults=True,
        unsafe=False,
        vcs_ref=vcs_ref,
        quiet=True,
        **options,
    )
    return Path(destination)


def render_with_copie(copie: Any, answers: Mapping[str, Any]) -> Path:
    """Render ``answers`` with pytest-copie (the project's standard) and return the project.

    pytest-copie catches what copier raised and returns it; it is raised again here, with the
    answers as a note, so a failed rendering fails where it happened and a refusal can be
    asserted on with ``pytest.raises`` like :func:`render`'s.
    """
    result = copie.copy(extra_answers=dict(answers))
    if result.exception is not None:
        result.exception.add_note(f"rendering {dict(answers)} with pytest-copie")
        raise result.exception
    assert result.project_dir is not None, f"pytest-copie rendered {dict(answers)} nowhere"
    return Path(result.project_dir)


# ----------------------------------------------------------------------------- the copier CLI


def data_args(answers: Mapping[str, Any]) -> list[str]:
    """The answers as copier's repeated --data options."""
    return [arg for key, value in answers.items() for arg in ("--data", f"{key}={value}")]


def copier_program() -> list[str]:
    """The copier command: POOLWISE_TEST_COPIER when set, else this interpreter's copier."""
    override = os.environ.get(COPIER_OVERRIDE)
    return [override] if override else [sys.executable, "-m", "copier"]


def copier_argv(
    command: Literal["copy", "update"],
    *args: str,
    destination: Path | None = None,
    template: Path = TEMPLATE_ROOT,
    answers: Mapping[str, Any] | None = None,
    data_file: Path | None = None,
    vcs_ref: str | None = None,
    defaults: bool = True,
) -> list[str]:
    """The command line of ``copier copy`` or ``copier update``, as a team would type it.

    A copy renders HEAD of ``template`` unless given another ref (copier's own default is the
    newest release tag, which is not what is under test); an update keeps copier's choice
    unless given one. ``args`` are further options (``--trust``, raw ``--data``, ...). An
    update without ``destination`` updates the project in its working directory.
    """
    if command == "copy":
        vcs_ref = vcs_ref or "HEAD"
    argv = [*copier_program(), command]
    if defaults:
        argv.append("--defaults")
    if vcs_ref is not None:
        argv += ["--vcs-ref", vcs_ref]
    argv += data_args(answers or {})
    if data_file is not None:
        argv += ["--data-file", str(data_file)]
    argv += args
    if command == "copy":
        argv.append(str(template))
    if destination is not None:
        argv.append(str(destination))
    return argv


def copier_cli(
    command: Literal["copy", "update"],
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    **options: Any,
) -> subprocess.CompletedProcess[str]:
    """Run copier as a subprocess (:func:`copier_argv`) so the exit code and stderr are real.

    ``env`` adds variables (a git identity, ...) to :func:`clean_env`. The result is returned
    whatever the exit code: refusals are what many callers assert on (see :func:`succeeded`).
    """
    return subprocess.run(
        copier_argv(command, *args, **options),
        cwd=cwd,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def copier_copy(
    destination: Path, *args: str, timeout: float = 120, **options: Any
) -> subprocess.CompletedProcess[str]:
    """`copier copy --defaults` as a team runs it: no --trust, HEAD of this checkout."""
    return copier_cli("copy", *args, destination=destination, timeout=timeout, **options)


# ----------------------------------------------------------------------------- a project's tools


def succeeded(
    result: subprocess.CompletedProcess[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``result``, after asserting it exited 0; the message shows the ends of its output."""
    command = result.args if isinstance(result.args, str) else " ".join(map(str, result.args))
    where = f" in {cwd}" if cwd is not None else ""
    assert result.returncode == 0, (
        f"{command} failed{where} (exit {result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def run(
    args: list[str], cwd: Path, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command of the shared environment (this interpreter's venv) in a rendered project.

    ``env`` adds variables (a git identity, ...) to :func:`clean_env`.
    """
    return subprocess.run(
        args,
        cwd=cwd,
        env=clean_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_checked(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """:func:`run`, asserting success; its standard output."""
    return succeeded(run(args, cwd, timeout), cwd).stdout


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def jinja_leftovers(project: Path) -> list[str]:
    found = []
    for path in sorted(project.rglob("*")):
        if path.is_dir() or ".git" in path.parts:
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if JINJA_LEFTOVER.search(line):
                found.append(f"{path.relative_to(project)}:{number}: {line.strip()}")
    return found
