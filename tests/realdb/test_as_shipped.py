"""The artifact as shipped: each target's image, rebuilt from its Dockerfile, against PostgreSQL.

The rest of the suite runs services from their source tree (``PYTHONPATH=src``); release 0.2.0
passed it with a wheel that lacked ``db/topology.toml``, so every pod and Lambda init crashed at
import. Here each target is installed the way its Dockerfile does it and run the way its image
runs (image.py): a non-editable ``pip install`` from a build context holding only what the
Dockerfile COPYs, a WORKDIR holding only what the final stage COPYs, the Dockerfile's USER
(non-root), ENV, ENTRYPOINT and CMD, nothing of src/ on sys.path.

* every file under src/ must be in the installed package, byte for byte;
* k8s-sync, k8s-async: the migration Job's command migrates a fresh database, then the image's
  CMD serves POST /items and GET /items/{id} and stops cleanly on SIGTERM;
* lambda: the image's ENTRYPOINT (awslambdaric) runs against the Lambda Runtime API
  (runtime_api.py): the MigrationFunction's command migrates, the service function answers API
  Gateway payload 2.0 events;
* batch: the migration Job's command, then one run of the image's CMD processes every item.

Not covered: the image build itself (no builder or base image here) and the base image's OS.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import PostgresCluster, free_ports
from image import ShippedImage
from loadgen import request
from psycopg import sql
from runtime_api import RuntimeApi
from services import RenderedProject, check_http_response, http_event

pytestmark = [pytest.mark.realdb, pytest.mark.xdist_group("realdb")]

# Each target as the realdb tier renders it (tests/realdb/conftest.py PROJECTS).
TARGETS = {"k8s-sync": "sync", "k8s-async": "async", "lambda": "lambda", "batch": "batch"}
START_TIMEOUT_S = 60.0  # a cold interpreter importing FastAPI on a loaded 2-core machine
STOP_TIMEOUT_S = 30.0
BATCH_ITEMS = 7
_databases = itertools.count(1)


@pytest.fixture(scope="module")
def image(project: Callable[[str], RenderedProject]) -> Iterator[Callable[[str], ShippedImage]]:
    """Build (once per module) the image of a target's rendered project."""
    built: dict[str, ShippedImage] = {}

    def get(target: str) -> ShippedImage:
        if target not in built:
            built[target] = ShippedImage.build(project(TARGETS[target]).root)
        return built[target]

    yield get
    for shipped in built.values():
        shipped.remove()


