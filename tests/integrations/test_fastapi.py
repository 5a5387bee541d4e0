"""
Tests of `usercontext.fastapi`: `CurrentContext`, `CurrentEmitter`, `Resource`
and `EngineDep` in sync and async endpoints and in WebSocket routes, behind
`usercontext.asgi.UserContextMiddleware`.

HTTP requests go through httpx2's ASGI transport inside the test's own event
loop, so that asyncio and trio are both exercised; WebSocket routes go through
Starlette's TestClient, run on the same backend.

They are skipped when fastapi (or httpx2) is missing, unless ``CI=true``, where
a missing dependency fails the run (see the root conftest.py).
"""

# No `from __future__ import annotations` here: FastAPI reads the annotations of
# the endpoints at run time, and they name aliases local to `build()`.

import contextlib
import functools
import gc
import json
import math
import random
import threading
import types
import weakref

from typing import Annotated, Any

import anyio
import anyio.lowlevel
import pytest

import usercontext as uc


pytest.importorskip("fastapi", reason="fastapi is not installed: pip install usercontext[fastapi]")
pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")

import fastapi
import httpx2

from fastapi import FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import usercontext.fastapi as fastapi_module

from usercontext.asgi import STATE_KEY, RequestState, UserContextMiddleware
from usercontext.fastapi import (
    CurrentContext,
    CurrentEmitter,
    EngineDep,
    ProblemException,
    Resource,
    current_context,
    current_emitter,
    document_auth,
)
from usercontext.testing import RecordingSink


class Engine:
    """
    A stand-in for an expensive engine, made for one user.
    """

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.closed = False


class Conn:
    """
    A stand-in for a per-request connection, made for one user.
    """

    def __init__(self, user_id: str, kind: str) -> None:
        self.user_id = user_id
        self.kind = kind
        self.closed = False


def resolve(scope):
    """
    The user is the x-user header; without it, the request is unauthenticated.
    """
    for name, value in scope["headers"]:
        if name == b"x-user":
            user = value.decode()
            return uc.UserContext(user_id=user, thread_id=f"t-{user}", run_id="r-1")
    raise uc.UnauthenticatedError


def new_registry(log):
    registry = uc.Registry()

    def conn(ctx):
        c = Conn(ctx.user_id, "sync")
        yield c
        c.closed = True
        log.append(("conn closed", ctx.user_id))

    async def aconn(ctx):
        await anyio.lowlevel.checkpoint()
        c = Conn(ctx.user_id, "async")
        yield c
        await anyio.lowlevel.checkpoint()
        c.closed = True
        log.append(("aconn closed", ctx.user_id))

    registry.register("conn", conn)
    registry.register("aconn", aconn)
    return registry


def new_factory(log, **kw):
    def create(ctx):
        log.append(("engine created", ctx.user_id))
        return Engine(ctx.user_id)

    def close(engine):
        engine.closed = True
        log.append(("engine closed", engine.user_id))

    return uc.EngineFactory(create, close=close, **kw)


class Gate:
    """
    Holds requests inside their endpoint until opened.
    """

    def __init__(self, expect):
        self.expect = expect
        self.inside = 0
        self.all_in = anyio.Event()
        self.open = anyio.Event()

    async def hold(self):
        self.inside += 1
        if self.inside == self.expect:
            self.all_in.set()
        await self.open.wait()


