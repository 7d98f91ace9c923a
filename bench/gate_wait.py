"""Benchmark: CPU per waiting request of a bounded wait at an asyncio gate, by how it is bounded.

    .venv/bin/python bench/gate_wait.py            # ~20 s
    .venv/bin/python bench/gate_wait.py --write    # and rewrite its RESULTS.md section

The k8s-sync admission gate (db/gate.py, ConnectionGate.enter) makes a request wait for a slot
of an asyncio.Semaphore for at most pool_timeout. This script runs that pattern alone: one slot,
`--waiters` + 1 tasks taking it in turn (each holds it for one event-loop step), so every
request but the first waits, and reports the process's CPU time per request for each way of
bounding the wait, alternating them every round (medians):

  none        await slots.acquire()                          no bound: the floor
  wait_for    await asyncio.wait_for(slots.acquire(), t)     a task per wait on Python 3.11
  timeout     async with asyncio.timeout(t): await ...       a timer on the current task
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load as bench  # noqa: E402  (machine description, RESULTS.md sections)

BEGIN = "<!-- gate-wait:begin (written by bench/gate_wait.py) -->"
END = "<!-- gate-wait:end -->"
TIMEOUT = 5.0


async def _unbounded(slots: asyncio.Semaphore) -> None:
    await slots.acquire()


async def _wait_for(slots: asyncio.Semaphore) -> None:
    await asyncio.wait_for(slots.acquire(), TIMEOUT)


async def _timeout(slots: asyncio.Semaphore) -> None:
    async with asyncio.timeout(TIMEOUT):
        await slots.acquire()


WAYS: dict[str, Callable[[asyncio.Semaphore], Awaitable[None]]] = {
    "none": _unbounded,
    "wait_for": _wait_for,
    "timeout": _timeout,
}


async def _cpu_per_request(way: str, requests: int, waiters: int) -> float:
    """CPU microseconds per request, `waiters` + 1 tasks taking one slot in turn."""
    slots = asyncio.Semaphore(1)
    wait = WAYS[way]
    served = 0

    async def client() -> None:
        nonlocal served
        while served < requests:
            if slots.locked():
                await wait(slots)
            else:
                await slots.acquire()
            await asyncio.sleep(0)  # the request's work: one step of the loop
            slots.release()
            served += 1

    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(waiters + 1)))
    return (time.process_time() - started) / served * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--waiters", type=int, default=48)
    parser.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section")
    args = parser.parse_args()
    started = time.monotonic()
    samples: dict[str, list[float]] = {way: [] for way in WAYS}
    ways = list(WAYS)
    for round_ in range(args.rounds):
        for way in ways[round_ % len(ways) :] + ways[: round_ % len(ways)]:
            samples[way].append(asyncio.run(_cpu_per_request(way, args.requests, args.waiters)))
    info = bench.machine()
    floor = statistics.median(samples["none"])
    lines = [
        BEGIN,
        "## A bounded wait at the sync admission gate (bench/gate_wait.py)",
        "",
        f"`.venv/bin/python bench/gate_wait.py --rounds {args.rounds} --requests {args.requests}"
        f" --waiters {args.waiters} --write`, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC,"
        f" {time.monotonic() - started:.0f} s. Machine: {info['cpu']} ({info['speed']}),"
        f" {info['python']}. One process, no database: {args.waiters} of {args.waiters + 1}"
        " requests wait for one slot; CPU per request, medians of the rounds, the ways taking"
        " turns.",
        "",
        "| bound on the wait | CPU per request (median) | rounds (min - max) | over no bound |",
        "|---|---:|---|---:|",
    ]
    for way, values in samples.items():
        median = statistics.median(values)
        lines.append(
            f"| {way} | {median:.1f} us | {min(values):.1f} - {max(values):.1f} us"
            f" | {median - floor:+.1f} us |"
        )
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    if args.write:
        bench.replace_section(section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
