"""
Stream a user's events to Starlette and FastAPI clients: a WebSocket sink and a
Server-Sent Events response, and `close_on_signal`, which ends them when the
server is told to stop.

Install it with ``pip install usercontext[starlette]``. Both write one message
per flush of the hub: a WebSocket text message holding a JSON array of events,
or one chunk of SSE events. Both resume after a reconnect: SSE from the
``Last-Event-ID`` header browsers send back, or from a ``last_seq`` query
parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import weakref

from typing import TYPE_CHECKING, Any

import anyio

from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from usercontext import EmitterClosedError, EmitterHub, Event, SinkClosedError, current


if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
    from types import FrameType

    from starlette.background import BackgroundTask
    from starlette.types import Receive, Scope, Send

    from usercontext import Attachment


__all__ = ["EventSourceResponse", "WebSocketSink", "close_on_signal", "serve_websocket"]

_FROM_REQUEST: Any = object()
_DISCONNECTED = WebSocketState.DISCONNECTED
# Close codes (RFC 6455): the server goes away, or failed.
_GOING_AWAY = 1001
_POLICY_VIOLATION = 1008
_INTERNAL_ERROR = 1011
# Why the server ended a stream, for the client: a WebSocket close code and
# reason, and the data of the SSE ``close`` event.
_ENDS = {
    "shutdown": (_GOING_AWAY, "The server is shutting down."),
    "error": (_INTERNAL_ERROR, "The event stream failed."),
}
_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long close_on_signal waits for the streams to write their end once the
# hub closed: one small message each, unless a client stopped reading.
_END_TIMEOUT = 1.0


class _Open:
    """
    The streams of one hub still running, so that `close_on_signal` hands the
    signal on only once they have written their end.
    """

    def __init__(self) -> None:
        self.count = 0
        self.none = anyio.Event()


_OPEN: weakref.WeakKeyDictionary[EmitterHub, _Open] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _running(hub: EmitterHub) -> Generator[None, None, None]:
    """
    Count a stream of *hub* as running inside the block.
    """
    streams = _OPEN.get(hub)
    if streams is None:
        streams = _OPEN[hub] = _Open()
    streams.count += 1
    try:
        yield
    finally:
        streams.count -= 1
        if not streams.count:
            streams.none.set()
            del _OPEN[hub]


def _server_end(attachment: Attachment | None, hub: EmitterHub) -> str | None:
    """
    Why the hub ended a stream, as sent to its client: ``"shutdown"`` when the
    hub closed, ``"error"`` when the sink's sends failed for good; `None` when
    the client left or the sink was detached (the client is gone, or the app
    ended the stream itself).
    """
    reason = None if attachment is None else attachment.reason
    if reason == "failed":
        return "error"
    if reason == "hub_closed" or (reason is None and hub.closed):
        return "shutdown"
    return None


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
    detached), or when the hub stops the sink. When the hub closes, the
    socket gets what was emitted before the close (within the hub's drain
    timeout) and is then closed with code 1001 (going away) and the reason
    ``"The server is shutting down."``, also when it connects while the hub
    is closing; after sends kept failing, with code 1011. Messages the
    client sends are read and ignored: use a socket of its own for events.

    Args:
        websocket: The connection.
        hub: The running hub.
        user_id: Whose events to send; the user of `usercontext.current` by
            default.
        last_seq: Where to resume (see `usercontext.EmitterHub.aattach`); by
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
    with _running(hub):
        attachment: Attachment | None
        try:
            attachment = await hub.aattach(user_id, WebSocketSink(websocket), last_seq=last_seq)
        except ValueError as e:
            # A close reason holds 123 bytes of UTF-8: the message's start,
            # which names the value.
            reason = str(e).encode()[:123].decode(errors="ignore")
            await websocket.close(code=_POLICY_VIOLATION, reason=reason)
            return
        except EmitterClosedError:
            attachment = None  # connected while the server shuts down
        else:
            await _stream_websocket(websocket, attachment)
        end = _server_end(attachment, hub)
        if end is not None:
            code, reason = _ENDS[end]
            with contextlib.suppress(RuntimeError, OSError):  # closed meanwhile
                await websocket.close(code=code, reason=reason)


async def _stream_websocket(websocket: WebSocket, attachment: Attachment) -> None:
    """
    Stream until the client leaves or the hub stops the sink.
    """
    with attachment:
        async with anyio.create_task_group() as tg:

            async def until_disconnect() -> None:
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(until_disconnect)
            await attachment.wait()
            tg.cancel_scope.cancel()


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
    when the hub stops it. Then the server writes one last event with no
    ``id:`` line (so that ``Last-Event-ID`` stays on the last real event) and
    ends the body properly (the chunked terminator)::

        event: close
        data: {"reason":"shutdown"}

    The reason is ``"shutdown"`` when the hub closed (the server is going
    away: reconnect, with ``Last-Event-ID``, to resume on another instance),
    or ``"error"`` when the stream could not be written. Browsers deliver it
    to ``addEventListener("close", ...)``, not to ``onmessage``, and then
    reconnect by themselves. Events emitted before the hub's close are written
    before it, within the hub's drain timeout. A request that arrives while
    the hub is closing gets a 200 response holding only that event.

    Args:
        hub: The running hub.
        user_id: Whose events to send; the user of `usercontext.current` by
            default, read when the response starts.
        last_seq: Where to resume (see `usercontext.EmitterHub.aattach`); by
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
        self.background: BackgroundTask | None = None
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
        with _running(self.hub):
            lock = anyio.Lock()
            sink = _EventSourceSink(send, lock)
            attachment: Attachment | None
            async with lock:  # the headers go first
                try:
                    attachment = await self.hub.aattach(user_id, sink, last_seq=last_seq)
                except ValueError as e:
                    await PlainTextResponse(str(e), status_code=400)(scope, receive, send)
                    return
                except EmitterClosedError:
                    attachment = None  # the server shuts down: the stream ends at once
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
            if attachment is not None:
                await self._stream(attachment, sink, receive)
            end = _server_end(attachment, self.hub)
            last = b"" if end is None else f'event: close\ndata: {{"reason":"{end}"}}\n\n'.encode()
            async with lock:  # after a write in progress; none may follow
                if not sink.closed:
                    sink.closed = True
                    with contextlib.suppress(OSError):  # the client left meanwhile
                        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def _stream(
        self, attachment: Attachment, sink: _EventSourceSink, receive: Receive
    ) -> None:
        """
        Stream until the client leaves or the hub stops the sink.
        """
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


class _Relay:
    """
    Holds the first shutdown signal while the hub closes, then hands it on to
    the handler that was installed before (the server's).
    """

    def __init__(self, signals: Sequence[int]) -> None:
        previous = {sig: signal.getsignal(sig) for sig in signals}
        # None: a handler not installed from Python, which cannot be put back.
        self.previous = {s: signal.SIG_DFL if h is None else h for s, h in previous.items()}
        self.pending: list[int] = []
        self.released = False
        self.fired = anyio.Event()
        self._wake, self._hand_on = _loop_hooks()

    def install(self) -> None:
        for sig in self.previous:
            signal.signal(sig, self.handle)

    def handle(self, sig: int, frame: FrameType | None) -> None:
        if self.released:
            # Called by a handler installed over ours that chains to it.
            previous = self.previous[sig]
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)
            return
        self.pending.append(sig)
        if len(self.pending) == 1:
            self._wake(self.fired.set)
        else:
            # A second signal (a second Ctrl-C): the server gets both now, to
            # do what it does then (uvicorn quits without waiting).
            self.release()

    def release(self) -> None:
        """
        Put the previous handlers back and hand them the signals received.
        """
        if self.released:
            return
        self.released = True
        for sig, previous in self.previous.items():
            if signal.getsignal(sig) == self.handle:  # not replaced since
                signal.signal(sig, previous)
        self._hand_on(self.pending)


def _raise_again(signals: list[int]) -> None:
    """
    Raise *signals* again, for the handlers installed now: each runs before
    `signal.raise_signal` returns, as for a signal from outside (the default
    action included), and the loop's own handlers are woken too.
    """
    for sig in signals:
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.raise_signal(sig)


def _loop_hooks() -> tuple[Callable[[Callable[[], object]], object], Callable[[list[int]], None]]:
    """
    Return a function that runs a callback soon in the running event loop and
    is safe to call from a signal handler, and the function that raises the
    held signals again.
    """
    try:
        return asyncio.get_running_loop().call_soon_threadsafe, _raise_again
    except RuntimeError:  # anyio runs on trio
        import trio  # only when the app runs on trio

        # trio's SIGINT handler raises KeyboardInterrupt in the frame it
        # interrupts, unless that frame is protected: then trio delivers it
        # to the main task, as for a Ctrl-C that comes while trio runs.
        hand_on = trio.lowlevel.enable_ki_protection(_raise_again)
        return trio.lowlevel.current_trio_token().run_sync_soon, hand_on


@contextlib.asynccontextmanager
async def close_on_signal(
    hub: EmitterHub, signals: Sequence[int] = _SHUTDOWN_SIGNALS
) -> AsyncGenerator[None, None]:
    """
    close_on_signal(hub, signals=(signal.SIGINT, signal.SIGTERM))

    Close *hub* as soon as the server is told to stop, so that its streams
    end before the server waits for open connections.

    ASGI servers run the lifespan's shutdown only after the open connections
    have finished, or after their graceful-shutdown timeout: uvicorn waits
    for them (forever, by default) and hypercorn for ``graceful_timeout``,
    then cancels them. A hub closed in the lifespan cannot end its streams,
    so they hold the shutdown and are cut. Enter this in the lifespan, after
    the hub: on the first of *signals*, it closes the hub (every stream gets
    what was emitted before, within the hub's drain timeout, then ends: see
    `EventSourceResponse` and `serve_websocket`), and then hands the signal
    on to the handler installed before it (the server's) once the streams
    have written their end (waiting a second at most for a client that does
    not read), so that the server starts its shutdown with no stream open.
    A second signal meanwhile is handed on at once, with the first, so that a
    second Ctrl-C still forces the server to quit. Leaving the block puts the
    previous handlers back.

    Once the hub is closed, emits raise
    `usercontext.exceptions.EmitterClosedError`: a request still running then
    has no stream to send to. Signals can only be caught in the main thread:
    elsewhere (a server run in a thread, Starlette's TestClient) it does
    nothing, so close the hub before stopping such a server.

    Args:
        hub: The running hub to close.
        signals: The signals that start the server's shutdown.

    .. versionadded:: 0.1.0
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    relay = _Relay(signals)

    async def close_when_signalled() -> None:
        await relay.fired.wait()
        try:
            await hub.aclose()
            streams = _OPEN.get(hub)
            if streams is not None:
                with anyio.move_on_after(_END_TIMEOUT):
                    await streams.none.wait()
        finally:
            relay.release()

    relay.install()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(close_when_signalled)
            yield
            if not relay.pending:
                tg.cancel_scope.cancel()
    finally:
        relay.release()  # a signal that came as the block ended is handed on too