@pytest.fixture
def fresh_database(postgres: PostgresCluster) -> Iterator[tuple[str, str]]:
    """(name, URL) of an empty database owned by the application role: nothing migrated yet."""
    name = f"shipped_{next(_databases)}"
    postgres.psql(
        sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(postgres.app_user)
        )
    )
    yield name, postgres.dsn(dbname=name)
    postgres.psql(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def package_of(shipped: ShippedImage) -> str:
    return RenderedProject(shipped.project).package


def files_under(directory: Path) -> dict[str, bytes]:
    """Relative path -> content of every file below ``directory``; no bytecode."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def load_yaml(path: Path) -> Any:
    """A YAML file, CloudFormation's short-form tags (!Sub, !Ref, ...) read as plain values."""

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> object:
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_scalar(node)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node)
        return loader.construct_mapping(node)  # type: ignore[arg-type]

    Loader.add_multi_constructor("!", tagged)
    return yaml.load(path.read_text(), Loader=Loader)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def migration_job(shipped: ShippedImage) -> tuple[list[str], dict[str, str]]:
    """The k8s migration Job's command and plain env values (deploy/k8s/migration-job.yaml)."""
    job = load_yaml(shipped.project / "deploy" / "k8s" / "migration-job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    return container["command"], env


def migrate_as_the_job_does(shipped: ShippedImage, database_url: str) -> None:
    command, job_env = migration_job(shipped)
    proc = shipped.run(command, shipped.env(**job_env, DATABASE_URL=database_url))
    assert proc.returncode == 0, f"{' '.join(command)} in the image failed {output(proc)}"


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM to the main process, as Kubernetes sends it; its exit code (killed if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise AssertionError(f"pid {proc.pid} ignored SIGTERM for {timeout} s") from None


def wait_healthy(proc: subprocess.Popen, port: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if request(port, "GET", "/readyz", timeout=5)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def start_k8s_service(
    shipped: ShippedImage, database_url: str, log_path: Path
) -> tuple[subprocess.Popen, int]:
    """The image's CMD, once GET /readyz answers 200; (process, port)."""
    log = ""
    for _attempt in range(3):  # bounded retry on the free-port race
        port, metrics_port = free_ports(2)
        # HOST: the image listens on 0.0.0.0; tests listen on 127.0.0.1 only. The image's
        # METRICS_PORT is a fixed port, which tests running at once would share: each its own.
        env = shipped.env(
            HOST="127.0.0.1", PORT=port, METRICS_PORT=metrics_port, DATABASE_URL=database_url
        )
        with log_path.open("wb") as sink:
            proc = shipped.popen(
                shipped.command(), env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
            )
        try:
            healthy = wait_healthy(proc, port)
        except BaseException:
            stop(proc)
            raise
        if healthy:
            return proc, port
        stop(proc)
        log = log_path.read_text(errors="replace")
        if "address already in use" not in log.lower():
            break
    raise AssertionError(f"`{' '.join(shipped.command())}` did not start:\n{log[-4000:]}")


# ------------------------------------------------------------------------------ the install


@pytest.mark.parametrize("target", TARGETS)
def test_the_installed_package_is_every_file_under_src(
    image: Callable[[str], ShippedImage], target: str
) -> None:
    shipped = image(target)
    src = shipped.project / "src"
    expected = files_under(src)
    installed = {
        path: content
        for path, content in files_under(shipped.site_packages).items()
        if path.split("/")[0] in {entry.name for entry in src.iterdir()}
    }
    missing = sorted(set(expected) - set(installed))
    assert not missing, (
        f"{target}: the image's install lacks {', '.join(f'src/{p}' for p in missing)}"
        " (pyproject.toml [tool.setuptools.package-data] must ship every data file)"
    )
    extra = sorted(set(installed) - set(expected))
    assert not extra, f"{target}: the install has files that are not under src/: {extra}"
    differ = sorted(path for path in expected if expected[path] != installed[path])
    assert not differ, f"{target}: installed files differ from src/: {differ}"


@pytest.mark.parametrize("target", TARGETS)
def test_the_service_comes_only_from_the_built_wheel(
    image: Callable[[str], ShippedImage], target: str
) -> None:
    """Import resolution in the image: the package is found once, in the venv, not editable;
    the WORKDIR holds only what the Dockerfile copies; `pip check` finds every requirement."""
    shipped = image(target)
    package = package_of(shipped)
    name = tomllib.loads((shipped.project / "pyproject.toml").read_text())["project"]["name"]
    probe = f"""
import importlib.metadata, json, os, sys
import {package}
dist = importlib.metadata.distribution({name!r})
print(json.dumps({{
    "file": {package}.__file__,
    "found_in": [p for p in sys.path if os.path.exists(os.path.join(p or ".", "{package}"))],
    "direct_url": json.loads(dist.read_text("direct_url.json") or "{{}}"),
    "uid": os.getuid(),
    "cwd": sorted(os.listdir(".")),
}}))
"""
    proc = shipped.run(["python", "-c", probe], shipped.env())
    assert proc.returncode == 0, f"{target}: importing {package} in the image failed {output(proc)}"
    seen = json.loads(proc.stdout)
    assert seen["file"] == str(shipped.site_packages / package / "__init__.py"), seen
    assert seen["found_in"] == [str(shipped.site_packages)], seen
    assert seen["direct_url"].get("dir_info", {}).get("editable") is not True, seen
    assert seen["uid"] == (shipped.user[0] if shipped.run_as() else os.geteuid()) != 0, seen
    copied = [
        Path(source).name
        for copy in shipped.final.all("COPY")
        if "from" not in copy.words()[0]
        for source in copy.words()[1][:-1]
    ]
    # alembic.ini: `alembic upgrade head` (the migration Job) runs from the WORKDIR.
    assert seen["cwd"] == sorted(copied) and "alembic.ini" in copied, (seen, copied)
    check = shipped.run(["python", "-m", "pip", "check"], shipped.env())
    assert check.returncode == 0, f"{target}: pip check in the image {output(check)}"


# ------------------------------------------------------------------------------ running it


@pytest.mark.parametrize("target", ["k8s-sync", "k8s-async"])
def test_k8s_image_migrates_starts_and_answers(
    image: Callable[[str], ShippedImage],
    fresh_database: tuple[str, str],
    realdb_dir: Path,
    target: str,
) -> None:
    shipped = image(target)
    _, database_url = fresh_database
    migrate_as_the_job_does(shipped, database_url)
    log_path = realdb_dir / "logs" / f"shipped-{target}.log"
    log_path.parent.mkdir(exist_ok=True)
    proc, port = start_k8s_service(shipped, database_url, log_path)
    try:
        status, _, created = request(port, "POST", "/items", {"name": f"shipped-{target}"})
        assert status == 201, (status, created)
        status, _, read = request(port, "GET", f"/items/{created['id']}")
        assert status == 200 and read == created, (status, read, created)
    finally:
        code = stop(proc)
    # uvicorn re-raises SIGTERM after its graceful shutdown (single process), or exits 0
    # (test_shutdown.py); the log shows the shutdown completed either way.
    log = log_path.read_text(errors="replace")
    assert code in (0, -signal.SIGTERM), f"{target}: exit {code} after SIGTERM:\n{log[-4000:]}"
    assert "Application shutdown complete" in log, log[-4000:]


def test_batch_image_migrates_and_completes_one_run(
    image: Callable[[str], ShippedImage],
    fresh_database: tuple[str, str],
    postgres: PostgresCluster,
) -> None:
    shipped = image("batch")
    name, database_url = fresh_database
    migrate_as_the_job_does(shipped, database_url)
    postgres.psql(
        "INSERT INTO items (name) SELECT 'shipped-' || n FROM generate_series(1, %s) AS n",
        (BATCH_ITEMS,),
        dbname=name,
    )
    proc = shipped.popen(
        shipped.command(),
        shipped.env(DATABASE_URL=database_url),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    assert proc.returncode == 0, f"`{' '.join(shipped.command())}` exited {proc.returncode}:\n{log}"
    rows = postgres.psql(
        "SELECT count(*) FILTER (WHERE processed), count(*) FROM items", dbname=name
    )
    assert rows == [(BATCH_ITEMS, BATCH_ITEMS)], (rows, log)


def test_lambda_image_migrates_and_answers_api_gateway_events(
    image: Callable[[str], ShippedImage], fresh_database: tuple[str, str]
) -> None:
    shipped = image("lambda")
    _, database_url = fresh_database
    resources = load_yaml(shipped.project / "deploy" / "lambda" / "template.yaml")["Resources"]
    migration = resources["MigrationFunction"]["Properties"]
    with lambda_function(
        shipped,
        database_url,
        migration["Environment"]["Variables"],
        *migration["ImageConfig"]["Command"],
    ) as invoke:
        assert invoke({}) == {"statusCode": 200, "migrated": "head"}
    service = resources["ServiceFunction"]["Properties"]
    with lambda_function(shipped, database_url, service["Environment"]["Variables"]) as invoke:
        created = check_http_response(invoke(http_event("POST", "/items", {"name": "shipped"})))
        assert created["statusCode"] == 201, created
        item = json.loads(created["body"])
        read = check_http_response(invoke(http_event("GET", f"/items/{item['id']}")))
        assert read["statusCode"] == 200 and json.loads(read["body"]) == item, read


@contextlib.contextmanager
def lambda_function(
    shipped: ShippedImage, database_url: str, variables: dict[str, Any], *cmd_override: str
) -> Iterator[Callable[[Any], Any]]:
    """One execution environment of the image: its ENTRYPOINT and CMD (or the function's
    ImageConfig.Command), the function's plain variables, the test's database; ``invoke``."""
    api = RuntimeApi().start()
    plain = {k: v for k, v in variables.items() if isinstance(v, str) and k != "DATABASE_URL"}
    env = shipped.env(**plain, DATABASE_URL=database_url, AWS_LAMBDA_RUNTIME_API=api.address)
    command = shipped.command(*cmd_override)
    proc = shipped.popen(
        command, env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    def logs() -> str:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate(timeout=10)
        return out.decode(errors="replace")[-4000:]

    def invoke(event: Any) -> Any:
        try:
            outcome = api.invoke(event, alive=lambda: proc.poll() is None)
        except AssertionError as failure:
            raise AssertionError(f"`{' '.join(command)}`: {failure}\n{logs()}") from None
        if outcome.kind != "response":
            body = outcome.body
            if not isinstance(body, dict):
                body = {"errorMessage": body}
            raise AssertionError(
                f"`{' '.join(command)}` answered a function error,"
                f" {body.get('errorType')}: {body.get('errorMessage')}\n{logs()}"
            )
        return outcome.body

    try:
        yield invoke
    finally:
        # Lambda discards an execution environment without a signal: nothing to wait for.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        api.close()
