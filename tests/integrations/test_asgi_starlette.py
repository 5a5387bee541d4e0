"""
Tests of `usercontext.asgi.UserContextMiddleware` around real Starlette
applications, through ``httpx2.ASGITransport`` and Starlette's TestClient.
"""

from __future__ import annotations

import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware, in_child_scope, request_state

from asgi_helpers import Session, resolve, session_registry


httpx2 = pytest.importorskip("httpx2", reason="pip install httpx2")
pytest.importorskip("starlette", reason="pip install usercontext[starlette]")


def starlette_app(log, registry):
    """
    A Starlette application using the request's session in a JSON endpoint
    with background tasks, a streaming endpoint, a 204 endpoint and a
    WebSocket endpoint.
    """
    from starlette.applications import Starlette
    from starlette.background import BackgroundTasks
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    def record_child(label):
        ctx = uc.current()
        log.append(
            f"{label} user={ctx.user_id} depth={ctx.depth} parent={ctx.parent_request_id} "
            f"scopes={registry.stats().scopes}"
        )

    async def async_task(label):
        record_child(label)
        async with registry.scope() as scope:
            await scope.aget(Session)

    def sync_task(scope, label):
        record_child(label)
        scope.get(Session)

    async def create(request):
        await request_state(request.scope).resources.aget(Session)
        tasks = BackgroundTasks()
        tasks.add_task(in_child_scope(async_task), "async task")
        tasks.add_task(in_child_scope(sync_task, registry=registry), "sync task")
        return JSONResponse({"user_id": uc.current().user_id}, background=tasks)

    async def stream(request):
        resources = request_state(request.scope).resources

        async def chunks():
            for i in range(3):
                session = await resources.aget(Session)
                log.append(f"chunk {i} user={uc.current().user_id} session={session.ctx.user_id}")
                yield b"%d" % i

        return StreamingResponse(chunks())

    async def delete(request):
        await request_state(request.scope).resources.aget(Session)
        return Response(status_code=204)

    async def ws(websocket):
        await websocket.accept()
        session = await request_state(websocket.scope).resources.aget(Session)
        text = await websocket.receive_text()
        await websocket.send_text(f"{text} {uc.current().user_id} {session.ctx.user_id}")
        await websocket.close()

    return Starlette(
        routes=[
            Route("/notes", create, methods=["POST"]),
            Route("/notes", delete, methods=["DELETE"]),
            Route("/stream", stream),
            WebSocketRoute("/ws", ws),
        ]
    )


def asgi_client(app):
    transport = httpx2.ASGITransport(app=app)
    return httpx2.AsyncClient(transport=transport, base_url="http://test")


