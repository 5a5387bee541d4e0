"""
A randomized model check of `LocalQuota`.

Hypothesis drives a real quota inside a running event loop (asyncio and trio,
through a blocking portal): immediate acquisitions (``acquire_nowait`` and
``timeout=0``), waiting acquisitions running in their own tasks, releases,
cancelled waiters, timed-out waiters and limit changes, over three keys under a
global cap. After every step the quota must agree with a simple model of the
contract: per-key and total limits, FIFO within a key, round-robin across keys
(the key served last goes to the back of the ring), nobody waiting who could be
served, and exact counters.
"""

from __future__ import annotations

import functools

from collections import deque

import anyio
import anyio.from_thread
import pytest

from anyio.lowlevel import checkpoint
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from usercontext import Lease, LocalQuota
from usercontext.exceptions import (
    LeaseReleasedError,
    QuotaError,
    QuotaExceededError,
    QuotaTimeoutError,
)


KEYS = ("a", "b", "c")


class _Waiter:
    """
    One ``acquire()`` running in its own task, and what became of it.
    """

    def __init__(self, key, timeout):
        self.key = key
        self.timeout = timeout
        self.scope = None
        self.entered = False
        self.done = False
        self.lease = None
        self.error = None
        self.future = None

    def __repr__(self):
        return f"<waiter {self.key} timeout={self.timeout}>"


async def _run_waiter(quota, waiter):
    with anyio.CancelScope() as waiter.scope:
        # acquire() runs without yielding until it is queued (or granted), so
        # once `entered` is seen from another task, the waiter is in place.
        waiter.entered = True
        try:
            waiter.lease = await quota.acquire(waiter.key, timeout=waiter.timeout)
        except QuotaTimeoutError as e:
            waiter.error = e
    waiter.done = True


async def _settle(started, finished, patience):
    """
    Run the loop until every waiter of *started* is in place and every one of
    *finished* has its outcome: for at most 100 scheduling rounds, then for
    *patience* seconds (for timeouts to fire). The caller checks the outcome.
    """

    def settled():
        return all(w.entered for w in started) and all(w.done for w in finished)

    for _ in range(100):
        if settled():
            return
        await checkpoint()
    with anyio.move_on_after(patience):
        while not settled():  # noqa: ASYNC110  # polls plain flags
            await anyio.sleep(0.001)


async def _outcome(acquire):
    try:
        return await acquire()
    except QuotaError as e:
        return e


def _outcome_sync(acquire):
    try:
        return acquire()
    except QuotaError as e:
        return e


