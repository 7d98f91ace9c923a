"""poolwise.shapes.processes and .environment: worker processes per pod, from every way a team
sets them, and budget inputs that come from a Secret or cannot be resolved.

Each row: the container as a manifest writes it, and its verdict (the worker count) or the
refusal's first line.
"""

from __future__ import annotations

from typing import Any

import pytest

from poolwise.shapes import Refused
from poolwise.shapes.environment import container_environment
from poolwise.shapes.processes import processes_for_argv, processes_per_pod

FILE = "deploy/k8s/deployment.yaml"
FIELD = "spec.template.spec.containers[0]"
PACKAGE = "orders"
DECLARED = 2
CONFIG_MAPS = {"orders-config": {"WEB_CONCURRENCY": "6", "UVICORN_WORKERS": "7"}}


def env(**pairs: str) -> list[dict[str, str]]:
    return [{"name": name, "value": value} for name, value in pairs.items()]


def count(container: dict[str, Any], **options: Any) -> int:
    environment = container_environment(container, file=FILE, field=FIELD, config_maps=CONFIG_MAPS)
    return processes_per_pod(
        container,
        environment,
        file=FILE,
        field=FIELD,
        package=PACKAGE,
        default=DECLARED,
        image_cmd=["python", "-m", PACKAGE],
        **options,
    ).count


