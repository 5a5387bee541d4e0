"""
Tests of `usercontext.asgi.UserContextMiddleware`'s construction, the scopes
it lets through untouched, and its resolver: sync, async or in a thread, and
requests let through with no user.
"""

from __future__ import annotations

import json
import threading

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import usercontext as uc

from usercontext.asgi import STATE_KEY, RequestState, UserContextMiddleware, request_state

from asgi_helpers import (
    Client,
    Session,
    aresolve,
    assert_crash_answer,
    http_scope,
    json_app,
    json_start,
    outer_var,
    resolve,
    ws_scope,
)


# The middleware serves a request by one path or another, by whether a
# logging adapter reads the ids of requests being resolved: both are tested.
pytestmark = pytest.mark.usefixtures("both_request_paths")


class TestConstructor:
    def test_keeps_its_arguments(self):
        """
        The middleware keeps the application and its options as attributes.
        """
        registry = uc.Registry()
        mw = UserContextMiddleware(
            json_app(), resolver=resolve, registry=registry, request_id_header="X-Trace-ID"
        )

        assert mw.resolver is resolve
        assert mw.registry is registry
        assert mw.hub is None
        assert mw.request_id_header == "X-Trace-ID"

    def test_resolver_must_be_callable(self):
        """
        A resolver that is not callable is refused with a TypeError naming its
        type.
        """
        with pytest.raises(TypeError, match=r"^resolver must be a function .* got str\.$"):
            UserContextMiddleware(json_app(), resolver="resolve")

    def test_registry_must_be_a_registry(self):
        """
        A registry of another type is refused with a TypeError naming it.
        """
        with pytest.raises(
            TypeError, match=r"^registry must be a usercontext.Registry or None, got dict\.$"
        ):
            UserContextMiddleware(json_app(), resolver=resolve, registry={})

    def test_hub_must_be_an_emitter_hub(self):
        """
        A hub of another type is refused with a TypeError naming it.
        """
        with pytest.raises(
            TypeError, match=r"^hub must be a usercontext.EmitterHub or None, got object\.$"
        ):
            UserContextMiddleware(json_app(), resolver=resolve, hub=object())

    @pytest.mark.parametrize(
        "header", ["", "x request id", "x-request-id\r\n", "x-réquest", b"x-id", None]
    )
    def test_request_id_header_must_be_a_header_name(self, header):
        """
        The request id header must be a str that is a valid HTTP header name.
        """
        with pytest.raises(ValueError, match=r"^request_id_header must be an HTTP header name"):
            UserContextMiddleware(json_app(), resolver=resolve, request_id_header=header)


class TestPassThrough:
    async def test_lifespan_passes_through_untouched(self):
        """
        A ``lifespan`` scope reaches the application with the very scope,
        receive and send it came with; the resolver is not called and no
        context is bound.
        """
        seen = []
        resolver_calls = []

        async def app(scope, receive, send):
            seen.append((scope, receive, send, uc.current_or_none()))
            await send({"type": "lifespan.startup.complete"})

        def resolver(scope):
            resolver_calls.append(scope)  # must not be called

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        client = Client([{"type": "lifespan.startup"}])
        mw = UserContextMiddleware(app, resolver=resolver, registry=uc.Registry())
        await mw(scope, client.receive, client.send)

        assert seen == [(scope, client.receive, client.send, None)]
        assert STATE_KEY not in scope
        assert resolver_calls == []
        assert client.sent == [{"type": "lifespan.startup.complete"}]


