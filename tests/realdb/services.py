"""Rendered projects and their real entry points, for the realdb tier and the benchmark.

A :class:`RenderedProject` is one ``copier copy`` of this template. Its code runs in the shared
virtualenv (this interpreter) with ``PYTHONPATH=<project>/src``, exactly like the generated
Dockerfile runs it: ``python -m <pkg>`` (k8s), ``python -m <pkg>.job`` (batch), or the Lambda
handler imported in a fresh interpreter per execution environment.

Every process started here is started by id, in its own session, and stopped by id (its
process group) in ``stop()``; every wait is bounded.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rendering
from harness import PostgresCluster, free_ports, pid_alive
from loadgen import BackgroundLoad, repeat_get, request

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0


def render(destination: Path, answers: dict[str, Any], **options: Any) -> RenderedProject:
    """Render the template (working tree, uncommitted changes included) with ``answers``.

    ``options`` go to :func:`rendering.render` (``vcs_ref`` for another release, ...).
    """
    return RenderedProject(rendering.render(destination, answers, **options))


@dataclass
class RenderedProject:
    root: Path

    @property
    def answers(self) -> dict[str, Any]:
        text = (self.root / ".copier-answers.yml").read_text()
        answers: dict[str, Any] = {}
        for line in text.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, value = line.split(":", 1)
                answers[key.strip()] = value.strip().strip("'\"")
        return answers

    @property
    def package(self) -> str:
        (package,) = [p.name for p in (self.root / "src").iterdir() if (p / "__init__.py").exists()]
        return package

    @property
    def project_name(self) -> str:
        return self.answers["project_name"]

    def env(self, **overrides: str | int) -> dict[str, str]:
        """The project's processes' environment: its src/ importable, no PG* variables of ours.

        Connections go only where the DATABASE_URL given in ``overrides`` says.
        """
        env = rendering.clean_env(without_pg=True, PYTHONPATH=str(self.root / "src"))
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    def python(
        self, code: str, *, timeout: float = 60, **env: str | int
    ) -> subprocess.CompletedProcess[str]:
        """Run a snippet with the project importable; raises with its output on failure."""
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=self.root,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"snippet failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def budget(self, **workload_overrides: int) -> dict[str, Any]:
        """poolwise's budget numbers of the project for the one pod the harness runs.

        The declared topology (db/topology.toml) with one pod and no rollout (nothing is
        terminating), plus overrides of its workload's fields: ``per_process``, ``processes``,
        ``app_total`` and the ``database_total`` that ``database_check`` computes (migration
        connection included), plus the pgbouncer knobs.
        """
        code = f"""
            import json
            from pathlib import Path
            from poolwise import declared as files, rule
            db = Path("src/{self.package}/db")
            declared = files.declared_topology(files.load_declared(db / "topology.toml"))
            overrides = {{"terminating": 0, **{workload_overrides!r}}}
            workload = declared.workloads[0]._replace(**overrides)
            topology = declared._replace(workloads=(workload,))
            print(json.dumps({{
                "per_process": workload.per_process,
                "processes": workload.processes,
                "app_total": topology.app_total,
                "database_total": rule.database_check(
                    topology, files.load_limits(db / "database_limits.toml")
                ).total,
                "pgbouncer_default_pool_size": topology.pgbouncer_default_pool_size,
                "pgbouncer_max_client_conn": topology.pgbouncer_max_client_conn,
                "pool_size": workload.pool_size,
                "max_overflow": workload.max_overflow,
            }}))
        """
        return json.loads(self.python(code).stdout)

    def settings(self) -> dict[str, Any]:
        """The rendered Settings defaults (pool_timeout, pool_size, ...)."""
        code = f"""
            import dataclasses, json
            from {self.package}.settings import Settings
            print(json.dumps(dataclasses.asdict(Settings())))
        """
        return json.loads(self.python(code).stdout)

    def pgbouncer_ini(self) -> dict[str, str] | None:
        """The [pgbouncer] section the project renders for its PgBouncer, or None."""
        path = self.root / "deploy" / "pgbouncer" / "pgbouncer.ini"
        if not path.exists():
            return None
        parser = configparser.ConfigParser(interpolation=None, allow_no_value=True, strict=False)
        parser.read_string(path.read_text())
        return dict(parser["pgbouncer"])

    def has_alembic(self) -> bool:
        return (self.root / "alembic.ini").exists()

    def create_schema(self, database_url: str) -> str:
        """Create the tables the way the project does in production, or from its models.

        Prefers the project's own migrations (``alembic upgrade head``) when the template
        renders them; otherwise ``Base.metadata.create_all`` with a NullPool engine.
        """
        if self.has_alembic():
            proc = subprocess.run(
                [sys.executable, "-m", "alembic", "upgrade", "head"],
                cwd=self.root,
                env=self.env(DATABASE_URL=database_url),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"alembic upgrade head failed:\n{proc.stdout}\n{proc.stderr}")
            return "alembic upgrade head"
        self.python(
            f"""
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool
            from {self.package}.models import Base
            engine = create_engine({database_url!r}, poolclass=NullPool)
            Base.metadata.create_all(engine)
            engine.dispose()
            """
        )
        return "Base.metadata.create_all"


class ServiceProcess:
    """A k8s-target service started through its real entry point, ``python -m <pkg>``."""

    def __init__(
        self,
        project: RenderedProject,
        database_url: str,
        application_name: str,
        log_dir: Path,
        *,
        module: str | None = None,
        argv: list[str] | None = None,
        **env: str | int,
    ) -> None:
        self.project = project
        self.application_name = application_name
        self.port = 0
        # The pod's metrics server (prometheus.py), on a port of its own as in a pod.
        self.metrics_port = 0
        self.module = module or project.package
        # The command after the interpreter: `-m <pkg>` (the real entry point) unless given.
        self.argv = argv or ["-m", self.module]
        self._env = {
            "DATABASE_URL": database_url,
            "APPLICATION_NAME": application_name,
            "HOST": "127.0.0.1",
            **env,
        }
        self.log_path = log_dir / f"{application_name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServiceProcess:
        last = ""
        for _attempt in range(3):  # bounded retry on the free-port race
            self.port, self.metrics_port = free_ports(2)
            ports = {"PORT": self.port, "METRICS_PORT": self.metrics_port}
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, *self.argv],
                    cwd=self.project.root,
                    env=self.project.env(**ports, **self._env),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_healthy():
                return self
            last = self.log()
            self.kill()
            if "address already in use" not in last.lower():
                break
        raise RuntimeError(f"{self.module} did not start:\n{last[-4000:]}")

    def _wait_healthy(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                if request(self.port, "GET", "/healthz", timeout=2)[0] == 200:
                    return True
            time.sleep(0.1)
        return False

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Bounded wait until GET /readyz (a real database round trip) answers 200."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = request(self.port, "GET", "/readyz", timeout=5)
                if last[0] == 200:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"/readyz never answered 200: {last}\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM to the main process only, as Kubernetes sends it to PID 1."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.exit_code

    def children(self) -> list[int]:
        from harness import child_pids

        return [pid for pid in child_pids(self.pid) if pid_alive(pid)]

    def kill(self) -> None:
        """Stop for good: SIGTERM, then SIGKILL to the whole process group (ours) if needed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.exit_code = proc.wait(timeout=25)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# A Lambda execution environment: one interpreter that imports the handler module once (the
