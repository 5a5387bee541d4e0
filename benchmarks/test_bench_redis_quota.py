"""
Benchmarks of `usercontext.redis.RedisQuota`, each paired with its floor in
the same run. They need a Redis (``USERCONTEXT_TEST_REDIS_URL``, or a
throwaway ``redis-server``) and are skipped without one.

Targets: uncontended acquire + release <= 1.3x two raw ``EVALSHA`` round
trips of trivial scripts on the same connection; the 1,000-request scenario
(100 users, 2 per user, 10 ms work) through RedisQuota in one process <= 1.5x
LocalQuota's P50.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
import redis.asyncio

import usercontext as uc

from test_quota import _legacy_scenario, _record
from usercontext.redis import RedisQuota


BATCH = 200
_prefixes = itertools.count()


@pytest.fixture(name="loop", scope="module")
def _loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(name="client")
def _client(redis_db, loop):
    # A blocking pool: 1,000 requests at once wait for one of 50 connections.
    pool = redis.asyncio.BlockingConnectionPool.from_url(redis_db, max_connections=50)
    client = redis.asyncio.Redis(connection_pool=pool)
    yield client
    loop.run_until_complete(client.aclose())
    loop.run_until_complete(pool.aclose())


@pytest.mark.benchmark(group="redis quota: uncontended acquire + release")
def test_two_evalsha_floor(benchmark, loop, client):
    """
    Floor: two raw ``EVALSHA`` round trips of trivial scripts on one
    connection, per acquire + release.
    """
    sha = loop.run_until_complete(client.script_load("return 1"))

    async def batch():
        for _ in range(BATCH):
            await client.evalsha(sha, 1, "k")
            await client.evalsha(sha, 1, "k")

    benchmark(lambda: loop.run_until_complete(batch()))


@pytest.mark.benchmark(group="redis quota: uncontended acquire + release")
def test_redis_quota(benchmark, loop, client):
    """
    ``await quota.acquire(key)`` and ``await quota.arelease(lease)`` on a hot
    key with room. Target: <= 1.3x the floor.
    """
    quota = RedisQuota(client, per_key=2, prefix=f"b{next(_prefixes)}")

    async def batch():
        for _ in range(BATCH):
            lease = await quota.acquire("u-42")
            await quota.arelease(lease)

    benchmark(lambda: loop.run_until_complete(batch()))
    assert quota.stats().in_use == 0
    loop.run_until_complete(quota.aclose())


def _scenario(acquire, release):
    """
    The legacy scenario of ``test_quota.py`` (1,000 requests from 100 users,
    10 ms of work each), through *acquire* and *release*.
    """

    @contextlib.asynccontextmanager
    async def acquire_for(key):
        lease = await acquire(key)
        try:
            yield
        finally:
            await release(lease)

    return _legacy_scenario(acquire_for)


def test_scenario_local_quota_floor(benchmark, loop):
    """
    Floor: the scenario under `LocalQuota(per_key=2)`; P50 and P99 in the
    extra info.
    """
    quota = uc.LocalQuota(per_key=2)
    result: list[list[float]] = []
    benchmark.pedantic(
        lambda: result.append(loop.run_until_complete(_scenario(quota.acquire, quota.arelease))),
        rounds=3,
        iterations=1,
    )
    _record(benchmark, min(result, key=lambda lat: lat[499]))


@pytest.mark.benchmark(group="redis quota: 1,000 requests, 100 users, limit 2")
def test_scenario_redis_floor(benchmark, loop, client):
    """
    The physical floor of the scenario on Redis: each request runs two raw
    ``EVALSHA`` of trivial scripts (stand-ins for acquire and release) on
    the same pool, with no quota logic and no waiting; P50 and P99 in the
    extra info.
    """
    sha = loop.run_until_complete(client.script_load("return 1"))

    async def acquire(key: str) -> str:
        await client.evalsha(sha, 1, key)
        return key

    async def release(key: str) -> None:
        await client.evalsha(sha, 1, key)

    result: list[list[float]] = []
    benchmark.pedantic(
        lambda: result.append(loop.run_until_complete(_scenario(acquire, release))),
        rounds=3,
        iterations=1,
    )
    _record(benchmark, min(result, key=lambda lat: lat[499]))


@pytest.mark.benchmark(group="redis quota: 1,000 requests, 100 users, limit 2")
def test_scenario_redis_quota(benchmark, loop, client):
    """
    The scenario under `RedisQuota(per_key=2)` in one process. Target: P50
    <= 1.5x the floor's.
    """
    quota = RedisQuota(client, per_key=2, prefix=f"b{next(_prefixes)}", backend_timeout=5)
    result: list[list[float]] = []
    benchmark.pedantic(
        lambda: result.append(loop.run_until_complete(_scenario(quota.acquire, quota.arelease))),
        rounds=3,
        iterations=1,
    )
    _record(benchmark, min(result, key=lambda lat: lat[499]))
    assert quota.stats().in_use == 0
    loop.run_until_complete(quota.aclose())
