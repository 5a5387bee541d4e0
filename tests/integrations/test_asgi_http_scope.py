"""
Tests of the resource scope of an HTTP request under
`usercontext.asgi.UserContextMiddleware`: open until the response's last byte,
closed on success, error, disconnect and cancellation.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import usercontext as uc

from usercontext.asgi import UserContextMiddleware, request_state

from asgi_helpers import (
    DISCONNECTED,
    Client,
    Session,
    http_scope,
    json_app,
    json_start,
    resolve,
    session_registry,
)
from helpers import until


class TestHTTPScope:
    async def test_one_message_response_is_held_until_cleanup(self):
        """
        A response with a Content-Length is held until its body arrives; the
        scope is closed (committed) first, then start and body are sent.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)
        mw = UserContextMiddleware(json_app(log), resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        body = client.body()
        assert log == [
            "open u-42 depth=0",
            "app sends",
            "commit depth=0",
            "sent http.response.start 200",
            f"sent body {body!r}",
        ]
        assert client.headers()[b"content-length"] == b"%d" % len(body)
        stats = registry.stats()
        assert (stats.scopes, stats.opened, stats.close_errors) == (0, 1, 0)

    async def test_failed_cleanup_turns_it_into_500(self, caplog):
        """
        When the held response's cleanup fails (a commit), the client gets a
        500 ``cleanup_failed`` JSON response instead, and none of the original
        bytes; the failure is logged with the request id.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        client = Client(log=log)
        mw = UserContextMiddleware(
            json_app(log, payload={"secret": "of the original"}),
            resolver=resolve,
            registry=registry,
        )
        await mw(http_scope(("x-request-id", "req-fail")), client.receive, client.send)

        assert client.status() == 500
        assert client.headers() == {
            b"content-type": b"application/problem+json",
            b"content-length": b"%d" % len(client.body()),
            b"x-request-id": b"req-fail",
        }
        assert client.json() == {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "error": "cleanup_failed",
            "detail": "The request's resources could not be cleaned up (a commit may have "
            "failed); its changes may not have been saved.",
            "request_id": "req-fail",
        }
        assert b"secret" not in client.body()
        assert log[:3] == ["open u-42 depth=0", "app sends", "commit depth=0"]
        assert registry.stats().close_errors == 1
        assert registry.stats().scopes == 0
        messages = [r.getMessage() for r in caplog.records if r.name == "usercontext.asgi"]
        assert len(messages) == 1
        assert messages[0].startswith("The resources of request req-fail were not all cleaned up")

    @pytest.mark.parametrize(
        "kind",
        [
            "sync generator",
            "sync generator, close hook",
            "sync generator, async close hook",
            "sync context manager",
            "async generator",
            "async generator that awaits",
            "async context manager",
            "plain value by get, async close hook",
        ],
    )
    @pytest.mark.parametrize("fail", [False, True], ids=["ok", "failing"])
    async def test_every_kind_of_resource_is_cleaned_up_before_the_response(self, kind, fail):
        """
        Whatever the provider (a scope of sync resources only is closed
        without awaiting, any other is awaited), the resource is cleaned up
        before the held response goes out, and a cleanup that fails turns it
        into a 500.
        """
        log = []

        def fail_now(what):
            log.append(what)
            if fail:
                raise OSError(f"{what} failed")

        make, close, cleaned = _providers(fail_now)[kind]
        registry = uc.Registry()
        registry.register("r", make, close=close)

        async def app(scope, receive, send):
            resources = request_state(scope).resources
            if kind.endswith("by get, async close hook"):
                resources.get("r")
            else:
                await resources.aget("r")
            body = b'{"ok":true}'
            await send(json_start(body))
            await send({"type": "http.response.body", "body": body})

        client = Client(log=log)
        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert client.status() == (500 if fail else 200)
        assert log.index(cleaned) < log.index(f"sent http.response.start {client.status()}")
        stats = registry.stats()
        assert (stats.scopes, stats.close_errors) == (0, 1 if fail else 0)

    @pytest.mark.parametrize("status", [204, 304])
    async def test_bodiless_response_is_held_too(self, status):
        """
        A 204 or 304 response has no Content-Length (Starlette sends none) but
        no body either: it is held like any one-message response, so a failed
        commit behind it still turns it into a 500.
        """

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        for fail_commit, expected in [(False, status), (True, 500)]:
            log = []
            client = Client(log=log)
            registry = session_registry(log, fail_commit=fail_commit)
            mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
            await mw(http_scope(), client.receive, client.send)

            assert client.status() == expected
            assert log.index("commit depth=0") < log.index(f"sent http.response.start {expected}")

    async def test_streaming_response_is_forwarded_and_closes_before_the_last_message(self):
        """
        A response without a Content-Length is forwarded at once, chunk by
        chunk; every chunk is produced with the request's context bound and
        its session open, and the scope is closed when the application gives
        the last message, before the server gets it.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            resources = request_state(scope).resources
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(3):
                session = await resources.aget(Session)
                assert session.ctx is uc.current()
                log.append(f"chunk {i} for {uc.current().user_id}")
                await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "sent http.response.start 200",
            "open u-42 depth=0",
            "chunk 0 for u-42",
            "sent body b'0'",
            "chunk 1 for u-42",
            "sent body b'1'",
            "chunk 2 for u-42",
            "sent body b'2'",
            "commit depth=0",
            "sent body b''",
        ]
        assert client.body() == b"012"

    @pytest.mark.parametrize("chunks", [0, 2])
    async def test_streaming_cleanup_failure_cuts_the_response(self, caplog, chunks):
        """
        A cleanup that fails after a streaming response's headers went out
        keeps its last message from the server, and raises into the
        application's ``send``, and out of the middleware, so that the server
        drops the connection: the client never sees the response complete.
        The failure is logged with the request id.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        client = Client(log=log)
        raised = []

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(chunks):
                await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            try:
                await send({"type": "http.response.body", "body": b"the end"})
            except BaseException as e:
                raised.append(e)
                raise

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(RuntimeError, match=r"^The resources of request req-s were not") as e:
            await mw(http_scope(("x-request-id", "req-s")), client.receive, client.send)

        assert raised == [e.value]
        assert "1 cleanup(s) of a scope of user 'u-42' failed" in str(e.value.__cause__)
        assert "the response was cut short" in str(e.value)
        assert client.status() == 200
        assert client.body() == b"01"[:chunks]
        assert all(m.get("more_body", True) for m in client.sent)  # never complete
        assert log[-1] == "commit depth=0"
        messages = [r.getMessage() for r in caplog.records if r.name == "usercontext.asgi"]
        assert len(messages) == 1
        assert "req-s" in messages[0]
        assert registry.stats().scopes == 0

    async def test_application_catching_the_cut(self):
        """
        An application that catches the error raised into its last ``send``
        and returns still gets the server to drop the connection: the
        middleware raises the error again.
        """
        registry = session_registry([], fail_commit=True)
        client = Client()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            with pytest.raises(RuntimeError):
                await send({"type": "http.response.body", "body": b"the end"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(RuntimeError, match="the response was cut short"):
            await mw(http_scope(), client.receive, client.send)

        assert [m["type"] for m in client.sent] == ["http.response.start"]

    async def test_content_length_body_in_several_chunks(self):
        """
        A Content-Length response whose body comes in several messages (a file)
        is released with its first chunk, and the scope closes before the
        last chunk is sent.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"abcd"))
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"cd", "more_body": False})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'ab'",
            "commit depth=0",
            "sent body b'cd'",
        ]

    async def test_content_length_body_in_several_chunks_cut(self):
        """
        When the cleanup of a Content-Length response whose body comes in
        several messages fails, its last chunk is never sent, and the error
        raised makes the server drop the connection: the client has fewer
        bytes than the Content-Length announced.
        """
        log = []
        registry = session_registry(log, fail_commit=True)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"abcdef"))
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"cd", "more_body": True})
            await send({"type": "http.response.body", "body": b"ef"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(RuntimeError, match="the response was cut short"):
            await mw(http_scope(), client.receive, client.send)

        assert client.headers()[b"content-length"] == b"6"
        assert client.body() == b"abcd"
        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'ab'",
            "sent body b'cd'",
            "commit depth=0",
        ]

    async def test_pathsend(self):
        """
        An ``http.response.pathsend`` message ends a held response like a final
        body: the scope is closed, then start and pathsend are sent.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"x" * 10))
            await send({"type": "http.response.pathsend", "path": "/srv/report.pdf"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(extensions={"http.response.pathsend": {}}), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "commit depth=0",
            "sent http.response.start 200",
            "sent http.response.pathsend",
        ]

    async def test_other_messages_pass_through(self):
        """
        Messages of other types (a debug message before the start, trailers
        after the body) are forwarded as they come, and do not end the
        response.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.debug", "info": {}})
            await send({**json_start(b"{}"), "trailers": True})
            await send({"type": "http.response.body", "body": b"{}"})
            await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "sent http.response.debug",
            "commit depth=0",
            "sent http.response.start 200",
            "sent body b'{}'",
            "sent http.response.trailers",
        ]

    async def test_without_a_registry_nothing_is_held(self):
        """
        Without a registry there is nothing to clean up: the response is
        forwarded as it comes.
        """
        client = Client()
        order = []

        async def app(scope, receive, send):
            await send(json_start(b"{}"))
            order.append(len(client.sent))
            await send({"type": "http.response.body", "body": b"{}"})

        await UserContextMiddleware(app, resolver=resolve)(
            http_scope(), client.receive, client.send
        )

        assert order == [1]
        assert client.body() == b"{}"


