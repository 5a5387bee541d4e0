"""
Tests of `usercontext.asgi.UserContextMiddleware` under uvicorn, on a free
port of 127.0.0.1: WebSocket denials and exempt paths.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware

from asgi_helpers import json_app, resolve


httpx2 = pytest.importorskip("httpx2", reason="pip install httpx2")
ws_connect = pytest.importorskip("websockets.sync.client", reason="pip install websockets").connect
InvalidStatus = pytest.importorskip("websockets.exceptions").InvalidStatus


# Each test starts uvicorn: they are skipped without it, and fail under CI=true.
pytestmark = pytest.mark.server("uvicorn")


class _Uvicorn:
    """
    *app* served by uvicorn on a free port of 127.0.0.1, in a thread, for a
    ``with`` block of at most a few seconds.
    """

    def __init__(self, app, **options):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        import uvicorn

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
            with ws_connect(url, open_timeout=5, additional_headers=headers):
                pass

        with _Uvicorn(mw, ws="websockets-sansio") as server:
            for room in ("secret", "busy"):
                url = f"ws://127.0.0.1:{server.port}/rooms/{room}"
                with pytest.raises(InvalidStatus) as e:
                    handshake(url, f"req-{room}")
                denials[room] = e.value.response
            url = f"ws://127.0.0.1:{server.port}/public/feed"
            with ws_connect(url, open_timeout=5) as conn:
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


class TestStripContextHeadersUnderUvicorn:
    def test_client_cannot_assert_a_user(self):
        """
        With ``strip_context_headers=True``, under uvicorn and a real HTTP
        client, neither the resolver nor the application sees the
        ``x-usercontext-*`` headers or the ``usercontext.*`` baggage members a
        client sent, while every other header (other baggage members too)
        arrives as sent; without it, both see everything the client sent.
        """
        seen = {}

        def resolver(scope):
            seen["resolver"] = list(scope["headers"])
            headers = dict(scope["headers"])
            # A resolver that would trust the propagation header if it saw it.
            claimed = headers.get(b"x-usercontext-user-id", b"u-42").decode()
            return uc.UserContext(user_id=claimed, thread_id="t-1", run_id="r-1")

        async def app(scope, receive, send):
            seen["app"] = list(scope["headers"])
            ctx = uc.current()
            await json_app(payload={"user_id": ctx.user_id})(scope, receive, send)

        sent = {
            "x-usercontext-user-id": "u-mallory",
            "X-UserContext-Request-Id": "req-forged",
            "baggage": "usercontext.user_id=u-mallory,tenant=acme, UserContext.depth=3",
            "accept": "application/json",
        }
        answers = {}
        for strip in (True, False):
            mw = UserContextMiddleware(app, resolver=resolver, strip_context_headers=strip)
            with (
                _Uvicorn(mw) as server,
                httpx2.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client,
            ):
                answers[strip] = client.get("/agent", headers=sent).json()
            names = {strip: [name for name, _ in seen["app"]]}
            assert seen["resolver"] == seen["app"]
            if strip:
                assert not [n for n in names[strip] if n.startswith(b"x-usercontext-")]
                assert dict(seen["app"])[b"baggage"] == b"tenant=acme"
                assert dict(seen["app"])[b"accept"] == b"application/json"
            else:
                assert dict(seen["app"])[b"x-usercontext-user-id"] == b"u-mallory"
                assert dict(seen["app"])[b"x-usercontext-request-id"] == b"req-forged"
                assert dict(seen["app"])[b"baggage"] == sent["baggage"].encode()
        assert answers == {True: {"user_id": "u-42"}, False: {"user_id": "u-mallory"}}