class TestResolver:
    @pytest.mark.parametrize("resolver", [resolve, aresolve], ids=["sync", "async"])
    async def test_binds_the_resolved_context(self, resolver):
        """
        The context a sync or async resolver returns is bound while the
        application runs, and is in the request's state; nothing stays bound
        afterwards.
        """
        seen = {}

        async def app(scope, receive, send):
            seen["current"] = uc.current()
            seen["state"] = request_state(scope)
            await json_app()(scope, receive, send)

        client = Client()
        scope = http_scope()
        await UserContextMiddleware(app, resolver=resolver)(scope, client.receive, client.send)

        state = seen["state"]
        assert isinstance(state, RequestState)
        assert scope[STATE_KEY] is state
        assert seen["current"] is state.ctx
        assert state.ctx.user_id == "u-42"
        assert state.resources is None
        assert state.hub is None
        assert client.status() == 200
        assert client.json() == {"user_id": "u-42", "request_id": state.ctx.request_id}
        assert uc.current_or_none() is None

    async def test_sync_resolver_may_return_an_awaitable(self):
        """
        A plain function that returns an awaitable of the context works like a
        coroutine function.
        """

        def resolver(scope):
            return aresolve(scope)

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        await mw(http_scope(user="u-7"), client.receive, client.send)

        assert client.json()["user_id"] == "u-7"

    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    async def test_resolver_returning_something_else_is_a_type_error(self, is_async):
        """
        A resolver that returns something other than a UserContext raises a
        TypeError naming the resolver and what it returned; the client gets a
        500 problem document carrying the request id, as for any crash.
        """

        def lookup_user(scope):
            return {"user_id": "u-42"}

        async def alookup_user(scope):
            return 42

        resolver, kind = (alookup_user, "int") if is_async else (lookup_user, "dict")
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        with pytest.raises(TypeError) as e:
            await mw(http_scope(), client.receive, client.send)

        assert str(e.value) == (
            f"The resolver {resolver.__qualname__!r} returned {kind}; it must return a "
            "usercontext.UserContext, or None to let the request through without a user (or "
            "raise usercontext.UnauthenticatedError)."
        )
        start, body = client.sent
        assert start["status"] == 500
        request_id = dict(start["headers"])[b"x-request-id"].decode()
        assert len(request_id) == 32
        problem = json.loads(body["body"])
        assert (problem["error"], problem["request_id"]) == ("internal_error", request_id)

    async def test_type_error_names_a_resolver_object_by_its_repr(self):
        """
        A resolver without a ``__qualname__`` (a callable object) is named by
        its repr.
        """

        class Resolver:
            def __call__(self, scope):
                return "u-42"

            def __repr__(self):
                return "<the header resolver>"

        mw = UserContextMiddleware(json_app(), resolver=Resolver())
        with pytest.raises(TypeError, match=r"^The resolver <the header resolver> returned str;"):
            await mw(http_scope(), Client().receive, Client().send)

    async def test_other_errors_propagate(self):
        """
        Any other error of the resolver propagates unchanged; the application
        is not called, and the client gets the 500 of a crash.
        """

        def resolver(scope):
            raise RuntimeError("the user database is down")

        client = Client()
        app_calls = []

        async def app(scope, receive, send):
            app_calls.append(scope)  # must not be called

        mw = UserContextMiddleware(app, resolver=resolver)
        with pytest.raises(RuntimeError, match="the user database is down"):
            await mw(http_scope(), client.receive, client.send)

        assert app_calls == []
        assert_crash_answer(client.sent)


