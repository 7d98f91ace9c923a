"""Benchmark: the generated services against copy-paste defaults, in one run, same load.

    .venv/bin/python bench/load.py            # ~4 minutes on 2 cores; rewrites bench/RESULTS.md

Run by hand, not by the test suite. It needs what the realdb tier needs (PostgreSQL's server
binaries; .ci/run installs them) and starts its own throwaway cluster on 127.0.0.1.

What runs, each as its own uvicorn process (bench/serve.py: one worker, the generated
``__main__``'s uvicorn options) against the same cluster, one after the other:

  (a) the generated k8s-sync service, (b) the generated k8s-async service, both rendered with
      ``copier copy --defaults`` plus the target, and (c) the copy-paste baseline
      (bench/apps.py: ``create_engine(url)`` defaults, default threadpool, no 503 handler);
      each gets GET /work = ``SELECT pg_sleep(ms / 1000)`` in its request session.

Phases, each bounded in time, request count and per-request timeout, after a short warm-up:

  steady       CLIENTS closed-loop clients on /work?ms=20 (pg_sleep(0.02)) for SECONDS
  saturation   SAT_CLIENTS clients on /work?ms=200 for SAT_SECONDS: PostgreSQL answers 10x
               slower than in the steady phase, so every pool is exhausted and requests queue

Also measured: the Lambda handler's cold import (a fresh interpreter per sample, median of
20, against a bare handler module), and the wall time of ``copier copy --defaults``.
Peak server connections come from pg_stat_activity (by application_name), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# tests/realdb for harness, loadgen and services; tests/ for rendering, which services uses.
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "realdb"))

from harness import (  # noqa: E402
    ActivitySampler,
    PostgresCluster,
    find_pg_bin,
    find_pgbouncer,
    missing_requirements,
)
from loadgen import LoadResult, load  # noqa: E402
from services import RenderedProject, ServiceProcess, render  # noqa: E402

RESULTS = BENCH / "RESULTS.md"
BEGIN, END = "<!-- bench:begin (written by bench/load.py) -->", "<!-- bench:end -->"


@dataclass(frozen=True)
class Phase:
    name: str
    clients: int
    seconds: float
    work_ms: int
    timeout: float = 60.0
    max_requests: int = 500_000


@dataclass
class Row:
    service: str
    phase: Phase
    result: LoadResult
    peak: int

    def ok_in_window(self) -> int:
        """2xx answers that completed inside the phase's time window (drain tail excluded)."""
        window_end = self.result.started + self.phase.seconds
        return sum(1 for r in self.result.ok() if r.end <= window_end)

    @property
    def ok_per_second(self) -> float:
        return self.ok_in_window() / self.phase.seconds

    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.result.failed():
            label = {-1: "timeout", 0: "transport"}.get(record.status, str(record.status))
            counts[label] = counts.get(label, 0) + 1
        return counts

    def latency(self, q: float) -> float:
        return self.result.percentile(q)

    def max_latency(self) -> float:
        return max((r.latency for r in self.result.records), default=0.0)