def build(  # noqa: C901, PLR0915  # one route per case, in one place
    *, factory=None, registry=None, hub=None, middleware=True, lifespan=None, **engine_kw
):
    """
    An app with a route per dependency and kind of endpoint.
    """
    log = []
    factory = factory if factory is not None else new_factory(log)
    registry = registry if registry is not None else new_registry(log)
    app = FastAPI(lifespan=lifespan)
    if middleware:
        app.add_middleware(UserContextMiddleware, resolver=resolve, registry=registry, hub=hub)
    app.state.log = log
    app.state.factory = factory
    app.state.registry = registry
    app.state.gate = None
    TheEngine = Annotated[Engine, EngineDep(factory, **engine_kw)]  # noqa: N806
    SyncConn = Annotated[Conn, Resource("conn")]  # noqa: N806
    AsyncConn = Annotated[Conn, Resource("aconn")]  # noqa: N806

    @app.get("/ctx/async")
    async def ctx_async(ctx: CurrentContext):
        return {"user": ctx.user_id, "request_id": ctx.request_id, "bound": uc.current() is ctx}

    @app.get("/ctx/sync")
    def ctx_sync(ctx: CurrentContext):
        return {
            "user": ctx.user_id,
            "bound": uc.current() is ctx,
            "thread": threading.current_thread() is not threading.main_thread(),
        }

    @app.get("/res/async")
    async def res_async(ctx: CurrentContext, a: AsyncConn, b: SyncConn, again: AsyncConn):
        users = [ctx.user_id, a.user_id, b.user_id]
        return {"users": users, "same": again is a, "kinds": [a.kind, b.kind]}

    @app.get("/res/sync")
    def res_sync(ctx: CurrentContext, a: AsyncConn, b: SyncConn):
        assert not a.closed
        assert not b.closed
        return {"users": [ctx.user_id, a.user_id, b.user_id], "kinds": [a.kind, b.kind]}

    @app.get("/engine/async")
    async def engine_async(ctx: CurrentContext, engine: TheEngine, again: TheEngine):
        log.append(("endpoint", engine.closed))
        gate = app.state.gate
        if gate is not None:
            await gate.hold()
        return {"users": [ctx.user_id, engine.user_id], "same": again is engine}

    @app.get("/engine/sync")
    def engine(ctx: CurrentContext, engine: TheEngine):
        log.append(("endpoint", engine.closed))
        return {"users": [ctx.user_id, engine.user_id], "bound": uc.current() is ctx}

    @app.get("/engine/boom")
    async def engine_boom(engine: TheEngine):
        await anyio.lowlevel.checkpoint()
        msg = f"the endpoint failed for {engine.user_id}"
        raise RuntimeError(msg)

    @app.get("/engine/stream")
    async def engine_stream(engine: TheEngine):
        async def body():
            yield f"closed={engine.closed}".encode()

        return StreamingResponse(body())

    @app.get("/engine/slow")
    async def engine_slow(engine: TheEngine):
        await anyio.sleep(10)

    @app.get("/emit/async")
    async def emit_async(events: CurrentEmitter):
        event = await events.emit("tool_executing", {"tool": "search"})
        return {"user": events.user_id, "seq": event.seq}

    @app.get("/emit/sync")
    def emit_sync(events: CurrentEmitter):
        event = anyio.from_thread.run_sync(events.emit_nowait, "tool_executing", None)
        return {"user": events.user_id, "seq": event.seq}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, ctx: CurrentContext, conn: AsyncConn, engine: TheEngine):
        await websocket.accept()
        await websocket.send_json(
            {"users": [ctx.user_id, conn.user_id, engine.user_id], "bound": uc.current() is ctx}
        )
        await websocket.receive_text()
        log.append(("ws endpoint done", engine.closed))
        await websocket.close()

    @app.websocket("/ws/ctx")
    async def ws_ctx(websocket: WebSocket, ctx: CurrentContext):
        await websocket.accept()
        await websocket.send_json({"user": ctx.user_id})
        await websocket.close()

    @app.websocket("/ws/events")
    async def ws_events(websocket: WebSocket, events: CurrentEmitter):
        await websocket.accept()
        event = await events.emit("tool_executing", None)
        await websocket.send_json({"user": events.user_id, "seq": event.seq})
        await websocket.close()

    @app.websocket("/ws/engine")
    async def ws_engine(websocket: WebSocket, engine: TheEngine):
        await websocket.accept()
        await websocket.send_json({"user": engine.user_id})
        await websocket.close()

    return app


@contextlib.asynccontextmanager
async def client_of(app, *, raise_app_exceptions=True):
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def as_user(user):
    return {"x-user": user}


def assert_settled(app):
    """
    Nothing is left in use: no engine, no quota slot, no waiter, no open scope.
    """
    factory = app.state.factory
    stats = factory.stats()
    assert stats.in_use == 0
    assert stats.quota.waiting == 0
    assert stats.created == stats.closed
    assert factory.quota.stats().in_use == 0
    assert factory.quota.stats().waiting == 0
    registry = app.state.registry
    assert registry.stats().scopes == 0
    assert registry.stats().top == ()


def assert_refused(response, error, retry_after):
    """
    Check a 429 problem document (RFC 9457), flat, the shape of the
    middleware's refusals; return it.
    """
    assert response.status_code == 429
    assert response.headers["retry-after"] == str(retry_after)
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert list(problem)[:4] == ["type", "title", "status", "detail"]
    assert (problem["type"], problem["title"], problem["status"]) == (
        "about:blank",
        "Too Many Requests",
        429,
    )
    assert problem["error"] == error
    assert problem["retry_after"] == retry_after
    assert problem["request_id"] == response.headers["x-request-id"]
    assert f"Retry after {retry_after} s." in problem["detail"]
    # Compact, as the middleware's own problem documents are.
    assert response.content == json.dumps(problem, separators=(",", ":")).encode()
    return problem


