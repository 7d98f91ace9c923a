"""What a failed connect or statement was (its SQLSTATE), and the time of every connect.

Shared by every target: the metrics (db/metrics.py) time each attempt to open a connection
and name a refused one by its SQLSTATE, and the error handling reads the same SQLSTATEs.
Names follow the OpenTelemetry semantic conventions for database client connections.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry

POOL_NAME = "db.client.connection.pool.name"
ERROR_TYPE = "error.type"
CREATE_TIME = "db.client.connection.create_time"

# libpq reports an error raised while connecting as text only (psycopg's sqlstate is None
# there; asyncpg has the code). These are the messages of the start-up failures a connection
# budget cares about, in the server's default English (lc_messages), with their SQLSTATE.
CONNECT_FAILURES = (
    ("sorry, too many clients already", "53300"),  # max_connections
    ("remaining connection slots are reserved", "53300"),  # the superuser reserve
    ("too many connections for", "53300"),  # a role's or database's CONNECTION LIMIT
    ("no more connections allowed", "08P01"),  # PgBouncer's max_client_conn
    ("password authentication failed", "28P01"),
    ("no pg_hba.conf entry", "28000"),
    ("the database system is", "57P03"),  # starting up, shutting down, in recovery
)

# SQLSTATEs of the bounds the database enforces for this service (db/topology.toml [timeouts]):
# query_canceled at statement_timeout, idle_in_transaction_session_timeout.
TIMEOUT_SQLSTATES = ("57014", "25P03")


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error (or of the SQLAlchemy error wrapping one), if known."""
    original = getattr(error, "orig", None) or error
    code = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    if code:
        return str(code)
    message = str(original)
    return next((code for text, code in CONNECT_FAILURES if text in message), None)


def ended_by_a_timeout(error: BaseException) -> bool:
    """The database ended the statement or the session at one of the service's own bounds."""
    return sqlstate(error) in TIMEOUT_SQLSTATES


def error_type(error: BaseException) -> str:
    """error.type as the conventions define it: the SQLSTATE, else the exception's class."""
    original = getattr(error, "orig", None) or error
    return sqlstate(original) or type(original).__name__


# When the current thread or task started opening a connection. A ContextVar, not an attribute
# of the engine: connects of concurrent requests overlap, and SQLAlchemy runs an async
# driver's connect in a greenlet that shares its task's context.
_connect_started: ContextVar[float | None] = ContextVar("connect_started", default=None)


def watch_connects(engine: Engine, record: Callable[[float, str | None], None]) -> None:
    """Call record(seconds, error_type) after every attempt to open a new connection.

    seconds run from the engine's do_connect event to its connect event (dialect set-up
    included); error_type is None for a connection that opened, else the SQLSTATE (or the
    exception's class) of the attempt the driver or the database refused.
    """

    def started(*args: Any) -> None:
        _connect_started.set(time.perf_counter())

    def elapsed() -> float | None:
        began = _connect_started.get()
        _connect_started.set(None)
        return None if began is None else time.perf_counter() - began

    def connected(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        seconds = elapsed()
        if seconds is not None:
            record(seconds, None)

    def failed(context: ExceptionContext) -> None:
        # A checkout's error with no Connection yet: the connect itself failed. Errors that
        # never reached do_connect (no start time) are not connect attempts.
        if context.connection is None and not context.is_pre_ping:
            seconds = elapsed()
            if seconds is not None:
                record(seconds, error_type(context.original_exception))

    event.listen(engine, "do_connect", started)
    event.listen(engine, "connect", connected)
    event.listen(engine, "handle_error", failed)
