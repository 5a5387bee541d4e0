"""
Tests of `usercontext.asgi.UserContextMiddleware` under real servers, with
real clients.

Each server serves a Starlette app on a free port of 127.0.0.1, from a
background thread of its own: uvicorn with its h11 and httptools protocols, on
asyncio and on uvloop (and once with its ``reset_contextvars`` option), and
hypercorn on asyncio and on trio. An outer pure
ASGI middleware, wrapped around the whole app, records which user is bound
around each request, as a metrics or audit middleware would see it. The
clients (raw sockets through anyio, and httpx2) run on asyncio and on trio.

A server whose package is missing is skipped, unless ``CI=true``, where that
fails the run (see the ``server`` marker in the root conftest.py); uvloop does
not exist on Windows and is skipped there.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import socket
import sys
import threading

from typing import Any

import anyio
import anyio.lowlevel
import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware, request_state
from usercontext.stdlib import ContextFilter

from helpers import KeepRecords


pytest.importorskip(
    "starlette", reason="starlette is not installed: pip install usercontext[starlette]"
)
pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")

import httpx2

from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Route


# Every bound on a wait, in seconds: the tests never hang.
TIMEOUT = 10.0

# name: (server, its HTTP protocol, its event loop, the packages it needs)
SERVERS = {
    "uvicorn-h11-asyncio": ("uvicorn", "h11", "asyncio", ("uvicorn", "h11")),
    "uvicorn-h11-uvloop": ("uvicorn", "h11", "uvloop", ("uvicorn", "h11", "uvloop")),
    "uvicorn-httptools-asyncio": ("uvicorn", "httptools", "asyncio", ("uvicorn", "httptools")),
    "uvicorn-httptools-uvloop": (
        "uvicorn",
        "httptools",
        "uvloop",
        ("uvicorn", "httptools", "uvloop"),
    ),
    # uvicorn's own defence in depth, which the docs recommend beside the middleware.
    "uvicorn-h11-asyncio-reset_contextvars": ("uvicorn", "h11", "asyncio", ("uvicorn", "h11")),
    "hypercorn-asyncio": ("hypercorn", "h11", "asyncio", ("hypercorn",)),
    "hypercorn-trio": ("hypercorn", "h11", "trio", ("hypercorn", "trio")),
}
# The logger on which each server reports an application's exception, and the
# message it logs.
ERROR_LOGS = {
    "uvicorn": ("uvicorn.error", "Exception in ASGI application"),
    "hypercorn": ("hypercorn.error", "Error in ASGI Framework"),
}

FILE_SIZE = 300_000  # several 64 KiB messages of a FileResponse
POST_SIZE = 300_000  # enough for uvicorn to pause reading the socket


def server_param(name: str) -> Any:
    """
    The fixture parameter of the server *name* (a key of `SERVERS`), marked
    with the packages it needs, and skipped where it cannot run.
    """
    modules = SERVERS[name][3]
    marks = [pytest.mark.server(*modules)]
    if "uvloop" in modules:
        marks.append(pytest.mark.skipif(sys.platform == "win32", reason="uvloop needs Unix."))
    return pytest.param(name, marks=marks)


# -- the app -------------------------------------------------------------------


class Session:
    """
    A stand-in for a database session, whose commit can be made to fail.
    """

    def __init__(self, log: list[str], user_id: str) -> None:
        self.log = log
        self.user_id = user_id
        self.fail_commit = False

    def commit(self) -> None:
        if self.fail_commit:
            self.log.append(f"commit failed for {self.user_id}")
            raise OSError("the database went away")
        self.log.append(f"commit for {self.user_id}")


class Observer:
    """
    A pure ASGI middleware outside the app (metrics, audit, rate limiting):
    it records the user bound before and after it calls the app, beside the
    user the request is for.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str | None, str | None, Any]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = dict(scope["headers"]).get(b"x-user", b"").decode()
        before = uc.current_or_none()
        try:
            await self.app(scope, receive, send)
        finally:
            after = uc.current_or_none()
            self.seen.append(
                (
                    user,
                    None if before is None else before.user_id,
                    None if after is None else after.user_id,
                    scope["client"],
                )
            )

    def foreign(self) -> list[tuple[str, str | None, str | None, Any]]:
        """
        The observations that saw a user other than the request's.
        """
        return [s for s in self.seen if {s[1], s[2]} - {None, s[0]}]


