"""Fail closed, the rest: Lambda, PgBouncer's per-database and per-user pools, exit codes.

Each row edits a rendered service the way a team does and runs the generated
`pytest tests/test_connection_budget.py` and `poolwise budget` in it (test_effective_budget's
`check`): both give the row's verdict, and the CLI's first line holds the row's first fragment.
A row "fits" only where the edit is counted right and stays within the budget.

The tests after the rows run `poolwise fleet` and `poolwise doctor` on inputs that used to end
in a traceback or a wrong exit code: every one must now be exit 2 (or 1 when over) and one line.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from test_effective_budget import (
    BASE,
    LIMITS,
    PACKAGE,
    SAM,
    Row,
    in_project,
    judge,
    rendered,  # noqa: F401 - the fixture, shared so each answer set renders once
    replace_once,
)
from tools import kubectl

INI = "deploy/pgbouncer/pgbouncer.ini"
TOPOLOGY = f"src/{PACKAGE}/db/topology.toml"
KUSTOMIZATION = f"{BASE}/kustomization.yaml"
# What the generated test calls deploy/ when it cannot even list its variants.
UNLISTED = "deploy"


# ----------------------------------------------------------------------------- Lambda edits


def sam_function(
    name: str,
    *,
    zip_handler: str = "",
    reserved: int | None = 200,
    events: str = "",
    extra: str = "",
) -> str:
    """One AWS::Serverless::Function of this package: an image function, or a Zip one."""
    lines = [f"  {name}:", "    Type: AWS::Serverless::Function", "    Properties:"]
    if zip_handler:
        lines += ["      PackageType: Zip", "      Runtime: python3.12", "      CodeUri: ../../src"]
        lines += [f"      Handler: {zip_handler}"]
    else:
        lines += ["      PackageType: Image", "      ImageConfig:", "        Command:"]
        lines += [f"          - {PACKAGE}.handler.handler"]
    if reserved is not None:
        lines.append(f"      ReservedConcurrentExecutions: {reserved}")
    return "\n".join(lines) + "\n" + extra + events + "\n"


def add_sam_function(function: str) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        marker = "  # Alembic `upgrade head`"
        replace_once(project, SAM, marker, function + marker)

    return apply


def second_template(function: str) -> Callable[[Path], None]:
    """A second SAM template next to the first, deployed as its own stack."""

    def apply(project: Path) -> None:
        (project / "deploy/lambda/worker.yaml").write_text(
            'AWSTemplateFormatVersion: "2010-09-09"\n'
            "Transform: AWS::Serverless-2016-10-31\n"
            "Resources:\n" + function
        )

    return apply


SQS_CAPPED = (
    "      Events:\n"
    "        Queue:\n"
    "          Type: SQS\n"
    "          Properties:\n"
    "            Queue: !GetAtt WorkQueue.Arn\n"
    "            ScalingConfig:\n"
    "              MaximumConcurrency: 5\n"
)
# The same queue, and an HTTP route that Lambda scales up to the reserved concurrency.
SQS_AND_API = SQS_CAPPED + (
    "        Api:\n"
    "          Type: HttpApi\n"
    "          Properties:\n"
    "            Method: GET\n"
    "            Path: /work\n"
)


def provisioned_above_reserved(project: Path) -> None:
    replace_once(
        project,
        SAM,
        "      ReservedConcurrentExecutions: 10\n",
        "      ReservedConcurrentExecutions: 10\n"
        "      AutoPublishAlias: live\n"
        "      ProvisionedConcurrencyConfig:\n"
        "        ProvisionedConcurrentExecutions: 20\n",
    )


def pool_size_in_globals(project: Path) -> None:
    """POOL_SIZE for every function, set once in SAM's Globals instead of in the function."""
    replace_once(project, SAM, '          POOL_SIZE: "1"\n', "")
    replace_once(
        project,
        SAM,
        "\nResources:\n",
        "\nGlobals:\n  Function:\n    Environment:\n      Variables:\n"
        '        POOL_SIZE: "50"\n\nResources:\n',
    )


# ----------------------------------------------------------------------------- PgBouncer edits


def ini_lines(section: str, *lines: str) -> Callable[[Path], None]:
    """Lines added at the top of a section of pgbouncer.ini (the section is added if missing)."""

    def apply(project: Path) -> None:
        path = project / INI
        text = path.read_text()
        header = f"[{section}]\n"
        added = "".join(f"{line}\n" for line in lines)
        if header in text:
            path.write_text(text.replace(header, header + added, 1))
        else:
            path.write_text(f"{text}\n{header}{added}")

    return apply