class TestStarlette:
    async def test_json_response_and_background_tasks(self):
        """
        The JSON response is sent after the commit; its BackgroundTasks then
        run under children of the request: an async one that opens its own
        scope, and a sync one, run in a thread, which uses the scope
        `in_child_scope` opened and passed to it.
        """
        log = []
        registry = session_registry(log)
        app = UserContextMiddleware(
            starlette_app(log, registry), resolver=resolve, registry=registry
        )
        async with asgi_client(app) as client:
            response = await client.post(
                "/notes", headers={"x-user": "u-42", "x-request-id": "req-n"}
            )

        assert response.status_code == 200
        assert response.json() == {"user_id": "u-42"}
        assert response.headers["x-request-id"] == "req-n"
        assert log == [
            "open u-42 depth=0",
            "commit depth=0",
            "async task user=u-42 depth=1 parent=req-n scopes=0",
            "open u-42 depth=1",
            "commit depth=1",
            "sync task user=u-42 depth=1 parent=req-n scopes=1",
            "open u-42 depth=1",  # the session of the scope in_child_scope passed it
            "commit depth=1",
        ]
        assert registry.stats().scopes == 0

    async def test_streaming_response_commits_after_the_last_chunk(self):
        """
        Every chunk of a StreamingResponse sees the request's context and
        session, and the session commits after the last chunk, every time.
        """
        log = []
        registry = session_registry(log)
        app = UserContextMiddleware(
            starlette_app(log, registry), resolver=resolve, registry=registry
        )
        async with asgi_client(app) as client:
            for _ in range(20):
                response = await client.get("/stream", headers={"x-user": "u-7"})
                assert response.text == "012"

        assert log == 20 * [
            "open u-7 depth=0",
            "chunk 0 user=u-7 session=u-7",
            "chunk 1 user=u-7 session=u-7",
            "chunk 2 user=u-7 session=u-7",
            "commit depth=0",
        ]
        assert registry.stats().scopes == 0

    async def test_refusal_and_failed_commit_behind_204(self):
        """
        A request without credentials gets the 401 JSON response, and a 204
        whose commit fails becomes a 500.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        app = UserContextMiddleware(
            starlette_app(log, registry), resolver=resolve, registry=registry
        )
        async with asgi_client(app) as client:
            refused = await client.post("/notes")
            deleted = await client.delete("/notes", headers={"x-user": "u-42"})

        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthenticated"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert deleted.status_code == 500
        assert deleted.json()["error"] == "cleanup_failed"
        assert log == ["open u-42 depth=0", "commit depth=0"]

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_testclient_and_add_middleware(self, backend):
        """
        Through Starlette's TestClient and ``app.add_middleware``: streamed
        responses commit every time (the disconnect the client reports after
        the last chunk is no failure), a WebSocket keeps its session for the
        connection and gets the request id on its accept, and a refused
        handshake gets the JSON denial response.
        """
        from starlette.testclient import TestClient, WebSocketDenialResponse

        log = []
        registry = session_registry(log)
        app = starlette_app(log, registry)
        app.add_middleware(UserContextMiddleware, resolver=resolve, registry=registry)
        with TestClient(app, backend=backend) as client:
            for _ in range(30):
                assert client.get("/stream", headers={"x-user": "u-1"}).text == "012"
            headers = {"x-user": "u-2", "x-request-id": "ws-1"}
            with client.websocket_connect("/ws", headers=headers) as ws:
                assert ws.extra_headers == [(b"x-request-id", b"ws-1")]
                ws.send_text("hello")
                assert ws.receive_text() == "hello u-2 u-2"
            with pytest.raises(WebSocketDenialResponse) as e, client.websocket_connect("/ws"):
                pass  # the handshake is refused

        assert e.value.status_code == 401
        assert e.value.json()["error"] == "unauthenticated"
        assert [line for line in log if line.startswith(("commit", "rollback"))] == 31 * [
            "commit depth=0"
        ]
        assert registry.stats().scopes == 0

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_crash_behind_server_error_middleware(self, backend):
        """
        An endpoint that raises gets the middleware's JSON 500 with the
        request id; Starlette's ServerErrorMiddleware, outside it, sees that a
        response started and sends no second one, and the exception reaches
        the server (here the TestClient, which raises it when asked to).
        """
        from starlette.applications import Starlette
        from starlette.routing import Route
        from starlette.testclient import TestClient

        async def boom(request):
            raise LookupError("no such note")

        app = Starlette(routes=[Route("/boom", boom)])
        app.add_middleware(UserContextMiddleware, resolver=resolve)
        starts = []

        async def server(scope, receive, send):  # what the server gets
            async def record(message):
                if message["type"] == "http.response.start":
                    starts.append(message["status"])
                await send(message)

            await app(scope, receive, record)

        headers = {"x-user": "u-1", "x-request-id": "req-b"}
        with TestClient(server, backend=backend, raise_server_exceptions=False) as client:
            response = client.get("/boom", headers=headers)
        with TestClient(server, backend=backend) as client, pytest.raises(LookupError):
            client.get("/boom", headers=headers)

        assert starts == [500, 500]
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "req-b"
        assert response.json()["request_id"] == "req-b"