def resolve(scope) -> uc.UserContext:
    user = dict(scope["headers"]).get(b"x-user")
    if user is None:
        raise uc.UnauthenticatedError("Send an x-user header.")
    return uc.UserContext(user_id=user.decode(), thread_id="t-1", run_id="r-1")


async def session_of(request):
    """
    The request's session, made to fail its commit when the query asks.
    """
    session = await request_state(request.scope).resources.aget(Session)
    session.fail_commit = request.query_params.get("fail") == "commit"
    return session


async def whoami(request):
    await session_of(request)
    ctx = uc.current()
    return JSONResponse({"user": ctx.user_id, "request_id": ctx.request_id})


async def boom(request):
    await session_of(request)
    msg = f"the endpoint of {uc.current().user_id} failed"
    raise RuntimeError(msg)


async def upload(request):
    await session_of(request)
    body = await request.body()
    return JSONResponse({"user": uc.current().user_id, "size": len(body)})


async def file(request):
    await session_of(request)
    return FileResponse(request.app.state.path, media_type="application/octet-stream")


async def stream(request):
    await session_of(request)

    async def lines():
        for n in range(3):
            await anyio.lowlevel.checkpoint()
            yield f"line {n} for {uc.current().user_id}\n"

    return StreamingResponse(lines(), media_type="text/plain")


def make_app(path: str) -> tuple[Observer, list[str], threading.Event]:
    """
    The app: Starlette with `UserContextMiddleware` and a registry of one
    `Session`, inside an `Observer`; its ``/file`` is the file at *path*.
    Return it, the session log, and an event set once the server ran the
    app's startup.
    """
    log: list[str] = []
    ready = threading.Event()

    def open_session(ctx: uc.UserContext):
        session = Session(log, ctx.user_id)
        yield session
        session.commit()

    registry = uc.Registry()
    registry.register(Session, open_session)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        ready.set()
        yield

    app = Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/boom", boom),
            Route("/upload", upload, methods=["POST"]),
            Route("/file", file),
            Route("/stream", stream),
        ],
        lifespan=lifespan,
    )
    app.state.path = path
    app.add_middleware(UserContextMiddleware, resolver=resolve, registry=registry)
    return Observer(app), log, ready


# -- the servers ---------------------------------------------------------------


class LiveServer:
    """
    *app* served by the server *name* (a key of `SERVERS`) on a free port of
    127.0.0.1 in a background thread, for a ``with`` block: it starts within
    `TIMEOUT` seconds, and stops when the block ends.
    """

    def __init__(self, name: str, app: Any, ready: threading.Event) -> None:
        self.name = name
        self.kind, self.http, self.loop, _ = SERVERS[name]
        self.app = app
        self.ready = ready
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.error: BaseException | None = None
        self._stop: Any = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            if self.kind == "uvicorn":
                self._uvicorn()
            elif self.loop == "trio":
                import trio

                trio.run(self._hypercorn_trio)
            else:
                asyncio.run(self._hypercorn_asyncio())
        except BaseException as e:  # reported by __enter__ or __exit__
            self.error = e

    def _uvicorn(self) -> None:
        import uvicorn

        options = {"reset_contextvars": True} if self.name.endswith("reset_contextvars") else {}
        config = uvicorn.Config(
            self.app,
            http=self.http,
            loop=self.loop,
            lifespan="on",
            log_config=None,
            log_level="warning",
            timeout_graceful_shutdown=2,
            **options,
        )
        server = uvicorn.Server(config)
        self._stop = lambda: setattr(server, "should_exit", True)
        server.run(sockets=[self.sock])

    def _hypercorn_config(self) -> Any:
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"fd://{self.sock.detach()}"]  # hypercorn owns the socket now
        config.errorlog = logging.getLogger("hypercorn.error")
        config.accesslog = None
        config.graceful_timeout = 2
        return config

    async def _hypercorn_asyncio(self) -> None:
        from hypercorn.asyncio import serve

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self._stop = lambda: loop.call_soon_threadsafe(stop.set)
        await serve(self.app, self._hypercorn_config(), shutdown_trigger=stop.wait)

    async def _hypercorn_trio(self) -> None:
        import trio

        from hypercorn.trio import serve

        token = trio.lowlevel.current_trio_token()
        stop = trio.Event()
        self._stop = lambda: token.run_sync_soon(stop.set)
        await serve(self.app, self._hypercorn_config(), shutdown_trigger=stop.wait)

    def __enter__(self):
        self._thread.start()
        if not self.ready.wait(TIMEOUT):
            self.__exit__()
            msg = f"{self.name} did not start the app within {TIMEOUT} s: {self.error!r}"
            raise RuntimeError(msg)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stop is not None:
            self._stop()
        self._thread.join(TIMEOUT)
        self.sock.close()  # a no-op once hypercorn was given it
        assert not self._thread.is_alive(), f"{self.name} did not stop within {TIMEOUT} s"
        assert self.error is None, f"{self.name} failed: {self.error!r}"