class TestResolverInThread:
    async def test_runs_in_a_worker_thread_with_the_context(self):
        """
        With *resolver_in_thread*, a plain-function resolver runs in a worker
        thread, with a copy of the Context (variables the server set are
        seen), and its context is bound as usual.
        """
        seen = []

        def resolver(scope):
            seen.append((threading.get_ident(), outer_var.get()))
            return resolve(scope)

        token = outer_var.set("set by the server")
        try:
            client = Client()
            mw = UserContextMiddleware(json_app(), resolver=resolver, resolver_in_thread=True)
            await mw(http_scope(), client.receive, client.send)
        finally:
            outer_var.reset(token)

        assert seen[0][0] != threading.get_ident()
        assert seen[0][1] == "set by the server"
        assert client.json()["user_id"] == "u-42"
        assert mw.resolver_in_thread is True

    async def test_the_event_loop_runs_while_it_blocks(self):
        """
        A resolver that blocks (a database call) does not block the event
        loop: another request is served meanwhile.
        """
        release = threading.Event()
        order = []

        def slow(scope):
            if dict(scope["headers"])[b"x-user"] == b"u-slow":
                release.wait(5)
                order.append("slow resolved")
            return resolve(scope)

        mw = UserContextMiddleware(json_app(), resolver=slow, resolver_in_thread=True)

        async def fast():
            client = Client()
            await mw(http_scope(user="u-fast"), client.receive, client.send)
            order.append("fast served")
            release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope(user="u-slow"), Client().receive, Client().send)
            await anyio.sleep(0.01)
            tg.start_soon(fast)

        assert order == ["fast served", "slow resolved"]

    async def test_refusals_from_the_thread(self):
        """
        A refusal raised in the worker thread is answered as any other.
        """
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolve, resolver_in_thread=True)
        await mw(http_scope(user=None), client.receive, client.send)

        assert client.status() == 401

    def test_coroutine_function_is_refused(self):
        """
        A coroutine function runs on the event loop: asking for a thread for
        it is a TypeError that says so.
        """

        class Resolver:
            async def __call__(self, scope):
                return resolve(scope)

        for resolver in (aresolve, Resolver()):
            with pytest.raises(TypeError, match=r"is a coroutine function, which runs on the"):
                UserContextMiddleware(json_app(), resolver=resolver, resolver_in_thread=True)

    def test_must_be_a_bool(self):
        """
        *resolver_in_thread* is True or False.
        """
        with pytest.raises(TypeError, match=r"^resolver_in_thread must be True or False, got 1\.$"):
            UserContextMiddleware(json_app(), resolver=resolve, resolver_in_thread=1)


