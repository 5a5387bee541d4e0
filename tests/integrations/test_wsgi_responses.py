"""
Tests of the responses of `usercontext.wsgi.UserContextMiddleware`: when the
request's scope is closed for each way a WSGI application can produce, end or
fail its response, what the client then gets, and ``start_response``.

They run under the standard library's threaded WSGI server (``wsgiref``) on a
free port of 127.0.0.1, with httpx2 or a raw socket as the client; where the
server's own reaction is the point (an exception raised into it, a response
closed early), under Werkzeug's WSGI client, which drives the application as
PEP 3333 says a server does.
"""

from __future__ import annotations

import socket
import threading

import pytest

from usercontext.wsgi import request_state


pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")
pytest.importorskip("werkzeug", reason="werkzeug is not installed: pip install flask")

import httpx2

from werkzeug.test import Client

from wsgi_helpers import (  # the fixtures by their functions' names
    TIMEOUT,
    _log,  # noqa: F401
    _registry,  # noqa: F401
    _serve,  # noqa: F401
    problem,
    whoami,
    wrap,
)


class TestScopeClosing:
    def test_committed_before_the_response(self, serve, registry, log):
        """
        A response whose body is in memory is sent once the session has
        committed.
        """
        response = httpx2.get(serve(wrap(whoami, registry)), headers={"x-user": "u-1"})
        assert response.json()["user"] == "u-1"
        assert log == ["open u-1", "commit u-1"]
        assert registry.stats().scopes == 0

    @pytest.mark.parametrize("body", ["list", "content-length", "tuple"])
    def test_failed_commit_held_response(self, serve, registry, log, body):
        """
        When the commit of a response whose body is known fails, the client
        gets a 500 problem document instead, with nothing of the original.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")["fail"] = True
            if body == "content-length":
                start_response("200 OK", [("Content-Length", "6")])
                return iter([b"secret"])  # one chunk: the whole body
            start_response("200 OK", [])
            return [b"secret"] if body == "list" else (b"secret",)

        response = httpx2.get(serve(wrap(app, registry)), headers={"x-user": "u-1"})
        assert response.status_code == 500
        assert problem(response)["error"] == "cleanup_failed"
        assert b"secret" not in response.content
        assert log == ["open u-1", "failed commit u-1"]

    def test_failed_commit_after_part_was_sent(self, serve, registry, log):
        """
        When the commit of a response with a Content-Length fails after its
        first chunks went out, its last chunk is never sent: the client sees
        a body shorter than announced.
        """

        def app(environ, start_response):
            start_response("200 OK", [("Content-Length", "9")])
            yield b"abc"
            yield b"def"
            request_state(environ).resources.get("session")["fail"] = True
            yield b"ghi"

        url = serve(wrap(app, registry))
        with pytest.raises(httpx2.RemoteProtocolError):
            httpx2.get(url, headers={"x-user": "u-1"}, timeout=TIMEOUT)
        assert log == ["open u-1", "failed commit u-1"]

    def test_failed_commit_of_a_stream(self, registry, log):
        """
        A stream without Content-Length is closed when the application's
        iterable ends; if the commit fails then, the middleware raises to the
        server, which must drop the connection.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")["fail"] = True
            start_response("200 OK", [])
            yield b"row 0\n"

        response = Client(wrap(app, registry)).get("/", headers={"x-user": "u-1"}, buffered=False)
        assert next(response.response) == b"row 0\n"
        with pytest.raises(RuntimeError, match="the response was cut short"):
            next(response.response)
        assert log == ["open u-1", "failed commit u-1"]

    def test_stream_committed_after_its_end(self, serve, registry, log):
        """
        A stream uses the request's session in every chunk, and commits after
        the application's iterable ends, before the server ends the response.
        """

        def app(environ, start_response):
            resources = request_state(environ).resources
            start_response("200 OK", [])
            for n in range(3):
                resources.get("session")
                log.append(f"row {n}")
                yield f"row {n}\n".encode()

        response = httpx2.get(serve(wrap(app, registry)), headers={"x-user": "u-1"})
        assert response.text == "row 0\nrow 1\nrow 2\n"
        assert log == ["open u-1", "row 0", "row 1", "row 2", "commit u-1"]

    def test_empty_response(self, serve, registry, log):
        """
        A response with no body (a 204, a HEAD) is sent once the session has
        committed.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("204 No Content", [])
            return iter(())

        response = httpx2.get(serve(wrap(app, registry)), headers={"x-user": "u-1"})
        assert response.status_code == 204
        assert log == ["open u-1", "commit u-1"]

    def test_client_disconnects(self, registry, log):
        """
        A response the server closes before it is complete (the client left)
        has its session rolled back.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("200 OK", [])
            while True:
                yield b"more\n"

        response = Client(wrap(app, registry)).get("/", headers={"x-user": "u-1"}, buffered=False)
        assert next(response.response) == b"more\n"
        response.close()
        response.close()  # a second close changes nothing
        assert log == ["open u-1", "rollback u-1 _DisconnectedError"]
        assert registry.stats().scopes == 0

    def test_client_disconnects_from_a_real_server(self, serve, registry, log):
        """
        Under a real server, a client that resets the connection in the middle
        of a stream has its session rolled back.
        """
        done = threading.Event()

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("200 OK", [])
            try:
                for _ in range(100_000):
                    yield b"x" * 1024
            finally:
                done.set()

        url = serve(wrap(app, registry))
        port = int(url.rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-User: u-1\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.0 200")
        assert done.wait(TIMEOUT)
        for _ in range(100):
            if len(log) == 2:
                break
            threading.Event().wait(0.01)
        assert log == ["open u-1", "rollback u-1 _DisconnectedError"]


class TestApplicationErrors:
    def test_raises_when_called(self, serve, registry, log, caplog):
        """
        An application that raises gets a 500 problem document with the
        request id; its session rolls back, and the error is logged.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            msg = "no such note"
            raise LookupError(msg)

        response = httpx2.get(
            serve(wrap(app, registry)), headers={"x-user": "u-1", "x-request-id": "req-5"}
        )
        assert response.status_code == 500
        assert problem(response) == {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "error": "internal_error",
            "detail": "The server failed to answer the request; its logs give the reason "
            "under this request id.",
            "request_id": "req-5",
        }
        assert log == ["open u-1", "rollback u-1 LookupError"]
        assert "The application failed on request req-5." in caplog.messages
        assert "LookupError: no such note" in caplog.text

    def test_raises_in_its_body(self, serve, registry, log):
        """
        An application whose body raises before its first chunk, even after
        calling start_response, gets the 500 problem document too.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("200 OK", [("Content-Type", "text/plain")])
            msg = "no such note"
            raise LookupError(msg)
            yield b"never"

        response = httpx2.get(serve(wrap(app, registry)), headers={"x-user": "u-1"})
        assert response.status_code == 500
        assert problem(response)["error"] == "internal_error"
        assert log == ["open u-1", "rollback u-1 LookupError"]

    def test_raises_after_its_first_chunk(self, registry, log):
        """
        Once part of the body was sent, the application's exception reaches
        the server, and the session rolls back.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("200 OK", [])
            yield b"row 0\n"
            msg = "no such note"
            raise LookupError(msg)

        response = Client(wrap(app, registry)).get("/", headers={"x-user": "u-1"}, buffered=False)
        assert next(response.response) == b"row 0\n"
        with pytest.raises(LookupError):
            next(response.response)
        assert log == ["open u-1", "rollback u-1 LookupError"]

    def test_without_start_response(self, serve, caplog):
        """
        An application that returns a body without calling start_response
        gets a 500, and the log says what it missed.
        """

        def app(environ, start_response):
            return [b"no status"]

        response = httpx2.get(serve(wrap(app)), headers={"x-user": "u-1"})
        assert response.status_code == 500
        assert "without calling start_response first" in caplog.text

    def test_anonymous_request_raises(self, serve):
        """
        A request with no user gets the same 500 problem document.
        """

        def app(environ, start_response):
            msg = "no such note"
            raise LookupError(msg)

        response = httpx2.get(serve(wrap(app)), headers={"x-user": "anonymous"})
        assert problem(response)["error"] == "internal_error"

    def test_close_fails(self, serve, registry, log, caplog):
        """
        A response whose ``close()`` raises counts as failed: the session rolls
        back and the client gets a 500 problem document.
        """

        class Body:
            def __iter__(self):
                yield b"ok"

            def close(self):
                msg = "close failed"
                raise OSError(msg)

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("200 OK", [("Content-Length", "2")])
            return Body()

        response = httpx2.get(serve(wrap(app, registry)), headers={"x-user": "u-1"})
        assert response.status_code == 500
        assert problem(response)["error"] == "cleanup_failed"
        assert log == ["open u-1", "rollback u-1 OSError"]
        assert "Closing the response of request" in caplog.text

    def test_close_fails_without_a_scope(self, serve):
        """
        Without a registry, a failing ``close()`` still fails the response.
        """

        class Body:
            streaming = False  # as Django's HttpResponse

            def __iter__(self):
                yield b"ok"

            def close(self):
                msg = "close failed"
                raise OSError(msg)

        def app(environ, start_response):
            start_response("200 OK", [])
            return Body()

        response = httpx2.get(serve(wrap(app)), headers={"x-user": "u-1"})
        assert problem(response)["error"] == "cleanup_failed"

    @pytest.mark.parametrize("where", ["call", "body"])
    def test_base_exception(self, registry, log, where):
        """
        A KeyboardInterrupt or SystemExit of the application closes the
        session (rolled back) and propagates, at once.
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            raise KeyboardInterrupt

        def streaming_app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("200 OK", [])
            raise KeyboardInterrupt
            yield b"never"

        with pytest.raises(KeyboardInterrupt):
            Client(wrap(app if where == "call" else streaming_app, registry)).get(
                "/", headers={"x-user": "u-1"}
            )
        assert log == ["open u-1", "rollback u-1 KeyboardInterrupt"]


class TestStartResponse:
    def test_write(self, serve, registry, log):
        """
        An application that writes its body with the ``write`` that
        start_response returns (PEP 3333's legacy way) is served.
        """

        def app(environ, start_response):
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"written ")
            return [b"and returned"]

        response = httpx2.get(serve(wrap(app, registry)), headers={"x-user": "u-1"})
        assert response.text == "written and returned"

    def test_replaced_before_anything_is_sent(self, serve):
        """
        An application may call start_response again, with ``exc_info``,
        until its first chunk: the last status wins.
        """

        def app(environ, start_response):
            start_response("200 OK", [])
            try:
                raise ValueError  # noqa: TRY301  # an error the app handles itself
            except ValueError as e:
                start_response("409 Conflict", [("Content-Length", "4")], (ValueError, e, None))
            return [b"oops"]

        response = httpx2.get(serve(wrap(app)), headers={"x-user": "u-1"})
        assert (response.status_code, response.text) == (409, "oops")
        assert len(response.headers["x-request-id"]) == 32

    def test_after_the_first_chunk(self, registry, log):
        """
        After the first chunk, a second start_response goes to the server,
        which re-raises its ``exc_info`` (PEP 3333).
        """

        def app(environ, start_response):
            request_state(environ).resources.get("session")
            start_response("200 OK", [("Content-Length", "x")])  # not a length
            yield b"row 0\n"
            try:
                msg = "late"
                raise ValueError(msg)  # noqa: TRY301  # the error the app reports
            except ValueError as e:
                start_response("500 Internal Server Error", [], (ValueError, e, e.__traceback__))

        response = Client(wrap(app, registry)).get("/", headers={"x-user": "u-1"}, buffered=False)
        assert next(response.response) == b"row 0\n"
        with pytest.raises(ValueError, match="late"):
            next(response.response)
        assert log == ["open u-1", "rollback u-1 ValueError"]