class Served:
    """
    What the tests of one server use: the server, the `Observer`, the session
    log, and the records of the server's error logger, stamped by a
    `ContextFilter`.
    """

    def __init__(self, server: LiveServer, observer: Observer, log: list[str]) -> None:
        self.server = server
        self.observer = observer
        self.log = log
        self.records: list[logging.LogRecord] = []
        self.url = server.url
        self.port = server.port

    def error_records(self) -> list[logging.LogRecord]:
        """
        The records of the server's "exception in the application" line.
        """
        message = ERROR_LOGS[self.server.kind][1]
        return [r for r in self.records if r.getMessage().strip() == message]

    async def observed(self, n: int) -> list[tuple[str, str | None, str | None, Any]]:
        """
        Wait until the `Observer` saw *n* requests end (a server may send the
        response before the app returns), and return what it saw.
        """
        with anyio.fail_after(TIMEOUT):
            while len(self.observer.seen) < n:  # noqa: ASYNC110  # another thread's state
                await anyio.sleep(0.01)
        return self.observer.seen

    async def error_logged(self) -> list[logging.LogRecord]:
        """
        Wait until the server logged an application's exception, and return
        the records of it.
        """
        with anyio.fail_after(TIMEOUT):
            while not self.error_records():  # noqa: ASYNC110  # another thread's state
                await anyio.sleep(0.01)
        return self.error_records()

    def reset(self) -> None:
        self.observer.seen.clear()
        self.log.clear()
        self.records.clear()


