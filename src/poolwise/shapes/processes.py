"""Server processes per pod, from a container's command, args and environment.

Each worker process of the server opens its own pool, so the budget multiplies by this count.
The same rules serve the manifests (:func:`processes_per_pod`) and a running process's own
command line (:func:`processes_for_argv`, which the start-up guard can call with ``sys.argv``
and ``os.environ``), so the budget and the guard cannot disagree.

=============================  ==============================================================
program (after wrappers)       worker processes, first rule that applies
=============================  ==============================================================
``uvicorn``,                   ``--workers N`` / ``--workers=N`` (last one wins), else
``python -m uvicorn``          ``UVICORN_WORKERS`` (its CLI reads every option from
                               ``UVICORN_<OPTION>``), else ``WEB_CONCURRENCY``, else 1.
                               https://www.uvicorn.org/settings/ ("Defaults to the
                               $WEB_CONCURRENCY environment variable if available, or 1";
                               "settings ... prefixed with UVICORN_")
``gunicorn``,                  ``-w N`` / ``-wN`` / ``--workers N`` / ``--workers=N`` on the
``python -m gunicorn``         command line, else the same in ``GUNICORN_CMD_ARGS``; else a
                               configuration file (``-c``/``--config``, or a
                               ``gunicorn.conf.py`` the image holds) is refused, being Python
                               the budget cannot evaluate; else ``WEB_CONCURRENCY``, else 1.
                               https://docs.gunicorn.org/en/stable/configure.html (order:
                               environment, config file, GUNICORN_CMD_ARGS, command line)
                               https://docs.gunicorn.org/en/stable/settings.html#workers
``fastapi run``                ``--workers N``, else ``WEB_CONCURRENCY`` (uvicorn.run's own
                               default), else 1; ``fastapi dev`` runs 1.
                               https://fastapi.tiangolo.com/fastapi-cli/
``hypercorn``                  ``-w N`` / ``--workers N``, else 1; ``-c``/``--config`` refused.
                               https://hypercorn.readthedocs.io/en/latest/how_to_guides/configuring.html
``python -m <package>``        the service itself (``__main__``: uvicorn with
                               ``WEB_CONCURRENCY``), else the declared default.
anything else                  refused: the budget cannot tell how many processes it starts.
=============================  ==============================================================

Before the program is found: Kubernetes' ``$(VAR)`` is expanded in command and args; a shell
(``sh -c``, ``bash -c``, ...) is split as the shell would, ``$VAR``, ``${VAR}`` and
``${VAR:-default}`` taken from the environment, and of its commands (``;``, ``&&``, ``||``,
``|``, ``&``, newlines, ``if ...; then``) the server is the one that counts (``alembic
upgrade head && exec uvicorn ...``); wrappers are looked through: ``exec``, ``env A=B``,
``tini --``, ``dumb-init``, ``opentelemetry-instrument``, ``ddtrace-run``, ``newrelic-admin
run-program``, ``uv run``, ``poetry run``. A count from a Secret, from a ConfigMap not under
``deploy/``, or that is not a whole number of at least 1 is refused.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from poolwise.shapes.environment import Environment, expand
from poolwise.shapes.errors import Refused

SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh"}
_SEPARATORS = {";", "&&", "||", "|", "&"}
_SHELL_VARIABLE = re.compile(
    r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-=])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
_PYTHON = re.compile(r"python(?:\d+(?:\.\d+)?)?")
FIX = "write --workers N (or -w N for gunicorn) in the container's args, or set WEB_CONCURRENCY"


@dataclass(frozen=True)
class Processes:
    """Worker processes per pod and which rule and field gave the number."""

    count: int
    source: str


class _Context:
    """Where a command line came from, and how to read a variable for it."""

    def __init__(self, file: str, field: str, lookup: Callable[[str], str | None]) -> None:
        self.file = file
        self.field = field
        self.lookup = lookup
        self.assigned: dict[str, str] = {}

    def variable(self, name: str) -> str | None:
        if name in self.assigned:
            return self.assigned[name]
        return self.lookup(name)

    def refuse(self, why: str, fix: str = FIX) -> Refused:
        return Refused(self.file, self.field, why, fix)


def processes_per_pod(
    container: Mapping[str, Any],
    env: Environment,
    *,
    file: str,
    field: str,
    package: str,
    default: int,
    image_entrypoint: Sequence[str] = (),
    image_cmd: Sequence[str] = (),
    gunicorn_conf_present: bool = False,
) -> Processes:
    """Worker processes of ``container`` (at ``field`` in ``file``), whose environment is
    ``env`` (:func:`poolwise.shapes.environment.container_environment`).

    ``package`` is the service's import name; ``default`` the workers_per_pod the service
    declares (its settings' default for ``python -m <package>``). ``image_entrypoint`` and
    ``image_cmd`` are the image's ENTRYPOINT and CMD (the Dockerfile): as in Kubernetes,
    ``command`` replaces ENTRYPOINT and drops CMD, ``args`` alone replaces CMD.
    https://kubernetes.io/docs/tasks/inject-data-application/define-command-argument-container/#notes
    """
    command = container.get("command")
    args = container.get("args")
    if command:
        argv = [*command, *(args or [])]
    elif args:
        argv = [*image_entrypoint, *args]
    else:
        argv = [*image_entrypoint, *image_cmd]
    if not argv:
        raise Refused(
            file,
            f"{field}.command",
            "neither the container nor the image says what runs",
            "write the server's command in the container's command/args",
        )
    visible = {name: value for name in env.values if (value := env.get(name)) is not None}
    expanded: list[str] = []
    for token in argv:
        text, unknown = expand(str(token), visible)
        if unknown is not None:
            # Reuse the environment's refusal: a Secret and an unresolvable value alike.
            name = next(n for n, v in visible.items() if v is unknown)
            env.require(name, fix=FIX)
        expanded.append(text)

    def lookup(name: str) -> str | None:
        return env.require(name, fix=FIX)

    context = _Context(file, f"{field}.command/args", lookup)
    return _count(expanded, context, package, default, gunicorn_conf_present)


def processes_for_argv(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    package: str,
    default: int,
    gunicorn_conf_present: bool = False,
) -> int:
    """The same rules for a running process: ``sys.argv`` and ``os.environ``.

    ``python -m uvicorn`` leaves ``sys.argv[0]`` as ``.../uvicorn/__main__.py``; that and a
    console script's path (``/usr/local/bin/uvicorn``) are both understood.
    """
    tokens = list(argv)
    if tokens:
        head = tokens[0].replace("\\", "/")
        if head.endswith("/__main__.py"):
            module = head.rsplit("/", 2)[-2]
            tokens = ["python", "-m", module, *tokens[1:]]
    context = _Context("command line", "argv", environ.get)
    return _count(tokens, context, package, default, gunicorn_conf_present).count


def _count(
    argv: list[str], context: _Context, package: str, default: int, gunicorn_conf: bool
) -> Processes:
    commands = _simple_commands(argv, context)
    results = []
    for command in commands:
        before = dict(context.assigned)
        if command[0] == "export":
            command = command[1:]
        program, rest = _unwrap(command, context)
        if program is None:
            continue  # only assignments: they hold for the commands after them
        rule = _RULES.get(program)
        if rule is None and program == f"module:{package}":
            rule = _service_module
        if rule is not None:
            results.append(rule(rest, context, default, gunicorn_conf))
        context.assigned = before  # ``A=1 cmd`` sets A for cmd alone
    if not results:
        shown = " ".join(argv)
        raise context.refuse(
            f"cannot tell how many server processes {shown!r} starts (not uvicorn, gunicorn,"
            f" fastapi run, hypercorn or python -m {package})",
            "run the server directly in command/args (an entrypoint script hides it), e.g."
            f" python -m {package} or uvicorn ... --workers N",
        )
    # Several servers in one shell line each run at once (``a & b``): their workers add up.
    return Processes(sum(result.count for result in results), "; ".join(r.source for r in results))


def _simple_commands(argv: list[str], context: _Context) -> list[list[str]]:
    """The simple commands ``argv`` runs: itself, or a shell's ``-c`` script split up."""
    program = argv[0].rsplit("/", 1)[-1] if argv else ""
    if program not in SHELLS:
        return [argv]
    if "-c" not in argv[1:-1] and not any(
        a.startswith("-") and "c" in a[1:] and not a.startswith("--") for a in argv[1:-1]
    ):
        raise context.refuse(
            f"{program} runs a script file, which the budget cannot read",
            f"write the server's command line in the container ({program} -c '...' or"
            " command/args)",
        )
    flag = next(
        i for i, a in enumerate(argv[1:], 1) if a == "-c" or (a.startswith("-") and "c" in a)
    )
    script = _shell_expand(argv[flag + 1], context)
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in _SEPARATORS or token == "\n" or "\n" in token:
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def _shell_expand(script: str, context: _Context) -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}`` replaced as the shell would (every container
    variable is exported); ``'single quoted'`` text is left alone."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        operator, fallback = match.group(2), match.group(3)
        value = context.variable(name)
        if operator and (value is None or (operator.startswith(":") and value == "")):
            return fallback or ""
        return value or ""

    parts = re.split(r"('[^']*')", script)
    return "".join(
        part if part.startswith("'") else _SHELL_VARIABLE.sub(replace, part) for part in parts
    )


