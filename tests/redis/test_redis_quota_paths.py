"""
The rarer paths of `usercontext.redis.RedisQuota`: a timeout whose leave cannot
reach Redis, a waiter re-queued onto a free slot, a cut request that leaves its
queue once Redis answers, sync releases of every kind of lease, and a release
cancelled while Redis is paused. And the lost-lease hook of the core's lease
(`usercontext._quota.LosableLease`), which other backends may use, on asyncio
and trio.

The Redis tests run on asyncio only: redis-py's asyncio client does not run on
trio.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
import time

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio
import redis.asyncio.client
import redis.exceptions

import usercontext as uc

from usercontext._quota import LosableLease, grant_lease
from usercontext._redis._quota_keeper import Down, Waiter, _describe
from usercontext.redis import RedisQuota

from helpers import KeepRecords, until


_prefixes = itertools.count()


def _prefix():
    return f"p{next(_prefixes)}"


@pytest.fixture(name="client")
async def _client(redis_db):
    client = redis.asyncio.Redis.from_url(redis_db)
    yield client
    await client.aclose()


class _Granter:
    def __init__(self):
        self.given_back = []

    def _give_back(self, lease):
        self.given_back.append(lease)
        lease._quota = None


def _losable(granter):
    lease = grant_lease(LosableLease, granter, "u-1")
    lease._init_losable()
    return lease


class TestLosableLease:
    """
    The lost-lease hook of the core, on both event loops.
    """

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request):
        return request.param

    async def test_lost_once(self):
        """
        A lease lost twice calls its callbacks once; a failing callback is
        logged and the others still run.
        """
        lease = _losable(_Granter())
        seen = []
        lease.add_lost_callback(lambda: seen.append(1))
        lease.add_lost_callback(lambda: 1 / 0)
        lease.add_lost_callback(lambda: seen.append(2))
        records = []
        logger = logging.getLogger("usercontext")
        handler = KeepRecords(records)
        logger.addHandler(handler)
        try:
            lease._lose()
            lease._lose()
        finally:
            logger.removeHandler(handler)

        assert (lease.lost, seen) == (True, [1, 2])
        assert [r.getMessage() for r in records] == [f"A lost-lease callback of {lease!r} failed"]

    async def test_async_with(self, anyio_backend):
        """
        On asyncio, a loss cancels the body of ``async with`` and raises
        LeaseLostError in its place. On trio there is no asyncio task to
        cancel: the loss is only recorded. Either way the lease is released
        on the way out.
        """
        granter = _Granter()
        lease = _losable(granter)
        reached = []
        if anyio_backend == "asyncio":
            with pytest.raises(uc.LeaseLostError):
                async with lease:
                    lease._lose()
                    await anyio.lowlevel.checkpoint()
                    reached.append("after")  # pragma: no cover  # cancelled above
        else:
            async with lease:
                lease._lose()
                await anyio.lowlevel.checkpoint()
                reached.append("after")
        assert lease.lost
        assert reached == ([] if anyio_backend == "asyncio" else ["after"])
        assert granter.given_back == [lease]


@pytest.fixture(name="anyio_backend")
def _anyio_backend():
    return "asyncio"


class TestTimeouts:
    async def test_timeout_whose_leave_fails(self, client, monkeypatch):
        """
        A waiter that times out while its leave cannot reach Redis still
        raises QuotaTimeoutError, counted once, reporting the key as full.
        """
        async with RedisQuota(client, per_key=1, prefix=_prefix()) as q:
            held = await q.acquire("u")

            async def down(key, lease_id):
                return None

            monkeypatch.setattr(q, "_leave_quietly", down)
            with pytest.raises(uc.QuotaTimeoutError) as e:
                await q.acquire("u", timeout=0.05)
            monkeypatch.undo()
            await held.arelease()

        assert (e.value.in_use, e.value.limit) == (1, 1)
        assert q.stats().timed_out == 1

    async def test_requeued_onto_a_free_slot(self, client):
        """
        A waiter that Redis forgot, together with the lease it waited behind
        (FLUSHDB, as a restart would), queues again at its next poll and finds
        the slot free: it is granted then.
        """
        async with RedisQuota(client, per_key=1, poll_interval=0.05, prefix=_prefix()) as q:
            held = await q.acquire("u")
            task = asyncio.create_task(q.acquire("u"))
            await until(lambda: q.stats().waiting == 1)
            await client.flushdb()
            lease = await asyncio.wait_for(task, 2)
            assert lease.fence is not None
            assert q.stats().in_use == 2  # this object's count: the old lease is still held here
            await lease.arelease()
            await held.arelease()


class TestCutRequests:
    async def test_leaves_its_queue_once_redis_answers(self, redis_server):
        """
        A request waiting in the queue when Redis stops answering fails with
        BackendUnavailableError; its entry stays in Redis while Redis is
        paused, and is removed within a second of Redis answering again.
        """
        client = redis.asyncio.Redis.from_url(redis_server.url)
        checker = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            async with RedisQuota(client, per_key=1, poll_interval=0.05, prefix="cut") as q:
                held = await q.acquire("u")
                waiter = asyncio.create_task(q.acquire("u"))
                await until(lambda: q.stats().waiting == 1)
                assert await checker.zcard("{cut:u}:q") == 1
                redis_server.signal(signal.SIGSTOP)
                try:
                    with pytest.raises(uc.BackendUnavailableError):
                        await asyncio.wait_for(waiter, 2)
                    await asyncio.sleep(0.6)  # its leave fails, and is tried again
                finally:
                    redis_server.signal(signal.SIGCONT)
                resumed = time.monotonic()
                while await checker.zcard("{cut:u}:q"):  # a round trip
                    assert time.monotonic() - resumed < 1
                    await asyncio.sleep(0.02)
                await held.arelease()
        finally:
            await checker.aclose()
            await client.aclose()


class TestSyncRelease:
    async def test_twice_and_from_the_fallback(self, redis_server):
        """
        ``Lease.release()`` of a lease released already does nothing; of a
        lease the local fallback granted, it frees the fallback's slot.
        """
        async with RedisQuota(redis_server.url, per_key=1, on_unavailable="fail_open") as q:
            lease = await q.acquire("u")
            lease.release()
            lease.release()
            await until(lambda: q.stats().in_use == 0)
            redis_server.kill()
            local = await q.acquire("v")
            assert local.fence is None
            local.release()
            again = await q.acquire("v", timeout=0)  # the slot is free again
            again.release()

        assert q.stats().in_use == 0


class TestCancelledRelease:
    async def test_cancelled_while_redis_is_paused(self, redis_server):
        """
        A release cancelled (twice) while its round trip waits on a paused
        Redis still completes once Redis answers, and then raises the
        cancellation: the slot is free.
        """
        async with RedisQuota(redis_server.url, per_key=1, backend_timeout=2.0) as q:
            lease = await q.acquire("u")
            redis_server.signal(signal.SIGSTOP)
            try:
                task = asyncio.create_task(q.arelease(lease))
                await asyncio.sleep(0.05)
                task.cancel()
                await asyncio.sleep(0.05)
                task.cancel()  # again, while it finishes the round trip
                await asyncio.sleep(0.05)
                assert not task.done()  # the round trip goes on
            finally:
                redis_server.signal(signal.SIGCONT)
            with pytest.raises(asyncio.CancelledError):
                await task
            again = await q.acquire("u", timeout=0)
            await again.arelease()


class TestKeeper:
    async def test_a_renewal_refused_by_redis(self, client):
        """
        A renewal round that Redis refuses (a key of the wrong type) is
        counted and logged, and the quota goes on: the lease is released as
        usual.
        """
        records = []
        logger = logging.getLogger("usercontext")
        handler = KeepRecords(records)
        logger.addHandler(handler)
        try:
            async with RedisQuota(client, ttl=0.3, prefix="wrong") as q:
                lease = await q.acquire("u")
                await client.delete("{wrong:u}:h")
                await client.set("{wrong:u}:h", "not a sorted set")
                await until(lambda: q.redis_stats().renew_errors >= 1, timeout=2)
                await client.delete("{wrong:u}:h")
                await lease.arelease()
        finally:
            logger.removeHandler(handler)

        assert any(r.getMessage().startswith("Renewing the leases of the quota") for r in records)
        assert not lease.lost

    async def test_a_wakeup_for_a_waiter_gone(self, client):
        """
        A wake-up for a waiter that is gone (timed out, or granted by a poll
        first) is counted and changes nothing.
        """
        async with RedisQuota(client, per_key=1, prefix=_prefix()) as q:
            keeper = q._keeper
            before = keeper.wakeups

            keeper._wake("no-such-waiter 7")

            assert keeper.wakeups == before + 1
            assert "no-such-waiter" not in keeper.waiters
            assert q.stats().in_use == 0

    async def test_waiters_when_closed(self, client):
        """
        Requests still waiting when the quota closes fail with
        BackendUnavailableError; two that start waiting at once on a new
        quota share one subscription.
        """
        q = RedisQuota(client, per_key=1, prefix="closing")
        held = await q.acquire("u", timeout=0)  # never waits: subscribes to nothing
        waiters = [asyncio.create_task(q.acquire("u")) for _ in range(2)]
        await until(lambda: q.stats().waiting == 2)
        await held.arelease()
        # Either may have queued first: the first in the queue is granted.
        done, pending = await asyncio.wait(waiters, timeout=5, return_when="FIRST_COMPLETED")
        assert (len(done), len(pending)) == (1, 1)
        await q.aclose()

        with pytest.raises(uc.BackendUnavailableError):
            await pending.pop()
        assert done.pop().result().fence is not None


class TestNeverClosed:
    """
    The background loops of a quota end once their task is cancelled, even if
    redis-py turns the cancellation into an error of its own (the loops would
    otherwise survive it): ``asyncio.run`` cancels them at shutdown, and a
    quota never closed must not hold it up. Python 3.11 and later
    (``Task.cancelling``); on 3.10 a cancellation ends a loop where it reaches
    it.
    """

    @staticmethod
    def _swallowing(entered: asyncio.Event, error: Exception):
        """
        A coroutine function that waits forever and turns its cancellation
        into *error*, as redis-py may.
        """

        async def swallow(*args, **kwargs):
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise error from None

        return swallow

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling is new in 3.11")
    @pytest.mark.parametrize("loop", ["renewal", "listener", "probe"])
    async def test_loop_ends_when_cancelled(self, client, monkeypatch, loop):
        q = RedisQuota(client, per_key=2, ttl=30, prefix=_prefix())
        keeper = q._keeper
        lease = await q.acquire("u")  # starts the renewal task and the listener
        entered = asyncio.Event()
        if loop == "renewal":
            monkeypatch.setattr(keeper, "_pipeline", self._swallowing(entered, _down()))
            keeper._poll_now = True
            keeper._nudged.set()
            task = keeper._renewer
        elif loop == "listener":
            swallow = self._swallowing(entered, redis.exceptions.ConnectionError("cut"))
            monkeypatch.setattr(redis.asyncio.client.PubSub, "subscribe", swallow)
            await client.client_kill_filter(_type="pubsub")
            task = keeper._listener
        else:
            monkeypatch.setattr(client, "ping", self._swallowing(entered, _down()))
            keeper.outage(_down())
            task = keeper._prober
        assert task is not None
        await asyncio.wait_for(entered.wait(), 5)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        assert done == {task}
        monkeypatch.undo()
        await lease.arelease()
        await q.aclose()

    def test_asyncio_run_ends(self, redis_db):
        """
        A quota holding a lease and never closed: ``asyncio.run`` returns.
        """

        async def main():
            q = RedisQuota(redis_db, per_key=2, prefix=_prefix())
            await q.acquire("u")
            return q

        start = time.monotonic()
        q = asyncio.run(main())
        assert time.monotonic() - start < 5
        assert q.stats().in_use == 1


def _down():
    error = Down()
    error.__cause__ = ConnectionError("swallowed")
    return error


class TestDescribe:
    def test_what_the_log_says(self):
        """
        A failure is logged by its cause, and a bare timeout as "no answer".
        """
        down = Down()
        down.__cause__ = asyncio.TimeoutError()
        refused = Down()
        refused.__cause__ = ConnectionRefusedError("refused")

        assert _describe(down) == "no answer"
        assert _describe(Down()) == "no answer"
        assert _describe(refused) == "ConnectionRefusedError: refused"
        assert _describe(OSError("gone")) == "OSError: gone"


class TestWaiter:
    """
    A grant's wake-up may overtake the script's reply that queued the request.
    """

    def test_a_grant_before_the_queue_is_kept_for_it(self):
        async def main():
            waiter = Waiter("u")
            waiter.settle(7)
            waiter.settle(8)  # the same grant again, by a renewal round
            assert waiter.future is None
            waiter.queue()
            return waiter.queued, await waiter.future

        assert asyncio.run(main()) == (True, 7)

    def test_a_grant_after_the_queue_resolves_its_future_once(self):
        async def main():
            waiter = Waiter("u")
            waiter.queue()
            waiter.settle(3)
            waiter.settle(4)
            return waiter.early, await waiter.future

        assert asyncio.run(main()) == (None, 3)
