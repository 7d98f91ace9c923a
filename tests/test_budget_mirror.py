"""The copier validators and poolwise's rule are one rule: same verdicts, same totals.

For thousands of generated answer sets this renders what copier renders (the computed values of
copier.yml, the rendered db/topology.toml and db/database_limits.toml) and compares the checks
of poolwise.rule (the one implementation: `poolwise budget`, fleet, doctor and every service's
budget test) with includes/budget.jinja's, line for line. The staged checks (one per question
that changes the budget, with the answers so far and the smallest ones to come) are bound to the
same rule: they never refuse a set the rule accepts, what they say fits does fit, and the
defaults they offer at a prompt fit.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rendering import TEMPLATE_ROOT

from poolwise import declared as declared_files
from poolwise import rule

PACKAGE_DIR = TEMPLATE_ROOT / "template" / "src" / "{{package_name}}" / "db"
# The rendered database_limits.toml, read by budget.py's own loader (allocation or
# other_consumers, as a service reads it).
LIMITS_FILE = Path(tempfile.mkdtemp(prefix="budget-mirror-")) / "database_limits.toml"


@cache
def copier_config() -> dict[str, Any]:
    return yaml.safe_load((TEMPLATE_ROOT / "copier.yml").read_text())


@cache
def environment() -> jinja2.Environment:
    """Copier's environment (sandboxed, Ansible filters), strict about undefined names."""
    envops = copier_config()["_envops"]
    return jinja2.sandbox.SandboxedEnvironment(
        loader=jinja2.FileSystemLoader(TEMPLATE_ROOT),
        extensions=["jinja2_ansible_filters.AnsibleCoreFiltersExtension"],
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
    if kind == "json":
        return json.loads(raw) if isinstance(raw, str) else raw
    if kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).strip().lower() == "true"
    if kind == "yaml":
        return yaml.safe_load(raw) if isinstance(raw, str) else raw
    return raw


def answer_context(answers: dict[str, Any], interactive: bool = False) -> dict[str, Any]:
    """Copier's context after the questions: answers, rendered defaults, computed values.

    Answers are given as data (--data), in a run with --defaults unless interactive.
    """
    context: dict[str, Any] = {
        "_copier_conf": {"data": dict(answers), "defaults": not interactive, "user_defaults": {}}
    }
    for name, question in copier_config().items():
        if name.startswith("_"):
            continue
        computed = question.get("when") is False
        kind = render(question.get("type", "str"), context)
        if name in answers and not computed:
            context[name] = cast(kind, answers[name])
            continue
        default = question.get("default")
        if isinstance(default, str):
            default = render(default, context)
        context[name] = cast(kind, default)
    return context


def rendered_topology(context: dict[str, Any]):
    """What poolwise sees: the rendered db/topology.toml and db/database_limits.toml."""
    declared = tomllib.loads(render((PACKAGE_DIR / "topology.toml.jinja").read_text(), context))
    limits_text = render((PACKAGE_DIR / "database_limits.toml.jinja").read_text(), context)
    LIMITS_FILE.write_text(limits_text)
    return declared_files.declared_topology(declared), declared_files.load_limits(LIMITS_FILE)


def validator(macro: str, context: dict[str, Any]) -> str:
    return render(
        f"{{% from 'includes/budget.jinja' import {macro} with context %}}{{{{ {macro}() }}}}",
        context,
    )


def every_failure(topology, limits) -> str:
    """poolwise.rule's refusal with every broken hop, as the copier validator words it."""
    failures = rule.failures(topology, limits)
    if not failures:
        return ""
    rest = "".join(f"; also exceeded, {check.line()}. Fix: {check.fix}" for check in failures[1:])
    return failures[0].message() + rest


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
        # The service's share from the platform file; 0 (none, other_consumers counts) as often.
        "db_allocation": st.one_of(st.just(0), st.integers(2, 600)),
    }
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=answer_sets)
def test_validator_accepts_exactly_what_the_rule_accepts(answers: dict[str, Any]) -> None:
    context = answer_context(answers)
    topology, limits = rendered_topology(context)

    assert validator("budget_error", context) == every_failure(topology, limits)
    lines = [check.line() for check in rule.checks(topology, limits)]
    assert validator("budget_lines", context).split("\n") == lines
    assert int(validator("database_total", context)) == rule.database_check(topology, limits).total
    assert int(validator("app_total", context)) == topology.app_total
    assert context["budget_worst_case"] == rule.database_check(topology, limits).total


def test_the_pinned_280_case_is_refused_by_both() -> None:
    from cases import K8S_OVER

    context = answer_context(K8S_OVER)
    topology, limits = rendered_topology(context)
    failure = rule.first_failure(topology, limits)
    assert failure is not None
    assert failure.total == 281
    assert validator("budget_error", context) == failure.message()