class QuotaMachine(RuleBasedStateMachine):
    """
    A `LocalQuota` of three keys under a global cap, against its model.
    """

    def __init__(self, portal):
        super().__init__()
        self.portal = portal
        self.quota = LocalQuota(per_key=1, total=2)
        # The model.
        self.per_key = 1
        self.total = 2
        self.use = {}  # key -> leases held, keys dropped at 0 (as the quota does)
        self.ring = {}  # key -> deque of waiting _Waiter, in round-robin order
        self.held = []  # every Lease handed out and not released
        self.new = []  # waiters granted during this step, lease not yet collected
        self.waiters = []  # the waiter tasks started and not yet done
        self.started = []  # every waiter task started
        self.granted = self.rejected = self.timed_out = self.cancelled = self.peak = 0

    # -- the model --

    def _in_use(self):
        return sum(self.use.values())

    def _free(self, key):
        return (
            key not in self.ring
            and self.use.get(key, 0) < self.per_key
            and self._in_use() < self.total
        )

    def _take(self, key):
        self.use[key] = self.use.get(key, 0) + 1
        self.granted += 1
        self.peak = max(self.peak, self._in_use())

    def _give(self, key):
        self.use[key] -= 1
        if not self.use[key]:
            del self.use[key]

    def _dispatch(self):
        """
        Grant every waiter that fits: the first key of the ring that is under its
        limit gets the head of its queue and moves to the back of the ring.
        """
        while self._in_use() < self.total:
            eligible = [k for k in self.ring if self.use.get(k, 0) < self.per_key]
            if not eligible:
                return
            queue = self.ring.pop(eligible[0])
            w = queue.popleft()
            if queue:
                self.ring[w.key] = queue
            self._take(w.key)
            self.new.append(w)

    def _check_refusal(self, error, key):
        if self.use.get(key, 0) >= self.per_key:
            expected = ("key", self.per_key, self.use.get(key, 0))
        else:
            expected = ("total", self.total, self._in_use())
        assert (error.key, error.scope, error.limit, error.in_use) == (key, *expected)

    # -- driving the quota --

    def _start(self, waiter):
        self.waiters.append(waiter)
        self.started.append(waiter)
        waiter.future = self.portal.start_task_soon(_run_waiter, self.quota, waiter)

    def _settle(self, *finished, patience=0.0):
        self.portal.call(_settle, self.waiters, [*self.new, *finished], patience)
        assert all(w.entered for w in self.waiters)
        assert all(w.done for w in finished)
        for w in self.new:
            assert w.lease is not None
            assert w.lease.key == w.key
            self.held.append(w.lease)
        self.new.clear()
        self.waiters = [w for w in self.waiters if not w.done]
        for w in self.waiters:
            assert not w.future.done()

    # -- rules --

    @rule(key=st.sampled_from(KEYS), how=st.sampled_from(["acquire_nowait", "timeout=0"]))
    def acquire_now(self, key, how):
        free = self._free(key)
        if how == "acquire_nowait":
            got = self.portal.call(_outcome_sync, functools.partial(self.quota.acquire_nowait, key))
        else:
            acquire = functools.partial(self.quota.acquire, key, timeout=0)
            got = self.portal.call(_outcome, acquire)
        if free:
            assert isinstance(got, Lease)
            self._take(key)
            self.held.append(got)
            return
        assert isinstance(got, QuotaExceededError)
        self._check_refusal(got, key)
        self.rejected += 1

    @precondition(lambda self: len(self.held) >= 2)
    @rule(data=st.data())
    def release_two(self, data):
        """
        Release two leases in one step, so that several waiters are granted
        before any of them runs.
        """
        first = data.draw(st.integers(0, len(self.held) - 1))
        second = data.draw(st.integers(0, len(self.held) - 2))
        leases = [self.held.pop(first), self.held.pop(second)]

        def release():
            for lease in leases:
                lease.release()

        self.portal.call(release)
        for lease in leases:
            self._give(lease.key)
            self._dispatch()
        self._settle()

    @rule(
        key=st.sampled_from(KEYS),
        timeout=st.sampled_from([None, 60.0]),
        count=st.integers(1, 3),
    )
    def start_waiters(self, key, timeout, count):
        for _ in range(count):
            w = _Waiter(key, timeout)
            if self._free(key):
                self._take(key)
                self.new.append(w)
            else:
                self.ring.setdefault(key, deque()).append(w)
            self._start(w)
            self._settle()

    @rule(key=st.sampled_from(KEYS))
    def time_out_waiter(self, key):
        w = _Waiter(key, 0.002)
        free = self._free(key)
        if free:
            self._take(key)
            self.new.append(w)
        self._start(w)
        self._settle(w, patience=5.0)
        if not free:
            assert isinstance(w.error, QuotaTimeoutError)
            assert w.error.waited >= 0.002
            self._check_refusal(w.error, key)
            self.timed_out += 1

    @precondition(lambda self: self.held)
    @rule(data=st.data(), raw=st.booleans())
    def release(self, data, raw):
        lease = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if raw:
            self.portal.call(self.quota.release, lease)
            with pytest.raises(LeaseReleasedError):
                self.portal.call(self.quota.release, lease)
        else:
            self.portal.call(lease.release)
        self.portal.call(lease.release)  # idempotent
        self._give(lease.key)
        self._dispatch()
        self._settle()

    @precondition(lambda self: self.ring)
    @rule(data=st.data())
    def cancel_waiter(self, data):
        waiting = [w for queue in self.ring.values() for w in queue]
        w = waiting[data.draw(st.integers(0, len(waiting) - 1))]
        queue = self.ring[w.key]
        queue.remove(w)
        if not queue:
            del self.ring[w.key]
        self.cancelled += 1
        self.portal.call(w.scope.cancel)
        self._settle(w)
        assert w.scope.cancelled_caught
        assert w.lease is None

    @rule(
        per_key=st.one_of(st.none(), st.integers(0, 3)),
        total=st.one_of(st.none(), st.integers(0, 6)),
    )
    def set_limits(self, per_key, total):
        changes = {}
        if per_key is not None:
            changes["per_key"] = self.per_key = per_key
        if total is not None:
            changes["total"] = self.total = total
        self.portal.call(functools.partial(self.quota.set_limits, **changes))
        self._dispatch()
        self._settle()

    # -- checks --

    @invariant()
    def matches_model(self):
        q = self.quota
        s, in_use, waiters = self.portal.call(
            lambda: (q.stats(), dict(q._in_use), {k: len(v) for k, v in q._waiters.items()})
        )
        assert s.in_use == self._in_use() == len(self.held)
        assert s.waiting == sum(len(queue) for queue in self.ring.values())
        assert (s.granted, s.rejected, s.timed_out, s.cancelled, s.peak) == (
            self.granted,
            self.rejected,
            self.timed_out,
            self.cancelled,
            self.peak,
        )
        assert s.keys == len(self.use.keys() | self.ring.keys())
        assert s.total == self.total
        assert in_use == self.use
        # The same keys wait, in the same round-robin order, with as many waiters.
        assert list(waiters.items()) == [(k, len(v)) for k, v in self.ring.items()]
        # Nobody waits who could be served.
        for key in self.ring:
            assert self.use.get(key, 0) >= self.per_key or self._in_use() >= self.total
        assert sorted(n for _, n in s.top) == sorted(self.use.values())
        assert all(self.use[k] == n for k, n in s.top)

    def teardown(self):
        # Robust to a failed step: cancel every waiter still running, whatever
        # the model thinks of it, then release every lease handed out.
        pending = [w for w in self.waiters if not w.done]

        def cancel():
            for w in pending:
                if w.scope is not None:
                    w.scope.cancel()

        self.portal.call(cancel)
        self.portal.call(_settle, pending, pending, 1.0)
        leases = {id(lease): lease for lease in self.held}
        leases.update((id(w.lease), w.lease) for w in self.started if w.lease)
        for lease in leases.values():
            self.portal.call(lease.release)
        for w in pending:
            assert w.future.exception(timeout=1) is None
        q = self.quota
        s = self.portal.call(q.stats)
        assert (s.in_use, s.waiting, s.keys) == (0, 0, 0)
        assert (q._in_use, q._waiters, q._total_in_use, q._n_waiting) == ({}, {}, 0, 0)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_local_quota_matches_model(backend):
    """
    Under any sequence of acquisitions, releases, cancellations, timeouts and
    limit changes, on asyncio and trio, a LocalQuota agrees with the model after
    every step and holds nothing once everything is released.
    """
    with anyio.from_thread.start_blocking_portal(backend) as portal:
        run_state_machine_as_test(
            functools.partial(QuotaMachine, portal),
            settings=settings(
                max_examples=50, stateful_step_count=30, deadline=None, database=None
            ),
        )