class TestCurrentContext:
    @pytest.mark.parametrize("kind", ["async", "sync"])
    async def test_endpoint_gets_the_bound_context(self, kind):
        """
        Sync and async endpoints get the context the middleware resolved and
        bound; a sync endpoint runs in a worker thread with it bound too.
        """
        async with client_of(build()) as client:
            response = await client.get(f"/ctx/{kind}", headers=as_user("u-1"))

        assert response.status_code == 200
        body = response.json()
        assert body["user"] == "u-1"
        assert body["bound"] is True
        if kind == "async":
            assert body["request_id"] == response.headers["x-request-id"]
        else:
            assert body["thread"] is True

    async def test_concurrent_users_see_their_own(self):
        """
        Concurrent requests of many users each see only their own context.
        """
        results = {}
        async with client_of(build()) as client, anyio.create_task_group() as tg:

            async def one(i):
                user = f"u-{i % 7}"
                path = f"/ctx/{'sync' if i % 2 else 'async'}"
                response = await client.get(path, headers=as_user(user))
                results[i] = (user, response.json()["user"])

            for i in range(40):
                tg.start_soon(one, i)

        assert len(results) == 40
        assert all(want == got for want, got in results.values())

    def test_websocket_route(self, anyio_backend):
        """
        A WebSocket route gets the connection's context, on either backend.
        """
        with (
            TestClient(build(), backend=anyio_backend) as client,
            client.websocket_connect("/ws/ctx", headers=as_user("u-3")) as ws,
        ):
            assert ws.receive_json() == {"user": "u-3"}

    async def test_without_middleware(self):
        """
        Without the middleware, the request fails with NoContextError, whose
        message says to add it; the client gets 500.
        """
        app = build(middleware=False)
        async with client_of(app) as client:
            with pytest.raises(uc.NoContextError, match="add_middleware"):
                await client.get("/ctx/async")
        async with client_of(app, raise_app_exceptions=False) as client:
            response = await client.get("/ctx/sync")
        assert response.status_code == 500

    def test_websocket_without_middleware(self, anyio_backend):
        """
        Without the middleware, a WebSocket route fails the same way.
        """
        client = TestClient(build(middleware=False), backend=anyio_backend)
        with (
            pytest.raises(uc.NoContextError, match="UserContextMiddleware"),
            client.websocket_connect("/ws/ctx"),
        ):
            pass  # pragma: no cover


class TestCurrentEmitter:
    @pytest.mark.parametrize("kind", ["async", "sync"])
    async def test_emits_to_the_users_stream(self, kind):
        """
        Sync and async endpoints get the emitter of the request's user, and
        its events reach that user's sinks only.
        """
        mine, theirs = RecordingSink(), RecordingSink()
        async with uc.EmitterHub() as hub:
            hub.attach("u-1", mine)
            hub.attach("u-2", theirs)
            async with client_of(build(hub=hub)) as client:
                first = await client.get(f"/emit/{kind}", headers=as_user("u-1"))
                second = await client.get(f"/emit/{kind}", headers=as_user("u-1"))
            await mine.wait_for(2)

        assert first.json() == {"user": "u-1", "seq": 1}
        assert second.json() == {"user": "u-1", "seq": 2}
        assert [e.user_id for e in mine.events] == ["u-1", "u-1"]
        assert theirs.events == []

    def test_websocket_route(self, anyio_backend):
        """
        A WebSocket route gets the emitter of the connection's user.
        """
        hub = uc.EmitterHub()

        @contextlib.asynccontextmanager
        async def lifespan(app):
            async with hub:
                yield

        app = build(hub=hub, lifespan=lifespan)
        with (
            TestClient(app, backend=anyio_backend) as client,
            client.websocket_connect("/ws/events", headers=as_user("u-5")) as ws,
        ):
            assert ws.receive_json() == {"user": "u-5", "seq": 1}

    async def test_without_hub(self):
        """
        If the middleware was given no hub, the request fails with a
        LookupError telling to pass one.
        """
        async with client_of(build()) as client:
            with pytest.raises(LookupError, match="hub=EmitterHub"):
                await client.get("/emit/async", headers=as_user("u-1"))


