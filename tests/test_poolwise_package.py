"""One home for the budget: the `poolwise` package, what a service pins of it, `poolwise budget`.

The rule and the deploy/ readers live in src/poolwise only, with no import cycle; a rendered
service keeps its runtime (no module of it reads manifests or imports poolwise) and pins
poolwise to this release in its dev dependencies, which installs offline from this checkout's
wheel. `poolwise budget` prints every variant and exits 0 fits, 1 over, 2 unreadable, refusing
data files of a schema it does not know by file, version and fix.
"""

from __future__ import annotations

import ast
import json
import random
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from rendering import TEMPLATE_ROOT, clean_env, copier_copy, python, run, run_checked, succeeded
from test_budget_mirror import answer_context, render

from poolwise import declared, rule
from poolwise.shapes import Refused
from poolwise.shapes.processes import processes_for_argv

PACKAGE = "poolwise_service"
PYPROJECT = tomllib.loads((TEMPLATE_ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# main at the 0.2.0 release (tests/test_update.py builds its tag the same way).
RELEASE_0_2_0 = "013d1ed"
TOPOLOGY = f"src/{PACKAGE}/db/topology.toml"
LIMITS = f"src/{PACKAGE}/db/database_limits.toml"


def relative_imports(package: Path) -> dict[str, set[str]]:
    """Each module of a package and the modules of the same package it imports."""
    modules = {path.stem for path in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imported.add(node.module.split(".")[0])
                else:
                    imported |= {alias.name for alias in node.names if alias.name in modules}
        graph[path.stem] = imported & modules
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph, or [] when it has none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for neighbour in sorted(graph.get(node, ())):
            found = visit(neighbour, [*path, node])
            if found:
                return found
        done.add(node)
        return []

    return next((found for node in sorted(graph) if (found := visit(node, []))), [])


def poolwise(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`poolwise ARGS` as a team runs it in a service (this checkout's package)."""
    return run(python("-m", "poolwise", *args), cwd, timeout=180)


# ----------------------------------------------------------------------------- the package


def test_the_package_holds_the_rule_and_readers_as_real_files_without_an_import_cycle() -> None:
    package = TEMPLATE_ROOT / "src" / "poolwise"
    assert [path.name for path in package.iterdir() if path.is_symlink()] == []
    graph = relative_imports(package)
    assert {"rule", "declared", "deployed", "kustomize", "workloads", "poolers", "sam"} <= set(
        graph
    )
    assert cycle(graph) == []


def test_the_template_pins_this_release_of_poolwise() -> None:
    copier_version = yaml.safe_load((TEMPLATE_ROOT / "copier.yml").read_text())
    assert copier_version["poolwise_version"]["default"] == VERSION
    rendered = render(
        (TEMPLATE_ROOT / "template" / "pyproject.toml.jinja").read_text(), answer_context({})
    )
    assert (
        f"poolwise=={VERSION}" in tomllib.loads(rendered)["project"]["optional-dependencies"]["dev"]
    )


# ----------------------------------------------------------------------------- a service


@pytest.mark.parametrize("target", ["k8s-sync", "k8s-async", "lambda", "batch"])
def test_a_service_keeps_its_runtime_without_readers_or_import_cycles(render, target) -> None:
    package = render({"target": target}) / "src" / PACKAGE
    assert not (package / "db" / "budget.py").exists()
    assert not (package / "db" / "deployed.py").exists()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {
            name.split(".")[0]
            for node in ast.walk(tree)
            for name in (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
        }
        # The image installs no dev dependency, and nothing at runtime reads deploy/.
        assert not imported & {"poolwise", "yaml", "subprocess"}, path
    for directory in [package, *(path for path in package.rglob("*") if path.is_dir())]:
        assert cycle(relative_imports(directory)) == [], directory


def test_the_runtime_guard_reads_worker_counts_and_drivers_as_poolwise_does(render) -> None:
    """The guard's copy of the few rules a process needs gives poolwise's answers: worker
    counts as poolwise.shapes.processes reads them, drivers as poolwise.rule judges them."""
    project = render({"target": "k8s-async"})
    generator = random.Random(18)
    # Command lines as a running server sees them in sys.argv, and the environment it reads.
    programs = [
        ["/usr/local/bin/uvicorn"],
        ["/venv/lib/python3.12/site-packages/uvicorn/__main__.py"],
        ["gunicorn"],
        ["/usr/local/bin/fastapi", "run"],
        ["fastapi", "dev"],
        ["hypercorn"],
        [f"/app/src/{PACKAGE}/__main__.py"],
    ]
    tokens = ["app:create_app", "--workers", "-w", "--workers=3", "-w4", "8", "0", "x"]
    tokens += ["--factory", "--reload", "-k", "-w=2", "--port", "--workers="]
    variables = ["WEB_CONCURRENCY", "UVICORN_WORKERS", "GUNICORN_CMD_ARGS"]
    values = ["2", "5", "0", "x", "-w 6", "--timeout 3 --workers=7", "--workers"]
    argvs, envs = [], []
    for _ in range(1500):
        head = generator.choice(programs)
        argvs.append([*head, *(generator.choice(tokens) for _ in range(generator.randint(0, 5)))])
        chosen = generator.sample(variables, generator.randint(0, 3))
        envs.append({name: generator.choice(values) for name in chosen})
    default = 2

    def verdict(argv: list[str], environ: dict[str, str]) -> list[object]:
        try:
            return ["ok", processes_for_argv(argv, environ, package=PACKAGE, default=default)]
        except Refused:
            return ["error"]

    combos = [
        (pooler, mode, driver)
        for pooler in rule.POOLERS
        for mode in rule.POOL_MODES
        for driver in ("asyncpg", "psycopg")
    ]
    script = f"""
import json, sys
from {PACKAGE}.db import declared, guard
cases = json.load(sys.stdin)
def verdict(argv, environ):
    try:
        return ["ok", guard.workers_for(argv, environ, cases["default"])[0]]
    except ValueError:
        return ["error"]
workers = [verdict(argv, env) for argv, env in zip(cases["argvs"], cases["envs"])]
drivers = []
for pooler, mode, driver in cases["combos"]:
    guard.DECLARED["service"]["pooler"] = pooler
    guard.DECLARED["pgbouncer"] = {{"pool_mode": mode}}
    drivers.append(guard.driver_error(driver))
print(json.dumps({{"workers": workers, "drivers": drivers, "minimums": declared.MINIMUMS}}))
"""
    result = subprocess.run(
        python("-c", script),
        cwd=project,
        input=json.dumps({"argvs": argvs, "envs": envs, "default": default, "combos": combos}),
        env=clean_env(with_poolwise=False, PYTHONPATH="src"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    runtime = json.loads(succeeded(result, project).stdout)
    expected_workers = [verdict(argv, environ) for argv, environ in zip(argvs, envs, strict=True)]
    assert runtime["workers"] == expected_workers
    # Both outcomes and several counts occur, so the comparison says something.
    assert {"ok", "error"} <= {found[0] for found in expected_workers}
    assert len({found[1] for found in expected_workers if found[0] == "ok"}) >= 5
    expected = [
        rule.driver_error(
            rule.Topology("k8s-async", (), pooler=pooler, pool_mode=mode, driver=driver)
        )
        for pooler, mode, driver in combos
    ]
    assert runtime["drivers"] == expected
    assert any(expected) and not all(expected)
    minimums = runtime["minimums"]
    assert minimums == {name: rule.MINIMUMS[name] for name in minimums}


def test_a_services_pin_installs_offline_from_this_checkouts_wheel(render, tmp_path) -> None:
    project = render({"target": "lambda"})
    dev = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    pin = next(line for line in dev["optional-dependencies"]["dev"] if line.startswith("poolwise"))
    # What the package is built from, copied so the build leaves no files in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(TEMPLATE_ROOT / name, source / name)
    shutil.copytree(TEMPLATE_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.pyc"))
    wheelhouse, site = tmp_path / "wheelhouse", tmp_path / "site"
    # The build fetches its backend (setuptools>=77) as any isolated build does; the shared
    # environment's packaging is too old for it (checkov's pin, pyproject.toml).
    build = ["wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheelhouse), str(source)]
    run_checked(python("-m", "pip", *build), tmp_path, timeout=600)
    # The service's pin, from that wheel alone: no index.
    offline = ["--no-index", "--no-deps", "--quiet", "--find-links", str(wheelhouse)]
    install = ["install", *offline, "--target", str(site), pin]
    run_checked(python("-m", "pip", *install), tmp_path, timeout=600)
    assert (site / "poolwise" / "rule.py").is_file()
    assert not (site / "poolwise" / "rule.py").is_symlink()

    def installed(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            python(*args),
            cwd=project,
            env=clean_env(with_poolwise=False, PYTHONPATH=str(site)),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    assert (
        succeeded(installed("-m", "poolwise", "--version")).stdout.strip() == f"poolwise {VERSION}"
    )
    where = succeeded(installed("-c", "import poolwise; print(poolwise.__file__)")).stdout
    assert where.startswith(str(site)), where
    tested = succeeded(installed("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"))
    assert " passed" in tested.stdout and "failed" not in tested.stdout


# ----------------------------------------------------------------------------- poolwise budget


def test_budget_prints_every_variant_and_its_inputs_and_exits_by_the_verdict(render) -> None:
    project = render({"target": "lambda", "lambda_reserved_concurrency": 20})
    fits = poolwise("budget", cwd=project / "src")
    assert fits.returncode == 0, fits.stderr
    assert fits.stderr == ""
    assert "deploy/lambda/template.yaml:\nconnection budget for a lambda service" in fits.stdout
    assert "the inputs of the formula and where they are set:" in fits.stdout

    template = project / "deploy" / "lambda" / "template.yaml"
    template.write_text(
        template.read_text().replace(
            "ReservedConcurrentExecutions: 20", "ReservedConcurrentExecutions: 200", 1
        )
    )
    over = poolwise("budget", str(project), cwd=project.parent)
    assert over.returncode == 1, over.stdout + over.stderr
    assert over.stderr.startswith(
        "deploy/lambda/template.yaml: Resources.ServiceFunction.Properties"
        ".ReservedConcurrentExecutions=200 -> connection budget exceeded, app -> database:"
    ), over.stderr
    assert "[OVER] app -> database" in over.stdout

    template.write_text(template.read_text().replace(": 200", ": two hundred", 1))
    unreadable = poolwise("budget", str(project), cwd=project.parent)
    assert unreadable.returncode == 2, unreadable.stdout + unreadable.stderr
    assert "ReservedConcurrentExecutions='two hundred' -> not an integer" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr


def test_budget_without_a_service_or_without_deploy(render, tmp_path) -> None:
    nowhere = poolwise("budget", str(tmp_path), cwd=tmp_path)
    assert nowhere.returncode == 2
    assert nowhere.stderr == (
        f"poolwise budget: {tmp_path}: no service at or above it"
        " (src/<package>/db/topology.toml); give the path of a generated service\n"
    )
    project = render({"target": "lambda"})
    shutil.rmtree(project / "deploy")
    declared_only = poolwise("budget", cwd=project)
    assert declared_only.returncode == 0, declared_only.stderr
    assert f"no deploy/ in {project}: checking the declared topology only" in declared_only.stdout
    assert f"{TOPOLOGY} (declared):" in declared_only.stdout


@pytest.mark.parametrize("relative", [TOPOLOGY, LIMITS])
def test_a_data_file_of_an_unknown_schema_is_refused_by_file_version_and_fix(
    render, relative
) -> None:
    project = render({"target": "lambda"})
    path = project / relative
    assert path.read_text().count("\nschema = 1\n") == 1
    path.write_text(path.read_text().replace("\nschema = 1\n", "\nschema = 7\n"))
    refused = poolwise("budget", cwd=project)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (
        f"{relative}: schema = 7 -> this poolwise reads schema {declared.SCHEMA} and files"
        " without one (0.2.0); install the poolwise release the service pins in pyproject.toml,"
        " or fix the value"
    ) in refused.stderr
    assert "Traceback" not in refused.stderr
    fleet = poolwise("fleet", str(project), cwd=project)
    assert fleet.returncode == 2 and f"{relative}: schema = 7" in fleet.stderr, fleet.stderr


def test_a_service_from_0_2_0_is_read_without_a_schema(tmp_path) -> None:
    project = tmp_path / "orders"
    succeeded(copier_copy(project, answers={"target": "lambda"}, vcs_ref=RELEASE_0_2_0))
    for relative in (TOPOLOGY, LIMITS):
        assert "schema" not in tomllib.loads((project / relative).read_text())
    checked = poolwise("budget", cwd=project)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "[ok] app -> database: Function/ServiceFunction:" in checked.stdout


# ----------------------------------------------------------------------------- the rule


def test_six_replicas_of_two_workers_with_pool_20_need_240_connections() -> None:
    workload = rule.Workload(
        kind="k8s", replicas=6, processes_per_pod=2, pool_size=10, max_overflow=10
    )
    topology = rule.Topology(target="k8s-sync", workloads=(workload,))
    limits = rule.DatabaseLimits(max_connections=200, reserved_connections=0, other_consumers=0)
    failure = rule.first_failure(topology, limits)
    assert failure is not None
    assert failure.message() == (
        "connection budget exceeded, app -> database: (6 replicas_max + 0 max_surge"
        " + 0 terminating) x 2 workers_per_pod x (10 pool_size + 10 max_overflow) = 240"
        " + 1 migration = 241 > 200 available (db_max_connections 200 - db_reserved_connections 0"
        " - other_consumers 0). Fix: at 12 processes pool_size + max_overflow must be <= 16;"
        " or lower replicas_max, max_surge or workers_per_pod, or put a pooler in front"
    )
