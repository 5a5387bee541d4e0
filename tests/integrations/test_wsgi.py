"""
Tests of `usercontext.wsgi.UserContextMiddleware`'s rules, one at a time:
its arguments, request ids, refusals, and when the request's scope is closed
for each way a response can be produced, end or fail.

Most run a WSGI application under the standard library's threaded WSGI server
(``wsgiref``) on a free port of 127.0.0.1, with httpx2 or a raw socket as the
client. Where the server's own reaction is the point (an exception raised
into it, the response closed early), they use Werkzeug's WSGI client, which
drives the application as PEP 3333 says a server does. The tests under
gunicorn and waitress, with Flask and Django, are in test_wsgi_servers.py.
"""

from __future__ import annotations

import contextvars
import json
import logging
import socket
import socketserver
import threading
import wsgiref.simple_server

from typing import Any

import pytest

import usercontext as uc
import usercontext.wsgi

from usercontext.wsgi import STATE_KEY, UserContextMiddleware, request_state


pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")
pytest.importorskip("werkzeug", reason="werkzeug is not installed: pip install flask")

import httpx2

from werkzeug.test import Client

from helpers import KeepRecords


TIMEOUT = 10.0


class _ThreadingServer(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(name="serve")
def _serve():
    """
    Serve a WSGI application with a threaded wsgiref server; return its URL.
    """
    servers = []

    def serve(app) -> str:
        server = wsgiref.simple_server.make_server(
            "127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


@pytest.fixture(name="log")
def _log():
    return []


@pytest.fixture(name="registry")
def _registry(log):
    """
    A registry of one "session" per request, which commits when its request
    succeeded (and fails to when the request says so), and rolls back when it
    failed.
    """
    registry = uc.Registry()

    def open_session(ctx):
        state = {"fail": False}
        log.append(f"open {ctx.user_id}")
        try:
            yield state
        except BaseException as e:
            log.append(f"rollback {ctx.user_id} {type(e).__name__}")
            raise
        if state["fail"]:
            log.append(f"failed commit {ctx.user_id}")
            msg = "the database went away"
            raise OSError(msg)
        log.append(f"commit {ctx.user_id}")

    registry.register("session", open_session)
    return registry


def resolve(environ) -> uc.UserContext | None:
    user_id = environ.get("HTTP_X_USER", "")
    if not user_id:
        raise uc.UnauthenticatedError("Send x-user.")
    if user_id == "anonymous":
        return None
    return uc.UserContext(user_id=user_id, thread_id="t-1", run_id="r-1")


def whoami(environ, start_response):
    state = request_state(environ)
    if state.resources is not None:
        state.resources.get("session")
    body = json.dumps({"user": uc.current().user_id, "request_id": uc.current().request_id})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]


def wrap(app, registry=None, **options) -> UserContextMiddleware:
    return UserContextMiddleware(app, resolver=resolve, registry=registry, **options)


def problem(response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    return body


class TestArguments:
    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"app": None}, TypeError, "app must be a WSGI application, got NoneType"),
            ({"resolver": "me"}, TypeError, "resolver must be a function taking the WSGI environ"),
            ({"registry": {}}, TypeError, "registry must be a usercontext.Registry or None"),
            ({"request_id_header": "x request"}, ValueError, "must be an HTTP header name"),
            ({"request_id_header": b"x-id"}, ValueError, "must be an HTTP header name"),
            ({"trust_request_id": "yes"}, TypeError, "trust_request_id must be True, False"),
            ({"request_id_factory": "id"}, TypeError, "request_id_factory must be a function"),
            ({"strip_context_headers": 1}, TypeError, "strip_context_headers must be True"),
            ({"exempt": "/health"}, TypeError, r"Wrap a single path in a tuple"),
            ({"exempt": ("health",)}, ValueError, "must be a str starting with '/'"),
        ],
    )
    def test_bad_argument(self, options, error, match):
        """
        A wrong argument is refused when the middleware is made, with a
        message naming it and what it must be.
        """
        arguments = {"app": whoami, "resolver": resolve, **options}
        with pytest.raises(error, match=match):
            UserContextMiddleware(arguments.pop("app"), **arguments)

    def test_coroutine_resolver(self):
        """
        A coroutine function, or an object whose ``__call__`` is one, cannot
        resolve a WSGI request: no event loop runs it.
        """

        async def resolve_async(environ):
            return None

        class Resolver:
            async def __call__(self, environ):
                return None

        for resolver in (resolve_async, Resolver()):
            with pytest.raises(TypeError, match="has no event loop to run it"):
                UserContextMiddleware(whoami, resolver=resolver)

    def test_attributes_and_repr(self):
        """
        The middleware keeps its arguments, and its repr names the app.
        """
        middleware = wrap(whoami, exempt=["/health"], strip_context_headers=True)
        assert middleware.exempt == ("/health",)
        assert middleware.strip_context_headers is True
        assert middleware.request_id_header == "x-request-id"
        assert repr(middleware).startswith("<usercontext.wsgi.UserContextMiddleware(app=<function")


