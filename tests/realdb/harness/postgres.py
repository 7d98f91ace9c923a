"""A throw-away PostgreSQL cluster for the ``realdb`` tier: initdb, start, roles, stop."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import psycopg
from ports import free_port
from psycopg import sql

from .processes import (
    _POLL_S,
    ADMIN_APP_NAME,
    HOST,
    READY_TIMEOUT_S,
    SERVICE_USER,
    Started,
    _as_service_user,
    _like_prefix,
    _make_owned_tempdir,
    _server_env,
    _tail,
    _write_owned,
    find_pg_bin,
    missing_requirements,
    pid_alive,
)


class PostgresCluster(Started):
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
