"""
Give every HTTP request and WebSocket connection of an ASGI application its own
`usercontext.UserContext`, and optionally its own scope of resources.

`UserContextMiddleware` is plain ASGI: it works under any ASGI framework
(Starlette, FastAPI, Litestar, Quart, ...) and needs nothing beyond the core.
Install it with ``pip install usercontext[asgi]`` (the extra adds nothing; it
exists so that every adapter can be asked for by name).

Each request runs in a fresh copy of the Context of the server's task, so
nothing one request binds or sets can be seen by the next request served by
the same task, and the server's own ``send`` and ``receive`` run where no user
is bound, so nothing the server starts from them carries the request's user.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import os
import re
import types

from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from usercontext import (
    EmitterHub,
    InvalidContextError,
    NoContextError,
    Registry,
    Unauthenticated,
    UserContext,
    bind,
    current,
    isolated,
)


if TYPE_CHECKING:
    from typing import Concatenate

    from typing_extensions import ParamSpec

    from usercontext import Emitter, Scope

    P = ParamSpec("P")

__all__ = [
    "STATE_KEY",
    "RequestState",
    "UserContextMiddleware",
    "in_child_scope",
    "request_state",
]

T = TypeVar("T")

Message = MutableMapping[str, Any]
#: An ASGI ``receive`` callable.
Receive = Callable[[], Awaitable[Message]]
#: An ASGI ``send`` callable.
Send = Callable[[Message], Awaitable[None]]
#: An ASGI application.
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
#: A resolver: takes the ASGI scope, returns the request's context (or an awaitable of it).
Resolver = Callable[[MutableMapping[str, Any]], "UserContext | Awaitable[UserContext]"]

logger = logging.getLogger("usercontext.asgi")

#: The key of the ASGI scope under which the middleware keeps the `RequestState`.
STATE_KEY = "usercontext"

# What a request id taken from a client may look like: visible ASCII, no
# spaces, short enough for any log line.
_GOOD_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-zA-Z-]+")
_JSON = (b"content-type", b"application/json")
# Responses that never have a body, and which Starlette sends without a
# Content-Length: held like any response whose body comes in one message.
_NO_BODY = frozenset((204, 304))
# WebSocket close code for a refused handshake (RFC 6455: policy violation).
_POLICY_VIOLATION = 1008


class RequestState:
    """
    What `UserContextMiddleware` set up for one request or connection.

    The middleware keeps it in the ASGI scope (see `request_state`), so that
    endpoints and framework integrations can reach the request's resources.

    Attributes:
        ctx: The request's context, bound while the request runs.
        resources: The request's scope of the registry given to the middleware,
            or `None` without one. It is open until the response has been sent
            (HTTP) or the connection ends (WebSocket).
        hub: The hub given to the middleware, or `None`.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("ctx", "hub", "resources")

    def __init__(self, ctx: UserContext, resources: Scope | None, hub: EmitterHub | None) -> None:
        self.ctx = ctx
        self.resources = resources
        self.hub = hub

    @property
    def emitter(self) -> Emitter:
        """
        The emitter of the request's user, from the middleware's hub.

        Raises:
            LookupError: If the middleware was given no hub.
        """
        if self.hub is None:
            msg = "UserContextMiddleware was given no hub: pass hub=EmitterHub(...) to it."
            raise LookupError(msg)
        return self.hub.emitter(self.ctx)

    def __repr__(self) -> str:
        return (
            f"<usercontext.asgi.RequestState(user_id={self.ctx.user_id!r}, "
            f"request_id={self.ctx.request_id!r})>"
        )


def request_state(scope: MutableMapping[str, Any]) -> RequestState:
    """
    Return the `RequestState` that `UserContextMiddleware` put in *scope*.

    *scope* is the ASGI scope; under Starlette and FastAPI it is
    ``request.scope`` (or ``websocket.scope``).

    Raises:
        NoContextError: If the request did not pass through the middleware.

    .. versionadded:: 0.1.0
    """
    try:
        return scope[STATE_KEY]  # type: ignore[no-any-return]
    except KeyError:
        msg = (
            "This request did not pass through usercontext.asgi.UserContextMiddleware. "
            "Add it around the application: app.add_middleware(UserContextMiddleware, "
            "resolver=...) or UserContextMiddleware(app, resolver=...)."
        )
        raise NoContextError(msg) from None