class TestRequestState:
    def test_without_the_middleware(self):
        """
        `request_state` of a request that did not pass through the middleware
        says how to add it.
        """
        with pytest.raises(uc.NoContextError, match="did not pass through"):
            request_state({})

    def test_without_a_user(self, serve):
        """
        A request let through with no user has no state: `request_state` says
        why, and nothing is bound.
        """
        seen = []

        def app(environ, start_response):
            seen.append((environ[STATE_KEY], uc.current_or_none()))
            with pytest.raises(uc.NoContextError, match=r"passed through .* with no user"):
                request_state(environ)
            start_response("204 No Content", [])
            return []

        url = serve(wrap(app))
        response = httpx2.get(url, headers={"x-user": "anonymous"}, timeout=TIMEOUT)
        assert response.status_code == 204
        assert len(response.headers["x-request-id"]) == 32
        assert seen == [(None, None)]


@pytest.fixture(name="readers", params=["without a logging adapter", "with a logging adapter"])
def _readers(request, monkeypatch):
    """
    Run the test as a service without, and with, a logging adapter that reads
    the id of a request being resolved.
    """
    on = request.param == "with a logging adapter"
    monkeypatch.setattr(usercontext.wsgi, "readers", [True] if on else [])
    return on


class TestRequestIds:
    def test_taken_from_the_client(self, serve, readers):
        """
        A valid id from the client is the request's, in the response's header.
        """
        url = serve(wrap(whoami))
        response = httpx2.get(url, headers={"x-user": "u-1", "x-request-id": "req-1"})
        assert response.json()["request_id"] == response.headers["x-request-id"] == "req-1"

    @pytest.mark.parametrize("sent", ["not an id", "null", "x" * 129, "é"])
    def test_replaced(self, serve, readers, sent):
        """
        An id that is not 1 to 128 visible ASCII characters, or breaks the
        library's rules (a placeholder), is replaced by the context's own.
        """
        url = serve(wrap(whoami))
        headers = {"x-user": "u-1", "x-request-id": sent.encode()}
        response = httpx2.get(url, headers=headers, timeout=TIMEOUT)
        assert response.json()["request_id"] == response.headers["x-request-id"] != sent
        assert len(response.headers["x-request-id"]) == 32

    def test_refusal_replaces_a_placeholder(self, serve, readers):
        """
        A refusal answers with a valid id, not the client's placeholder.
        """
        url = serve(wrap(whoami))
        response = httpx2.get(url, headers={"x-request-id": "null"}, timeout=TIMEOUT)
        assert response.status_code == 401
        assert problem(response)["request_id"] != "null"

    def test_policy_and_factory(self, serve, readers):
        """
        ``trust_request_id`` decides which ids are taken; ``request_id_factory``
        makes the others, for accepted and refused requests alike, and the
        header can be another.
        """
        numbers = iter(range(1, 100))
        url = serve(
            wrap(
                whoami,
                trust_request_id=lambda request_id: request_id.startswith("gw-"),
                request_id_factory=lambda: f"app-{next(numbers)}",
                request_id_header="X-Correlation-Id",
            )
        )
        headers = {"x-user": "u-1"}
        taken = httpx2.get(url, headers={**headers, "x-correlation-id": "gw-7"})
        assert taken.json()["request_id"] == taken.headers["x-correlation-id"] == "gw-7"
        made = httpx2.get(url, headers={**headers, "x-correlation-id": "me-7"})
        assert made.json()["request_id"] == made.headers["x-correlation-id"] == "app-1"
        refused = httpx2.get(url, headers={"x-correlation-id": "me-8"})
        assert refused.headers["x-correlation-id"] == "app-2"
        assert "x-request-id" not in refused.headers

    def test_never_trusted(self, serve, readers):
        """
        With ``trust_request_id=False`` the client's id is never taken.
        """
        url = serve(wrap(whoami, trust_request_id=False))
        response = httpx2.get(url, headers={"x-user": "u-1", "x-request-id": "req-1"})
        assert response.headers["x-request-id"] != "req-1"

    def test_bad_factory(self, serve, capsys):
        """
        A factory that makes an id that cannot be one is a bug of the service:
        its error reaches the server, which answers 500, naming the factory
        and the id in its log.
        """
        url = serve(wrap(whoami, request_id_factory=lambda: "two words"))
        response = httpx2.get(url, headers={"x-user": "u-1"}, timeout=TIMEOUT)
        assert response.status_code == 500
        assert "returned 'two words'; a request id must be a str" in capsys.readouterr().err

    def test_set_by_the_application(self, serve):
        """
        An id header the application set itself is kept.
        """

        def app(environ, start_response):
            start_response("200 OK", [("X-Request-ID", "mine")])
            return [b"ok"]

        response = httpx2.get(serve(wrap(app)), headers={"x-user": "u-1"})
        assert response.headers.get_list("x-request-id") == ["mine"]