# ----------------------------------------------------------------------------- input edits


def rewrite(relative: str, old: str, new: str) -> Callable[[Path], None]:
    return lambda project: replace_once(project, relative, old, new)


def append(relative: str, text: str) -> Callable[[Path], None]:
    def apply(project: Path) -> None:
        path = project / relative
        path.write_text(path.read_text() + text)

    return apply


def empty_resources(project: Path) -> None:
    """`resources:` left empty: the base builds to nothing."""
    path = project / KUSTOMIZATION
    kept, skipping = [], False
    for line in path.read_text().splitlines():
        if line.startswith("resources:"):
            kept.append("resources:")
            skipping = True
            continue
        if skipping and (line.startswith("  ") or line.startswith("#")):
            continue
        skipping = False
        kept.append(line)
    path.write_text("\n".join(kept) + "\n")


ROWS = [
    # 7. Lambda.
    Row(
        "zip-function-in-a-second-template-without-reserved-concurrency",
        "lambda",
        second_template(
            sam_function("WorkerFunction", zip_handler=f"{PACKAGE}.handler.handler", reserved=None)
        ),
        "unreadable",
        (
            "deploy/lambda/worker.yaml: Resources.WorkerFunction.Properties"
            ".ReservedConcurrentExecutions is missing -> an unreserved function scales to the"
            " account's concurrency limit",
        ),
        variant=SAM,
        restore=True,
    ),
    Row(
        "zip-function-in-a-second-template-over",
        "lambda",
        second_template(sam_function("WorkerFunction", zip_handler=f"{PACKAGE}.handler.handler")),
        "over",
        (
            "deploy/lambda/worker.yaml: Resources.WorkerFunction.Properties"
            ".ReservedConcurrentExecutions=200 -> connection budget exceeded",
            "[Function/WorkerFunction: 200 lambda_reserved_concurrency x 1 (NullPool) = 200]",
        ),
        variant=SAM,
    ),
    Row(
        "zip-function-of-another-package-is-not-this-service",
        "lambda",
        second_template(sam_function("ResizeFunction", zip_handler="thumbnails.app.handler")),
        "fits",
        ("lambda_reserved_concurrency = 10",),
        variant=SAM,
    ),
    Row(
        "sqs-maximum-concurrency-below-reserved",
        "lambda",
        add_sam_function(sam_function("WorkerFunction", events=SQS_CAPPED)),
        "fits",
        (
            "[Function/WorkerFunction: 5 lambda_reserved_concurrency x 1 (NullPool) = 5]",
            "lambda_reserved_concurrency = 5  (deploy/lambda/template.yaml: Resources"
            ".WorkerFunction.Properties.Events.Queue.Properties.ScalingConfig.MaximumConcurrency",
        ),
        variant=SAM,
    ),
    Row(
        "sqs-maximum-concurrency-with-an-api-event-too",
        "lambda",
        add_sam_function(sam_function("WorkerFunction", events=SQS_AND_API)),
        "over",
        (
            "deploy/lambda/template.yaml: Resources.WorkerFunction.Properties"
            ".ReservedConcurrentExecutions=200 -> connection budget exceeded",
        ),
        variant=SAM,
    ),
    Row(
        "provisioned-concurrency-above-reserved",
        "lambda",
        provisioned_above_reserved,
        "over",
        (
            "deploy/lambda/template.yaml: Resources.ServiceFunction.Properties"
            ".ProvisionedConcurrencyConfig.ProvisionedConcurrentExecutions=20 -> above",
        ),
        variant=SAM,
    ),
    Row(
        "pool-size-in-sam-globals",
        "lambda-pgbouncer-pool",
        pool_size_in_globals,
        "over",
        (
            "deploy/lambda/template.yaml: Resources.ServiceFunction.Properties.Environment"
            ".Variables.POOL_SIZE=50",
        ),
        variant=SAM,
    ),
    # 8. PgBouncer: every setting that changes its server connections.
    Row(
        "pgbouncer-databases-pool-size",
        "pgbouncer-tx",
        ini_lines("databases", "reports = host=db dbname=reports pool_size=90"),
        "over",
        ("[databases] reports pool_size=90",),
        restore=True,
    ),
    Row(
        "pgbouncer-users-pool-size",
        "pgbouncer-tx",
        ini_lines("users", "poolwise_service = pool_size=100"),
        "over",
        ("[users] poolwise_service pool_size=100",),
    ),
    Row(
        "pgbouncer-users-reserve-pool-size",
        "pgbouncer-tx",
        ini_lines("users", "poolwise_service = reserve_pool_size=90"),
        "over",
        ("[users] poolwise_service reserve_pool_size=90",),
    ),
    Row(
        "pgbouncer-databases-max-db-connections-unset",
        "pgbouncer-tx",
        ini_lines("databases", "reports = host=db dbname=reports pool_size=5 max_db_connections=0"),
        "over",
        ("[databases] reports max_db_connections=0 -> it must be set and <= pool_size",),
    ),
    Row(
        "pgbouncer-another-database-adds-its-pool",
        "pgbouncer-tx",
        ini_lines("databases", "reports = host=db dbname=reports pool_size=5 max_db_connections=5"),
        "fits",
        ("+ 5 of the other [databases] = 25",),
    ),
    Row(
        "pgbouncer-fallback-database",
        "pgbouncer-tx",
        ini_lines("databases", "* = host=db"),
        "over",
        ("[databases] * -> a fallback database gives every database name",),
    ),
    Row(
        "pgbouncer-databases-pool-size-behind-lambda",
        "lambda-pgbouncer-pool",
        ini_lines("databases", "reports = host=db dbname=reports pool_size=90"),
        "over",
        ("[databases] reports pool_size=90",),
        variant=SAM,
    ),
    # 10. Inputs that used to end in a traceback or a bare key name.
    Row(
        "kustomization-syntax-error",
        "k8s-sync",
        append(KUSTOMIZATION, "resources: [deployment.yaml\n"),
        "unreadable",
        ("deploy/k8s/kustomization.yaml: line",),
        variant=UNLISTED,
    ),
    Row(
        "kustomization-resources-empty",
        "k8s-sync",
        empty_resources,
        "unreadable",
        # The manifests are still there, and nothing reads them now: refused by name.
        ("deploy/k8s/configmap.yaml: no kustomization or Helm chart under deploy/ reads it",),
    ),
    Row(
        "limits-max-connections-quoted",
        "k8s-sync",
        rewrite(LIMITS, "max_connections = 100", 'max_connections = "100"'),
        "unreadable",
        (
            f"{LIMITS}: database.max_connections = '100' -> it must be a whole number of"
            " connections",
        ),
        restore=True,
    ),
    Row(
        "limits-max-connections-missing",
        "k8s-sync",
        rewrite(LIMITS, "max_connections = 100\n", ""),
        "unreadable",
        (f"{LIMITS}: database.max_connections is missing -> the connection budget needs it",),
        restore=True,
    ),
    Row(
        "limits-not-toml",
        "lambda",
        append(LIMITS, "[[[\n"),
        "unreadable",
        (f"{LIMITS}: not valid TOML",),
        variant=SAM,
        restore=True,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_a_shape_is_counted_right_or_refused_by_name(
    rendered: Callable[[str], Path],  # noqa: F811
    tmp_path: Path,
    row: Row,
) -> None:
    judge(rendered, tmp_path, row)


# ----------------------------------------------------------------------------- fleet and doctor


def poolwise(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return in_project(project, "-m", "poolwise", *args)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """stderr, which must be exactly one line and no traceback."""
    shown = result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, shown
    return lines[0]


@pytest.fixture
def service(rendered: Callable[[str], Path], tmp_path: Path) -> Path:  # noqa: F811
    kubectl("poolwise fleet reads deploy/ as kustomize builds it")
    project = tmp_path / "service"
    shutil.copytree(rendered("k8s-sync"), project)
    return project


def test_fleet_svg_into_a_missing_folder_is_exit_2(service: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder" / "fleet.svg"
    result = poolwise(service, "fleet", ".", "--svg", str(missing))
    assert result.returncode == 2, result.stdout + result.stderr
    assert one_line(result) == f"poolwise fleet: --svg {missing}: No such file or directory"


def test_fleet_limits_for_a_cluster_no_service_uses_is_exit_2(
    service: Path, tmp_path: Path
) -> None:
    limits = tmp_path / "platform.yaml"
    limits.write_text("db_cluster: mian\ndb_max_connections: 50\n")
    result = poolwise(service, "fleet", ".", "--limits", str(limits))
    assert result.returncode == 2, result.stdout + result.stderr
    assert one_line(result) == (
        f"poolwise fleet: --limits {limits}: db_cluster mian -> no service at the paths uses it"
        " (theirs: main); fix db_cluster in the file"
    )
    # The same file with the right name is evaluated: 30 connections do not hold the service.
    limits.write_text("db_cluster: main\ndb_max_connections: 30\n")
    result = poolwise(service, "fleet", ".", "--limits", str(limits))
    assert result.returncode == 1, result.stdout + result.stderr


def test_fleet_uses_the_smallest_max_connections_the_services_declare(
    service: Path, tmp_path: Path
) -> None:
    # Another service on the same cluster, told a smaller max_connections than this one.
    other = tmp_path / "other"
    shutil.copytree(service, other)
    replace_once(
        other,
        "src/poolwise_service/db/topology.toml",
        'name = "poolwise-service"',
        'name = "other-service"',
    )
    replace_once(other, LIMITS, "max_connections = 100", "max_connections = 60")
    result = poolwise(service, "fleet", str(service), str(other))
    shown = result.stdout[-4000:] + result.stderr[-2000:]
    assert "the services disagree on max_connections - reserved" in result.stdout, shown
    assert "the smallest, 60 - 3, is used" in result.stdout, shown
    # Two services of 51 connections each do not fit in 60 - 3: over, exit 1.
    assert result.returncode == 1, shown
    assert "cluster main: 102 of 57 available (60 max_connections - 3 reserved)" in result.stdout, (
        shown
    )


@pytest.mark.parametrize(
    "command",
    [
        ("budget", "."),
        ("fleet", "."),
        ("doctor", ".", "--dsn", "postgresql://monitor@127.0.0.1:1/postgres"),
    ],
    ids=lambda command: command[0],
)
def test_a_mistyped_limit_is_exit_2_and_one_line_everywhere(
    service: Path, command: tuple[str, ...]
) -> None:
    replace_once(service, LIMITS, "max_connections = 100", 'max_connections = "100"')
    result = poolwise(service, *command)
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_line(result)
    assert (
        f"{LIMITS}: database.max_connections = '100' -> it must be a whole number of connections"
        in line
    ), line


# The service's own code reads topology.toml too (settings.py, db/guard.py): a project whose
# topology.toml is broken cannot import, so its generated test cannot run at all. The CLI,
# which fleet and doctor share, refuses it with exit 2 and one line.
@pytest.mark.parametrize(
    ("edit", "line"),
    [
        (
            rewrite(TOPOLOGY, "pool_size = 5\n", 'pool_size = "5"\n'),
            f"{TOPOLOGY}: pool.pool_size = '5' -> it must be a whole number, written without"
            " quotes; fix it, or answer again with `copier update`",
        ),
        (
            rewrite(TOPOLOGY, 'target = "k8s-sync"', "target = 3"),
            f"{TOPOLOGY}: service.target = 3 -> it must be a quoted string",
        ),
        (
            rewrite(TOPOLOGY, 'target = "k8s-sync"', 'target = "k8s"'),
            f"{TOPOLOGY}: service.target = 'k8s' -> one of k8s-sync, k8s-async, lambda, batch",
        ),
        (append(TOPOLOGY, "[[[\n"), f"{TOPOLOGY}: not valid TOML"),
        (
            rewrite(LIMITS, "[database]", "[databases]"),
            f"{LIMITS}: the [database] table is missing",
        ),
    ],
    ids=["pool-size-quoted", "target-a-number", "target-unknown", "not-toml", "no-database"],
)
def test_a_broken_data_file_is_exit_2_and_one_line(
    service: Path, edit: Callable[[Path], None], line: str
) -> None:
    edit(service)
    for command in (("budget", "."), ("fleet", ".")):
        result = poolwise(service, *command)
        assert result.returncode == 2, result.stdout + result.stderr
        assert line in one_line(result), result.stderr


# ----------------------------------------------------------------------------- the rendered tests


def test_a_rendered_test_that_hangs_fails_by_name_within_the_timeout(service: Path) -> None:
    """pytest-timeout is configured in the project: a wait that never ends fails its test."""
    import tomllib

    options = tomllib.loads((service / "pyproject.toml").read_text())["tool"]["pytest"]
    assert options["ini_options"]["timeout"] == 120
    (service / "tests/test_hangs.py").write_text(
        "import threading\n\n\ndef test_waits_forever() -> None:\n    threading.Event().wait()\n"
    )
    # The project's own configuration, its timeout lowered so the check takes seconds.
    result = in_project(
        service,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "timeout=3",
        "tests/test_hangs.py",
    )
    shown = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 1, shown
    assert "Timeout" in result.stdout and "FAILED tests/test_hangs.py::test_waits_forever" in (
        result.stdout
    ), shown
