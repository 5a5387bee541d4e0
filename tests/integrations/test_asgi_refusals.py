"""
Tests of the requests `usercontext.asgi.UserContextMiddleware` refuses: the
errors a resolver raises, the RFC 9457 problem documents that answer them, and
what the logs say about them.
"""

from __future__ import annotations

import json
import logging
import sys

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

import usercontext as uc

from usercontext.asgi import STATE_KEY, UserContextMiddleware

from asgi_helpers import (
    Client,
    aresolve,
    assert_crash_answer,
    http_scope,
    json_app,
    resolve,
    ws_scope,
)


if sys.version_info >= (3, 11):
    ExceptionGroupType = ExceptionGroup  # noqa: F821  # a builtin from Python 3.11
else:
    from exceptiongroup import ExceptionGroup as ExceptionGroupType


# The middleware serves a request by one path or another, by whether a
# logging adapter reads the ids of requests being resolved: both are tested
# (TestRefusedRequestsInTheLogs has one, and takes the second).
@pytest.mark.usefixtures("both_request_paths")
class TestRefusals:
    @pytest.mark.parametrize("resolver", [resolve, aresolve], ids=["sync", "async"])
    async def test_unauthenticated_is_401_json(self, resolver):
        """
        `UnauthenticatedError` from the resolver answers 401 with a JSON body
        holding its message and the request id, a WWW-Authenticate challenge
        and the request id header; the application is not called.
        """
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver, registry=uc.Registry())
        await mw(http_scope(user=None), client.receive, client.send)

        assert client.status() == 401
        headers = client.headers()
        request_id = headers[b"x-request-id"].decode()
        assert len(request_id) == 32
        assert headers[b"www-authenticate"] == b"Bearer"
        assert headers[b"content-type"] == b"application/problem+json"
        assert headers[b"content-length"] == b"%d" % len(client.body())
        assert client.json() == {
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "detail": "Send an x-user header.",
            "error": "unauthenticated",
            "request_id": request_id,
        }
        assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
        # Compact, as FastAPI's and Starlette's JSON responses are (EngineDep's 429).
        assert client.body() == json.dumps(client.json(), separators=(",", ":")).encode()

    async def test_unauthenticated_reuses_the_request_id_and_the_challenge(self):
        """
        A refused request keeps the valid request id its client sent, and the
        401 carries the exception's challenge.
        """

        def resolver(scope):
            raise uc.UnauthenticatedError(
                "The token expired.", challenge='Bearer error="invalid_token"'
            )

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        await mw(http_scope(("x-request-id", "req-123")), client.receive, client.send)

        assert client.headers()[b"www-authenticate"] == b'Bearer error="invalid_token"'
        assert client.headers()[b"x-request-id"] == b"req-123"
        assert client.json()["request_id"] == "req-123"
        assert client.json()["detail"] == "The token expired."

    async def test_invalid_context_is_400_json_naming_the_field(self):
        """
        `InvalidContextError` from the resolver (here, a placeholder thread id
        taken from a header) answers 400 with a JSON body naming the field.
        """
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolve)
        scope = http_scope(("x-thread", "null"), ("x-request-id", "req-9"))
        await mw(scope, client.receive, client.send)

        assert client.status() == 400
        assert client.headers()[b"x-request-id"] == b"req-9"
        assert client.headers()[b"content-type"] == b"application/problem+json"
        assert b"www-authenticate" not in client.headers()
        body = client.json()
        assert body["error"] == "invalid_context"
        assert body["field"] == "thread_id"
        assert "thread_id" in body["detail"]
        assert body["request_id"] == "req-9"
        assert STATE_KEY not in scope

    @pytest.mark.parametrize(
        ("user", "thread", "status", "error"),
        [(None, "t-1", 401, "unauthenticated"), ("u-42", "null", 400, "invalid_context")],
    )
    async def test_websocket_denial_response(self, user, thread, status, error):
        """
        Where the server supports the ``websocket.http.response`` extension, a
        refused WebSocket handshake gets the same JSON denial response as HTTP.
        """
        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        scope = ws_scope(
            ("x-thread", thread),
            ("x-request-id", "ws-1"),
            user=user,
            extensions={"websocket.http.response": {}},
        )
        await UserContextMiddleware(json_app(), resolver=resolve)(
            scope, client.receive, client.send
        )

        assert [m["type"] for m in client.sent] == [
            "websocket.http.response.start",
            "websocket.http.response.body",
        ]
        assert client.status() == status
        assert client.headers()[b"x-request-id"] == b"ws-1"
        assert client.headers()[b"content-type"] == b"application/problem+json"
        assert client.json()["status"] == status
        assert client.json()["error"] == error
        assert client.json()["request_id"] == "ws-1"

    @pytest.mark.parametrize(
        ("user", "thread", "reason"),
        [(None, "t-1", "401 unauthenticated"), ("u-42", "null", "400 invalid_context")],
    )
    async def test_websocket_close_without_the_extension(self, user, thread, reason):
        """
        Without the extension, a refused WebSocket handshake is closed with
        code 1008 (policy violation) and a reason naming the status.
        """
        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        scope = ws_scope(("x-thread", thread), user=user)
        await UserContextMiddleware(json_app(), resolver=resolve)(
            scope, client.receive, client.send
        )

        assert client.sent == [{"type": "websocket.close", "code": 1008, "reason": reason}]


