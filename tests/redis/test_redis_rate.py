"""
`usercontext.redis.RedisRateLimiter` against a real Redis: the same decisions
as `usercontext.LocalRateLimiter` on the same arrivals, keys that expire,
script reloads, an unreachable Redis under both policies, and an
`EngineFactory` sharing a `RedisQuota` under a `Shed` policy.

The tests run on asyncio only: redis-py's asyncio client does not run on trio.
"""

from __future__ import annotations

import itertools
import time

import anyio
import pytest
import redis.asyncio

import usercontext as uc

from usercontext.redis import RedisQuota, RedisRateLimiter

from helpers import make_ctx, until


@pytest.fixture(name="anyio_backend")
def _anyio_backend():
    return "asyncio"


pytestmark = pytest.mark.anyio

_prefixes = itertools.count()

# Nothing answers on port 1 of the loopback interface.
_NOWHERE = "redis://127.0.0.1:1/0"


def _prefix():
    return f"rate{next(_prefixes)}"


@pytest.fixture(name="client")
async def _client(redis_db):
    client = redis.asyncio.Redis.from_url(redis_db)
    yield client
    await client.aclose()


class TestArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"rate": 0}, ValueError, "rate must be a finite number"),
            ({"rate": 10, "burst": 0}, ValueError, "burst must be at least 1"),
            ({"rate": 10, "prefix": ""}, ValueError, "prefix must be a non-empty str"),
            ({"rate": 10, "prefix": 3}, TypeError, "prefix must be a non-empty str"),
            ({"rate": 10, "on_unavailable": "x"}, ValueError, "'fail_closed' or 'fail_open'"),
            ({"rate": 10, "backend_timeout": 0}, ValueError, "backend_timeout"),
        ],
    )
    def test_bad(self, kwargs, error, match):
        """
        A bad setting raises at construction, naming the argument.
        """
        with pytest.raises(error, match=match):
            RedisRateLimiter(_NOWHERE, **kwargs)

    def test_bad_client(self):
        """
        A client that is neither a redis.asyncio.Redis nor a URL is refused.
        """
        with pytest.raises(TypeError, match=r"redis.asyncio.Redis client or a URL"):
            RedisRateLimiter(object(), rate=1)  # type: ignore[arg-type]


class TestRedisRateLimiter:
    async def test_matches_the_local_limiter(self, redis_db):
        """
        On the same arrivals, in real time, the Redis limiter admits and
        refuses exactly what the local one does, with the same wait (to a
        few milliseconds): bursts, a refill, a partial refill and an idle
        spell. Every decision is at least 100 ms away from a threshold.
        """
        # 5 per second (an interval of 200 ms) in bursts of 3: each number
        # is when a request arrives, in ms from the start.
        schedule = [0, 0, 0, 0, 300, 300, 900, 900, 900, 900, 3000, 3000, 3000, 3000]
        expected = [1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0]
        local = uc.LocalRateLimiter(5, burst=3)
        shared = RedisRateLimiter(redis_db, rate=5, burst=3, prefix=_prefix())
        seen = {"local": [], "redis": []}
        waits = {"local": [], "redis": []}
        async with shared:
            start = time.monotonic()
            for at in schedule:
                await anyio.sleep(max(0.0, start + at / 1000 - time.monotonic()))
                for name, limiter in (("local", local), ("redis", shared)):
                    try:
                        await limiter.admit("u-1")
                    except uc.RateLimitedError as e:  # noqa: PERF203  # each arrival decides
                        seen[name].append(0)
                        waits[name].append(e.wait)
                    else:
                        seen[name].append(1)
        assert seen["local"] == expected
        assert seen["redis"] == expected
        for a, b in zip(waits["local"], waits["redis"], strict=True):
            assert abs(a - b) < 0.05
        assert shared.stats() == uc.RateLimitStats(
            admitted=10, limited=4, keys=0, rate=5.0, burst=3
        )

    async def test_keys_expire_and_scripts_reload(self, redis_db, client):
        """
        A user's key lives only until its bucket is full again; a flushed
        script is loaded again on the next call.
        """
        prefix = _prefix()
        limiter = RedisRateLimiter(client, rate=10, burst=2, prefix=prefix)
        await limiter.admit("u-1")
        ttl = await client.pttl(f"{prefix}:u-1")
        assert 0 < ttl <= 100
        await client.script_flush()
        await limiter.admit("u-1")
        with pytest.raises(uc.RateLimitedError) as caught:
            await limiter.admit("u-1")
        assert 0 < caught.value.wait <= 0.1
        await anyio.sleep(0.25)
        assert await client.exists(f"{prefix}:u-1") == 0
        await limiter.aclose()  # a client of the caller's is left open
        assert await client.ping()
        assert repr(limiter) == (
            f"<usercontext.redis.RedisRateLimiter(rate=10, burst=2, prefix={prefix!r})>"
        )
        assert (limiter.rate, limiter.burst) == (10.0, 2)
        assert isinstance(limiter, uc.RateLimiter)

    async def test_unavailable_fail_closed(self):
        """
        With Redis unreachable, ``fail_closed`` refuses with 503.
        """
        async with RedisRateLimiter(_NOWHERE, rate=10, backend_timeout=0.2) as limiter:
            with pytest.raises(uc.BackendUnavailableError, match="fail_closed"):
                await limiter.admit("u-1")
        assert limiter.stats().admitted == 0

    async def test_unavailable_fail_open(self, caplog):
        """
        With Redis unreachable, ``fail_open`` limits per process with the
        same settings, and says so once in the log.
        """
        limiter = RedisRateLimiter(
            _NOWHERE, rate=1, burst=2, on_unavailable="fail_open", backend_timeout=0.2
        )
        async with limiter:
            await limiter.admit("u-1")
            await limiter.admit("u-1")
            with pytest.raises(uc.RateLimitedError):
                await limiter.admit("u-1")
        stats = limiter.stats()
        assert (stats.admitted, stats.limited) == (2, 1)
        assert caplog.text.count("limiting per process") == 1


