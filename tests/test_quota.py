"""
Tests of the quotas: `LocalQuota` (one event loop, asyncio or trio), `ThreadQuota`
(threads), their `Lease` and their `QuotaStats`.

The contract both quotas share is tested once, through a small adapter that gives
each an async ``acquire`` (a `ThreadQuota` waits in a worker thread, as a threaded
service would). The randomized state machine lives in ``test_quota_model.py``.
"""

from __future__ import annotations

import copy
import functools
import pickle
import random
import sys
import threading
import time
import tracemalloc
import types

from collections import Counter

import anyio
import attrs
import pytest

from anyio.lowlevel import checkpoint
from trio.testing import MockClock

import usercontext._local_quota as quota_module

from usercontext import Lease, LocalQuota, Quota, QuotaStats, ThreadQuota
from usercontext.exceptions import (
    LeaseReleasedError,
    QuotaError,
    QuotaExceededError,
    QuotaTimeoutError,
    UserContextError,
)


async def _until(predicate, *, timeout=5.0):
    """
    Let other tasks and threads run until *predicate* holds; fail after *timeout*.
    """
    with anyio.fail_after(timeout):
        for _ in range(20):
            if predicate():
                return
            await checkpoint()
        while not predicate():  # noqa: ASYNC110  # polls state that has no event
            await anyio.sleep(0.001)


async def _cancel_after_rounds(doomed):
    """
    Cancel each scope of *doomed* (scope -> rounds left) once its count of
    scheduling rounds has run out.
    """
    while True:
        await checkpoint()
        for scope in list(doomed):
            doomed[scope] -= 1
            if not doomed[scope]:
                del doomed[scope]
                scope.cancel()


class _LocalKind:
    """
    Drive a `LocalQuota` from the event loop.
    """

    cls = LocalQuota

    def __init__(self, quota):
        self.quota = quota

    async def acquire(self, key, timeout=None):
        return await self.quota.acquire(key, timeout=timeout)


class _ThreadKind:
    """
    Drive a `ThreadQuota` from worker threads, as a threaded service does.
    """

    cls = ThreadQuota

    def __init__(self, quota):
        self.quota = quota

    async def acquire(self, key, timeout=None):
        return await anyio.to_thread.run_sync(
            functools.partial(self.quota.acquire, key, timeout=timeout)
        )


@pytest.fixture(name="make", params=[_LocalKind, _ThreadKind], ids=["local", "thread"])
def _make(request):
    """
    Build a quota of either kind, wrapped in its adapter.
    """
    kind = request.param

    def make(per_key=2, total=None):
        return kind(kind.cls(per_key=per_key, total=total))

    return make


def _try(quota, key):
    """
    The lease `acquire_nowait` grants for *key*, or `None` where it refuses.
    """
    try:
        return quota.acquire_nowait(key)
    except QuotaExceededError:
        return None


def _counters(stats):
    """
    The counters of a `QuotaStats` snapshot, as a dict.
    """
    return attrs.asdict(stats)


async def _enqueue(tg, k, name, key, log):
    """
    Start a waiter *name* for *key* that, once granted, logs *name* and releases
    at once; return when it is queued.
    """
    before = k.quota.stats().waiting

    async def wait():
        # Bounded, so that a failing test cannot hang on a thread that waits.
        lease = await k.acquire(key, timeout=10)
        log.append(name)
        lease.release()

    tg.start_soon(wait)
    await _until(lambda: k.quota.stats().waiting == before + 1)