class TestAnonymous:
    async def test_resolver_returning_none(self):
        """
        A resolver that returns None lets the request through with no user
        bound and no scope opened; `request_state` says why, and the response
        carries the request id.
        """
        seen = {}

        async def app(scope, receive, send):
            seen["current"] = uc.current_or_none()
            with pytest.raises(uc.NoContextError) as e:
                request_state(scope)
            seen["error"] = str(e.value)
            await send(json_start(b"{}"))
            await send({"type": "http.response.body", "body": b"{}"})

        registry = uc.Registry()
        registry.register(Session, Session)
        client = Client()
        mw = UserContextMiddleware(app, resolver=lambda scope: None, registry=registry)
        await mw(http_scope(("x-request-id", "req-anon")), client.receive, client.send)

        assert seen["current"] is None
        assert seen["error"].startswith(
            "This request passed through usercontext.asgi.UserContextMiddleware with no user: "
            "its path is exempt, or the resolver returned None."
        )
        assert client.status() == 200
        assert client.header_values(b"x-request-id") == [b"req-anon"]
        assert registry.stats().opened == 0

    async def test_async_resolver_returning_none(self):
        """
        A coroutine function may return None too; without a client id, the
        response carries a new one.
        """

        async def resolver(scope):
            return None

        client = Client()
        await UserContextMiddleware(json_app(payload={"ok": 1}), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert client.status() == 200
        assert len(client.header_values(b"x-request-id")[0]) == 32

    @pytest.mark.parametrize(
        ("path", "exempt"),
        [
            ("/health", True),
            ("/docs", True),
            ("/docs/oauth2-redirect", True),
            ("/openapi.json", True),
            ("/static/app.js", True),
            ("/docsets", False),
            ("/healthz", False),
            ("/static", False),
            ("/api/health", False),
            ("/", False),
        ],
    )
    async def test_exempt_paths(self, path, exempt):
        """
        An exempt path, or any path below it, is served without calling the
        resolver and with no user; a path that merely starts with the same
        letters is not exempt. An entry ending with ``/`` exempts only what
        is below it.
        """
        calls = []

        def resolver(scope):
            calls.append(scope["path"])
            return resolve(scope)

        mw = UserContextMiddleware(
            json_app(payload={"ok": 1}),
            resolver=resolver,
            exempt=["/health", "/docs", "/openapi.json", "/static/"],
        )
        client = Client()
        scope = {**http_scope(user=None), "path": path}
        await mw(scope, client.receive, client.send)

        assert mw.exempt == ("/health", "/docs", "/openapi.json", "/static/")
        if exempt:
            assert (client.status(), calls, scope[STATE_KEY]) == (200, [], None)
        else:
            assert (client.status(), calls) == (401, [path])

    async def test_exempt_websocket(self):
        """
        Exempt paths hold for WebSocket connections too.
        """

        async def app(scope, receive, send):
            await send({"type": "websocket.accept"})

        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        scope = {**ws_scope(("x-request-id", "ws-1"), user=None), "path": "/public/feed"}
        await UserContextMiddleware(app, resolver=resolve, exempt=("/public",))(
            scope, client.receive, client.send
        )

        assert client.sent == [
            {"type": "websocket.accept", "headers": [(b"x-request-id", b"ws-1")]}
        ]

    @pytest.mark.parametrize(
        ("exempt", "error", "match"),
        [
            ("/health", TypeError, r"exempt=\('/health',\)"),
            (b"/health", TypeError, r"got a bytes"),
            (7, TypeError, r"got a int"),
            (["health"], ValueError, r"holds 'health', but each exempt path must be a str start"),
            ([b"/health"], ValueError, r"holds b'/health'"),
        ],
    )
    def test_bad_exempt(self, exempt, error, match):
        """
        *exempt* is an iterable of paths starting with ``/``; a bare string is
        refused with the fix.
        """
        with pytest.raises(error, match=match):
            UserContextMiddleware(json_app(), resolver=resolve, exempt=exempt)


@pytest.fixture(name="no_log_readers")
def _no_log_readers(monkeypatch):
    """
    No logging adapter loaded: the middleware calls a plain resolver
    directly, and finishes what it returned only when that is awaitable.
    """
    from usercontext import _pending

    monkeypatch.setattr(_pending, "readers", [])
    monkeypatch.setattr("usercontext.asgi.readers", _pending.readers)


@pytest.mark.usefixtures("no_log_readers")
class TestResolverWithoutLoggingAdapter:
    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    async def test_context_none_refusal_and_crash(self, is_async):
        """
        Without a logging adapter, a sync or async resolver's context is
        bound (200 with its user), `None` lets the request through with no
        user, a refusal gets its status (403) with the request id, and any
        other error gets a 500 with the request id, then propagates.
        """

        def refuse(scope):
            raise uc.ForbiddenError("Not yours.")

        def crash(scope):
            raise LookupError("store is down")

        outcomes = {"u-1": resolve, "anon": lambda scope: None, "nope": refuse, "boom": crash}

        def sync_resolver(scope):
            return outcomes[dict(scope["headers"])[b"x-user"].decode()](scope)

        async def async_resolver(scope):
            await anyio.lowlevel.checkpoint()
            return sync_resolver(scope)

        mw = UserContextMiddleware(
            json_app(), resolver=async_resolver if is_async else sync_resolver
        )
        answers = {}
        for user in ("u-1", "anon", "nope"):
            client = Client()
            await mw(
                http_scope(("x-request-id", f"req-{user}"), user=user), client.receive, client.send
            )
            answers[user] = (client.status(), client.json())
        client = Client()
        with pytest.raises(LookupError, match="store is down"):
            await mw(
                http_scope(("x-request-id", "req-boom"), user="boom"), client.receive, client.send
            )

        assert answers["u-1"] == (200, {"user_id": "u-1", "request_id": "req-u-1"})
        assert answers["anon"] == (200, {"anonymous": True})
        status, problem = answers["nope"]
        assert (status, problem["error"], problem["request_id"]) == (403, "forbidden", "req-nope")
        assert_crash_answer(client.sent)
        assert dict(client.sent[0]["headers"])[b"x-request-id"] == b"req-boom"
