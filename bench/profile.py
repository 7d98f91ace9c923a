"""Where a service's time holding the GIL goes, per request: generated against hand-written.

    .venv/bin/python bench/profile.py --target sync --clients 30            # ~2 minutes
    .venv/bin/python bench/profile.py --target async --clients 10 --rounds 5

Run by hand, not by the test suite; it needs PostgreSQL's server binaries (like the realdb
tier) and py-spy (the `bench` dependency group), with the right to ptrace the services (root,
or kernel.yama.ptrace_scope = 0).

The services and the load are bench/efficiency.py's: the same rendered project, the same pool
(5 + 5), each service on a database of its own, closed-loop clients on GET /work?ms=MS, the
services taking turns within a round. While a service serves, `py-spy record --gil
--nonblocking` samples it at --rate Hz: only samples of a thread that holds the GIL count, so
a sample is a slice of the one core the service's Python code can use, whatever the thread.
Reported per service: samples holding the GIL per request served (in microseconds at the
sampling rate), split by the package of the innermost frame, and the innermost functions whose
share differs most between the two services. bench/efficiency.py says how fast; this says
where the difference in CPU per request is, to find what to change next.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import efficiency  # noqa: E402  (bench/efficiency.py: the services, the pool and the runner)
import load as bench  # noqa: E402
from harness import PostgresCluster, missing_requirements  # noqa: E402
from loadgen import load  # noqa: E402
from services import render  # noqa: E402

# "function (path/to/module.py:line)" in py-spy's raw (collapsed) output.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<path>[^()]*?)(?::\d+)?\)$")


@dataclass
class Profile:
    """One service's samples over every round."""

    label: str
    requests: int = 0
    seconds: float = 0.0
    user: float = 0.0  # CPU seconds in user mode, GIL or not (native code included)
    system: float = 0.0  # CPU seconds in the kernel: system calls, futex wake-ups
    switches: int = 0  # context switches of all its threads
    leaves: Counter[str] = field(default_factory=Counter)  # innermost function -> samples
    packages: Counter[str] = field(default_factory=Counter)  # its package -> samples

    @property
    def samples(self) -> int:
        return sum(self.leaves.values())


def package_of(path: str, service_package: str) -> str:
    """The top-level package or module of a frame's file, as py-spy prints it (relative to the
    sys.path entry it was imported from: "sqlalchemy/pool/base.py", "threading.py")."""
    top = Path(path).parts[0].removesuffix(".py") if path else "?"
    if top == service_package or top == "apps":
        return f"{top} (the service's own code)"
    return top


def read_raw(path: Path, profile: Profile, service_package: str) -> None:
    """Add py-spy's raw output (one "frame;frame;... count" line per stack) to `profile`."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.rsplit(";", 1)[-1]
        match = FRAME.match(leaf)
        function, where = (match["function"], match["path"]) if match else (leaf, "")
        profile.leaves[f"{function} ({Path(where).name})"] += int(count)
        profile.packages[package_of(where, service_package)] += int(count)


def process_counters(pid: int) -> tuple[float, float, int]:
    """(user seconds, system seconds, context switches of every thread) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    switches = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                    switches += int(line.split()[-1])
    return int(fields[11]) / 100.0, int(fields[12]) / 100.0, switches


