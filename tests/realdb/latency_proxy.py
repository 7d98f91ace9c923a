"""A TCP proxy on 127.0.0.1 that delays every byte by a set time each way, and can cut silently.

    python tests/realdb/latency_proxy.py --upstream-port 5432 --delay-ms 0.25 --port 25432

bench/latency.py puts it between a service and PostgreSQL to stand for a network (0.25 ms each
way is a same-region cloud network); the realdb tests use ``drop_silently()``, which ends every
session it carries at the server's side while its clients see nothing until they send (a NAT or
firewall that dropped the connection's state answers the next packet with a reset).

Threads, not asyncio: asyncio's timers wait in whole milliseconds on Linux (epoll), far too
coarse for 0.25 ms; time.sleep() sleeps with clock_nanosleep. Each direction of each connection
has a reader thread, which stamps what it receives with the time it is due, and a writer
thread, which sends it then, in order. ``lateness`` records how far past its due time each
chunk went out, so a run can report the delay it really added. ``turns`` records, per message
a client sends, how long after the server's last reply reached it the client spoke again: the
client's own time on the connection (bench/latency.py splits it at each COMMIT, into the time
within a request and the time between one request and the next).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

CHUNK = 65536


class _Conversation:
    """One connection: when its client last got a reply, and whether it had ended a transaction."""

    def __init__(self) -> None:
        self.replied_at: float | None = None
        self.after_commit = False


class _Pipe:
    """One direction of one connection: recv from `source`, send to `target` `delay` later."""

    def __init__(
        self,
        proxy: LatencyProxy,
        source: socket.socket,
        target: socket.socket,
        to_server: bool,
        conversation: _Conversation,
    ) -> None:
        self.proxy = proxy
        self.source = source
        self.target = target
        self.to_server = to_server
        self.conversation = conversation
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        self.ended = False
        for run in (self._read, self._write):
            threading.Thread(target=run, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.source.recv(CHUNK)
            except OSError:
                data = b""
            if data and self.to_server:
                self._client_spoke(data)
            with self.ready:
                if not data:
                    self.ended = True
                else:
                    self.queue.append((time.perf_counter() + self.proxy.delay, data))
                self.ready.notify()
            if not data:
                return

    def _client_spoke(self, data: bytes) -> None:
        talk = self.conversation
        if talk.replied_at is not None:
            self.proxy.turns.append((talk.after_commit, time.perf_counter() - talk.replied_at))
            talk.replied_at = None
        # psycopg ends a transaction with a simple query of its own: what follows its reply is
        # the next request's first message.
        talk.after_commit = b"COMMIT" in data or b"ROLLBACK" in data

    def _write(self) -> None:
        while True:
            with self.ready:
                while not self.queue and not self.ended:
                    self.ready.wait()
                if not self.queue:
                    break
                due, data = self.queue.popleft()
            if self.proxy.silenced(self.source):
                self.proxy.reset(self.source)  # the client spoke on a forgotten connection
                return
            if self.proxy.silenced(self.target):
                continue  # the server's side is gone: nothing reaches the client
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self.proxy.lateness.append(time.perf_counter() - due)
            if self.to_server:
                self.proxy.sent_to_server += 1
            try:
                self.target.sendall(data)
            except OSError:
                break
            if not self.to_server:
                self.conversation.replied_at = time.perf_counter()
        if not self.proxy.silenced(self.target):
            with contextlib.suppress(OSError):
                self.target.shutdown(socket.SHUT_WR)  # pass the end of the stream on


class LatencyProxy:
    """Listens on 127.0.0.1:`port`; each connection goes to 127.0.0.1:`upstream_port`."""

    def __init__(self, upstream_port: int, delay_seconds: float, port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = delay_seconds
        self.port = port
        # How late each chunk went out after its due time (seconds); the last 100,000.
        self.lateness: collections.deque[float] = collections.deque(maxlen=100_000)
        # Chunks passed on to the server: with one request at a time on a connection, each is a
        # message the client then waits on, so this counts round trips.
        self.sent_to_server = 0
        # (after a COMMIT or ROLLBACK?, seconds from the reply reaching the client to its next
        # message) for every message a client sent after a reply; the last 200,000.
        self.turns: collections.deque[tuple[bool, float]] = collections.deque(maxlen=200_000)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []  # connections carried now
        self._sockets: list[socket.socket] = []  # every socket opened, closed by close()
        self._silenced: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", port), backlog=128)

    def start(self) -> LatencyProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for end in self._sockets:
                end.close()
        # shutdown() wakes the accept() blocked on it, which close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            for end in (client, upstream):
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
                self._pairs.append((client, upstream))
            conversation = _Conversation()
            _Pipe(self, client, upstream, to_server=True, conversation=conversation)
            _Pipe(self, upstream, client, to_server=False, conversation=conversation)

    def silenced(self, end: socket.socket) -> bool:
        with self._lock:
            return end in self._silenced

    def reset(self, client: socket.socket) -> None:
        """A reset, as a NAT or firewall answers a packet of a connection it has forgotten."""
        with contextlib.suppress(OSError):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Wakes this socket's reader thread, whose recv() holds the socket open: the close
            # resets the connection once that recv() has returned.
            client.shutdown(socket.SHUT_RD)
            client.close()

    def drop_silently(self) -> int:
        """End every session at the server's side; its client learns only when it next sends.

        Returns how many connections were dropped.
        """
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self._silenced.update(client for client, _ in pairs)
        for _, upstream in pairs:
            # The server sees its client go away; nothing it sends back is passed on.
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_RDWR)
        return len(pairs)

    def added_delay(self) -> tuple[float, float]:
        """(median, 99th percentile) of the delay added per chunk, in seconds."""
        late = sorted(self.lateness)
        if not late:
            return self.delay, self.delay
        return self.delay + late[len(late) // 2], self.delay + late[int(len(late) * 0.99)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="added each way")
    parser.add_argument("--seconds", type=float, default=600, help="exit after this long")
    parser.add_argument("--report", help="write the delay it added to this file on exit")
    parser.add_argument(
        "--turns", help="write the clients' turns (JSON: between and within requests) on exit"
    )
    args = parser.parse_args()
    # SIGTERM from the caller ends it like the time limit: the report is still written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    proxy = LatencyProxy(args.upstream_port, args.delay_ms / 1000, args.port).start()
    try:
        print("listening", flush=True)
        time.sleep(args.seconds)  # never left running
    finally:
        proxy.close()
        if args.report:
            median, p99 = proxy.added_delay()
            Path(args.report).write_text(
                f"measured per chunk: median {median * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms"
                f" over {len(proxy.lateness):,} chunks\n"
            )
        if args.turns:
            turns = list(proxy.turns)
            Path(args.turns).write_text(
                json.dumps(
                    {
                        "between": [seconds for after_commit, seconds in turns if after_commit],
                        "within": [seconds for after_commit, seconds in turns if not after_commit],
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
