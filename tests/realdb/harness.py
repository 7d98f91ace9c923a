"""Real PostgreSQL + PgBouncer processes for the ``realdb`` test tier (no mocks).

Every server is a throw-away instance: a fresh temporary directory, ``127.0.0.1`` only,
free ports picked at runtime, no Unix-domain sockets, and everything removed on stop.

Why the privilege juggling: ``initdb``, ``postgres`` and ``pgbouncer`` refuse to run as
root, and CI (and most dev containers here) run as root. So when ``euid == 0`` every
server command is run as the OS user ``postgres`` and the temp directory is chowned to it.

PgBouncer findings (checked against PgBouncer 1.18.0 with PostgreSQL 15):

* ``application_name`` is a *tracked* startup parameter, not an ignored one: PgBouncer
  remembers each client's value and, whenever it links a server connection to that client
  (first query of the session in session mode, every transaction in transaction mode), sends
  ``SET application_name`` if the server's value differs. So the client's name does show up
  in ``pg_stat_activity`` through both pool modes. ``application_name_add_host`` is set to 0
  (the default) so the name is not suffixed with `` - 127.0.0.1:PORT``.
* PgBouncer's own server login sends no application_name (the server shows ``''``), and a
  client that has only logged in is not bound to any server connection yet.
* After the client is done, transaction mode leaves the idle server connection with the name
  of the last client that used it; session mode runs ``DISCARD ALL`` on release, which resets
  it to ``''``. Counting by ``application_name`` therefore counts the server connections that
  client is holding (session) or has touched and are still pooled (transaction).
* With default settings psycopg (libpq) and asyncpg only send startup parameters 1.18
  accepts (user, database, application_name, client_encoding). Anything else is refused
  ("unsupported startup parameter"), e.g. asyncpg ``server_settings={"extra_float_digits":
  ...}`` (JDBC sends it too), so ``extra_float_digits`` is in ``ignore_startup_parameters``.
  libpq's ``options="-c ..."`` is refused as well; it is deliberately *not* ignored, since
  silently dropping it would hide settings a test believes it applied.
* Auth: the userlist holds the role's SCRAM secret copied verbatim from ``pg_authid``.
  PgBouncer (>= 1.14) then authenticates clients with SCRAM and re-uses the client's proof
  to log into PostgreSQL ("SCRAM pass-through"); that only works because the secret is
  byte-identical (same salt/iterations) to the server's, hence the copy.
* 1.18 does not support protocol-level prepared statements in transaction mode, so asyncpg
  needs ``statement_cache_size=0`` there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import psycopg
from psycopg import sql

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


# --------------------------------------------------------------------------- discovery


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


# --------------------------------------------------------------------------- process helpers


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (callers retry on the small reuse race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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


# --------------------------------------------------------------------------- PostgreSQL


class PostgresCluster:
    """A private PostgreSQL cluster on 127.0.0.1 with role/db ``app`` (password auth).

    ``pg_hba.conf`` only allows ``host ... 127.0.0.1/32 scram-sha-256``: password auth over
    TCP is what PgBouncer must pass through, so the direct path is tested the same way.
    """

    def __init__(
        self,
        max_connections: int = 40,
        *,
        app_user: str = "app",
        app_password: str = "secret",
        app_db: str = "app",
        base_dir: Path | None = None,
        pg_bin: Path | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.host = HOST
        self.port = 0
        self.superuser = SERVICE_USER
        self.app_user = app_user
        self.app_password = app_password
        self.app_db = app_db
        self._superuser_password = secrets.token_urlsafe(18)
        self._base_dir = base_dir
        self._pg_bin = pg_bin
        self._settings = settings or {}
        self.tmpdir: Path | None = None
        self._running = False

    # -- paths
    @property
    def data_dir(self) -> Path:
        assert self.tmpdir is not None, "cluster not started"
        return self.tmpdir / "data"

    @property
    def log_file(self) -> Path:
        assert self.tmpdir is not None, "cluster not started"
        return self.tmpdir / "postgres.log"

    @property
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError, AssertionError):
            return None

    # -- lifecycle
    def start(self) -> Self:
        """initdb, start on a free port, create role + database ``app``."""
        if self._running:
            return self
        bin_dir = self._pg_bin or find_pg_bin()
        if bin_dir is None:
            raise RuntimeError(missing_requirements() or "PostgreSQL binaries not found")
        self._bin = bin_dir
        # Registered before anything is spawned so a crash mid-start still cleans up.
        atexit.register(self.stop)
        try:
            self.tmpdir = _make_owned_tempdir("poolwise-pg-", self._base_dir)
            self._initdb()
            self._start_on_free_port()
            self._running = True
            self._create_app_role_and_db()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL) and delete the temp dir.

        Idempotent and never raises for an already-stopped cluster.
        """
        atexit.unregister(self.stop)
        if self.tmpdir is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            pid = self.postmaster_pid
            for mode in ("fast", "immediate"):
                if self._pg_ctl("stop", "-m", mode, "-t", "15", check=False).returncode == 0:
                    break
            else:
                if pid is not None and pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        self._running = False
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.tmpdir = None

    def restart(self) -> None:
        """``pg_ctl restart -m fast``; returns once a new connection succeeds.

        All existing client connections (incl. PgBouncer's server connections) are cut.
        """
        self._pg_ctl("restart", "-m", "fast", "-t", str(int(READY_TIMEOUT_S)), "-l", self.log_file)
        self._wait_ready()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- client helpers
    def dsn(
        self,
        dbname: str | None = None,
        user: str | None = None,
        *,
        password: str | None = None,
        driver: str = "psycopg",
    ) -> str:
        """SQLAlchemy URL, e.g. ``postgresql+psycopg://app:secret@127.0.0.1:PORT/app``.

        ``driver=""`` gives a plain libpq URL (``postgresql://...``) for psycopg/asyncpg.
        """
        user = user or self.app_user
        if password is None:
            password = self._superuser_password if user == self.superuser else self.app_password
        return _url(driver, user, password, self.host, self.port, dbname or self.app_db)

    def connect(self, **kwargs: object) -> psycopg.Connection[tuple[Any, ...]]:
        """A psycopg connection as the superuser (autocommit), for harness/test plumbing."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.superuser,
            "password": self._superuser_password,
            "dbname": "postgres",
            "application_name": ADMIN_APP_NAME,
            "connect_timeout": 5,
            "autocommit": True,
            **kwargs,
        }
        return psycopg.connect(**params)

    def psql(
        self,
        query: str | sql.Composable,
        params: Sequence[object] | Mapping[str, object] | None = None,
        *,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser (autocommit); rows, or [] if none returned."""
        with self.connect(dbname=dbname) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description is not None else []

    def connections(self, application_name: str, *, prefix: bool = False) -> int:
        """Client backends in ``pg_stat_activity`` with that application_name (or prefix)."""
        op = "LIKE" if prefix else "="
        pattern = _like_prefix(application_name) if prefix else application_name
        rows = self.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            f"AND application_name {op} %s",
            (pattern,),
        )
        return int(rows[0][0])

    def terminate_backends(self, application_name: str, *, timeout_ms: int = 5000) -> int:
        """``pg_terminate_backend`` every backend with that application_name; count killed.

        Uses the PG14+ ``timeout`` argument so a backend counts only once it has actually
        exited (not just been signalled): callers can assert on ``connections()`` right after.
        """
        rows = self.psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, %s)) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (timeout_ms, application_name),
        )
        return int(rows[0][0])

    def backends(self, application_name: str | None = None, *, user: str | None = None) -> list:
        """(pid, application_name, usename, client_port, state) of matching client backends."""
        rows = self.psql(
            "SELECT pid, application_name, usename, client_port, state FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND (%s::text IS NULL OR application_name = %s) "
            "AND (%s::text IS NULL OR usename = %s)",
            (application_name, application_name, user, user),
        )
        return [tuple(row) for row in rows]

    def wait_for_connections(
        self, application_name: str, expected: int = 0, *, timeout: float = 10.0
    ) -> int:
        """Bounded wait until exactly ``expected`` backends carry that name; the last count."""
        deadline = time.monotonic() + timeout
        count = self.connections(application_name)
        while count != expected and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            count = self.connections(application_name)
        return count

    def log_offset(self) -> int:
        """Current size of the server log; pass it to :meth:`log_since` to scope a check."""
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        with self.log_file.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    # -- internals
    def _run(
        self, argv: list[str | Path], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self.tmpdir is not None
        # cwd=tmpdir: pg_ctl refuses to run from a cwd the service user cannot read.
        proc = subprocess.run(
            _as_service_user([str(a) for a in argv]),
            cwd=self.tmpdir,
            env=_server_env(self.tmpdir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S + 30,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}"
                f"\n{proc.stderr}\n--- server log tail ---\n{_tail(self.log_file)}"
            )
        return proc

    def _pg_ctl(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([self._bin / "pg_ctl", "-D", self.data_dir, "-w", *args], check=check)

    def _initdb(self) -> None:
        assert self.tmpdir is not None
        pwfile = self.tmpdir / "superuser.pw"
        _write_owned(pwfile, self._superuser_password + "\n")
        self._run(
            [
                self._bin / "initdb",
                "-D",
                self.data_dir,
                "-U",
                self.superuser,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # throw-away cluster: durability buys nothing, fsync costs seconds
            ]
        )
        pwfile.unlink()
        _write_owned(self.data_dir / "pg_hba.conf", f"host all all {HOST}/32 scram-sha-256\n")
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'harness.conf'\n")

    def _write_harness_conf(self) -> None:
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.port),
            "max_connections": str(self.max_connections),
            # No Unix socket: nothing outside this process tree can reach the cluster, and
            # no 107-byte socket-path limit to trip over.
            "unix_socket_directories": "''",
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self._settings,
        }
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        _write_owned(self.data_dir / "harness.conf", text)

    def _start_on_free_port(self) -> None:
        last = ""
        # Bounded retry: another process may grab the port between free_port() and bind().
        for _attempt in range(3):
            self.port = free_port()
            self._write_harness_conf()
            proc = self._pg_ctl(
                "start", "-t", str(int(READY_TIMEOUT_S)), "-l", self.log_file, check=False
            )
            if proc.returncode == 0:
                self._wait_ready()
                return
            last = f"{proc.stdout}\n{proc.stderr}\n{_tail(self.log_file)}"
            if "already in use" not in last:
                break
        raise RuntimeError(f"PostgreSQL failed to start:\n{last}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with self.connect(connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(_POLL_S)
        raise RuntimeError(f"PostgreSQL not accepting connections: {last}\n{_tail(self.log_file)}")

    def _create_app_role_and_db(self) -> None:
        self.psql(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(self.app_user), sql.Literal(self.app_password)
            )
        )
        self.psql(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(self.app_db), sql.Identifier(self.app_user)
            )
        )

    def scram_secret(self, role: str) -> str:
        """The role's stored password verifier (``SCRAM-SHA-256$...``) from pg_authid."""
        rows = self.psql("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))
        if not rows or not rows[0][0]:
            raise RuntimeError(f"role {role!r} has no password")
        return str(rows[0][0])


def _url(driver: str, user: str, password: str, host: str, port: int, dbname: str) -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{dbname}"


# --------------------------------------------------------------------------- PgBouncer

PoolMode = Literal["session", "transaction", "statement"]


class PgBouncer:
    """A private PgBouncer in front of a :class:`PostgresCluster`, exposing database ``app``."""

    def __init__(
        self,
        cluster: PostgresCluster,
        pool_mode: PoolMode = "transaction",
        default_pool_size: int = 10,
        max_client_conn: int = 500,
        max_db_connections: int = 0,
        *,
        settings: dict[str, str] | None = None,
        users: Sequence[str] = (),
        binary: Path | None = None,
        base_dir: Path | None = None,
    ) -> None:
        self.cluster = cluster
        # Roles besides the app user that may log in (their SCRAM secrets go in the userlist).
        self.users = tuple(users)
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.max_db_connections = max_db_connections
        self.host = HOST
        self.port = 0
        self._settings = settings or {}
        self._binary = binary
        self._base_dir = base_dir
        self.tmpdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_file(self) -> Path:
        assert self.tmpdir is not None, "pgbouncer not started"
        return self.tmpdir / "pgbouncer.log"

    def start(self) -> Self:
        if self._proc is not None:
            return self
        binary = self._binary or find_pgbouncer()
        if binary is None:
            raise RuntimeError(missing_requirements(pgbouncer=True) or "pgbouncer not found")
        self._bin = binary
        atexit.register(self.stop)
        try:
            self.tmpdir = _make_owned_tempdir("poolwise-pgb-", self._base_dir)
            self._write_userlist()
            last = ""
            for _attempt in range(3):  # same free-port race as PostgresCluster
                self.port = free_port()
                self._write_ini()
                try:
                    self._spawn()
                    break
                except RuntimeError as exc:
                    last = str(exc)
                    if "in use" not in last:
                        raise
            else:
                raise RuntimeError(last)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate PgBouncer (SIGTERM = immediate shutdown in 1.18) and delete its temp dir."""
        atexit.unregister(self.stop)
        self._terminate()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def restart(self) -> None:
        """Stop and start the process on the same port and config; returns once it serves."""
        self._terminate()
        self._spawn()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def dsn(
        self, driver: str = "psycopg", *, user: str | None = None, password: str | None = None
    ) -> str:
        """URL of database ``app`` through PgBouncer (``driver=""`` for a plain libpq URL)."""
        user = user or self.cluster.app_user
        password = self.cluster.app_password if password is None else password
        return _url(driver, user, password, self.host, self.port, self.cluster.app_db)

    # -- internals
    def _write_userlist(self) -> None:
        assert self.tmpdir is not None
        users = dict.fromkeys([self.cluster.app_user, *self.users])
        lines = [f'"{user}" "{self.cluster.scram_secret(user)}"\n' for user in users]
        _write_owned(self.tmpdir / "userlist.txt", "".join(lines))

    def _write_ini(self) -> None:
        assert self.tmpdir is not None
        c = self.cluster
        pgbouncer = {
            "listen_addr": HOST,
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # TCP only, like the cluster
            "auth_type": "scram-sha-256",
            "auth_file": str(self.tmpdir / "userlist.txt"),
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.default_pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",  # so default_pool_size is a hard per-pool cap
            "max_client_conn": str(self.max_client_conn),
            "max_db_connections": str(self.max_db_connections),
            "ignore_startup_parameters": "extra_float_digits",
            "application_name_add_host": "0",
            "logfile": str(self.log_file),
            "pidfile": str(self.tmpdir / "pgbouncer.pid"),
            "admin_users": c.app_user,
            "server_login_retry": "1",  # recover quickly after a cluster restart
            **self._settings,
        }
        lines = [
            "[databases]",
            f"{c.app_db} = host={c.host} port={c.port} dbname={c.app_db}",
            "",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in pgbouncer.items()),
        ]
        _write_owned(self.tmpdir / "pgbouncer.ini", "\n".join(lines) + "\n")

    def _spawn(self) -> None:
        assert self.tmpdir is not None
        # Foreground process (no -d) so we own its pid and can always signal/reap it.
        # Its stderr goes to a file, never a pipe nobody drains.
        with (self.tmpdir / "pgbouncer.stderr").open("ab") as err:
            self._proc = subprocess.Popen(
                _as_service_user([str(self._bin), str(self.tmpdir / "pgbouncer.ini")]),
                cwd=self.tmpdir,
                env=_server_env(self.tmpdir),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # like pg_ctl's postmaster: stop() is the only way out
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None and self.tmpdir is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = _tail(self.tmpdir / "pgbouncer.stderr")
                self._proc = None
                raise RuntimeError(f"pgbouncer exited during start:\n{log}")
            if _port_accepts(self.port):
                break
            time.sleep(_POLL_S)
        else:
            raise RuntimeError(f"pgbouncer not listening:\n{_tail(self.log_file)}")
        # End-to-end probe: proves auth pass-through and routing, not just a bound socket.
        try:
            with psycopg.connect(
                self.dsn(driver=""), application_name=BOUNCER_PROBE_APP_NAME, connect_timeout=10
            ) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise RuntimeError(f"pgbouncer probe failed: {exc}\n{_tail(self.log_file)}") from exc

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# --------------------------------------------------------------------------- sampling


class ActivitySampler:
    """Background thread counting ``pg_stat_activity`` client backends every ``interval`` s.

    Keeps every count in ``samples`` and the maximum in ``peak``. Always bounded: daemon
    thread, stop event, and it gives up on its own after ``max_duration`` seconds. Survives
    a server restart (reconnects; failures are counted in ``errors``).
    """

    def __init__(
        self,
        cluster: PostgresCluster,
        application_name: str | None,
        *,
        prefix: bool = False,
        user: str | None = None,
        interval: float = 0.05,
        max_duration: float = 300.0,
    ) -> None:
        self.cluster = cluster
        self.application_name = application_name
        self.prefix = prefix
        # user: count only that role's backends; with application_name=None, count all of them
        # (e.g. every server connection PgBouncer holds, whatever client name it last carried).
        self.user = user
        self.interval = interval
        self.max_duration = max_duration
        self.samples: list[int] = []
        self.peak = 0
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run,
                name=f"ActivitySampler[{self.application_name or self.user}]",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def last(self) -> int | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def wait_for(self, predicate: Callable[[ActivitySampler], bool], timeout: float = 10.0) -> bool:
        """Wait (bounded) until ``predicate(sampler)`` is true; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(self.interval / 2)
        return bool(predicate(self))

    def _run(self) -> None:
        where = ["backend_type = 'client backend'"]
        params: list[str] = []
        if self.application_name is not None:
            op = "LIKE" if self.prefix else "="
            where.append(f"application_name {op} %s")
            params.append(
                _like_prefix(self.application_name) if self.prefix else self.application_name
            )
        if self.user is not None:
            where.append("usename = %s")
            params.append(self.user)
        query = "SELECT count(*) FROM pg_stat_activity WHERE " + " AND ".join(where)
        deadline = time.monotonic() + self.max_duration
        conn: psycopg.Connection[tuple[Any, ...]] | None = None
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    if conn is None:
                        conn = self.cluster.connect(
                            application_name=SAMPLER_APP_NAME, connect_timeout=2
                        )
                    row = conn.execute(query, params).fetchone()
                    count = int(row[0]) if row else 0
                    with self._lock:
                        self.samples.append(count)
                        self.peak = max(self.peak, count)
                except psycopg.Error:
                    self.errors += 1
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                    conn = None
                self._stop.wait(self.interval)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