def python_speed() -> str:
    """How fast this machine runs Python: machines of one kind differ by 2-3x from day to day.

    Absolute numbers from two runs compare only as far as this does.
    """
    best = math.inf
    for _ in range(5):
        started = time.process_time()
        total = 0
        for number in range(1_000_000):
            total += number
        best = min(best, time.process_time() - started)
    return f"a Python loop of 10^6 additions takes {best * 1000:.0f} ms of CPU (best of 5)"


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = "unknown"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    pg_bin = find_pg_bin()
    postgres = subprocess.run(
        [str(pg_bin / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    bouncer = find_pgbouncer()
    pgbouncer = (
        subprocess.run([str(bouncer), "--version"], capture_output=True, text=True, check=False)
        .stdout.splitlines()[0]
        .strip()
        if bouncer
        else "not installed"
    )
    import fastapi
    import psycopg
    import sqlalchemy
    import uvicorn

    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "speed": python_speed(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgres": postgres,
        "pgbouncer": pgbouncer,
        "packages": (
            f"SQLAlchemy {sqlalchemy.__version__}, psycopg {psycopg.__version__},"
            f" FastAPI {fastapi.__version__}, uvicorn {uvicorn.__version__}"
        ),
    }


def run_service(
    label: str,
    kind: str,
    project: RenderedProject,
    cluster: PostgresCluster,
    phases: list[Phase],
    log_dir: Path,
) -> list[Row]:
    application_name = f"bench-{label}"
    if kind.startswith("baseline"):
        # What a copy-pasted DATABASE_URL looks like; application_name only so we can count.
        url = f"{cluster.dsn()}?application_name={application_name}"
    else:
        url = cluster.dsn(driver="")
    service = ServiceProcess(
        project,
        url,
        application_name,
        log_dir,
        argv=[str(BENCH / "serve.py"), kind],
        BENCH_PACKAGE=project.package,
        PYTHONPATH=f"{BENCH}{os.pathsep}{project.root / 'src'}",
    )
    rows = []
    with service:
        service.wait_ready()
        # Warm-up (not recorded): imports, pools filled, code paths hot, equally for all.
        load(service.port, work(20), clients=10, duration=2, max_requests=5_000, timeout=30)
        for phase in phases:
            time.sleep(1)
            with ActivitySampler(cluster, application_name, max_duration=600) as sampler:
                result = load(
                    service.port,
                    work(phase.work_ms),
                    clients=phase.clients,
                    duration=phase.seconds,
                    max_requests=phase.max_requests,
                    timeout=phase.timeout,
                )
            row = Row(label, phase, result, sampler.peak)
            print(f"  {label:<24} {phase.name:<10} {result.summary()}; peak {sampler.peak}")
            rows.append(row)
    return rows


def work(ms: int, spread: int = 0):
    """GET /work?ms=MS for every request; with spread, MS - spread to MS + spread instead.

    pg_sleep lasts exactly what it is asked, and a closed loop of as many clients as
    connections then keeps its requests in step: they finish together and queue for the
    service's CPU together, every time. Real queries vary; the spread stands for that. The
    durations come from a fixed table indexed by client and sequence, so every service
    measured gets the same ones, and the mean stays MS.
    """
    if not spread:
        return lambda client, sequence: ("GET", f"/work?ms={ms}", None)
    paths = [f"/work?ms={duration}" for duration in query_durations(ms, spread)]
    return lambda client, sequence: ("GET", paths[duration_index(client, sequence)], None)


def query_durations(ms: int, spread: int) -> list[int]:
    """The fixed table of query lengths, ms: MS - spread to MS + spread, uniform, mean MS."""
    return random.Random(20261205).choices(range(ms - spread, ms + spread + 1), k=4096)


def duration_index(client: int, sequence: int) -> int:
    """Where in query_durations the client's request number `sequence` reads its length."""
    return (client * 7919 + sequence) % 4096


def lambda_cold_import(project: RenderedProject, url: str, samples: int) -> dict[str, float]:
    """Median import time of the generated handler vs a bare one, fresh interpreter each."""
    bare_dir = Path(tempfile.mkdtemp(prefix="bench-bare-"))
    (bare_dir / "bare_handler.py").write_text(
        "import json\n\n\ndef handler(event, context):\n"
        '    return {"statusCode": 200, "body": json.dumps(event)}\n'
    )
    probe = (
        "import time, importlib; t = time.perf_counter(); importlib.import_module({!r});"
        " print(time.perf_counter() - t)"
    )
    env = project.env(DATABASE_URL=url, PYTHONPATH=f"{project.root / 'src'}{os.pathsep}{bare_dir}")
    times: dict[str, list[float]] = {
        "generated": [],
        "bare": [],
        "generated_wall": [],
        "bare_wall": [],
    }
    for _ in range(samples):  # interleaved, so drift hits both alike
        for key, module in (("generated", f"{project.package}.handler"), ("bare", "bare_handler")):
            started = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", probe.format(module)],
                env=env,
                cwd=project.root,
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            times[f"{key}_wall"].append(time.perf_counter() - started)
            times[key].append(float(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(values) for key, values in times.items()}


def copier_copy_time(runs: int, workdir: Path) -> list[float]:
    copier = Path(sys.executable).parent / "copier"
    durations = []
    for number in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [
                str(copier),
                "copy",
                "--defaults",
                "--quiet",
                "--vcs-ref",
                "HEAD",
                str(REPO),
                str(workdir / f"copy-{number}"),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        durations.append(time.perf_counter() - started)
    return durations


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def report(
    args: argparse.Namespace,
    info: dict[str, str],
    rows: list[Row],
    pool_timeout: int,
    cold: dict[str, float],
    copies: list[float],
    started: float,
) -> str:
    command = " ".join([".venv/bin/python", "bench/load.py", *sys.argv[1:]])
    lines = [
        BEGIN,
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
        f" in {time.monotonic() - started:.0f} s with `{command}`.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        "Load generator, service and PostgreSQL share the machine. Throughput counts 2xx answers"
        " completed inside the phase window; latencies cover every answer (503s included);"
        " peak connections are the service's backends in pg_stat_activity (50 ms sampling).",
        "",
    ]
    for phase in {row.phase.name: row.phase for row in rows}.values():
        lines += [
            f"### {phase.name}: {phase.clients} clients, {phase.seconds:.0f} s,"
            f" /work = pg_sleep({phase.work_ms / 1000:g})",
            "",
            "| service | ok req/s | ok | p50 | p99 | max | errors | peak server connections |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
        ]
        for row in (r for r in rows if r.phase.name == phase.name):
            errors = ", ".join(f"{n} x {k}" for k, n in sorted(row.errors().items())) or "0"
            lines.append(
                f"| {row.service} | {row.ok_per_second:,.0f} | {row.ok_in_window():,} |"
                f" {fmt_ms(row.latency(50))} | {fmt_ms(row.latency(99))} |"
                f" {fmt_ms(row.max_latency())} | {errors} | {row.peak} |"
            )
        lines.append("")

    def find(service: str, phase: str) -> Row:
        return next(r for r in rows if r.service == service and r.phase.name == phase)

    sync, sync_sat = find("generated k8s-sync", "steady"), find("generated k8s-sync", "saturation")
    bound = pool_timeout + 1
    verdict = {True: "met", False: "**not met**"}
    lines += [
        "### Targets: generated k8s-sync against each baseline",
        "",
        "| baseline | ok throughput >= 1.3x | peak connections <= 2/3 |"
        f" p99 under saturation <= pool_timeout + 1 s = {bound} s |",
        "|---|---|---|---|",
    ]
    for name in ("baseline (defaults)", "baseline, session in endpoint"):
        base, base_sat = find(name, "steady"), find(name, "saturation")
        if base.ok_per_second:
            ratio = sync.ok_per_second / base.ok_per_second
            throughput = f"{ratio:.2f}x, {verdict[ratio >= 1.3]}"
        else:
            throughput = "baseline served nothing in the window, met"
        conn_ratio = sync.peak / base.peak if base.peak else float("nan")
        p99 = sync_sat.latency(99)
        lines.append(
            f"| {name} | {throughput} ({sync.ok_per_second:,.0f} vs {base.ok_per_second:,.0f}"
            f" req/s) | {sync.peak} vs {base.peak} ({conn_ratio:.2f}),"
            f" {verdict[conn_ratio <= 2 / 3]} | {fmt_ms(p99)}"
            f" (max {fmt_ms(sync_sat.max_latency())}),"
            f" {verdict[p99 <= bound]}; baseline p99 {fmt_ms(base_sat.latency(99))},"
            f" max {fmt_ms(base_sat.max_latency())} |"
        )
    lines += [
        "",
        "### Lambda cold import and generation time",
        "",
        "| measurement | median |",
        "|---|---:|",
        f"| import of the generated `handler` module (engine built at import), fresh interpreter,"
        f" {args.samples} samples | {fmt_ms(cold['generated'])} |",
        f"| import of a bare handler module (json only) | {fmt_ms(cold['bare'])} |",
        f"| whole `python -c 'import ...handler'` process, generated / bare"
        f" | {fmt_ms(cold['generated_wall'])} / {fmt_ms(cold['bare_wall'])} |",
        f"| `copier copy --defaults` (runs: {', '.join(f'{d:.2f} s' for d in copies)})"
        f" | {statistics.median(copies):.2f} s |",
        END,
    ]
    return "\n".join(lines)


def replace_section(section: str, begin: str, end: str) -> None:
    """Put `section` (its own begin and end markers included) in RESULTS.md in place of the
    text between those markers, or at the end of the file when it has none yet."""
    text = RESULTS.read_text()
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


def write_results(section: str) -> None:
    existing = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        RESULTS.write_text(head + section + tail)
    else:
        RESULTS.write_text(f"# Benchmark results\n\n{section}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--sat-clients", type=int, default=1000)
    parser.add_argument("--sat-seconds", type=float, default=20)
    parser.add_argument("--samples", type=int, default=20, help="Lambda cold-import samples")
    parser.add_argument("--copies", type=int, default=3, help="timed copier copy runs")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    # SAT_CLIENTS sockets in this process and as many in the service (which inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * (args.sat_clients + args.clients) + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    started = time.monotonic()
    phases = [
        Phase("steady", args.clients, args.seconds, 20),
        Phase("saturation", args.sat_clients, args.sat_seconds, 200),
    ]
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="poolwise-bench-"))
    print(f"rendering into {workdir}")
    sync = render(workdir / "sync", {"project_name": "bench-sync", "target": "k8s-sync"})
    async_ = render(workdir / "async", {"project_name": "bench-async", "target": "k8s-async"})
    lam = render(workdir / "lambda", {"project_name": "bench-lambda", "target": "lambda"})
    pool_timeout = int(sync.settings()["pool_timeout"])
    rows: list[Row] = []
    with PostgresCluster(max_connections=100) as cluster:
        print(f"schema: {sync.create_schema(cluster.dsn())}")
        for label, kind, project in (
            ("generated k8s-sync", "generated", sync),
            ("generated k8s-async", "generated", async_),
            ("baseline (defaults)", "baseline", sync),
            ("baseline, session in endpoint", "baseline_inline", sync),
        ):
            rows += run_service(label, kind, project, cluster, phases, workdir)
        print("lambda cold import ...")
        cold = lambda_cold_import(lam, cluster.dsn(driver=""), args.samples)
    print("copier copy --defaults ...")
    copies = copier_copy_time(args.copies, workdir)
    section = report(args, info, rows, pool_timeout, cold, copies, started)
    print(section)
    if not args.no_write:
        write_results(section)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