def record(pid: int, seconds: float, rate: int, out: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [
            *(py_spy, "record", "--pid", str(pid), "--duration", str(round(seconds))),
            *(
                "--rate",
                str(rate),
                "--gil",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def per_request(samples: int, profile: Profile, rate: int) -> float:
    """Microseconds of GIL time per request that `samples` stand for."""
    return samples / rate / max(profile.requests, 1) * 1e6


def row(name: str, values: list[float], spec: str = ".0f") -> str:
    return f"| {name} | " + " | ".join(format(value, spec) for value in values) + " |"


def report(profiles: list[Profile], rate: int, top: int) -> list[str]:
    first, second = profiles
    lines = [
        "| | " + " | ".join(p.label for p in profiles) + " |",
        "|---|" + "---:|" * len(profiles),
        "| requests served | " + " | ".join(str(p.requests) for p in profiles) + " |",
        "| req/s | " + " | ".join(f"{p.requests / p.seconds:.0f}" for p in profiles) + " |",
        row("CPU, us per request: user", [p.user / max(p.requests, 1) * 1e6 for p in profiles]),
        row("CPU, us per request: system", [p.system / max(p.requests, 1) * 1e6 for p in profiles]),
        row(
            "context switches per request",
            [p.switches / max(p.requests, 1) for p in profiles],
            ".1f",
        ),
        row("GIL held, us per request", [per_request(p.samples, p, rate) for p in profiles]),
        "| of which, by the innermost frame's package: | |" + " |" * (len(profiles) - 1),
    ]
    packages = sorted(
        set(first.packages) | set(second.packages),
        key=lambda name: -(first.packages[name] + second.packages[name]),
    )
    for name in packages[:top]:
        lines.append(
            f"| {name} | "
            + " | ".join(f"{per_request(p.packages[name], p, rate):.0f}" for p in profiles)
            + " |"
        )
    lines += [
        "",
        f"Innermost functions, us of GIL per request, largest differences first "
        f"({first.label} minus {second.label}):",
        "",
        f"| function | {first.label} | {second.label} | difference |",
        "|---|---:|---:|---:|",
    ]
    functions = set(first.leaves) | set(second.leaves)
    difference = {
        name: per_request(first.leaves[name], first, rate)
        - per_request(second.leaves[name], second, rate)
        for name in functions
    }
    for name in sorted(functions, key=lambda n: -abs(difference[n]))[:top]:
        lines.append(
            f"| `{name}` | {per_request(first.leaves[name], first, rate):.0f}"
            f" | {per_request(second.leaves[name], second, rate):.0f} | {difference[name]:+.0f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=sorted(efficiency.TARGETS), default="sync")
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--ms", type=int, default=20, help="pg_sleep per request, ms")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the generated service's environment (an experiment)",
    )
    parser.add_argument(
        "--baseline-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in the hand-written service's environment (an experiment)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the services on CPU 1, the load generator and PostgreSQL on CPU 0 (efficiency.py)",
    )
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    service_env = efficiency.pin_cores() if args.pin else {}
    workdir = Path(tempfile.mkdtemp(prefix="poolwise-profile-"))
    generated, handwritten, kind = efficiency.TARGETS[args.target]
    project = render(
        workdir / args.target,
        {"project_name": f"prof-{args.target}", "target": f"k8s-{args.target}", **efficiency.POOL},
    )
    extra = dict(item.split("=", 1) for item in args.env)
    baseline_extra = dict(item.split("=", 1) for item in args.baseline_env)
    variants = [
        efficiency.Variant(generated, "generated", project, {**service_env, **extra}),
        efficiency.Variant(handwritten, kind, project, {**service_env, **baseline_extra}),
    ]
    profiles = {variant.label: Profile(variant.label) for variant in variants}
    with PostgresCluster(max_connections=100) as cluster:
        project.create_schema(cluster.dsn())
        dsn = cluster.dsn(driver="")
        for round_ in range(1, args.rounds + 1):
            with contextlib.ExitStack() as stack:
                running = []
                for variant in efficiency.rotated(variants, round_):
                    service, _database, _before = efficiency.start(
                        variant, cluster, dsn, round_, workdir
                    )
                    stack.enter_context(service)
                    service.wait_ready()
                    load(
                        service.port,
                        bench.work(args.ms),
                        clients=10,
                        duration=2,
                        max_requests=5_000,
                    )
                    running.append((variant, service))
                for variant, service in running:
                    time.sleep(0.5)
                    out = workdir / f"{variant.kind}-{round_}.raw"
                    counters = process_counters(service.pid)
                    spy = record(service.pid, args.seconds, args.rate, out)
                    (result,) = asyncio.run(
                        efficiency.load_at_once([service.port], args.clients, args.ms, args.seconds)
                    )
                    user, system, switches = (
                        after - before
                        for after, before in zip(
                            process_counters(service.pid), counters, strict=True
                        )
                    )
                    _, errors = spy.communicate(timeout=60)
                    if spy.returncode != 0 or not out.exists():
                        print(f"py-spy failed: {errors.decode(errors='replace')}", file=sys.stderr)
                        return 2
                    profile = profiles[variant.label]
                    served = len(result.ok())
                    profile.requests += served
                    profile.seconds += result.duration
                    profile.user += user
                    profile.system += system
                    profile.switches += int(switches)
                    before = profile.samples
                    read_raw(out, profile, project.package)
                    held = (profile.samples - before) / args.rate / max(served, 1) * 1e6
                    cpu = (user + system) / max(served, 1) * 1e6
                    print(
                        f"  round {round_} {variant.label:<20} {served / result.duration:6.0f}"
                        f" req/s  {held:5.0f} us of GIL, {cpu:5.0f}"
                        f" us of CPU, {switches / max(served, 1):4.1f} switches per request",
                        flush=True,
                    )
    print(
        f"\n`{' '.join(['.venv/bin/python', 'bench/profile.py', *sys.argv[1:]])}`: "
        f"{args.clients} clients on pg_sleep({args.ms / 1000:g}), {args.rounds} rounds of "
        f"{args.seconds} s, py-spy --gil at {args.rate} Hz\n"
    )
    print("\n".join(report(list(profiles.values()), args.rate, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