class TestResource:
    @pytest.mark.parametrize("kind", ["async", "sync"])
    async def test_resolves_from_the_requests_scope(self, kind):
        """
        Sync and async endpoints get the resources of the request's scope,
        from sync and async providers alike; a resource asked for twice is one
        object; both are closed after the response.
        """
        app = build()
        async with client_of(app) as client:
            response = await client.get(f"/res/{kind}", headers=as_user("u-1"))

        assert response.status_code == 200
        body = response.json()
        assert body["users"] == ["u-1", "u-1", "u-1"]
        assert body["kinds"] == ["async", "sync"]
        if kind == "async":
            assert body["same"] is True
        assert sorted(app.state.log) == [("aconn closed", "u-1"), ("conn closed", "u-1")]
        assert_settled(app)

    async def test_concurrent_users_get_their_own(self):
        """
        Concurrent requests of many users each get resources made for their
        own user, and every scope is closed afterwards.
        """
        app = build()
        bodies = []
        async with client_of(app) as client, anyio.create_task_group() as tg:

            async def one(i):
                user = f"u-{i % 5}"
                path = f"/res/{'sync' if i % 2 else 'async'}"
                response = await client.get(path, headers=as_user(user))
                bodies.append((user, response.json()["users"]))

            for i in range(30):
                tg.start_soon(one, i)

        assert len(bodies) == 30
        assert all(users == [user] * 3 for user, users in bodies)
        assert app.state.registry.stats().opened == 30
        assert_settled(app)

    def test_websocket_route(self, anyio_backend):
        """
        A WebSocket route gets the connection's resources, open while the
        connection lasts.
        """
        app = build()
        with (
            TestClient(app, backend=anyio_backend) as client,
            client.websocket_connect("/ws", headers=as_user("u-2")) as ws,
        ):
            assert ws.receive_json() == {"users": ["u-2"] * 3, "bound": True}
            assert app.state.registry.stats().scopes == 1
            ws.send_text("bye")
            with pytest.raises(WebSocketDisconnect):
                ws.receive_text()
        assert ("aconn closed", "u-2") in app.state.log
        assert_settled(app)

    async def test_without_registry(self):
        """
        If the middleware was given no registry, the request fails with a
        LookupError telling to pass one.
        """
        app = FastAPI()
        app.add_middleware(UserContextMiddleware, resolver=resolve)

        @app.get("/")
        def endpoint(conn: Annotated[Conn, Resource("conn")]):  # pragma: no cover
            return {}

        async with client_of(app) as client:
            with pytest.raises(LookupError, match=r"Resource\('conn'\) needs a registry"):
                await client.get("/", headers=as_user("u-1"))

    async def test_not_registered(self):
        """
        A key registered nowhere fails with the registry's KeyError.
        """
        app = FastAPI()
        app.add_middleware(UserContextMiddleware, resolver=resolve, registry=uc.Registry())

        @app.get("/")
        async def endpoint(conn: Annotated[Conn, Resource(Conn)]):  # pragma: no cover
            return {}

        async with client_of(app) as client:
            with pytest.raises(KeyError, match="Nothing is registered for Conn"):
                await client.get("/", headers=as_user("u-1"))

    def test_unhashable_key(self):
        """
        An unhashable key is refused where the dependency is declared.
        """
        with pytest.raises(TypeError, match="unhashable"):
            Resource(["conn"])

    async def test_another_users_scope_is_refused(self):
        """
        Even if the request's state is swapped for another user's scope, the
        scope refuses to hand a resource to this user: IsolationError.
        """
        registry = new_registry([])
        other = uc.UserContext(user_id="u-other", thread_id="t-1", run_id="r-1")

        app = FastAPI()

        @app.get("/")
        async def endpoint(conn: Annotated[Conn, Resource("conn")]):  # pragma: no cover
            return {"user": conn.user_id}

        async with registry.scope(other) as foreign:
            pass_through = app.build_middleware_stack()

            async def swap(scope, receive, send):
                state = scope[STATE_KEY]
                scope[STATE_KEY] = RequestState(state.ctx, foreign, None)
                await pass_through(scope, receive, send)

            outer = UserContextMiddleware(swap, resolver=resolve, registry=registry)
            async with client_of(outer) as client:
                with pytest.raises(uc.IsolationError, match="belongs to a scope of user 'u-other'"):
                    await client.get("/", headers=as_user("u-1"))
        assert registry.stats().scopes == 0


