"""Benchmark: Lambda cold start, the generated handler against a minimal hand-written one.

    .venv/bin/python bench/cold_start.py                      # ~1 minute on 2 cores
    .venv/bin/python bench/cold_start.py --compare-ref REF    # plus the template at git REF
    .venv/bin/python bench/cold_start.py --write              # and rewrite its RESULTS.md section
    .venv/bin/python bench/cold_start.py --callgrind          # plus instruction counts (valgrind)

Run by hand, not by the test suite; it needs PostgreSQL's server binaries, like the realdb tier,
and starts its own throwaway cluster on 127.0.0.1.

A cold start is what a new execution environment does before its first answer: import the
handler module (the engine is built at import, and the database credentials are read from
Secrets Manager then) and run the first invocation, which opens the first connection. Secrets
Manager is moto's server on 127.0.0.1 (tests/realdb/harness/secretsmanager.py), its secret the
PostgreSQL role's username and password; both handlers get the configuration
deploy/lambda/template.yaml gives the function (DATABASE_SECRET_ARN, DATABASE_HOST,
DATABASE_PORT, DATABASE_NAME, no DATABASE_URL) and read the secret with boto3 at import. Each
sample is a fresh interpreter that times both, in-process, around
``importlib.import_module(handler)`` and ``handler(event, None)`` with the project's own
``events/create-item.json`` (an insert, committed), against the same PostgreSQL as the same role;
the parent also times the whole process from spawn to answer (interpreter start included; the
probe then leaves with ``os._exit``, as teardown is no part of a cold start).

Both are byte-compiled first (``compileall``), as ``pip install`` does in the container image,
so no sample compiles source. Compared, alternating within one run (the order rotates every
round, so drift and order hit each alike), after a discarded warm-up round:

  generated     ``copier copy --defaults --data target=lambda`` of this working tree: its
                ``<pkg>.handler`` (settings, budget guard, engine, session_scope, routing)
  hand-written  the guide's Lambda baseline: at import, the secret read with one boto3
                ``get_secret_value`` and put in the URL of ``create_engine(url,
                poolclass=NullPool)``, and a ``sessionmaker``; one typed ``Mapped[]`` model of
                the same table, and a handler that parses the same event, inserts, commits,
                closes and answers (no retry after a rotation: the careful minimum)
  generated@REF (``--compare-ref``) the template at a git ref, rendered the same way (given
                DATABASE_URL instead when it has no db/secret.py: it cannot read a secret)

Reported: medians of import, first invocation, their sum (the target: generated <= 1.02x
hand-written), the CPU time the sample's process spent in them (less disturbed than wall time by
whatever else runs on the machine; PostgreSQL's share of the insert is not in it) and the
process from spawn to answer; the ratio of medians and the spread of the per-round ratios; with
``--callgrind``, the instructions of one sample of each (valgrind: a count other load does not
change); and where the generated import spends its own time (``python -X importtime``, the
project's modules only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load as bench  # noqa: E402  (bench/load.py: machine description, realdb imports)
from harness import PostgresCluster, SecretsManagerServer, missing_requirements  # noqa: E402
from rendering import clean_env  # noqa: E402
from services import render  # noqa: E402

RESULTS = BENCH / "RESULTS.md"
BEGIN = "<!-- cold-start:begin (written by bench/cold_start.py) -->"
ANALYSIS = "<!-- cold-start:analysis (kept by bench/cold_start.py) -->"
END = "<!-- cold-start:end -->"
TARGET = 1.02

HANDWRITTEN = '''\
"""A minimal Lambda handler written by hand from the guide: NullPool engine at import."""

import base64
import json
import os
from datetime import datetime

import boto3
from sqlalchemy import URL, String, create_engine, func
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

# The credentials from Secrets Manager, read once per execution environment.
secret = json.loads(
    boto3.client("secretsmanager").get_secret_value(SecretId=os.environ["DATABASE_SECRET_ARN"])[
        "SecretString"
    ]
)
DATABASE_URL = URL.create(
    "postgresql+psycopg",
    username=secret["username"],
    password=secret["password"],
    host=os.environ["DATABASE_HOST"],
    port=int(os.environ["DATABASE_PORT"]),
    database=os.environ["DATABASE_NAME"],
)
engine = create_engine(DATABASE_URL, poolclass=NullPool)
SessionFactory = sessionmaker(bind=engine, class_=Session, autoflush=False, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    processed: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


def handler(event, context):
    body = event.get("body")
    if body is None:
        data = event  # a bare {"name": ...} event, the sample of templates before payload 2.0
    else:
        data = json.loads(base64.b64decode(body) if event.get("isBase64Encoded") else body)
    session = SessionFactory()
    try:
        item = Item(name=data["name"])
        session.add(item)
        session.flush()
        answer = {
            "id": item.id,
            "name": item.name,
            "processed": item.processed,
            "created_at": item.created_at.isoformat(),
        }
        session.commit()
    finally:
        session.close()
    return {
        "statusCode": 201,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(answer),
        "isBase64Encoded": False,
    }
'''

# Runs in the fresh interpreter: nothing but sys and time is imported before the clock starts.
PROBE = """
import sys, time
started, started_cpu = time.perf_counter(), time.process_time()
import importlib
module = importlib.import_module(sys.argv[1])
imported, imported_cpu = time.perf_counter(), time.process_time()
import json
with open(sys.argv[2], encoding="utf-8") as source:
    event = json.load(source)
