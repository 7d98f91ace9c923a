"""The three services the benchmark compares, each with the same extra endpoint, GET /work.

GET /work?ms=20 runs ``SELECT pg_sleep(ms / 1000)`` in the request's session: a stand-in for a
query that spends its time in PostgreSQL. The template has no such endpoint on purpose; it
exists only here, added next to the generated endpoints.

* ``generated_app``: the generated project's own ``create_app()`` (its engine profile,
  lifespan, session dependency, threadpool cap and 503 handler), plus /work using the
  project's ``SessionDep`` on a ``SessionRoute`` router, as a team adds an endpoint.
  BENCH_PACKAGE names the rendered package.
* ``handwritten_sync_app`` / ``handwritten_async_app``: what a careful engineer writes by hand
  with the same pool (size, overflow, timeout, pre_ping, LIFO): the session opened with
  ``with``/``async with`` inside the endpoint. The efficiency baseline (bench/efficiency.py).
* ``baseline_app``: the copy-paste setup the template replaces: ``create_engine(url)`` with
  every default (QueuePool 5 + 10 overflow, pool_timeout 30 s, no pre_ping), a
  ``SessionLocal()`` per request, plain ``def`` endpoints on FastAPI's default threadpool
  (40 threads, not capped), no 503 handler. Same endpoints and models.

No ``from __future__ import annotations`` here: FastAPI resolves the dependency annotations
of the endpoints defined inside the factories at runtime.
"""

import importlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, nullcontext
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

WORK = text("SELECT pg_sleep(:seconds)")


def generated_app() -> FastAPI:
    package = os.environ["BENCH_PACKAGE"]
    app = importlib.import_module(f"{package}.app").create_app()
    session_dep = importlib.import_module(f"{package}.dependencies").SessionDep
    # As a team adds an endpoint: on a router whose routes finish the session (routing.py).
    router = APIRouter(route_class=importlib.import_module(f"{package}.routing").SessionRoute)
    declared = importlib.import_module(f"{package}.settings").DECLARED
    if declared["service"]["target"] == "k8s-async":

        @router.get("/work")
        async def work_async(session: session_dep, ms: int = 20) -> dict[str, bool]:
            await session.execute(WORK, {"seconds": ms / 1000})
            return {"ok": True}

    else:

        @router.get("/work")
        def work_sync(session: session_dep, ms: int = 20) -> dict[str, bool]:
            session.execute(WORK, {"seconds": ms / 1000})
            return {"ok": True}

    app.include_router(router)
    return app


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)


def baseline_app() -> FastAPI:
    """The tutorial's ``get_db`` dependency (``yield`` a session, close it in ``finally``)."""
    return _baseline(session_in_endpoint=False)


def baseline_inline_app() -> FastAPI:
    """The same, but each endpoint opens ``with SessionLocal() as db:`` itself.

    FastAPI runs the exit of a sync ``yield`` dependency in a threadpool thread of its own; when
    every thread is waiting for a pooled connection, the requests holding the connections cannot
    get a thread to give them back until pool_timeout (30 s) expires. Opening the session inside
    the endpoint closes it on the endpoint's own thread, which avoids that: this variant shows
    what the defaults cost without the deadlock.
    """
    return _baseline(session_in_endpoint=True)


def _baseline(*, session_in_endpoint: bool) -> FastAPI:
    item_model = importlib.import_module(f"{os.environ['BENCH_PACKAGE']}.models").Item
    # The tutorial setup: every pool argument left at its default.
    engine = create_engine(os.environ["DATABASE_URL"])
    session_local = sessionmaker(bind=engine)

    def get_db() -> Iterator[Session]:
        db = session_local()
        try:
            yield db
        finally:
            db.close()

    async def session_factory() -> sessionmaker[Session]:
        return session_local  # async: no threadpool hop; the endpoint opens the session

    if session_in_endpoint:
        db_dep = Annotated[Any, Depends(session_factory)]

        def opened(factory: sessionmaker[Session]) -> Session:
            return factory()  # `with Session:` closes it on the endpoint's thread
    else:
        db_dep = Annotated[Any, Depends(get_db)]
        opened = nullcontext

    app = FastAPI(title="copy-paste baseline")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(db: db_dep) -> dict[str, str]:
        with opened(db) as session:
            session.execute(text("SELECT 1"))
        return {"status": "ready"}

    @app.post("/items", status_code=201)
    def create_item(body: ItemIn, db: db_dep) -> dict[str, object]:
        with opened(db) as session:
            item = item_model(name=body.name)
            session.add(item)
            session.commit()
            return {"id": item.id, "name": item.name}

    @app.get("/items/{item_id}")
    def read_item(item_id: int, db: db_dep) -> dict[str, object]:
        with opened(db) as session:
            item = session.get(item_model, item_id)
            if item is None:
                raise HTTPException(404, f"item {item_id} not found")
            return {"id": item.id, "name": item.name}

    @app.get("/work")
    def work(db: db_dep, ms: int = 20) -> dict[str, bool]:
        with opened(db) as session:
            session.execute(WORK, {"seconds": ms / 1000})
        return {"ok": True}

    return app


def _handwritten_engine_options() -> dict[str, Any]:
    """The generated profile's pool, written out by hand: equal connections, equal timeouts."""
    return {
        "pool_size": int(os.environ.get("POOL_SIZE", "5")),
        "max_overflow": int(os.environ.get("POOL_MAX_OVERFLOW", "5")),
        "pool_timeout": int(os.environ.get("POOL_TIMEOUT", "5")),
        "pool_recycle": 1800,
        "pool_pre_ping": True,
        "pool_use_lifo": True,
    }


def _psycopg_url() -> str:
    return os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)


def handwritten_sync_app() -> FastAPI:
    """A careful hand-written sync service: `with SessionLocal() as session:` in the endpoint."""
    engine = create_engine(
        _psycopg_url(),
        connect_args={"application_name": os.environ["APPLICATION_NAME"]},
        **_handwritten_engine_options(),
    )
    session_local = sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(title="hand-written sync", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        with session_local() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ready"}

    @app.get("/work")
    def work(ms: int = 20) -> dict[str, bool]:
        with session_local() as session:
            session.execute(WORK, {"seconds": ms / 1000})
            session.commit()
        return {"ok": True}

    return app


def handwritten_async_app() -> FastAPI:
    """A careful hand-written async service: `async with SessionLocal() as session:`."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine(
        _psycopg_url(),
        connect_args={"application_name": os.environ["APPLICATION_NAME"]},
        **_handwritten_engine_options(),
    )
    session_local = async_sessionmaker(bind=engine, autoflush=False, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(title="hand-written async", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        async with session_local() as session:
            await session.execute(text("SELECT 1"))
        return {"status": "ready"}

    @app.get("/work")
    async def work(ms: int = 20) -> dict[str, bool]:
        async with session_local() as session:
            await session.execute(WORK, {"seconds": ms / 1000})
            await session.commit()
        return {"ok": True}

    return app
