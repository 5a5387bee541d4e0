"""
Tests of ``UserContextMiddleware(strip_context_headers=True)`` in-process: the
edge rule applied to the scope the resolver and the application see, on
HTTP and WebSocket, in a copy of the server's scope. Under a real server and
client: ``test_asgi_uvicorn.py``.
"""

from __future__ import annotations

import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware

from asgi_helpers import Client, http_scope, json_app, ws_scope


pytestmark = pytest.mark.anyio

FORGED = (
    ("x-usercontext-user-id", "u-mallory"),
    ("baggage", "usercontext.user_id=u-mallory,tenant=acme"),
    ("accept", "*/*"),
)


def _recording(seen, inner):
    async def app(scope, receive, send):
        seen.append(scope)
        await inner(scope, receive, send)

    return app


class TestStripContextHeaders:
    async def test_http_headers_stripped_in_a_copy(self):
        """
        The resolver and the application get a new scope whose headers lost
        the library's propagation fields (3 headers in, 3 out: the baggage
        header keeps its other member); the server's scope object still holds
        the 4 headers it was given, untouched.
        """
        seen = []
        resolved = []

        def resolver(scope):
            resolved.append(scope)
            return uc.UserContext(user_id="u-42", thread_id="t-1", run_id="r-1")

        mw = UserContextMiddleware(
            _recording(seen, json_app()), resolver=resolver, strip_context_headers=True
        )
        scope = http_scope(*FORGED)
        before = list(scope["headers"])
        client = Client()
        await mw(scope, client.receive, client.send)
        assert client.status() == 200
        assert scope["headers"] == before
        assert len(before) == 4
        assert "usercontext" not in scope  # the request's state went into the copy
        (app_scope,) = seen
        assert resolved == [app_scope]
        assert app_scope is not scope
        assert app_scope["headers"] == [
            (b"x-user", b"u-42"),
            (b"baggage", b"tenant=acme"),
            (b"accept", b"*/*"),
        ]
        assert {k: v for k, v in app_scope.items() if k not in ("headers", "usercontext")} == {
            k: v for k, v in scope.items() if k != "headers"
        }

    async def test_websocket_headers_stripped(self):
        """
        A WebSocket handshake's headers are stripped the same way.
        """
        seen = []

        async def app(scope, receive, send):
            seen.append(scope)
            await receive()
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close"})

        mw = UserContextMiddleware(
            app,
            resolver=lambda s: uc.UserContext(user_id="u-42", thread_id="t-1", run_id="r-1"),
            strip_context_headers=True,
        )
        scope = ws_scope(*FORGED)
        client = Client([{"type": "websocket.connect"}])
        await mw(scope, client.receive, client.send)
        (app_scope,) = seen
        assert [name for name, _ in app_scope["headers"]] == [b"x-user", b"baggage", b"accept"]
        assert len(scope["headers"]) == 4

    async def test_off_by_default(self):
        """
        Without the option, the application gets the server's own scope,
        with every header the client sent.
        """
        seen = []
        mw = UserContextMiddleware(
            _recording(seen, json_app()),
            resolver=lambda s: uc.UserContext(user_id="u-42", thread_id="t-1", run_id="r-1"),
        )
        scope = http_scope(*FORGED)
        client = Client()
        await mw(scope, client.receive, client.send)
        assert seen == [scope]
        assert len(scope["headers"]) == 4

    async def test_lifespan_untouched(self):
        """
        A ``lifespan`` scope passes through as it is, even with the option on.
        """
        seen = []

        async def app(scope, receive, send):
            seen.append(scope)

        mw = UserContextMiddleware(app, resolver=lambda s: None, strip_context_headers=True)
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        client = Client()
        await mw(scope, client.receive, client.send)
        assert seen == [scope]
        assert seen[0] is scope

    def test_must_be_bool(self):
        """
        A value other than True or False is refused with a message naming the
        option.
        """
        with pytest.raises(
            TypeError, match=r"^strip_context_headers must be True or False, got 'yes'\.$"
        ):
            UserContextMiddleware(json_app(), resolver=lambda s: None, strip_context_headers="yes")
