"""
`usercontext.redis.RedisQuota` against a real Redis: keys that expire, script
reloads, wake-ups, lost leases, and its arguments.

The tests run on asyncio only: redis-py's asyncio client does not run on trio.
The faults (killed, paused or stopped servers and processes) are in
``test_redis_quota_faults.py``.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis.asyncio

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import usercontext as uc

from usercontext.redis import RedisLease, RedisQuota, RedisQuotaStats

from helpers import until


@pytest.fixture(name="anyio_backend")
def _anyio_backend():
    return "asyncio"


_prefixes = itertools.count()


def _prefix():
    return f"q{next(_prefixes)}"


@pytest.fixture(name="client")
async def _client(redis_db):
    client = redis.asyncio.Redis.from_url(redis_db)
    yield client
    await client.aclose()


class TestArguments:
    """
    Bad arguments are refused with errors that name them, before anything is
    made.
    """

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"per_key": lambda key: 2}, TypeError, "per_key of a RedisQuota must be an int"),
            ({"per_key": -1}, ValueError, "per_key"),
            ({"total": "3"}, TypeError, "total"),
            ({"ttl": 0}, ValueError, "ttl"),
            ({"ttl": 0.001}, ValueError, "at least 0.01"),
            ({"ttl": float("inf")}, ValueError, "finite"),
            ({"prefix": ""}, ValueError, "non-empty str without braces"),
            ({"prefix": "a{b}"}, ValueError, "braces"),
            ({"prefix": 3}, TypeError, "prefix must be a str"),
            ({"on_unavailable": "ignore"}, ValueError, "'fail_closed' or 'fail_open'"),
            ({"backend_timeout": 0}, ValueError, "backend_timeout"),
            ({"poll_interval": None}, TypeError, "poll_interval"),
        ],
    )
    def test_bad_settings(self, kwargs, error, match):
        """
        Each bad setting raises, naming the argument.
        """
        with pytest.raises(error, match=match):
            RedisQuota("redis://127.0.0.1:1/0", **kwargs)

    def test_bad_client(self):
        """
        A client that is neither a redis.asyncio.Redis nor a URL is refused.
        """
        with pytest.raises(TypeError, match=r"redis must be a redis.asyncio.Redis client or a URL"):
            RedisQuota(object())

    async def test_release_checks(self, client):
        """
        Releasing twice raises LeaseReleasedError; another quota's lease,
        ValueError; a closed quota grants nothing.
        """
        a, b = RedisQuota(client, prefix=_prefix()), RedisQuota(client, prefix=_prefix())
        lease = await a.acquire("u")
        with pytest.raises(ValueError, match="belongs to another quota"):
            await b.arelease(lease)
        with pytest.raises(ValueError, match="belongs to another quota"):
            await a.arelease(uc.LocalQuota().acquire_nowait("u"))
        await a.arelease(lease)
        with pytest.raises(uc.LeaseReleasedError, match="already released"):
            await a.arelease(lease)
        await a.aclose()
        await a.aclose()
        await b.aclose(timeout=1)
        with pytest.raises(uc.QuotaError, match="was closed"):
            await a.acquire("u")
        with pytest.raises(TypeError):
            RedisLease()


class TestKeys:
    """
    Redis holds what is held and waited for, and nothing once a user holds
    and waits for nothing.
    """

    async def test_nothing_left_after_release(self, client):
        """
        After grants, a rejection, a timeout, a cancelled waiter and the
        releases, the database is empty; while held, each lease has a score of
        the server's clock plus the TTL.
        """
        for total in (None, 5):
            async with RedisQuota(client, per_key=2, total=total, ttl=2, prefix=_prefix()) as q:
                held = [await q.acquire("u"), await q.acquire("u")]
                tag = f"{{{q._prefix}:u}}:h" if total is None else f"{{{q._prefix}}}:h:u"
                # The scores first: a renewal after them but before the clock
                # is read cannot push a score past the clock plus the TTL.
                scores = [s for _, s in await client.zrange(tag, 0, -1, withscores=True)]
                now_s, now_us = await client.time()
                now_ms = now_s * 1000 + now_us // 1000
                assert all(now_ms + 1500 < s <= now_ms + 2000 for s in scores), (scores, now_ms)
                assert 1500 < await client.pttl(tag) <= 2000
                with pytest.raises(uc.QuotaExceededError):
                    await q.acquire("u", timeout=0)
                with pytest.raises(uc.QuotaTimeoutError):
                    await q.acquire("u", timeout=0.01)
                task = asyncio.create_task(q.acquire("u"))
                await until(lambda: q.stats().waiting == 1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                for lease in held:
                    await lease.arelease()
                assert await client.dbsize() == 0, await client.keys()

    async def test_nothing_left_after_ttl(self, client):
        """
        Leases never released (their process gone) expire with their TTL, and
        so do their keys.
        """
        q = RedisQuota(client, per_key=2, ttl=0.3, prefix=_prefix())
        await q.acquire("u")
        await q.acquire("v")
        await q.aclose()  # stops renewing, releases nothing
        assert await client.dbsize() > 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        while await client.dbsize():  # noqa: ASYNC110  # polls Redis
            await asyncio.sleep(0.02)
        assert loop.time() - start < 0.5


class TestClient:
    """
    The quota times each command itself unless its client bounds the command
    as tightly: read and connect timeouts of at most backend_timeout, no
    retries, no blocking pool. A quota made from a URL makes such a client.
    """

    async def test_which_clients_bound_their_commands(self, redis_db):
        tight = {
            "socket_timeout": 0.2,
            "socket_connect_timeout": 0.2,
            "retry": Retry(NoBackoff(), 0),
        }
        cases = [
            ({}, False),  # redis-py's default timeouts and retries
            (tight, True),
            ({**tight, "retry": Retry(NoBackoff(), 1)}, False),
            ({**tight, "socket_timeout": 0.3}, False),
            ({**tight, "socket_connect_timeout": None}, True),  # the read timeout applies
            ({**tight, "socket_timeout": None, "socket_connect_timeout": None}, False),
        ]
        for kwargs, bounded in cases:
            client = redis.asyncio.Redis.from_url(redis_db, **kwargs)
            async with RedisQuota(client, backend_timeout=0.25, prefix=_prefix()) as q:
                assert q._bounded is bounded, kwargs
                await (await q.acquire("u")).arelease()
            await client.aclose()
        pool = redis.asyncio.BlockingConnectionPool.from_url(redis_db, **tight)
        client = redis.asyncio.Redis(connection_pool=pool)
        async with RedisQuota(client, backend_timeout=0.25, prefix=_prefix()) as q:
            assert not q._bounded
        await client.aclose()
        await pool.aclose()
        async with RedisQuota(redis_db, backend_timeout=0.25, prefix=_prefix()) as q:
            assert q._bounded
            await (await q.acquire("u")).arelease()


class TestScripts:
    """
    The scripts run by SHA and are loaded again when Redis forgot them.
    """

    @pytest.mark.parametrize("total", [None, 3])
    async def test_settings_written_into_the_scripts(self, client, total):
        """
        The prefix is written into the scripts' text as a Lua literal: quotes,
        backslashes, a digit after an escaped byte and non-ASCII text in it (and
        in the user's name, read back from the key) change nothing; the limit
        holds and the keys are the documented ones.
        """
        prefix = f'{_prefix()}"\\:1]]é'
        async with RedisQuota(client, per_key=1, total=total, prefix=prefix) as q:
            lease = await q.acquire("ü:9}x")
            assert lease.fence is not None
            with pytest.raises(uc.QuotaExceededError):
                await q.acquire("ü:9}x", timeout=0)
            tag = f"{{{prefix}:ü:9}}x}}:h" if total is None else f"{{{prefix}}}:h:ü:9}}x"
            assert await client.zcard(tag) == 1
            other = await q.acquire("v")
            await other.arelease()
            await lease.arelease()
            assert await client.dbsize() == 0, await client.keys()

    async def test_two_quotas_with_other_settings(self, client):
        """
        Two quotas with the same prefix but other limits run their own
        scripts: each applies its own limit.
        """
        prefix = _prefix()
        async with (
            RedisQuota(client, per_key=1, prefix=prefix) as one,
            RedisQuota(client, per_key=3, prefix=prefix) as three,
        ):
            held = [await three.acquire("u"), await three.acquire("u")]
            with pytest.raises(uc.QuotaExceededError):
                await one.acquire("u", timeout=0)
            held.append(await three.acquire("u", timeout=0))
            with pytest.raises(uc.QuotaExceededError):
                await three.acquire("u", timeout=0)
            for lease in held:
                await lease.arelease()

    async def test_reloaded_after_script_flush(self, client):
        """
        After SCRIPT FLUSH, acquire, release and the renewal load their
        script again (NOSCRIPT) and work.
        """
        await client.script_flush()
        async with RedisQuota(client, ttl=0.3, prefix=_prefix()) as q:
            lease = await q.acquire("u")
            loads = q.redis_stats().script_loads
            assert loads == 1
            await client.script_flush()
            renewals = q.redis_stats().renewals
            await until(lambda: q.redis_stats().renewals > renewals + 1)
            assert not lease.lost
            await client.script_flush()
            other = await q.acquire("u")
            await client.script_flush()
            await lease.arelease()
            await other.arelease()
            assert q.redis_stats().script_loads == loads + 3
            assert await client.dbsize() == 0


class TestWaiting:
    """
    Waiters across processes: one wake-up per release, FIFO, the fallback poll.
    """

    async def test_one_release_wakes_one_waiter(self, client):
        """
        Ten quota objects (ten processes, each with its channel) each have a
        waiter on one user; each release wakes exactly one of them.
        """
        prefix = _prefix()
        quotas = [RedisQuota(client, per_key=1, prefix=prefix) for _ in range(11)]
        holder, waiters = quotas[0], quotas[1:]
        held = await holder.acquire("u")
        tasks = []
        for q in waiters:
            tasks.append(asyncio.create_task(q.acquire("u")))
            await until(lambda q=q: q.stats().waiting == 1)
        await held.arelease()
        first = await asyncio.wait_for(tasks[0], 2)
        await asyncio.sleep(0.2)
        wakeups = [q.redis_stats().wakeups for q in waiters]
        assert wakeups == [1] + [0] * 9
        await first.arelease()
        second = await asyncio.wait_for(tasks[1], 2)
        await asyncio.sleep(0.1)
        assert sum(q.redis_stats().wakeups for q in waiters) == 2
        await second.arelease()
        for task in tasks[2:]:
            await (await asyncio.wait_for(task, 2)).arelease()
        assert sum(q.redis_stats().wakeups for q in waiters) == 10
        for q in quotas:
            await q.aclose()
        assert await client.dbsize() == 0

    async def test_lost_wake_up_found_by_poll(self, client):
        """
        A waiter whose wake-up never comes (a release by a process that could
        not publish it, here a grant made by hand in Redis's data) is granted
        by the fallback poll within its interval.
        """
        async with RedisQuota(client, per_key=1, poll_interval=0.1, prefix=_prefix()) as q:
            held = await q.acquire("u")
            task = asyncio.create_task(q.acquire("u"))
            await until(lambda: q.stats().waiting == 1)
            # Drop the listener's subscription: the wake-up is lost.
            await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await held.arelease()
            lease = await asyncio.wait_for(task, 1)
            assert lease.fence is not None
            await lease.arelease()

    async def test_forgotten_waiter_queues_again(self, client):
        """
        A waiter that Redis forgot (its entry deleted) queues again at its next
        poll, and is granted.
        """
        async with RedisQuota(client, per_key=1, poll_interval=0.05, prefix=_prefix()) as q:
            held = await q.acquire("u")
            task = asyncio.create_task(q.acquire("u"))
            await until(lambda: q.stats().waiting == 1)
            await client.delete(f"{{{q._prefix}:u}}:q", f"{{{q._prefix}:u}}:w")
            polls = q.redis_stats().renewals
            await until(lambda: q.redis_stats().renewals >= polls + 2)
            assert await client.zcard(f"{{{q._prefix}:u}}:q") == 1
            await held.arelease()
            await (await asyncio.wait_for(task, 1)).arelease()


class TestLostLeases:
    """
    A lease found gone at renewal is lost: the body holding it is cancelled,
    and LeaseLostError raised in its place.
    """

    async def test_async_with_lease(self, client):
        """
        The body of ``async with await quota.acquire(key)`` is cancelled and
        LeaseLostError raised within a renewal interval of the loss.
        """
        async with RedisQuota(client, ttl=0.3, prefix=_prefix()) as q:
            seen = []
            lease = await q.acquire("u")
            lease.add_lost_callback(lambda: seen.append("lost"))
            lease.add_lost_callback(lambda: 1 / 0)  # logged, does not stop the others
            loop = asyncio.get_running_loop()
            with pytest.raises(uc.LeaseLostError, match="expired while it was held"):
                async with lease:
                    await client.delete(f"{{{q._prefix}:u}}:h")
                    start = loop.time()
                    await asyncio.sleep(5)
            assert loop.time() - start <= 0.1 + 0.05
            assert (lease.lost, lease.released, seen) == (True, True, ["lost"])
            assert "lost" in repr(lease) or lease.released
            assert q.redis_stats().lost == 1
            assert q.stats().in_use == 0

    async def test_engine_body(self, client):
        """
        The body of ``async with factory.engine(ctx)`` is cancelled and
        LeaseLostError raised in its place; the engine is closed.
        """
        closed = []
        async with RedisQuota(client, ttl=0.3, prefix=_prefix()) as q:
            factory = uc.EngineFactory(lambda ctx: object(), close=closed.append, quota=q)
            ctx = uc.UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")
            for deadline in (None, 10):
                factory._deadline = deadline
                with pytest.raises(uc.LeaseLostError, match="user 'u-1' expired"):
                    async with factory.engine(ctx):
                        await client.delete(f"{{{q._prefix}:u-1}}:h")
                        await asyncio.sleep(5)
            assert len(closed) == 2
            assert q.redis_stats().lost == 2
            await factory.aclose()

    def test_local_leases_are_never_lost(self):
        """
        A LocalQuota lease is never lost and never calls its callbacks.
        """
        lease = uc.LocalQuota().acquire_nowait("u")
        lease.add_lost_callback(lambda: 1 / 0)
        assert lease.lost is False


class TestStats:
    """
    The stats count what this object did, and the Redis stats what it did
    with Redis.
    """

    async def test_stats(self, client):
        """
        Gauges and counters after a grant, a rejection and a release.
        """
        async with RedisQuota(client, per_key=1, total=10, prefix=_prefix()) as q:
            lease = await q.acquire("u")
            with pytest.raises(uc.QuotaExceededError) as refused:
                await q.acquire("u", timeout=0)
            assert (refused.value.scope, refused.value.limit) == ("key", 1)
            stats = q.stats()
            assert (stats.in_use, stats.granted, stats.rejected, stats.total) == (1, 1, 1, 10)
            assert isinstance(lease, RedisLease)
            assert lease.fence > 0
            assert "RedisQuota(per_key=1, total=10" in repr(q)
            await lease.arelease()
            assert q.redis_stats() == RedisQuotaStats(
                available=True,
                lost=0,
                fallbacks=0,
                outages=0,
                wakeups=0,
                renewals=q.redis_stats().renewals,
                script_loads=q.redis_stats().script_loads,
                acquire_errors=0,
                release_errors=0,
                renew_errors=0,
            )

    async def test_fences_grow(self, client):
        """
        Fencing tokens grow with every grant, also after the keys expired.
        """
        async with RedisQuota(client, per_key=1, prefix=_prefix()) as q:
            fences = []
            for _ in range(5):
                lease = await q.acquire("u")
                fences.append(lease.fence)
                await lease.arelease()
                assert await client.dbsize() == 0
            assert fences == sorted(set(fences))

    async def test_sync_release(self, client):
        """
        ``lease.release()`` in async code releases in a task of its own.
        """
        async with RedisQuota(client, per_key=1, prefix=_prefix()) as q:
            lease = await q.acquire("u")
            lease.release()
            lease.release()
            assert q.stats().in_use == 0
            await until(lambda: not q._keeper._spawned)
            assert await client.dbsize() == 0


class TestFastAPI:
    """
    A quota whose Redis is unavailable refuses with 503 and Retry-After.
    """

    async def test_503(self, redis_db):
        """
        EngineDep answers 503 problem+json with Retry-After when the quota
        raises BackendUnavailableError.
        """
        fastapi = pytest.importorskip("fastapi")
        httpx = pytest.importorskip("httpx2")
        from usercontext.asgi import UserContextMiddleware
        from usercontext.fastapi import EngineDep

        quota = RedisQuota("redis://127.0.0.1:1/0")
        factory = uc.EngineFactory(lambda ctx: object(), quota=quota)
        app = fastapi.FastAPI()

        @app.get("/")
        async def endpoint(engine=EngineDep(factory)):  # noqa: B008
            return {}

        ctx = uc.UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")
        asgi = UserContextMiddleware(app, resolver=lambda scope: ctx)
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["error"] == "backend_unavailable"
        await quota.aclose()


class TestRoundTrips:
    """
    A release cut mid-flight still finishes, and a pool too small for the
    load is the caller's error, not an outage.
    """

    async def test_release_cancelled_mid_flight(self, client):
        async with RedisQuota(client, per_key=1, prefix=_prefix()) as q:
            lease = await q.acquire("u")
            task = asyncio.create_task(q.arelease(lease))
            await asyncio.sleep(0)  # the release's round trip is in flight
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert q.stats().in_use == 0
            # The slot is free in Redis: taken again at once.
            again = await q.acquire("u", timeout=0)
            await again.arelease()
            assert q.redis_stats().release_errors == 0

    async def test_pool_too_small_is_not_an_outage(self, redis_db):
        pool = redis.asyncio.ConnectionPool.from_url(redis_db, max_connections=1)
        client = redis.asyncio.Redis(connection_pool=pool)
        try:
            async with RedisQuota(client, per_key=1, prefix=_prefix()) as q:
                # The only connection is busy with a blocking command.
                busy = asyncio.create_task(client.blpop(["nothing"], timeout=0.3))
                await asyncio.sleep(0.05)
                with pytest.raises(redis.exceptions.MaxConnectionsError):
                    await q.acquire("u", timeout=0)
                await busy
                assert q.redis_stats().acquire_errors == 0
                assert q.redis_stats().available
        finally:
            await client.aclose()
            await pool.aclose()