class TestEngineDep:
    @pytest.mark.parametrize("kind", ["async", "sync"])
    async def test_gives_the_users_engine_and_closes_it(self, kind):
        """
        Sync and async endpoints get an engine made for the request's user,
        open while they run and closed after them.
        """
        app = build()
        async with client_of(app) as client:
            response = await client.get(f"/engine/{kind}", headers=as_user("u-1"))

        assert response.status_code == 200
        assert response.json()["users"] == ["u-1", "u-1"]
        if kind == "sync":
            assert response.json()["bound"] is True
        log = [entry for entry in app.state.log if "conn" not in entry[0]]
        assert log == [("engine created", "u-1"), ("endpoint", False), ("engine closed", "u-1")]
        assert_settled(app)

    async def test_one_engine_per_request(self):
        """
        Declared twice (two calls of EngineDep with the same factory), the
        dependency gives the request one engine, holding one slot.
        """
        app = build(factory=new_factory([], per_user=1))
        async with client_of(app) as client:
            response = await client.get("/engine/async", headers=as_user("u-1"))

        assert response.json()["same"] is True
        assert app.state.factory.stats().created == 1

    async def test_closed_before_the_response_is_sent(self):
        """
        By default (scope "function") the engine is closed as soon as the
        endpoint returns: a streaming body sees it closed already.
        """
        app = build()
        async with client_of(app) as client:
            response = await client.get("/engine/stream", headers=as_user("u-1"))
        assert response.text == "closed=True"
        assert_settled(app)

    async def test_request_scope_closes_after_the_response(self):
        """
        With scope "request", the engine stays open until the response has
        been sent: a streaming body can use it.
        """
        app = build(scope="request")
        async with client_of(app) as client:
            response = await client.get("/engine/stream", headers=as_user("u-1"))
        assert response.text == "closed=False"
        assert app.state.log[-1] == ("engine closed", "u-1")
        assert_settled(app)

    def test_websocket_route(self, anyio_backend):
        """
        A WebSocket route gets the connection's engine, open until the
        endpoint returns.
        """
        app = build()
        with (
            TestClient(app, backend=anyio_backend) as client,
            client.websocket_connect("/ws", headers=as_user("u-2")) as ws,
        ):
            assert ws.receive_json() == {"users": ["u-2"] * 3, "bound": True}
            assert app.state.factory.stats().in_use == 1
            ws.send_text("bye")
            with pytest.raises(WebSocketDisconnect):
                ws.receive_text()
        assert ("ws endpoint done", False) in app.state.log
        assert ("engine closed", "u-2") in app.state.log
        assert_settled(app)

    async def test_third_concurrent_request_gets_429(self):
        """
        With a quota of 2 per user, the third concurrent request of a user is
        refused with 429, a Retry-After header and a JSON body; other users
        are served meanwhile, and the held requests complete.
        """
        app = build(factory=new_factory([], per_user=2, timeout=0))
        gate = app.state.gate = Gate(expect=3)  # u-1 twice, and u-2
        held = []
        async with client_of(app) as client, anyio.create_task_group() as tg:

            async def hold(user):
                held.append(await client.get("/engine/async", headers=as_user(user)))

            tg.start_soon(hold, "u-1")
            tg.start_soon(hold, "u-1")
            tg.start_soon(hold, "u-2")
            with anyio.fail_after(5):
                await gate.all_in.wait()
            third = await client.get("/engine/async", headers=as_user("u-1"))
            sync_third = await client.get("/engine/sync", headers=as_user("u-1"))
            assert app.state.factory.stats().in_use == 3
            app.state.gate = None
            other = await client.get("/engine/sync", headers=as_user("u-3"))
            gate.open.set()

        detail = assert_refused(third, "quota_exceeded", 1)
        assert "(the limit is 2)" in detail["detail"]
        assert_refused(sync_third, "quota_exceeded", 1)
        assert other.status_code == 200
        assert [r.status_code for r in held] == [200, 200, 200]
        assert app.state.factory.stats().quota.rejected == 2
        assert_settled(app)

    async def test_timeout_gives_429(self):
        """
        A request that waited for a slot for the factory's whole timeout is
        refused with 429 too, and Retry-After is that timeout rounded up.
        """
        app = build(factory=new_factory([], per_user=1, timeout=0.05))
        gate = app.state.gate = Gate(expect=1)
        async with client_of(app) as client, anyio.create_task_group() as tg:
            first = []

            async def hold():
                first.append(await client.get("/engine/async", headers=as_user("u-1")))

            tg.start_soon(hold)
            with anyio.fail_after(5):
                await gate.all_in.wait()
            late = await client.get("/engine/async", headers=as_user("u-1"))
            gate.open.set()

        assert_refused(late, "quota_timeout", 1)
        assert first[0].status_code == 200
        assert app.state.factory.stats().quota.timed_out == 1
        assert_settled(app)

    @pytest.mark.parametrize(
        ("error", "retry_after", "want"),
        [
            (uc.QuotaTimeoutError("u-1", 2, "key", 2, 2.2, 2.2), None, 3),
            (uc.QuotaTimeoutError("u-1", 2, "key", 2, 30.0, 30.0), None, 30),
            (uc.QuotaExceededError("u-1", 9, "total", 9, 0.0, 0), None, 1),
            (uc.QuotaExceededError("u-1", 9, "total", 9, 0.0, 0), 2.5, 3),
            (uc.QuotaTimeoutError("u-1", 2, "key", 2, 0.2, 0.2), 0.1, 1),
        ],
    )
    async def test_retry_after(self, error, retry_after, want):
        """
        Retry-After is *retry_after* rounded up if given, else the timeout the
        request waited rounded up, and at least 1 second; a full total limit
        tells the client the service is at capacity.
        """
        factory = uc.EngineFactory(Engine, quota=RefusingQuota(error))
        app = build(factory=factory, retry_after=retry_after)
        async with client_of(app) as client:
            response = await client.get("/engine/async", headers=as_user("u-1"))

        kind = "quota_timeout" if isinstance(error, uc.QuotaTimeoutError) else "quota_exceeded"
        detail = assert_refused(response, kind, want)
        if error.scope == "total":
            assert detail["detail"].startswith("The service is at capacity.")

    def test_websocket_denial_response(self, anyio_backend):
        """
        On a WebSocket route, a refusal is sent as a 429 denial response with
        the same headers and body, where the server supports them.
        """
        app = build(factory=new_factory([], per_user=0, timeout=0))
        with (
            TestClient(app, backend=anyio_backend) as client,
            pytest.raises(WebSocketDenialResponse) as info,
            client.websocket_connect("/ws/engine", headers=as_user("u-1")),
        ):
            pass  # pragma: no cover

        response = info.value
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"] == "quota_exceeded"
        assert_settled(app)

    async def test_websocket_close_without_denial_responses(self):
        """
        Where the server does not support denial responses, the handshake is
        closed with code 1013 (try again later) and a short reason.
        """
        app = build(factory=new_factory([], per_user=0, timeout=0), retry_after=7)
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": "/ws/engine",
            "raw_path": b"/ws/engine",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"x-user", b"u-1")],
            "client": ("127.0.0.1", 5000),
            "server": ("testserver", 80),
            "subprotocols": [],
        }
        sent = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)

        assert sent == [
            {
                "type": "websocket.close",
                "code": 1013,
                "reason": "429 quota_exceeded: retry after 7 s",
            }
        ]
        assert_settled(app)

    async def test_factory_closed_gives_503(self):
        """
        After the factory was closed, requests get 503 with Retry-After.
        """
        app = build()
        await app.state.factory.aclose()
        async with client_of(app) as client:
            response = await client.get("/engine/async", headers=as_user("u-1"))

        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"] == "unavailable"

    async def test_endpoint_errors_pass_through(self):
        """
        An error raised by the endpoint, a quota error included, is not turned
        into a refusal: it propagates, and the engine is closed.
        """
        other = new_factory([], per_user=0, timeout=0)
        app = build()

        @app.get("/nested")
        async def nested(engine: Annotated[Engine, EngineDep(app.state.factory)]):
            async with other.engine(uc.current()):  # pragma: no cover
                pass

        async with client_of(app) as client:
            with pytest.raises(uc.QuotaExceededError):
                await client.get("/nested", headers=as_user("u-1"))
            with pytest.raises(RuntimeError, match="the endpoint failed for u-1"):
                await client.get("/engine/boom", headers=as_user("u-1"))
        assert app.state.factory.stats().closed == 2
        assert_settled(app)

    async def test_deadline(self):
        """
        A body running past the factory's deadline is cancelled, and the
        request fails with EngineDeadlineError; the engine is closed.
        """
        app = build(factory=new_factory([], deadline=0.05))
        async with client_of(app) as client:
            with anyio.fail_after(5), pytest.raises(uc.EngineDeadlineError):
                await client.get("/engine/slow", headers=as_user("u-1"))
        assert app.state.factory.stats().deadline_errors == 1
        assert_settled(app)

    async def test_dependency_overrides(self):
        """
        `EngineDep(factory).dependency` is the same callable every time, so
        it can be replaced through app.dependency_overrides.
        """
        app = build()
        fake = Engine("u-fake")
        app.dependency_overrides[EngineDep(app.state.factory).dependency] = lambda: fake
        async with client_of(app) as client:
            response = await client.get("/engine/sync", headers=as_user("u-1"))

        assert response.json()["users"] == ["u-1", "u-fake"]
        assert app.state.factory.stats().created == 0

    def test_one_callable_per_factory_and_retry_after(self):
        """
        The same factory and Retry-After give the same callable; another
        factory or Retry-After gives another.
        """
        factory = new_factory([])
        dependency = EngineDep(factory).dependency
        assert EngineDep(factory, scope="request").dependency is dependency
        assert EngineDep(factory, retry_after=1).dependency is not dependency
        rounded = EngineDep(factory, retry_after=0.5).dependency
        assert EngineDep(factory, retry_after=1).dependency is rounded
        assert EngineDep(new_factory([])).dependency is not dependency
        assert dependency.__name__.startswith("EngineDep(")

    def test_factory_not_kept_alive(self):
        """
        Declaring a dependency keeps its factory alive only as long as the
        declaration itself.
        """
        factory = new_factory([])
        marker = EngineDep(factory)
        ref = weakref.ref(factory)
        del factory
        gc.collect()
        assert ref() is not None
        del marker
        gc.collect()
        assert ref() is None

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"factory": object()}, TypeError, "factory must be a usercontext.EngineFactory"),
            ({"retry_after": "1"}, TypeError, "retry_after must be a number"),
            ({"retry_after": True}, TypeError, "retry_after must be a number"),
            ({"retry_after": 0}, ValueError, "finite number of seconds > 0"),
            ({"retry_after": -1}, ValueError, "finite number of seconds > 0"),
            ({"retry_after": math.nan}, ValueError, "finite number of seconds > 0"),
            ({"retry_after": math.inf}, ValueError, "finite number of seconds > 0"),
            ({"scope": "session"}, ValueError, "scope must be 'function' or 'request'"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        """
        Bad arguments are refused where the dependency is declared, with a
        message naming the argument.
        """
        kwargs = {"factory": new_factory([]), **kwargs}
        with pytest.raises(error, match=match):
            EngineDep(**kwargs)


class RefusingQuota:
    """
    A quota that refuses every request with the given error.
    """

    def __init__(self, error):
        self.error = error

    async def acquire(self, key, *, timeout=None):
        raise self.error

    async def arelease(self, lease):  # pragma: no cover
        pass

    def stats(self, *, top=10):  # pragma: no cover
        return uc.LocalQuota().stats(top=top)


class TestUnderLoad:
    async def test_200_requests_leave_nothing_behind(self):
        """
        200 concurrent requests of 6 users, some failing and many refused by a
        quota of 2 per user, each see only their own user's context,
        resources and engine; afterwards no engine, slot or scope is left.
        """
        app = build(factory=new_factory([], per_user=2, timeout=0))
        rng = random.Random(7)
        outcomes: dict[int, int] = {}
        wrong: list[Any] = []
        limiter = anyio.CapacityLimiter(24)
        async with (
            client_of(app, raise_app_exceptions=False) as client,
            anyio.create_task_group() as tg,
        ):

            async def one(i):
                user = f"u-{rng.randrange(6)}"
                path = rng.choice(["/engine/async", "/engine/sync", "/engine/boom", "/res/async"])
                async with limiter:
                    response = await client.get(path, headers=as_user(user))
                outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
                if response.status_code == 200 and set(response.json()["users"]) != {user}:
                    wrong.append((user, response.json()))  # pragma: no cover

            for i in range(200):
                tg.start_soon(one, i)

        assert sum(outcomes.values()) == 200
        assert set(outcomes) == {200, 429, 500}
        assert wrong == []
        stats = app.state.factory.stats()
        assert stats.quota.rejected == outcomes[429]
        assert stats.peak <= 12
        assert_settled(app)


class TestDependencyOverrides:
    async def test_every_dependency_can_be_overridden(self):
        """
        Each dependency has a public callable that app.dependency_overrides
        keys on: `current_context`, `current_emitter`, ``Resource(key).dependency``
        and ``EngineDep(factory).dependency``; with all four replaced, the
        endpoints see only the replacements.
        """
        app = build(hub=uc.EmitterHub())
        fake_ctx = uc.UserContext(user_id="u-fake", thread_id="t-1", run_id="r-1")
        fake_conn = Conn("u-fake", "fake")
        fake_engine = Engine("u-fake")

        class FakeEmitter:
            user_id = "u-fake"

            async def emit(self, type_, data):
                return type("E", (), {"seq": 99})()

        app.dependency_overrides[current_context] = lambda: fake_ctx
        app.dependency_overrides[current_emitter] = FakeEmitter
        app.dependency_overrides[Resource("aconn").dependency] = lambda: fake_conn
        app.dependency_overrides[Resource("conn").dependency] = lambda: fake_conn
        app.dependency_overrides[EngineDep(app.state.factory).dependency] = lambda: fake_engine
        async with client_of(app) as client:
            ctx = await client.get("/ctx/async", headers=as_user("u-1"))
            res = await client.get("/res/async", headers=as_user("u-1"))
            engine = await client.get("/engine/sync", headers=as_user("u-1"))
            emit = await client.get("/emit/async", headers=as_user("u-1"))

        assert ctx.json()["user"] == "u-fake"
        assert res.json()["users"] == ["u-fake", "u-fake", "u-fake"]
        assert res.json()["kinds"] == ["fake", "fake"]
        assert engine.json()["users"] == ["u-fake", "u-fake"]
        assert emit.json() == {"user": "u-fake", "seq": 99}
        assert app.state.factory.stats().created == 0
        assert app.state.registry.stats().created == 0

    def test_one_callable_per_resource_key(self):
        """
        ``Resource(key)`` gives the same callable for the same key, named
        after it, and another for another key.
        """
        assert Resource("conn").dependency is Resource("conn").dependency
        assert Resource("conn").dependency is not Resource("aconn").dependency
        assert Resource(Conn).dependency.__name__ == "Resource(Conn)"

    def test_the_aliases_use_the_public_callables(self):
        """
        `CurrentContext` and `CurrentEmitter` depend on `current_context`
        and `current_emitter`.
        """
        assert CurrentContext.__metadata__[0].dependency is current_context
        assert CurrentEmitter.__metadata__[0].dependency is current_emitter


class TestProblemDocuments:
    async def test_503_is_a_flat_problem_document(self):
        """
        After the factory was closed, the 503 is a problem document in the
        middleware's shape, flat, with Retry-After.
        """
        app = build()
        await app.state.factory.aclose()
        async with client_of(app) as client:
            response = await client.get("/engine/async", headers=as_user("u-1"))

        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == {
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "The service is shutting down. Retry shortly.",
            "error": "unavailable",
            "retry_after": 1,
            "request_id": response.headers["x-request-id"],
        }

    async def test_same_shape_as_the_middleware(self):
        """
        A 401 of the middleware and a 429 of `EngineDep` share the members of
        RFC 9457 and the request id, in the same order.
        """
        app = build(factory=new_factory([], per_user=1, timeout=0))
        app.state.gate = Gate(expect=1)
        async with client_of(app) as client, anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(client.get, "/engine/async", headers=as_user("u-1")))
            await app.state.gate.all_in.wait()
            refused = await client.get("/engine/sync", headers=as_user("u-1"))
            unauthenticated = await client.get("/ctx/async")
            app.state.gate.open.set()

        for response in (refused, unauthenticated):
            assert response.headers["content-type"] == "application/problem+json"
            keys = list(response.json())
            assert keys[:4] == ["type", "title", "status", "detail"]
            assert keys[-1] == "request_id"
        assert (refused.status_code, unauthenticated.status_code) == (429, 401)

    async def test_the_apps_own_handler_wins(self):
        """
        An application that registered a handler for `ProblemException`
        formats the refusal its own way.
        """
        from fastapi.responses import PlainTextResponse

        app = build()

        async def plain(request, exc):
            return PlainTextResponse(f"{exc.status_code} {exc.problem['error']}", exc.status_code)

        app.add_exception_handler(ProblemException, plain)
        await app.state.factory.aclose()
        async with client_of(app) as client:
            response = await client.get("/engine/async", headers=as_user("u-1"))

        assert (response.status_code, response.text) == (503, "503 unavailable")

    def test_without_starlettes_exception_middleware(self):
        """
        Where no exception handlers are in the scope, nothing is put in
        place: the exception is still an HTTPException.
        """
        conn = types.SimpleNamespace(scope={"type": "http"})

        fastapi_module._with_handler(conn)

        assert conn.scope == {"type": "http"}

    def test_is_an_http_exception(self):
        """
        `ProblemException` is an HTTPException whose detail is the problem's
        detail, so that generic handlers still read it.
        """
        from fastapi import HTTPException

        e = ProblemException({"status": 429, "detail": "Slow down."}, headers={"Retry-After": "1"})

        assert isinstance(e, HTTPException)
        assert (e.status_code, e.detail, e.headers) == (429, "Slow down.", {"Retry-After": "1"})


