"""Sampling ``pg_stat_activity`` in the background while a test drives load."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import psycopg

from .postgres import PostgresCluster
from .processes import SAMPLER_APP_NAME, Started, _like_prefix


class ActivitySampler(Started):
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
