"""
`usercontext.starlette.close_on_signal` under a real uvicorn: a server told to
stop while an SSE stream and a WebSocket are open ends both cleanly and exits
at once, instead of holding its shutdown for its whole graceful timeout and
cutting the SSE body.

The server runs in a subprocess on a free 127.0.0.1 port, so that it can be
sent SIGTERM and SIGINT. The tests are skipped when uvicorn or websockets is
missing, unless ``CI=true``, where that fails them (see the root conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest


pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")
pytest.importorskip("websockets", reason="websockets is not installed: pip install websockets")

import httpx2

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


# Each test starts uvicorn (as `python -m uvicorn`).
pytestmark = pytest.mark.server("uvicorn")


#: uvicorn's graceful-shutdown timeout: the server must exit well before it.
GRACE = 30
#: Events emitted before the signal, of about 50 KB each: 10 MB per stream,
#: more than the socket buffers hold while the clients do not read.
EVENTS = 200
#: How long the clients wait before they read, so that the events are still
#: being delivered when the signal arrives, and the server must wait for them.
PAUSE = 0.5
CLOSE = b'event: close\ndata: {"reason":"shutdown"}\n\n'

APP = """
import contextlib

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute

import usercontext as uc
from usercontext.starlette import EventSourceResponse, close_on_signal, serve_websocket

hub = uc.EmitterHub(maxsize=1_000, max_batch=1, drain_timeout=10)
PAD = "x" * 50_000


@contextlib.asynccontextmanager
async def lifespan(app):
    async with hub, close_on_signal(hub):
        yield


async def emit(request):
    emitter = hub.emitter(uc.UserContext(user_id="u-1", thread_id="t", run_id="r"))
    for i in range(int(request.query_params["n"])):
        emitter.emit_nowait("tool_executing", {"i": i, "pad": PAD})
    return PlainTextResponse(str(hub.stats().attached))


async def sse(request):
    return EventSourceResponse(hub, "u-1")


async def ws(websocket):
    await serve_websocket(websocket, hub, "u-1")


app = Starlette(
    routes=[Route("/emit", emit, methods=["POST"]), Route("/sse", sse), WebSocketRoute("/ws", ws)],
    lifespan=lifespan,
)
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Uvicorn:
    """
    uvicorn serving `APP` in a subprocess, on a free loopback port.
    """

    def __init__(self, folder, ws):
        (folder / "shutdown_app.py").write_text(textwrap.dedent(APP), encoding="utf-8")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(  # noqa: S603  # our interpreter, our app
            [
                sys.executable,
                "-m",
                "uvicorn",
                "shutdown_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--ws",
                ws,
                "--timeout-graceful-shutdown",
                str(GRACE),
            ],
            cwd=folder,
            stderr=subprocess.PIPE,
            text=True,
        )

    def answers(self, client):
        try:
            client.get(f"{self.base}/ready")
        except httpx2.TransportError:
            return False
        return True

    def wait_ready(self, client):
        deadline = time.monotonic() + 20
        while not self.answers(client):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                pytest.fail(f"uvicorn did not start:\n{self.proc.communicate()[1]}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=10)[1]


class Clients:
    """
    An SSE client and a WebSocket client of `APP`, each reading in a thread
    of its own once *attached* is set and `PAUSE` has passed.
    """

    def __init__(self, server, client, websocket):
        self.server = server
        self.client = client
        self.websocket = websocket
        self.attached = threading.Event()
        self.sse_body = bytearray()
        self.sse_errors = []
        self.ws_events = []
        self.ws_close = []
        self.threads = [
            threading.Thread(target=self.read_sse),
            threading.Thread(target=self.read_ws),
        ]
        for thread in self.threads:
            thread.start()

    def read_sse(self):
        try:
            with self.client.stream("GET", f"{self.server.base}/sse") as response:
                self.attached.wait()
                time.sleep(PAUSE)
                for chunk in response.iter_raw():
                    self.sse_body.extend(chunk)
        except httpx2.HTTPError as e:  # a cut body: incomplete chunked read
            self.sse_errors.append(e)

    def read_ws(self):
        self.attached.wait()
        time.sleep(PAUSE)
        with contextlib.suppress(ConnectionClosed):
            for message in self.websocket:
                self.ws_events.extend(json.loads(message))
        self.ws_close.append((self.websocket.close_code, self.websocket.close_reason))

    def sse_seqs(self):
        return [
            json.loads(line.removeprefix("data: "))["seq"]
            for line in bytes(self.sse_body).decode().splitlines()
            if line.startswith('data: {"type"')
        ]

    def join(self):
        self.attached.set()
        for thread in self.threads:
            thread.join(timeout=10)


@pytest.mark.parametrize("ws", ["websockets", "websockets-sansio"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_streams_end_and_server_exits_on_signal(tmp_path, sig, ws):
    """
    With an SSE stream and a WebSocket open, 10 MB of events just emitted to
    each and clients that start reading only 0.5 s later, a SIGTERM or SIGINT
    makes uvicorn exit in well under its 30 s graceful timeout; the SSE
    client reads a complete body ending with the close event, the WebSocket
    client gets 1001 and its reason (not uvicorn's 1012: the server hears of
    the signal only once the streams have ended), and both got every event,
    in order.
    """
    server = Uvicorn(tmp_path, ws)
    try:
        with httpx2.Client(timeout=GRACE) as client:
            server.wait_ready(client)
            ws_url = f"ws://127.0.0.1:{server.port}/ws"
            with connect(ws_url, open_timeout=10, max_size=None) as websocket:
                clients = Clients(server, client, websocket)
                try:
                    deadline = time.monotonic() + 10
                    while client.post(f"{server.base}/emit?n=0").text != "2":
                        assert time.monotonic() < deadline, "the streams did not attach"
                        time.sleep(0.01)
                    assert client.post(f"{server.base}/emit?n={EVENTS}").text == "2"
                    clients.attached.set()

                    signalled = time.monotonic()
                    server.proc.send_signal(sig)
                    server.proc.wait(timeout=GRACE + 10)
                    took = time.monotonic() - signalled
                finally:
                    clients.join()
    finally:
        log = server.stop()

    assert took < 3, f"uvicorn took {took:.2f} s to exit:\n{log}"
    assert clients.sse_errors == []
    assert bytes(clients.sse_body).endswith(b"\n\n" + CLOSE)
    assert clients.sse_seqs() == list(range(1, EVENTS + 1))
    assert [e["seq"] for e in clients.ws_events] == list(range(1, EVENTS + 1))
    assert clients.ws_close == [(1001, "The server is shutting down.")]
    assert "Cancel" not in log
    assert "Waiting for connections to close" not in log
