"""
Tests of the Context each request of `usercontext.asgi.UserContextMiddleware`
runs in: fresh for each request, not the one the server's ``send`` and
``receive`` run in, and what an application's crash is answered with.
"""

from __future__ import annotations

import logging
import types

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import usercontext as uc
import usercontext.asgi

from usercontext.asgi import UserContextMiddleware, request_state

from asgi_helpers import (
    Client,
    Session,
    aresolve,
    assert_crash_answer,
    http_scope,
    json_app,
    outer_var,
    request_var,
    resolve,
    session_registry,
    ws_client,
    ws_scope,
)


# The middleware serves a request by one path or another, by whether a
# logging adapter reads the ids of requests being resolved: both are tested.
pytestmark = pytest.mark.usefixtures("both_request_paths")


class TestFreshContext:
    async def test_nothing_leaks_to_the_next_request_on_the_same_task(self):
        """
        Each request runs in a fresh copy of the server task's Context: what
        one request sets or binds (even a bind it never leaves) is not seen by
        the next request served by the same task, nor by the task itself,
        while variables the server set are seen by both.
        """
        seen = []

        async def app(scope, receive, send):
            ctx = uc.current()
            seen.append((ctx.request_id, request_var.get(), outer_var.get()))
            await json_app()(scope, receive, send)
            request_var.set(f"set by {ctx.request_id}")
            uc.bind(ctx.child(run_id="r-leaked")).__enter__()  # never left

        mw = UserContextMiddleware(app, resolver=resolve)
        token = outer_var.set("set by the server")
        try:
            ids = []
            for i in range(2):
                client = Client()
                await mw(http_scope(("x-request-id", f"req-{i}")), client.receive, client.send)
                ids.append(client.json()["request_id"])
                assert uc.current_or_none() is None
                assert request_var.get() == "unset"
        finally:
            outer_var.reset(token)

        assert ids == ["req-0", "req-1"]
        assert seen == [
            ("req-0", "unset", "set by the server"),
            ("req-1", "unset", "set by the server"),
        ]

    async def test_isolate_off_on_a_task_per_request(self):
        """
        With ``isolate=False`` on a server that runs each request in a task
        of its own, nothing leaks either: what one request sets or binds (even
        a bind it never leaves) ends with its task, and the next request and
        the server's task see none of it; the server's variables reach both.
        """
        seen = []

        async def app(scope, receive, send):
            ctx = uc.current()
            seen.append((ctx.request_id, request_var.get(), outer_var.get()))
            await json_app()(scope, receive, send)
            request_var.set(f"set by {ctx.request_id}")
            uc.bind(ctx.child(run_id="r-leaked")).__enter__()  # never left

        mw = UserContextMiddleware(app, resolver=resolve, isolate=False)
        token = outer_var.set("set by the server")
        try:
            clients = [Client() for _ in range(3)]
            for i, client in enumerate(clients):
                async with anyio.create_task_group() as tg:  # one task per request, in turn
                    tg.start_soon(
                        mw, http_scope(("x-request-id", f"req-{i}")), client.receive, client.send
                    )
                assert uc.current_or_none() is None
                assert request_var.get() == "unset"
        finally:
            outer_var.reset(token)

        assert [c.json()["request_id"] for c in clients] == ["req-0", "req-1", "req-2"]
        assert seen == [(f"req-{i}", "unset", "set by the server") for i in range(3)]

    async def test_isolate_off_runs_in_the_servers_context(self):
        """
        ``isolate=False`` makes no copy of the Context: a variable the
        application leaves set is seen by the server's task after the request
        (why a server that serves several requests from one task needs the
        default), while the request's user is unbound at its end all the same.
        """

        async def app(scope, receive, send):
            request_var.set("set by the request")
            await json_app()(scope, receive, send)

        client = Client()
        token = request_var.set("unset")
        try:
            await UserContextMiddleware(app, resolver=resolve, isolate=False)(
                http_scope(), client.receive, client.send
            )
            left = request_var.get()
        finally:
            request_var.reset(token)

        assert left == "set by the request"
        assert uc.current_or_none() is None
        assert client.json()["user_id"] == "u-42"

    def test_isolate_must_be_a_bool(self):
        """
        *isolate* is True or False.
        """
        with pytest.raises(TypeError, match=r"^isolate must be True or False, got 0\.$"):
            UserContextMiddleware(json_app(), resolver=resolve, isolate=0)

    async def test_a_server_task_with_a_bound_context(self, ctx):
        """
        A request served from code where a context is bound (of another user,
        even) runs under its own context only, and the caller's stays bound.
        """
        client = Client()
        with uc.bind(ctx):
            await UserContextMiddleware(json_app(), resolver=resolve)(
                http_scope(user="u-99"), client.receive, client.send
            )
            assert uc.current() is ctx

        assert client.json()["user_id"] == "u-99"

    async def test_runs_in_the_callers_task(self):
        """
        The request runs in the server's task (no task is started), so the
        server's cancel scopes apply to it.
        """
        tasks = []

        async def app(scope, receive, send):
            tasks.append(anyio.get_current_task().id)
            await json_app()(scope, receive, send)

        client = Client()
        await UserContextMiddleware(app, resolver=resolve)(
            http_scope(), client.receive, client.send
        )

        assert tasks == [anyio.get_current_task().id]

    async def test_cancelled_by_the_server(self):
        """
        Cancelling the server's cancel scope cancels the request; its scope is
        closed as failed and nothing is left open.
        """
        log = []
        registry = session_registry(log)
        started = anyio.Event()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            started.set()
            await anyio.sleep_forever()

        client = Client()
        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope(), client.receive, client.send)
            await started.wait()
            tg.cancel_scope.cancel()

        assert log[0] == "open u-42 depth=0"
        assert log[1].startswith("rollback ")
        assert log[1] != "rollback _DisconnectedError"
        assert registry.stats().scopes == 0
        assert client.sent == []