# Shell words that start a command list rather than name a program ("if x; then exec ...").
_SHELL_WORDS = {"if", "then", "else", "elif", "while", "until", "do", "{", "(", "!", "time"}
_WRAPPERS = {
    "exec",
    "tini",
    "dumb-init",
    "opentelemetry-instrument",
    "ddtrace-run",
    "nice",
}


def _unwrap(command: list[str], context: _Context) -> tuple[str | None, list[str]]:
    """The program a command runs after wrappers and ``VAR=value`` assignments, and its args.
    Python modules come back as ``module:<name>``; ``fastapi run``/``dev`` as one word."""
    tokens = list(command)
    while tokens:
        head = tokens[0].rsplit("/", 1)[-1]
        if _ASSIGNMENT.fullmatch(tokens[0]):
            name, value = tokens[0].split("=", 1)
            context.assigned[name] = value
            tokens = tokens[1:]
        elif tokens[0] in _SHELL_WORDS:
            tokens = tokens[1:]
        elif head in _WRAPPERS or head == "env":
            tokens = tokens[1:]
            while tokens and (tokens[0].startswith("-") and tokens[0] != "--"):
                tokens = tokens[1:]  # the wrapper's own flags (tini -g, env -i, nice -n 5)
                if head == "nice" and tokens and tokens[0].lstrip("-").isdigit():
                    tokens = tokens[1:]
            if tokens and tokens[0] == "--":
                tokens = tokens[1:]
        elif head == "newrelic-admin" and tokens[1:2] == ["run-program"]:
            tokens = tokens[2:]
        elif head in ("uv", "poetry", "pipenv", "pdm") and tokens[1:2] == ["run"]:
            tokens = tokens[2:]
            while tokens and tokens[0].startswith("-"):
                tokens = tokens[1:]
        else:
            break
    if not tokens:
        return None, []
    head = tokens[0].rsplit("/", 1)[-1]
    if _PYTHON.fullmatch(head):
        rest = tokens[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]  # python -u -O -m ...
        if len(rest) >= 2 and rest[0] == "-m":
            return f"module:{rest[1]}", rest[2:]
        return "python script", rest
    if head == "fastapi" and len(tokens) > 1:
        return f"fastapi {tokens[1]}", tokens[2:]
    return head, tokens[1:]


