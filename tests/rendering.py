"""Helpers for the template tests: run a rendered project's own tools, scan its files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TEMPLATE_ROOT = Path(__file__).resolve().parent.parent
# Leftover Jinja in a rendered file means an undefined variable rendered as nothing or a tag
# that was not closed; the rendered project must contain none.
JINJA_LEFTOVER = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")
# CloudFormation dynamic references ({{resolve:secretsmanager:...}}) are meant to be rendered.
CLOUDFORMATION_DYNAMIC_REFERENCE = re.compile(r"\{\{resolve:.+?\}\}")


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command of the shared environment (this interpreter's venv) in a rendered project."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_checked(args: list[str], cwd: Path, timeout: float = 300) -> str:
    result = run(args, cwd, timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed in {cwd} (exit {result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def jinja_leftovers(project: Path) -> list[str]:
    found = []
    for path in sorted(project.rglob("*")):
        if path.is_dir() or ".git" in path.parts:
            continue
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if JINJA_LEFTOVER.search(CLOUDFORMATION_DYNAMIC_REFERENCE.sub("", line)):
                found.append(f"{path.relative_to(project)}:{number}: {line.strip()}")
    return found


def copier_copy(destination: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`copier copy --defaults` as a team runs it: no --trust, HEAD of this checkout."""
    command = [sys.executable, "-m", "copier", "copy", "--defaults", "--vcs-ref", "HEAD", *args]
    return subprocess.run(
        [*command, str(TEMPLATE_ROOT), str(destination)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def data_args(answers: dict) -> list[str]:
    """The answers as copier's repeated --data options."""
    return [arg for key, value in answers.items() for arg in ("--data", f"{key}={value}")]