class TestQuotaContract:
    """
    The behaviour `LocalQuota` and `ThreadQuota` share.
    """

    async def test_per_key_and_total_limits(self, make):
        """
        At most per_key leases are granted per key and at most total overall;
        a refusal names the limit that was hit ("key" or "total").
        """
        k = make(per_key=2, total=3)
        q = k.quota
        leases = [await k.acquire("a"), await k.acquire("a")]

        assert _try(q, "a") is None
        with pytest.raises(QuotaExceededError) as ei:
            await k.acquire("a", timeout=0)
        e = ei.value
        assert (e.key, e.limit, e.scope, e.in_use, e.waited, e.timeout) == ("a", 2, "key", 2, 0, 0)

        leases.append(await k.acquire("b"))
        assert _try(q, "b") is None
        with pytest.raises(QuotaExceededError) as ei:
            await k.acquire("c", timeout=0)
        e = ei.value
        assert (e.key, e.limit, e.scope, e.in_use) == ("c", 3, "total", 3)
        assert "all 3 slots are in use (the total limit)" in str(e)

        s = q.stats()
        assert (s.in_use, s.granted, s.rejected, s.peak, s.keys) == (3, 3, 4, 3, 2)
        assert dict(q._in_use) == {"a": 2, "b": 1}
        for lease in leases:
            lease.release()
        assert q.stats().in_use == 0

    async def test_callable_per_key(self, make):
        """
        per_key may be a callable key -> int: paid users get 5 slots, others 1.
        """
        k = make(per_key=lambda key: 5 if key.startswith("paid-") else 1)
        q = k.quota
        paid = [_try(q, "paid-1") for _ in range(6)]
        free = [_try(q, "free-1") for _ in range(2)]

        assert [lease is not None for lease in paid] == [True] * 5 + [False]
        assert [lease is not None for lease in free] == [True, False]
        with pytest.raises(QuotaExceededError) as ei:
            await k.acquire("paid-1", timeout=0)
        assert (ei.value.limit, ei.value.in_use, ei.value.scope) == (5, 5, "key")
        for lease in paid + free:
            if lease is not None:
                lease.release()
        assert q.stats().in_use == 0
        assert q._in_use == {}

    async def test_timeout_none_waits(self, make):
        """
        With timeout=None a request waits as long as it takes, and gets the slot
        as soon as it is released.
        """
        k = make(per_key=1)
        holder = await k.acquire("a")
        got = []

        async def wait():
            start = time.perf_counter()
            lease = await k.acquire("a", timeout=None)
            got.append(time.perf_counter() - start)
            lease.release()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await _until(lambda: k.quota.stats().waiting == 1)
            await anyio.sleep(0.1)
            assert got == []
            holder.release()

        assert len(got) == 1
        assert got[0] >= 0.1
        s = k.quota.stats()
        assert (s.granted, s.timed_out, s.in_use, s.waiting) == (2, 0, 0, 0)

    @pytest.mark.parametrize(
        "case",
        [
            (1, None, "key", 1, "key 'a' holds 1 of its 1 slots"),
            (5, 1, "total", 1, "all 1 slots are in use (the total limit)"),
        ],
        ids=["key", "total"],
    )
    async def test_timeout_raises_quota_timeout(self, make, case):
        """
        A positive timeout gives up after about that long with QuotaTimeoutError, a
        TimeoutError and QuotaError carrying the figures; only timed_out changes.
        """
        per_key, total, scope, limit, where = case
        k = make(per_key=per_key, total=total)
        holder = await k.acquire("a" if scope == "key" else "b")
        before = _counters(k.quota.stats())

        start = time.perf_counter()
        with pytest.raises(QuotaTimeoutError) as ei:
            await k.acquire("a", timeout=0.2)
        elapsed = time.perf_counter() - start

        e = ei.value
        assert isinstance(e, TimeoutError)
        assert isinstance(e, QuotaError)
        assert isinstance(e, UserContextError)
        assert 0.2 <= e.waited < 0.7
        assert 0.2 <= elapsed < 0.7
        assert (e.key, e.limit, e.scope, e.in_use, e.timeout) == ("a", limit, scope, 1, 0.2)
        message = str(e)
        assert where in message
        assert "(the timeout of 0.2 s)" in message
        assert "Raise the timeout or the limit" in message
        after = _counters(k.quota.stats())
        assert after == {**before, "timed_out": before["timed_out"] + 1}
        holder.release()
        assert k.quota._waiters == {}
        assert k.quota._in_use == {}

    @pytest.mark.parametrize("timeout", [0, 0.0, -1])
    async def test_timeout_zero_rejects_at_once(self, make, timeout):
        """
        timeout=0 (or below) raises QuotaExceededError at once, without queueing;
        only the rejected counter changes.
        """
        k = make(per_key=1)
        holder = await k.acquire("a")
        before = _counters(k.quota.stats())

        start = time.perf_counter()
        with pytest.raises(QuotaExceededError) as ei:
            await k.acquire("a", timeout=timeout)
        assert time.perf_counter() - start < 0.1

        e = ei.value
        assert isinstance(e, RuntimeError)
        assert isinstance(e, QuotaError)
        assert (e.key, e.limit, e.scope, e.in_use, e.waited, e.timeout) == (
            "a",
            1,
            "key",
            1,
            0.0,
            timeout,
        )
        assert str(e) == (
            "No slot is free: key 'a' holds 1 of its 1 slots. Retry later, pass a timeout > 0 "
            "to wait (None waits as long as it takes), or raise the limit."
        )
        assert _counters(k.quota.stats()) == {**before, "rejected": before["rejected"] + 1}
        holder.release()

    async def test_waiters_fifo_per_key(self, make):
        """
        Ten waiters of one key get their lease in the order they asked.
        """
        k = make(per_key=1)
        holder = _try(k.quota, "a")
        order = []
        async with anyio.create_task_group() as tg:
            for i in range(10):
                await _enqueue(tg, k, i, "a", order)
            holder.release()

        assert order == list(range(10))
        assert k.quota.stats().granted == 11

    async def test_no_jumping_the_queue(self, make):
        """
        A request never overtakes the waiters of its key, even when a slot is
        free for it (here a per_key callable's answer rose while they waited).
        """
        limits = {"a": 1}
        k = make(per_key=lambda key: limits[key])
        q = k.quota
        holder = _try(q, "a")
        log = []
        async with anyio.create_task_group() as tg:
            await _enqueue(tg, k, "w", "a", log)
            limits["a"] = 2
            assert _try(q, "a") is None
            with pytest.raises(QuotaExceededError):
                await k.acquire("a", timeout=0)
            assert q.stats().in_use == 1
            holder.release()
        assert log == ["w"]
        s = q.stats()
        assert (s.granted, s.rejected, s.in_use, s.waiting) == (2, 2, 0, 0)

    async def test_global_slots_round_robin(self, make):
        """
        Freed global slots go round-robin across the keys that wait, FIFO within
        each key, whatever the length of each key's queue.
        """
        k = make(per_key=10, total=1)
        holder = _try(k.quota, "h")
        order = []
        async with anyio.create_task_group() as tg:
            for name in ("a1", "a2", "a3", "b1", "b2", "c1"):
                await _enqueue(tg, k, name, name[0], order)
            assert list(k.quota._waiters) == ["a", "b", "c"]
            holder.release()

        assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]

    async def test_raising_a_limit_grants_waiters_at_once(self, make):
        """
        Raising per_key grants the waiters that now fit in the same call; raising
        total grants across keys, round-robin.
        """
        k = make(per_key=1)
        q = k.quota
        holder = _try(q, "a")
        got = []

        async def wait(key):
            got.append(await k.acquire(key))

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(wait, "a")
                await _until(lambda n=i + 1: q.stats().waiting == n)
            q.set_limits(per_key=4)
            # Granted in the call itself, before any waiter ran.
            assert (q.stats().in_use, q.stats().waiting) == (4, 0)
        assert len(got) == 3

        q.set_limits(per_key=5, total=4)
        assert _try(q, "b") is None
        async with anyio.create_task_group() as tg:
            for n, key in enumerate(("b", "b", "c"), 1):
                tg.start_soon(wait, key)
                await _until(lambda n=n: q.stats().waiting == n)
            q.set_limits(total=6)
            assert dict(q._in_use) == {"a": 4, "b": 1, "c": 1}
            assert q.stats().waiting == 1
            holder.release()
        assert dict(q._in_use) == {"a": 3, "b": 2, "c": 1}
        for lease in got:
            lease.release()
        assert q.stats().in_use == 0
        assert q.stats().total == 6

    async def test_lowering_a_limit_keeps_held_leases(self, make):
        """
        Lowering a limit keeps the leases already held; new grants wait until use
        is under the new limit.
        """
        k = make(per_key=3, total=10)
        q = k.quota
        leases = [_try(q, "a") for _ in range(3)]
        q.set_limits(per_key=1)
        assert q.stats().in_use == 3
        assert all(not lease.released for lease in leases)
        assert _try(q, "a") is None
        leases.pop().release()
        assert _try(q, "a") is None
        leases.pop().release()
        assert _try(q, "a") is None
        leases.pop().release()
        lease = _try(q, "a")
        assert lease is not None

        q.set_limits(per_key=5, total=1)
        assert _try(q, "b") is None
        q.set_limits(total=None)
        other = _try(q, "b")
        assert other is not None
        assert q.stats().total is None
        q.set_limits()
        assert (q.stats().in_use, q.stats().total) == (2, None)
        lease.release()
        other.release()

    async def test_acquire_nowait(self, make):
        """
        acquire_nowait grants a free slot without waiting, and raises
        QuotaExceededError (counted as rejected) at a limit or behind a waiter.
        """
        k = make(per_key=1, total=2)
        q = k.quota
        lease = q.acquire_nowait("a")
        assert (lease.key, lease.released) == ("a", False)
        with pytest.raises(QuotaExceededError) as caught:
            q.acquire_nowait("a")
        assert caught.value.args == ("a", 1, "key", 1, 0.0, 0.0)
        other = q.acquire_nowait("b")
        with pytest.raises(QuotaExceededError) as caught:
            q.acquire_nowait("c")
        assert caught.value.args == ("c", 2, "total", 2, 0.0, 0.0)
        assert (q.stats().granted, q.stats().rejected) == (2, 2)
        lease.release()
        other.release()
        assert q.stats().in_use == 0

    async def test_lease(self, make):
        """
        Lease.release() is idempotent, `with` and `async with` release on exit,
        even on error, and `released` tells; the raw quota.release() of a
        released lease raises LeaseReleasedError and counters never go negative.
        """
        k = make(per_key=2)
        q = k.quota
        lease = _try(q, "a")
        assert isinstance(lease, Lease)
        assert lease.key == "a"
        assert not lease.released
        assert repr(lease) == "<usercontext.Lease(key='a', held)>"
        lease.release()
        lease.release()
        assert lease.released
        assert repr(lease) == "<usercontext.Lease(key='a', released)>"
        assert q.stats().in_use == 0
        with pytest.raises(LeaseReleasedError, match=r"was already released\. Release each lease"):
            q.release(lease)
        assert isinstance(LeaseReleasedError("x"), RuntimeError)
        assert (q.stats().in_use, q._in_use) == (0, {})

        mine = _try(q, "a")
        other = type(q)(per_key=2)
        with pytest.raises(ValueError, match="belongs to another quota"):
            other.release(mine)
        assert not mine.released
        assert (q.stats().in_use, other.stats().in_use) == (1, 0)
        q.release(mine)

        raw = await k.acquire("a")
        q.release(raw)
        assert raw.released
        raw.release()
        assert q.stats().in_use == 0

        with _try(q, "a") as held:
            assert q.stats().in_use == 1
        assert held.released
        with pytest.raises(ValueError, match="body"):
            async with await k.acquire("a") as held:
                assert q.stats().in_use == 1
                raise ValueError("body")
        assert held.released
        s = q.stats()
        assert (s.in_use, s.granted, s.peak, s.waiting, s.keys) == (0, 5, 1, 0, 0)

    async def test_stats_scripted(self, make):
        """
        stats() is a frozen snapshot whose figures follow a scripted scenario.
        """
        k = make(per_key=2, total=3)
        q = k.quota
        a1, a2, b1 = _try(q, "a"), _try(q, "a"), _try(q, "b")
        first = q.stats(top=1)
        assert isinstance(first, QuotaStats)
        assert first == QuotaStats(
            in_use=3,
            waiting=0,
            granted=3,
            rejected=0,
            timed_out=0,
            cancelled=0,
            peak=3,
            keys=2,
            total=3,
            top=(("a", 2),),
        )
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            first.in_use = 0

        assert _try(q, "c") is None
        with pytest.raises(QuotaExceededError):
            await k.acquire("c", timeout=0)
        with pytest.raises(QuotaTimeoutError):
            await k.acquire("c", timeout=0.05)

        log = []
        async with anyio.create_task_group() as tg:
            await _enqueue(tg, k, "a3", "a", log)
            await _enqueue(tg, k, "c1", "c", log)
            s = q.stats()
            assert (s.in_use, s.waiting, s.keys, s.rejected, s.timed_out) == (3, 2, 3, 2, 1)
            b1.release()  # a is at its limit: the slot goes to c
            await _until(lambda: log == ["c1"])
            assert q.stats().waiting == 1
            a1.release()
        a2.release()

        assert first.in_use == 3  # a snapshot does not move
        assert q.stats(top=5) == QuotaStats(
            in_use=0,
            waiting=0,
            granted=5,
            rejected=2,
            timed_out=1,
            cancelled=0,
            peak=3,
            keys=0,
            total=3,
            top=(),
        )

    async def test_stats_top(self, make):
        """
        stats(top=n) lists the n keys holding the most slots, most first.
        """
        k = make(per_key=5)
        q = k.quota
        leases = [_try(q, key) for key in "abbcccdddd"]
        assert q.stats(top=3).top == (("d", 4), ("c", 3), ("b", 2))
        assert q.stats(top=0).top == ()
        assert q.stats().top == (("d", 4), ("c", 3), ("b", 2), ("a", 1))
        assert q.stats().keys == 4
        for lease in leases:
            lease.release()
        assert q.stats().top == ()

    async def test_idle_key_state_dropped(self, make):
        """
        A key's state disappears as soon as it holds nothing and waits for
        nothing, including after its waiter timed out.
        """
        k = make(per_key=1)
        q = k.quota
        lease = _try(q, "a")
        with pytest.raises(QuotaTimeoutError):
            await k.acquire("a", timeout=0.01)
        assert q._waiters == {}
        assert dict(q._in_use) == {"a": 1}
        log = []
        async with anyio.create_task_group() as tg:
            await _enqueue(tg, k, "a2", "a", log)
            assert list(q._waiters) == ["a"]
            lease.release()
        assert log == ["a2"]
        assert (q._in_use, q._waiters, q.stats().keys) == ({}, {}, 0)

    async def test_callable_returning_bad_limit(self, make):
        """
        A per_key callable returning a negative or non-int limit raises TypeError
        naming the key, and nothing is counted.
        """
        for bad in (-1, 2.0, "3", None, True):
            k = make(per_key=lambda key, bad=bad: bad)
            with pytest.raises(TypeError, match=r"per_key\('u-1'\) must return a non-negative int"):
                await k.acquire("u-1")
            with pytest.raises(TypeError, match="got "):
                _try(k.quota, "u-1")
            s = k.quota.stats()
            assert (s.in_use, s.waiting, s.granted, s.rejected, s.keys) == (0, 0, 0, 0, 0)


