"""
Admission refusals of an `EngineFactory` used by an application under
`usercontext.asgi.UserContextMiddleware`, served by uvicorn on a free port of
127.0.0.1: the client gets 429 or 503, a problem document, and
``Retry-After`` from the refusal's ``retry_after``.
"""

from __future__ import annotations

import json

import pytest

from test_asgi_uvicorn import _Uvicorn

import usercontext as uc

from usercontext.asgi import UserContextMiddleware

from asgi_helpers import Client, http_scope, json_start, resolve, session_registry


httpx2 = pytest.importorskip("httpx2", reason="pip install httpx2")


def engine_app():
    """
    An application whose ``/rated`` route uses an engine under a rate limit
    of one request per 3 s, and whose ``/broken`` route uses an engine whose
    creation always fails, under a breaker that opens at the first failure.
    """
    rated = uc.EngineFactory(
        lambda ctx: "engine",
        admission=uc.Admission(rate=uc.LocalRateLimiter(1 / 3, burst=1)),
    )

    def broken(ctx):
        msg = "the engine backend is down"
        raise ConnectionError(msg)

    breaking = uc.EngineFactory(
        broken,
        admission=uc.Admission(breaker=uc.CircuitBreaker(failures=1, cool_down=30)),
    )

    async def app(scope, receive, send):
        factory = rated if scope["path"] == "/rated" else breaking
        async with factory.engine() as engine:
            body = json.dumps({"engine": engine}).encode()
            await send(json_start(body))
            await send({"type": "http.response.body", "body": body})

    return UserContextMiddleware(app, resolver=resolve)


@pytest.mark.server("uvicorn")
class TestUnderUvicorn:
    def test_refusals_carry_retry_after(self):
        """
        Over real HTTP: the second request within the rate limit's interval
        gets 429 ``rate_limited`` with Retry-After 3 and the same number in
        the problem document; once a failed creation opened the breaker, the
        next request gets 503 ``circuit_open`` with Retry-After 30, without
        the engine being created; each carries its request id.
        """
        with (
            _Uvicorn(engine_app()) as server,
            httpx2.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client,
        ):
            headers = {"x-user": "u-1"}
            first = client.get("/rated", headers=headers)
            assert first.status_code == 200
            assert first.json() == {"engine": "engine"}
            second = client.get("/rated", headers={**headers, "x-request-id": "req-2"})
            assert second.status_code == 429
            assert second.headers["retry-after"] == "3"
            assert second.headers["content-type"] == "application/problem+json"
            assert second.headers["x-request-id"] == "req-2"
            problem = second.json()
            assert problem["error"] == "rate_limited"
            assert problem["retry_after"] == 3
            assert problem["status"] == 429
            assert problem["request_id"] == "req-2"
            assert "1 per" not in problem["detail"]
            assert "0.333333 per second with bursts of 1" in problem["detail"]
            # Another user has a bucket of their own.
            assert client.get("/rated", headers={"x-user": "u-2"}).status_code == 200

            failed = client.get("/broken", headers=headers)
            assert failed.status_code == 500
            assert failed.json()["error"] == "internal_error"
            refused = client.get("/broken", headers=headers)
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "30"
            assert refused.json()["error"] == "circuit_open"
            assert refused.json()["retry_after"] == 30


class TestInProcess:
    """
    The same answers, driven in process, on asyncio and trio, for the paths
    a server rarely shows.
    """

    pytestmark = pytest.mark.anyio

    @pytest.mark.parametrize("with_scope", [False, True])
    async def test_refusal_without_retry_after(self, with_scope):
        """
        A refusal without retry_after gets its status and no Retry-After;
        the request's scope (if any) rolls back, and nothing is raised to
        the server.
        """
        log = []

        async def app(scope, receive, send):
            raise uc.ForbiddenError("Not yours.")

        registry = session_registry(log) if with_scope else None
        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        client = Client()
        await mw(http_scope(), client.receive, client.send)
        assert client.status() == 403
        assert b"retry-after" not in client.headers()
        assert client.json()["error"] == "forbidden"
        assert client.json()["detail"] == "Not yours."

    @pytest.mark.parametrize("with_scope", [False, True])
    async def test_refusal_that_cannot_be_sent(self, with_scope):
        """
        A refusal whose answer cannot be sent (the client left) is raised to
        the server, as a crash would be.
        """

        async def app(scope, receive, send):
            raise uc.TooManyRequestsError(retry_after=2)

        registry = session_registry([]) if with_scope else None
        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        client = Client()
        client.fail_after = 0
        with pytest.raises(uc.TooManyRequestsError):
            await mw(http_scope(), client.receive, client.send)
        assert client.sent == []
