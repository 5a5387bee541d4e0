"""
Tests of `usercontext.wsgi.UserContextMiddleware`'s rules, one at a time:
its arguments, request ids, refusals, logging, isolation between requests
and the edge rule. Its responses, and when it closes a request's scope, are
tested in test_wsgi_responses.py; the tests under gunicorn and waitress, with
Flask and Django, in test_wsgi_servers.py.

Most run a WSGI application under the standard library's threaded WSGI server
(``wsgiref``) on a free port of 127.0.0.1, with httpx2 as the client. Where a
single thread must serve several requests, or the server's own reaction is
the point, they use Werkzeug's WSGI client, which drives the application as
PEP 3333 says a server does.
"""

from __future__ import annotations

import contextvars
import logging
import sys

import pytest

import usercontext as uc
import usercontext.wsgi

from usercontext.wsgi import STATE_KEY, UserContextMiddleware, request_state


pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")
pytest.importorskip("werkzeug", reason="werkzeug is not installed: pip install flask")

import httpx2

from werkzeug.test import Client

from helpers import KeepRecords
from wsgi_helpers import (  # the fixtures by their functions' names
    TIMEOUT,
    _log,  # noqa: F401
    _registry,  # noqa: F401
    _serve,  # noqa: F401
    problem,
    resolve,
    whoami,
    wrap,
)


if sys.version_info >= (3, 11):
    ExceptionGroupType = ExceptionGroup  # noqa: F821  # a builtin from Python 3.11
else:
    from exceptiongroup import ExceptionGroup as ExceptionGroupType


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


@pytest.mark.usefixtures("both_request_paths")  # see test_asgi_refusals
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


@pytest.mark.usefixtures("both_request_paths")  # see test_asgi_refusals
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
            raise ExceptionGroupType(msg, errors)

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


@pytest.mark.usefixtures("both_request_paths")  # see test_asgi_refusals
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
