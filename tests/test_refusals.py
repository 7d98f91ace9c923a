"""Bad answers are refused before anything is written, with one line naming value, rule and fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cases import K8S_FITS, REFUSED, Refusal
from rendering import TEMPLATE_ROOT, copier_copy, data_args


@pytest.mark.parametrize("refusal", REFUSED, ids=lambda refusal: refusal.id)
def test_refused_answers_name_the_value_the_rule_and_the_fix(copie, refusal: Refusal) -> None:
    result = copie.copy(extra_answers=refusal.answers)
    assert result.exception is not None, f"{refusal.answers} was accepted"
    message = str(result.exception)
    assert refusal.message in message
    assert f"question '{refusal.question}'" in message or refusal.question in message
    # One line: the whole refusal fits on the line copier prints.
    assert "\n" not in message.strip()


def test_cli_refusal_is_the_last_line_and_writes_nothing(tmp_path: Path) -> None:
    from cases import K8S_OVER

    destination = tmp_path / "refused"
    result = copier_copy(destination, *data_args(K8S_OVER))
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: Validation error for question 'other_consumers':")
    assert "= 280 + 1 migration = 281 > 200 available" in last_line
    assert "Fix: at 14 processes pool_size + max_overflow must be <= 14" in last_line
    assert not destination.exists() or not any(destination.iterdir())


def test_the_same_topology_with_pool_5_plus_5_is_accepted_without_trust(tmp_path: Path) -> None:
    destination = tmp_path / "accepted"
    result = copier_copy(destination, *data_args(K8S_FITS))
    assert result.returncode == 0, result.stderr[-2000:]
    topology = (destination / "src" / "poolwise_service" / "db" / "topology.toml").read_text()
    assert "replicas_max = 6\n" in topology
    assert "pool_size = 5\n" in topology


def test_every_stdlib_module_of_this_python_is_a_refused_package_name() -> None:
    import re

    validators = (TEMPLATE_ROOT / "includes" / "validators.jinja").read_text()
    listed = set(
        re.findall(r'"([A-Za-z0-9_]+)"', validators.split("stdlib_modules = [")[1].split("]")[0])
    )
    public = {name for name in sys.stdlib_module_names if not name.startswith("_")}
    assert public - listed == set()