class TestLogging:
    def test_resolver_and_refusal_log_the_request_id(self, serve):
        """
        With the logging adapter, what the resolver logs, and the middleware's
        line for a refusal, carry the id the client gets back, though no
        context exists yet; lines logged under the request carry its user.
        """
        from usercontext.stdlib import ContextFilter

        records = KeepRecords()
        records.addFilter(ContextFilter())
        logger = logging.getLogger("usercontext.tests.wsgi")
        logger.addHandler(records)
        logger.setLevel(logging.INFO)
        wsgi_logger = logging.getLogger("usercontext.wsgi")
        wsgi_logger.addHandler(records)
        wsgi_logger.setLevel(logging.INFO)

        def resolver(environ):
            logger.info("resolving")
            return resolve(environ)

        def app(environ, start_response):
            logger.info("serving")
            start_response("200 OK", [])
            return [b"ok"]

        try:
            url = serve(UserContextMiddleware(app, resolver=resolver))
            served = httpx2.get(url, headers={"x-user": "u-1"}, timeout=TIMEOUT)
            refused = httpx2.get(url, timeout=TIMEOUT)
        finally:
            logger.removeHandler(records)
            wsgi_logger.removeHandler(records)
            wsgi_logger.setLevel(logging.NOTSET)
        lines = [(r.getMessage(), r.user_id, r.request_id) for r in records.records]
        assert lines == [
            ("resolving", "-", served.headers["x-request-id"]),
            ("serving", "u-1", served.headers["x-request-id"]),
            ("resolving", "-", refused.headers["x-request-id"]),
            ("Refused GET /: 401 Send x-user.", "-", refused.headers["x-request-id"]),
        ]


