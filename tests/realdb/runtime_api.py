"""The Lambda Runtime API on 127.0.0.1, so a Lambda image's own ENTRYPOINT can run here.

In AWS the Lambda service answers the runtime interface client (awslambdaric) over HTTP at
``$AWS_LAMBDA_RUNTIME_API``; AWS's Runtime Interface Emulator does the same for local runs, but
is a binary from GitHub this machine cannot download. These are the four calls of the
documented protocol (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html) that a
function without extensions makes: next invocation, its response or error, and an init error.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harness import HOST, free_port

PREFIX = "/2018-06-01/runtime"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:000000000000:function:as-shipped"


@dataclass(frozen=True)
class Outcome:
    """What the function sent back for one invocation: ``response`` or ``error``."""

    kind: str
    body: Any


class RuntimeApi:
    """One execution environment's Runtime API: :meth:`invoke` hands out one event at a time."""

    def __init__(self) -> None:
        self._events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._outcomes: dict[str, Outcome] = {}
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self.init_error: Any = None
        self.server = self._bind()
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        """The value of AWS_LAMBDA_RUNTIME_API."""
        return f"{HOST}:{self.server.server_address[1]}"

    def _bind(self) -> ThreadingHTTPServer:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the outcomes are what the tests look at

            def _answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path != f"{PREFIX}/invocation/next":
                    self._answer(404)
                    return
                # Long poll, like the Lambda service: the function waits here between events.
                while not api._closed.is_set():
                    with contextlib.suppress(queue.Empty):
                        request_id, event = api._events.get(timeout=0.2)
                        break
                else:
                    self._answer(410)
                    return
                deadline_ms = int((time.time() + 60) * 1000)
                self._answer(
                    200,
                    event,
                    {
                        "Content-Type": "application/json",
                        "Lambda-Runtime-Aws-Request-Id": request_id,
                        "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                        "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
                    },
                )

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body: Any = raw.decode(errors="replace")
                with contextlib.suppress(ValueError):
                    body = json.loads(raw)
                parts = self.path.removeprefix(PREFIX).strip("/").split("/")
                with api._changed:
                    if parts == ["init", "error"]:
                        api.init_error = body
                    elif (
                        len(parts) == 3
                        and parts[0] == "invocation"
                        and parts[2]
                        in (
                            "response",
                            "error",
                        )
                    ):
                        api._outcomes[parts[1]] = Outcome(parts[2], body)
                    else:
                        self._answer(404)
                        return
                    api._changed.notify_all()
                self._answer(202, b'{"status":"OK"}', {"Content-Type": "application/json"})

        last: OSError | None = None
        for _attempt in range(3):  # bounded retry on the free-port race
            try:
                server = ThreadingHTTPServer((HOST, free_port()), Handler)
                server.daemon_threads = True
                return server
            except OSError as exc:
                last = exc
        raise RuntimeError(f"no port for the Runtime API: {last}")

    def start(self) -> RuntimeApi:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def invoke(self, event: Any, *, alive: Callable[[], bool], timeout: float = 60) -> Outcome:
        """Queue ``event``; the function's response or error. Raises if init failed, if the
        function's process is gone (``alive()`` is false) or after ``timeout`` seconds."""
        request_id = str(uuid.uuid4())
        self._events.put((request_id, json.dumps(event).encode()))
        deadline = time.monotonic() + timeout
        with self._changed:
            while request_id not in self._outcomes:
                if self.init_error is not None:
                    raise AssertionError(f"the function failed to initialise: {self.init_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer to invocation {request_id} in {timeout} s")
                if not alive():
                    raise AssertionError(f"the function exited during invocation {request_id}")
                self._changed.wait(min(left, 0.5))
            return self._outcomes.pop(request_id)

    def wait_init_error(self, timeout: float) -> Any:
        """The init error the function reported (None if none in ``timeout`` seconds)."""
        with self._changed:
            self._changed.wait_for(lambda: self.init_error is not None, timeout)
            return self.init_error
