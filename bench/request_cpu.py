"""Benchmark: CPU time per request in one process, generated services against hand-written ones.

    .venv/bin/python bench/request_cpu.py                      # ~2 minutes on 2 cores
    .venv/bin/python bench/request_cpu.py --compare-ref REF    # plus the template at git REF
    .venv/bin/python bench/request_cpu.py --write              # and rewrite its RESULTS.md section

Run by hand, not by the test suite; it needs PostgreSQL's server binaries, like the realdb tier,
and starts its own throwaway cluster on 127.0.0.1.

bench/efficiency.py measures requests per connection through uvicorn and a load generator; there
the pool bounds every service, so a difference in CPU shows only as a small shift in throughput.
This script measures the CPU itself. Each sample is a fresh interpreter that builds one app of
bench/apps.py (lifespan included: engine, metrics, gate), calls it as ASGI directly (no server,
no sockets) with ``GET /work?ms=0`` (``SELECT pg_sleep(0)`` in the request's session) from 10
concurrent tasks, and reports the process's CPU time (user + system) per request after a warm-up
of 100 requests per task. Every app has the same pool (5 + 5) against the same PostgreSQL. The
variants alternate, the order rotating every round; medians; the ratio is to the hand-written
app of the same target, measured in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

BEGIN = "<!-- request-cpu:begin (written by bench/request_cpu.py) -->"
END = "<!-- request-cpu:end -->"
CONCURRENCY = 10
WARM_UP_PER_TASK = 100


def probe(kind: str, requests: int) -> float:
    """In the sample process: CPU seconds per request of apps.<kind>_app(), called as ASGI."""
    import logging

    import apps

    logging.disable(logging.INFO)  # the apps' start-up lines; no access log without a server
    app = getattr(apps, f"{kind}_app")()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/work",
        "raw_path": b"/work",
        "query_string": b"ms=0",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def call() -> None:
        statuses: list[int] = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app({**scope, "state": {}}, receive, send)
        if statuses != [200]:
            raise RuntimeError(f"GET /work answered {statuses}")

    async def run() -> float:
        async with app.router.lifespan_context(app):

            async def task(count: int) -> None:
                for _ in range(count):
                    await call()

            await asyncio.gather(*(task(WARM_UP_PER_TASK) for _ in range(CONCURRENCY)))
            started = time.process_time()
            await asyncio.gather(*(task(requests // CONCURRENCY) for _ in range(CONCURRENCY)))
            return (time.process_time() - started) / requests

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=3000, help="measured per sample")
    parser.add_argument("--compare-ref", help="also measure the template at this git ref")
    parser.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section")
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(probe(args.probe[0], int(args.probe[1])))
        return 0

    import load as bench  # bench/load.py: machine description, realdb imports
    from harness import PostgresCluster, missing_requirements
    from rendering import clean_env
    from services import render

    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="poolwise-request-cpu-"))
    # (target, label, app kind, rendered project) in the order of the table.
    variants = []
    for target in ("k8s-sync", "k8s-async"):
        short = target.removeprefix("k8s-")
        answers = {"project_name": f"cpu-{short}", "target": target}
        project = render(workdir / short, answers)
        variants.append((short, f"generated {target}", "generated", project))
        if args.compare_ref:
            older = render(workdir / f"{short}-ref", answers, vcs_ref=args.compare_ref)
            variants.append((short, f"generated {target}@{args.compare_ref}", "generated", older))
        variants.append((short, f"hand-written {short}", f"handwritten_{short}", project))
    samples: dict[str, list[float]] = {label: [] for _, label, _, _ in variants}
    started = time.monotonic()
    with PostgresCluster(max_connections=100) as cluster:
        variants[0][3].create_schema(cluster.dsn())
        for round_ in range(args.rounds):
            shift = round_ % len(variants)
            for _, label, kind, project in variants[shift:] + variants[:shift]:
                env = clean_env(
                    without_pg=True,
                    DATABASE_URL=cluster.dsn(driver=""),
                    APPLICATION_NAME=f"cpu-{round_}",
                    BENCH_PACKAGE=project.package,
                    POOL_SIZE="5",
                    POOL_MAX_OVERFLOW="5",
                    PYTHONPATH=f"{BENCH}:{project.root / 'src'}",
                )
                argv = [sys.executable, __file__, "--probe", kind, str(args.requests)]
                done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
                if done.returncode:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                samples[label].append(float(done.stdout.split()[-1]))
                print(f"  round {round_ + 1} {label:<32} {samples[label][-1] * 1e6:6.0f} us")
    section = report(args, variants, samples, time.monotonic() - started, bench.machine())
    print(section)
    if args.write:
        bench.replace_section(section, BEGIN, END)
    return 0


def report(
    args: argparse.Namespace,
    variants: list[tuple[str, str, str, object]],
    samples: dict[str, list[float]],
    elapsed: float,
    info: dict[str, str],
) -> str:
    ref = f" --compare-ref {args.compare_ref}" if args.compare_ref else ""
    lines = [
        BEGIN,
        "## CPU per request in one process (bench/request_cpu.py)",
        "",
        f"`.venv/bin/python bench/request_cpu.py{ref} --rounds {args.rounds}"
        f" --requests {args.requests} --write`,"
        f" {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min. Machine:"
        f" {info['cpu']} ({info['speed']}), {info['memory']}; {info['python']}; {info['postgres']};"
        f" {info['packages']}.",
        "",
        f"`GET /work?ms=0` called as ASGI from {CONCURRENCY} tasks, {args.requests:,} requests per"
        f" sample after a warm-up, one fresh process per sample, {args.rounds} alternating rounds;"
        " median CPU time (user + system) per request, and its ratio to the hand-written app of"
        " the same target.",
        "",
        "| target | app | CPU per request | x hand-written | samples (us) |",
        "|---|---|---:|---:|---|",
    ]
    for target, label, _, _ in variants:
        base = statistics.median(samples[f"hand-written {target}"])
        value = statistics.median(samples[label])
        each = ", ".join(f"{sample * 1e6:.0f}" for sample in samples[label])
        lines.append(
            f"| {target} | {label} | {value * 1e6:.0f} us | {value / base:.2f}x | {each} |"
        )
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