COUNTED = [
    ("image CMD python -m <package>, nothing set: declared default", {}, DECLARED),
    ("python -m <package> with WEB_CONCURRENCY", {"env": env(WEB_CONCURRENCY="3")}, 3),
    ("uvicorn --workers N", {"command": ["uvicorn", "orders.app:app", "--workers", "4"]}, 4),
    ("uvicorn --workers=N", {"command": ["uvicorn", "orders.app:app", "--workers=5"]}, 5),
    (
        "uvicorn: the last --workers wins",
        {"command": ["uvicorn", "a:b", "--workers", "2"], "args": ["--workers", "6"]},
        6,
    ),
    (
        "uvicorn with UVICORN_WORKERS",
        {"command": ["uvicorn", "a:b"], "env": env(UVICORN_WORKERS="4")},
        4,
    ),
    (
        "uvicorn: UVICORN_WORKERS wins over WEB_CONCURRENCY",
        {"command": ["uvicorn", "a:b"], "env": env(WEB_CONCURRENCY="2", UVICORN_WORKERS="5")},
        5,
    ),
    (
        "uvicorn: --workers wins over UVICORN_WORKERS",
        {"command": ["uvicorn", "a:b", "--workers", "3"], "env": env(UVICORN_WORKERS="9")},
        3,
    ),
    (
        "uvicorn with WEB_CONCURRENCY",
        {"command": ["uvicorn", "a:b"], "env": env(WEB_CONCURRENCY="3")},
        3,
    ),
    ("uvicorn, nothing set: 1", {"command": ["uvicorn", "a:b"]}, 1),
    (
        "uvicorn --reload runs one server",
        {"command": ["uvicorn", "a:b", "--reload", "--workers", "4"]},
        1,
    ),
    (
        "python -m uvicorn -w is not uvicorn's flag",
        {"command": ["python", "-m", "uvicorn", "a:b"]},
        1,
    ),
    (
        "python3.12 -u -m uvicorn --workers",
        {"command": ["python3.12", "-u", "-m", "uvicorn", "a:b", "--workers", "4"]},
        4,
    ),
    ("args only, image CMD replaced", {"args": ["uvicorn", "a:b", "--workers", "3"]}, 3),
    (
        "k8s $(VAR) in args",
        {"args": ["uvicorn", "a:b", "--workers", "$(WORKERS)"], "env": env(WORKERS="4")},
        4,
    ),
    ("sh -c uvicorn --workers", {"command": ["sh", "-c", "uvicorn a:b --workers 4"]}, 4),
    (
        "/bin/bash -c exec uvicorn",
        {"command": ["/bin/bash", "-c", "exec uvicorn a:b --workers=3"]},
        3,
    ),
    (
        "sh -c migrations && exec uvicorn",
        {"command": ["sh", "-c", "alembic upgrade head && exec uvicorn a:b --workers 4"]},
        4,
    ),
    (
        "sh -c $WEB_CONCURRENCY in the script",
        {
            "command": ["sh", "-c", "uvicorn a:b --workers $WEB_CONCURRENCY"],
            "env": env(WEB_CONCURRENCY="5"),
        },
        5,
    ),
    ("sh -c ${W:-3} default", {"command": ["sh", "-c", "uvicorn a:b --workers ${W:-3}"]}, 3),
    (
        "sh -c VAR=N prefix assignment",
        {"command": ["sh", "-c", "WEB_CONCURRENCY=4 uvicorn a:b"]},
        4,
    ),
    (
        "sh -c export then server",
        {"command": ["sh", "-c", "export UVICORN_WORKERS=6; uvicorn a:b"]},
        6,
    ),
    ("sh -euc flags", {"command": ["sh", "-euc", "uvicorn a:b --workers 2"]}, 2),
    (
        "multi-line script in args, with set -e and a migration",
        {
            "command": ["/bin/sh", "-c"],
            "args": ["set -e\nalembic upgrade head\nexec gunicorn -w 4 app:app\n"],
        },
        4,
    ),
    (
        "script with comments",
        {"command": ["/bin/sh", "-c"], "args": ["# start\nuvicorn a:b --workers 3  # three\n"]},
        3,
    ),
    (
        "if/then in the script",
        {"command": ["bash", "-c", "if [ -f x ]; then exec uvicorn a:b --workers 2; fi"]},
        2,
    ),
    (
        "sh -c two servers in the background",
        {"command": ["sh", "-c", "uvicorn a:b --workers 2 & uvicorn c:d --workers 3"]},
        5,
    ),
    (
        "gunicorn -w N",
        {"command": ["gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "4", "a:b"]},
        4,
    ),
    ("gunicorn -wN", {"command": ["gunicorn", "-w8", "a:b"]}, 8),
    (
        "gunicorn threads share a process",
        {"command": ["gunicorn", "-w", "2", "--threads", "8", "a:b"]},
        2,
    ),
    ("gunicorn --workers=N", {"command": ["gunicorn", "--workers=3", "a:b"]}, 3),
    (
        "gunicorn GUNICORN_CMD_ARGS",
        {
            "command": ["gunicorn", "a:b"],
            "env": env(GUNICORN_CMD_ARGS="--bind=0.0.0.0 --workers=5"),
        },
        5,
    ),
    (
        "gunicorn: command line wins over GUNICORN_CMD_ARGS",
        {"command": ["gunicorn", "-w", "2", "a:b"], "env": env(GUNICORN_CMD_ARGS="-w 9")},
        2,
    ),
    (
        "gunicorn WEB_CONCURRENCY",
        {"command": ["gunicorn", "a:b"], "env": env(WEB_CONCURRENCY="3")},
        3,
    ),
    ("gunicorn nothing set: 1", {"command": ["python", "-m", "gunicorn", "a:b"]}, 1),
    (
        "gunicorn -c file but --workers on the command line",
        {"command": ["gunicorn", "-c", "gunicorn.conf.py", "--workers", "3", "a:b"]},
        3,
    ),
    (
        "fastapi run --workers",
        {"command": ["fastapi", "run", "orders/app.py", "--workers", "4"]},
        4,
    ),
    (
        "fastapi run WEB_CONCURRENCY",
        {"command": ["fastapi", "run"], "env": env(WEB_CONCURRENCY="3")},
        3,
    ),
    ("fastapi dev", {"command": ["fastapi", "dev", "--workers", "4"]}, 1),
    ("hypercorn -w", {"command": ["hypercorn", "-w", "3", "a:b"]}, 3),
    (
        "wrappers: tini -- ddtrace-run",
        {"command": ["tini", "--", "ddtrace-run", "uvicorn", "a:b", "--workers", "2"]},
        2,
    ),
    (
        "wrappers: opentelemetry-instrument",
        {
            "command": [
                "opentelemetry-instrument",
                "python",
                "-m",
                "uvicorn",
                "a:b",
                "--workers",
                "3",
            ]
        },
        3,
    ),
    (
        "wrappers: newrelic-admin run-program",
        {"command": ["newrelic-admin", "run-program", "gunicorn", "-w", "4", "a:b"]},
        4,
    ),
    (
        "wrappers: uv run",
        {"command": ["uv", "run", "--frozen", "uvicorn", "a:b", "--workers", "2"]},
        2,
    ),
    ("wrappers: env A=B", {"command": ["env", "WEB_CONCURRENCY=5", "python", "-m", "orders"]}, 5),
    (
        "WEB_CONCURRENCY from a ConfigMap (envFrom)",
        {"envFrom": [{"configMapRef": {"name": "orders-config"}}]},
        6,
    ),
    (
        "UVICORN_WORKERS from configMapKeyRef",
        {
            "command": ["uvicorn", "a:b"],
            "env": [
                {
                    "name": "UVICORN_WORKERS",
                    "valueFrom": {
                        "configMapKeyRef": {"name": "orders-config", "key": "UVICORN_WORKERS"}
                    },
                }
            ],
        },
        7,
    ),
    (
        "env wins over envFrom secretRef",
        {"envFrom": [{"secretRef": {"name": "db"}}], "env": env(WEB_CONCURRENCY="3")},
        3,
    ),
    (
        "envFrom secretRef with a prefix cannot set WEB_CONCURRENCY",
        {
            "envFrom": [{"secretRef": {"name": "db"}, "prefix": "DB_"}],
            "env": env(WEB_CONCURRENCY="2"),
        },
        2,
    ),
    (
        "a later ConfigMap envFrom overrides an earlier secretRef",
        {"envFrom": [{"secretRef": {"name": "db"}}, {"configMapRef": {"name": "orders-config"}}]},
        6,
    ),
]


@pytest.mark.parametrize(("shape", "container", "expected"), COUNTED, ids=[c[0] for c in COUNTED])
def test_worker_processes_per_pod(shape, container, expected):
    assert count(container) == expected


SECRET = "set WEB_CONCURRENCY as a plain env value (env: wins over envFrom) or in a ConfigMap"
REFUSED = [
    (
        "WEB_CONCURRENCY from secretKeyRef",
        {
            "env": [
                {
                    "name": "WEB_CONCURRENCY",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                }
            ]
        },
        f"{FILE}: {FIELD}.env[0] (secretKeyRef s): WEB_CONCURRENCY comes from a Secret",
    ),
    (
        "envFrom secretRef may carry WEB_CONCURRENCY",
        {"envFrom": [{"secretRef": {"name": "app-env"}}]},
        f"{FILE}: envFrom[0] of {FIELD} (secretRef app-env): WEB_CONCURRENCY comes from a Secret",
    ),
    (
        "secretRef after the ConfigMap that sets it",
        {"envFrom": [{"configMapRef": {"name": "orders-config"}}, {"secretRef": {"name": "s"}}]},
        f"{FILE}: envFrom[1] of {FIELD} (secretRef s): WEB_CONCURRENCY comes from a Secret",
    ),
    (
        "UVICORN_WORKERS from a Secret",
        {"command": ["uvicorn", "a:b"], "envFrom": [{"secretRef": {"name": "s"}}]},
        f"{FILE}: envFrom[0] of {FIELD} (secretRef s): UVICORN_WORKERS comes from a Secret",
    ),
    (
        "GUNICORN_CMD_ARGS from a Secret",
        {
            "command": ["gunicorn", "a:b"],
            "env": [
                {
                    "name": "GUNICORN_CMD_ARGS",
                    "valueFrom": {"secretKeyRef": {"name": "s", "key": "a"}},
                }
            ],
        },
        f"{FILE}: {FIELD}.env[0] (secretKeyRef s): GUNICORN_CMD_ARGS comes from a Secret",
    ),
    (
        "$(VAR) in args from a Secret",
        {
            "args": ["uvicorn", "a:b", "--workers", "$(W)"],
            "env": [{"name": "W", "valueFrom": {"secretKeyRef": {"name": "s", "key": "w"}}}],
        },
        f"{FILE}: {FIELD}.env[0] (secretKeyRef s): W comes from a Secret",
    ),
    (
        "env value built from a Secret variable",
        {
            "env": [
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "w"}}},
                {"name": "WEB_CONCURRENCY", "value": "$(S)"},
            ]
        },
        f"{FILE}: {FIELD}.env[1]: WEB_CONCURRENCY comes from a Secret",
    ),
    (
        "ConfigMap not under deploy/",
        {"envFrom": [{"configMapRef": {"name": "elsewhere"}}]},
        f"{FILE}: envFrom[0] of {FIELD} (configMapRef elsewhere): the ConfigMap is not under"
        " deploy/, and it may set WEB_CONCURRENCY; fix: write --workers N",
    ),
    (
        "configMapKeyRef to a missing key",
        {
            "env": [
                {
                    "name": "WEB_CONCURRENCY",
                    "valueFrom": {"configMapKeyRef": {"name": "orders-config", "key": "nope"}},
                }
            ]
        },
        f"{FILE}: {FIELD}.env[0] (configMapKeyRef orders-config/nope): names a ConfigMap key"
        " that is not under deploy/; fix: write --workers N",
    ),
    (
        "WEB_CONCURRENCY from the downward API",
        {
            "env": [
                {
                    "name": "WEB_CONCURRENCY",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}},
                }
            ]
        },
        f"{FILE}: {FIELD}.env[0] (resourceFieldRef): is set at run time, so the files do not"
        " say what it is; fix: write --workers N",
    ),
    (
        "--workers not a number",
        {"command": ["uvicorn", "a:b", "--workers", "auto"]},
        f"{FILE}: {FIELD}.command/args: uvicorn --workers is 'auto', not a whole number",
    ),
    (
        "--workers from the shell's $(nproc)",
        {"command": ["sh", "-c", "exec uvicorn a:b --workers $(nproc)"]},
        f"{FILE}: {FIELD}.command/args: uvicorn --workers is '$(nproc)', not a whole number",
    ),
    (
        "WEB_CONCURRENCY zero",
        {"env": env(WEB_CONCURRENCY="0")},
        f"{FILE}: {FIELD}.command/args: WEB_CONCURRENCY is '0', not a whole number of at least 1",
    ),
    (
        "an entrypoint script hides the server",
        {"command": ["./start.sh"]},
        f"{FILE}: {FIELD}.command/args: cannot tell how many server processes './start.sh' starts",
    ),
    (
        "sh runs a script file",
        {"command": ["sh", "/app/start.sh"]},
        f"{FILE}: {FIELD}.command/args: sh runs a script file, which the budget cannot read",
    ),
    (
        "python app.py",
        {"command": ["python", "main.py"]},
        f"{FILE}: {FIELD}.command/args: cannot tell how many server processes 'python main.py'",
    ),
    (
        "gunicorn -c config file without --workers",
        {"command": ["gunicorn", "-c", "python:orders.gunicorn_conf", "a:b"]},
        f"{FILE}: {FIELD}.command/args: gunicorn reads its workers from a configuration file",
    ),
    (
        "gunicorn config named in GUNICORN_CMD_ARGS",
        {"command": ["gunicorn", "a:b"], "env": env(GUNICORN_CMD_ARGS="--config=/etc/g.py")},
        f"{FILE}: {FIELD}.command/args: gunicorn reads its workers from a configuration file",
    ),
    (
        "hypercorn -c config file",
        {"command": ["hypercorn", "-c", "file:h.toml", "a:b"]},
        f"{FILE}: {FIELD}.command/args: hypercorn reads its workers from a configuration file",
    ),
]


