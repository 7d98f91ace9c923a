"""The platform team's golden path: database limits and pool policy from one data file.

`copier copy --data-file examples/platform.yml` answers those questions for every service on a
database; the values go through the same validators as `--data`, and `--data` still wins.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from rendering import TEMPLATE_ROOT, copier_copy, python, run_checked
from tools import kubectl

PLATFORM = TEMPLATE_ROOT / "examples" / "platform.yml"


def test_the_example_file_answers_the_database_questions(tmp_path: Path) -> None:
    platform = yaml.safe_load(PLATFORM.read_text())
    assert {
        "db_cluster",
        "db_max_connections",
        "db_reserved_connections",
        "db_external_consumers",
        "db_allocations",
        "other_consumers",
    } <= set(platform)

    # A service the file gives no share yet counts other_consumers.
    project = tmp_path / "orders"
    result = copier_copy(project, "--data-file", str(PLATFORM))

    assert result.returncode == 0, result.stderr[-2000:]
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    # Every answer is recorded but the shares of the other services, which it never carries.
    recorded = {key: value for key, value in platform.items() if key != "db_allocations"}
    assert {key: answers[key] for key in recorded} == recorded
    assert "db_allocations" not in answers and answers["db_allocation"] == 0
    limits = (project / "src" / "poolwise_service" / "db" / "database_limits.toml").read_text()
    assert f"max_connections = {platform['db_max_connections']}\n" in limits
    assert f"other_consumers = {platform['other_consumers']}\n" in limits
    assert f'cluster = "{platform["db_cluster"]}"\n' in limits
    for name, connections in platform["db_external_consumers"].items():
        assert f'"{name}" = {connections}\n' in limits
    declared = (project / "src" / "poolwise_service" / "db" / "topology.toml").read_text()
    assert f"\npool_recycle = {platform['pool_recycle']}\n" in declared
    available = (
        platform["db_max_connections"]
        - platform["db_reserved_connections"]
        - platform["other_consumers"]
    )
    kubectl("the budget command's reading of deploy/k8s")
    table = run_checked(python("-m", "poolwise", "budget"), project / "src")
    assert f"{available} available (db_max_connections {platform['db_max_connections']}" in table


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    project = tmp_path / "orders"
    result = copier_copy(project, "--data-file", str(PLATFORM), "--data", "pool_recycle=900")

    assert result.returncode == 0, result.stderr[-2000:]
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["pool_recycle"] == 900
    assert (
        answers["db_max_connections"] == yaml.safe_load(PLATFORM.read_text())["db_max_connections"]
    )


def test_a_file_that_breaks_the_budget_is_refused_like_data(tmp_path: Path) -> None:
    crowded = tmp_path / "platform.yml"
    crowded.write_text(
        re.sub(r"(?m)^other_consumers: \d+$", "other_consumers: 370", PLATFORM.read_text())
    )
    as_data = [
        arg
        for key, value in yaml.safe_load(crowded.read_text()).items()
        for arg in ("--data", f"{key}={value}")
    ]

    from_file = copier_copy(tmp_path / "from-file", "--data-file", str(crowded))
    from_data = copier_copy(tmp_path / "from-data", *as_data)

    assert from_file.returncode == from_data.returncode == 1
    last_line = from_file.stderr.strip().splitlines()[-1]
    assert last_line == from_data.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "ValueError: Validation error for question 'max_overflow': connection budget exceeded"
    )
    assert "- other_consumers 370). Fix:" in last_line
    assert not (tmp_path / "from-file").exists()


def test_a_service_the_file_gives_a_share_is_checked_against_it_alone(tmp_path: Path) -> None:
    platform = yaml.safe_load(PLATFORM.read_text())
    share = platform["db_allocations"]["orders-api"]
    project = tmp_path / "orders-api"
    result = copier_copy(
        project, "--data-file", str(PLATFORM), answers={"project_name": "orders-api"}
    )

    assert result.returncode == 0, result.stderr[-2000:]
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["db_allocation"] == share
    assert "other_consumers" not in answers and "db_allocations" not in answers
    limits = (project / "src" / "orders_api" / "db" / "database_limits.toml").read_text()
    assert f"\nallocation = {share}\n" in limits and "other_consumers =" not in limits
    assert not [
        name for name in platform["db_allocations"] if name != "orders-api" and name in limits
    ]
    kubectl("the budget command's reading of deploy/k8s")
    table = run_checked(python("-m", "poolwise", "budget"), project / "src")
    assert f"= 51 <= allocation {share} (db/database_limits.toml)" in table
    assert f"of {share} allocated PostgreSQL connections" in result.stdout + result.stderr