class TestResolver:
    def test_wrong_return(self, serve, caplog):
        """
        A resolver that returns something else than a context or None fails
        the request with a 500 problem document, and the log says what to
        return.
        """
        middleware = UserContextMiddleware(whoami, resolver=lambda environ: "u-1")
        response = httpx2.get(serve(middleware), headers={"x-request-id": "req-9"})
        assert response.status_code == 500
        assert problem(response)["error"] == "internal_error"
        assert response.headers["x-request-id"] == "req-9"
        assert "returned str; it must return a usercontext.UserContext" in caplog.text
        assert "req-9" in caplog.text

    def test_group_of_refusals(self, serve):
        """
        An exception group holding only refusals is answered as its first.
        """

        def resolver(environ):
            errors = [uc.ForbiddenError("No."), uc.UnauthenticatedError("Who?")]
            msg = "checks"
            raise ExceptionGroup(msg, errors)  # noqa: F821  # a builtin from 3.11, backported

        response = httpx2.get(serve(UserContextMiddleware(whoami, resolver=resolver)))
        assert response.status_code == 403

    def test_http_exception(self, serve):
        """
        An exception with an HTTP status and a detail, as frameworks' own
        ``HTTPException``, is a refusal of that status, with its headers.
        """

        class HTTPError(Exception):
            status_code = 402
            detail = "Pay first."
            headers = {"X-Price": "3"}  # noqa: RUF012  # as the frameworks' exceptions

        def resolver(environ):
            raise HTTPError

        response = httpx2.get(serve(UserContextMiddleware(whoami, resolver=resolver)))
        assert response.status_code == 402
        assert response.headers["x-price"] == "3"
        assert problem(response)["detail"] == "Pay first."

    def test_logged_refusal(self, serve, caplog):
        """
        A refusal is logged at INFO on the ``usercontext.wsgi`` logger.
        """
        caplog.set_level(logging.INFO, "usercontext.wsgi")
        httpx2.get(f"{serve(wrap(whoami))}/notes")
        assert "Refused GET /notes: 401 Send x-user." in caplog.messages

    def test_exempt(self, serve):
        """
        An exempt path, and every path below it, is served with no user and
        without calling the resolver; a path that only starts alike is not.
        """
        url = serve(wrap(whoami, exempt=("/health",)))

        def user_of(path):
            response = httpx2.get(f"{url}{path}", timeout=TIMEOUT)
            return response.status_code

        # whoami needs a user: with none bound it raises, and the client gets a 500.
        assert user_of("/health") == user_of("/health/deep") == 500
        assert user_of("/healthy") == 401


class TestIsolation:
    def test_fresh_context_per_request(self, serve):
        """
        What a request sets in a context variable, and leaves set, is never
        seen by the next request served by the same thread, nor by the
        thread outside the request.
        """
        var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
        found = []

        def app(environ, start_response):
            found.append(var.get(None))
            var.set(uc.current().user_id)
            start_response("200 OK", [])
            return [b"ok"]

        middleware = wrap(app)
        client = Client(middleware)  # serves every request from this thread
        for user in ("u-1", "u-2", "u-3"):
            assert client.get("/", headers={"x-user": user}).status_code == 200
        assert found == [None, None, None]
        assert var.get(None) is None
        assert uc.current_or_none() is None

    def test_stream_steps_in_the_request_context(self):
        """
        Each chunk of a streamed response is made under the request's user,
        even when the server interleaves the chunks of two requests in one
        thread.
        """

        def app(environ, start_response):
            start_response("200 OK", [])
            for _ in range(3):
                yield uc.current().user_id.encode()

        middleware = wrap(app)
        a = Client(middleware).get("/", headers={"x-user": "u-a"}, buffered=False)
        b = Client(middleware).get("/", headers={"x-user": "u-b"}, buffered=False)
        chunks = [(next(a.response), next(b.response)) for _ in range(3)]
        a.close()
        b.close()
        assert chunks == [(b"u-a", b"u-b")] * 3


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


class TestStripContextHeaders:
    @pytest.mark.parametrize(
        ("baggage", "seen"),
        [
            (None, None),
            ("usercontext.user_id=u-admin", None),
            ("usercontext.user_id=u-admin, tenant=acme", "tenant=acme"),
        ],
    )
    def test_stripped(self, serve, baggage, seen):
        """
        With ``strip_context_headers=True`` the resolver and the application
        see no ``x-usercontext-*`` header and no ``usercontext.*`` baggage
        member; the server's environ is left as it was.
        """
        environs = []

        def resolver(environ):
            environs.append(("resolver", environ))
            return uc.UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")

        def app(environ, start_response):
            environs.append(("app", environ))
            start_response("200 OK", [])
            return [b"ok"]

        def server_side(environ, start_response):
            environs.append(("server", environ))
            return middleware(environ, start_response)

        middleware = UserContextMiddleware(app, resolver=resolver, strip_context_headers=True)
        headers = {"x-usercontext-user-id": "u-admin"}
        if baggage is not None:
            headers["baggage"] = baggage
        assert httpx2.get(serve(server_side), headers=headers).status_code == 200
        (_, server), (_, for_resolver), (_, for_app) = environs
        assert for_resolver is for_app is not server
        assert "HTTP_X_USERCONTEXT_USER_ID" not in for_app
        assert for_app.get("HTTP_BAGGAGE") == seen
        assert server["HTTP_X_USERCONTEXT_USER_ID"] == "u-admin"