loaded, loaded_cpu = time.perf_counter(), time.process_time()
response = module.handler(event, None)
answered, answered_cpu = time.perf_counter(), time.process_time()
print(json.dumps({
    "import": imported - started,
    "first": answered - loaded,
    "cpu": (imported_cpu - started_cpu) + (answered_cpu - loaded_cpu),
    "status": response.get("statusCode"),
}), flush=True)
sys.stderr.flush()
# An execution environment does not exit after its first answer: interpreter teardown is not
# part of a cold start, and skipping it keeps the process time and instruction counts about
# what the cold start does.
import os
os._exit(0)
"""


@dataclass
class Variant:
    label: str
    module: str
    event: Path
    pythonpath: str
    cwd: Path
    # How the function finds its database: filled in once the servers are up.
    env: dict[str, str] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(
        default_factory=lambda: {"import": [], "first": [], "cold": [], "cpu": [], "process": []}
    )

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])


def sample(variant: Variant) -> dict[str, float]:
    env = clean_env(without_pg=True, PYTHONPATH=variant.pythonpath, **variant.env)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, variant.module, str(variant.event)],
        cwd=variant.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    process = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{variant.label} failed:\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["status"] != 201:
        raise RuntimeError(f"{variant.label}: first invocation answered {out['status']}")
    return {
        "import": out["import"],
        "first": out["first"],
        "cold": out["import"] + out["first"],
        "cpu": out["cpu"],
        "process": process,
    }


def instructions(variant: Variant) -> int:
    """Instructions one sample executes (valgrind callgrind): the same on a busy machine."""
    env = clean_env(
        without_pg=True, PYTHONPATH=variant.pythonpath, PYTHONHASHSEED="0", **variant.env
    )
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            PROBE,
            variant.module,
            str(variant.event),
        ],
        cwd=variant.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{proc.stderr[-2000:]}")
    return int(match[1])


def own_import_times(variant: Variant, package: str) -> list[tuple[str, int]]:
    """Self time (us) of the project's own modules in one ``python -X importtime`` import."""
    env = clean_env(without_pg=True, PYTHONPATH=variant.pythonpath, **variant.env)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {variant.module}"],
        cwd=variant.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s+(\S+)", line)
        if match and (match[2] == package or match[2].startswith(package + ".")):
            rows.append((match[2], int(match[1])))
    return sorted(rows, key=lambda row: -row[1])


