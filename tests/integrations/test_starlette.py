"""
Tests of `usercontext.starlette`: the WebSocket sink, `serve_websocket` and the
Server-Sent Events response, at the ASGI level on asyncio and trio, and end to
end through Starlette's TestClient.

They are skipped when starlette (or httpx, for the TestClient) is missing,
unless ``CI=true``, where a missing dependency fails the run (see the root
conftest.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading

import anyio
import pytest

import usercontext as uc


pytest.importorskip(
    "starlette", reason="starlette is not installed: pip install usercontext[starlette]"
)
# Starlette's TestClient needs it (httpx before Starlette 1).
pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketState

from usercontext.starlette import (
    EventSourceResponse,
    WebSocketSink,
    close_on_signal,
    serve_websocket,
)

from helpers import until


TYPE = "tool_executing"


class Client:
    """
    The client side of one ASGI connection: what it receives, and when it
    disconnects.
    """

    def __init__(self, first, disconnect_type, *, fail_after_disconnect=False, then=()):
        self.sent = []
        self.first = first
        self.then = list(then)
        self.disconnect_type = disconnect_type
        self.gone = anyio.Event()
        self.got = anyio.Event()
        self.fail_after_disconnect = fail_after_disconnect
        self.fail_sends = False

    async def receive(self):
        if self.first:
            message, self.first = self.first, None
            return message
        if self.then:
            return self.then.pop(0)
        await self.gone.wait()
        return {"type": self.disconnect_type}

    async def send(self, message):
        if self.fail_sends or (self.fail_after_disconnect and self.gone.is_set()):
            raise OSError("broken pipe")
        self.sent.append(message)
        self.got.set()

    def body(self):
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    def chunks(self):
        return [m["body"] for m in self.sent if m["type"] == "http.response.body" and m["body"]]

    def texts(self):
        return [m["text"] for m in self.sent if m["type"] == "websocket.send"]


def http_scope(query=b"", headers=()):
    return {
        "type": "http",
        "method": "GET",
        "path": "/events",
        "query_string": query,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


def ws_scope(query=b""):
    return {
        "type": "websocket",
        "path": "/events",
        "query_string": query,
        "headers": [],
        "client": ("127.0.0.1", 5000),
    }


CLOSE = b'event: close\ndata: {"reason":"shutdown"}\n\n'


def sse_events(body):
    """
    Parse an SSE body into (id, event dict) pairs, skipping comments and the
    final ``close`` event.
    """
    out = []
    for block in body.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            fields = dict(line.split(": ", 1) for line in lines)
            if fields.get("event") != "close":
                out.append((fields["id"], json.loads(fields["data"])))
    return out


class TestEventSource:
    async def test_streams_events_one_chunk_per_flush(self, ctx):
        """
        The response sends SSE headers, then each flush of the hub as one chunk
        of `id:`/`data:` events, and detaches when the client disconnects.
        """
        client = Client({"type": "http.request", "body": b""}, "http.disconnect")
        async with uc.EmitterHub() as hub, anyio.create_task_group() as tg:
            tg.start_soon(
                EventSourceResponse(hub, "u-42"), http_scope(), client.receive, client.send
            )
            await until(lambda: hub.stats().attached == 1)
            emitter = hub.emitter(ctx)
            for i in range(5):
                emitter.emit_nowait(TYPE, {"i": i})
            await until(lambda: len(client.chunks()) == 1)
            client.gone.set()
            await until(lambda: hub.stats().attached == 0)

        start = client.sent[0]
        assert start["type"] == "http.response.start"
        assert start["status"] == 200
        headers = dict(start["headers"])
        assert headers[b"content-type"].startswith(b"text/event-stream")
        assert headers[b"cache-control"] == b"no-cache"
        assert headers[b"x-accel-buffering"] == b"no"
        (chunk,) = client.chunks()
        events = sse_events(chunk)
        assert [e["seq"] for _, e in events] == [1, 2, 3, 4, 5]
        assert [e["data"]["i"] for _, e in events] == [0, 1, 2, 3, 4]
        assert all(event_id == e["event_id"] for event_id, e in events)
        assert {e["user_id"] for _, e in events} == {"u-42"}
        assert client.sent[-1]["more_body"] is True  # the client left: no last message

    @pytest.mark.parametrize("where", ["header", "query"])
    async def test_resumes_after_last_event_id(self, ctx, where):
        """
        The stream resumes after the Last-Event-ID header, or a last_seq query
        parameter.
        """
        async with uc.EmitterHub() as hub:
            events = [hub.emitter(ctx).emit_nowait(TYPE, {"i": i}) for i in range(5)]
            if where == "header":
                scope = http_scope(headers=[("Last-Event-ID", events[2].event_id)])
            else:
                scope = http_scope(query=b"last_seq=3&x=1")
            client = Client({"type": "http.request"}, "http.disconnect")
            async with anyio.create_task_group() as tg:
                tg.start_soon(EventSourceResponse(hub, "u-42"), scope, client.receive, client.send)
                await until(lambda: len(client.chunks()) == 1)
                client.gone.set()

        assert [e["seq"] for _, e in sse_events(client.body())] == [4, 5]

    async def test_explicit_last_seq_and_current_user(self, ctx):
        """
        An explicit last_seq wins over the request's; the user defaults to the
        bound context's.
        """
        async with uc.EmitterHub() as hub:
            for i in range(3):
                hub.emitter(ctx).emit_nowait(TYPE, {"i": i})
            client = Client({"type": "http.request"}, "http.disconnect")
            scope = http_scope(query=b"last_seq=2")
            async with anyio.create_task_group() as tg:
                with uc.bind(ctx):
                    response = EventSourceResponse(hub, last_seq=0, ping=None)
                    tg.start_soon(response, scope, client.receive, client.send)
                await until(lambda: len(client.chunks()) == 1)
                client.gone.set()

        assert [e["seq"] for _, e in sse_events(client.body())] == [1, 2, 3]

    async def test_bad_last_event_id_is_a_400(self):
        """
        A Last-Event-ID that is no event id gets a 400 response saying why.
        """
        client = Client({"type": "http.request"}, "http.disconnect")
        async with uc.EmitterHub() as hub:
            scope = http_scope(headers=[("last-event-id", "nonsense")])
            await EventSourceResponse(hub, "u-42")(scope, client.receive, client.send)
            stats = hub.stats()

        assert client.sent[0]["status"] == 400
        assert b"last_seq 'nonsense' is not a non-negative int or an event id" in client.body()
        assert stats.attached == 0

    async def test_pings_while_idle(self):
        """
        While no event comes, a comment line is sent every `ping` seconds.
        """
        client = Client({"type": "http.request"}, "http.disconnect")
        async with uc.EmitterHub() as hub, anyio.create_task_group() as tg:
            response = EventSourceResponse(hub, "u-42", ping=0.005)
            tg.start_soon(response, http_scope(), client.receive, client.send)
            await until(lambda: client.body().count(b": ping\n\n") >= 2)
            client.gone.set()

        assert sse_events(client.body()) == []

    async def test_ping_to_a_gone_client_ends_the_response(self):
        """
        A ping that finds the client gone ends the response quietly.
        """
        client = Client({"type": "http.request"}, "http.disconnect")
        async with uc.EmitterHub() as hub:
            client.fail_sends = False
            response = EventSourceResponse(hub, "u-42", ping=0.005)
            async with anyio.create_task_group() as tg:
                tg.start_soon(response, http_scope(), client.receive, client.send)
                await until(lambda: hub.stats().attached == 1)
                client.fail_sends = True
                await until(lambda: hub.stats().attached == 0)
                client.gone.set()

    async def test_hub_close_ends_the_response(self, ctx):
        """
        When the hub closes, the response delivers what was buffered, then
        ends with a ``close`` event (no id) in the body's last message.
        """
        client = Client({"type": "http.request"}, "http.disconnect")
        async with anyio.create_task_group() as tg:
            async with uc.EmitterHub() as hub:
                tg.start_soon(
                    EventSourceResponse(hub, "u-42"), http_scope(), client.receive, client.send
                )
                await until(lambda: hub.stats().attached == 1)
                for _ in range(3):
                    hub.emitter(ctx).emit_nowait(TYPE)
                hub.emitter(ctx).emit_nowait(uc.AGENT_COMPLETED)
            await until(lambda: client.sent[-1].get("more_body") is False)
            client.gone.set()

        events = client.body().removesuffix(CLOSE)
        assert [e["seq"] for _, e in sse_events(events)] == [1, 2, 3, 4]
        assert events.endswith(b"\n\n")
        assert client.sent[-1] == {"type": "http.response.body", "body": CLOSE, "more_body": False}

    async def test_request_while_hub_closes_gets_only_the_close_event(self):
        """
        A stream requested while the hub is closing (the server shuts down)
        is a 200 whose body is the ``close`` event alone: browsers reconnect
        after it, where a 5xx would make them give up.
        """
        client = Client({"type": "http.request"}, "http.disconnect")
        hub = uc.EmitterHub()
        async with hub:
            pass
        await EventSourceResponse(hub, "u-42")(http_scope(), client.receive, client.send)

        assert client.sent[0]["status"] == 200
        assert client.body() == CLOSE
        assert client.sent[-1]["more_body"] is False

    async def test_failing_sends_end_with_an_error_close_event(self, ctx):
        """
        When the hub gives up on a sink whose sends keep failing (not a gone
        client), the response ends with a ``close`` event of reason ``error``.
        """
        client = Client({"type": "http.request"}, "http.disconnect")
        original = client.send

        async def fail_events(message):
            if message.get("body", b"").startswith(b"id: "):
                raise RuntimeError("encoder bug")
            await original(message)

        retry = uc.Retry(attempts=1)
        hub = uc.EmitterHub(retry=retry, on_dead_letter=lambda _: None)
        async with hub, anyio.create_task_group() as tg:
            tg.start_soon(
                EventSourceResponse(hub, "u-42"), http_scope(), client.receive, fail_events
            )
            await until(lambda: hub.stats().attached == 1)
            hub.emitter(ctx).emit_nowait(TYPE)
            await until(lambda: client.sent and client.sent[-1].get("more_body") is False)
            client.gone.set()

        assert client.body() == b'event: close\ndata: {"reason":"error"}\n\n'

    async def test_client_gone_while_sending(self, ctx):
        """
        A write that fails because the client left stops the sink at once (no
        retries) and its events go to the dead-letter hook.
        """
        letters = []
        client = Client({"type": "http.request"}, "http.disconnect")
        async with uc.EmitterHub(on_dead_letter=letters.append) as hub:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    EventSourceResponse(hub, "u-42"), http_scope(), client.receive, client.send
                )
                await until(lambda: hub.stats().attached == 1)
                client.fail_sends = True
                hub.emitter(ctx).emit_nowait(TYPE)
                await until(lambda: hub.stats().attached == 0)
                client.gone.set()
            stats = hub.stats()

        assert [letter.reason for letter in letters] == ["sink_closed"]
        assert stats.retried == 0

    async def test_write_after_disconnect(self):
        """
        Once the client is known to be gone, writes raise SinkClosedError.
        """
        from usercontext.starlette import _EventSourceSink

        client = Client(None, "http.disconnect")
        sink = _EventSourceSink(client.send, anyio.Lock())
        sink.closed = True

        with pytest.raises(uc.SinkClosedError, match="client is gone"):
            await sink.send([uc.Event(TYPE, None, 1, "a-1", 1, "u-42")])
        assert client.sent == []
        assert "EventSourceResponse" in repr(sink)

    def test_ping_must_be_positive(self):
        """
        ping must be a positive number of seconds or None.
        """
        with pytest.raises(ValueError, match="ping must be a positive number"):
            EventSourceResponse(uc.EmitterHub(), "u-42", ping=0)


class TestWebSocket:
    async def test_serve_websocket(self, ctx):
        """
        serve_websocket accepts, sends each flush as one JSON array, and
        returns (detached) when the client disconnects.
        """
        client = Client({"type": "websocket.connect"}, "websocket.disconnect")
        ws = WebSocket(ws_scope(), client.receive, client.send)
        async with uc.EmitterHub() as hub, anyio.create_task_group() as tg:
            tg.start_soon(serve_websocket, ws, hub, "u-42")
            await until(lambda: hub.stats().attached == 1)
            emitter = hub.emitter(ctx)
            for i in range(3):
                emitter.emit_nowait(TYPE, {"i": i})
            await until(lambda: len(client.texts()) == 1)
            client.gone.set()
            await until(lambda: hub.stats().attached == 0)

        assert client.sent[0] == {"type": "websocket.accept", "subprotocol": None, "headers": []}
        (text,) = client.texts()
        assert [e["seq"] for e in json.loads(text)] == [1, 2, 3]

    async def test_accepted_socket_explicit_last_seq_and_client_messages(self, ctx):
        """
        An accepted socket is served as it is, an explicit last_seq wins over the
        query, and messages from the client are read and ignored.
        """
        client = Client(
            {"type": "websocket.connect"},
            "websocket.disconnect",
            then=[{"type": "websocket.receive", "text": "hello"}],
        )
        ws = WebSocket(ws_scope(b"last_seq=2"), client.receive, client.send)
        await ws.accept()
        async with uc.EmitterHub() as hub:
            for i in range(3):
                hub.emitter(ctx).emit_nowait(TYPE, {"i": i})
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(serve_websocket, ws, hub, "u-42", last_seq=0))
                await until(lambda: len(client.texts()) == 1)
                client.gone.set()

        assert [m["type"] for m in client.sent].count("websocket.accept") == 1
        assert [e["seq"] for e in json.loads(client.texts()[0])] == [1, 2, 3]

    async def test_resume_from_query_and_current_user(self, ctx):
        """
        The last_seq query parameter resumes the stream; the user defaults to
        the bound context's.
        """
        client = Client({"type": "websocket.connect"}, "websocket.disconnect")
        ws = WebSocket(ws_scope(b"last_seq=1"), client.receive, client.send)
        async with uc.EmitterHub() as hub:
            for i in range(3):
                hub.emitter(ctx).emit_nowait(TYPE, {"i": i})
            async with anyio.create_task_group() as tg:
                with uc.bind(ctx):
                    tg.start_soon(serve_websocket, ws, hub)
                await until(lambda: len(client.texts()) == 1)
                client.gone.set()

        assert [e["seq"] for e in json.loads(client.texts()[0])] == [2, 3]

    @pytest.mark.parametrize(
        ("query", "named"),
        [
            (b"last_seq=-3", "'-3'"),
            (b"last_seq=%C3%A9-" + b"x" * 80, "'\u00e9-xxxxxxxxxx"),
        ],
    )
    async def test_bad_last_seq_closes_1008(self, query, named):
        """
        A bad last_seq closes the socket with code 1008 (policy violation),
        with a reason that names the value, within the 123 bytes a close
        reason holds.
        """
        client = Client({"type": "websocket.connect"}, "websocket.disconnect")
        ws = WebSocket(ws_scope(query), client.receive, client.send)
        async with uc.EmitterHub() as hub:
            await serve_websocket(ws, hub, "u-42")

        close = client.sent[-1]
        assert (close["type"], close["code"]) == ("websocket.close", 1008)
        assert close["reason"].startswith(f"last_seq {named}")
        assert "is not a non-negative int or an event id" in close["reason"]
        assert len(close["reason"].encode()) <= 123

    @pytest.mark.parametrize(
        ("failing", "code", "reason"),
        [(False, 1001, "The server is shutting down."), (True, 1011, "The event stream failed.")],
    )
    async def test_server_side_end_closes_the_socket(self, ctx, failing, code, reason):
        """
        When the hub closes, or the sink's sends keep failing, the socket is
        closed with 1001 (going away) or 1011 (internal error), and a reason.
        """
        client = Client({"type": "websocket.connect"}, "websocket.disconnect")
        ws = WebSocket(ws_scope(), client.receive, client.send)
        retry = uc.Retry(attempts=1)
        async with anyio.create_task_group() as tg:
            async with uc.EmitterHub(retry=retry, on_dead_letter=lambda _: None) as hub:
                tg.start_soon(serve_websocket, ws, hub, "u-42")
                await until(lambda: hub.stats().attached == 1)
                if failing:
                    original = client.send

                    async def fail_texts(message):
                        if message["type"] == "websocket.send":
                            raise RuntimeError("transport hiccup")
                        await original(message)

                    client.send = fail_texts  # type: ignore[method-assign]
                    ws._send = fail_texts
                    hub.emitter(ctx).emit_nowait(TYPE)
                    await until(lambda: hub.stats().attached == 0)
            await until(lambda: client.sent[-1]["type"] == "websocket.close")
            client.gone.set()

        assert client.sent[-1]["code"] == code
        assert client.sent[-1]["reason"] == reason

    async def test_connect_while_hub_closes(self):
        """
        A socket that connects while the hub is closing (the server shuts
        down) is accepted, then closed at once with 1001 and the reason.
        """
        client = Client({"type": "websocket.connect"}, "websocket.disconnect")
        hub = uc.EmitterHub()
        async with hub:
            pass
        await serve_websocket(WebSocket(ws_scope(), client.receive, client.send), hub, "u-42")

        assert [m["type"] for m in client.sent] == ["websocket.accept", "websocket.close"]
        assert (client.sent[-1]["code"], client.sent[-1]["reason"]) == (
            1001,
            "The server is shutting down.",
        )

    async def test_sink_maps_closed_sockets(self, ctx):
        """
        WebSocketSink raises SinkClosedError once the socket is closed or the
        client left, and lets other errors through to be retried.
        """
        events = [uc.Event(TYPE, None, 1, "a-1", 1, "u-42")]

        async def broken(_message):
            raise OSError("reset")

        ws = WebSocket(ws_scope(), Client(None, "").receive, broken)
        ws.application_state = WebSocketState.CONNECTED
        sink = WebSocketSink(ws)
        assert repr(sink) == "<usercontext.starlette.WebSocketSink(127.0.0.1:5000)>"
        with pytest.raises(uc.SinkClosedError, match="closed \\(code 1006\\)"):
            await sink.send(events)
        with pytest.raises(uc.SinkClosedError, match="is closed"):
            await sink.send(events)

        async def disconnected(_message):
            ws2.client_state = WebSocketState.DISCONNECTED
            raise RuntimeError("disconnected")

        ws2 = WebSocket({**ws_scope(), "client": None}, Client(None, "").receive, disconnected)
        ws2.application_state = WebSocketState.CONNECTED
        assert repr(WebSocketSink(ws2)) == "<usercontext.starlette.WebSocketSink(?)>"
        with pytest.raises(uc.SinkClosedError, match=r"The WebSocket closed\."):
            await WebSocketSink(ws2).send(events)

        async def hiccup(_message):
            raise RuntimeError("hiccup")

        ws3 = WebSocket(ws_scope(), Client(None, "").receive, hiccup)
        ws3.application_state = WebSocketState.CONNECTED
        with pytest.raises(RuntimeError, match="hiccup"):
            await WebSocketSink(ws3).send(events)


class Server:
    """
    Stands in for a server's signal handler: records the signals it gets,
    and what *probe* returns at that moment.
    """

    def __init__(self):
        self.signals = []
        self.seen = []
        self.probe = lambda: None

    def handle_exit(self, sig, _frame):
        self.signals.append(sig)
        self.seen.append(self.probe())


@pytest.fixture(name="server")
def _server():
    """
    A `Server` installed as the handler of SIGINT and SIGTERM, as uvicorn
    installs its own before the app starts; the old handlers are put back.
    """
    server = Server()
    saved = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield server
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Stalled:
    """
    A sink whose sends wait for *gate*.
    """

    def __init__(self):
        self.gate = anyio.Event()
        self.events = []

    async def send(self, events):
        await self.gate.wait()
        self.events.extend(events)


class TestCloseOnSignal:
    async def test_streams_end_before_the_server_hears_the_signal(self, ctx, server):
        """
        On SIGTERM the hub closes: both streams get every event emitted
        before, the SSE body ends with the close event and the WebSocket is
        closed with 1001; only then does the server's handler get the signal,
        once. Leaving the block puts the server's handler back.
        """
        sse = Client({"type": "http.request"}, "http.disconnect")
        ws = Client({"type": "websocket.connect"}, "websocket.disconnect")
        server.probe = lambda: (sse.sent[-1], ws.sent[-1])
        async with uc.EmitterHub() as hub, anyio.create_task_group() as tg:
            async with close_on_signal(hub):
                assert signal.getsignal(signal.SIGTERM) != server.handle_exit
                tg.start_soon(EventSourceResponse(hub, "u-42"), http_scope(), sse.receive, sse.send)
                websocket = WebSocket(ws_scope(), ws.receive, ws.send)
                tg.start_soon(serve_websocket, websocket, hub, "u-42")
                await until(lambda: hub.stats().attached == 2)
                for i in range(50):
                    hub.emitter(ctx).emit_nowait(TYPE, {"i": i})
                signal.raise_signal(signal.SIGTERM)
                await until(lambda: server.signals)
                assert hub.closed
            assert signal.getsignal(signal.SIGTERM) == server.handle_exit
            sse.gone.set()
            ws.gone.set()

        assert server.signals == [signal.SIGTERM]
        last_body, last_ws = server.seen[0]
        assert last_body == {"type": "http.response.body", "body": CLOSE, "more_body": False}
        assert last_ws == {
            "type": "websocket.close",
            "code": 1001,
            "reason": "The server is shutting down.",
        }
        assert [e["seq"] for _, e in sse_events(sse.body())] == list(range(1, 51))
        assert [e["seq"] for t in ws.texts() for e in json.loads(t)] == list(range(1, 51))

    async def test_second_signal_is_handed_on_at_once(self, ctx, server):
        """
        While the close waits for a slow stream, a second signal (a second
        Ctrl-C) hands both to the server at once; none is handed on again
        when the close ends.
        """
        sink = Stalled()
        async with uc.EmitterHub(drain_timeout=10) as hub:
            async with close_on_signal(hub):
                hub.attach("u-42", sink)
                hub.emitter(ctx).emit_nowait(TYPE)
                signal.raise_signal(signal.SIGINT)
                await until(lambda: hub.closed)
                await anyio.sleep(0.05)
                assert server.signals == []
                signal.raise_signal(signal.SIGINT)
                assert server.signals == [signal.SIGINT, signal.SIGINT]
                assert signal.getsignal(signal.SIGINT) == server.handle_exit
                sink.gate.set()
            assert [e.seq for e in sink.events] == [1]
        assert server.signals == [signal.SIGINT, signal.SIGINT]

    async def test_no_signal(self, server):
        """
        Without a signal the hub stays open until its own block ends; leaving
        puts the previous handlers back, and a later signal goes straight to
        the server without closing anything.
        """
        async with uc.EmitterHub() as hub:
            async with close_on_signal(hub, signals=(signal.SIGTERM,)):
                await anyio.sleep(0.01)
            assert signal.getsignal(signal.SIGTERM) == server.handle_exit
            signal.raise_signal(signal.SIGTERM)
            assert server.signals == [signal.SIGTERM]
            assert not hub.closed

    async def test_a_handler_replaced_meanwhile_is_left_alone(self, server):
        """
        A handler installed over ours while the block runs stays when it ends.
        """

        def other(_sig, _frame):
            pass

        async with uc.EmitterHub() as hub, close_on_signal(hub, signals=(signal.SIGTERM,)):
            signal.signal(signal.SIGTERM, other)
        try:
            assert signal.getsignal(signal.SIGTERM) is other
        finally:
            signal.signal(signal.SIGTERM, server.handle_exit)

    @pytest.mark.parametrize("previous", ["server", signal.SIG_IGN, signal.SIG_DFL])
    async def test_a_handler_over_ours_that_chains_to_it(self, server, previous, monkeypatch):
        """
        A handler installed over ours that calls ours in turn still reaches
        the handler from before once the block has ended: the server's, or
        the default action; an ignored signal stays ignored.
        """
        if previous != "server":
            signal.signal(signal.SIGTERM, previous)
        chained = []

        async with uc.EmitterHub() as hub, close_on_signal(hub, signals=(signal.SIGTERM,)):
            ours = signal.getsignal(signal.SIGTERM)

            def chaining(sig, frame):
                chained.append(sig)
                ours(sig, frame)

            signal.signal(signal.SIGTERM, chaining)
        raised = []
        monkeypatch.setattr(signal, "raise_signal", raised.append)
        try:
            chaining(signal.SIGTERM, None)
            after = signal.getsignal(signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, server.handle_exit)

        assert chained == [signal.SIGTERM]
        if previous == "server":
            assert (server.signals, raised, after) == ([signal.SIGTERM], [], chaining)
        elif previous is signal.SIG_DFL:
            assert (server.signals, raised, after) == ([], [signal.SIGTERM], signal.SIG_DFL)
        else:
            assert (server.signals, raised, after) == ([], [], chaining)

    @pytest.mark.parametrize("previous", [signal.SIG_IGN, signal.SIG_DFL, None])
    async def test_previous_handler_not_a_function(self, previous, monkeypatch):
        """
        An ignored signal is not handed on; one with the default action, or
        with a handler not installed from Python, is raised again once the
        default action is back.
        """
        raise_signal = signal.raise_signal
        raised = []
        saved = signal.signal(signal.SIGTERM, signal.SIG_IGN if previous is None else previous)
        try:
            if previous is None:
                getsignal = signal.getsignal
                monkeypatch.setattr(signal, "getsignal", lambda sig: None)
            async with uc.EmitterHub() as hub, close_on_signal(hub, signals=(signal.SIGTERM,)):
                if previous is None:
                    monkeypatch.setattr(signal, "getsignal", getsignal)
                monkeypatch.setattr(signal, "raise_signal", raised.append)
                raise_signal(signal.SIGTERM)
                await until(lambda: hub.closed)
                await anyio.sleep(0.05)
            after = signal.getsignal(signal.SIGTERM)
        finally:
            signal.signal(signal.SIGTERM, saved)

        if previous is signal.SIG_IGN:
            assert (raised, after) == ([], signal.SIG_IGN)
        else:
            assert (raised, after) == ([signal.SIGTERM], signal.SIG_DFL)

    async def test_outside_the_main_thread_it_does_nothing(self, anyio_backend, server):
        """
        Signals can only be caught in the main thread: elsewhere the block
        installs nothing and closes nothing.
        """
        seen = []

        async def in_thread():
            async with uc.EmitterHub() as hub, close_on_signal(hub):
                seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(hub.closed)

        thread = threading.Thread(
            target=anyio.run, args=(in_thread,), kwargs={"backend": anyio_backend}
        )
        thread.start()
        await anyio.to_thread.run_sync(thread.join)

        assert seen == [server.handle_exit, True]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_end_to_end_with_test_client(backend):
    """
    In a Starlette app whose lifespan runs the hub, an HTTP request emits and
    a WebSocket of the same user receives the events, and reconnects resume.
    """
    hub = uc.EmitterHub()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        async with hub:
            yield

    async def emit(request):
        ctx = uc.UserContext(user_id=request.path_params["user"], thread_id="t", run_id="r")
        emitter = hub.emitter(ctx)
        await emitter.emit(uc.AGENT_STARTED, {"agent": "triage"})
        event = await emitter.emit(uc.AGENT_COMPLETED, {"answer": 42})
        return JSONResponse({"seq": event.seq})

    async def events(websocket):
        await serve_websocket(websocket, hub, websocket.path_params["user"])

    app = Starlette(
        routes=[
            Route("/emit/{user}", emit, methods=["POST"]),
            WebSocketRoute("/ws/{user}", events),
        ],
        lifespan=lifespan,
    )
    with TestClient(app, backend=backend) as client:
        with (
            client.websocket_connect("/ws/u-1") as ws,
            client.websocket_connect("/ws/u-2") as other,
        ):
            assert client.post("/emit/u-1").json() == {"seq": 2}
            received = []
            while len(received) < 2:
                received += json.loads(ws.receive_text())
            assert client.post("/emit/u-2").json() == {"seq": 2}
            theirs = json.loads(other.receive_text())
        with client.websocket_connect("/ws/u-1?last_seq=1") as again:
            resumed = json.loads(again.receive_text())

    assert [(e["type"], e["seq"], e["user_id"]) for e in received] == [
        (uc.AGENT_STARTED, 1, "u-1"),
        (uc.AGENT_COMPLETED, 2, "u-1"),
    ]
    assert {e["user_id"] for e in theirs} == {"u-2"}
    assert [e["seq"] for e in resumed] == [2]
    assert hub.closed
