"""A private PgBouncer in front of a throw-away cluster, for the ``realdb`` tier.

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
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self

import psycopg
from ports import free_port

from .postgres import PostgresCluster, _url
from .processes import (
    _POLL_S,
    BOUNCER_PROBE_APP_NAME,
    HOST,
    READY_TIMEOUT_S,
    Started,
    _as_service_user,
    _make_owned_tempdir,
    _port_accepts,
    _server_env,
    _tail,
    _write_owned,
    find_pgbouncer,
    missing_requirements,
)

PoolMode = Literal["session", "transaction", "statement"]


class PgBouncer(Started):
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
