"""The `update-plan` and `update-apply` subcommands: their options, output and exit codes.

Exit codes, as `fleet`'s: 0 every update applies cleanly and every cluster fits after it (and
after each wave), 1 a cluster would be over or an update conflicts, is refused or fails its
tests (for update-apply: a chosen service was not committed), 2 a service, the template or the
release cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from . import scratch, update_plan
from .services import InputError

UNREADABLE = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", metavar="PATH", nargs="+", type=Path)
    parser.add_argument(
        "--to", required=True, metavar="REF", help="the template release (tag, branch or commit)"
    )
    waves = parser.add_mutually_exclusive_group()
    waves.add_argument(
        "--waves",
        type=int,
        metavar="N",
        help="order the services in N waves, smallest share of their cluster first",
    )
    waves.add_argument(
        "--platform",
        metavar="FILE",
        type=Path,
        action="append",
        help=(
            f"platform data file whose {update_plan.WAVES_KEY} names each service's wave"
            " (project_name: wave); repeat for several clusters"
        ),
    )
    parser.add_argument(
        "--run-tests",
        action="store_true",
        help="also run each updated copy's own tests (python -m pytest, this interpreter)",
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="pass --trust to copier, for a release whose CHANGELOG says it runs migrations",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="services updated at once (default: the number of CPUs)",
    )


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    plan_parser = commands.add_parser(
        "update-plan",
        help="update every service to a release in scratch copies; budgets before and after",
        description=(
            "Runs copier update to REF in a scratch copy of each service's repository (the"
            " repository itself is not touched) and sums every cluster before and after. Exit 0"
            " clean and fits, 1 a cluster over or an update not clean, 2 an input unreadable."
        ),
    )
    _common(plan_parser)
    plan_parser.add_argument("--json", action="store_true", help="print JSON instead of text")

    apply_parser = commands.add_parser(
        "update-apply",
        help="commit each clean update on a new branch of its repository; never pushes",
        description=(
            "Plans like update-plan, then commits each clean update on BRANCH, a new branch of"
            " the service's repository (its working tree and current branch are not touched)."
            " Nothing is pushed."
        ),
    )
    _common(apply_parser)
    apply_parser.add_argument(
        "--branch", metavar="NAME", help="the new branch (default: poolwise-update-REF)"
    )
    apply_parser.add_argument(
        "--wave", metavar="NAME", help="commit only this wave's services (with --waves/--platform)"
    )


def _branch(args: argparse.Namespace) -> str:
    if args.branch:
        return str(args.branch)
    return "poolwise-update-" + re.sub(r"[^A-Za-z0-9._-]+", "-", args.to).strip("-.")


def run(args: argparse.Namespace) -> int:
    command = f"poolwise {args.command}"
    if args.jobs < 1 or (args.waves is not None and args.waves < 1):
        print(f"{command}: --jobs and --waves must be at least 1", file=sys.stderr)
        return UNREADABLE
    if args.command == "update-apply" and args.wave and not (args.waves or args.platform):
        print(f"{command}: --wave needs --waves N or --platform FILE", file=sys.stderr)
        return UNREADABLE
    with update_plan.scratch_directory() as workdir:
        try:
            result = update_plan.plan(
                args.paths,
                args.to,
                Path(workdir),
                jobs=args.jobs,
                waves=args.waves,
                platform=args.platform,
                run_tests=args.run_tests,
                trust=args.trust,
            )
            if args.command == "update-apply":
                lines, code = update_plan.apply(result, _branch(args), args.wave)
        except (InputError, scratch.GitFailed) as error:
            print(f"{command}: {error}", file=sys.stderr)
            return UNREADABLE
        if args.command == "update-plan":
            if args.json:
                print(json.dumps(update_plan.as_json(result), indent=2))
            else:
                print(update_plan.text(result))
            return result.exit_code
        print(update_plan.text(result))
        print()
        print("\n".join(lines))
        if any(planned.after_error for planned in result.services):
            return UNREADABLE
        return code