@pytest.mark.usefixtures("both_request_paths")
class TestProblemDocuments:
    @pytest.mark.parametrize(
        ("error", "status", "headers", "body"),
        [
            (
                uc.ForbiddenError("Not your workspace."),
                403,
                {},
                {"title": "Forbidden", "detail": "Not your workspace.", "error": "forbidden"},
            ),
            (
                uc.ServiceUnavailableError("The key server is down.", retry_after=2.5),
                503,
                {b"retry-after": b"3"},
                {
                    "title": "Service Unavailable",
                    "detail": "The key server is down.",
                    "error": "service_unavailable",
                    "retry_after": 3,
                },
            ),
            (
                uc.TooManyRequestsError("Slow down.", retry_after=10),
                429,
                {b"retry-after": b"10"},
                {
                    "title": "Too Many Requests",
                    "detail": "Slow down.",
                    "error": "too_many_requests",
                    "retry_after": 10,
                },
            ),
            (
                uc.RequestRefusedError(
                    "Your plan has no exports.",
                    status=402,
                    type="https://example.com/problems/plan",
                    title="Upgrade needed",
                    error="plan_limit",
                    headers={"Link": "</plans>"},
                ),
                402,
                {b"link": b"</plans>"},
                {
                    "type": "https://example.com/problems/plan",
                    "title": "Upgrade needed",
                    "detail": "Your plan has no exports.",
                    "error": "plan_limit",
                },
            ),
        ],
        ids=["403", "503", "429", "custom"],
    )
    async def test_every_refusal_of_the_family(self, error, status, headers, body):
        """
        Each refusal a resolver raises answers its status with a problem
        document (RFC 9457) in the same shape, its headers, and the request
        id; the application is not called.
        """

        def resolver(scope):
            raise error

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver)
        scope = http_scope(("x-request-id", "req-77"))
        await mw(scope, client.receive, client.send)

        assert client.status() == status
        assert client.headers() == {
            b"content-type": b"application/problem+json",
            b"content-length": b"%d" % len(client.body()),
            **headers,
            b"x-request-id": b"req-77",
        }
        assert client.json() == {
            "type": "about:blank",
            "status": status,
            **body,
            "request_id": "req-77",
        }
        assert list(client.json())[:4] == ["type", "title", "status", "detail"]
        assert STATE_KEY not in scope

    async def test_starlette_http_exception_is_mapped(self):
        """
        Starlette's HTTPException raised by a resolver is answered with its
        status, detail and headers in the problem shape, not a 500.
        """
        exceptions = pytest.importorskip("starlette.exceptions")
        HTTPException = exceptions.HTTPException  # noqa: N806  # the class, as Starlette names it

        def resolver(scope):
            raise HTTPException(403, "Suspended account.", headers={"X-Reason": "suspended"})

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(("x-request-id", "req-1")), client.receive, client.send
        )

        assert client.status() == 403
        assert client.headers()[b"x-reason"] == b"suspended"
        assert client.json() == {
            "type": "about:blank",
            "title": "Forbidden",
            "status": 403,
            "detail": "Suspended account.",
            "error": "forbidden",
            "request_id": "req-1",
        }

    async def test_fastapi_http_exception_with_a_json_detail(self):
        """
        FastAPI's HTTPException may carry any JSON as its detail: the problem's
        detail is then the status's phrase, and the JSON is under ``errors``.
        """
        HTTPException = pytest.importorskip("fastapi").HTTPException  # noqa: N806  # the class

        def resolver(scope):
            raise HTTPException(401, {"reason": "expired"}, headers={"WWW-Authenticate": "Bearer"})

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(("x-request-id", "req-2")), client.receive, client.send
        )

        assert client.status() == 401
        assert client.headers()[b"www-authenticate"] == b"Bearer"
        assert client.json() == {
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "detail": "Unauthorized",
            "error": "unauthorized",
            "errors": {"reason": "expired"},
            "request_id": "req-2",
        }

    async def test_any_http_exception_like_error_is_mapped(self):
        """
        The mapping needs no framework: any exception with an int
        ``status_code`` from 400 to 599 and a ``detail`` is a refusal, with
        or without headers.
        """

        class Refused(Exception):  # noqa: N818
            status_code = 451
            detail = "Not here."

        def resolver(scope):
            raise Refused

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert client.status() == 451
        assert client.json()["title"] == "Unavailable For Legal Reasons"
        assert client.json()["detail"] == "Not here."

    async def test_a_status_http_does_not_name(self):
        """
        A status HTTP does not name gets the title "Error" and the code
        "error".
        """

        class Refused(Exception):  # noqa: N818
            status_code = 599
            detail = "Odd."

        def resolver(scope):
            raise Refused

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert client.status() == 599
        assert (client.json()["title"], client.json()["error"]) == ("Error", "error")

    @pytest.mark.parametrize(
        "attributes",
        [
            {"status_code": 302, "detail": "x"},
            {"status_code": "401", "detail": "x"},
            {"status_code": 401},
        ],
        ids=["redirect", "str-status", "no-detail"],
    )
    async def test_other_errors_with_a_status_propagate(self, attributes):
        """
        An error whose status is not an int from 400 to 599, or without a
        detail, is not a refusal: it propagates.
        """
        error = type("Odd", (Exception,), attributes)()

        def resolver(scope):
            raise error

        client = Client()
        with pytest.raises(type(error)):
            await UserContextMiddleware(json_app(), resolver=resolver)(
                http_scope(), client.receive, client.send
            )
        assert_crash_answer(client.sent)

    async def test_crlf_in_an_http_exception_header_is_never_sent(self):
        """
        An HTTPException whose header holds CR/LF cannot be answered as it is:
        the middleware raises a ValueError naming it, and sends nothing.
        """

        class HTTPException(Exception):  # noqa: N818
            status_code = 401
            detail = "no"
            headers = {"WWW-Authenticate": "Bearer\r\nSet-Cookie: session=stolen"}  # noqa: RUF012

        def resolver(scope):
            raise HTTPException

        client = Client()
        with pytest.raises(
            ValueError, match=r"HTTPException\(headers=\.\.\.\) raised by the resolver"
        ):
            await UserContextMiddleware(json_app(), resolver=resolver)(
                http_scope(), client.receive, client.send
            )
        assert_crash_answer(client.sent)

    async def test_exception_group_of_refusals_is_its_first(self):
        """
        A resolver whose task group raises only refusals (nested groups too)
        is answered with the first of them, in the group's order.
        """

        async def resolver(scope):
            async def check_token():
                raise uc.UnauthenticatedError("The token expired.")

            async def check_plan():
                await anyio.sleep(0.01)
                raise uc.ForbiddenError("No plan.")

            async with anyio.create_task_group() as tg:
                tg.start_soon(check_token)
                tg.start_soon(check_plan)

        def nested(scope):
            raise ExceptionGroupType(
                "outer",
                [
                    ExceptionGroupType("inner", [uc.ForbiddenError("first")]),
                    uc.UnauthenticatedError("2nd"),
                ],
            )

        statuses = []
        for fn in (resolver, nested):
            client = Client()
            await UserContextMiddleware(json_app(), resolver=fn)(
                http_scope(), client.receive, client.send
            )
            statuses.append((client.status(), client.json()["detail"]))

        assert statuses == [(401, "The token expired."), (403, "first")]

    async def test_exception_group_with_another_error_propagates(self):
        """
        A group holding a refusal and any other error propagates unchanged:
        the other error is a bug to see, not a refusal.
        """
        group = ExceptionGroupType("both", [uc.UnauthenticatedError(), RuntimeError("db down")])

        def resolver(scope):
            raise group

        client = Client()
        with pytest.raises(ExceptionGroupType) as e:
            await UserContextMiddleware(json_app(), resolver=resolver)(
                http_scope(), client.receive, client.send
            )
        assert e.value is group
        assert_crash_answer(client.sent)

    @pytest.mark.parametrize(
        ("error", "code", "reason"),
        [
            (uc.ForbiddenError(), 1008, "403 forbidden"),
            (uc.TooManyRequestsError(retry_after=1), 1013, "429 too_many_requests"),
            (uc.ServiceUnavailableError(), 1013, "503 service_unavailable"),
            (uc.RequestRefusedError("x", status=500, error="e" * 200), 1011, "500 " + "e" * 119),
        ],
        ids=["403", "429", "503", "500-long"],
    )
    async def test_websocket_close_codes(self, error, code, reason):
        """
        Without denial responses, a refused handshake is closed with 1008 for
        a client error, 1013 (try again later) for 429 and 503, and 1011 for
        another server error; the reason fits a close frame (123 bytes).
        """

        def resolver(scope):
            raise error

        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        await UserContextMiddleware(json_app(), resolver=resolver)(
            ws_scope(), client.receive, client.send
        )

        assert client.sent == [{"type": "websocket.close", "code": code, "reason": reason}]
        assert len(reason.encode()) <= 123

    async def test_websocket_denial_of_a_403(self):
        """
        With denial responses, a WebSocket handshake gets the same problem
        document as HTTP.
        """

        def resolver(scope):
            raise uc.ForbiddenError("Not your room.")

        client = Client([{"type": "websocket.connect"}], disconnect="websocket.disconnect")
        scope = ws_scope(("x-request-id", "ws-9"), extensions={"websocket.http.response": {}})
        await UserContextMiddleware(json_app(), resolver=resolver)(
            scope, client.receive, client.send
        )

        assert client.status() == 403
        assert client.json()["detail"] == "Not your room."
        assert client.json()["request_id"] == "ws-9"


