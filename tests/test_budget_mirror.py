"""The copier validators and the rendered db/budget.py are one rule: same verdicts, same totals.

For thousands of generated answer sets this renders what copier renders (the computed values of
copier.yml, the rendered db/topology.toml and db/database_limits.toml) and compares budget.py's
checks with includes/budget.jinja's, line for line.
"""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from functools import cache
from typing import Any

import jinja2
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rendering import TEMPLATE_ROOT

PACKAGE_DIR = TEMPLATE_ROOT / "template" / "src" / "{{package_name}}" / "db"


@cache
def budget_module():
    spec = importlib.util.spec_from_file_location("rendered_budget", PACKAGE_DIR / "budget.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@cache
def copier_config() -> dict[str, Any]:
    return yaml.safe_load((TEMPLATE_ROOT / "copier.yml").read_text())


@cache
def environment() -> jinja2.Environment:
    envops = copier_config()["_envops"]
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_ROOT),
        undefined=jinja2.StrictUndefined,
        **envops,
    )


@cache
def compiled(source: str) -> jinja2.Template:
    return environment().from_string(source)


def render(source: str, context: dict[str, Any]) -> str:
    return compiled(source).render(context)


def cast(kind: str, raw: Any) -> Any:
    if kind == "int":
        return int(raw)
    if kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).strip().lower() == "true"
    if kind == "yaml":
        return yaml.safe_load(raw) if isinstance(raw, str) else raw
    return raw


def answer_context(answers: dict[str, Any]) -> dict[str, Any]:
    """Copier's context after the questions: answers, rendered defaults, computed values."""
    context: dict[str, Any] = {}
    for name, question in copier_config().items():
        if name.startswith("_"):
            continue
        computed = question.get("when") is False
        if name in answers and not computed:
            context[name] = answers[name]
            continue
        default = question.get("default")
        if isinstance(default, str):
            default = render(default, context)
        context[name] = cast(question.get("type", "str"), default)
    return context


def rendered_topology(context: dict[str, Any]):
    """What budget.py sees: the rendered db/topology.toml and db/database_limits.toml."""
    budget = budget_module()
    declared = tomllib.loads(render((PACKAGE_DIR / "topology.toml.jinja").read_text(), context))
    limits_text = render((PACKAGE_DIR / "database_limits.toml.jinja").read_text(), context)
    limits = tomllib.loads(limits_text)["database"]
    return budget.declared_topology(declared), budget.DatabaseLimits(**limits)


def validator(macro: str, context: dict[str, Any]) -> str:
    return render(
        f"{{% from 'includes/budget.jinja' import {macro} with context %}}{{{{ {macro}() }}}}",
        context,
    )


answer_sets = st.fixed_dictionaries(
    {
        "target": st.sampled_from(["k8s-sync", "k8s-async", "lambda", "batch"]),
        "pooler": st.sampled_from(["none", "pgbouncer", "rds-proxy"]),
        "pgbouncer_pool_mode": st.sampled_from(["transaction", "session"]),
        "replicas_max": st.integers(1, 60),
        "max_surge": st.integers(0, 6),
        "workers_per_pod": st.integers(1, 8),
        "lambda_reserved_concurrency": st.integers(1, 400),
        "batch_schedule": st.sampled_from(["", "*/15 * * * *", "@hourly"]),
        "batch_concurrency_policy": st.sampled_from(["Forbid", "Replace"]),
        "batch_parallelism": st.integers(1, 40),
        "batch_processes": st.integers(1, 8),
        "null_pool": st.booleans(),
        "pool_size": st.integers(1, 40),
        "max_overflow": st.integers(0, 40),
        "pgbouncer_default_pool_size": st.integers(1, 400),
        "rds_proxy_max_connections_percent": st.integers(1, 100),
        "db_max_connections": st.integers(1, 1000),
        "db_reserved_connections": st.integers(0, 40),
        "other_consumers": st.integers(0, 600),
    }
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=answer_sets)
def test_validator_accepts_exactly_what_budget_py_accepts(answers: dict[str, Any]) -> None:
    budget = budget_module()
    context = answer_context(answers)
    topology, limits = rendered_topology(context)

    failure = budget.first_failure(topology, limits)
    assert validator("budget_error", context) == (failure.message() if failure else "")
    lines = [check.line() for check in budget.checks(topology, limits)]
    assert validator("budget_lines", context).split("\n") == lines
    assert (
        int(validator("database_total", context)) == budget.database_check(topology, limits).total
    )
    assert int(validator("app_total", context)) == topology.app_total
    assert context["budget_worst_case"] == budget.database_check(topology, limits).total


def test_the_pinned_280_case_is_refused_by_both() -> None:
    from cases import K8S_OVER

    context = answer_context(K8S_OVER)
    topology, limits = rendered_topology(context)
    failure = budget_module().first_failure(topology, limits)
    assert failure is not None
    assert failure.total == 281
    assert validator("budget_error", context) == failure.message()
