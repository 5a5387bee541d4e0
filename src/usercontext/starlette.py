"""
Stream a user's events to Starlette and FastAPI clients: a WebSocket sink and a
Server-Sent Events response.

Install it with ``pip install usercontext[starlette]``. Both write one message
per flush of the hub: a WebSocket text message holding a JSON array of events,
or one chunk of SSE events. Both resume after a reconnect: SSE from the
``Last-Event-ID`` header browsers send back, or from a ``last_seq`` query
parameter.
"""

from __future__ import annotations

import contextlib

from typing import TYPE_CHECKING, Any

import anyio

from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from usercontext import EmitterHub, Event, SinkClosedError, current


if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from starlette.types import Receive, Scope, Send


__all__ = ["EventSourceResponse", "WebSocketSink", "serve_websocket"]

_FROM_REQUEST: Any = object()
_DISCONNECTED = WebSocketState.DISCONNECTED
# Close codes (RFC 6455): the server goes away, or failed.
_GOING_AWAY = 1001
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011


class WebSocketSink:
    """
    WebSocketSink(websocket)

    A sink writing each batch of events to a Starlette WebSocket as one text
    message: a JSON array of events (see `usercontext.Event.json`).

    When the connection is gone it raises
    `usercontext.exceptions.SinkClosedError`, so
    the hub stops at once instead of retrying.

    Args:
        websocket: An accepted WebSocket.

    .. versionadded:: 0.1.0
    """

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send(self, events: Sequence[Event]) -> None:
        """
        Send *events* as one JSON array.
        """
        ws = self.websocket
        if _DISCONNECTED in (ws.application_state, ws.client_state):
            msg = "The WebSocket is closed."
            raise SinkClosedError(msg)
        try:
            await ws.send_text(f"[{','.join([e.json for e in events])}]")
        except WebSocketDisconnect as e:
            msg = f"The WebSocket closed (code {e.code})."
            raise SinkClosedError(msg) from e
        except (RuntimeError, OSError) as e:
            if _DISCONNECTED in (ws.application_state, ws.client_state):
                msg = "The WebSocket closed."
                raise SinkClosedError(msg) from e
            raise

    def __repr__(self) -> str:
        client = self.websocket.client
        where = f"{client.host}:{client.port}" if client is not None else "?"
        return f"<usercontext.starlette.WebSocketSink({where})>"


async def serve_websocket(
    websocket: WebSocket,
    hub: EmitterHub,
    user_id: str | None = None,
    *,
    last_seq: int | str | None = _FROM_REQUEST,
) -> None:
    """
    serve_websocket(websocket, hub, user_id=None, *, last_seq=None)

    Stream the events of *user_id* to *websocket* until either side closes.

    It accepts the WebSocket if needed, attaches a `WebSocketSink` to the
    user's stream, and returns when the client disconnects (the sink is then
    detached), or when the hub stops the sink: on close (the socket is closed
    with code 1001) or after its sends kept failing (code 1011). Messages the
    client sends are read and ignored: use a socket of its own for events.

    Args:
        websocket: The connection.
        hub: The running hub.
        user_id: Whose events to send; the user of `usercontext.current` by
            default.
        last_seq: Where to resume (see `usercontext.EmitterHub.attach`); by
            default the ``last_seq`` query parameter, if any. A bad value
            closes the socket with code 1008.

    .. versionadded:: 0.1.0
    """
    if websocket.application_state == WebSocketState.CONNECTING:
        await websocket.accept()
    if user_id is None:
        user_id = current().user_id
    if last_seq is _FROM_REQUEST:
        last_seq = websocket.query_params.get("last_seq")
    try:
        attachment = hub.attach(user_id, WebSocketSink(websocket), last_seq=last_seq)
    except ValueError as e:
        await websocket.close(code=_POLICY_VIOLATION, reason=str(e)[:120])
        return
    with attachment:
        async with anyio.create_task_group() as tg:

            async def until_disconnect() -> None:
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(until_disconnect)
            await attachment.wait()
            tg.cancel_scope.cancel()
    reason = attachment.reason
    if reason in ("hub_closed", "failed") or (reason is None and hub.closed):
        code = _INTERNAL_ERROR if reason == "failed" else _GOING_AWAY
        with contextlib.suppress(RuntimeError, OSError):  # closed meanwhile
            await websocket.close(code=code)


