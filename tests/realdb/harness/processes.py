"""Finding the server binaries and running them: ports, the service user, process trees.

Why the privilege juggling: ``initdb``, ``postgres`` and ``pgbouncer`` refuse to run as
root, and CI (and most dev containers here) run as root. So when ``euid == 0`` every
server command is run as the OS user ``postgres`` and the temp directory is chowned to it.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

SERVICE_USER = "postgres"
"""OS user the servers run as when we are root (created by ``apt-get install postgresql``)."""

HOST = "127.0.0.1"
ADMIN_APP_NAME = "poolwise-harness-admin"
SAMPLER_APP_NAME = "poolwise-harness-sampler"
BOUNCER_PROBE_APP_NAME = "poolwise-harness-bouncer-probe"

# Generous but finite: a loaded CI box can take a few seconds to start PostgreSQL.
READY_TIMEOUT_S = 30.0
_POLL_S = 0.05
_PG_BIN_TOOLS = ("initdb", "pg_ctl", "postgres")


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,): prefer the newest installed major version.
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


def find_pg_bin() -> Path | None:
    """Directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    Looks at ``$PATH`` first (so a developer's own build wins), then the Debian layout
    ``/usr/lib/postgresql/*/bin`` (not on ``$PATH`` by design), newest version first.
    """
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    for directory in candidates:
        if all(_is_exe(directory / tool) for tool in _PG_BIN_TOOLS):
            return directory
    return None


def find_pgbouncer() -> Path | None:
    """The ``pgbouncer`` executable, or None (Debian puts it in /usr/sbin, off a user's PATH)."""
    on_path = shutil.which("pgbouncer")
    candidates = [Path(on_path)] if on_path else []
    candidates += [Path("/usr/sbin/pgbouncer"), Path("/usr/local/sbin/pgbouncer")]
    return next((c for c in candidates if _is_exe(c)), None)


def missing_requirements(*, pgbouncer: bool = False) -> str | None:
    """Why this machine cannot run the harness, or None if it can."""
    if find_pg_bin() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install e.g. `apt-get install postgresql`"
        )
    if pgbouncer and find_pgbouncer() is None:
        return "pgbouncer not found on PATH or in /usr/sbin; install `apt-get install pgbouncer`"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return f"running as root but OS user {SERVICE_USER!r} (to run the servers) is missing"
    return None


def _service_ids() -> tuple[int, int] | None:
    """(uid, gid) to drop to, or None when we are not root and run servers as ourselves."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam(SERVICE_USER)
    return pw.pw_uid, pw.pw_gid


def _as_service_user(argv: list[str]) -> list[str]:
    ids = _service_ids()
    if ids is None:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv:
        # Preferred: setpriv exec()s, so a Popen's pid *is* the server's pid and our
        # signals reach it directly. runuser instead stays as a parent process.
        return [setpriv, f"--reuid={ids[0]}", f"--regid={ids[1]}", "--init-groups", "--", *argv]
    return ["runuser", "-u", SERVICE_USER, "--", *argv]


def _server_env(home: Path) -> dict[str, str]:
    # Drop PG* variables (PGDATA, PGPORT, ...) so the developer's shell cannot redirect
    # pg_ctl/initdb, and give the service user a HOME it can actually read.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME=str(home), LC_ALL="C", LANG="C")
    return env


def _make_owned_tempdir(prefix: str, base_dir: Path | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    _chown_to_service(path)
    return path


def _chown_to_service(path: Path) -> None:
    ids = _service_ids()
    if ids is not None:
        os.chown(path, *ids)


def _write_owned(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)
    _chown_to_service(path)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process.

    Why /proc: a postmaster is re-parented to PID 1 when pg_ctl exits, and a container's PID 1
    may never reap it, so ``os.kill(pid, 0)`` would still "see" a zombie.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. a postmaster's backends), read from /proc."""
    children: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _like_prefix(prefix: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


class Started:
    """`with server:` starts it and stops it however the block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
