"""
Tests of `usercontext.asgi`: the middleware driven in-process with
hand-written ASGI applications, ``receive`` and ``send``, on asyncio and trio.

The tests at the end run real Starlette applications through
``httpx2.ASGITransport`` and Starlette's TestClient; they are skipped when
starlette (or httpx2) is missing, unless ``CI=true``. Everything else needs
only the core.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import types

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import usercontext as uc

from usercontext.asgi import (
    STATE_KEY,
    RequestState,
    UserContextMiddleware,
    in_child_scope,
    request_state,
)
from usercontext.testing import RecordingSink


try:
    import httpx2
    import starlette  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    httpx2 = None

needs_starlette = pytest.mark.skipif(
    httpx2 is None,
    reason="starlette and httpx2 are not installed: pip install usercontext[starlette] httpx2",
)

if sys.version_info >= (3, 11):
    ExceptionGroupType = ExceptionGroup  # noqa: F821  # a builtin from Python 3.11
else:
    from exceptiongroup import ExceptionGroup as ExceptionGroupType

JSON_HEADERS = [(b"content-type", b"application/json")]
DISCONNECTED = "The client disconnected before the response was complete."

outer_var: contextvars.ContextVar[str] = contextvars.ContextVar("outer_var", default="unset")
request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")


# -- helpers -----------------------------------------------------------------


def resolve(scope):
    """
    A resolver: the user comes from an ``x-user`` header, the thread from
    ``x-thread``.
    """
    headers = dict(scope["headers"])
    user = headers.get(b"x-user")
    if user is None:
        raise uc.UnauthenticatedError("Send an x-user header.")
    thread = headers.get(b"x-thread", b"t-1").decode()
    return uc.UserContext(user_id=user.decode(), thread_id=thread, run_id="r-1")


async def aresolve(scope):
    """
    `resolve`, as a coroutine function.
    """
    await anyio.lowlevel.checkpoint()
    return resolve(scope)


def http_scope(*headers, user="u-42", extensions=None):
    """
    An ASGI ``http`` scope with an ``x-user`` header (unless *user* is None)
    and the *headers* given as ``(name, value)`` pairs of str or bytes.
    """
    raw = [] if user is None else [(b"x-user", user.encode())]
    for name, value in headers:
        raw.append(
            (
                name.lower().encode() if isinstance(name, str) else name,
                value.encode() if isinstance(value, str) else value,
            )
        )
    scope = {"type": "http", "method": "GET", "path": "/", "headers": raw}
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


def ws_scope(*headers, user="u-42", extensions=None):
    """
    An ASGI ``websocket`` scope, as `http_scope` builds it.
    """
    return {**http_scope(*headers, user=user, extensions=extensions), "type": "websocket"}


def assert_crash_answer(sent):
    """
    Check that *sent* is the middleware's answer to a crash: a 500 problem
    document whose request id is the one in the response's header.
    """
    start, body = sent
    assert start["status"] == 500
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    problem = json.loads(body["body"])
    assert problem["error"] == "internal_error"
    assert problem["request_id"] == headers[b"x-request-id"].decode()


class Client:
    """
    The client side of one ASGI connection: it sends *messages* (one
    ``http.request`` by default), then waits until `gone` is set and reports a
    disconnect; it records what the application sends, in `sent` and in the
    shared *log*.
    """

    def __init__(self, messages=None, *, log=None, disconnect="http.disconnect"):
        self.messages = [{"type": "http.request", "body": b""}] if messages is None else messages
        self.disconnect = disconnect
        self.sent = []
        self.log = [] if log is None else log
        self.gone = anyio.Event()
        self.fail_after = None  # raise OSError from send once this many messages were sent

    async def receive(self):
        if self.messages:
            return self.messages.pop(0)
        await self.gone.wait()
        return {"type": self.disconnect}

    async def send(self, message):
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise OSError("broken pipe")
        self.sent.append(message)
        kind = message["type"]
        if kind.endswith(".start"):
            self.log.append(f"sent {kind} {message['status']}")
        elif kind == "http.response.body":
            self.log.append(f"sent body {message.get('body', b'')!r}")
        else:
            self.log.append(f"sent {kind}")

    def start(self):
        (start,) = [m for m in self.sent if m["type"].endswith("response.start")]
        return start

    def status(self):
        return self.start()["status"]

    def headers(self):
        return dict(self.start()["headers"])

    def header_values(self, name):
        return [v for k, v in self.start()["headers"] if k.lower() == name]

    def body(self):
        return b"".join(m.get("body", b"") for m in self.sent if m["type"].endswith("body"))

    def json(self):
        return json.loads(self.body())


class Session:
    """
    A stand-in for a database session of one request.
    """

    def __init__(self, ctx):
        self.ctx = ctx


def session_registry(log, *, fail_commit=False):
    """
    A registry whose `Session` provider logs when it opens, commits and rolls
    back (with the exception it saw), and can fail its commit.
    """
    registry = uc.Registry()

    def session(ctx):
        log.append(f"open {ctx.user_id} depth={ctx.depth}")
        try:
            yield Session(ctx)
        except BaseException as e:
            log.append(f"rollback {type(e).__name__}")
            raise
        log.append(f"commit depth={ctx.depth}")
        if fail_commit:
            raise OSError("the commit failed")

    registry.register(Session, session)
    return registry


def json_start(body, status=200, headers=()):
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [*JSON_HEADERS, (b"content-length", b"%d" % len(body)), *headers],
    }


def json_app(log=None, payload=None):
    """
    An application answering in one body message with a Content-Length, as
    ``JSONResponse`` does, after using the request's `Session`.
    """

    async def app(scope, receive, send):
        if scope[STATE_KEY] is not None:  # None: a request let through with no user
            state = request_state(scope)
            if state.resources is not None:
                await state.resources.aget(Session)
        ctx = uc.current_or_none()
        data = payload or (
            {"anonymous": True}
            if ctx is None
            else {"user_id": ctx.user_id, "request_id": ctx.request_id}
        )
        body = json.dumps(data).encode()
        if log is not None:
            log.append("app sends")
        await send(json_start(body))
        await send({"type": "http.response.body", "body": body})

    return app


async def _until(predicate, timeout=5.0):
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  # polls the state of the code under test
            await anyio.sleep(0.001)


# -- construction and pass-through ------------------------------------------


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


# -- the resolver ------------------------------------------------------------


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


class TestRefusals:
    @pytest.mark.parametrize("resolver", [resolve, aresolve], ids=["sync", "async"])
    async def test_unauthenticated_is_401_json(self, resolver):
        """
        `UnauthenticatedError` from the resolver answers 401 with a JSON body
        holding its message and the request id, a WWW-Authenticate challenge
        and the request id header; the application is not called.
        """
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver, registry=uc.Registry())
        await mw(http_scope(user=None), client.receive, client.send)

        assert client.status() == 401
        headers = client.headers()
        request_id = headers[b"x-request-id"].decode()
        assert len(request_id) == 32
        assert headers[b"www-authenticate"] == b"Bearer"
        assert headers[b"content-type"] == b"application/problem+json"
        assert headers[b"content-length"] == b"%d" % len(client.body())
        assert client.json() == {
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "detail": "Send an x-user header.",
            "error": "unauthenticated",
            "request_id": request_id,
        }
        assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]

    async def test_unauthenticated_reuses_the_request_id_and_the_challenge(self):
        """
        A refused request keeps the valid request id its client sent, and the
        401 carries the exception's challenge.
        """

        def resolver(scope):
            raise uc.UnauthenticatedError(
                "The token expired.", challenge='Bearer error="invalid_token"'
            )

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        await mw(http_scope(("x-request-id", "req-123")), client.receive, client.send)

        assert client.headers()[b"www-authenticate"] == b'Bearer error="invalid_token"'
        assert client.headers()[b"x-request-id"] == b"req-123"
        assert client.json()["request_id"] == "req-123"
        assert client.json()["detail"] == "The token expired."

    async def test_invalid_context_is_400_json_naming_the_field(self):
        """
        `InvalidContextError` from the resolver (here, a placeholder thread id
        taken from a header) answers 400 with a JSON body naming the field.
        """
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolve)
        scope = http_scope(("x-thread", "null"), ("x-request-id", "req-9"))
        await mw(scope, client.receive, client.send)

        assert client.status() == 400
        assert client.headers()[b"x-request-id"] == b"req-9"
        assert client.headers()[b"content-type"] == b"application/problem+json"
        assert b"www-authenticate" not in client.headers()
        body = client.json()
        assert body["error"] == "invalid_context"
        assert body["field"] == "thread_id"
        assert "thread_id" in body["detail"]
        assert body["request_id"] == "req-9"
        assert STATE_KEY not in scope

    @pytest.mark.parametrize(
        ("user", "thread", "status", "error"),
        [(None, "t-1", 401, "unauthenticated"), ("u-42", "null", 400, "invalid_context")],
    )
    async def test_websocket_denial_response(self, user, thread, status, error):
        """
        Where the server supports the ``websocket.http.response`` extension, a
        refused WebSocket handshake gets the same JSON denial response as HTTP.
        """
        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        scope = ws_scope(
            ("x-thread", thread),
            ("x-request-id", "ws-1"),
            user=user,
            extensions={"websocket.http.response": {}},
        )
        await UserContextMiddleware(json_app(), resolver=resolve)(
            scope, client.receive, client.send
        )

        assert [m["type"] for m in client.sent] == [
            "websocket.http.response.start",
            "websocket.http.response.body",
        ]
        assert client.status() == status
        assert client.headers()[b"x-request-id"] == b"ws-1"
        assert client.headers()[b"content-type"] == b"application/problem+json"
        assert client.json()["status"] == status
        assert client.json()["error"] == error
        assert client.json()["request_id"] == "ws-1"

    @pytest.mark.parametrize(
        ("user", "thread", "reason"),
        [(None, "t-1", "401 unauthenticated"), ("u-42", "null", "400 invalid_context")],
    )
    async def test_websocket_close_without_the_extension(self, user, thread, reason):
        """
        Without the extension, a refused WebSocket handshake is closed with
        code 1008 (policy violation) and a reason naming the status.
        """
        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        scope = ws_scope(("x-thread", thread), user=user)
        await UserContextMiddleware(json_app(), resolver=resolve)(
            scope, client.receive, client.send
        )

        assert client.sent == [{"type": "websocket.close", "code": 1008, "reason": reason}]


class TestProblemDocuments:
    @pytest.mark.parametrize(
        ("error", "status", "headers", "body"),
        [
            (
                uc.ForbiddenError("Not your workspace."),
                403,
                {},
                {"title": "Forbidden", "detail": "Not your workspace.", "error": "forbidden"},
            ),
            (
                uc.ServiceUnavailableError("The key server is down.", retry_after=2.5),
                503,
                {b"retry-after": b"3"},
                {
                    "title": "Service Unavailable",
                    "detail": "The key server is down.",
                    "error": "service_unavailable",
                    "retry_after": 3,
                },
            ),
            (
                uc.TooManyRequestsError("Slow down.", retry_after=10),
                429,
                {b"retry-after": b"10"},
                {
                    "title": "Too Many Requests",
                    "detail": "Slow down.",
                    "error": "too_many_requests",
                    "retry_after": 10,
                },
            ),
            (
                uc.RequestRefusedError(
                    "Your plan has no exports.",
                    status=402,
                    type="https://example.com/problems/plan",
                    title="Upgrade needed",
                    error="plan_limit",
                    headers={"Link": "</plans>"},
                ),
                402,
                {b"link": b"</plans>"},
                {
                    "type": "https://example.com/problems/plan",
                    "title": "Upgrade needed",
                    "detail": "Your plan has no exports.",
                    "error": "plan_limit",
                },
            ),
        ],
        ids=["403", "503", "429", "custom"],
    )
    async def test_every_refusal_of_the_family(self, error, status, headers, body):
        """
        Each refusal a resolver raises answers its status with a problem
        document (RFC 9457) in the same shape, its headers, and the request
        id; the application is not called.
        """

        def resolver(scope):
            raise error

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        scope = http_scope(("x-request-id", "req-77"))
        await mw(scope, client.receive, client.send)

        assert client.status() == status
        assert client.headers() == {
            b"content-type": b"application/problem+json",
            b"content-length": b"%d" % len(client.body()),
            **headers,
            b"x-request-id": b"req-77",
        }
        assert client.json() == {
            "type": "about:blank",
            "status": status,
            **body,
            "request_id": "req-77",
        }
        assert list(client.json())[:4] == ["type", "title", "status", "detail"]
        assert STATE_KEY not in scope

    @pytest.mark.skipif(httpx2 is None, reason="starlette is not installed")
    async def test_starlette_http_exception_is_mapped(self):
        """
        Starlette's HTTPException raised by a resolver is answered with its
        status, detail and headers in the problem shape, not a 500.
        """
        from starlette.exceptions import HTTPException

        def resolver(scope):
            raise HTTPException(403, "Suspended account.", headers={"X-Reason": "suspended"})

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(("x-request-id", "req-1")), client.receive, client.send
        )

        assert client.status() == 403
        assert client.headers()[b"x-reason"] == b"suspended"
        assert client.json() == {
            "type": "about:blank",
            "title": "Forbidden",
            "status": 403,
            "detail": "Suspended account.",
            "error": "forbidden",
            "request_id": "req-1",
        }

    @pytest.mark.skipif(httpx2 is None, reason="fastapi is not installed")
    async def test_fastapi_http_exception_with_a_json_detail(self):
        """
        FastAPI's HTTPException may carry any JSON as its detail: the problem's
        detail is then the status's phrase, and the JSON is under ``errors``.
        """
        from fastapi import HTTPException

        def resolver(scope):
            raise HTTPException(401, {"reason": "expired"}, headers={"WWW-Authenticate": "Bearer"})

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(("x-request-id", "req-2")), client.receive, client.send
        )

        assert client.status() == 401
        assert client.headers()[b"www-authenticate"] == b"Bearer"
        assert client.json() == {
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "detail": "Unauthorized",
            "error": "unauthorized",
            "errors": {"reason": "expired"},
            "request_id": "req-2",
        }

    async def test_any_http_exception_like_error_is_mapped(self):
        """
        The mapping needs no framework: any exception with an int
        ``status_code`` from 400 to 599 and a ``detail`` is a refusal, with
        or without headers.
        """

        class Refused(Exception):  # noqa: N818
            status_code = 451
            detail = "Not here."

        def resolver(scope):
            raise Refused

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert client.status() == 451
        assert client.json()["title"] == "Unavailable For Legal Reasons"
        assert client.json()["detail"] == "Not here."

    async def test_a_status_http_does_not_name(self):
        """
        A status HTTP does not name gets the title "Error" and the code
        "error".
        """

        class Refused(Exception):  # noqa: N818
            status_code = 599
            detail = "Odd."

        def resolver(scope):
            raise Refused

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert client.status() == 599
        assert (client.json()["title"], client.json()["error"]) == ("Error", "error")

    @pytest.mark.parametrize(
        "attributes",
        [
            {"status_code": 302, "detail": "x"},
            {"status_code": "401", "detail": "x"},
            {"status_code": 401},
        ],
        ids=["redirect", "str-status", "no-detail"],
    )
    async def test_other_errors_with_a_status_propagate(self, attributes):
        """
        An error whose status is not an int from 400 to 599, or without a
        detail, is not a refusal: it propagates.
        """
        error = type("Odd", (Exception,), attributes)()

        def resolver(scope):
            raise error

        client = Client()
        with pytest.raises(type(error)):
            await UserContextMiddleware(json_app(), resolver=resolver)(
                http_scope(), client.receive, client.send
            )
        assert_crash_answer(client.sent)

    async def test_crlf_in_an_http_exception_header_is_never_sent(self):
        """
        An HTTPException whose header holds CR/LF cannot be answered as it is:
        the middleware raises a ValueError naming it, and sends nothing.
        """

        class HTTPException(Exception):  # noqa: N818
            status_code = 401
            detail = "no"
            headers = {"WWW-Authenticate": "Bearer\r\nSet-Cookie: session=stolen"}  # noqa: RUF012

        def resolver(scope):
            raise HTTPException

        client = Client()
        with pytest.raises(
            ValueError, match=r"HTTPException\(headers=\.\.\.\) raised by the resolver"
        ):
            await UserContextMiddleware(json_app(), resolver=resolver)(
                http_scope(), client.receive, client.send
            )
        assert_crash_answer(client.sent)

    async def test_exception_group_of_refusals_is_its_first(self):
        """
        A resolver whose task group raises only refusals (nested groups too)
        is answered with the first of them, in the group's order.
        """

        async def resolver(scope):
            async def check_token():
                raise uc.UnauthenticatedError("The token expired.")

            async def check_plan():
                await anyio.sleep(0.01)
                raise uc.ForbiddenError("No plan.")

            async with anyio.create_task_group() as tg:
                tg.start_soon(check_token)
                tg.start_soon(check_plan)

        def nested(scope):
            raise ExceptionGroupType(
                "outer",
                [
                    ExceptionGroupType("inner", [uc.ForbiddenError("first")]),
                    uc.UnauthenticatedError("2nd"),
                ],
            )

        statuses = []
        for fn in (resolver, nested):
            client = Client()
            await UserContextMiddleware(json_app(), resolver=fn)(
                http_scope(), client.receive, client.send
            )
            statuses.append((client.status(), client.json()["detail"]))

        assert statuses == [(401, "The token expired."), (403, "first")]

    async def test_exception_group_with_another_error_propagates(self):
        """
        A group holding a refusal and any other error propagates unchanged:
        the other error is a bug to see, not a refusal.
        """
        group = ExceptionGroupType("both", [uc.UnauthenticatedError(), RuntimeError("db down")])

        def resolver(scope):
            raise group

        client = Client()
        with pytest.raises(ExceptionGroupType) as e:
            await UserContextMiddleware(json_app(), resolver=resolver)(
                http_scope(), client.receive, client.send
            )
        assert e.value is group
        assert_crash_answer(client.sent)

    @pytest.mark.parametrize(
        ("error", "code", "reason"),
        [
            (uc.ForbiddenError(), 1008, "403 forbidden"),
            (uc.TooManyRequestsError(retry_after=1), 1013, "429 too_many_requests"),
            (uc.ServiceUnavailableError(), 1013, "503 service_unavailable"),
            (uc.RequestRefusedError("x", status=500, error="e" * 200), 1011, "500 " + "e" * 119),
        ],
        ids=["403", "429", "503", "500-long"],
    )
    async def test_websocket_close_codes(self, error, code, reason):
        """
        Without denial responses, a refused handshake is closed with 1008 for
        a client error, 1013 (try again later) for 429 and 503, and 1011 for
        another server error; the reason fits a close frame (123 bytes).
        """

        def resolver(scope):
            raise error

        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        await UserContextMiddleware(json_app(), resolver=resolver)(
            ws_scope(), client.receive, client.send
        )

        assert client.sent == [{"type": "websocket.close", "code": code, "reason": reason}]
        assert len(reason.encode()) <= 123

    async def test_websocket_denial_of_a_403(self):
        """
        With denial responses, a WebSocket handshake gets the same problem
        document as HTTP.
        """

        def resolver(scope):
            raise uc.ForbiddenError("Not your room.")

        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        scope = ws_scope(("x-request-id", "ws-9"), extensions={"websocket.http.response": {}})
        await UserContextMiddleware(json_app(), resolver=resolver)(
            scope, client.receive, client.send
        )

        assert client.status() == 403
        assert client.json()["detail"] == "Not your room."
        assert client.json()["request_id"] == "ws-9"


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
        assert registry.stats().scopes_opened == 0

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


class TestRequestIdPolicy:
    @pytest.mark.parametrize("incoming", ["null", "-", "undefined", "None"])
    async def test_refusal_replaces_what_an_accepted_request_replaces(self, incoming):
        """
        A refusal applies the same rules as an accepted request: an id that
        breaks the library's rules (placeholders such as ``null`` and ``-``)
        is replaced in both, never echoed.
        """
        accepted, refused = Client(), Client()
        mw = UserContextMiddleware(json_app(), resolver=resolve)
        await mw(http_scope(("x-request-id", incoming)), accepted.receive, accepted.send)
        await mw(http_scope(("x-request-id", incoming), user=None), refused.receive, refused.send)

        for client in (accepted, refused):
            (sent,) = client.header_values(b"x-request-id")
            assert sent != incoming.encode()
            assert len(sent) == 32
        assert refused.json()["request_id"] == refused.headers()[b"x-request-id"].decode()

    async def test_never_trust(self):
        """
        With ``trust_request_id=False`` the client's id is never taken: the
        accepted request keeps its context's id, a refusal gets a new one.
        """
        resolved = []

        def resolver(scope):
            resolved.append(resolve(scope))
            return resolved[-1]

        mw = UserContextMiddleware(json_app(), resolver=resolver, trust_request_id=False)
        accepted, refused = Client(), Client()
        await mw(http_scope(("x-request-id", "req-1")), accepted.receive, accepted.send)
        await mw(http_scope(("x-request-id", "req-2"), user=None), refused.receive, refused.send)

        assert accepted.json()["request_id"] == resolved[0].request_id
        assert accepted.header_values(b"x-request-id") == [resolved[0].request_id.encode()]
        assert refused.header_values(b"x-request-id") != [b"req-2"]
        assert mw.trust_request_id is False

    async def test_validate_with_a_callable(self):
        """
        A callable decides which valid ids to take, for accepted and refused
        requests alike; it sees only ids of 1 to 128 visible ASCII characters.
        """
        asked = []

        def ours(request_id):
            asked.append(request_id)
            return request_id.startswith("edge-")

        mw = UserContextMiddleware(json_app(), resolver=resolve, trust_request_id=ours)
        sent = {}
        for incoming, user in [
            ("edge-1", "u-1"),
            ("evil-1", "u-1"),
            ("edge-2", None),
            ("evil-2", None),
            ("edge 3", "u-1"),
        ]:
            client = Client()
            await mw(http_scope(("x-request-id", incoming), user=user), client.receive, client.send)
            sent[incoming] = client.header_values(b"x-request-id")[0].decode()

        assert sent["edge-1"] == "edge-1"
        assert sent["edge-2"] == "edge-2"
        assert sent["evil-1"] != "evil-1"
        assert sent["evil-2"] != "evil-2"
        assert sent["edge 3"] != "edge 3"
        assert asked == ["edge-1", "evil-1", "edge-2", "evil-2"]

    async def test_custom_generator(self):
        """
        *request_id_factory* makes the id of every request whose client sent
        none: accepted (the context takes it), refused and anonymous alike.
        """
        made = iter(f"gen-{n}" for n in range(10))
        mw = UserContextMiddleware(
            json_app(),
            resolver=resolve,
            request_id_factory=lambda: next(made),
            exempt=("/health",),
        )
        ids = []
        for scope in [
            http_scope(),
            http_scope(user=None),
            {**http_scope(), "path": "/health"},
            http_scope(("x-request-id", "req-client")),
        ]:
            client = Client()
            await mw(scope, client.receive, client.send)
            ids.append(client.header_values(b"x-request-id")[0].decode())

        assert ids == ["gen-0", "gen-1", "gen-2", "req-client"]

    async def test_generator_returning_a_bad_id(self):
        """
        A generated id goes into a header: one that is not 1 to 128 visible
        ASCII characters is a ValueError naming the factory.
        """

        def make_id():
            return "has space"

        mw = UserContextMiddleware(json_app(), resolver=resolve, request_id_factory=make_id)
        with pytest.raises(ValueError, match=r"request_id_factory 'TestRequestIdPolicy"):
            await mw(http_scope(), Client().receive, Client().send)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"trust_request_id": "yes"}, r"^trust_request_id must be True, False, or a function"),
            ({"request_id_factory": "uuid4"}, r"^request_id_factory must be a function"),
        ],
    )
    def test_bad_policy(self, kwargs, match):
        """
        The policy arguments are checked at construction.
        """
        with pytest.raises(TypeError, match=match):
            UserContextMiddleware(json_app(), resolver=resolve, **kwargs)


class TestRefusedRequestsInTheLogs:
    @pytest.fixture(name="records")
    def _records(self):
        """
        Records of the ``resolver`` and ``usercontext.asgi`` loggers, through
        a `ContextFilter` on the handler.
        """
        from usercontext.stdlib import ContextFilter

        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)

        handler = Keep()
        handler.addFilter(ContextFilter())
        loggers = [logging.getLogger("resolver"), logging.getLogger("usercontext.asgi")]
        for log in loggers:
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        yield records
        for log in loggers:
            log.removeHandler(handler)
            log.setLevel(logging.NOTSET)

    @pytest.mark.parametrize("in_thread", [False, True], ids=["inline", "thread"])
    async def test_refused_request_is_found_by_its_id(self, records, in_thread):
        """
        While a request is resolved and refused, no user is known, but the
        records of the resolver and the middleware's refusal line carry the
        request id the client gets back.
        """

        def resolver(scope):
            logging.getLogger("resolver").warning("checking the token")
            return resolve(scope)

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver, resolver_in_thread=in_thread)
        await mw(http_scope(user=None), client.receive, client.send)

        request_id = client.headers()[b"x-request-id"].decode()
        assert [(r.getMessage(), r.request_id, r.user_id) for r in records] == [
            ("checking the token", request_id, "-"),
            ("Refused GET /: 401 Send an x-user header.", request_id, "-"),
        ]

    async def test_client_id_in_the_logs(self, records):
        """
        A valid id the client sent is the one in the records.
        """
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolve)
        await mw(http_scope(("x-request-id", "req-5"), user=None), client.receive, client.send)

        assert [r.request_id for r in records] == ["req-5"]

    async def test_accepted_request_keeps_the_id_its_resolver_logged(self, records):
        """
        When the resolver of an accepted request logged before any id was
        known, the request takes the id those records carry.
        """

        def resolver(scope):
            logging.getLogger("resolver").warning("looking the user up")
            return resolve(scope)

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert [r.request_id for r in records] == [client.json()["request_id"]]

    async def test_the_server_never_sees_the_pending_id(self):
        """
        The pending id is set only while the resolver runs: the server's
        ``send`` of a refusal, and the application of an anonymous request,
        run without it, so the server cannot carry it to another request.
        """
        import usercontext.stdlib  # noqa: F401  # a logging adapter: the id is pending

        from usercontext._pending import pending

        seen = []

        class Watching(Client):
            async def send(self, message):
                seen.append(pending.get(None))
                await super().send(message)

        async def app(scope, receive, send):
            seen.append(pending.get(None))
            await json_app(payload={"ok": 1})(scope, receive, send)

        def resolver(scope):
            seen.append(pending.get(None).get())
            return None if dict(scope["headers"]).get(b"x-user") == b"anon" else resolve(scope)

        mw = UserContextMiddleware(app, resolver=resolver)
        for user in (None, "anon"):
            client = Watching()
            await mw(http_scope(user=user), client.receive, client.send)

        assert [type(s).__name__ for s in seen] == ["str", "NoneType", "NoneType", "str"] + [
            "NoneType"
        ] * 3

    async def test_without_a_logging_adapter_nothing_is_set(self, monkeypatch):
        """
        Only the logging adapters read the pending id: with none loaded, the
        middleware sets nothing while resolving, and refusals, anonymous and
        generated ids work the same.
        """
        from usercontext import _pending

        monkeypatch.setattr(_pending, "readers", [])
        monkeypatch.setattr("usercontext.asgi.readers", _pending.readers)
        seen = []

        def resolver(scope):
            seen.append(_pending.pending.get(None))
            headers = dict(scope["headers"])
            return None if headers.get(b"x-user") == b"anon" else resolve(scope)

        made = iter(["gen-1", "gen-2", "gen-3"])
        mw = UserContextMiddleware(
            json_app(), resolver=resolver, request_id_factory=lambda: next(made)
        )
        ids = []
        for user in (None, "anon", "u-1"):
            client = Client()
            await mw(http_scope(user=user), client.receive, client.send)
            ids.append((client.status(), client.header_values(b"x-request-id")[0]))

        assert seen == [None, None, None]
        assert ids == [(401, b"gen-1"), (200, b"gen-2"), (200, b"gen-3")]


# -- request ids -------------------------------------------------------------


class TestRequestId:
    @pytest.mark.parametrize(
        ("incoming", "reused"),
        [
            (b"req-123", True),
            (b"01J9Z3K4-abc_DEF.~!", True),
            (b"r" * 128, True),
            (b"r" * 129, False),
            ("café".encode(), False),
            (b"a b", False),
            (b" req-1", False),
            (b"", False),
            (b"null", False),  # valid ASCII, but a placeholder under the library's rules
        ],
        ids=[
            "simple",
            "punctuation",
            "128",
            "too-long",
            "non-ascii",
            "space",
            "leading-space",
            "empty",
            "placeholder",
        ],
    )
    async def test_incoming_id_reused_when_valid(self, incoming, reused):
        """
        A request id the client sent is the context's request id when it is 1
        to 128 visible ASCII characters that the library accepts, and is
        replaced by the resolver's otherwise. The response carries the id in
        use, once.
        """
        resolved = []

        def resolver(scope):
            resolved.append(resolve(scope))
            return resolved[-1]

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        await mw(http_scope(("x-request-id", incoming)), client.receive, client.send)

        expected = incoming.decode() if reused else resolved[0].request_id
        assert client.json()["request_id"] == expected
        assert client.header_values(b"x-request-id") == [expected.encode()]

    async def test_id_the_resolver_already_uses(self):
        """
        A resolver may take the request id from the header itself; the context
        is then used as it is.
        """
        resolved = []

        def resolver(scope):
            ctx = resolve(scope).evolve(request_id=dict(scope["headers"])[b"x-request-id"].decode())
            resolved.append(ctx)
            return ctx

        seen = []

        async def app(scope, receive, send):
            seen.append(uc.current())
            await json_app()(scope, receive, send)

        client = Client()
        await UserContextMiddleware(app, resolver=resolver)(
            http_scope(("x-request-id", "req-5")), client.receive, client.send
        )

        assert seen == resolved
        assert seen[0] is resolved[0]
        assert client.header_values(b"x-request-id") == [b"req-5"]

    async def test_custom_header_both_ways(self):
        """
        *request_id_header* names the header read from the request and written
        to the response, in any case.
        """
        client = Client()
        mw = UserContextMiddleware(
            json_app(), resolver=resolve, request_id_header="X-Correlation-ID"
        )
        scope = http_scope(("x-request-id", "ignored"), ("x-correlation-id", "corr-1"))
        await mw(scope, client.receive, client.send)

        assert client.json()["request_id"] == "corr-1"
        assert client.header_values(b"x-correlation-id") == [b"corr-1"]
        assert client.header_values(b"x-request-id") == []

    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_header_not_duplicated_when_the_app_sets_it(self, with_registry):
        """
        When the application sets the header itself (in any case), its value
        is kept and not repeated.
        """

        async def app(scope, receive, send):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"X-Request-ID", b"app-chosen")],
                }
            )
            await send({"type": "http.response.body", "body": b"ok"})

        client = Client()
        registry = uc.Registry() if with_registry else None
        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert client.start()["headers"] == [(b"X-Request-ID", b"app-chosen")]

    @pytest.mark.parametrize("with_registry", [False, True], ids=["plain", "registry"])
    async def test_header_added_to_any_headers(self, with_registry):
        """
        The header is added to a start message without headers, and to headers
        given as any iterable (a generator here), which are all kept.
        """
        starts = [
            {"type": "http.response.start", "status": 200},
            {
                "type": "http.response.start",
                "status": 200,
                "headers": (pair for pair in [(b"x-a", b"1"), (b"x-b", b"2")]),
            },
        ]
        results = []
        for start in starts:

            async def app(scope, receive, send, start=start):
                await send(start)
                await send({"type": "http.response.body", "body": b"ok"})

            client = Client()
            registry = uc.Registry() if with_registry else None
            mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
            await mw(http_scope(("x-request-id", "req-1")), client.receive, client.send)
            results.append(list(client.start()["headers"]))

        assert results == [
            [(b"x-request-id", b"req-1")],
            [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-request-id", b"req-1")],
        ]

    async def test_non_ascii_id_from_the_resolver(self):
        """
        A request id the resolver made with non-ASCII characters is sent
        backslash-escaped, as a header must be ASCII.
        """

        def resolver(scope):
            return resolve(scope).evolve(request_id="req-é")

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert client.header_values(b"x-request-id") == [b"req-\\xe9"]


# -- the Context of each request ---------------------------------------------


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
        assert registry.stats().scopes_open == 0
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


# -- the scope of an HTTP request --------------------------------------------


class TestHTTPScope:
    async def test_one_message_response_is_held_until_cleanup(self):
        """
        A response with a Content-Length is held until its body arrives; the
        scope is closed (committed) first, then start and body are sent.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)
        mw = UserContextMiddleware(json_app(log), resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        body = client.body()
        assert log == [
            "open u-42 depth=0",
            "app sends",
            "commit depth=0",
            "sent http.response.start 200",
            f"sent body {body!r}",
        ]
        assert client.headers()[b"content-length"] == b"%d" % len(body)
        stats = registry.stats()
        assert (stats.scopes_open, stats.scopes_opened, stats.cleanup_errors) == (0, 1, 0)

    async def test_failed_cleanup_turns_it_into_500(self, caplog):
        """
        When the held response's cleanup fails (a commit), the client gets a
        500 ``cleanup_failed`` JSON response instead, and none of the original
        bytes; the failure is logged with the request id.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        client = Client(log=log)
        mw = UserContextMiddleware(
            json_app(log, payload={"secret": "of the original"}),
            resolver=resolve,
            registry=registry,
        )
        await mw(http_scope(("x-request-id", "req-fail")), client.receive, client.send)

        assert client.status() == 500
        assert client.headers() == {
            b"content-type": b"application/problem+json",
            b"content-length": b"%d" % len(client.body()),
            b"x-request-id": b"req-fail",
        }
        assert client.json() == {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "error": "cleanup_failed",
            "detail": "The request's resources could not be cleaned up (a commit may have "
            "failed); its changes may not have been saved.",
            "request_id": "req-fail",
        }
        assert b"secret" not in client.body()
        assert log[:3] == ["open u-42 depth=0", "app sends", "commit depth=0"]
        assert registry.stats().cleanup_errors == 1
        assert registry.stats().scopes_open == 0
        messages = [r.getMessage() for r in caplog.records if r.name == "usercontext.asgi"]
        assert len(messages) == 1
        assert messages[0].startswith("The resources of request req-fail were not all cleaned up")

    @pytest.mark.parametrize("status", [204, 304])
    async def test_bodiless_response_is_held_too(self, status):
        """
        A 204 or 304 response has no Content-Length (Starlette sends none) but
        no body either: it is held like any one-message response, so a failed
        commit behind it still turns it into a 500.
        """

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        for fail_commit, expected in [(False, status), (True, 500)]:
            log = []
            client = Client(log=log)
            registry = session_registry(log, fail_commit=fail_commit)
            mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
            await mw(http_scope(), client.receive, client.send)

            assert client.status() == expected
            assert log.index("commit depth=0") < log.index(f"sent http.response.start {expected}")

    async def test_streaming_response_is_forwarded_and_closes_before_the_last_message(self):
        """
        A response without a Content-Length is forwarded at once, chunk by
        chunk; every chunk is produced with the request's context bound and
        its session open, and the scope is closed when the application gives
        the last message, before the server gets it.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            resources = request_state(scope).resources
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(3):
                session = await resources.aget(Session)
                assert session.ctx is uc.current()
                log.append(f"chunk {i} for {uc.current().user_id}")
                await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "sent http.response.start 200",
            "open u-42 depth=0",
            "chunk 0 for u-42",
            "sent body b'0'",
            "chunk 1 for u-42",
            "sent body b'1'",
            "chunk 2 for u-42",
            "sent body b'2'",
            "commit depth=0",
            "sent body b''",
        ]
        assert client.body() == b"012"

    @pytest.mark.parametrize("chunks", [0, 2])
    async def test_streaming_cleanup_failure_cuts_the_response(self, caplog, chunks):
        """
        A cleanup that fails after a streaming response's headers went out
        keeps its last message from the server, and raises into the
        application's ``send``, and out of the middleware, so that the server
        drops the connection: the client never sees the response complete.
        The failure is logged with the request id.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        client = Client(log=log)
        raised = []

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(chunks):
                await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            try:
                await send({"type": "http.response.body", "body": b"the end"})
            except BaseException as e:
                raised.append(e)
                raise

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(RuntimeError, match=r"^The resources of request req-s were not") as e:
            await mw(http_scope(("x-request-id", "req-s")), client.receive, client.send)

        assert raised == [e.value]
        assert "1 cleanup(s) of a scope of user 'u-42' failed" in str(e.value.__cause__)
        assert "the response was cut short" in str(e.value)
        assert client.status() == 200
        assert client.body() == b"01"[:chunks]
        assert all(m.get("more_body", True) for m in client.sent)  # never complete
        assert log[-1] == "commit depth=0"
        messages = [r.getMessage() for r in caplog.records if r.name == "usercontext.asgi"]
        assert len(messages) == 1
        assert "req-s" in messages[0]
        assert registry.stats().scopes_open == 0

    async def test_application_catching_the_cut(self):
        """
        An application that catches the error raised into its last ``send``
        and returns still gets the server to drop the connection: the
        middleware raises the error again.
        """
        registry = session_registry([], fail_commit=True)
        client = Client()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            with pytest.raises(RuntimeError):
                await send({"type": "http.response.body", "body": b"the end"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(RuntimeError, match="the response was cut short"):
            await mw(http_scope(), client.receive, client.send)

        assert [m["type"] for m in client.sent] == ["http.response.start"]

    async def test_content_length_body_in_several_chunks(self):
        """
        A Content-Length response whose body comes in several messages (a file)
        is released with its first chunk, and the scope closes before the
        last chunk is sent.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"abcd"))
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"cd", "more_body": False})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'ab'",
            "commit depth=0",
            "sent body b'cd'",
        ]

    async def test_content_length_body_in_several_chunks_cut(self):
        """
        When the cleanup of a Content-Length response whose body comes in
        several messages fails, its last chunk is never sent, and the error
        raised makes the server drop the connection: the client has fewer
        bytes than the Content-Length announced.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"abcdef"))
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"cd", "more_body": True})
            await send({"type": "http.response.body", "body": b"ef"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(RuntimeError, match="the response was cut short"):
            await mw(http_scope(), client.receive, client.send)

        assert client.headers()[b"content-length"] == b"6"
        assert client.body() == b"abcd"
        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'ab'",
            "sent body b'cd'",
            "commit depth=0",
        ]

    async def test_pathsend(self):
        """
        An ``http.response.pathsend`` message ends a held response like a final
        body: the scope is closed, then start and pathsend are sent.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"x" * 10))
            await send({"type": "http.response.pathsend", "path": "/srv/report.pdf"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(extensions={"http.response.pathsend": {}}), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "commit depth=0",
            "sent http.response.start 200",
            "sent http.response.pathsend",
        ]

    async def test_other_messages_pass_through(self):
        """
        Messages of other types (a debug message before the start, trailers
        after the body) are forwarded as they come, and do not end the
        response.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.debug", "info": {}})
            await send({**json_start(b"{}"), "trailers": True})
            await send({"type": "http.response.body", "body": b"{}"})
            await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "sent http.response.debug",
            "commit depth=0",
            "sent http.response.start 200",
            "sent body b'{}'",
            "sent http.response.trailers",
        ]

    async def test_without_a_registry_nothing_is_held(self):
        """
        Without a registry there is nothing to clean up: the response is
        forwarded as it comes.
        """
        client = Client()
        order = []

        async def app(scope, receive, send):
            await send(json_start(b"{}"))
            order.append(len(client.sent))
            await send({"type": "http.response.body", "body": b"{}"})

        await UserContextMiddleware(app, resolver=resolve)(
            http_scope(), client.receive, client.send
        )

        assert order == [1]
        assert client.body() == b"{}"


class TestHTTPFailures:
    async def test_disconnect_mid_stream_rolls_back(self):
        """
        When the client disconnects before a streaming response is complete
        (``receive`` returns ``http.disconnect``), the scope is closed as
        failed: the session sees a ConnectionError and rolls back.
        """
        log = []
        errors = []
        registry = uc.Registry()

        def session(ctx):
            try:
                yield Session(ctx)
            except BaseException as e:
                errors.append(e)
                raise

        registry.register(Session, session)
        client = Client()

        async def app(scope, receive, send):  # streams until the client leaves, as Starlette does
            await request_state(scope).resources.aget(Session)

            async def listen():
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            async def stream():
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for i in range(1000):
                    await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
                    log.append(i)
                    await anyio.sleep(0.001)

            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                tg.start_soon(stream)

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope(), client.receive, client.send)
            await _until(lambda: len(log) >= 2)
            client.gone.set()

        assert 2 <= len(log) < 1000
        [error] = errors
        assert isinstance(error, ConnectionError)
        assert str(error) == DISCONNECTED
        assert client.sent[-1]["more_body"] is True
        assert registry.stats().scopes_open == 0

    async def test_send_raising_oserror(self):
        """
        When ``send`` raises OSError (the client is gone, ASGI 2.4), the scope
        is closed with that error (the session rolls back) and the error
        reaches the server.
        """
        log = []
        registry = session_registry(log)
        client = Client()
        client.fail_after = 2

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(5):
                await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b""})  # never reached

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(OSError, match="broken pipe"):
            await mw(http_scope(), client.receive, client.send)

        assert log == ["open u-42 depth=0", "rollback OSError"]
        assert len(client.sent) == 2
        assert registry.stats().scopes_open == 0

    async def test_send_cancelled_rolls_back(self):
        """
        When a pending ``send`` is cancelled (the application stops streaming
        because the client left), the scope is closed as failed.
        """
        log = []
        registry = session_registry(log)
        blocked = anyio.Event()

        class SlowClient(Client):
            async def send(self, message):
                await super().send(message)
                if message.get("body") == b"1":
                    blocked.set()
                    await anyio.sleep_forever()

        client = SlowClient()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            with anyio.move_on_after(0.05):  # stands for a disconnect watcher
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for i in range(5):
                    await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert blocked.is_set()
        assert log[0] == "open u-42 depth=0"
        assert log[1].startswith("rollback ")
        assert log[1] != "rollback _DisconnectedError"
        assert registry.stats().scopes_open == 0

    async def test_disconnect_after_the_last_chunk_is_not_a_failure(self):
        """
        A server may report the disconnect that follows a complete response
        before its send of the last chunk has returned (Starlette's
        TestClient on trio does): the response was complete, so the scope
        still commits.
        """
        log = []
        registry = session_registry(log)
        heard = anyio.Event()

        class HangingUpClient(Client):
            async def send(self, message):
                await super().send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    self.gone.set()  # the client has it all, and hangs up
                    with anyio.fail_after(5):
                        await heard.wait()  # the disconnect is seen before this send returns

        client = HangingUpClient(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)

            async def listen():
                while (await receive())["type"] != "http.disconnect":
                    pass
                heard.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"a", "more_body": True})
                await send({"type": "http.response.body", "body": b"b"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'a'",
            "commit depth=0",
            "sent body b'b'",
        ]

    async def test_disconnect_before_a_held_response_rolls_back(self):
        """
        A client that left before a held response was complete makes the
        scope close as failed; the response is still passed to the server.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)
        client.gone.set()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            assert (await receive())["type"] == "http.request"
            assert (await receive())["type"] == "http.disconnect"
            await json_app(log)(scope, receive, send)

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log[:3] == ["open u-42 depth=0", "app sends", "rollback _DisconnectedError"]
        assert client.status() == 200

    @pytest.mark.parametrize("after_start", [False, True], ids=["before-start", "held-start"])
    async def test_app_raising_closes_the_scope_with_its_error(self, after_start):
        """
        An application that raises closes the scope with its exception (the
        session rolls back); a held response start is dropped, the client gets
        a JSON 500 carrying the request id instead, and the exception then
        propagates unchanged, for the server to log.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            if after_start:
                await send(json_start(b"{}"))
            raise ValueError("the endpoint failed")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(ValueError, match="the endpoint failed"):
            await mw(http_scope(("x-request-id", "req-f")), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "rollback ValueError",
            "sent http.response.start 500",
            "sent body " + repr(client.body()),
        ]
        assert client.header_values(b"x-request-id") == [b"req-f"]
        assert client.headers()[b"content-type"] == b"application/problem+json"
        assert client.json()["request_id"] == "req-f"
        assert "ValueError" not in client.body().decode()  # nothing of the error itself
        assert registry.stats().scopes_open == 0

    async def test_app_raising_after_its_response(self):
        """
        An application that raises after its response was complete (background
        work failing) gets its exception propagated; the scope was closed once,
        when the response ended.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await json_app()(scope, receive, send)
            raise LookupError("the background work failed")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(LookupError):
            await mw(http_scope(), client.receive, client.send)

        assert log[:2] == ["open u-42 depth=0", "commit depth=0"]
        assert client.status() == 200
        assert registry.stats().scopes_opened == 1

    async def test_app_returning_without_a_response(self):
        """
        An application that returns without sending anything has its scope
        closed when it returns; nothing is sent for it.
        """
        log = []
        registry = session_registry(log)
        client = Client()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)

        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        assert log == ["open u-42 depth=0", "commit depth=0"]
        assert client.sent == []

    async def test_app_returning_after_a_partial_stream(self):
        """
        An application that returns in the middle of a streaming response has
        its scope closed when it returns.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})

        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'part'",
            "commit depth=0",
        ]

    @pytest.mark.parametrize(("fail_commit", "status"), [(False, 200), (True, 500)])
    async def test_app_returning_with_a_held_start(self, fail_commit, status):
        """
        An application that returns after a held response start but before its
        body has its scope closed, then the start passed on; or, if the
        cleanup failed, the 500 ``cleanup_failed`` response instead.
        """
        log = []
        registry = session_registry(log, fail_commit=fail_commit)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"{}"))

        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        assert log[:2] == ["open u-42 depth=0", "commit depth=0"]
        assert client.status() == status
        assert client.sent[0]["type"] == "http.response.start"


# -- WebSockets --------------------------------------------------------------


def ws_client(*texts, log=None):
    messages = [{"type": "websocket.connect"}]
    messages += [{"type": "websocket.receive", "text": text} for text in texts]
    messages.append({"type": "websocket.disconnect", "code": 1000})
    return Client(messages, log=log, disconnect="websocket.disconnect")


async def echo_app(scope, receive, send):
    """
    A WebSocket application echoing each text with the user of the session it
    got from its scope.
    """
    resources = request_state(scope).resources
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        who = uc.current().user_id
        if resources is not None:
            session = await resources.aget(Session)
            who = f"{who} {id(session)}"
        await send({"type": "websocket.send", "text": f"{message['text']} {who}"})


class TestWebSocket:
    async def test_scope_lives_as_long_as_the_connection(self):
        """
        A WebSocket's scope is open from the handshake until the connection
        ends: every message gets the same session, committed after the
        disconnect. The accept carries the request id.
        """
        log = []
        registry = session_registry(log)
        client = ws_client("a", "b", log=log)
        mw = UserContextMiddleware(echo_app, resolver=resolve, registry=registry)
        await mw(ws_scope(("x-request-id", "ws-7")), client.receive, client.send)

        texts = [m["text"] for m in client.sent if m["type"] == "websocket.send"]
        assert len(texts) == 2
        assert texts[0].startswith("a u-42 ")
        assert texts[1].startswith("b u-42 ")
        assert texts[0].split()[-1] == texts[1].split()[-1]  # one session for the connection
        assert client.sent[0] == {
            "type": "websocket.accept",
            "headers": [(b"x-request-id", b"ws-7")],
        }
        assert log == [
            "sent websocket.accept",
            "open u-42 depth=0",
            "sent websocket.send",
            "sent websocket.send",
            "commit depth=0",
        ]

    async def test_without_a_registry(self):
        """
        Without a registry, the context is bound for the connection and the
        accept carries the request id.
        """
        client = ws_client("hi")
        await UserContextMiddleware(echo_app, resolver=resolve)(
            ws_scope(("x-request-id", "ws-8")), client.receive, client.send
        )

        assert client.sent == [
            {"type": "websocket.accept", "headers": [(b"x-request-id", b"ws-8")]},
            {"type": "websocket.send", "text": "hi u-42"},
        ]

    async def test_denial_response_of_the_app_carries_the_id(self):
        """
        A denial response the application sends itself carries the request id
        too.
        """

        async def app(scope, receive, send):
            await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
            await send({"type": "websocket.http.response.body", "body": b"no"})

        client = ws_client()
        scope = ws_scope(("x-request-id", "ws-9"), extensions={"websocket.http.response": {}})
        await UserContextMiddleware(app, resolver=resolve)(scope, client.receive, client.send)

        assert client.headers() == {b"x-request-id": b"ws-9"}

    async def test_app_raising(self):
        """
        A WebSocket application that raises has its scope closed with the
        exception, which propagates.
        """
        log = []
        registry = session_registry(log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            raise KeyError("boom")

        client = ws_client()
        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(KeyError):
            await mw(ws_scope(), client.receive, client.send)

        assert log == ["open u-42 depth=0", "rollback KeyError"]

    async def test_cleanup_failure_is_logged(self, caplog):
        """
        A cleanup that fails when the connection has ended is logged with the
        request id, as for an HTTP response already sent; nothing is raised.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        client = ws_client("a")
        mw = UserContextMiddleware(echo_app, resolver=resolve, registry=registry)
        with caplog.at_level(logging.ERROR):
            await mw(ws_scope(("x-request-id", "req-ws")), client.receive, client.send)

        messages = [r.getMessage() for r in caplog.records]
        assert "A cleanup of a scope of user 'u-42' failed: OSError: the commit failed" in messages
        assert any(m.startswith("The resources of request req-ws were not all") for m in messages)
        assert registry.stats().scopes_open == 0


