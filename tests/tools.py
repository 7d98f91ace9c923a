"""Tools the suite needs besides its pip packages: found, or the test skipped with the reason.

README.md ("What makes the suite complete") lists them. A missing one skips the tests that need
it, with the reason in the `-ra` summary, except under `CI=true`, where a skipped check would
look green while checking nothing, so the test fails instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Debian installs pgbouncer in /usr/sbin, which is not on an ordinary user's PATH.
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    candidates = (Path(directory) / name for directory in SYSTEM_DIRS)
    return next((str(path) for path in candidates if os.access(path, os.X_OK)), None)


def require(name: str, needed_for: str, install: str) -> str:
    """The path of `name`; otherwise skip (fail under CI) saying what is not checked and why."""
    found = find(name)
    if found is not None:
        return found
    message = f"{name} is not installed, so {needed_for} is not checked; {install}"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def kubectl(needed_for: str) -> str:
    return require("kubectl", needed_for, "install it: https://kubernetes.io/docs/tasks/tools/")


def promtool(needed_for: str) -> str:
    return require(
        "promtool", needed_for, "install Debian's prometheus package (apt-get install prometheus)"
    )


def prometheus(needed_for: str) -> str:
    return require(
        "prometheus", needed_for, "install Debian's prometheus package (apt-get install prometheus)"
    )