def _whole(text: str, where: str, context: _Context) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise context.refuse(
            f"{where} is {text!r}, not a whole number of at least 1, so the budget cannot count"
            " the workers"
        )
    return value


def _flag(args: Sequence[str], long: str, short: str | None) -> str | None:
    """The last value given to ``--long N``, ``--long=N``, ``-s N`` or ``-sN``."""
    found = None
    for index, token in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else None
        if token == long or (short and token == short):
            found = following
        elif token.startswith(f"{long}="):
            found = token.split("=", 1)[1]
        elif short and token.startswith(short) and len(token) > len(short):
            found = token[len(short) :]
    return found


def _from_env(name: str, context: _Context) -> Processes | None:
    text = context.variable(name)
    if text is None:
        return None
    return Processes(_whole(text, name, context), f"{context.file}: {name}")


def _uvicorn(args: list[str], context: _Context, default: int, conf: bool) -> Processes:
    if "--reload" in args:
        return Processes(1, f"{context.file}: {context.field} uvicorn --reload")
    flag = _flag(args, "--workers", None)
    if flag is not None:
        count = _whole(flag, "uvicorn --workers", context)
        return Processes(count, f"{context.file}: {context.field} --workers")
    return (
        _from_env("UVICORN_WORKERS", context)
        or _from_env("WEB_CONCURRENCY", context)
        or Processes(1, f"{context.file}: {context.field} uvicorn's default, 1")
    )


