"""A rendered service with endpoints that fail on purpose, for the leak-proof tests.

    python faultapp.py          # in a rendered project's directory, PACKAGE=<its package>

The generated ``create_app()`` (its engine, lifespan, gate, handlers and SessionRoute router),
plus /fault/* endpoints written as a team writes endpoints: the request's session comes from the
project's ``SessionDep``. Started like the generated ``__main__`` (one uvicorn worker).

No ``from __future__ import annotations``: FastAPI resolves the endpoints' annotations at run
time, and they name a type imported from the rendered package inside ``create_app``.
"""

import asyncio
import importlib
import os
import sys
import time

import uvicorn
from fastapi import APIRouter, FastAPI
from sqlalchemy import text

SLEEP = text("SELECT pg_sleep(:seconds)")


def create_app() -> FastAPI:
    package = os.environ["PACKAGE"]
    app = importlib.import_module(f"{package}.app").create_app()
    session_dep = importlib.import_module(f"{package}.dependencies").SessionDep
    route_class = importlib.import_module(f"{package}.routing").SessionRoute
    declared = importlib.import_module(f"{package}.settings").DECLARED
    router = APIRouter(prefix="/fault", route_class=route_class)

    if declared["service"]["target"] == "k8s-async":

        @router.get("/raise")
        async def raise_after_a_query(session: session_dep) -> None:
            await session.execute(text("SELECT 1"))
            raise RuntimeError("the endpoint failed after its first query")

        @router.get("/sleep")
        async def sleep_in_the_database(session: session_dep, ms: int) -> dict[str, bool]:
            await session.execute(SLEEP, {"seconds": ms / 1000})
            return {"ok": True}

        @router.get("/idle")
        async def idle_inside_a_transaction(session: session_dep, ms: int) -> dict[str, bool]:
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(ms / 1000)
            await session.execute(text("SELECT 1"))
            return {"ok": True}

        @router.get("/cancel")
        async def cancel_a_query_task(session: session_dep, ms: int) -> dict[str, bool]:
            inside = asyncio.Event()

            async def query() -> None:
                await session.execute(text("SELECT 1"))  # the transaction has its connection
                inside.set()
                # No await between set() and here: the cancel below lands inside this execute,
                # however late the loop resumes this request (a task cancelled before its first
                # step would never have touched the session, and the request would be a 200).
                await session.execute(SLEEP, {"seconds": ms / 1000})

            task = asyncio.create_task(query())
            await asyncio.wait_for(inside.wait(), 10)  # bounded: SELECT 1 could fail
            await asyncio.sleep(0.1)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return {"cancelled": True}
            return {"cancelled": False}

    else:

        @router.get("/raise")
        def raise_after_a_query(session: session_dep) -> None:
            session.execute(text("SELECT 1"))
            raise RuntimeError("the endpoint failed after its first query")

        @router.get("/sleep")
        def sleep_in_the_database(session: session_dep, ms: int) -> dict[str, bool]:
            session.execute(SLEEP, {"seconds": ms / 1000})
            return {"ok": True}

        @router.get("/idle")
        def idle_inside_a_transaction(session: session_dep, ms: int) -> dict[str, bool]:
            session.execute(text("SELECT 1"))
            time.sleep(ms / 1000)
            session.execute(text("SELECT 1"))
            return {"ok": True}

    app.include_router(router)
    return app


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    uvicorn.run(
        "faultapp:create_app",
        factory=True,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        workers=1,
        timeout_graceful_shutdown=20,
        log_level="info",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