class TestLimits:
    """
    Checking the limits given to both quotas.
    """

    @pytest.mark.parametrize("cls", [LocalQuota, ThreadQuota])
    @pytest.mark.parametrize(
        ("kwargs", "error", "message"),
        [
            (
                {"per_key": -1},
                ValueError,
                "per_key must be a non-negative int or a callable key -> int, got -1.",
            ),
            (
                {"per_key": 1.5},
                TypeError,
                "per_key must be a non-negative int or a callable key -> int, got 1.5.",
            ),
            ({"per_key": "2"}, TypeError, "per_key must be a non-negative int"),
            ({"per_key": None}, TypeError, "per_key must be a non-negative int"),
            ({"per_key": True}, TypeError, "per_key must be a non-negative int"),
            ({"total": -1}, ValueError, "total must be a non-negative int or None, got -1."),
            ({"total": 2.0}, TypeError, "total must be a non-negative int or None, got 2.0."),
            ({"total": len}, TypeError, "total must be a non-negative int or None"),
        ],
    )
    def test_bad_limits(self, cls, kwargs, error, message):
        """
        A negative limit raises ValueError and a non-int one TypeError, at
        construction and in set_limits, with a message naming it.
        """
        with pytest.raises(error) as ei:
            cls(**kwargs)
        assert message in str(ei.value)

        q = cls(per_key=2, total=3)
        if kwargs == {"per_key": None}:
            q.set_limits(per_key=None)  # None means "unchanged" in set_limits
        else:
            with pytest.raises(error) as ei:
                q.set_limits(**kwargs)
            assert message in str(ei.value)
        assert (q._per_key, q.stats().total) == (2, 3)

    @pytest.mark.parametrize("cls", [LocalQuota, ThreadQuota])
    def test_set_limits_is_all_or_nothing(self, cls):
        """
        set_limits with one valid and one invalid limit changes neither.
        """
        q = cls(per_key=2, total=3)
        with pytest.raises(ValueError, match="total"):
            q.set_limits(per_key=5, total=-1)
        assert (q._per_key, q.stats().total) == (2, 3)
        leases = [_try(q, "a"), _try(q, "a")]
        assert _try(q, "a") is None
        for lease in leases:
            lease.release()

    @pytest.mark.parametrize("cls", [LocalQuota, ThreadQuota])
    def test_zero_limit_refuses_everything(self, cls):
        """
        A limit of 0 is valid: every request is refused until it is raised.
        """
        q = cls(per_key=0)
        assert _try(q, "a") is None
        q.set_limits(per_key=1)
        lease = _try(q, "a")
        assert lease is not None
        lease.release()
        q = cls(per_key=3, total=0)
        assert _try(q, "a") is None


