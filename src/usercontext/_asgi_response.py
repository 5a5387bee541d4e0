"""
The link between `usercontext.asgi.UserContextMiddleware` and the server for
one request: calls into the server where no user is bound, the response sent
at the right moment around the request's cleanup, and the problem documents
the middleware answers with.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import types

from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from usercontext._asgi_state import RequestState
from usercontext._http import (
    CLEANUP_FAILED,
    INTERNAL_ERROR,
    PROBLEM_JSON,
    problem_document,
    refusal,
)
from usercontext.exceptions import RequestRefusedError


if TYPE_CHECKING:
    from usercontext import EmitterHub, Scope, UserContext
    from usercontext._http import Refusal


T = TypeVar("T")

Message = MutableMapping[str, Any]
#: An ASGI ``receive`` callable.
Receive = Callable[[], Awaitable[Message]]
#: An ASGI ``send`` callable.
Send = Callable[[Message], Awaitable[None]]
#: An ASGI application.
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# The middleware's logger: what this module logs is about its requests.
logger = logging.getLogger("usercontext.asgi")

_PROBLEM_JSON = (b"content-type", PROBLEM_JSON.encode("ascii"))
# Responses that never have a body, and which Starlette sends without a
# Content-Length: held like any response whose body comes in one message.
_NO_BODY = frozenset((204, 304))


class _DisconnectedError(ConnectionError):
    """
    What the request's scope is closed with when the client left before the
    response was complete: providers roll back, as for any failed request.
    """


async def _send_json(
    send: Send, kind: str, status: int, body: Mapping[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    """
    Send a problem document (RFC 9457, ``application/problem+json``) of
    *status* and *body* (*kind* is ``http.response`` or a WebSocket's
    ``websocket.http.response``) with the request id, which is the value of the
    last of *headers*.

    *body* holds ``detail`` and may hold ``type`` (``"about:blank"`` by
    default), ``title`` (the status's reason phrase by default) and extension
    members, such as ``error``.
    """
    payload = problem_document(status, body, headers[-1][1].decode("ascii"))
    length = (b"content-length", str(len(payload)).encode("ascii"))
    start = [_PROBLEM_JSON, length, *headers]
    await send({"type": f"{kind}.start", "status": status, "headers": start})
    await send({"type": f"{kind}.body", "body": payload})


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)


@types.coroutine
def _send_all(send: Send, messages: tuple[Message, ...]) -> Generator[Any, Any, None]:
    # A generator rather than a coroutine: `next` steps it to its end without
    # making a StopIteration (see RequestLink.send).
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
        except BaseException as e:  # thrown into the call, as a task would
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
    headers: Iterable[tuple[bytes, bytes]] = message.get("headers") or ()
    if not isinstance(headers, (list, tuple)):
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
) -> bool:
    """
    Answer ``500`` with the request id for an application that raised *error*
    before its response started, where a response can still be sent: the
    error then propagates, for the server (and Starlette's
    ``ServerErrorMiddleware``, which sees a response started) to log it.

    A refusal (`usercontext.exceptions.RequestRefusedError`, such as the
    ``429`` or ``503`` of an `usercontext.EngineFactory`'s admission policy)
    is answered with its own status, problem document and headers
    (``Retry-After``): return `True` then, and the caller does not raise it,
    since a refusal is an answer, not a crash.
    """
    if not isinstance(error, Exception):
        return False  # cancelled, or the process is stopping: no one waits for an answer
    if scope["type"] == "http":
        kind = "http.response"
    elif "websocket.http.response" in scope.get("extensions", {}):
        kind = "websocket.http.response"
    else:
        return False  # the server refuses the handshake on its own
    refused = isinstance(error, RequestRefusedError)
    body: Mapping[str, Any] = INTERNAL_ERROR
    status, headers = 500, []
    if refused:
        answer = cast("Refusal", refusal(error))
        status, body, headers = answer.status, answer.body, answer.headers
    try:
        await _send_json(send, kind, status, body, [*headers, header])
    except Exception:  # the client left: the application's error is the one to raise
        request_id = header[1].decode("ascii")
        logger.debug("The %d for request %s could not be sent.", status, request_id, exc_info=True)
        return False
    return refused


class _ResponseCutError(RuntimeError):
    """
    Raised into the application's last ``send`` of a response whose headers
    are out when the request's cleanup failed: the last message is never sent,
    and the server drops the connection, so the client sees a truncated
    response, never a complete one.
    """


class RequestLink(RequestState):
    """
    One request's link to the server: it sends the response, and closes the
    request's scope at the right moment (see `UserContextMiddleware`). It is
    the application's ``send`` of an HTTP request with a scope of resources
    (a method would be one more object alive per request), and, once the
    request has a user, its `RequestState` (one object per request, not two).

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
        "_held",
        "_id",
        "_name",
        "_receive",
        "_send",
        "_started",
    )

    _name: bytes
    _id: str
    _receive: Receive

    def __init__(self, send: Send) -> None:
        self._context = contextvars.copy_context()
        self._send = send
        self._held: Message | None = None  # a response start waiting for its body
        self._started = False  # whether the server was given a response start
        self._closed = False
        self._disconnected = False
        self._cut: _ResponseCutError | None = None

    # -- calls into the server, in its Context

    def to_server(self, message: Message) -> Awaitable[None]:
        """
        Call the server's ``send``.
        """
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

    def header(self, name: bytes, request_id: str) -> None:
        """
        Put the request id *request_id* in the header *name* of the response.
        """
        self._name = name
        self._id = request_id

    def begin(
        self, ctx: UserContext, resources: Scope | None, hub: EmitterHub | None, name: bytes
    ) -> None:
        """
        Make this the `RequestState` of a request of *ctx*, with its open
        scope of *resources*, and its id in the header *name* of the response.
        """
        self.ctx = ctx
        self.resources = resources
        self.hub = hub
        self._name = name
        self._id = ctx.request_id

    @property
    def _header(self) -> tuple[bytes, bytes]:
        # Made when used (once for most requests), rather than kept alive
        # while the request runs.
        return (self._name, self._id.encode("ascii", "backslashreplace"))

    async def run(
        self,
        app: ASGIApp,
        scope: MutableMapping[str, Any],
        receive: Receive,
    ) -> None:
        """
        Run *app* for an HTTP request with its open scope of resources, and
        the request id on its response (see `begin`).
        """
        self._receive = receive
        try:
            await app(scope, self._watch, self)
        except BaseException as e:
            if not self._closed:
                await self._close(e)
            if not self._started:
                self._held = None
                if await _answer_crash(self.to_server, scope, e, self._header):
                    return
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
                    await self.to_server(held)
                else:
                    await self._send_failure()
        elif self._cut is not None:
            raise self._cut  # the application caught it: the server must still drop the connection

    async def _watch(self) -> Message:
        """
        The application's ``receive`` under `run`: a method, not a closure
        per request.
        """
        message = await self.receive(self._receive)
        # The scope is closed before the last message of a response is
        # sent, so a disconnect seen while it is open is a client leaving.
        if message["type"] == "http.disconnect":
            self._disconnected = True
        return message

    async def run_plain(
        self,
        app: ASGIApp,
        scope: MutableMapping[str, Any],
        receive: Receive,
        resources: Scope | None,
    ) -> None:
        """
        Run *app* for a request that needs no more than the request id (see
        `header`) on its response: one without a scope, or a WebSocket, whose
        open scope of *resources* lives as long as the connection.
        """
        try:
            await app(scope, functools.partial(self.receive, receive), self.send_with_id)
        except BaseException as e:
            if resources is not None:
                await self._close(e)
            if not self._started and await _answer_crash(self.to_server, scope, e, self._header):
                return
            raise
        if resources is not None:
            await self._close()

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
        await self.to_server(message)

    async def _close(self, error: BaseException | None = None) -> Exception | None:
        """
        Close the request's scope once its response is out (or the connection
        is over), as failed if the client left: cleanup errors are logged, not
        raised; return the error, or `None` if every cleanup succeeded.
        """
        self._closed = True
        if error is None and self._disconnected:
            error = _DisconnectedError("The client disconnected before the response was complete.")
        resources = self.resources
        assert resources is not None  # noqa: S101  # closed only by requests that have one
        try:
            if error is None:
                await resources.__aexit__(None, None, None)
            else:  # the scope adds its cleanup errors to *error* as notes
                await resources.__aexit__(type(error), error, error.__traceback__)
        except Exception as e:  # each error was logged by the scope
            return self._cleanup_failed(e)
        return None

    def _cleanup_failed(self, error: Exception) -> Exception:
        """
        Log that the scope's cleanup failed with *error*, and return it.
        """
        logger.error(  # the scope logged each traceback already
            "The resources of request %s were not all cleaned up: %s",
            self.ctx.request_id,
            error,
        )
        return error

    async def __call__(self, message: Message) -> None:  # noqa: C901  # every request's path, written out
        """
        The application's ``send`` under `run`.
        """
        kind = message["type"]
        if kind == "http.response.start":
            header = (self._name, self._id.encode("ascii", "backslashreplace"))
            message, has_length = _with_header_and_length(message, header)
            if not self._closed and (has_length or message["status"] in _NO_BODY):
                self._held = message  # sent with its body, after the cleanup
                return
            self._started = True
            await self.to_server(message)
            return
        if self._closed:
            await self.to_server(message)
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
        # _close, written out for a scope that closes without awaiting (the
        # usual session): no coroutine.
        resources = self.resources
        assert resources is not None  # noqa: S101  # __call__ is the send of requests with one
        error: Exception | None = None
        self._closed = True
        try:
            if self._disconnected or resources._awaits_close:
                error = await self._close()
            else:
                resources.__exit__(None, None, None)
        except Exception as e:  # each error was logged by the scope
            error = self._cleanup_failed(e)
        if error is not None:
            await self._fail(held, error)
            return
        # The server's sends, with their first step (most often the only one)
        # inlined: this is every request's path.
        steps = _send_all(self._send, (message,) if held is None else (held, message))
        run: Callable[..., Any] = self._context.run
        yielded = run(next, steps, _DONE)
        if yielded is not _DONE:
            await _in_context(run, steps, yielded)

    async def _forward(self, held: Message | None, message: Message) -> None:
        """
        Send a body message that is not the last (after the *held* start).
        """
        try:
            if held is None:
                await self.to_server(message)
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
            f"The resources of request {self.ctx.request_id} were not all "
            "cleaned up (a commit may have failed) after the response's headers were "
            "sent, so the response was cut short: its last message was not sent, and "
            "the connection must be dropped."
        )
        raise self._cut from error

    async def _send_failure(self) -> None:
        await _send_json(self.to_server, "http.response", 500, CLEANUP_FAILED, [self._header])
