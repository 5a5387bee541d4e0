"""
Helpers shared by the tests of `usercontext.asgi` (the ``test_asgi_*.py``
modules): hand-written ASGI scopes, a client that records what the
application sends, a resolver, a registry of stand-in sessions, and small
applications.
"""

from __future__ import annotations

import contextvars
import json

import anyio
import anyio.lowlevel

import usercontext as uc

from usercontext.asgi import STATE_KEY, request_state


JSON_HEADERS = [(b"content-type", b"application/json")]
DISCONNECTED = "The client disconnected before the response was complete."

outer_var: contextvars.ContextVar[str] = contextvars.ContextVar("outer_var", default="unset")
request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")


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
    """
    The ``http.response.start`` message of a JSON *body*, with its length.
    """
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


def ws_client(*texts, log=None):
    """
    A `Client` of a WebSocket that connects, sends each of *texts*, then
    disconnects.
    """
    messages = [{"type": "websocket.connect"}]
    messages += [{"type": "websocket.receive", "text": text} for text in texts]
    messages.append({"type": "websocket.disconnect", "code": 1000})
    return Client(messages, log=log, disconnect="websocket.disconnect")
