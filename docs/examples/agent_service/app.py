"""
A small multi-user agent service built on usercontext and FastAPI.

Every request gets its own frozen `usercontext.UserContext` from a bearer
token, its own database session (committed when it succeeds, rolled back when
it fails, closed always), and, for an agent run, its own agent engine, under a
quota of 2 runs at once per user. The agent's events reach only its user's
WebSocket connections.

Run it from this folder with ``uvicorn app:app`` or ``python app.py``. It
keeps its data in a SQLite file in a temporary directory, or in the database
of ``AGENT_SERVICE_DATABASE_URL`` (``postgresql+asyncpg://...``) when set.

With ``AGENT_SERVICE_REDIS_URL`` (``redis://host:6379/0``) set, the quota of
runs and the users' event streams live in Redis, shared by every worker and
host that names the same Redis: ``uvicorn app:app --workers 4`` then admits
at most 2 runs at once per user across all workers, and a user's WebSocket on
one worker gets the events of runs served by another. This needs the
``redis`` extra (``pip install usercontext[redis]``).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints'
# annotations at run time, and some of them name objects that create_app makes.

import contextlib
import json
import os
import shutil
import tempfile
import time

from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import anyio

from fastapi import FastAPI, Query, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import String, Text, event, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateSchema
from starlette.datastructures import Headers

import usercontext as uc

from usercontext.asgi import UserContextMiddleware
from usercontext.fastapi import CurrentContext, CurrentEmitter, EngineDep, Resource, document_auth
from usercontext.sqlalchemy import PoolWatch, session_provider
from usercontext.starlette import close_on_signal, serve_websocket


if TYPE_CHECKING:
    from usercontext.redis import RedisBus, RedisQuota


#: The header naming the conversation thread of a request, and its default.
THREAD_HEADER, DEFAULT_THREAD = "x-thread-id", "main"
#: The header naming the agent run of a request; a new run id when absent.
RUN_HEADER = "x-run-id"
#: Paths served without a token, with no user bound: the API docs.
PUBLIC = ("/docs", "/openapi.json", "/redoc")
#: How many request logs the service keeps, newest last.
MAX_REQUEST_LOGS = 1_000


# -- Identity ---------------------------------------------------------------------------------


def resolve(scope: MutableMapping[str, Any]) -> uc.UserContext:
    """
    Return the context of a request from its ``Authorization: Bearer <user id>``
    header, and its optional ``x-thread-id`` and ``x-run-id`` headers.

    This stands in for real authentication: a real service verifies the token
    (a signed JWT, a session cookie) and takes the user id from it. A missing
    or malformed header raises `usercontext.UnauthenticatedError`, which the
    middleware answers with 401; an id that breaks the library's rules (empty,
    ``"null"``, control characters...) raises
    `usercontext.InvalidContextError`, answered with 400.
    """
    headers = Headers(scope=scope)
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        msg = "Send an `Authorization: Bearer <token>` header."
        raise uc.UnauthenticatedError(msg)
    return uc.UserContext(
        user_id=token,
        thread_id=headers.get(THREAD_HEADER, DEFAULT_THREAD),
        run_id=headers.get(RUN_HEADER) or f"run-{os.urandom(8).hex()}",
    )


# -- Database ---------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Note(Base):
    """
    A note a user wrote; every row carries its user.
    """

    __tablename__ = "agent_service_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(256), index=True)
    request_id: Mapped[str] = mapped_column(String(128))
    text: Mapped[str] = mapped_column(Text)


class Run(Base):
    """
    An agent run and how it ended; every row carries its user.
    """

    __tablename__ = "agent_service_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(256), index=True)
    run_id: Mapped[str] = mapped_column(String(256))
    request_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    answer: Mapped[str | None] = mapped_column(Text)


def _sqlite_wal(dbapi_connection: Any, _record: object) -> None:
    # Readers and one writer at a time without blocking each other.
    cursor = dbapi_connection.cursor()
    cursor.execute("pragma journal_mode=wal")
    cursor.close()


class WriteTurn:
    """
    A request's turn to write, on a database that allows one writer at a time.

    SQLite holds its write lock from a transaction's first write to its
    commit, and the commit runs when the request's scope closes, after the
    response is ready. Without turns, every other writer waits on that lock
    in SQLite's busy handler, which polls (it is not first come, first served)
    for up to 5 s, and a write first flushed by the commit waits there too,
    against the registry's *close_timeout*: under load, a commit can be cut
    and a request fail. With turns, a request takes its turn in the endpoint,
    before its first write, in order of arrival, and gives it back when its
    scope has committed or rolled back; so no commit ever waits for another
    request. It is a resource of the request's scope: ask for it before the
    session, so that it is given back after the session's commit.
    """

    def __init__(self, turns: anyio.Semaphore | None) -> None:
        self._turns = turns  # None: the database takes concurrent writers
        self._held = False

    async def take(self) -> None:
        """
        Wait for this request's turn to write (once; later calls return at once).
        """
        if self._turns is not None and not self._held:
            await self._turns.acquire()
            self._held = True

    def give_back(self) -> None:
        """
        Let the next request write.
        """
        if self._turns is not None and self._held:
            self._held = False
            self._turns.release()


# -- The agent --------------------------------------------------------------------------------


class ToolError(RuntimeError):
    """
    The fake agent's tool failed.
    """


class Agent:
    """
    A fake AI agent: it thinks, calls a search tool, thinks again and answers,
    emitting an event at each step.

    It stands in for an expensive engine (a model client, a browser): the
    `usercontext.EngineFactory` of the app creates one per run, for one user
    only, within that user's quota, and closes it after the run.
    """

    def __init__(self, ctx: uc.UserContext) -> None:
        self.user_id = ctx.user_id
        self.closed = False

    async def run(
        self, events: uc.Emitter, prompt: str, *, fail: bool, step_delay: float
    ) -> tuple[str, str | None]:
        """
        Answer *prompt*; return the run's status and answer.

        A successful run emits six events: agent_started, agent_thinking,
        tool_executing, tool_completed, agent_thinking and agent_completed. A
        run whose tool fails (*fail*) emits agent_started, agent_thinking,
        tool_executing and agent_error.
        """
        await events.emit(uc.AGENT_STARTED, {"prompt": prompt})
        await anyio.sleep(step_delay)
        await events.emit(uc.AGENT_THINKING, {"thought": "I should search for this."})
        await events.emit(uc.TOOL_EXECUTING, {"tool": "search", "query": prompt})
        try:
            result = await self._search(prompt, fail=fail, delay=step_delay)
        except ToolError as e:
            await events.emit(uc.AGENT_ERROR, {"error": str(e)})
            return "failed", None
        await events.emit(uc.TOOL_COMPLETED, {"tool": "search", "result": result})
        await events.emit(uc.AGENT_THINKING, {"thought": "The documents answer it."})
        answer = f"Here is what I found: {result}"
        await events.emit(uc.AGENT_COMPLETED, {"answer": answer})
        return "completed", answer

    async def _search(self, query: str, *, fail: bool, delay: float) -> str:
        await anyio.sleep(delay)
        if fail:
            msg = "The search tool is unavailable."
            raise ToolError(msg)
        return f"3 documents mention {query!r}."

    async def aclose(self) -> None:
        """
        Release the agent (a real one would close its connections).
        """
        self.closed = True


# -- Request logs -----------------------------------------------------------------------------


@dataclass
class RequestLog:
    """
    What one request did and how its scope ended, with monotonic times.

    It is a resource of the request's scope: *outcome* is set when the scope
    closes, ``"ok"`` or ``"failed: <error>"`` (a streaming response whose
    client left ends as failed, so its session rolls back).
    """

    user_id: str
    request_id: str
    marks: list[tuple[str, float]] = field(default_factory=list)
    outcome: str | None = None

    def mark(self, what: str) -> None:
        """
        Record that *what* happened now.
        """
        self.marks.append((what, time.monotonic()))


class RequestLogs:
    """
    The logs of the last *maxsize* requests that asked for one, by request id.
    """

    def __init__(self, maxsize: int = MAX_REQUEST_LOGS) -> None:
        self.maxsize = maxsize
        self._logs: OrderedDict[str, RequestLog] = OrderedDict()

    def get(self, request_id: str) -> RequestLog | None:
        """
        Return the log of *request_id*, or `None`.
        """
        return self._logs.get(request_id)

    def provide(self, ctx: uc.UserContext) -> Iterator[RequestLog]:
        """
        The provider of `RequestLog` in the registry: a new log per request,
        closed with the request's scope.
        """
        log = RequestLog(ctx.user_id, ctx.request_id)
        self._logs[ctx.request_id] = log
        while len(self._logs) > self.maxsize:
            self._logs.popitem(last=False)
        try:
            yield log
        except BaseException as e:
            log.mark("closed")
            log.outcome = f"failed: {type(e).__name__}"
            raise
        log.mark("closed")
        log.outcome = "ok"


# -- The service ------------------------------------------------------------------------------


@dataclass
class Service:
    """
    What the endpoints share, kept in ``app.state.service``.

    *engine* and *pool* exist while the app runs (between its lifespan's
    startup and shutdown); *pool* counts the database connections that
    requests hold.
    """

    registry: uc.Registry
    factory: uc.EngineFactory[Agent]
    hub: uc.EmitterHub
    sessions: async_sessionmaker[AsyncSession]
    request_logs: RequestLogs
    database_url: str | None
    db_schema: str | None
    engine: AsyncEngine | None = None
    pool: PoolWatch | None = None
    # One write at a time on SQLite, in order of arrival (see WriteTurn).
    write_turns: anyio.Semaphore | None = None

    def write_turn(self, _ctx: uc.UserContext) -> Iterator[WriteTurn]:
        """
        The provider of `WriteTurn` in the registry: a turn not yet taken,
        given back when the request's scope closes.
        """
        turn = WriteTurn(self.write_turns)
        try:
            yield turn
        finally:
            turn.give_back()


class RunRequest(BaseModel):
    prompt: str = Field("What is usercontext?", min_length=1, max_length=1_000)
    fail: bool = Field(default=False, description="Make the agent's tool fail.")
    step_delay: float = Field(0.0, ge=0, le=5, description="Seconds per agent step.")


class RunOut(BaseModel):
    run_id: str
    user_id: str
    request_id: str
    status: str
    answer: str | None


class NoteIn(BaseModel):
    text: str = Field(min_length=1, max_length=10_000)


class NoteOut(BaseModel):
    id: int
    user_id: str
    request_id: str
    text: str


def create_app(  # noqa: C901, PLR0913, PLR0915  # the endpoints sit next to what they use
    database_url: str | None = None,
    *,
    db_schema: str | None = None,
    per_user: int = 2,
    total: int = 100,
    run_timeout: float = 0.0,
    redis_url: str | None = None,
) -> FastAPI:
    """
    Create the service.

    Args:
        database_url: An async SQLAlchemy URL, such as
            ``postgresql+asyncpg://user@host/db``; by default a SQLite file in a
            temporary directory that is removed at shutdown.
        db_schema: A PostgreSQL schema to keep the tables in, created at
            startup if missing.
        per_user: Agent runs at once per user.
        total: Agent runs at once overall.
        run_timeout: How long a run waits for a free slot before the client
            gets 429; 0 refuses at once.
        redis_url: A Redis to share the quota of runs and the event streams
            with the service's other workers and hosts; by default both are
            this process's own.
    """
    registry = uc.Registry()
    quota: RedisQuota | None = None
    bus: RedisBus | None = None
    if redis_url is not None:
        # Imported only when asked for: it needs the redis extra.
        from usercontext import redis as shared

        quota = shared.RedisQuota(redis_url, per_key=per_user, total=total)
        bus = shared.RedisBus(redis_url)
    factory = uc.EngineFactory(
        Agent,
        close=Agent.aclose,
        per_user=per_user,
        total=total,
        timeout=run_timeout,
        quota=quota,
    )
    hub = uc.EmitterHub(bus=bus)
    # Bound to the database engine at startup, when the engine is created.
    sessions = async_sessionmaker(expire_on_commit=False)
    request_logs = RequestLogs()
    registry.register(AsyncSession, session_provider(sessions))
    registry.register(RequestLog, request_logs.provide)
    service = Service(registry, factory, hub, sessions, request_logs, database_url, db_schema)
    registry.register(WriteTurn, service.write_turn)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        url, tmp = service.database_url, None
        if url is None:
            tmp = tempfile.mkdtemp(prefix="agent-service-")
            url = f"sqlite+aiosqlite:///{tmp}/agent_service.db"
        options = {} if db_schema is None else {"schema_translate_map": {None: db_schema}}
        engine = create_async_engine(url, execution_options=options)
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_wal)
            service.write_turns = anyio.Semaphore(1)
        service.engine, service.pool = engine, PoolWatch(engine)
        sessions.configure(bind=engine)
        try:
            async with engine.begin() as conn:
                if db_schema is not None:
                    await conn.execute(CreateSchema(db_schema, if_not_exists=True))
                await conn.run_sync(Base.metadata.create_all)
            # On SIGTERM or Ctrl-C the hub closes at once, so the WebSockets
            # end (code 1001) before uvicorn waits for open connections.
            async with hub, close_on_signal(hub):
                yield
                await factory.aclose()
                if quota is not None:
                    await quota.aclose()
        finally:
            service.pool.close()
            await engine.dispose()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    app = FastAPI(title="Agent service", lifespan=lifespan)
    app.state.service = service
    # The API docs load in a browser, which sends no token: exempt them.
    app.add_middleware(
        UserContextMiddleware, resolver=resolve, registry=registry, hub=hub, exempt=PUBLIC
    )
    document_auth(app, exempt=PUBLIC)

    Session = Annotated[AsyncSession, Resource(AsyncSession)]  # noqa: N806  # a type alias
    # Before Session in an endpoint's parameters: the scope opens resources in
    # that order and closes them in reverse, so the turn outlives the commit.
    Writes = Annotated[WriteTurn, Resource(WriteTurn)]  # noqa: N806  # a type alias
    AgentEngine = Annotated[Agent, EngineDep(factory)]  # noqa: N806  # ditto

    @app.get("/whoami")
    async def whoami(ctx: CurrentContext) -> dict[str, str]:
        """
        Echo the ids of the request's context.
        """
        bound = uc.current()  # the same context, bound for the whole request
        return {
            "user_id": bound.user_id,
            "thread_id": bound.thread_id,
            "run_id": bound.run_id,
            "request_id": ctx.request_id,
        }

    @app.post("/runs")
    async def start_run(  # noqa: PLR0913, PLR0917  # FastAPI injects each dependency by parameter
        body: RunRequest,
        ctx: CurrentContext,
        agent: AgentEngine,
        events: CurrentEmitter,
        writes: Writes,
        session: Session,
    ) -> RunOut:
        """
        Run the agent for the caller, streaming its events to the caller's
        WebSockets, and record the run. Over the caller's quota of runs at
        once, the client gets 429 with a Retry-After header.
        """
        status, answer = await agent.run(
            events, body.prompt, fail=body.fail, step_delay=body.step_delay
        )
        await writes.take()
        session.add(
            Run(
                user_id=ctx.user_id,
                run_id=ctx.run_id,
                request_id=ctx.request_id,
                status=status,
                answer=answer,
            )
        )
        # Written now, so that the commit at the scope's end waits for nothing.
        await session.flush()
        return RunOut(
            run_id=ctx.run_id,
            user_id=agent.user_id,
            request_id=ctx.request_id,
            status=status,
            answer=answer,
        )

    @app.get("/runs")
    async def list_runs(ctx: CurrentContext, session: Session) -> list[RunOut]:
        """
        List the caller's runs, oldest first.
        """
        rows = await session.scalars(select(Run).where(Run.user_id == ctx.user_id).order_by(Run.id))
        return [
            RunOut(
                run_id=r.run_id,
                user_id=r.user_id,
                request_id=r.request_id,
                status=r.status,
                answer=r.answer,
            )
            for r in rows
        ]

    @app.post("/notes", status_code=201)
    async def add_note(
        body: NoteIn, ctx: CurrentContext, writes: Writes, session: Session
    ) -> NoteOut:
        """
        Save a note of the caller; it is committed when the request succeeds.
        """
        await writes.take()
        note = Note(user_id=ctx.user_id, request_id=ctx.request_id, text=body.text)
        session.add(note)
        await session.flush()
        return NoteOut(id=note.id, user_id=note.user_id, request_id=note.request_id, text=note.text)

    @app.get("/notes")
    async def list_notes(ctx: CurrentContext, session: Session) -> list[NoteOut]:
        """
        List the caller's notes, oldest first.
        """
        rows = await session.scalars(
            select(Note).where(Note.user_id == ctx.user_id).order_by(Note.id)
        )
        return [
            NoteOut(id=n.id, user_id=n.user_id, request_id=n.request_id, text=n.text) for n in rows
        ]

    @app.get("/stream")
    async def stream(
        log: Annotated[RequestLog, Resource(RequestLog)],
        chunks: Annotated[int, Query(ge=1, le=10_000)] = 5,
        delay: Annotated[float, Query(ge=0, le=1)] = 0.0,
    ) -> StreamingResponse:
        """
        Stream *chunks* lines of JSON, *delay* seconds apart, each echoing the
        context bound while it was produced. The request's scope stays open
        until the last chunk has been sent.
        """

        async def lines() -> AsyncIterator[bytes]:
            for i in range(chunks):
                if i:
                    await anyio.sleep(delay)
                ctx = uc.current()
                log.mark(f"chunk {i}")
                line = {
                    "chunk": i,
                    "user_id": ctx.user_id,
                    "request_id": ctx.request_id,
                    "scope_open": log.outcome is None,
                }
                yield json.dumps(line).encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.websocket("/ws")
    async def websocket_events(websocket: WebSocket, ctx: CurrentContext) -> None:
        """
        Stream the caller's events until either side closes; ``?last_seq=N``
        resumes after event N (0: every event still held).
        """
        await serve_websocket(websocket, hub, ctx.user_id)

    return app


app = create_app(
    os.environ.get("AGENT_SERVICE_DATABASE_URL"),
    redis_url=os.environ.get("AGENT_SERVICE_REDIS_URL"),
)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
