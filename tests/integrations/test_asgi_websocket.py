"""
Tests of WebSocket connections under `usercontext.asgi.UserContextMiddleware`:
one scope for the whole connection.
"""

from __future__ import annotations

import logging

import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware, request_state

from asgi_helpers import Session, resolve, session_registry, ws_client, ws_scope


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
        assert registry.stats().scopes == 0