def compile_bytecode(directory: Path) -> None:
    """Write the .pyc files ahead, as pip does on install (PYTHONDONTWRITEBYTECODE may be set)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(directory)],
        check=True,
        capture_output=True,
        timeout=300,
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def report(
    args: argparse.Namespace,
    info: dict[str, str],
    variants: list[Variant],
    own: list[tuple[str, int]],
    counted: dict[str, int],
    started: float,
) -> str:
    handwritten = next(v for v in variants if v.label == "hand-written")
    generated = next(v for v in variants if v.label == "generated")
    command = " ".join([".venv/bin/python", "bench/cold_start.py", *sys.argv[1:]])
    rounds = len(handwritten.samples["cold"])
    lines = [
        BEGIN,
        "## Lambda cold start: generated handler against a hand-written one",
        "",
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in"
        f" {time.monotonic() - started:.0f} s with `{command}`.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        "Each sample is a fresh interpreter: import of the handler module (the engine is built"
        " at import, and the database credentials are read from Secrets Manager with boto3, here"
        " moto's server on 127.0.0.1), then the first invocation with the project's own"
        " `events/create-item.json` (an insert, committed, over a new NullPool connection to the"
        " same PostgreSQL on 127.0.0.1, as the same role), byte-compiled ahead as `pip install`"
        " does. The variants alternate, the order"
        f" rotating every round; {rounds} rounds after one discarded warm-up round; medians."
        " See the docstring of `bench/cold_start.py` for the hand-written handler.",
        "",
        "| handler | import | first invocation | import + first invocation"
        " | its CPU time | process, spawn to answer | cold start / hand-written |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        ratio = variant.median("cold") / handwritten.median("cold")
        lines.append(
            f"| {variant.label} | {ms(variant.median('import'))} | {ms(variant.median('first'))}"
            f" | {ms(variant.median('cold'))} | {ms(variant.median('cpu'))}"
            f" | {ms(variant.median('process'))} | {ratio:.3f}x |"
        )
    ratio = generated.median("cold") / handwritten.median("cold")
    cpu_ratio = generated.median("cpu") / handwritten.median("cpu")
    process_ratio = generated.median("process") / handwritten.median("process")
    paired = [
        g / h for g, h in zip(generated.samples["cold"], handwritten.samples["cold"], strict=True)
    ]
    quartiles = statistics.quantiles(paired, n=4)
    verdict = "met" if ratio <= TARGET else "**not met**"
    lines += [
        "",
        f"Target, import + first invocation <= {TARGET}x hand-written: {ratio:.3f}x, {verdict}"
        f" (CPU time {cpu_ratio:.3f}x, process {process_ratio:.3f}x; per-round ratios: median"
        f" {statistics.median(paired):.3f}, quartiles {quartiles[0]:.3f} - {quartiles[2]:.3f}).",
        "",
    ]
    if counted:
        empty = counted.pop("empty")
        base = counted["hand-written"] - empty
        lines += [
            "Instructions the sample process spends on import + first invocation"
            " (`valgrind --tool=callgrind`, `PYTHONHASHSEED=0`, one sample each, less the"
            f" {empty / 1e6:,.1f} M of the same process with an empty handler module; PostgreSQL's"
            " side not counted), a count that other load on the machine does not change: "
            + ", ".join(
                f"{label} {(count - empty) / 1e6:,.1f} M ({(count - empty) / base:.3f}x)"
                for label, count in counted.items()
            )
            + ".",
            "",
        ]
    lines += [
        "The generated import's own modules (`python -X importtime`, self time, one import;"
        " everything else it imports, SQLAlchemy, psycopg and boto3, the hand-written handler"
        " imports too):",
        "",
        "| module | self |",
        "|---|---:|",
    ]
    lines += [f"| `{name}` | {us / 1000:.1f} ms |" for name, us in own]
    lines.append(f"| total | {sum(us for _, us in own) / 1000:.1f} ms |")
    lines.append("")
    return "\n".join(lines)


def write_results(section: str) -> None:
    text = RESULTS.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        old, tail = rest.split(END, 1)
        kept = ANALYSIS + old.split(ANALYSIS, 1)[1] if ANALYSIS in old else ANALYSIS + "\n"
        text = head + section + kept + END + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + ANALYSIS + "\n" + END + "\n"
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=31, help="samples per variant (>= 15)")
    parser.add_argument("--compare-ref", help="also measure the template at this git ref")
    parser.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section")
    parser.add_argument(
        "--callgrind", action="store_true", help="also count instructions (needs valgrind)"
    )
    args = parser.parse_args()
    if args.rounds < 15:
        parser.error("--rounds must be at least 15")
    reason = missing_requirements()
    if reason:
        print(f"cannot run the benchmark: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    info = bench.machine()
    workdir = Path(tempfile.mkdtemp(prefix="poolwise-cold-start-"))
    print(f"rendering into {workdir}")
    project = render(workdir / "generated", {"target": "lambda"})
    handwritten_dir = workdir / "handwritten"
    handwritten_dir.mkdir()
    (handwritten_dir / "handwritten_handler.py").write_text(HANDWRITTEN)
    # For --callgrind: the probe process itself (interpreter, json, the event file), no handler.
    (handwritten_dir / "empty_handler.py").write_text(
        'def handler(event, context):\n    return {"statusCode": 201}\n'
    )
    src = str(project.root / "src")
    event = project.root / "events" / "create-item.json"
    variants = [
        Variant("generated", f"{project.package}.handler", event, src, project.root),
        Variant(
            "hand-written", "handwritten_handler", event, str(handwritten_dir), handwritten_dir
        ),
    ]
    if args.compare_ref:
        older = render(workdir / "older", {"target": "lambda"}, vcs_ref=args.compare_ref)
        variants.append(
            Variant(
                f"generated@{args.compare_ref}",
                f"{older.package}.handler",
                older.root / "events" / "create-item.json",
                str(older.root / "src"),
                older.root,
            )
        )
    for variant in variants:
        compile_bytecode(Path(variant.pythonpath))
    with PostgresCluster(max_connections=40) as cluster, SecretsManagerServer() as aws:
        print(f"schema: {project.create_schema(cluster.dsn())}")
        secret = {"username": cluster.app_user, "password": cluster.app_password}
        function_config = {
            "DATABASE_SECRET_ARN": aws.create_secret("cold-start-db", secret),
            "DATABASE_HOST": cluster.host,
            "DATABASE_PORT": str(cluster.port),
            "DATABASE_NAME": cluster.app_db,
            **aws.sdk_env(),
        }
        for variant in variants:
            package = Path(variant.pythonpath) / variant.module.split(".")[0]
            reads_secret = (package / "db" / "secret.py").exists()
            if variant.label == "hand-written" or reads_secret:
                variant.env = function_config
            else:
                variant.env = {"DATABASE_URL": cluster.dsn(driver="")}
        for variant in variants:  # warm-up: files in the page cache; discarded
            sample(variant)
        for number in range(args.rounds):
            shift = number % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                for key, value in sample(variant).items():
                    variant.samples[key].append(value)
            print(
                f"  round {number + 1}/{args.rounds}: "
                + ", ".join(f"{v.label} {ms(v.samples['cold'][-1])}" for v in variants)
            )
        own = own_import_times(variants[0], project.package)
        counted = {}
        if args.callgrind:
            print("counting instructions (valgrind) ...")
            empty = Variant("empty", "empty_handler", event, str(handwritten_dir), handwritten_dir)
            counted = {v.label: instructions(v) for v in [*variants, empty]}
    shutil.rmtree(workdir, ignore_errors=True)
    section = report(args, info, variants, own, counted, started)
    print(section)
    if args.write:
        write_results(section)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