class TestLoopClock:
    @pytest.mark.parametrize(
        "anyio_backend",
        [
            pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-autojump"),
            pytest.param("asyncio", id="asyncio"),
        ],
    )
    async def test_timeout_waited_on_the_loop_clock(self, anyio_backend):
        """
        QuotaTimeoutError reports the wait measured by the event loop's clock, the
        one its timeout runs on: 30.000 s under trio's autojump clock (which
        takes no wall time at all), and the real wait on asyncio.
        """
        virtual = anyio_backend[0] == "trio"
        timeout = 30.0 if virtual else 0.2
        q = LocalQuota(per_key=1)
        holder = await q.acquire("a")

        loop_start, wall_start = anyio.current_time(), time.monotonic()
        with pytest.raises(QuotaTimeoutError) as ei:
            await q.acquire("a", timeout=timeout)
        loop_elapsed = anyio.current_time() - loop_start
        wall_elapsed = time.monotonic() - wall_start

        assert timeout <= ei.value.waited <= loop_elapsed
        if virtual:
            assert ei.value.waited == pytest.approx(30.0)
            assert wall_elapsed < 5
            assert str(ei.value).startswith("Waited 30.000 s (the timeout of 30.0 s) for a slot")
        else:
            assert ei.value.waited < 0.7
            assert f"Waited {ei.value.waited:.3f} s (the timeout of 0.2 s)" in str(ei.value)
        holder.release()


