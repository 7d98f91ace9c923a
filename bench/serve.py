"""Serve one bench app with the generated ``__main__``'s uvicorn settings, for all three apps.

    python bench/serve.py generated|baseline

Generated apps go through the same start-up checks as ``python -m <pkg>`` (the process count
and the pool against the budget); every app gets the same uvicorn options (one worker, the
same graceful shutdown, access log at info), so the only difference is the app itself.
"""

from __future__ import annotations

import importlib
import os
import sys

import uvicorn


def main() -> int:
    if os.environ.get("BENCH_CPUS"):
        # bench/efficiency.py --pin: the services on cores of their own (threads started later
        # inherit the mask).
        os.sched_setaffinity(0, {int(cpu) for cpu in os.environ["BENCH_CPUS"].split(",")})
    kind = sys.argv[1]
    package = os.environ["BENCH_PACKAGE"]
    main_module = importlib.import_module(f"{package}.__main__")
    if kind == "generated":
        # The same start-up as the generated __main__: its logging and its budget refusals.
        importlib.import_module(f"{package}.logs").configure_logging()
        guard = importlib.import_module(f"{package}.db.guard")
        settings = importlib.import_module(f"{package}.settings").Settings.from_env()
        guard.check_process_count(settings)
        guard.check_pool(settings)
    uvicorn.run(
        f"apps:{kind}_app",
        factory=True,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        workers=1,
        timeout_graceful_shutdown=main_module.GRACEFUL_SHUTDOWN_SECONDS,
        log_level="info",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
