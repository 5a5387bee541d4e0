"""
`usercontext.redis.RedisQuota` passes the quota conformance suite against a
real Redis (a database of its own per test).

The tests run on asyncio only: redis-py's asyncio client does not run on trio.
"""

from __future__ import annotations

import itertools

import pytest

from usercontext.redis import RedisQuota
from usercontext.testing import QuotaConformance


@pytest.fixture(name="anyio_backend")
def _anyio_backend():
    return "asyncio"


_prefixes = itertools.count()


class TestRedisQuota(QuotaConformance):
    """
    `RedisQuota` passes the whole suite, with and without a total limit.
    """

    @pytest.fixture(autouse=True)
    def _url(self, redis_db):
        self.url = redis_db

    async def make_quota(self, *, per_key, total):
        return RedisQuota(self.url, per_key=per_key, total=total, prefix=f"t{next(_prefixes)}")

    async def close_quota(self, quota):
        await quota.aclose()