# -- RequestState and request_state -----------------------------------------


class TestRequestState:
    async def test_emitter_from_the_hub(self):
        """
        `RequestState.emitter` is the hub's emitter for the request's context:
        its events go to the request's user, with the request's ids.
        """
        sink = RecordingSink()
        async with uc.EmitterHub() as hub:
            hub.attach("u-42", sink)

            async def app(scope, receive, send):
                state = request_state(scope)
                assert state.hub is hub
                await state.emitter.emit(uc.TOOL_EXECUTING, {"tool": "search"})
                await json_app()(scope, receive, send)

            client = Client()
            mw = UserContextMiddleware(app, resolver=resolve, hub=hub)
            await mw(http_scope(("x-request-id", "req-e")), client.receive, client.send)
            with anyio.fail_after(5):
                await sink.wait_for(1)

        [event] = sink.events
        assert (event.type, event.user_id, event.request_id) == (
            "tool_executing",
            "u-42",
            "req-e",
        )
        assert event.data["tool"] == "search"

    def test_emitter_without_a_hub(self, ctx):
        """
        Without a hub, `RequestState.emitter` raises a LookupError saying how
        to pass one.
        """
        state = RequestState(ctx, None, None)
        with pytest.raises(LookupError) as e:
            state.emitter  # noqa: B018  # the property raises

        assert str(e.value) == (
            "UserContextMiddleware was given no hub: pass hub=EmitterHub(...) to it."
        )

    def test_repr(self, ctx):
        """
        The repr names the user and the request.
        """
        assert repr(RequestState(ctx, None, None)) == (
            f"<usercontext.asgi.RequestState(user_id='u-42', request_id={ctx.request_id!r})>"
        )

    def test_request_state_outside_the_middleware(self):
        """
        `request_state` on a scope that did not pass through the middleware
        raises NoContextError, saying how to add it.
        """
        with pytest.raises(uc.NoContextError) as e:
            request_state({"type": "http"})

        assert str(e.value) == (
            "This request did not pass through usercontext.asgi.UserContextMiddleware. Add it "
            "around the application: app.add_middleware(UserContextMiddleware, resolver=...) or "
            "UserContextMiddleware(app, resolver=...)."
        )
        assert e.value.__cause__ is None
        assert e.value.__suppress_context__