class TestWithRedisQuota:
    async def test_shed_and_rate_over_a_shared_quota(self, redis_db):
        """
        An `EngineFactory` drawing from a `RedisQuota` takes the same policy:
        the Redis rate limit first, then the shed bound on waiters, whose
        count includes requests in their acquire round trip.
        """
        prefix = _prefix()
        quota = RedisQuota(redis_db, per_key=1, prefix=prefix)
        limiter = RedisRateLimiter(redis_db, rate=100, burst=10, prefix=prefix + "r")
        shed = uc.Shed(max_waiting_per_user=1)
        factory = uc.EngineFactory(
            lambda ctx: ctx.user_id, quota=quota, admission=uc.Admission(rate=limiter, shed=shed)
        )
        release = anyio.Event()
        entered = []

        async def hold():
            async with factory.engine(make_ctx(1)) as engine:
                entered.append(engine)
                await release.wait()

        async with quota, limiter, anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await until(lambda: len(entered) == 1)
            tg.start_soon(hold)  # waits for u-1's only slot
            await until(lambda: shed.stats().waiting == 1)
            with pytest.raises(uc.LoadShedError) as caught:
                async with factory.engine(make_ctx(1)):
                    pass
            assert caught.value.reason == "user_queue"
            release.set()
        assert entered == ["u-1", "u-1"]
        stats = factory.stats()
        assert stats.created == 2
        assert stats.admission.rate.admitted == 3
        assert stats.admission.shed.user_queue == 1

    async def test_shed_waiters_time_out_or_are_cancelled(self, redis_db):
        """
        Over a shared quota, a waiter that times out, or is cancelled, leaves
        the shed policy's queue; only the one that timed out (and so surely
        waited) teaches it how long a slot is held.
        """
        quota = RedisQuota(redis_db, per_key=1, prefix=_prefix())
        shed = uc.Shed(deadline=False)
        factory = uc.EngineFactory(
            lambda ctx: 1, quota=quota, timeout=0.2, admission=uc.Admission(shed=shed)
        )
        async with quota, factory.engine(make_ctx(1)):
            with pytest.raises(uc.QuotaTimeoutError):
                async with factory.engine(make_ctx(1)):
                    pass
            assert shed.stats().waiting == 0
            assert 0.2 <= shed.stats().hold < 0.5  # learnt from the timeout only
            with anyio.move_on_after(0.05):
                async with factory.engine(make_ctx(1)):
                    pass
            assert shed.stats().waiting == 0
        assert factory.stats().quota.in_use == 0

    async def test_rate_only_over_a_shared_quota(self, redis_db):
        """
        A policy with a rate limit only acquires from the shared quota as a
        factory without a policy does.
        """
        prefix = _prefix()
        quota = RedisQuota(redis_db, per_key=1, prefix=prefix)
        limiter = uc.LocalRateLimiter(1, burst=1)
        factory = uc.EngineFactory(lambda ctx: 1, quota=quota, admission=uc.Admission(rate=limiter))
        async with quota:
            async with factory.engine(make_ctx(1)):
                pass
            with pytest.raises(uc.RateLimitedError):
                async with factory.engine(make_ctx(1)):
                    pass
        assert factory.stats().quota.granted == 1