# cold start, engine built at import), then serves invocations one at a time, like the Lambda
# runtime's loop. Events arrive as JSON lines on stdin; each response goes back as one line. An
# exception escaping the handler is what the Lambda service reports as a function error (API
# Gateway then answers 500); it comes back as statusCode 599 with the error.
LAMBDA_RUNTIME = """
import json, sys, importlib
handler = importlib.import_module(sys.argv[1] + ".handler").handler
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    try:
        response = handler(json.loads(line), None)
    except Exception as exc:
        response = {"statusCode": 599, "error": repr(exc)}
    print(json.dumps(response), flush=True)
"""


def http_event(method: str, path: str, body: object = None) -> dict[str, Any]:
    """The event API Gateway's HTTP API sends for one request (payload format 2.0).

    Built from AWS's documented shape, not from the rendered project's events/ samples, for the
    two routes deploy/lambda/template.yaml declares: ``POST /items`` and ``GET /items/{id}``.
    """
    segments = path.strip("/").split("/")
    route_key = f"{method} /items" if len(segments) == 1 else f"{method} /items/{{id}}"
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "realdb.invalid"},
        "requestContext": {
            "apiId": "realdb",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "realdb",
            },
            "requestId": f"realdb-{time.monotonic_ns()}",
            "routeKey": route_key,
            "stage": "$default",
            "timeEpoch": int(time.time() * 1000),
        },
        "isBase64Encoded": False,
    }
    if len(segments) == 2:
        event["pathParameters"] = {"id": segments[1]}
    if body is not None:
        event["body"] = json.dumps(body)
    return event


def response_json(response: dict[str, Any]) -> Any:
    """The JSON body of a payload 2.0 response (None for a function error, statusCode 599)."""
    if response["statusCode"] == 599:
        return None
    return json.loads(response["body"])