# -- work that outlives the response -----------------------------------------


class TestInChildScope:
    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    async def test_background_work_runs_under_a_child(self, is_async, with_registry):
        """
        Work wrapped while the request runs and called after its response (as
        Starlette runs BackgroundTasks: a sync function in a worker thread)
        runs under a child context: the same user, depth 1, the request as its
        parent; given a registry, in a scope of its own, opened after the
        request's scope was closed.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        def work(*args):
            *scope, label = args  # given a registry, the child's scope comes first
            ctx = uc.current()
            assert [s.ctx for s in scope] == ([ctx] if with_registry else [])
            log.append(
                (label, ctx.user_id, ctx.depth, ctx.parent_request_id, registry.stats().scopes_open)
            )
            return ctx

        async def awork(*args):
            await anyio.lowlevel.checkpoint()
            return work(*args)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            later = in_child_scope(
                awork if is_async else work, registry=registry if with_registry else None
            )
            await json_app(log)(scope, receive, send)
            if is_async:
                child = await later("later")
            else:
                child = await anyio.to_thread.run_sync(later, "later")
            log.append(child is not uc.current())

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(("x-request-id", "req-bg")), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "app sends",
            "commit depth=0",
            "sent http.response.start 200",
            f"sent body {client.body()!r}",
            ("later", "u-42", 1, "req-bg", 1 if with_registry else 0),
            True,  # the request's context is bound again afterwards
        ]
        stats = registry.stats()
        assert (stats.scopes_open, stats.scopes_opened) == (0, 2 if with_registry else 1)

    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    async def test_work_opens_resources_of_its_own(self, is_async):
        """
        The request's resources are closed when the work runs; the work opens
        a scope of the registry for its child context and gets a session of
        its own, committed when it is done.
        """
        log = []
        registry = session_registry(log)
        got = []

        def work():
            with registry.scope() as scope:
                got.append(scope.get(Session))

        async def awork(request_resources):
            with pytest.raises(uc.ScopeClosedError):
                await request_resources.aget(Session)
            async with registry.scope() as scope:
                got.append(await scope.aget(Session))

        async def app(scope, receive, send):
            resources = request_state(scope).resources
            got.append(await resources.aget(Session))
            later = in_child_scope(awork if is_async else work)
            await json_app()(scope, receive, send)
            if is_async:
                await later(resources)
            else:
                await anyio.to_thread.run_sync(later)

        client = Client()
        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        request_session, work_session = got
        assert work_session is not request_session
        assert work_session.ctx.parent_request_id == request_session.ctx.request_id
        assert log == [
            "open u-42 depth=0",
            "commit depth=0",
            "open u-42 depth=1",
            "commit depth=1",
        ]

    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    async def test_spawned_task(self, is_async, with_registry):
        """
        Work that a request spawns into a longer-lived task group, and that
        runs after the response, runs under a child context (in a scope of its
        own, given a registry), after the request's scope was closed.
        """
        log = []
        registry = session_registry(log)
        response_sent = anyio.Event()
        done = []

        def work(*scope):
            ctx = uc.current()
            assert [s.ctx for s in scope] == ([ctx] if with_registry else [])
            done.append(
                (ctx.user_id, ctx.depth, ctx.parent_request_id, registry.stats().scopes_open)
            )

        async def awork(*scope):
            await anyio.lowlevel.checkpoint()
            work(*scope)

        async def spawned(later):
            await response_sent.wait()
            if is_async:
                await later()
            else:
                await anyio.to_thread.run_sync(later)

        async with anyio.create_task_group() as server:

            async def app(scope, receive, send):
                await request_state(scope).resources.aget(Session)
                later = in_child_scope(
                    awork if is_async else work, registry=registry if with_registry else None
                )
                server.start_soon(spawned, later)
                await json_app()(scope, receive, send)

            client = Client()
            mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
            await mw(http_scope(("x-request-id", "req-t")), client.receive, client.send)
            assert log == ["open u-42 depth=0", "commit depth=0"]
            assert done == []
            response_sent.set()

        assert done == [("u-42", 1, "req-t", 1 if with_registry else 0)]
        stats = registry.stats()
        assert (stats.scopes_open, stats.scopes_opened) == (0, 2 if with_registry else 1)

    def test_each_call_is_a_new_child(self, ctx):
        """
        Each call of the wrapper runs under a new child of the context bound
        when it was wrapped, whatever is bound when it is called.
        """
        with uc.bind(ctx):
            later = in_child_scope(uc.current)
        first, second = later(), later()

        assert first.request_id != second.request_id
        assert first.parent_request_id == second.parent_request_id == ctx.request_id
        assert first.depth == second.depth == 1
        assert uc.current_or_none() is None

    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    def test_keeps_the_name_and_passes_arguments(self, ctx, with_registry):
        """
        The wrapper looks like the function it wraps, and passes its arguments
        and its result through.
        """

        registry = uc.Registry()
        registry.register("one", lambda _ctx: 1)

        def add(*args, b=0):
            """Add."""
            scope, a = args if with_registry else (None, *args)
            return a + b + (scope.get("one") if scope else 0)

        with uc.bind(ctx):
            later = in_child_scope(add, registry=registry if with_registry else None)

        assert later.__name__ == "add"
        assert later.__doc__ == "Add."
        assert later.__wrapped__ is add
        assert later(1, b=2) == (4 if with_registry else 3)

    @pytest.mark.parametrize("with_registry", [False, True], ids=["bind", "scope"])
    async def test_async_callable_object(self, ctx, with_registry):
        """
        An object whose ``__call__`` is a coroutine function is wrapped by a
        coroutine function, so that the work runs under the child (Starlette
        then awaits it, instead of calling it in a thread and dropping the
        coroutine).
        """
        registry = uc.Registry()

        class Job:
            async def __call__(self, *args):
                *scope, n = args
                assert len(scope) == (1 if with_registry else 0)
                await anyio.lowlevel.checkpoint()
                return n, uc.current().depth, registry.stats().scopes_open

        with uc.bind(ctx):
            later = in_child_scope(Job(), registry=registry if with_registry else None)

        assert inspect.iscoroutinefunction(later)
        assert await later(5) == (5, 1, 1 if with_registry else 0)

    def test_needs_a_bound_context(self):
        """
        Wrapping outside a request raises NoContextError.
        """
        with pytest.raises(uc.NoContextError):
            in_child_scope(print)


# -- many users at once ------------------------------------------------------


class _StampIds(logging.Filter):
    def filter(self, record):
        ctx = uc.current_or_none()
        record.user_id = None if ctx is None else ctx.user_id
        record.request_id = None if ctx is None else ctx.request_id
        return True


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


class TestConcurrency:
    async def test_many_users_many_requests(self):
        """
        50 users with 20 concurrent requests each, all on one event loop: every
        response carries its own user and request id, every log record the
        ids of the request that logged it, every request a session of its own;
        no scope is left open.
        """
        users, per_user = 50, 20
        registry = uc.Registry()
        sessions = []

        async def session(ctx):
            await anyio.lowlevel.checkpoint()
            s = Session(ctx)
            sessions.append(s)
            yield s

        registry.register(Session, session)
        logger = logging.getLogger("tests.asgi.concurrency")
        handler = _Keep()
        handler.addFilter(_StampIds())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

        async def app(scope, receive, send):
            state = request_state(scope)
            await anyio.sleep(random.random() / 1000)
            s = await state.resources.aget(Session)
            logger.info("handling %s %s", state.ctx.user_id, state.ctx.request_id)
            await anyio.sleep(random.random() / 1000)
            ctx = uc.current()
            body = json.dumps(
                {"user_id": ctx.user_id, "request_id": ctx.request_id, "session_of": s.ctx.user_id}
            ).encode()
            await send(json_start(body))
            await anyio.lowlevel.checkpoint()
            await send({"type": "http.response.body", "body": body})

        mw = UserContextMiddleware(app, resolver=aresolve, registry=registry)
        results = []

        async def request(user, n):
            client = Client()
            scope = http_scope(("x-request-id", f"{user}-req-{n}"), user=user)
            await mw(scope, client.receive, client.send)
            results.append((user, n, client.headers()[b"x-request-id"].decode(), client.json()))

        try:
            async with anyio.create_task_group() as tg:
                for n in range(per_user):
                    for u in range(users):
                        tg.start_soon(request, f"u-{u}", n)
        finally:
            logger.removeHandler(handler)

        mismatches = [
            r
            for r in results
            if not (
                r[3]["user_id"] == r[3]["session_of"] == r[0]
                and r[3]["request_id"] == r[2] == f"{r[0]}-req-{r[1]}"
            )
        ]
        assert len(results) == users * per_user
        assert mismatches == []
        records = handler.records
        assert len(records) == users * per_user
        assert [r for r in records if r.args != (r.user_id, r.request_id)] == []
        assert len({r.request_id for r in records}) == users * per_user
        assert len({id(s) for s in sessions}) == users * per_user
        stats = registry.stats()
        assert (stats.scopes_open, stats.scopes_opened, stats.resources_open) == (
            0,
            users * per_user,
            (),
        )


# -- with Starlette ----------------------------------------------------------


def starlette_app(log, registry):
    """
    A Starlette application using the request's session in a JSON endpoint
    with background tasks, a streaming endpoint, a 204 endpoint and a
    WebSocket endpoint.
    """
    from starlette.applications import Starlette
    from starlette.background import BackgroundTasks
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    def record_child(label):
        ctx = uc.current()
        log.append(
            f"{label} user={ctx.user_id} depth={ctx.depth} parent={ctx.parent_request_id} "
            f"scopes_open={registry.stats().scopes_open}"
        )

    async def async_task(label):
        record_child(label)
        async with registry.scope() as scope:
            await scope.aget(Session)

    def sync_task(scope, label):
        record_child(label)
        scope.get(Session)

    async def create(request):
        await request_state(request.scope).resources.aget(Session)
        tasks = BackgroundTasks()
        tasks.add_task(in_child_scope(async_task), "async task")
        tasks.add_task(in_child_scope(sync_task, registry=registry), "sync task")
        return JSONResponse({"user_id": uc.current().user_id}, background=tasks)

    async def stream(request):
        resources = request_state(request.scope).resources

        async def chunks():
            for i in range(3):
                session = await resources.aget(Session)
                log.append(f"chunk {i} user={uc.current().user_id} session={session.ctx.user_id}")
                yield b"%d" % i

        return StreamingResponse(chunks())

    async def delete(request):
        await request_state(request.scope).resources.aget(Session)
        return Response(status_code=204)

    async def ws(websocket):
        await websocket.accept()
        session = await request_state(websocket.scope).resources.aget(Session)
        text = await websocket.receive_text()
        await websocket.send_text(f"{text} {uc.current().user_id} {session.ctx.user_id}")
        await websocket.close()

    return Starlette(
        routes=[
            Route("/notes", create, methods=["POST"]),
            Route("/notes", delete, methods=["DELETE"]),
            Route("/stream", stream),
            WebSocketRoute("/ws", ws),
        ]
    )


def asgi_client(app):
    transport = httpx2.ASGITransport(app=app)
    return httpx2.AsyncClient(transport=transport, base_url="http://test")


@needs_starlette
class TestStarlette:
    async def test_json_response_and_background_tasks(self):
        """
        The JSON response is sent after the commit; its BackgroundTasks then
        run under children of the request: an async one that opens its own
        scope, and a sync one, run in a thread, which uses the scope
        `in_child_scope` opened and passed to it.
        """
        log = []
        registry = session_registry(log)
        app = UserContextMiddleware(
            starlette_app(log, registry), resolver=resolve, registry=registry
        )
        async with asgi_client(app) as client:
            response = await client.post(
                "/notes", headers={"x-user": "u-42", "x-request-id": "req-n"}
            )

        assert response.status_code == 200
        assert response.json() == {"user_id": "u-42"}
        assert response.headers["x-request-id"] == "req-n"
        assert log == [
            "open u-42 depth=0",
            "commit depth=0",
            "async task user=u-42 depth=1 parent=req-n scopes_open=0",
            "open u-42 depth=1",
            "commit depth=1",
            "sync task user=u-42 depth=1 parent=req-n scopes_open=1",
            "open u-42 depth=1",  # the session of the scope in_child_scope passed it
            "commit depth=1",
        ]
        assert registry.stats().scopes_open == 0

    async def test_streaming_response_commits_after_the_last_chunk(self):
        """
        Every chunk of a StreamingResponse sees the request's context and
        session, and the session commits after the last chunk, every time.
        """
        log = []
        registry = session_registry(log)
        app = UserContextMiddleware(
            starlette_app(log, registry), resolver=resolve, registry=registry
        )
        async with asgi_client(app) as client:
            for _ in range(20):
                response = await client.get("/stream", headers={"x-user": "u-7"})
                assert response.text == "012"

        assert log == 20 * [
            "open u-7 depth=0",
            "chunk 0 user=u-7 session=u-7",
            "chunk 1 user=u-7 session=u-7",
            "chunk 2 user=u-7 session=u-7",
            "commit depth=0",
        ]
        assert registry.stats().scopes_open == 0

    async def test_refusal_and_failed_commit_behind_204(self):
        """
        A request without credentials gets the 401 JSON response, and a 204
        whose commit fails becomes a 500.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        app = UserContextMiddleware(
            starlette_app(log, registry), resolver=resolve, registry=registry
        )
        async with asgi_client(app) as client:
            refused = await client.post("/notes")
            deleted = await client.delete("/notes", headers={"x-user": "u-42"})

        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthenticated"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert deleted.status_code == 500
        assert deleted.json()["error"] == "cleanup_failed"
        assert log == ["open u-42 depth=0", "commit depth=0"]

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_testclient_and_add_middleware(self, backend):
        """
        Through Starlette's TestClient and ``app.add_middleware``: streamed
        responses commit every time (the disconnect the client reports after
        the last chunk is no failure), a WebSocket keeps its session for the
        connection and gets the request id on its accept, and a refused
        handshake gets the JSON denial response.
        """
        from starlette.testclient import TestClient, WebSocketDenialResponse

        log = []
        registry = session_registry(log)
        app = starlette_app(log, registry)
        app.add_middleware(UserContextMiddleware, resolver=resolve, registry=registry)
        with TestClient(app, backend=backend) as client:
            for _ in range(30):
                assert client.get("/stream", headers={"x-user": "u-1"}).text == "012"
            headers = {"x-user": "u-2", "x-request-id": "ws-1"}
            with client.websocket_connect("/ws", headers=headers) as ws:
                assert ws.extra_headers == [(b"x-request-id", b"ws-1")]
                ws.send_text("hello")
                assert ws.receive_text() == "hello u-2 u-2"
            with pytest.raises(WebSocketDenialResponse) as e, client.websocket_connect("/ws"):
                pass  # the handshake is refused

        assert e.value.status_code == 401
        assert e.value.json()["error"] == "unauthenticated"
        assert [line for line in log if line.startswith(("commit", "rollback"))] == 31 * [
            "commit depth=0"
        ]
        assert registry.stats().scopes_open == 0

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_crash_behind_server_error_middleware(self, backend):
        """
        An endpoint that raises gets the middleware's JSON 500 with the
        request id; Starlette's ServerErrorMiddleware, outside it, sees that a
        response started and sends no second one, and the exception reaches
        the server (here the TestClient, which raises it when asked to).
        """
        from starlette.applications import Starlette
        from starlette.routing import Route
        from starlette.testclient import TestClient

        async def boom(request):
            raise LookupError("no such note")

        app = Starlette(routes=[Route("/boom", boom)])
        app.add_middleware(UserContextMiddleware, resolver=resolve)
        starts = []

        async def server(scope, receive, send):  # what the server gets
            async def record(message):
                if message["type"] == "http.response.start":
                    starts.append(message["status"])
                await send(message)

            await app(scope, receive, record)

        headers = {"x-user": "u-1", "x-request-id": "req-b"}
        with TestClient(server, backend=backend, raise_server_exceptions=False) as client:
            response = client.get("/boom", headers=headers)
        with TestClient(server, backend=backend) as client, pytest.raises(LookupError):
            client.get("/boom", headers=headers)

        assert starts == [500, 500]
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "req-b"
        assert response.json()["request_id"] == "req-b"