class TestRefusedRequestsInTheLogs:
    @pytest.fixture(name="records")
    def _records(self):
        """
        Records of the ``resolver`` and ``usercontext.asgi`` loggers, through
        a `ContextFilter` on the handler.
        """
        from usercontext.stdlib import ContextFilter

        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)

        handler = Keep()
        handler.addFilter(ContextFilter())
        loggers = [logging.getLogger("resolver"), logging.getLogger("usercontext.asgi")]
        for log in loggers:
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        yield records
        for log in loggers:
            log.removeHandler(handler)
            log.setLevel(logging.NOTSET)

    @pytest.mark.parametrize("in_thread", [False, True], ids=["inline", "thread"])
    async def test_refused_request_is_found_by_its_id(self, records, in_thread):
        """
        While a request is resolved and refused, no user is known, but the
        records of the resolver and the middleware's refusal line carry the
        request id the client gets back.
        """

        def resolver(scope):
            logging.getLogger("resolver").warning("checking the token")
            return resolve(scope)

        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolver, resolver_in_thread=in_thread)
        await mw(http_scope(user=None), client.receive, client.send)

        request_id = client.headers()[b"x-request-id"].decode()
        assert [(r.getMessage(), r.request_id, r.user_id) for r in records] == [
            ("checking the token", request_id, "-"),
            ("Refused GET /: 401 Send an x-user header.", request_id, "-"),
        ]

    async def test_client_id_in_the_logs(self, records):
        """
        A valid id the client sent is the one in the records.
        """
        client = Client()
        mw = UserContextMiddleware(json_app(), resolver=resolve)
        await mw(http_scope(("x-request-id", "req-5"), user=None), client.receive, client.send)

        assert [r.request_id for r in records] == ["req-5"]

    async def test_accepted_request_keeps_the_id_its_resolver_logged(self, records):
        """
        When the resolver of an accepted request logged before any id was
        known, the request takes the id those records carry.
        """

        def resolver(scope):
            logging.getLogger("resolver").warning("looking the user up")
            return resolve(scope)

        client = Client()
        await UserContextMiddleware(json_app(), resolver=resolver)(
            http_scope(), client.receive, client.send
        )

        assert [r.request_id for r in records] == [client.json()["request_id"]]

    async def test_the_server_never_sees_the_pending_id(self):
        """
        The pending id is set only while the resolver runs: the server's
        ``send`` of a refusal, and the application of an anonymous request,
        run without it, so the server cannot carry it to another request.
        """
        import usercontext.stdlib  # noqa: F401  # a logging adapter: the id is pending

        from usercontext._pending import pending

        seen = []

        class Watching(Client):
            async def send(self, message):
                seen.append(pending.get(None))
                await super().send(message)

        async def app(scope, receive, send):
            seen.append(pending.get(None))
            await json_app(payload={"ok": 1})(scope, receive, send)

        def resolver(scope):
            seen.append(pending.get(None).get())
            return None if dict(scope["headers"]).get(b"x-user") == b"anon" else resolve(scope)

        mw = UserContextMiddleware(app, resolver=resolver)
        for user in (None, "anon"):
            client = Watching()
            await mw(http_scope(user=user), client.receive, client.send)

        assert [type(s).__name__ for s in seen] == ["str", "NoneType", "NoneType", "str"] + [
            "NoneType"
        ] * 3

    async def test_without_a_logging_adapter_nothing_is_set(self, monkeypatch):
        """
        Only the logging adapters read the pending id: with none loaded, the
        middleware sets nothing while resolving, and refusals, anonymous and
        generated ids work the same.
        """
        from usercontext import _pending

        monkeypatch.setattr(_pending, "readers", [])
        monkeypatch.setattr("usercontext.asgi.readers", _pending.readers)
        seen = []

        def resolver(scope):
            seen.append(_pending.pending.get(None))
            headers = dict(scope["headers"])
            return None if headers.get(b"x-user") == b"anon" else resolve(scope)

        made = iter(["gen-1", "gen-2", "gen-3"])
        mw = UserContextMiddleware(
            json_app(), resolver=resolver, request_id_factory=lambda: next(made)
        )
        ids = []
        for user in (None, "anon", "u-1"):
            client = Client()
            await mw(http_scope(user=user), client.receive, client.send)
            ids.append((client.status(), client.header_values(b"x-request-id")[0]))

        assert seen == [None, None, None]
        assert ids == [(401, b"gen-1"), (200, b"gen-2"), (200, b"gen-3")]