def test_every_broken_hop_is_in_one_refusal() -> None:
    # Session mode: 5 pods x (10 + 10) = 100 clients > 60 server connections, and 60 + 1 > 50.
    answers = {
        "pooler": "pgbouncer",
        "pgbouncer_pool_mode": "session",
        "pool_size": 10,
        "max_overflow": 10,
        "pgbouncer_default_pool_size": 60,
        "db_max_connections": 50,
        "db_reserved_connections": 0,
    }
    context = answer_context(answers)
    topology, limits = rendered_topology(context)
    refusal = validator("budget_error", context)
    assert len(rule.failures(topology, limits)) == 2
    assert refusal == every_failure(topology, limits)
    assert refusal.startswith("connection budget exceeded, app -> pgbouncer session pool: ")
    assert "; also exceeded, pgbouncer -> database: 60 default_pool_size" in refusal


# ----------------------------------------------------------------------------- staged checks

# The questions that change the budget, in copier.yml's order, with the target they apply to.
INTEGER_STAGES = [
    "replicas_max",
    "max_surge",
    "workers_per_pod",
    "lambda_reserved_concurrency",
    "batch_parallelism",
    "batch_processes",
    "pool_size",
    "max_overflow",
    "pgbouncer_default_pool_size",
    "rds_proxy_max_connections_percent",
]
APPLIES = {
    "replicas_max": lambda a: a["target"] in ("k8s-sync", "k8s-async"),
    "max_surge": lambda a: a["target"] in ("k8s-sync", "k8s-async"),
    "workers_per_pod": lambda a: a["target"] in ("k8s-sync", "k8s-async"),
    "lambda_reserved_concurrency": lambda a: a["target"] == "lambda",
    "batch_parallelism": lambda a: a["target"] == "batch",
    "batch_processes": lambda a: a["target"] == "batch",
    "pool_size": lambda a: not uses_null_pool(a),
    "max_overflow": lambda a: not uses_null_pool(a),
    "pgbouncer_default_pool_size": lambda a: a["pooler"] == "pgbouncer",
    "rds_proxy_max_connections_percent": lambda a: a["pooler"] == "rds-proxy",
}
SMALLEST = {
    "replicas_max": 1,
    "max_surge": 0,
    "workers_per_pod": 1,
    "lambda_reserved_concurrency": 1,
    "batch_parallelism": 1,
    "batch_processes": 1,
    "pool_size": 1,
    "max_overflow": 0,
    "pgbouncer_default_pool_size": 1,
    "rds_proxy_max_connections_percent": 1,
}
STAGED = (
    "{% from 'includes/prompts.jinja' import staged with context %}{% set r = namespace() %}"
    "{{ staged(r, stage) }}{{ r.failures | map(attribute='hop') | join(',') }}"
    "|{{ r.most }}|{{ r.least }}"
)


def uses_null_pool(answers: dict[str, Any]) -> bool:
    return answers["target"] in ("lambda", "batch") and answers["null_pool"]


def staged(context: dict[str, Any], stage: str, value: Any) -> tuple[str, int | None, int | None]:
    """The staged check at `stage` with `value` typed there: broken hops, most, least."""
    hops, most, least = render(STAGED, {**context, "stage": stage, stage: value}).split("|")
    return hops, None if most == "None" else int(most), None if least == "None" else int(least)


def usable(answers: dict[str, Any]) -> bool:
    """Limits that the questions before the topology accept (2 left for service + migration)."""
    if answers["db_allocation"]:
        return True  # the strategy's allocations are at least 2
    return (
        answers["db_max_connections"]
        - answers["db_reserved_connections"]
        - answers["other_consumers"]
        >= 2
    )


def tight(answers: dict[str, Any], slack: int, pool_slack: int) -> dict[str, Any]:
    """The same topology on a database it fits with `slack` connections to spare (-1: one
    short), and in session mode a server pool `pool_slack` above the app side: the edges where
    an off-by-one in a staged check would show."""
    allocated = answers["db_allocation"] > 0
    roomy = {
        **answers,
        # With an allocation the cluster's size matters only to RDS Proxy's share of it.
        "db_max_connections": max(2, answers["db_max_connections"]) if allocated else 262143,
        "db_reserved_connections": 0,
        "other_consumers": 0,
        "db_allocation": 0,
    }
    topology, limits = rendered_topology(answer_context(roomy))
    if answers["pooler"] == "pgbouncer" and answers["pgbouncer_pool_mode"] == "session":
        roomy["pgbouncer_default_pool_size"] = max(1, topology.app_total + pool_slack)
        topology, limits = rendered_topology(answer_context(roomy))
    total = rule.database_check(topology, limits).total
    if allocated:
        return {**roomy, "db_allocation": max(2, total + slack)}
    return {**roomy, "db_max_connections": max(2, total + slack), "other_consumers": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=answer_sets, slack=st.integers(-1, 1), pool_slack=st.integers(-1, 1))