class ServerClient(Client):
    """
    A `Client` whose ``send`` and ``receive`` are server code: each records
    the user bound, and a variable the request sets, where it runs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.contexts = []

    def _record(self, where):
        ctx = uc.current_or_none()
        self.contexts.append((where, ctx and ctx.user_id, request_var.get(), outer_var.get()))

    async def receive(self):
        self._record("receive")
        message = await super().receive()
        self._record("receive")
        return message

    async def send(self, message):
        self._record("send")
        await anyio.lowlevel.checkpoint()  # a send that waits, in several steps
        await super().send(message)
        self._record("send")


class TestServerCalls:
    @pytest.mark.parametrize("kind", ["http", "websocket"])
    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_server_code_runs_where_no_user_is_bound(self, kind, with_registry):
        """
        The server's ``send`` and ``receive`` run in the Context the middleware
        was called in: no user is bound there, and nothing the request set is
        seen, so nothing the server starts from them (the next pipelined
        request, a socket read) carries the request's user; what the server
        set is seen.
        """
        registry = session_registry([]) if with_registry else None
        if kind == "http":
            client, scope = ServerClient(), http_scope()
        else:
            client = ServerClient(ws_client().messages, disconnect="websocket.disconnect")
            scope = ws_scope()

        async def app(scope, receive, send):
            request_var.set("set by the request")
            assert uc.current().user_id == "u-42"
            await receive()
            if kind == "http":
                await json_app()(scope, receive, send)
            else:
                await send({"type": "websocket.accept"})
                assert (await receive())["type"] == "websocket.disconnect"
            assert uc.current().user_id == "u-42"

        token = outer_var.set("set by the server")
        try:
            await UserContextMiddleware(app, resolver=resolve, registry=registry)(
                scope, client.receive, client.send
            )
        finally:
            outer_var.reset(token)

        assert len(client.contexts) >= 6
        assert {c[1:] for c in client.contexts} == {(None, "unset", "set by the server")}

    async def test_concurrent_calls(self):
        """
        A ``receive`` waiting in one task while ``send`` runs in another (a
        streaming response listening for a disconnect) both run in the
        server's Context, in turns.
        """
        registry = session_registry([])
        client = ServerClient()
        client.messages.clear()

        async def app(scope, receive, send):
            async def stream():
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for i in range(3):
                    await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
                client.gone.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(stream)
                assert (await receive())["type"] == "http.disconnect"

        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        assert client.body() == b"012"
        assert {c[1] for c in client.contexts} == {None}

    async def test_server_callable_returning_an_awaitable(self):
        """
        A server's ``send`` may be a plain function that does its work when
        called and returns an awaitable: it is called where no user is bound.
        """
        client = Client()
        called = []

        def send(message):
            called.append(uc.current_or_none())
            return client.send(message)

        await UserContextMiddleware(json_app(), resolver=resolve)(
            http_scope(), client.receive, send
        )

        assert called == [None, None]
        assert client.status() == 200

    async def test_cancelled_in_the_servers_receive(self):
        """
        A cancellation reaching the application while it waits in the
        server's ``receive`` is thrown into the server's code, in the server's
        Context, and propagates.
        """
        client = ServerClient()
        client.messages.clear()
        cancelled = []

        async def receive():
            try:
                return await client.receive()
            except anyio.get_cancelled_exc_class():
                cancelled.append(uc.current_or_none())
                raise

        async def app(scope, receive, send):
            await receive()

        mw = UserContextMiddleware(app, resolver=resolve, registry=session_registry([]))
        with anyio.move_on_after(0.01):
            await mw(http_scope(), receive, client.send)

        assert cancelled == [None]
        assert client.sent == []

    def test_closed_while_in_the_servers_receive(self):
        """
        A request whose coroutine is closed while it waits in the server's
        ``receive`` (its task is abandoned) closes the server's coroutine too,
        in the server's Context.
        """
        closed = []

        @types.coroutine
        def wait():
            yield "waiting"

        async def receive():
            try:
                await wait()
            finally:
                closed.append(uc.current_or_none())

        async def app(scope, receive, send):
            await receive()

        coro = UserContextMiddleware(app, resolver=resolve)(http_scope(), receive, Client().send)
        assert coro.send(None) == "waiting"
        coro.close()

        assert closed == [None]


class TestCrashes:
    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_500_with_the_request_id(self, with_registry):
        """
        An application that raises before its response started gets a JSON
        500 with the request id, in the header and the body, then its
        exception propagates.
        """
        registry = session_registry([]) if with_registry else None
        client = Client()

        async def app(scope, receive, send):
            raise LookupError("no such note")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(LookupError, match="no such note"):
            await mw(http_scope(("x-request-id", "req-c")), client.receive, client.send)

        assert client.status() == 500
        assert client.header_values(b"x-request-id") == [b"req-c"]
        assert client.json()["request_id"] == "req-c"
        assert client.json()["error"] == "internal_error"
        assert client.sent[-1].get("more_body", False) is False

    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_nothing_more_after_the_start(self, with_registry):
        """
        An application that raises after its response started gets nothing
        more sent for it: the server drops the connection.
        """
        registry = session_registry([]) if with_registry else None
        client = Client()

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            raise LookupError("no such note")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(LookupError):
            await mw(http_scope(), client.receive, client.send)

        assert [m["type"] for m in client.sent] == ["http.response.start"]
        assert client.status() == 200

    async def test_the_500_cannot_be_sent(self, caplog):
        """
        When the 500 cannot be sent (the client is gone), the application's
        exception propagates, not the server's.
        """
        client = Client()
        client.fail_after = 0

        async def app(scope, receive, send):
            raise LookupError("no such note")

        with caplog.at_level(logging.DEBUG, "usercontext.asgi"), pytest.raises(LookupError):
            await UserContextMiddleware(app, resolver=resolve)(
                http_scope(("x-request-id", "req-g")), client.receive, client.send
            )

        assert client.sent == []
        assert [r.getMessage() for r in caplog.records] == [
            "The 500 for request req-g could not be sent."
        ]

    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_websocket(self, with_registry):
        """
        A WebSocket application that raises before accepting gets a 500
        denial response with the request id where the server supports them,
        and nothing where it does not (the server refuses the handshake).
        """
        registry = session_registry([]) if with_registry else None

        async def app(scope, receive, send):
            raise LookupError("no such room")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        client = ws_client()
        scope = ws_scope(("x-request-id", "ws-c"), extensions={"websocket.http.response": {}})
        with pytest.raises(LookupError):
            await mw(scope, client.receive, client.send)
        bare = ws_client()
        with pytest.raises(LookupError):
            await mw(ws_scope(), bare.receive, bare.send)

        assert client.status() == 500
        assert client.sent[0]["type"] == "websocket.http.response.start"
        assert client.header_values(b"x-request-id") == [b"ws-c"]
        assert client.json()["request_id"] == "ws-c"
        assert bare.sent == []


@pytest.mark.parametrize("isolate", [True, False])
class TestWithoutALoggingAdapter:
    """
    Without a logging adapter reading the pending request id, a plain
    resolver is called without a coroutine of its own, isolated or not;
    every outcome is the same as with one.
    """

    @pytest.fixture(autouse=True)
    def _no_readers(self, monkeypatch):
        monkeypatch.setattr(usercontext.asgi, "readers", [])

    async def test_a_request_with_a_scope(self, isolate):
        log = []
        mw = UserContextMiddleware(
            json_app(), resolver=resolve, registry=session_registry(log), isolate=isolate
        )
        clients = [Client(), Client(), Client()]
        incoming = [("x-request-id", "req-1"), ("x-request-id", "null"), None]
        for client, header in zip(clients, incoming, strict=True):
            scope = http_scope() if header is None else http_scope(header)
            await mw(scope, client.receive, client.send)

        ids = [c.json()["request_id"] for c in clients]
        assert [c.headers()[b"x-request-id"].decode() for c in clients] == ids
        assert ids[0] == "req-1"
        assert "null" not in ids[1:]
        assert len(set(ids)) == 3
        assert log == ["open u-42 depth=0", "commit depth=0"] * 3
        assert uc.current_or_none() is None

    async def test_a_refusal_and_a_crash(self, isolate):
        def crash(scope):
            raise RuntimeError("the key server is down")

        refused, crashed = Client(), Client()
        await UserContextMiddleware(json_app(), resolver=resolve, isolate=isolate)(
            http_scope(("x-request-id", "req-7"), user=None), refused.receive, refused.send
        )
        mw = UserContextMiddleware(json_app(), resolver=crash, isolate=isolate)
        with pytest.raises(RuntimeError, match="key server"):
            await mw(http_scope(("x-request-id", "req-8")), crashed.receive, crashed.send)

        assert (refused.status(), refused.json()["request_id"]) == (401, "req-7")
        assert_crash_answer(crashed.sent)
        assert crashed.headers()[b"x-request-id"] == b"req-8"

    async def test_a_coroutine_resolver(self, isolate):
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=aresolve, isolate=isolate)
        await mw(http_scope(("x-request-id", "req-9")), client.receive, client.send)

        assert client.json() == {"user_id": "u-42", "request_id": "req-9"}
