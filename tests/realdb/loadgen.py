"""A small, bounded HTTP/1.1 load generator for the realdb tier and the benchmark.

Raw asyncio streams instead of an HTTP client library: on a 2-core machine the load generator
shares the CPU with the service under test and PostgreSQL, and a hand-rolled keep-alive client
costs a fraction of what a full client does per request, so the numbers describe the service.
It only has to speak to uvicorn (Content-Length bodies, keep-alive), and it only ever connects
to 127.0.0.1.

Every run is bounded three ways: a request count, a wall-clock duration and a per-request
timeout; a request that times out is recorded (status ``TIMEOUT``), never waited on forever.
Each request is recorded with its start and end time, so a test can look at what happened in a
window (a database restart, a SIGTERM) and not just at totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
# Pseudo status codes for requests that got no HTTP answer.
TIMEOUT = -1
TRANSPORT_ERROR = 0

# (method, path, JSON body or None) for the n-th request of client c.
RequestFactory = Callable[[int, int], tuple[str, str, Any]]


@dataclass(frozen=True)
class Record:
    start: float  # time.monotonic() when the request was sent
    end: float
    status: int
    path: str
    error: str = ""
    body: bytes = b""
    retry_after: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def duration(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.records)

    def ok(self) -> list[Record]:
        return [r for r in self.records if 200 <= r.status < 300]

    def failed(self) -> list[Record]:
        """Every request that did not get a 2xx answer (5xx, timeouts, transport errors)."""
        return [r for r in self.records if not 200 <= r.status < 300]

    def ok_per_second(self) -> float:
        return len(self.ok()) / self.duration

    def percentile(self, q: float, records: Iterable[Record] | None = None) -> float:
        latencies = sorted(r.latency for r in (self.records if records is None else records))
        if not latencies:
            return math.nan
        rank = max(0, math.ceil(q / 100 * len(latencies)) - 1)
        return latencies[rank]

    def bodies_containing(self, text: str) -> list[Record]:
        needle = text.encode()
        return [r for r in self.records if needle in r.body or text in r.error]

    def summary(self) -> str:
        return (
            f"{len(self.records)} requests in {self.duration:.1f}s, statuses {dict(self.statuses)},"
            f" ok/s {self.ok_per_second():.0f}, p50 {self.percentile(50) * 1000:.0f} ms,"
            f" p99 {self.percentile(99) * 1000:.0f} ms,"
            f" max {max((r.latency for r in self.records), default=0) * 1000:.0f} ms"
            + "".join(f"\n  {count} x {answer}" for answer, count in self.answers().most_common(3))
        )

    def answers(self) -> Counter[str]:
        """What the requests that failed were told: status and the start of the body or error."""
        return Counter(
            f"{record.status} {(record.error or record.body.decode(errors='replace'))[:160]}"
            for record in self.failed()
        )


class _Connection:
    """One keep-alive HTTP/1.1 connection; reopened after any error or ``Connection: close``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, payload: Any) -> tuple[int, dict, bytes]:
        body = b"" if payload is None else json.dumps(payload).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
        if payload is not None:
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        message = head.encode() + body
        if self.reader is not None and self.reader.at_eof():
            await self.close()  # the server closed this idle keep-alive connection
        reused = self.writer is not None
        try:
            return await self._exchange(message)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # Like any keep-alive client (urllib3, httpcore): a reused connection that the
            # server closed before answering a single byte is retried once on a new one.
            # uvicorn closes a connection after an unhandled error's 500 without saying so.
            partial = getattr(exc, "partial", b"")
            await self.close()
            if not reused or partial:
                raise
            return await self._exchange(message)

    async def _exchange(self, message: bytes) -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        self.writer.write(message)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        data = await self.reader.readexactly(length) if length else b""
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, data

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


async def run_load(
    port: int,
    factory: RequestFactory,
    *,
    clients: int,
    duration: float,
    max_requests: int,
    timeout: float = 30.0,
    keep_bodies: bool = False,
    stop: threading.Event | None = None,
) -> LoadResult:
    """``clients`` closed-loop clients, each sending its next request when the last one ends.

    Stops sending after ``duration`` seconds, ``max_requests`` requests in all, or ``stop``;
    requests already sent still get up to ``timeout`` seconds to finish.
    """
    result = LoadResult(started=time.monotonic())
    deadline = result.started + duration
    sent = 0

    def more() -> bool:
        return (
            time.monotonic() < deadline
            and sent < max_requests
            and not (stop is not None and stop.is_set())
        )

    async def client(number: int) -> None:
        nonlocal sent
        connection = _Connection(port)
        sequence = 0
        try:
            while more():
                sent += 1
                method, path, payload = factory(number, sequence)
                sequence += 1
                started = time.monotonic()
                try:
                    status, headers, data = await asyncio.wait_for(
                        connection.request(method, path, payload), timeout
                    )
                except TimeoutError:
                    await connection.close()
                    record = Record(started, time.monotonic(), TIMEOUT, path, "timeout")
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    await connection.close()
                    record = Record(started, time.monotonic(), TRANSPORT_ERROR, path, repr(exc))
                    # A refused connection fails in microseconds: do not spin on it.
                    await asyncio.sleep(0.05)
                else:
                    keep = keep_bodies or not 200 <= status < 400
                    record = Record(
                        started,
                        time.monotonic(),
                        status,
                        path,
                        body=data if keep else b"",
                        retry_after=headers.get("retry-after"),
                    )
                result.records.append(record)
        finally:
            await connection.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    result.finished = time.monotonic()
    return result


class BackgroundLoad:
    """Run :func:`run_load` in a thread (its own event loop) while the test does other things."""

    def __init__(self, port: int, factory: RequestFactory, **options: Any) -> None:
        self.stop_event = threading.Event()
        self._options = {**options, "stop": self.stop_event}
        self._port = port
        self._factory = factory
        self.result: LoadResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="BackgroundLoad", daemon=True)

    def _run(self) -> None:
        try:
            self.result = asyncio.run(run_load(self._port, self._factory, **self._options))
        except BaseException as exc:  # re-raised in join()
            self.error = exc

    def start(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def join(self, timeout: float) -> LoadResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop_event.set()
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "load generator did not finish in time"
        return self.result

    def stop(self, timeout: float) -> LoadResult:
        self.stop_event.set()
        return self.join(timeout)


def load(port: int, factory: RequestFactory, **options: Any) -> LoadResult:
    return asyncio.run(run_load(port, factory, **options))


def request(
    port: int, method: str, path: str, payload: Any = None, *, timeout: float = 10.0
) -> tuple[int, dict[str, str], Any]:
    """One synchronous request: (status, lower-cased headers, decoded JSON body or None)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        body = None if payload is None else json.dumps(payload)
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        parsed = None
        if data:
            with contextlib.suppress(ValueError):
                parsed = json.loads(data)
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
    finally:
        connection.close()


def items_mix(item_ids: list[int], *, write_every: int = 5) -> RequestFactory:
    """Reads of existing items, with one create in every ``write_every`` requests."""

    def factory(client: int, sequence: int) -> tuple[str, str, Any]:
        if (client + sequence) % write_every == 0:
            return "POST", "/items", {"name": f"load-{client}-{sequence}"}
        return "GET", f"/items/{item_ids[(client * 7 + sequence) % len(item_ids)]}", None

    return factory


def repeat_get(path: str) -> RequestFactory:
    """Every request is ``GET path``."""

    def factory(client: int, sequence: int) -> tuple[str, str, Any]:
        return "GET", path, None

    return factory