class TestLeasesNotGranted:
    """
    A quota takes back only the slots it granted, each once: leases cannot be
    forged, copied or re-keyed, so counters never drop below what is held.
    """

    @pytest.mark.parametrize("cls", [LocalQuota, ThreadQuota])
    @pytest.mark.parametrize("key", ["a", "idle"])
    def test_made_by_hand(self, cls, key):
        """
        A Lease made by hand, for a busy key or an idle one, is refused with a
        TypeError saying how to get one; the quota still admits exactly its
        limits afterwards: 2 for "a", 3 overall.
        """
        q = cls(per_key=2, total=3)
        held = [_try(q, "a"), _try(q, "a")]

        with pytest.raises(TypeError, match=r"A Lease is granted by a quota, never made by hand"):
            Lease(q, key)
        with pytest.raises(TypeError, match=r"call `await quota\.acquire\(key\)`"):
            Lease()

        burst = [_try(q, k) for k in ("a", "a", "a", "b", "b")]
        granted = [lease for lease in burst if lease is not None]
        assert [lease.key for lease in granted] == ["b"]
        s = q.stats()
        assert (s.in_use, s.granted, s.rejected, q._in_use) == (3, 3, 4, {"a": 2, "b": 1})
        for lease in held + granted:
            lease.release()
        assert (q.stats().in_use, q._in_use) == (0, {})

    @pytest.mark.parametrize("cls", [LocalQuota, ThreadQuota])
    @pytest.mark.parametrize(
        "duplicate",
        [copy.copy, copy.deepcopy, pickle.dumps],
        ids=["copy", "deepcopy", "pickle"],
    )
    def test_not_copied(self, cls, duplicate):
        """
        A lease cannot be copied or pickled: a copy would be a second handle on
        one slot, released twice.
        """
        q = cls(per_key=1)
        lease = _try(q, "a")

        with pytest.raises(TypeError, match=r"is one slot of one quota: it cannot be copied"):
            duplicate(lease)

        lease.release()
        lease.release()
        assert (q.stats().in_use, q._in_use) == (0, {})
        assert _try(q, "a") is not None

    @pytest.mark.parametrize("cls", [LocalQuota, ThreadQuota])
    def test_key_is_read_only(self, cls):
        """
        A lease cannot be pointed at another key, whose slot its release would
        free.
        """
        q = cls(per_key=1)
        a = _try(q, "a")
        b = _try(q, "b")

        with pytest.raises(AttributeError):
            a.key = "b"

        a.release()
        assert q._in_use == {"b": 1}
        assert _try(q, "b") is None
        b.release()

    @pytest.mark.parametrize("cls", [LocalQuota, ThreadQuota])
    def test_released_twice(self, cls):
        """
        However a lease is released twice (the lease, the quota, or both), the
        slot comes back once: counters never go below what is held.
        """
        q = cls(per_key=3)
        kept = _try(q, "a")
        lease = _try(q, "a")
        lease.release()
        with pytest.raises(LeaseReleasedError, match="was already released"):
            q.release(lease)
        lease.release()
        other = _try(q, "a")
        q.release(other)
        other.release()

        assert (q.stats().in_use, q._in_use) == (1, {"a": 1})
        kept.release()
        assert (q.stats().in_use, q._in_use) == (0, {})

    def test_threads_release_one_lease_at_once(self):
        """
        Eight threads releasing one ThreadQuota lease at the same moment return
        its slot once: the check and the return happen under the quota's lock.
        """
        q = ThreadQuota(per_key=2)
        kept = q.acquire("a")
        lease = q.acquire("a")
        barrier = threading.Barrier(8)

        def release():
            barrier.wait()
            lease.release()

        threads = [threading.Thread(target=release) for _ in range(8)]
        with q._lock:  # every thread reaches the lock before any returns the slot
            for t in threads:
                t.start()
            time.sleep(0.2)
        for t in threads:
            t.join(5)

        assert (q.stats().in_use, q._in_use) == (1, {"a": 1})
        kept.release()