class _EventSourceSink:
    """
    Writes batches of events as SSE body chunks on an ASGI *send*.
    """

    def __init__(self, send: Send, lock: anyio.Lock) -> None:
        self._send = send
        self._lock = lock
        self.closed = False

    async def write(self, chunk: bytes) -> None:
        async with self._lock:
            if self.closed:
                msg = "The event stream's client is gone."
                raise SinkClosedError(msg)
            try:
                await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
            except OSError as e:
                self.closed = True
                msg = "The event stream's client is gone."
                raise SinkClosedError(msg) from e

    async def send(self, events: Sequence[Event]) -> None:
        await self.write(
            "".join([f"id: {e.event_id}\ndata: {e.json}\n\n" for e in events]).encode("ascii")
        )

    def __repr__(self) -> str:
        return "<usercontext.starlette.EventSourceResponse sink>"


class EventSourceResponse(Response):
    """
    A Server-Sent Events response streaming the events of one user.

    Each event is written as ``id: <event_id>`` and ``data: <event JSON>``
    (no ``event:`` line, so browsers deliver every event to ``onmessage``), and
    each flush of the hub as one chunk. Browsers send the last id back as
    ``Last-Event-ID`` when they reconnect, and the stream resumes after it; a
    ``last_seq`` query parameter does the same for other clients. While idle,
    a comment line is sent every *ping* seconds so that proxies keep the
    connection open.

    The response ends when the client disconnects (the sink is detached), or
    when the hub stops it (close, or failing sends).

    Args:
        hub: The running hub.
        user_id: Whose events to send; the user of `usercontext.current` by
            default, read when the response starts.
        last_seq: Where to resume (see `usercontext.EmitterHub.attach`); by
            default the ``Last-Event-ID`` header, else the ``last_seq`` query
            parameter. A bad value gets a 400 response.
        ping: Seconds between keep-alive comments, or `None` for none.
        headers: More response headers.

    .. versionadded:: 0.1.0
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        hub: EmitterHub,
        user_id: str | None = None,
        *,
        last_seq: int | str | None = _FROM_REQUEST,
        ping: float | None = 15.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if ping is not None and not ping > 0:
            msg = f"ping must be a positive number of seconds or None, got {ping!r}."
            raise ValueError(msg)
        self.hub = hub
        self.user_id = user_id
        self.last_seq = last_seq
        self.ping = ping
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # nested tasks
        """
        Stream the events as an ASGI response.
        """
        last_seq = self.last_seq
        if last_seq is _FROM_REQUEST:
            request = HTTPConnection(scope)
            last_seq = request.headers.get("last-event-id", request.query_params.get("last_seq"))
        user_id = self.user_id if self.user_id is not None else current().user_id
        lock = anyio.Lock()
        sink = _EventSourceSink(send, lock)
        async with lock:  # the headers go first
            try:
                attachment = self.hub.attach(user_id, sink, last_seq=last_seq)
            except ValueError as e:
                await PlainTextResponse(str(e), status_code=400)(scope, receive, send)
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
        with attachment:
            async with anyio.create_task_group() as tg:

                async def until_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    sink.closed = True
                    tg.cancel_scope.cancel()

                async def keep_alive(every: float) -> None:
                    try:
                        while True:
                            await anyio.sleep(every)
                            await sink.write(b": ping\n\n")
                    except SinkClosedError:
                        tg.cancel_scope.cancel()

                tg.start_soon(until_disconnect)
                if self.ping is not None:
                    tg.start_soon(keep_alive, self.ping)
                await attachment.wait()
                tg.cancel_scope.cancel()
        if not sink.closed:
            with contextlib.suppress(OSError):  # the client left meanwhile
                await send({"type": "http.response.body", "body": b"", "more_body": False})