def _gunicorn(args: list[str], context: _Context, default: int, conf: bool) -> Processes:
    flag = _flag(args, "--workers", "-w")
    if flag is not None:
        count = _whole(flag, "gunicorn --workers", context)
        return Processes(count, f"{context.file}: {context.field} --workers")
    cmd_args = context.variable("GUNICORN_CMD_ARGS")
    env_args = shlex.split(cmd_args) if cmd_args else []
    flag = _flag(env_args, "--workers", "-w")
    if flag is not None:
        count = _whole(flag, "GUNICORN_CMD_ARGS --workers", context)
        return Processes(count, f"{context.file}: GUNICORN_CMD_ARGS --workers")
    if conf or _flag(args, "--config", "-c") or _flag(env_args, "--config", "-c"):
        raise context.refuse(
            "gunicorn reads its workers from a configuration file (Python), which the budget"
            " cannot evaluate",
            "give gunicorn --workers N on its command line (it wins over the file)",
        )
    return _from_env("WEB_CONCURRENCY", context) or Processes(
        1, f"{context.file}: {context.field} gunicorn's default, 1"
    )


def _fastapi_run(args: list[str], context: _Context, default: int, conf: bool) -> Processes:
    flag = _flag(args, "--workers", None)
    if flag is not None:
        count = _whole(flag, "fastapi run --workers", context)
        return Processes(count, f"{context.file}: {context.field} --workers")
    return _from_env("WEB_CONCURRENCY", context) or Processes(
        1, f"{context.file}: {context.field} fastapi run's default, 1"
    )


def _fastapi_dev(args: list[str], context: _Context, default: int, conf: bool) -> Processes:
    return Processes(1, f"{context.file}: {context.field} fastapi dev (one process)")


def _hypercorn(args: list[str], context: _Context, default: int, conf: bool) -> Processes:
    flag = _flag(args, "--workers", "-w")
    if flag is not None:
        count = _whole(flag, "hypercorn --workers", context)
        return Processes(count, f"{context.file}: {context.field} --workers")
    if _flag(args, "--config", "-c"):
        raise context.refuse(
            "hypercorn reads its workers from a configuration file",
            "give hypercorn --workers N on its command line",
        )
    return Processes(1, f"{context.file}: {context.field} hypercorn's default, 1")


def _service_module(args: list[str], context: _Context, default: int, conf: bool) -> Processes:
    return _from_env("WEB_CONCURRENCY", context) or Processes(
        _whole(str(default), "the declared workers_per_pod", context),
        f"{context.file}: {context.field} WEB_CONCURRENCY unset, declared workers_per_pod",
    )


_Rule = Callable[[list[str], _Context, int, bool], Processes]
_RULES: dict[str, _Rule] = {
    "uvicorn": _uvicorn,
    "module:uvicorn": _uvicorn,
    "gunicorn": _gunicorn,
    "module:gunicorn": _gunicorn,
    "fastapi run": _fastapi_run,
    "fastapi dev": _fastapi_dev,
    "hypercorn": _hypercorn,
    "module:hypercorn": _hypercorn,
}