def check_http_response(response: dict[str, Any]) -> dict[str, Any]:
    """Raise unless ``response`` is a payload 2.0 response API Gateway can send on."""
    if response.get("statusCode") == 599:
        return response
    shape = {"statusCode": int, "headers": dict, "body": str, "isBase64Encoded": bool}
    wrong = [key for key, kind in shape.items() if not isinstance(response.get(key), kind)]
    if wrong:
        raise ValueError(f"not an API Gateway payload 2.0 response ({wrong}): {response}")
    return response


class LambdaEnvironment:
    """One execution environment (a process) running the generated handler."""

    def __init__(
        self,
        project: RenderedProject,
        database_url: str | None,
        application_name: str,
        **env: str,
    ):
        # database_url None: the function's own configuration instead, as deploy/lambda gives
        # it (DATABASE_SECRET_ARN and where to connect, in env).
        if database_url is not None:
            env["DATABASE_URL"] = database_url
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAMBDA_RUNTIME, project.package],
            cwd=project.root,
            env=project.env(APPLICATION_NAME=application_name, **env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        # stderr (logs, and the handler's CloudWatch EMF metrics line per invocation) is read as
        # it comes, so a long run never fills the pipe and blocks the environment.
        self.stderr_lines: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def emf(self) -> list[dict[str, Any]]:
        """The CloudWatch embedded metric format records the environment has written."""
        return [json.loads(line) for line in self.stderr_lines if line.startswith('{"_aws"')]

    def _readline(self, timeout: float) -> dict[str, Any]:
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise TimeoutError(f"no answer from the Lambda environment in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"Lambda environment exited: {self.stderr()}")
        return json.loads(line)

    def wait_ready(self, timeout: float = 30) -> None:
        assert self._readline(timeout) == {"ready": True}

    def invoke(self, event: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(event) + "\n")
        self.proc.stdin.flush()
        return self._readline(timeout)

    def request(
        self, method: str, path: str, body: object = None, timeout: float = 30
    ) -> dict[str, Any]:
        """Invoke with the HTTP API's event for one request; the response's shape is checked."""
        return check_http_response(self.invoke(http_event(method, path, body), timeout))

    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def close(self, timeout: float = 10) -> int:
        """End the environment (EOF on stdin) and return its exit code."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=10)
        self._stderr_reader.join(timeout=10)  # the process is gone: its stderr is at EOF
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


def run_job(
    project: RenderedProject, database_url: str, application_name: str, log_dir: Path, **env: Any
) -> subprocess.Popen[bytes]:
    """Start ``python -m <pkg>.job`` (batch target); the caller waits on or signals it."""
    log_path = log_dir / f"{application_name}.log"
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", f"{project.package}.job"],
            cwd=project.root,
            env=project.env(DATABASE_URL=database_url, APPLICATION_NAME=application_name, **env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Bounded poll: True as soon as ``predicate()`` holds, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def postgres_sockets(pids: list[int], server_port: int) -> dict[int, list[int]]:
    """For each pid, the local ports of its established TCP connections to ``server_port``.

    Read from /proc (the socket inodes each process holds open), so it shows which OS process
    really owns each client socket that pg_stat_activity lists by client_port.
    """
    client_ports: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == server_port:  # 01: ESTABLISHED
            client_ports[inode] = int(local.split(":")[1], 16)
    owned: dict[int, list[int]] = {}
    for pid in pids:
        ports = []
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in client_ports:
                        ports.append(client_ports[target[8:-1]])
        owned[pid] = sorted(ports)
    return owned


def seed_items(service: ServiceProcess, count: int, prefix: str) -> list[int]:
    """Create ``count`` items (named ``<prefix>-<n>``) through the service; their ids."""
    ids = []
    for number in range(count):
        status, _, body = request(service.port, "POST", "/items", {"name": f"{prefix}-{number}"})
        assert status == 201, body
        ids.append(body["id"])
    return ids


@contextlib.contextmanager
def items_locked(database: PostgresCluster) -> Iterator[None]:
    """A superuser transaction holds ACCESS EXCLUSIVE on items until the block ends.

    Every query of the service on items blocks inside PostgreSQL meanwhile, holding its pooled
    connection; the lock is released (rolled back) however the block ends.
    """
    locker = database.connect(dbname=database.app_db, autocommit=False)
    try:
        locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        locker.rollback()
        locker.close()


def held_requests(service: ServiceProcess, path: str, count: int, timeout: float) -> BackgroundLoad:
    """``count`` concurrent ``GET path`` requests, one per client, started in the background."""
    return BackgroundLoad(
        service.port,
        repeat_get(path),
        clients=count,
        duration=0.5,
        max_requests=count,
        timeout=timeout,
    ).start()