class TestHTTPFailures:
    async def test_disconnect_mid_stream_rolls_back(self):
        """
        When the client disconnects before a streaming response is complete
        (``receive`` returns ``http.disconnect``), the scope is closed as
        failed: the session sees a ConnectionError and rolls back.
        """
        log = []
        errors = []
        registry = uc.Registry()

        def session(ctx):
            try:
                yield Session(ctx)
            except BaseException as e:
                errors.append(e)
                raise

        registry.register(Session, session)
        client = Client()

        async def app(scope, receive, send):  # streams until the client leaves, as Starlette does
            await request_state(scope).resources.aget(Session)

            async def listen():
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            async def stream():
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for i in range(1000):
                    await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
                    log.append(i)
                    await anyio.sleep(0.001)

            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                tg.start_soon(stream)

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope(), client.receive, client.send)
            await until(lambda: len(log) >= 2)
            client.gone.set()

        assert 2 <= len(log) < 1000
        [error] = errors
        assert isinstance(error, ConnectionError)
        assert str(error) == DISCONNECTED
        assert client.sent[-1]["more_body"] is True
        assert registry.stats().scopes == 0

    async def test_send_raising_oserror(self):
        """
        When ``send`` raises OSError (the client is gone, ASGI 2.4), the scope
        is closed with that error (the session rolls back) and the error
        reaches the server.
        """
        log = []
        registry = session_registry(log)
        client = Client()
        client.fail_after = 2

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(5):
                await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b""})  # never reached

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(OSError, match="broken pipe"):
            await mw(http_scope(), client.receive, client.send)

        assert log == ["open u-42 depth=0", "rollback OSError"]
        assert len(client.sent) == 2
        assert registry.stats().scopes == 0

    async def test_send_cancelled_rolls_back(self):
        """
        When a pending ``send`` is cancelled (the application stops streaming
        because the client left), the scope is closed as failed.
        """
        log = []
        registry = session_registry(log)
        blocked = anyio.Event()

        class SlowClient(Client):
            async def send(self, message):
                await super().send(message)
                if message.get("body") == b"1":
                    blocked.set()
                    await anyio.sleep_forever()

        client = SlowClient()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            with anyio.move_on_after(0.05):  # stands for a disconnect watcher
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for i in range(5):
                    await send({"type": "http.response.body", "body": b"%d" % i, "more_body": True})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert blocked.is_set()
        assert log[0] == "open u-42 depth=0"
        assert log[1].startswith("rollback ")
        assert log[1] != "rollback _DisconnectedError"
        assert registry.stats().scopes == 0

    async def test_disconnect_after_the_last_chunk_is_not_a_failure(self):
        """
        A server may report the disconnect that follows a complete response
        before its send of the last chunk has returned (Starlette's
        TestClient on trio does): the response was complete, so the scope
        still commits.
        """
        log = []
        registry = session_registry(log)
        heard = anyio.Event()

        class HangingUpClient(Client):
            async def send(self, message):
                await super().send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    self.gone.set()  # the client has it all, and hangs up
                    with anyio.fail_after(5):
                        await heard.wait()  # the disconnect is seen before this send returns

        client = HangingUpClient(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)

            async def listen():
                while (await receive())["type"] != "http.disconnect":
                    pass
                heard.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(listen)
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"a", "more_body": True})
                await send({"type": "http.response.body", "body": b"b"})

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'a'",
            "commit depth=0",
            "sent body b'b'",
        ]

    async def test_disconnect_before_a_held_response_rolls_back(self):
        """
        A client that left before a held response was complete makes the
        scope close as failed; the response is still passed to the server.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)
        client.gone.set()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            assert (await receive())["type"] == "http.request"
            assert (await receive())["type"] == "http.disconnect"
            await json_app(log)(scope, receive, send)

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        await mw(http_scope(), client.receive, client.send)

        assert log[:3] == ["open u-42 depth=0", "app sends", "rollback _DisconnectedError"]
        assert client.status() == 200

    @pytest.mark.parametrize("after_start", [False, True], ids=["before-start", "held-start"])
    async def test_app_raising_closes_the_scope_with_its_error(self, after_start):
        """
        An application that raises closes the scope with its exception (the
        session rolls back); a held response start is dropped, the client gets
        a JSON 500 carrying the request id instead, and the exception then
        propagates unchanged, for the server to log.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            if after_start:
                await send(json_start(b"{}"))
            raise ValueError("the endpoint failed")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(ValueError, match="the endpoint failed"):
            await mw(http_scope(("x-request-id", "req-f")), client.receive, client.send)

        assert log == [
            "open u-42 depth=0",
            "rollback ValueError",
            "sent http.response.start 500",
            "sent body " + repr(client.body()),
        ]
        assert client.header_values(b"x-request-id") == [b"req-f"]
        assert client.headers()[b"content-type"] == b"application/problem+json"
        assert client.json()["request_id"] == "req-f"
        assert "ValueError" not in client.body().decode()  # nothing of the error itself
        assert registry.stats().scopes == 0

    async def test_app_raising_after_its_response(self):
        """
        An application that raises after its response was complete (background
        work failing) gets its exception propagated; the scope was closed once,
        when the response ended.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await json_app()(scope, receive, send)
            raise LookupError("the background work failed")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        with pytest.raises(LookupError):
            await mw(http_scope(), client.receive, client.send)

        assert log[:2] == ["open u-42 depth=0", "commit depth=0"]
        assert client.status() == 200
        assert registry.stats().opened == 1

    async def test_app_returning_without_a_response(self):
        """
        An application that returns without sending anything has its scope
        closed when it returns; nothing is sent for it.
        """
        log = []
        registry = session_registry(log)
        client = Client()

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)

        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        assert log == ["open u-42 depth=0", "commit depth=0"]
        assert client.sent == []

    async def test_app_returning_after_a_partial_stream(self):
        """
        An application that returns in the middle of a streaming response has
        its scope closed when it returns.
        """
        log = []
        registry = session_registry(log)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})

        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        assert log == [
            "open u-42 depth=0",
            "sent http.response.start 200",
            "sent body b'part'",
            "commit depth=0",
        ]

    @pytest.mark.parametrize(("fail_commit", "status"), [(False, 200), (True, 500)])
    async def test_app_returning_with_a_held_start(self, fail_commit, status):
        """
        An application that returns after a held response start but before its
        body has its scope closed, then the start passed on; or, if the
        cleanup failed, the 500 ``cleanup_failed`` response instead.
        """
        log = []
        registry = session_registry(log, fail_commit=fail_commit)
        client = Client(log=log)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget(Session)
            await send(json_start(b"{}"))

        await UserContextMiddleware(app, resolver=resolve, registry=registry)(
            http_scope(), client.receive, client.send
        )

        assert log[:2] == ["open u-42 depth=0", "commit depth=0"]
        assert client.status() == status
        assert client.sent[0]["type"] == "http.response.start"


def _providers(fail_now):  # noqa: C901  # one small provider per kind
    """
    Providers of every kind, by name: each with its close hook, and what its
    cleanup logs (through *fail_now*, which raises when the cleanup must fail).
    """

    class Cm:
        def __enter__(self):
            return "cm"

        def __exit__(self, *exc):
            fail_now("exit")

    def gen(ctx):
        yield "gen"
        fail_now("gen closed")

    async def agen(ctx):
        yield "agen"
        fail_now("agen closed")

    async def agen_awaits(ctx):
        yield "agen"
        await anyio.lowlevel.checkpoint()
        fail_now("agen closed")

    def hooked_gen(ctx):  # the hook is the cleanup that fails
        yield "gen"

    def hook(value):
        fail_now(f"hook {value}")

    async def async_hook(value):
        await anyio.lowlevel.checkpoint()
        fail_now(f"async hook {value}")

    class Acm:
        async def __aenter__(self):
            return "acm"

        async def __aexit__(self, *exc):
            await anyio.lowlevel.checkpoint()
            fail_now("aexit")

    return {
        "sync generator": (gen, None, "gen closed"),
        "sync generator, close hook": (hooked_gen, hook, "hook gen"),
        "sync generator, async close hook": (hooked_gen, async_hook, "async hook gen"),
        "sync context manager": (lambda ctx: Cm(), None, "exit"),
        "async generator": (agen, None, "agen closed"),
        "async generator that awaits": (agen_awaits, None, "agen closed"),
        "async context manager": (lambda ctx: Acm(), None, "aexit"),
        "plain value by get, async close hook": (lambda ctx: "v", async_hook, "async hook v"),
    }
