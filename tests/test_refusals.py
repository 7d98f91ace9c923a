"""Bad answers are refused before anything is written, with one line naming value, rule and fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cases import K8S_FITS, REFUSED, Refusal
from rendering import TEMPLATE_ROOT, copier_copy, data_args, render_with_copie


@pytest.mark.parametrize("refusal", REFUSED, ids=lambda refusal: refusal.id)
def test_refused_answers_name_the_value_the_rule_and_the_fix(copie, refusal: Refusal) -> None:
    with pytest.raises(ValueError) as refused:
        render_with_copie(copie, refusal.answers)
    message = str(refused.value)
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
    # The budget is checked whole at the last question that changes it.
    assert last_line.startswith("ValueError: Validation error for question 'max_overflow':")
    assert "= 280 + 1 migration = 281 > 200 available" in last_line
    assert "Fix: at 14 processes pool_size + max_overflow must be <= 14" in last_line
    assert not destination.exists() or not any(destination.iterdir())


@pytest.mark.parametrize(
    ("data", "last_line"),
    [
        (
            ["--data", "pool_size=abc"],
            "ValueError: Validation error for question 'pool_size': pool_size=\"abc\" is not"
            " allowed: it must be a whole number >= 1 in plain decimal digits; use null_pool for"
            " no pooling.",
        ),
        (
            ["--data", "pool_size=5.7"],
            "ValueError: Validation error for question 'pool_size': pool_size=\"5.7\" is not"
            " allowed: it must be a whole number >= 1 in plain decimal digits; use null_pool for"
            " no pooling.",
        ),
        (
            ["--data", "target=batch", "--data", "null_pool=maybe"],
            "ValueError: Validation error for question 'null_pool': null_pool=\"maybe\" is not"
            " allowed: it must be true or false (yes/no); for example --data null_pool=false.",
        ),
        (
            ["--data", "max_surge=25 %"],
            "ValueError: Validation error for question 'max_surge': max_surge=\"25 %\" is not"
            " allowed: it must be a pod count (0 for no surge) or a percentage of replicas_max"
            " such as 25% (rounded up, as Kubernetes does), in plain decimal digits.",
        ),
    ],
    ids=["word", "fraction", "not-a-boolean", "spaced-percentage"],
)
def test_a_cli_answer_that_is_not_a_number_or_boolean_is_refused_by_name(
    tmp_path: Path, data: list[str], last_line: str
) -> None:
    destination = tmp_path / "refused"
    result = copier_copy(destination, *data)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == last_line
    assert not destination.exists()


@pytest.mark.parametrize(
    ("data_file", "last_line_start"),
    [
        (
            'project_name: "orders-api\\n"\n',
            "ValueError: Validation error for question 'project_name':"
            ' project_name="orders-api\\n" is not allowed',
        ),
        (
            "pool_size: 5.7\n",
            "ValueError: Validation error for question 'pool_size': pool_size=5.7 is not allowed",
        ),
        (
            "target: batch\nbatch_schedule: 99 99 99 99 99\n",
            "ValueError: Validation error for question 'batch_schedule':"
            ' batch_schedule="99 99 99 99 99" is not allowed: its minute field "99"',
        ),
    ],
    ids=["name-ending-in-newline", "fraction", "cron-out-of-range"],
)
def test_a_data_file_answer_that_used_to_slip_through_is_refused(
    tmp_path: Path, data_file: str, last_line_start: str
) -> None:
    platform = tmp_path / "platform.yml"
    platform.write_text(data_file)
    destination = tmp_path / "refused"
    result = copier_copy(destination, "--data-file", str(platform))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(last_line_start)
    assert not destination.exists()


# Numbers are plain decimal digits. --data hands copier text, which YAML 1.1 reads: "1:30" as
# 90 (base 60), "010" as 8 (octal), "0x10" as 16, "1_0" as 10, "+5" and " 5" as 5; "5.0" is a
# float and "1e3" a string. Each is refused by name, with what YAML made of it and the fix. The
# database is big enough for 90 replicas, so no budget refusal hides a misread number.
ROOMY = "db_max_connections: 2000\n"
SPELLINGS = {
    "1:30": 90,
    "010": 8,
    "0x10": 16,
    "1_0": 10,
    "+5": 5,
    " 5": 5,
}
NOT_WHOLE = ["5.0", "1e3"]


def refused_spelling(text: str) -> str:
    quoted = '"' + text + '"'
    if text in NOT_WHOLE:
        return (
            f"ValueError: Validation error for question 'replicas_max': replicas_max={quoted} is"
            " not allowed: it must be a whole number >= 1 in plain decimal digits; the HPA needs"
            " at least one replica."
        )
    read = SPELLINGS[text]
    return (
        f"ValueError: Validation error for question 'replicas_max': replicas_max={quoted} is not"
        " allowed: it must be plain decimal digits (no sign, leading 0, '_', ':', '0x' or space),"
        f" and YAML reads {quoted} as {read}; write replicas_max={read} if that is the number you"
        " mean."
    )


@pytest.mark.parametrize("text", [*SPELLINGS, *NOT_WHOLE])
def test_a_number_given_with_data_must_be_plain_decimal_digits(tmp_path: Path, text: str) -> None:
    destination = tmp_path / "refused"
    result = copier_copy(
        destination, "--data", "db_max_connections=2000", "--data", f"replicas_max={text}"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == refused_spelling(text)
    assert not destination.exists()


# In a data file YAML reads an unquoted 010 as 8 before copier sees the file, so the template
# cannot tell it from 8 (README.md says so); what it can see is refused: a quoted spelling, and
# a number YAML does not read as a whole number.
@pytest.mark.parametrize(
    ("line", "text"),
    [(f'replicas_max: "{text}"', text) for text in [*SPELLINGS, *NOT_WHOLE]]
    + [("replicas_max: 5.0", "5.0"), ("replicas_max: 1e3", "1e3")],
)
def test_a_number_in_a_data_file_must_be_plain_decimal_digits(
    tmp_path: Path, line: str, text: str
) -> None:
    platform = tmp_path / "platform.yml"
    platform.write_text(ROOMY + line + "\n")
    destination = tmp_path / "refused"
    result = copier_copy(destination, "--data-file", str(platform))
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    if line == "replicas_max: 5.0":
        # YAML read a float: the value shown is the float.
        assert last_line == refused_spelling(text).replace('"5.0"', "5.0")
    else:
        assert last_line == refused_spelling(text)
    assert not destination.exists()


def test_plain_decimal_numbers_from_data_and_a_data_file_are_accepted(tmp_path: Path) -> None:
    platform = tmp_path / "platform.yml"
    platform.write_text('db_max_connections: 400\npool_timeout: "7"\n')
    destination = tmp_path / "accepted"
    result = copier_copy(
        destination,
        "--data-file",
        str(platform),
        "--data",
        "replicas_max=10",
        "--data",
        "max_overflow=0",
        "--data",
        "max_surge=0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    topology = (destination / "src" / "poolwise_service" / "db" / "topology.toml").read_text()
    assert "replicas_max = 10\n" in topology
    assert "max_overflow = 0\n" in topology
    assert "pool_timeout = 7\n" in topology


def test_the_same_topology_with_pool_5_plus_5_is_accepted_without_trust(tmp_path: Path) -> None:
    destination = tmp_path / "accepted"
    result = copier_copy(destination, *data_args(K8S_FITS))
    assert result.returncode == 0, result.stderr[-2000:]
    topology = (destination / "src" / "poolwise_service" / "db" / "topology.toml").read_text()
    assert "replicas_max = 6\n" in topology
    assert "pool_size = 5\n" in topology


def test_every_stdlib_module_of_this_python_is_a_refused_package_name() -> None:
    # Private ones too: _json shadows json's accelerator, and a built-in module such as _thread
    # is never looked up on sys.path, so a package of that name could not be imported.
    names = (TEMPLATE_ROOT / "includes" / "names.jinja").read_text()
    listed = set(names.split('set stdlib_modules = "')[1].split('"')[0].split())
    assert set(sys.stdlib_module_names) - listed == set()
