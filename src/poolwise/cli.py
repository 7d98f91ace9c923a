"""The `poolwise` command: `fleet` sums declared budgets per cluster, `doctor` checks the server,
`update-plan` and `update-apply` try a template release on every service first.

Exit codes, for CI jobs and schedules: 0 everything fits (or is healthy), 1 a cluster is over (or
a finding), 2 an input could not be read (or the server could not be reached).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, fleet, services, update_command

FITS, OVER, UNREADABLE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolwise",
        description="Connection budgets of poolwise services, summed per PostgreSQL cluster.",
    )
    parser.add_argument("--version", action="version", version=f"poolwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

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
            " summed worst case of its services, and their PgBouncer caps"
        ),
    )
    fleet_parser.add_argument(
        "--cluster",
        metavar="NAME",
        help="only this db_cluster (--sql needs it when the paths hold services of several)",
    )
    fleet_parser.add_argument(
        "--svg", metavar="FILE", type=Path, help="also draw one stacked bar per cluster"
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
        result = fleet.choose(fleet.clusters(found, proposed), args.cluster)
        # Built before anything is printed: a name it refuses leaves no half-printed SQL.
        guardrail_sql = fleet.sql(result) if args.sql else ""
    except services.InputError as error:
        print(f"poolwise fleet: {error}", file=sys.stderr)
        return UNREADABLE
    if args.json:
        print(json.dumps(fleet.as_json(result), indent=2))
    elif args.sql:
        print(guardrail_sql)
    else:
        print(fleet.text(result))
    if args.svg:
        args.svg.write_text(fleet.svg(result))
    return FITS if all(cluster.fits for cluster in result) else OVER


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor

    return doctor.run(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "fleet":
        return _fleet(args)
    if args.command in ("update-plan", "update-apply"):
        return update_command.run(args)
    return _doctor(args)