class _DisconnectedError(ConnectionError):
    """
    What the request's scope is closed with when the client left before the
    response was complete: providers roll back, as for any failed request.
    """


class UserContextMiddleware:
    """
    UserContextMiddleware(app, *, resolver, registry=None, hub=None, \
    request_id_header="x-request-id")

    Bind a `usercontext.UserContext` to every ``http`` and ``websocket``
    request of *app*; pass ``lifespan`` and other scopes through untouched.

    For each request the middleware:

    1. calls ``resolver(scope)`` (a function or a coroutine function) for the
       request's context. If it raises
       `usercontext.exceptions.Unauthenticated`, the client gets ``401`` with
       ``{"error": "unauthenticated", "detail": ...}``; if it raises
       `usercontext.exceptions.InvalidContextError`, ``400`` with
       ``{"error": "invalid_context", "field": ..., "detail": ...}``. A
       WebSocket handshake is refused the same way where the server supports
       denial responses, else closed with code 1008. Any other error
       propagates.
    2. reuses the request id the client sent in *request_id_header* if it is
       valid (1 to 128 visible ASCII characters, and the library's rules), and
       else keeps the context's own; the response carries it in the same header.
    3. runs the rest of the request in a fresh copy of the Context, with the
       context bound, and with a scope of *registry* open (`RequestState`).

    The scope stays open while the application produces the response, and
    is closed before the client can see the response complete, so that a
    failing cleanup, such as a commit, never ends in a success the client
    cannot trust:

    - A response whose whole body comes in one message (``JSONResponse`` and
      most others: a ``Content-Length`` and one body message, a ``204`` or
      ``304``, a ``pathsend``) is held until the scope is closed; if a
      cleanup failed, the client gets ``500`` ``{"error": "cleanup_failed"}``
      instead.
    - A response whose headers go out before its last message (a
      ``FileResponse`` in several messages, a ``StreamingResponse``) is
      forwarded as it comes, but its last message waits for the scope to
      close. If a cleanup failed, that message is never sent: the middleware
      raises, and the server drops the connection, so the client sees a
      truncated response.
    - An application that raises before its response started gets ``500``
      ``{"error": "internal_error"}`` with the request id; the exception then
      propagates, for the server to log. After the start, nothing more is
      sent.
    - A client that disconnects before the response is complete has the
      scope closed as if the request failed, so sessions roll back.
    - A WebSocket's scope lives as long as the connection; cleanup errors are
      logged.

    Work that outlives the response needs its own scope: see `in_child_scope`.

    The server's own ``send`` and ``receive`` run in a copy of the Context the
    middleware was called in, where the request's user is not bound: what the
    server starts from them (uvicorn starts the next pipelined request from
    the last ``send`` of the one before) never carries the user.

    Args:
        app: The ASGI application.
        resolver: Returns the `usercontext.UserContext` of a request from its
            ASGI scope.
        registry: Per-request resources, opened lazily in each request's scope.
        hub: An `usercontext.EmitterHub`, reachable as `RequestState.hub`.
        request_id_header: The header carrying the request id, both ways.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        resolver: Resolver,
        registry: Registry | None = None,
        hub: EmitterHub | None = None,
        request_id_header: str = "x-request-id",
    ) -> None:
        if not callable(resolver):
            msg = (  # type: ignore[unreachable]
                f"resolver must be a function taking the ASGI scope and returning a "
                f"UserContext, got {type(resolver).__name__}."
            )
            raise TypeError(msg)
        if registry is not None and not isinstance(registry, Registry):
            kind = type(registry).__name__  # type: ignore[unreachable]
            msg = f"registry must be a usercontext.Registry or None, got {kind}."
            raise TypeError(msg)
        if hub is not None and not isinstance(hub, EmitterHub):
            kind = type(hub).__name__  # type: ignore[unreachable]
            msg = f"hub must be a usercontext.EmitterHub or None, got {kind}."
            raise TypeError(msg)
        header_ok = type(request_id_header) is str and _HEADER_NAME.fullmatch(request_id_header)
        if not header_ok:
            msg = (
                f"request_id_header must be an HTTP header name such as 'x-request-id', "
                f"got {request_id_header!r}."
            )
            raise ValueError(msg)
        self.app = app
        self.resolver = resolver
        self.registry = registry
        self.hub = hub
        self.request_id_header = request_id_header
        self._header = request_id_header.lower().encode("ascii")
        self._serve_isolated = isolated(self._serve)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """
        Serve one ASGI request.
        """
        kind = scope["type"]
        if kind == "http" or kind == "websocket":  # noqa: PLR1714  # faster than `in`
            # Made before the request binds anything: see _Request.
            await self._serve_isolated(scope, receive, _Request(send))
        else:
            await self.app(scope, receive, send)

    def _incoming_id(self, scope: MutableMapping[str, Any]) -> str | None:
        header = self._header
        for name, value in scope.get("headers", ()):
            if name == header:
                text = value.decode("latin-1")
                return text if _GOOD_REQUEST_ID.fullmatch(text) else None
        return None

    async def _resolve(self, scope: MutableMapping[str, Any]) -> UserContext:
        ctx = self.resolver(scope)
        if type(ctx) is not UserContext:
            if inspect.isawaitable(ctx):
                ctx = await ctx
            if not isinstance(ctx, UserContext):
                msg = (  # type: ignore[unreachable]
                    f"The resolver {getattr(self.resolver, '__qualname__', self.resolver)!r} "
                    f"returned {type(ctx).__name__}; it must return a usercontext.UserContext "
                    "(or raise usercontext.Unauthenticated)."
                )
                raise TypeError(msg)
        return ctx

    async def _serve(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        incoming = self._incoming_id(scope)
        try:
            ctx = await self._resolve(scope)
        except Unauthenticated as e:
            headers = [(b"www-authenticate", e.challenge.encode("latin-1", "replace"))]
            body = {"error": "unauthenticated", "detail": str(e)}
            await self._refuse(scope, send, 401, body, incoming, headers)
            return
        except InvalidContextError as e:
            body = {"error": "invalid_context", "field": e.field, "detail": str(e)}
            await self._refuse(scope, send, 400, body, incoming, [])
            return
        if incoming is not None and incoming != ctx.request_id:
            try:  # noqa: SIM105  # contextlib.suppress costs an object per request
                ctx = ctx.evolve(request_id=incoming)
            except InvalidContextError:
                pass  # a bad id from a client is replaced, not refused
        registry = self.registry
        resources = None if registry is None else registry.scope(ctx)
        scope[STATE_KEY] = RequestState(ctx, resources, self.hub)
        request_id = (self._header, ctx.request_id.encode("ascii", "backslashreplace"))
        request: _Request = send  # type: ignore[assignment]  # made by __call__
        with bind(ctx):
            if resources is not None and scope["type"] == "http":
                await request.run(self.app, scope, receive, resources, request_id)
            else:
                await request.run_plain(self.app, scope, receive, resources, request_id)

    async def _refuse(  # noqa: PLR0913, PLR0917  # private, called twice
        self,
        scope: MutableMapping[str, Any],
        send: Send,
        status: int,
        body: dict[str, str],
        incoming: str | None,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        request_id = incoming if incoming is not None else os.urandom(16).hex()
        header = (self._header, request_id.encode("ascii"))
        if scope["type"] == "http":
            await _send_json(send, "http.response", status, body, [*headers, header])
        elif "websocket.http.response" in scope.get("extensions", {}):
            await _send_json(send, "websocket.http.response", status, body, [*headers, header])
        else:
            reason = f"{status} {body['error']}"
            await send({"type": "websocket.close", "code": _POLICY_VIOLATION, "reason": reason})


async def _send_json(
    send: Send, kind: str, status: int, body: dict[str, str], headers: list[tuple[bytes, bytes]]
) -> None:
    """
    Send a JSON response (*kind* is ``http.response`` or a WebSocket's
    ``websocket.http.response``) of *body* and the request id, which is the
    value of the last of *headers*.
    """
    payload = json.dumps({**body, "request_id": headers[-1][1].decode("ascii")}).encode()
    length = (b"content-length", str(len(payload)).encode("ascii"))
    await send({"type": f"{kind}.start", "status": status, "headers": [_JSON, length, *headers]})
    await send({"type": f"{kind}.body", "body": payload})


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


@types.coroutine
def _send_all(send: Send, messages: tuple[Message, ...]) -> Generator[Any, Any, None]:
    # A generator rather than a coroutine: `next` steps it to its end without
    # making a StopIteration (see _Request.send).
    for message in messages:
        yield from send(message).__await__()


_UNSTARTED: Any = object()
_DONE: Any = object()


@types.coroutine
def _in_context(
    run: Callable[..., Any], coro: Any, yielded: Any = _UNSTARTED
) -> Generator[Any, Any, Any]:
    """
    Await *coro* with each of its steps run by *run* (a Context's ``run``),
    in the caller's task, as `usercontext.isolated` runs a request: a task
    would cost more, and escape the caller's cancel scopes. If *coro* ran
    its first step already, *yielded* is what that step yielded.
    """
    send = coro.send
    if yielded is _UNSTARTED:
        try:
            yielded = run(send, None)
        except StopIteration as e:
            return e.value
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            run(coro.close)
            raise
        except BaseException as e:  # noqa: BLE001  # thrown into the call, as a task would
            step, value = coro.throw, e
        else:
            step = send
        try:
            yielded = run(step, value)
        except StopIteration as e:
            return e.value


_STARTS = frozenset(("http.response.start", "websocket.accept", "websocket.http.response.start"))


def _with_header_and_length(message: Message, header: tuple[bytes, bytes]) -> tuple[Message, bool]:
    """
    Return *message* with the *header* added unless it has one, and whether it
    has a Content-Length, in one pass over its headers.
    """
    headers = message.get("headers") or []
    if type(headers) is not list and type(headers) is not tuple:
        # Any iterable will do (ASGI), but it must be read more than once here.
        headers = list(headers)
        message = {**message, "headers": headers}
    name = header[0]
    has_id = has_length = False
    for key, _ in headers:
        lower = key.lower()
        if lower == b"content-length":
            has_length = True
        elif lower == name:
            has_id = True
    if not has_id:
        message = {**message, "headers": [*headers, header]}
    return message, has_length


async def _answer_crash(
    send: Send, scope: MutableMapping[str, Any], error: BaseException, header: tuple[bytes, bytes]
) -> None:
    """
    Answer ``500`` with the request id for an application that raised *error*
    before its response started, where a response can still be sent: the
    error then propagates, for the server (and Starlette's
    ``ServerErrorMiddleware``, which sees a response started) to log it.
    """
    if not isinstance(error, Exception):
        return  # cancelled, or the process is stopping: no one waits for an answer
    if scope["type"] == "http":
        kind = "http.response"
    elif "websocket.http.response" in scope.get("extensions", {}):
        kind = "websocket.http.response"
    else:
        return  # the server refuses the handshake on its own
    body = {
        "error": "internal_error",
        "detail": "The server failed to answer the request; its logs give the reason under "
        "this request id.",
    }
    try:
        await _send_json(send, kind, 500, body, [header])
    except Exception:  # the client left: the application's error is the one to raise
        request_id = header[1].decode("ascii")
        logger.debug("The 500 for request %s could not be sent.", request_id, exc_info=True)


async def _close(resources: Scope, error: BaseException | None) -> Exception | None:
    """
    Close a request's scope once its response is out (or the connection is
    over): cleanup errors are logged, not raised; return the error, or `None`
    if every cleanup succeeded.
    """
    try:
        if error is None:
            await resources.__aexit__(None, None, None)
        else:  # the scope adds its cleanup errors to *error* as notes
            await resources.__aexit__(type(error), error, error.__traceback__)
    except Exception as e:  # noqa: BLE001  # each error was logged by the scope
        logger.error(  # noqa: TRY400  # the scope logged each traceback already
            "The resources of request %s were not all cleaned up: %s",
            resources.ctx.request_id,
            e,
        )
        return e
    return None


class _ResponseCutError(RuntimeError):
    """
    Raised into the application's last ``send`` of a response whose headers
    are out when the request's cleanup failed: the last message is never sent,
    and the server drops the connection, so the client sees a truncated
    response, never a complete one.
    """


class _Request:
    """
    One request's link to the server: it sends the response, and closes the
    request's scope at the right moment (see `UserContextMiddleware`). Calling
    it calls the server's ``send``.

    Servers start tasks and schedule callbacks from inside ``send`` and
    ``receive``, and each copies the Context it is started from: uvicorn
    starts the next pipelined request from the last ``send`` of the one
    before, and resumes reading the socket from ``send`` and ``receive``.
    Called under the request's `bind`, they would carry its user into the
    next request, into an outer middleware and into the server's own log
    lines. So every step of each call to the server runs in a copy of the
    Context the middleware was called in, made with this object before the
    request bound anything. The calls of one request share that copy: the
    steps of two calls never nest (each ends at its next ``await``), so the
    Context is never entered twice.
    """

    __slots__ = (
        "_closed",
        "_context",
        "_cut",
        "_disconnected",
        "_header",
        "_held",
        "_resources",
        "_send",
        "_started",
    )

    _header: tuple[bytes, bytes]
    _resources: Scope

    def __init__(self, send: Send) -> None:
        self._context = contextvars.copy_context()
        self._send = send
        self._held: Message | None = None  # a response start waiting for its body
        self._started = False  # whether the server was given a response start
        self._closed = False
        self._disconnected = False
        self._cut: _ResponseCutError | None = None

    # -- calls into the server, in its Context

    def __call__(self, message: Message) -> Awaitable[None]:
        return _in_context(self._context.run, _call(self._send, message))

    def send_all(self, *messages: Message) -> Awaitable[None]:
        """
        Send *messages* to the server in turn, in one call.
        """
        return _in_context(self._context.run, _send_all(self._send, messages))

    def receive(self, receive: Receive) -> Awaitable[Message]:
        """
        Call the server's *receive*.
        """
        return _in_context(self._context.run, _call(receive))

    # -- the request

    async def run(
        self,
        app: ASGIApp,
        scope: MutableMapping[str, Any],
        receive: Receive,
        resources: Scope,
        header: tuple[bytes, bytes],
    ) -> None:
        """
        Run *app* for an HTTP request with its scope of *resources*, and the
        request id *header* on its response.
        """
        self._header = header
        self._resources = resources

        async def watch() -> Message:
            message = await self.receive(receive)
            # The scope is closed before the last message of a response is
            # sent, so a disconnect seen while it is open is a client leaving.
            if message["type"] == "http.disconnect":
                self._disconnected = True
            return message

        await resources.__aenter__()
        try:
            await app(scope, watch, self.send)
        except BaseException as e:
            if not self._closed:
                await self._close(e)
            if not self._started:
                self._held = None
                await _answer_crash(self, scope, e, header)
            raise
        if not self._closed:
            # The application returned before finishing its response, or the
            # client left: close now, then pass on what is still held.
            error = await self._close()
            held = self._held
            if held is not None:
                self._held = None
                self._started = True
                if error is None:
                    await self(held)
                else:
                    await self._send_failure()
        elif self._cut is not None:
            raise self._cut  # the application caught it: the server must still drop the connection

    async def run_plain(
        self,
        app: ASGIApp,
        scope: MutableMapping[str, Any],
        receive: Receive,
        resources: Scope | None,
        header: tuple[bytes, bytes],
    ) -> None:
        """
        Run *app* for a request that needs no more than the request id
        *header* on its response: one without a scope, or a WebSocket, whose
        scope of *resources* lives as long as the connection.
        """
        self._header = header
        if resources is not None:
            await resources.__aenter__()
        try:
            await app(scope, functools.partial(self.receive, receive), self.send_with_id)
        except BaseException as e:
            if resources is not None:
                await _close(resources, e)
            if not self._started:
                await _answer_crash(self, scope, e, self._header)
            raise
        if resources is not None:
            await _close(resources, None)

    async def send_with_id(self, message: Message) -> None:
        """
        ``send`` adding the request id header to the response (or the
        WebSocket accept, or denial response), unless the application set it
        itself.
        """
        kind = message["type"]
        if kind in _STARTS:
            message = _with_header_and_length(message, self._header)[0]
            self._started = True
        await self(message)

    async def _close(self, error: BaseException | None = None) -> Exception | None:
        """
        Close the scope (as failed if the client left); return the cleanup
        error, or `None` if every cleanup succeeded.
        """
        self._closed = True
        if error is None and self._disconnected:
            error = _DisconnectedError("The client disconnected before the response was complete.")
        return await _close(self._resources, error)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            message, has_length = _with_header_and_length(message, self._header)
            if not self._closed and (has_length or message["status"] in _NO_BODY):
                self._held = message  # sent with its body, after the cleanup
                return
            self._started = True
            await self(message)
            return
        if self._closed:
            await self(message)
            return
        if kind == "http.response.body":
            final = not message.get("more_body", False)
        else:
            final = kind == "http.response.pathsend"
        held = self._held
        if held is not None:
            self._held = None
            self._started = True
        if not final:
            await self._forward(held, message)
            return
        # The last message tells the client that the response is complete,
        # which it must not be if a commit failed: it waits for the cleanup.
        error = await self._close()
        if error is not None:
            await self._fail(held, error)
            return
        # The server's sends, with their first step (most often the only one)
        # inlined: this is every request's path.
        steps = _send_all(self._send, (message,) if held is None else (held, message))
        run = self._context.run
        yielded = run(next, steps, _DONE)
        if yielded is not _DONE:
            await _in_context(run, steps, yielded)

    async def _forward(self, held: Message | None, message: Message) -> None:
        """
        Send a body message that is not the last (after the *held* start).
        """
        try:
            if held is None:
                await self(message)
            else:
                await self.send_all(held, message)
        except BaseException as e:
            self._disconnected = True
            await self._close(e)
            raise

    async def _fail(self, held: Message | None, error: Exception) -> None:
        """
        Answer for a response whose cleanup failed with *error*: ``500`` if
        nothing was sent (its start is *held*), else cut it short.
        """
        if held is not None:
            await self._send_failure()
            return
        self._cut = _ResponseCutError(
            f"The resources of request {self._resources.ctx.request_id} were not all "
            "cleaned up (a commit may have failed) after the response's headers were "
            "sent, so the response was cut short: its last message was not sent, and "
            "the connection must be dropped."
        )
        raise self._cut from error

    async def _send_failure(self) -> None:
        body = {
            "error": "cleanup_failed",
            "detail": "The request's resources could not be cleaned up (a commit may have "
            "failed); its changes may not have been saved.",
        }
        await _send_json(self, "http.response", 500, body, [self._header])


@overload
def in_child_scope(fn: Callable[P, T], *, registry: None = None) -> Callable[P, T]: ...
@overload
def in_child_scope(
    fn: Callable[Concatenate[Scope, P], T], *, registry: Registry
) -> Callable[P, T]: ...
def in_child_scope(
    fn: Callable[..., Any], *, registry: Registry | None = None
) -> Callable[..., Any]:
    """
    Wrap *fn* to run later under a child of the current context, with a scope
    of its own.

    A request's resources are closed when its response has been sent, so work
    that outlives the response (Starlette's ``BackgroundTasks``, a task spawned
    for later) must not use them. Wrap that work with this function while the
    request runs: each call of the wrapper then binds ``current().child()`` (the
    same user, a new request id whose parent is the request's). Given a
    *registry*, it also opens a scope of it for the child and passes that
    scope to *fn* as its first argument; the scope is closed when *fn*
    returns, and its resources are committed or rolled back like a request's.

    A coroutine function (or an object whose ``__call__`` is one) is wrapped
    by a coroutine function (its scope is ``async with``); a plain function by
    a plain function (its scope is ``with``, so its providers must not need
    awaiting), which Starlette runs in a worker thread.

    >>> import usercontext as uc
    >>> from usercontext.asgi import in_child_scope
    >>> registry = uc.Registry()
    >>> registry.register("greeting", lambda ctx: f"hello {ctx.user_id}")
    >>> def report(scope, n): return scope.get("greeting"), uc.current().depth, n
    >>> with uc.bind(uc.UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")):
    ...     later = in_child_scope(report, registry=registry)
    >>> later(7)
    ('hello u-1', 1, 7)

    Raises:
        NoContextError: If no context is bound when *fn* is wrapped.

    .. versionadded:: 0.1.0
    """
    parent = current()
    call = getattr(fn, "__call__", None)  # noqa: B004  # an object may have an async __call__
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call):

        async def async_child(*args: Any, **kwargs: Any) -> Any:
            child = parent.child()
            if registry is None:
                with bind(child):
                    return await fn(*args, **kwargs)
            async with registry.scope(child) as scope:
                return await fn(scope, *args, **kwargs)

        return functools.wraps(fn)(async_child)

    def child_call(*args: Any, **kwargs: Any) -> Any:
        child = parent.child()
        if registry is None:
            with bind(child):
                return fn(*args, **kwargs)
        with registry.scope(child) as scope:
            return fn(scope, *args, **kwargs)

    return functools.wraps(fn)(child_call)