class TestLocalQuota:
    """
    What only the event-loop quota does: grants without awaiting, cancellation,
    fairness under load, and memory.
    """

    def test_is_a_quota(self):
        """
        LocalQuota implements the Quota protocol and has a short repr.
        """
        q = LocalQuota(per_key=3, total=7)
        assert isinstance(q, Quota)
        assert repr(q) == "<usercontext.LocalQuota(per_key=3, total=7, in_use=0, waiting=0)>"
        assert LocalQuota()._per_key == 2

    def test_settings_are_keywords(self):
        """
        The constructor and stats() take their settings by keyword only.
        """
        with pytest.raises(TypeError, match="positional"):
            LocalQuota(2)  # type: ignore[misc]
        with pytest.raises(TypeError, match="positional"):
            LocalQuota().stats(3)  # type: ignore[misc]

    async def test_arelease(self):
        """
        The protocol's arelease hands a slot back once and grants the next
        waiter; a second arelease raises LeaseReleasedError, another quota's
        lease ValueError, and Lease.arelease() stays idempotent.
        """
        q = LocalQuota(per_key=1)
        lease = await q.acquire("a")
        got = []

        async def wait():
            got.append(await q.acquire("a"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await _until(lambda: q.stats().waiting == 1)
            await q.arelease(lease)
        assert lease.released
        assert [g.key for g in got] == ["a"]
        with pytest.raises(LeaseReleasedError, match="was already released"):
            await q.arelease(lease)
        await lease.arelease()
        with pytest.raises(ValueError, match="belongs to another quota"):
            await LocalQuota().arelease(got[0])
        await got[0].arelease()
        await got[0].arelease()
        s = q.stats()
        assert (s.in_use, s.granted, s.keys) == (0, 2, 0)

    async def test_free_slot_granted_without_checkpoint(self):
        """
        A free slot is granted without reaching a checkpoint: inside an already
        cancelled scope, acquire still returns a lease; a contended acquire does
        reach one and is cancelled, leaving nothing queued.
        """
        q = LocalQuota(per_key=1)
        with anyio.CancelScope() as scope:
            scope.cancel()
            lease = await q.acquire("a")
        assert not scope.cancelled_caught
        assert isinstance(lease, Lease)
        assert q.stats().in_use == 1

        with anyio.CancelScope() as scope:
            scope.cancel()
            await q.acquire("a")
            pytest.fail("a contended acquire must wait, and so be cancelled")
        assert scope.cancelled_caught
        s = q.stats()
        assert (s.in_use, s.waiting, s.cancelled, s.granted, s.keys) == (1, 0, 1, 1, 1)
        assert q._waiters == {}
        lease.release()
        assert q._in_use == {}

    @pytest.mark.parametrize("total", [None, 5])
    async def test_cancelled_waiter_loses_no_slot(self, total):
        """
        A waiter cancelled before its grant leaves the queue: the slot goes to the
        next waiter, nothing is over-granted, and no slot is lost.
        """
        q = LocalQuota(per_key=1, total=total)
        holder = _try(q, "a")
        log = []

        async def first(*, task_status):
            with anyio.CancelScope() as scope:
                task_status.started(scope)
                await q.acquire("a")
                log.append("first")  # never reached: it is never granted

        async with anyio.create_task_group() as tg:
            scope = await tg.start(first)
            await _until(lambda: q.stats().waiting == 1)
            await _enqueue(tg, _LocalKind(q), "second", "a", log)
            scope.cancel()
            await _until(lambda: q.stats().waiting == 1)
            assert q.stats().cancelled == 1
            holder.release()
        assert log == ["second"]
        s = q.stats()
        assert (s.in_use, s.waiting, s.granted, s.cancelled, s.peak) == (0, 0, 2, 1, 1)
        assert (q._in_use, q._waiters) == ({}, {})

    @pytest.mark.parametrize("order", ["release_then_cancel", "cancel_then_release"])
    @pytest.mark.parametrize("total", [None, 5])
    async def test_only_waiter_cancelled_in_the_grant_step(self, order, total):
        """
        The only waiter, granted and cancelled in the same scheduling step, in
        either order, leaves the slot free.
        """
        q = LocalQuota(per_key=1, total=total)
        holder = _try(q, "a")

        async def first(*, task_status):
            with anyio.CancelScope() as scope:
                task_status.started(scope)
                async with await q.acquire("a"):
                    await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            scope = await tg.start(first)
            await _until(lambda: q.stats().waiting == 1)
            if order == "release_then_cancel":
                holder.release()
                scope.cancel()
            else:
                scope.cancel()
                holder.release()
        s = q.stats()
        assert (s.in_use, s.waiting, s.peak, s.keys) == (0, 0, 1, 0)
        assert (q._in_use, q._waiters) == ({}, {})
        lease = _try(q, "a")
        assert lease is not None
        lease.release()

    @pytest.mark.parametrize("order", ["release_then_cancel", "cancel_then_release"])
    @pytest.mark.parametrize("total", [None, 5])
    @pytest.mark.parametrize("per_key", [1, lambda _key: 1], ids=["fixed", "callable"])
    async def test_cancelled_in_the_grant_step(self, order, total, per_key):
        """
        A waiter granted and cancelled in the same scheduling step (the holder
        releases and the waiter's scope is cancelled without a yield in between,
        in either order) never keeps or loses the slot: it goes to the next
        waiter, at most one lease is ever held, and in_use returns to 0. So
        with a fixed limit (the slot handed straight on) and a callable one
        (the slot returned, then dispatched).
        """
        q = LocalQuota(per_key=per_key, total=total)
        holder = _try(q, "a")
        log = []
        done = anyio.Event()

        async def first(*, task_status):
            with anyio.CancelScope() as scope:
                task_status.started(scope)
                async with await q.acquire("a"):
                    log.append("first")
                    await anyio.sleep_forever()

        async def second():
            async with await q.acquire("a"):
                log.append("second")
                assert dict(q._in_use) == {"a": 1}
                await done.wait()

        async with anyio.create_task_group() as tg:
            scope = await tg.start(first)
            await _until(lambda: q.stats().waiting == 1)
            tg.start_soon(second)
            await _until(lambda: q.stats().waiting == 2)
            if order == "release_then_cancel":
                holder.release()
                scope.cancel()
            else:
                scope.cancel()
                holder.release()
            await _until(lambda: "second" in log)
            s = q.stats()
            assert (s.in_use, s.waiting) == (1, 0)
            done.set()

        assert log[-1] == "second"
        assert log in (["second"], ["first", "second"])
        s = q.stats()
        assert (s.in_use, s.waiting, s.peak, s.keys) == (0, 0, 1, 0)
        assert (q._in_use, q._waiters) == ({}, {})
        with anyio.CancelScope() as check:
            check.cancel()
            lease = await q.acquire("a")  # free at once: no checkpoint needed
        lease.release()

    async def test_timeout_and_grant_in_the_same_step(self):
        """
        A waiter whose timeout expires in the very step its slot is granted keeps
        the lease: it is neither lost nor counted as timed out.
        """
        q = LocalQuota(per_key=1)
        holder = _try(q, "a")
        got = []

        async def wait():
            got.append(await q.acquire("a", timeout=0.05))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await _until(lambda: q.stats().waiting == 1)
            time.sleep(0.1)  # noqa: ASYNC251  # block the loop past the waiter's timeout...
            holder.release()  # ...and grant in the same step
        assert len(got) == 1
        s = q.stats()
        assert (s.in_use, s.timed_out, s.granted, s.waiting) == (1, 0, 2, 0)
        got[0].release()
        assert q._in_use == {}

    async def test_no_starvation_under_a_flood(self):
        """
        While user A keeps ~96 requests queued on a global cap, user B's wait for
        a slot stays short (p99 < 5 ms, and well under A's own wait): freed slots
        alternate between the keys that wait. A global FIFO would make B wait as
        long as A (~10 ms here).

        Waits are measured in the event loop thread's CPU time, which counts the
        work the loop does before serving a request but not the time the OS
        gives other processes (this machine is shared, and its preemptions of
        ~4 ms would otherwise decide the tail).
        """
        q = LocalQuota(per_key=1000, total=4)
        clock = time.thread_time
        waits = {"a": [], "b": []}
        backlog = []

        async def flood():
            while True:
                start = clock()
                async with await q.acquire("a"):
                    waits["a"].append(clock() - start)
                    for _ in range(10):
                        await checkpoint()

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(flood)
            await _until(lambda: q.stats().waiting >= 90)
            for _ in range(200):
                backlog.append(q.stats().waiting)
                start = clock()
                async with await q.acquire("b"):
                    waits["b"].append(clock() - start)
            tg.cancel_scope.cancel()

        a, b = sorted(waits["a"]), sorted(waits["b"])
        b_p99, a_median = b[197], a[len(a) // 2]
        assert min(backlog) >= 90
        assert b_p99 < 0.005, f"B's p99 wait was {b_p99 * 1000:.2f} ms"
        assert b_p99 < a_median / 2, (
            f"B's p99 {b_p99 * 1000:.2f} ms, A's median {a_median * 1000:.2f} ms"
        )
        s = q.stats()
        assert (s.in_use, s.waiting, s.keys) == (0, 0, 0)
        assert s.peak == 4

    async def test_idle_keys_leave_no_state(self):
        """
        100,000 distinct keys through the quota (some queued, granted, timed out
        or cancelled on the way) leave no per-key state and < 1 MB behind.
        """
        q = LocalQuota(per_key=1, total=None)
        k = _LocalKind(q)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(100_000):
                key = f"user-{i}"
                lease = await q.acquire(key)
                if i % 1000 == 0:
                    log = []
                    async with anyio.create_task_group() as tg:
                        await _enqueue(tg, k, "w", key, log)
                        with pytest.raises(QuotaTimeoutError):
                            await q.acquire(key, timeout=0.001)
                        with anyio.CancelScope() as scope:
                            scope.cancel()
                            await q.acquire(key)
                        lease.release()
                else:
                    lease.release()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

        assert (q._in_use, q._waiters) == ({}, {})
        s = q.stats()
        assert (s.in_use, s.waiting, s.keys, s.granted) == (0, 0, 0, 100_100)
        assert (s.timed_out, s.cancelled) == (100, 100)
        assert after - before < 1_000_000

    async def test_10000_cycles_with_random_cancellation(self):
        """
        10,000 acquire/release cycles of 50 users (limit 3 each, 60 overall), 30%
        of them cancelled at random points: waiting, holding or releasing. At
        every instant no key holds more than 3 and no more than 60 are held; at
        the end nothing is held or queued.
        """
        rng = random.Random(20240601)
        q = LocalQuota(per_key=3, total=60)
        users = [f"u-{i}" for i in range(50)]
        held = Counter()
        peaks = {"key": 0, "total": 0}
        doomed = {}  # scope -> scheduling rounds left before it is cancelled
        outcome = Counter()

        async def cycle(user, cancel_after, hold):
            with anyio.CancelScope() as scope:
                if cancel_after:
                    doomed[scope] = cancel_after
                async with await q.acquire(user):
                    held[user] += 1
                    try:
                        peaks["key"] = max(peaks["key"], held[user], q._in_use[user])
                        peaks["total"] = max(peaks["total"], held.total(), q._total_in_use)
                        for _ in range(hold):
                            await checkpoint()
                    finally:
                        held[user] -= 1
            doomed.pop(scope, None)
            outcome["cancelled" if scope.cancelled_caught else "done"] += 1

        async def worker():
            for _ in range(50):
                cancel_after = rng.randrange(1, 8) if rng.random() < 0.3 else 0
                await cycle(rng.choice(users), cancel_after, rng.randrange(4))

        async with anyio.create_task_group() as outer:
            outer.start_soon(_cancel_after_rounds, doomed)
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(worker)
            outer.cancel_scope.cancel()

        assert outcome.total() == 10_000
        assert outcome["cancelled"] > 1_500
        assert peaks["key"] <= 3
        assert peaks["total"] <= 60
        s = q.stats()
        assert s.peak <= 60
        assert (s.in_use, s.waiting, s.keys) == (0, 0, 0)
        assert (q._in_use, q._waiters, q._total_in_use, q._n_waiting) == ({}, {}, 0, 0)
        assert s.granted >= outcome["done"]

    def test_usable_by_successive_event_loops(self):
        """
        A LocalQuota made outside any event loop (as an EngineFactory at import
        time makes one) serves successive event loops: asyncio, asyncio again,
        then trio, each with a contended acquire.
        """
        q = LocalQuota(per_key=1)

        async def contended():
            holder = _try(q, "a")
            log = []
            async with anyio.create_task_group() as tg:
                await _enqueue(tg, _LocalKind(q), "w", "a", log)
                holder.release()
            return log

        for backend in ("asyncio", "asyncio", "trio", "asyncio"):
            assert anyio.run(contended, backend=backend) == ["w"]
        assert q.stats().granted == 8


class _Interrupt(BaseException):
    """
    Stands for a KeyboardInterrupt raised in a thread blocked on a quota.
    """


class TestThreadQuota:
    """
    What only the threaded quota does: blocking waits and thread safety.
    """

    def test_is_a_thread_quota(self):
        """
        ThreadQuota has a blocking acquire and a short repr.
        """
        q = ThreadQuota(per_key=1, total=None)
        assert repr(q) == "<usercontext.ThreadQuota(per_key=1, total=None, in_use=0, waiting=0)>"
        assert ThreadQuota()._per_key == 2
        with q.acquire("a") as lease:
            assert q.stats().in_use == 1
        assert lease.released
        with pytest.raises(TypeError, match="positional"):
            ThreadQuota(2)  # type: ignore[misc]

    def test_is_not_a_quota(self):
        """
        A ThreadQuota does not pass for the async Quota protocol: its acquire
        blocks a thread, and it has no arelease.
        """
        assert not isinstance(ThreadQuota(), Quota)
        assert not hasattr(ThreadQuota(), "arelease")
        assert isinstance(LocalQuota(), Quota)

    async def test_lease_in_async_code(self):
        """
        A ThreadQuota's lease also serves `async with` and arelease(), which
        release at once, once.
        """
        q = ThreadQuota(per_key=1)
        async with q.acquire("a") as lease:
            assert q.stats().in_use == 1
        assert lease.released
        other = q.acquire_nowait("a")
        await other.arelease()
        await other.arelease()
        assert (q.stats().in_use, q.stats().granted) == (0, 2)

    def test_blocking_acquire_waits_for_a_release(self):
        """
        A thread blocked in acquire(timeout=None) gets the slot as soon as another
        thread releases it.
        """
        q = ThreadQuota(per_key=1)
        holder = q.acquire("a")
        got = []
        t = threading.Thread(target=lambda: got.append(q.acquire("a")))
        t.start()
        deadline = time.monotonic() + 5
        while q.stats().waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)
        assert got == []
        holder.release()
        t.join(5)
        assert len(got) == 1
        got[0].release()
        assert q.stats().granted == 2
        assert (q._in_use, q._waiters) == ({}, {})

    def test_grant_between_timeout_and_lock(self):
        """
        A thread whose wait times out just as its slot is granted (before it can
        take the quota's lock) keeps the lease: not lost, not counted as timed out.
        """
        q = ThreadQuota(per_key=1)
        holder = q.acquire("a")
        result = {}

        def wait():
            result["lease"] = q.acquire("a", timeout=0.05)

        t = threading.Thread(target=wait)
        t.start()
        deadline = time.monotonic() + 5
        while q._n_waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        with q._lock:
            time.sleep(0.2)  # the waiter times out and blocks on the lock
            quota_module._Core.release(q, holder)  # grant it, under the lock
        t.join(5)

        assert isinstance(result["lease"], Lease)
        s = q.stats()
        assert (s.in_use, s.timed_out, s.granted, s.waiting) == (1, 0, 2, 0)
        result["lease"].release()
        assert q.stats().in_use == 0

    @pytest.mark.parametrize("granted", [False, True])
    def test_interrupted_wait(self, monkeypatch, granted):
        """
        A thread interrupted while blocked (KeyboardInterrupt) leaves no slot
        taken and nothing queued, whether or not its slot was granted just before.
        """
        q = ThreadQuota(per_key=1)
        holder = q.acquire("a")

        class InterruptedLock:
            def __init__(self):
                self.calls = 0

            def acquire(self, blocking=True, timeout=-1):
                self.calls += 1
                if self.calls == 1:
                    return True
                if granted:
                    holder.release()
                raise _Interrupt

            def release(self):
                pass

        monkeypatch.setattr(quota_module, "threading", types.SimpleNamespace(Lock=InterruptedLock))
        with pytest.raises(_Interrupt):
            q.acquire("a")
        monkeypatch.undo()

        s = q.stats()
        assert s.waiting == 0
        if granted:
            assert (s.in_use, s.granted, s.cancelled) == (0, 2, 0)
            q.acquire("a", timeout=0).release()
        else:
            assert (s.in_use, s.granted, s.cancelled) == (1, 1, 1)
            holder.release()
        assert q._waiters == {}

    def test_32_threads_1000_cycles(self):
        """
        32 threads x 1,000 cycles released together behind a barrier, switching
        threads every microsecond: every request is granted exactly once, no key
        ever holds more than 2 and no more than 6 overall, nothing is left.
        """
        q = ThreadQuota(per_key=2, total=6)
        users = [f"u-{i}" for i in range(5)]
        barrier = threading.Barrier(32)
        lock = threading.Lock()
        held = Counter()
        peaks = {"key": 0, "total": 0}
        errors = []

        def work(seed):
            rng = random.Random(seed)
            try:
                barrier.wait()
                for _ in range(1000):
                    user = rng.choice(users)
                    with q.acquire(user):
                        with lock:
                            held[user] += 1
                            peaks["key"] = max(peaks["key"], held[user])
                            peaks["total"] = max(peaks["total"], held.total())
                        with lock:
                            held[user] -= 1
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(32)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            sys.setswitchinterval(interval)

        assert errors == []
        assert peaks["key"] <= 2
        assert peaks["total"] <= 6
        s = q.stats()
        assert (s.granted, s.rejected, s.timed_out, s.cancelled) == (32_000, 0, 0, 0)
        assert (s.in_use, s.waiting, s.keys) == (0, 0, 0)
        assert s.peak <= 6
        assert (q._in_use, q._waiters) == ({}, {})