@pytest.mark.parametrize(("shape", "container", "first"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_count_that_cannot_be_read_is_refused_with_the_fix(shape, container, first):
    with pytest.raises(Refused) as refused:
        count(container)
    message = str(refused.value)
    assert message.startswith(first), message
    assert "; fix: " in message and "\n" not in message


def test_a_gunicorn_conf_py_in_the_image_is_refused_unless_workers_are_on_the_command_line():
    with pytest.raises(Refused, match="gunicorn reads its workers from a configuration file"):
        count({"command": ["gunicorn", "a:b"]}, gunicorn_conf_present=True)
    assert count({"command": ["gunicorn", "-w", "3", "a:b"]}, gunicorn_conf_present=True) == 3


def test_a_refusal_never_echoes_a_value_from_a_secret_or_a_config_map():
    container = {"envFrom": [{"secretRef": {"name": "db"}}], "env": env(DATABASE_URL="x")}
    with pytest.raises(Refused) as refused:
        count(container)
    assert "db" in str(refused.value)  # the Secret's name, which the manifest shows
    assert "DATABASE_URL" not in str(refused.value)


# The start-up guard's view of the same rules: sys.argv and os.environ.
AT_RUN_TIME = [
    (["/usr/local/bin/uvicorn", "orders.app:app"], {"UVICORN_WORKERS": "4"}, 4),
    (
        ["/usr/local/lib/python3.12/site-packages/uvicorn/__main__.py", "a:b", "--workers", "3"],
        {},
        3,
    ),
    (["/app/src/orders/__main__.py"], {"WEB_CONCURRENCY": "5"}, 5),
    (["/app/src/orders/__main__.py"], {}, DECLARED),
    (["/usr/local/bin/gunicorn", "a:b"], {"GUNICORN_CMD_ARGS": "-w 6"}, 6),
    (["/usr/local/bin/gunicorn", "a:b"], {"WEB_CONCURRENCY": "2"}, 2),
]


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    AT_RUN_TIME,
    ids=[" ".join(a[0][:2]) + str(a[1]) for a in AT_RUN_TIME],
)
def test_the_guard_counts_a_running_process_by_the_same_rules(argv, environ, expected):
    assert processes_for_argv(argv, environ, package=PACKAGE, default=DECLARED) == expected


def test_the_guard_refuses_what_it_cannot_count():
    with pytest.raises(Refused, match=r"^command line: argv: uvicorn --workers is 'x'"):
        processes_for_argv(["uvicorn", "a:b", "--workers", "x"], {}, package=PACKAGE, default=1)
