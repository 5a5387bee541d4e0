"""
Benchmarks of `usercontext.redis.RedisQuota`, each paired with its floor in
the same run. They need a Redis (``USERCONTEXT_TEST_REDIS_URL``, or a
throwaway ``redis-server``) and are skipped without one.

Targets: uncontended acquire + release <= 1.3x two raw ``EVALSHA`` round
trips of trivial scripts on the same connection (read the median ratio of
``test_uncontended_interleaved``, which times the two in turn in every call);
the 1,000-request scenario (100 users, 2 per user, 10 ms work) through
RedisQuota in one process <= 1.5x LocalQuota's P50.

The uncontended pair runs on a client that bounds each command itself (a read
and connect timeout of ``backend_timeout``, no retries), as the quota makes
from a URL: the quota then adds no timer of its own per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import statistics
import time

import pytest
import redis.asyncio

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import usercontext as uc

from test_quota import _legacy_scenario, _record
from usercontext.redis import RedisQuota


BATCH = 200
_TRIVIAL = "return 1"
_TRIVIAL_SHA = hashlib.sha1(_TRIVIAL.encode(), usedforsecurity=False).hexdigest()
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


@pytest.fixture(name="bounded")
def _bounded(redis_db, loop):
    # Each command bounded by the client, as RedisQuota makes it from a URL.
    client = redis.asyncio.Redis.from_url(
        redis_db, socket_timeout=0.25, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0)
    )
    assert loop.run_until_complete(client.script_load(_TRIVIAL)) == _TRIVIAL_SHA
    yield client
    loop.run_until_complete(client.aclose())


@pytest.mark.benchmark(group="redis quota: uncontended acquire + release")
def test_two_evalsha_floor(benchmark, loop, bounded):
    """
    Floor: two raw ``EVALSHA`` round trips of trivial scripts on one
    connection, per acquire + release.
    """
    benchmark(lambda: loop.run_until_complete(_floor_batch(bounded)))


@pytest.mark.benchmark(group="redis quota: uncontended acquire + release")
def test_redis_quota(benchmark, loop, bounded):
    """
    ``await quota.acquire(key)`` and ``await quota.arelease(lease)`` on a hot
    key with room. Target: <= 1.3x the floor.
    """
    quota = RedisQuota(bounded, per_key=2, prefix=f"b{next(_prefixes)}")
    benchmark(lambda: loop.run_until_complete(_quota_batch(quota)))
    assert quota.stats().in_use == 0
    loop.run_until_complete(quota.aclose())


@pytest.mark.benchmark(group="redis quota: uncontended, interleaved")
def test_uncontended_interleaved(benchmark, loop, bounded):
    """
    The two above timed in turn in every call (the floor, then ours, on the
    same connection), so that both meet the same load of a shared machine.
    The ratio of each call and their median are in ``extra_info`` and printed.
    Target: median ratio <= 1.3x.
    """
    quota = RedisQuota(bounded, per_key=2, prefix=f"b{next(_prefixes)}")
    ratios: list[float] = []

    async def both():
        start = time.perf_counter()
        await _floor_batch(bounded)
        middle = time.perf_counter()
        await _quota_batch(quota)
        ratios.append((time.perf_counter() - middle) / (middle - start))

    loop.run_until_complete(both())  # warm-up: scripts loaded, tasks started
    ratios.clear()
    benchmark(lambda: loop.run_until_complete(both()))
    median = statistics.median(ratios)
    benchmark.extra_info["ratios"] = ratios
    benchmark.extra_info["median_ratio"] = median
    print(f"\nuncontended acquire + release / two raw EVALSHA: median {median:.3f}x")  # noqa: T201  # the ratio has no column
    assert quota.stats().in_use == 0
    loop.run_until_complete(quota.aclose())


async def _floor_batch(client: redis.asyncio.Redis) -> None:
    """
    Two raw ``EVALSHA`` of a trivial script, *BATCH* times.
    """
    sha = _TRIVIAL_SHA
    for _ in range(BATCH):
        await client.evalsha(sha, 1, "k")
        await client.evalsha(sha, 1, "k")


async def _quota_batch(quota: RedisQuota) -> None:
    """
    An uncontended acquire and release, *BATCH* times.
    """
    for _ in range(BATCH):
        lease = await quota.acquire("u-42")
        await quota.arelease(lease)


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