# -- under a real server -----------------------------------------------------

try:
    import uvicorn
    import websockets.sync.client
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    uvicorn = None

needs_uvicorn = pytest.mark.skipif(
    uvicorn is None,
    reason="uvicorn and websockets are not installed: pip install uvicorn websockets",
)


class _Uvicorn:
    """
    *app* served by uvicorn on a free port of 127.0.0.1, in a thread, for a
    ``with`` block of at most a few seconds.
    """

    def __init__(self, app, **options):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[self._sock])), daemon=True
        )

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert self._thread.is_alive(), "uvicorn did not start"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info):
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()
        assert not self._thread.is_alive(), "uvicorn did not stop within 10 s"


@needs_uvicorn
class TestUnderUvicorn:
    def test_websocket_denial_and_exempt_paths(self):
        """
        Under uvicorn, a refused handshake gets the problem document as a
        denial response, with its status, Retry-After and request id; an
        exempt path is served with no user, and an anonymous WebSocket is
        accepted.
        """

        def resolver(scope):
            room = scope["path"].rsplit("/", 1)[-1]
            if room == "secret":
                raise uc.ForbiddenError("Not your room.")
            if room == "busy":
                raise uc.ServiceUnavailableError("Too busy.", retry_after=5)
            return resolve(scope)

        async def app(scope, receive, send):
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.send", "text": repr(uc.current_or_none())})
                await send({"type": "websocket.close"})
                return
            await json_app(payload={"ok": True})(scope, receive, send)

        mw = UserContextMiddleware(app, resolver=resolver, exempt=("/public",))
        denials = {}

        def handshake(url, request_id):
            headers = {"x-request-id": request_id}
            with websockets.sync.client.connect(url, open_timeout=5, additional_headers=headers):
                pass

        with _Uvicorn(mw, ws="websockets-sansio") as server:
            for room in ("secret", "busy"):
                url = f"ws://127.0.0.1:{server.port}/rooms/{room}"
                with pytest.raises(websockets.exceptions.InvalidStatus) as e:
                    handshake(url, f"req-{room}")
                denials[room] = e.value.response
            url = f"ws://127.0.0.1:{server.port}/public/feed"
            with websockets.sync.client.connect(url, open_timeout=5) as conn:
                anonymous = conn.recv(timeout=5)
            with httpx2.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
                public = client.get("/public/health")

        secret, busy = denials["secret"], denials["busy"]
        assert (secret.status_code, busy.status_code) == (403, 503)
        assert secret.headers["content-type"] == "application/problem+json"
        assert json.loads(secret.body) == {
            "type": "about:blank",
            "title": "Forbidden",
            "status": 403,
            "detail": "Not your room.",
            "error": "forbidden",
            "request_id": "req-secret",
        }
        assert busy.headers["retry-after"] == "5"
        assert json.loads(busy.body)["retry_after"] == 5
        assert anonymous == "None"
        assert public.json() == {"ok": True}
        assert len(public.headers["x-request-id"]) == 32
