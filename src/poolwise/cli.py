"""The `poolwise` command: `budget` checks one service, `fleet` sums declared budgets per
cluster, `doctor` checks the server, `update-plan` and `update-apply` try a template release on
every service first.

Exit codes, for CI jobs and schedules: 0 everything fits (or is healthy), 1 a budget or a cluster
is over (or a finding), 2 an input could not be read (or the server could not be reached).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, allocations, deployed, fleet, services, update_command

FITS, OVER, UNREADABLE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolwise",
        description="Connection budgets of poolwise services, summed per PostgreSQL cluster.",
    )
    parser.add_argument("--version", action="version", version=f"poolwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    budget_parser = commands.add_parser(
        "budget",
        help="print one service's connection budget, every variant of deploy/ with its inputs",
        description=(
            "PATH is a generated service or a directory inside one (default: the current"
            " directory). Exit 0 when every variant fits, 1 when one is over, 2 when an input"
            " cannot be read."
        ),
    )
    budget_parser.add_argument("path", metavar="PATH", nargs="?", type=Path, default=Path())

    fleet_parser = commands.add_parser(
        "fleet",
        help="sum every service's worst case per db_cluster and check it against the limits",
        description=(
            "Each PATH is a generated service or a folder to search for them. Exit 0 when every"
            " cluster fits, 1 when one is over, 2 when an input cannot be read."
        ),
    )
    fleet_parser.add_argument("paths", metavar="PATH", nargs="+", type=Path)
    fleet_parser.add_argument(
        "--limits",
        metavar="FILE",
        type=Path,
        help="proposed limits (a platform data file); evaluates without touching any service",
    )
    output = fleet_parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of text")
    output.add_argument(
        "--sql",
        action="store_true",
        help=(
            "print SQL that creates or caps (CONNECTION LIMIT) each role of one cluster at the"
            " summed allocations of its services (their worst case where a service has none),"
            " and their PgBouncer caps"
        ),
    )
    output.add_argument(
        "--suggest-allocations",
        action="store_true",
        help=(
            "print a db_allocations: block for one cluster's platform file, from today's worst"
            " cases, that fits the cluster"
        ),
    )
    fleet_parser.add_argument(
        "--cluster",
        metavar="NAME",
        help=(
            "only this db_cluster (--sql and --suggest-allocations need it when the paths hold"
            " services of several)"
        ),
    )
    fleet_parser.add_argument(
        "--svg", metavar="FILE", type=Path, help="also draw one stacked bar per cluster"
    )
    fleet_parser.add_argument(
        "--dashboard",
        metavar="FILE",
        type=Path,
        help="also write a Grafana dashboard: each cluster's live connections per service",
    )

    doctor_parser = commands.add_parser(
        "doctor",
        help="compare the live server (pg_monitor role, read-only) with the declared fleet",
        description=(
            "Read-only checks of a running PostgreSQL (and PgBouncer) against the services at"
            " PATH. Exit 0 healthy, 1 a finding, 2 cannot connect or read an input."
        ),
    )
    doctor_parser.add_argument("paths", metavar="PATH", nargs="+", type=Path)
    doctor_parser.add_argument("--dsn", required=True, help="PostgreSQL URL of a pg_monitor role")
    doctor_parser.add_argument(
        "--pgbouncer-dsn", help="URL of PgBouncer's admin console (database pgbouncer)"
    )
    doctor_parser.add_argument(
        "--idle-in-transaction-seconds",
        type=float,
        default=30.0,
        help="report sessions idle in a transaction for longer than this (default 30)",
    )
    doctor_parser.add_argument(
        "--cluster",
        metavar="NAME",
        help="the db_cluster the DSN is (needed when the paths hold services of several)",
    )
    doctor_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    update_command.add_commands(commands)
    return parser


def _fleet(args: argparse.Namespace) -> int:
    try:
        found = [services.load(root) for root in services.find(args.paths)]
        proposed = fleet.load_proposed(args.limits) if args.limits else None
        unused = sorted(set(proposed or {}) - {service.cluster for service in found})
        if unused:
            # A misspelt cluster would leave every real one on its old limits: never a pass.
            used = ", ".join(sorted({service.cluster for service in found})) or "none"
            raise services.InputError(
                f"--limits {args.limits}: db_cluster {', '.join(unused)} -> no service at the"
                f" paths uses it (theirs: {used}); fix db_cluster in the file"
            )
        result = fleet.choose(fleet.clusters(found, proposed), args.cluster)
        # Built before anything is printed: a name it refuses leaves no half-printed SQL.
        guardrail_sql = fleet.sql(result) if args.sql else ""
        suggestion = allocations.suggestion_yaml(result) if args.suggest_allocations else ""
    except services.InputError as error:
        print(f"poolwise fleet: {error}", file=sys.stderr)
        return UNREADABLE
    if args.json:
        print(json.dumps(fleet.as_json(result), indent=2))
    elif args.sql:
        print(guardrail_sql)
    elif args.suggest_allocations:
        # The suggestion fits by construction; the exit code still says whether today's
        # allocations do.
        print(suggestion)
    else:
        print(fleet.text(result))
    if args.svg:
        try:
            args.svg.write_text(fleet.svg(result))
        except OSError as error:
            print(f"poolwise fleet: --svg {args.svg}: {error.strerror}", file=sys.stderr)
            return UNREADABLE
    if args.dashboard:
        from . import dashboard

        try:
            args.dashboard.write_text(json.dumps(dashboard.fleet_dashboard(result), indent=2))
        except OSError as error:
            print(
                f"poolwise fleet: --dashboard {args.dashboard}: {error.strerror}", file=sys.stderr
            )
            return UNREADABLE
    return FITS if all(cluster.fits for cluster in result) else OVER


def _budget(args: argparse.Namespace) -> int:
    """Each variant's table and inputs on stdout; what does not fit or cannot be read on stderr."""
    start = args.path.resolve()
    root = services.project_root(start)
    if root is None:
        print(
            f"poolwise budget: {start}: no service at or above it (src/<package>/db/topology.toml);"
            " give the path of a generated service",
            file=sys.stderr,
        )
        return UNREADABLE
    try:
        project = services.project(root)
        has_deploy = (root / "deploy").is_dir()
        names = deployed.variants(root) if has_deploy else []
        readings = [] if has_deploy else [deployed.read_declared(project)]
    except (services.InputError, deployed.Unreadable, KeyError) as error:
        print(f"poolwise budget: {root}: {error}", file=sys.stderr)
        return UNREADABLE
    if has_deploy and not names:
        print(f"poolwise budget: {root}: deploy/ holds nothing to read", file=sys.stderr)
        return UNREADABLE
    if not has_deploy:
        print(f"no deploy/ in {root}: checking the declared topology only")
    status = FITS
    for variant in names:
        try:
            readings.append(deployed.read_variant(root, variant, project))
        except (deployed.Unreadable, deployed.ToolMissing, KeyError) as error:
            # The other variants are still read and printed.
            print(f"cannot read {variant}: {error}", file=sys.stderr)
            status = UNREADABLE
    for reading in readings:
        print(reading.report(), end="\n\n")
        problems = reading.problems()
        for line in problems:
            print(line, file=sys.stderr)
        status = max(status, OVER if problems else FITS, UNREADABLE if reading.incomplete else FITS)
    return status


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    return doctor.run(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = {
        "budget": _budget,
        "fleet": _fleet,
        "update-plan": update_command.run,
        "update-apply": update_command.run,
    }.get(args.command, _doctor)
    try:
        return run(args)
    except Exception as error:
        # An input no reader foresaw must still give exit 2 and one line, never a traceback
        # with exit 1 that a CI job would read as "over budget". Only the exception's type is
        # printed: its text could quote a value from anywhere (a Secret, the environment).
        import traceback  # only this path needs it

        frame = traceback.extract_tb(error.__traceback__)[-1]
        print(
            f"poolwise {args.command}: could not read an input ({type(error).__name__} at"
            f" {Path(frame.filename).name}:{frame.lineno}); please report it with the service's"
            " deploy/",
            file=sys.stderr,
        )
        return UNREADABLE
