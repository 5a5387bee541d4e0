"""
`usercontext.fastapi.EngineDep` with a factory that has an admission policy:
its refusals reach the client with their own status, error code and
Retry-After.
"""

import pytest

import usercontext as uc


pytest.importorskip("fastapi", reason="fastapi is not installed: pip install usercontext[fastapi]")
pytest.importorskip("httpx2", reason="httpx2 is not installed: pip install httpx2")

from test_fastapi import as_user, assert_settled, build, client_of, new_factory


pytestmark = pytest.mark.anyio


class TestAdmission:
    async def test_rate_limit_and_breaker(self):
        """
        A request over the user's rate limit gets 429 ``rate_limited`` with
        the limit's Retry-After (not the dependency's fixed one); the first
        request of another user passes.
        """
        limiter = uc.LocalRateLimiter(0.25, burst=1)  # one request per 4 s
        app = build(factory=new_factory([], admission=uc.Admission(rate=limiter)), retry_after=1)
        async with client_of(app) as client:
            first = await client.get("/engine/async", headers=as_user("u-1"))
            second = await client.get("/engine/async", headers=as_user("u-1"))
            other = await client.get("/engine/async", headers=as_user("u-2"))
        assert first.status_code == other.status_code == 200
        assert second.status_code == 429
        assert second.headers["retry-after"] == "4"
        problem = second.json()
        assert (problem["error"], problem["retry_after"], problem["status"]) == (
            "rate_limited",
            4,
            429,
        )
        assert problem["title"] == "Too Many Requests"
        assert "0.25 per second" in problem["detail"]
        assert_settled(app)

    async def test_refusal_from_create_without_retry_after(self):
        """
        A refusal raised by *create* itself without a retry_after gets the
        dependency's Retry-After.
        """

        def create(ctx):
            msg = "The model backend is down."
            raise uc.ServiceUnavailableError(msg)

        app = build(factory=uc.EngineFactory(create), retry_after=7)
        async with client_of(app) as client:
            response = await client.get("/engine/async", headers=as_user("u-1"))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.json()["detail"] == "The model backend is down."