class TestDocumentAuth:
    def test_security_scheme_and_refusals_in_openapi(self):
        """
        `document_auth` adds the security scheme, the Problem schema, and to
        every operation not exempt the security requirement and the 401 and
        400 problem responses; operations using an engine get 429 and 503.
        """
        app = build()

        @app.get("/health")
        def health():
            return {"ok": True}

        @app.get("/hidden", include_in_schema=False)
        def hidden():
            return {}

        document_auth(app, exempt=("/health",))
        schema = app.openapi()

        assert schema["components"]["securitySchemes"] == {
            "bearerAuth": {"type": "http", "scheme": "bearer"}
        }
        assert schema["components"]["schemas"]["Problem"]["required"] == [
            "type",
            "title",
            "status",
            "detail",
            "request_id",
        ]
        ctx_op = schema["paths"]["/ctx/async"]["get"]
        engine_op = schema["paths"]["/engine/sync"]["get"]
        health_op = schema["paths"]["/health"]["get"]
        assert ctx_op["security"] == [{"bearerAuth": []}]
        assert sorted(ctx_op["responses"]) == ["200", "400", "401"]
        assert sorted(engine_op["responses"]) == ["200", "400", "401", "429", "503"]
        assert "/hidden" not in schema["paths"]
        assert "security" not in health_op
        assert sorted(health_op["responses"]) == ["200"]
        assert ctx_op["responses"]["401"]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
        assert app.openapi() is schema  # made once
        assert schema["paths"]["/ctx/async"]["get"]["security"] == [{"bearerAuth": []}]

    def test_a_fastapi_security_object_and_declared_responses(self):
        """
        The scheme may be a FastAPI security object; a response an operation
        declares itself is kept.
        """
        from fastapi.security import APIKeyCookie

        app = FastAPI()

        @app.get("/me", responses={401: {"description": "Log in first."}})
        def me():
            return {}

        document_auth(app, scheme=APIKeyCookie(name="session"), name="cookieAuth")
        schema = app.openapi()

        assert schema["components"]["securitySchemes"]["cookieAuth"] == {
            "type": "apiKey",
            "in": "cookie",
            "name": "session",
        }
        assert schema["paths"]["/me"]["get"]["responses"]["401"]["description"] == "Log in first."
        assert schema["paths"]["/me"]["get"]["security"] == [{"cookieAuth": []}]

    def test_a_mapping_scheme_and_nested_engine_dependencies(self):
        """
        The scheme may be a plain mapping; an engine used by a dependency of
        the endpoint counts too.
        """
        factory = uc.EngineFactory(Engine)
        app = FastAPI()

        def wrapped(engine: Annotated[Engine, EngineDep(factory)]):
            return engine

        @app.post("/run")
        def run(engine: Annotated[Engine, fastapi.Depends(wrapped)]):
            return {}

        document_auth(app, scheme={"type": "apiKey", "in": "header", "name": "x-key"})
        schema = app.openapi()

        assert schema["components"]["securitySchemes"]["bearerAuth"]["in"] == "header"
        assert "429" in schema["paths"]["/run"]["post"]["responses"]
