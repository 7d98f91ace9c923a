"""Every supported answer set renders into a project whose own checks pass."""

from __future__ import annotations

import pytest
import yaml
from cases import SUPPORTED, Case
from rendering import jinja_leftovers, python, run_checked


@pytest.mark.parametrize("case", SUPPORTED, ids=lambda case: case.id)
def test_rendered_project_passes_its_own_tests_and_lint(render, case: Case) -> None:
    project = render(case.answers)

    assert jinja_leftovers(project) == []
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    for question, value in case.answers.items():
        assert answers[question] == value
    assert not list(project.rglob("__pycache__"))

    run_checked(python("-m", "ruff", "check", "--no-cache", "."), project)
    run_checked(python("-m", "ruff", "format", "--check", "--no-cache", "."), project)
    output = run_checked(python("-m", "pytest", "-q", "-p", "no:cacheprovider"), project)
    assert " passed" in output
    assert "failed" not in output


def test_defaults_give_a_k8s_sync_service_with_the_guide_profile(render) -> None:
    project = render({})
    package = project / "src" / "poolwise_service"
    assert (package / "app.py").is_file()
    assert not (package / "handler.py").exists()
    assert not (package / "job.py").exists()
    declared = (package / "db" / "topology.toml").read_text()
    for line in ("pool_size = 5", "max_overflow = 5", "pool_timeout = 5", "pool_recycle = 1800"):
        assert f"\n{line}\n" in declared
    # Settings take their defaults from the declared topology, not from numbers of their own.
    script = (
        "from poolwise_service.settings import Settings; s = Settings();"
        " print(s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle)"
    )
    assert run_checked(python("-c", script), project / "src").split() == ["5", "5", "5", "1800"]


def test_poolwise_budget_prints_the_rendered_table(render) -> None:
    project = render({"target": "lambda", "lambda_reserved_concurrency": 20})
    output = run_checked(python("-m", "poolwise", "budget"), project / "src")
    # Run inside the service, the command reads deploy/ and names what it read.
    assert (
        "[ok] app -> database: Function/ServiceFunction: 20 lambda_reserved_concurrency"
        " x 1 (NullPool) = 20"
    ) in output
    assert (
        "lambda_reserved_concurrency = 20  (deploy/lambda/template.yaml:"
        " Resources.ServiceFunction.Properties.ReservedConcurrentExecutions)"
    ) in output
