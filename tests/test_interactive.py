"""`copier copy` answered by a person: the real prompts in a pseudo-terminal of 80 columns.

Each test runs copier as a team does (no --trust, HEAD of this checkout) under pexpect, feeds
what it prints to a terminal emulator (pyte) of 80 x 24 and reads the screen as the person
sees it: what does not fit a line is cut there, as prompt_toolkit and a real terminal cut it.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pexpect
import pyte
from rendering import clean_env, copier_argv, data_args

COLUMNS, ROWS = 80, 24
ENTER, DOWN, CLEAR_LINE = "\r", "\x1b[B", "\x15"
CURSOR_POSITION_REQUEST = b"\x1b[6n"


class Terminal:
    """A copier process on a pseudo-terminal, and the screen it draws."""

    def __init__(self, destination: Path, *data: str) -> None:
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        # The command line and environment of rendering.copier_cli, without --defaults so
        # copier asks; only the process is pexpect's, on a pseudo-terminal copier can draw on.
        program, *args = copier_argv("copy", *data, destination=destination, defaults=False)
        self.child = pexpect.spawn(
            program,
            args,
            dimensions=(ROWS, COLUMNS),
            env=clean_env(TERM="xterm"),
            timeout=60,
        )
        self.output = b""

    def _read(self, seconds: float) -> bool:
        """Feed what copier printed for `seconds` to the screen; False once it has exited."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.child.read_nonblocking(65536, timeout=0.05)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return False
            self.output += data
            # prompt_toolkit asks where the cursor is; a terminal answers from its screen.
            parts = data.split(CURSOR_POSITION_REQUEST)
            for index, part in enumerate(parts):
                self.stream.feed(part)
                if index < len(parts) - 1:
                    row, column = self.screen.cursor.y + 1, self.screen.cursor.x + 1
                    self.child.send(f"\x1b[{row};{column}R")
        return True

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def flat(self) -> str:
        """The screen as one line of words: help text wrapped over several lines reads whole."""
        return " ".join(self.text().split())

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if time.monotonic() > deadline or not self._read(0.1):
                raise AssertionError(f"{text!r} never appeared; the screen:\n{self.text()}")
        self._read(0.2)

    def answer(self, keys: str, then: str) -> None:
        """Type keys, then wait until `then` is on the screen."""
        self.child.send(keys)
        self.wait_for(then)

    def finish(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self._read(0.2):
            if time.monotonic() > deadline:
                raise AssertionError(f"copier did not finish; the screen:\n{self.text()}")
        self.child.close()
        assert b"Traceback" not in self.output, self.output.decode(errors="replace")[-3000:]
        return self.child.exitstatus


def declared(project: Path) -> dict:
    return tomllib.loads(
        (project / "src" / "poolwise_service" / "db" / "topology.toml").read_text()
    )


def test_asyncpg_is_shown_disabled_with_its_reason_and_cannot_be_picked(tmp_path: Path) -> None:
    project = tmp_path / "service"
    # Until the templates read max_surge_pods, a typed max_surge is text: give it as data.
    tui = Terminal(project, "--data", "max_surge=1")
    tui.wait_for("Name of the service")
    for keys, then in [
        (ENTER, "Python package name"),
        (ENTER, "PostgreSQL cluster"),
        (ENTER, "max_connections of the cluster"),
        (ENTER, "Connections held back"),
        (ENTER, "Clients of the cluster"),
        (ENTER, "Connections this service may hold"),
        (ENTER, "everything else on the cluster"),
        (ENTER, "Where the service runs"),
        (DOWN + ENTER, "Connection pooler"),
        (DOWN + ENTER, "PgBouncer pool_mode"),
        (ENTER, "PostgreSQL driver of the async engine"),
    ]:
        tui.answer(keys, then)

    # The whole reason is on its line, inside 80 columns, beside the disabled choice.
    disabled = "   - asyncpg (its prepared statements break behind PgBouncer transaction mode)"
    assert disabled in tui.lines()
    assert len(disabled) <= COLUMNS
    # Down skips the disabled choice: the pointer stays on psycopg, and Enter takes psycopg.
    tui.answer(DOWN, "» psycopg 3 (async mode)")
    tui.answer(ENTER, "Most pods that can run at once")
    assert "   psycopg 3 (async mode)" in tui.lines()
    for then in ["Worker processes per pod", "Connections each process keeps open"]:
        tui.answer(ENTER, then)
    for then in ["Extra connections a process", "Seconds a request waits", "Seconds after which"]:
        tui.answer(ENTER, then)
    tui.answer(ENTER, "PgBouncer default_pool_size")
    tui.answer(ENTER, "Label key=value of the namespace Prometheus scrapes from")
    tui.child.send(ENTER)

    assert tui.finish() == 0
    assert declared(project)["service"]["driver"] == "psycopg"


def test_a_budget_broken_by_earlier_answers_is_refused_and_corrected_at_the_prompt(
    tmp_path: Path,
) -> None:
    project = tmp_path / "service"
    tui = Terminal(project, "--data", "max_surge=0")
    tui.wait_for("Name of the service")
    for keys, then in [
        (ENTER, "Python package name"),
        (ENTER, "PostgreSQL cluster"),
        (ENTER, "max_connections of the cluster"),
        (CLEAR_LINE + "200" + ENTER, "Connections held back"),
        (CLEAR_LINE + "0" + ENTER, "Clients of the cluster"),
        (ENTER, "Connections this service may hold"),
        (ENTER, "everything else on the cluster"),
        (ENTER, "Where the service runs"),
        (ENTER, "Connection pooler"),
        (ENTER, "Most pods that can run at once"),
    ]:
        tui.answer(keys, then)
    # The running budget is in the help, and what fits before anything is typed.
    assert (
        "Budget: 199 connections left for this service (200 max_connections - 0 reserved"
        " - 0 others - 1 migration). Fits: at most 198." in tui.flat()
    )
    tui.answer(CLEAR_LINE + "6" + ENTER, "Worker processes per pod")

    # 60 workers per pod: refused under the input, in one line of at most 80 columns, naming
    # the hop, how far over and what fits; the question is asked again, nothing is lost.
    tui.answer(CLEAR_LINE + "60" + ENTER, "Validation error for question 'workers_per_pod'")
    refusal = "Validation error for question 'workers_per_pod': app->db over by 221; at most 28"
    assert refusal in tui.lines()
    tui.answer(CLEAR_LINE + "2" + ENTER, "Connections each process keeps open")
    assert (
        "So far: 7 pods in a rollout (6 + 0 surge + 1 terminating) x 2 workers = 14 processes."
        " Fits: at most 14." in tui.flat()
    )
    tui.answer(CLEAR_LINE + "10" + ENTER, "Extra connections a process may open")
    assert "With pool_size 10, max_overflow fits: at most 4." in tui.flat()

    # 14 processes x (10 + 10) = 280 + 1 migration = 281 > 200.
    tui.answer(CLEAR_LINE + "10" + ENTER, "Validation error for question 'max_overflow'")
    refusal = "Validation error for question 'max_overflow': app->db over by 81: at most 4 fits"
    assert refusal in tui.lines()
    assert len(refusal) <= COLUMNS
    assert "Traceback" not in tui.text()
    tui.answer(CLEAR_LINE + "4" + ENTER, "Seconds a request waits")
    tui.answer(ENTER, "Seconds after which")
    tui.answer(ENTER, "Label key=value of the namespace Prometheus scrapes from")
    # A label that is no key=value is refused under the input, and asked again.
    tui.answer(
        CLEAR_LINE + "monitoring" + ENTER,
        "Validation error for question 'monitoring_namespace_label'",
    )
    tui.child.send(CLEAR_LINE + "example.com/scrapes=pods" + ENTER)

    assert tui.finish() == 0
    topology = declared(project)
    assert topology["processes"]["workers_per_pod"] == 2
    assert (topology["pool"]["pool_size"], topology["pool"]["max_overflow"]) == (10, 4)
    policy = (project / "deploy" / "k8s" / "networkpolicy.yaml").read_text()
    assert '"example.com/scrapes": "pods"' in policy


def test_a_number_typed_at_a_prompt_must_be_plain_decimal_digits(tmp_path: Path) -> None:
    project = tmp_path / "service"
    tui = Terminal(project, "--data", "max_surge=0")
    tui.wait_for("Name of the service")
    for then in [
        "Python package name",
        "PostgreSQL cluster",
        "max_connections of the cluster",
        "Connections held back",
        "Clients of the cluster",
        "Connections this service may hold",
        "everything else on the cluster",
        "Where the service runs",
        "Connection pooler",
        "Most pods that can run at once",
    ]:
        tui.answer(ENTER, then)

    # A prompt reads what is typed as JSON: a leading zero (YAML's octal), '_', ':', '0x' or a
    # sign is not a number there, and the question is asked again.
    tui.answer(CLEAR_LINE + "010" + ENTER, "Invalid input")
    # A number that is not whole is refused by name, in the one line under the input.
    tui.answer(CLEAR_LINE + "5.0" + ENTER, "Validation error for question 'replicas_max'")
    refusal = "Validation error for question 'replicas_max': 5.0 is not a whole number >= 1"
    assert refusal in tui.lines()
    assert len(refusal) <= COLUMNS
    tui.answer(CLEAR_LINE + "6" + ENTER, "Worker processes per pod")
    for then in [
        "Connections each process keeps open",
        "Extra connections a process may open",
        "Seconds a request waits",
        "Seconds after which",
        "Label key=value of the namespace Prometheus scrapes from",
    ]:
        tui.answer(ENTER, then)
    tui.child.send(ENTER)

    assert tui.finish() == 0
    assert declared(project)["processes"]["replicas_max"] == 6


def test_a_pooler_the_budget_cannot_fit_is_disabled_and_the_default_moves(
    tmp_path: Path,
) -> None:
    # 4 - 2 reserved leaves 2: a Kubernetes service needs 2 pods in a rollout and a migration.
    project = tmp_path / "service"
    tui = Terminal(
        project,
        "--data",
        "db_max_connections=4",
        "--data",
        "db_reserved_connections=2",
        "--data",
        "max_surge=0",
    )
    tui.wait_for("Name of the service")
    for then in [
        "Python package name",
        "PostgreSQL cluster",
        "Clients of the cluster",
        "Connections this service may hold",
        "everything else on the cluster",
        "Where the service runs",
        "Connection pooler",
    ]:
        tui.answer(ENTER, then)
    disabled = "   - None (direct connections) (app->db needs 3, 2 available)"
    assert disabled in tui.lines()
    assert " » PgBouncer" in tui.lines()
    tui.answer(ENTER, "PgBouncer pool_mode")
    # Session mode would pin 2 server connections for 2 clients, and 1 is all that is left.
    assert "   - session (session pool needs 2, 1 available)" in tui.lines()
    tui.child.sendcontrol("c")
    tui.finish()


def test_an_allocation_from_the_platform_is_the_budget_at_every_prompt(tmp_path: Path) -> None:
    # The platform file's db_allocations, given as data: this service's share is 40.
    project = tmp_path / "service"
    tui = Terminal(
        project, "--data", "db_allocations={poolwise-service: 40}", "--data", "max_surge=0"
    )
    tui.wait_for("Name of the service")
    for then in [
        "Python package name",
        "PostgreSQL cluster",
        "max_connections of the cluster",
        "Connections held back",
        "Clients of the cluster",
        "Connections this service may hold",
    ]:
        tui.answer(ENTER, then)
    # The share is offered as the answer; with it, other_consumers is not asked.
    assert "   40" in tui.lines()
    tui.answer(ENTER, "Where the service runs")
    assert "everything else on the cluster" not in tui.text()
    tui.answer(ENTER, "Connection pooler")
    tui.answer(ENTER, "Most pods that can run at once")
    assert (
        "Budget: 39 connections left for this service (allocation 40 - 1 migration)."
        " Fits: at most 38." in tui.flat()
    )
    tui.answer(CLEAR_LINE + "3" + ENTER, "Worker processes per pod")
    tui.answer(ENTER, "Connections each process keeps open")
    tui.answer(CLEAR_LINE + "5" + ENTER, "Extra connections a process may open")
    assert "With pool_size 5, max_overflow fits: at most 4." in tui.flat()
    # (3 + 0 surge + 1 terminating) x (5 + 5) + 1 = 41 > 40: refused at the question that can
    # fix it, in one line, and asked again.
    tui.answer(CLEAR_LINE + "5" + ENTER, "Validation error for question 'max_overflow'")
    refusal = "Validation error for question 'max_overflow': app->db over by 1: at most 4 fits"
    assert refusal in tui.lines()
    tui.answer(CLEAR_LINE + "4" + ENTER, "Seconds a request waits")
    tui.answer(ENTER, "Seconds after which")
    tui.answer(ENTER, "Label key=value of the namespace Prometheus scrapes from")
    tui.child.send(ENTER)

    assert tui.finish() == 0
    limits = tomllib.loads(
        (project / "src" / "poolwise_service" / "db" / "database_limits.toml").read_text()
    )["database"]
    assert limits["allocation"] == 40 and "other_consumers" not in limits
    assert declared(project)["pool"]["max_overflow"] == 4


def test_max_surge_typed_as_a_percentage_is_counted_in_pods(tmp_path: Path) -> None:
    project = tmp_path / "service"
    answers = {"replicas_max": 4, "workers_per_pod": 1, "pool_size": 5, "max_overflow": 5}
    given = {
        "project_name": "poolwise-service",
        "package_name": "poolwise_service",
        "db_cluster": "main",
        "db_max_connections": 100,
        "db_reserved_connections": 3,
        "db_external_consumers": "{}",
        "db_allocation": 0,
        "other_consumers": 0,
        "target": "k8s-sync",
        "pooler": "none",
        "pool_timeout": 5,
        "pool_recycle": 1800,
        "monitoring_namespace_label": "kubernetes.io/metadata.name=monitoring",
        **answers,
    }
    tui = Terminal(project, *data_args(given))
    tui.wait_for("Extra pods a rolling update may start")
    assert "   1" in tui.lines()
    tui.answer(CLEAR_LINE + "a quarter" + ENTER, "Validation error for question 'max_surge'")
    assert any(
        line.startswith("Validation error for question 'max_surge': max_surge=\"a quarter\"")
        for line in tui.lines()
    )
    tui.child.send(CLEAR_LINE + "30%" + ENTER)

    assert tui.finish() == 0
    assert declared(project)["processes"]["max_surge"] == 2
    deployment = (project / "deploy" / "k8s" / "deployment.yaml").read_text()
    assert "maxSurge: 30%\n" in deployment


def test_every_help_fits_80_columns_at_every_supported_answer_set() -> None:
    # copier prints "🎤 " (3 columns) before a help's first line; the rest carry their indent.
    from cases import SUPPORTED
    from test_budget_mirror import answer_context, copier_config, render

    for case in SUPPORTED:
        context = answer_context(case.answers, interactive=True)
        for name, question in copier_config().items():
            if name.startswith("_") or "help" not in question:
                continue
            first, *rest = render(question["help"], context).split("\n")
            assert len(first) <= COLUMNS - 3, f"{case.id}: {name}: {first!r}"
            for line in rest:
                assert len(line) <= COLUMNS and line.startswith("   "), f"{name}: {line!r}"