def test_no_stage_refuses_a_set_that_fits_and_the_last_refuses_every_other(
    answers: dict[str, Any], slack: int, pool_slack: int
) -> None:
    answers = tight(answers, slack, pool_slack)
    context = answer_context(answers)
    topology, limits = rendered_topology(context)
    fits = not rule.failures(topology, limits)
    for stage in INTEGER_STAGES:
        if APPLIES[stage](answers):
            hops, _, _ = staged(context, stage, answers[stage])
            assert not (fits and hops), f"{stage} refused {answers} ({hops}), which fits"
            last = stage
    if not APPLIES["pool_size"](answers) and answers["pooler"] == "none":
        # NullPool: the last budget question is null_pool itself, which sees every answer.
        hops, _, _ = staged(context, "null_pool", True)
        last = "null_pool"
    assert bool(staged(context, last, context[last])[0]) is not fits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=answer_sets)
def test_what_a_stage_says_fits_does_fit_and_one_more_does_not(answers: dict[str, Any]) -> None:
    if not usable(answers):
        return
    context = answer_context(answers)
    for stage in INTEGER_STAGES:
        if not APPLIES[stage](answers):
            continue
        hops, most, least = staged(context, stage, SMALLEST[stage])
        if hops or most is None or most < SMALLEST[stage]:
            # An earlier answer already left no room: that stage refused it.
            break
        assert not staged(context, stage, most)[0], f"{stage}={most} said to fit {answers}"
        if stage != "rds_proxy_max_connections_percent" or most < 100:
            assert staged(context, stage, most + 1)[0], f"{stage}={most + 1} fits {answers}"
        if least is not None:
            assert not staged(context, stage, least)[0]
            if least > 1:
                assert staged(context, stage, least - 1)[0]
        # Go on with the answer the person gave if it fits here, else with the most that fits.
        if staged(context, stage, answers[stage])[0]:
            context[stage] = most if least is None else least
        else:
            context[stage] = answers[stage]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=answer_sets, usual=st.integers(1, 50))
def test_the_default_offered_at_a_prompt_fits(answers: dict[str, Any], usual: int) -> None:
    if not usable(answers):
        return
    context = answer_context(answers, interactive=True)
    source = (
        "{% from 'includes/prompts.jinja' import fitting_default with context %}"
        "{{ fitting_default(stage, usual) }}"
    )
    for stage in INTEGER_STAGES:
        if not APPLIES[stage](answers):
            continue
        offered = int(render(source, {**context, "stage": stage, "usual": usual}))
        if staged(context, stage, SMALLEST[stage])[0]:
            break
        assert not staged(context, stage, offered)[0], f"{stage} offered {offered} {answers}"
        context[stage] = offered


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=answer_sets)
def test_a_refusal_at_a_prompt_fits_the_80_column_line_under_it(answers: dict[str, Any]) -> None:
    if not usable(answers):
        return
    context = answer_context(answers, interactive=True)
    source = (
        "{% from 'includes/validators.jinja' import budget_refusal with context %}"
        "{{ budget_refusal(stage, 'yes', false) }}"
    )
    for stage in INTEGER_STAGES:
        if not APPLIES[stage](answers):
            continue
        message = render(source, {**context, "stage": stage})
        line = f"Validation error for question '{stage}': {message}"
        assert len(line) <= 80, line
        if staged(context, stage, answers[stage])[0]:
            # How far over comes first: "app->db over by 81: ...", or "+81; max 4" at the least.
            assert re.search(r"(over by |short by |^[+-])[0-9]+", message), message
            break


def test_a_percentage_surge_is_counted_in_pods_rounded_up() -> None:
    for surge, replicas, pods in [("25%", 3, 1), ("25%", 10, 3), ("100%", 7, 7), ("0%", 5, 0)]:
        context = answer_context({"replicas_max": replicas, "max_surge": surge})
        assert context["max_surge_pods"] == pods == math.ceil(int(surge[:-1]) * replicas / 100)


def test_a_percentage_surge_reaches_budget_py_as_the_same_pods() -> None:
    # db/topology.toml must carry the count (max_surge_pods), not "25%", for poolwise to read.
    context = answer_context({"replicas_max": 10, "max_surge": "25%"})
    declared = render((PACKAGE_DIR / "topology.toml.jinja").read_text(), context)
    assert "\nmax_surge = 3\n" in declared, (
        "db/topology.toml.jinja must render max_surge_pods (the count), not max_surge ('25%')"
    )
    topology, limits = rendered_topology(context)
    assert topology.workloads[0].max_surge == 3
    assert int(validator("database_total", context)) == (
        rule.database_check(topology, limits).total
    )