@pytest.fixture(name="served", scope="module", params=[server_param(name) for name in SERVERS])
def _served(request, tmp_path_factory, real_servers):
    """
    The app under each server, started once for the tests of this module.
    """
    name = request.param
    if name.endswith("reset_contextvars"):
        import uvicorn

        if "reset_contextvars" not in inspect.signature(uvicorn.Config).parameters:
            reason = f"uvicorn {uvicorn.__version__} has no reset_contextvars option."
            real_servers.unavailable(reason, ci=real_servers.ci())
    path = tmp_path_factory.mktemp("files") / "report.bin"
    path.write_bytes(bytes(range(256)) * (FILE_SIZE // 256) + b"x" * (FILE_SIZE % 256))
    observer, log, ready = make_app(str(path))
    with LiveServer(name, observer, ready) as server:
        served = Served(server, observer, log)
        error_logger = logging.getLogger(ERROR_LOGS[server.kind][0])
        handler = KeepRecords(served.records)
        handler.addFilter(ContextFilter())
        error_logger.addHandler(handler)
        try:
            yield served
        finally:
            error_logger.removeHandler(handler)


@pytest.fixture(name="server")
def _server(served):
    """
    The app under each server, with its records of earlier tests cleared.
    """
    served.reset()
    return served


# -- a raw HTTP/1.1 client -----------------------------------------------------


def get(path: str, user: str, request_id: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-user: {user}\r\n"
        f"x-request-id: {request_id}\r\n\r\n"
    ).encode()


async def read_response(stream: Any, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """
    Read one response with a Content-Length from *stream*, keeping what
    follows it in *buffer*.
    """
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive()
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += await stream.receive()
    buffer[:] = rest[length:]
    return int(status_line.split()[1]), headers, rest[:length]


# -- 1. no user reaches the server, nor an outer middleware -----------------------


class TestServerContext:
    async def test_pipelined_requests_and_the_servers_error_log(self, server):
        """
        Two GETs pipelined on one socket, alice's then bob's, whose endpoint
        raises: bob's request starts with no user bound outside the
        middleware, and the server's log line for bob's crash carries bob's
        ids or none, never alice's.
        """
        with anyio.fail_after(TIMEOUT):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(
                    get("/whoami", "u-alice", "req-alice") + get("/boom", "u-bob", "req-bob")
                )
                buffer = bytearray()
                first = await read_response(stream, buffer)
                second = await read_response(stream, buffer)
        (record,) = await server.error_logged()  # logged after the response went out

        assert first[0] == 200
        assert json.loads(first[2])["user"] == "u-alice"
        assert second[0] == 500
        assert (record.user_id, record.request_id) in {("u-bob", "req-bob"), ("-", "-")}
        assert len(await server.observed(2)) == 2
        assert server.observer.foreign() == []

    async def test_large_bodies_on_one_connection(self, server):
        """
        Three 300 KB POSTs of three users in turn over one keep-alive
        connection (the server pauses and resumes reading the socket): no
        user is bound outside the middleware around any of them.
        """
        users = ["u-carol", "u-dave", "u-erin"]
        async with httpx2.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            for user in users:
                response = await client.post(
                    "/upload", content=b"x" * POST_SIZE, headers={"x-user": user}
                )
                assert response.json() == {"user": user, "size": POST_SIZE}

        assert [s[0] for s in await server.observed(3)] == users
        assert len({s[3] for s in server.observer.seen}) == 1  # one connection
        assert server.observer.foreign() == []
        assert server.log == [f"commit for {user}" for user in users]

    async def test_alternating_users_on_one_connection(self, server):
        """
        100 sequential requests of alice and bob in turn over one keep-alive
        connection, each of alice's an upload of 100 KB: the outer middleware
        sees 0 foreign users, before or after the app, and each endpoint its
        own user.
        """
        async with httpx2.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            for n in range(100):
                if n % 2:
                    response = await client.get("/whoami", headers={"x-user": "u-bob"})
                    assert response.json()["user"] == "u-bob"
                else:
                    response = await client.post(
                        "/upload", content=b"x" * 100_000, headers={"x-user": "u-alice"}
                    )
                    assert response.json()["user"] == "u-alice"

        assert len(await server.observed(100)) == 100
        assert len({s[3] for s in server.observer.seen}) == 1  # one connection
        assert server.observer.foreign() == []


# -- 2. responses never say "done" when the save failed --------------------------


class TestHonestResponses:
    @pytest.mark.parametrize("path", ["/file", "/stream"])
    async def test_complete_when_the_commit_succeeds(self, server, path):
        """
        A FileResponse (a Content-Length, the body in several messages) and a
        StreamingResponse reach the client whole when the commit succeeds.
        """
        async with httpx2.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            response = await client.get(path, headers={"x-user": "u-alice"})

        assert response.status_code == 200
        if path == "/file":
            assert len(response.content) == FILE_SIZE
        else:
            assert response.text == "".join(f"line {n} for u-alice\n" for n in range(3))
        assert server.log == ["commit for u-alice"]

    @pytest.mark.parametrize("path", ["/file", "/stream"])
    async def test_cut_when_the_commit_fails(self, server, path):
        """
        When the commit fails after the headers went out, the last message is
        never sent and the connection is dropped: the client gets an error,
        never a complete response.
        """
        async with httpx2.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            with pytest.raises(httpx2.RemoteProtocolError):
                await client.get(f"{path}?fail=commit", headers={"x-user": "u-alice"})

        assert server.log == ["commit failed for u-alice"]

    async def test_crash_is_500_with_the_request_id(self, server):
        """
        An endpoint that raises gets a JSON 500 carrying the request id, in
        its header and its body; the server logs the exception once.
        """
        async with httpx2.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
            response = await client.get(
                "/boom", headers={"x-user": "u-bob", "x-request-id": "req-bob-1"}
            )
        await server.error_logged()

        assert response.status_code == 500
        assert response.headers["x-request-id"] == "req-bob-1"
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["request_id"] == "req-bob-1"
        assert len(server.error_records()) == 1
