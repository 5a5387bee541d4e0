"""
The `Admission` policy on the threads' path, ``with factory.engine()``: the
rate limit, load shedding and the circuit breaker, checked by real threads
at once, with the same errors and counters as ``async with``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

from collections import Counter

import anyio
import anyio.lowlevel
import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import usercontext as uc

from helpers import BoomError, make_ctx


class FakeClock:
    """
    A clock that moves only when told to; threads read it at once.
    """

    def __init__(self, now=500.0):
        self.now = now

    def __call__(self):
        return self.now


def wait_for(predicate, timeout=10.0):
    """
    Wait until *predicate()* is true, polling; fail after *timeout* seconds.
    """
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.001)


def run_at_once(factory, ctxs):
    """
    Enter ``with factory.engine(ctx)`` for every *ctx* in its own thread, all
    released by one barrier; return what each got (the engine or the error).
    """
    barrier = threading.Barrier(len(ctxs))
    results: list[object] = [None] * len(ctxs)

    def run(i, ctx):
        barrier.wait()
        try:
            with factory.engine(ctx) as engine:
                results[i] = engine
        except Exception as e:  # the result of this thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(ctxs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class Holder:
    """
    Holds engines of a factory in threads until released.
    """

    def __init__(self, factory):
        self.factory = factory
        self.release = threading.Event()
        self.entered = 0
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def hold(self, ctx):
        def run():
            try:
                with self.factory.engine(ctx):
                    with self._lock:
                        self.entered += 1
                    self.release.wait()
            except uc.UserContextError as e:
                self.errors.append(e)

        t = threading.Thread(target=run)
        self.threads.append(t)
        t.start()

    def join(self):
        self.release.set()
        for t in self.threads:
            t.join()


# Steps of an arrival pattern: the seconds since the last step, and the users
# of the requests that arrive at once (by thread) in this step.
steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 1.0]),
        st.lists(st.integers(0, 3), min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=8,
)


class TestRateLimit:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        rate=st.sampled_from([1.0, 2.0, 4.0, 10.0]),
        burst=st.integers(1, 4),
        pattern=steps,
    )
    def test_threads_never_admit_more_than_rate_times_window_plus_burst(self, rate, burst, pattern):
        """
        Threads entering at once, on a fake clock, are admitted exactly as
        the same requests one by one would be (the limiter is thread-safe),
        and in any window of *w* seconds at most ``floor(rate * w) + burst``
        requests of one user get an engine; the refused ones raise
        `RateLimitedError` and create nothing.
        """
        clock = FakeClock()
        limiter = uc.LocalRateLimiter(rate, burst=burst, clock=clock)
        model = uc.LocalRateLimiter(rate, burst=burst, clock=clock)
        created = Counter()
        lock = threading.Lock()

        def create(ctx):
            with lock:  # a Counter's += is not atomic across threads
                created[ctx.user_id] += 1
            return ctx.user_id

        factory = uc.EngineFactory(create, per_user=100, admission=uc.Admission(rate=limiter))
        admitted: dict[str, list[float]] = {}
        expected = Counter()
        for dt, users in pattern:
            clock.now += dt
            ctxs = [make_ctx(u) for u in users]
            for ctx in ctxs:  # the sequential model, on the same frozen clock
                with contextlib.suppress(uc.RateLimitedError):
                    model.admit_nowait(ctx.user_id)
                    expected[ctx.user_id] += 1
            for result in run_at_once(factory, ctxs):
                if isinstance(result, str):
                    admitted.setdefault(result, []).append(clock.now)
                else:
                    assert isinstance(result, uc.RateLimitedError), result
                    assert result.retry_after > 0
        assert {u: len(times) for u, times in admitted.items()} == dict(expected)
        assert created == expected
        for times in admitted.values():
            for i, start in enumerate(times):
                for j in range(i, len(times)):
                    window = times[j] - start
                    assert j - i + 1 <= math.floor(rate * window + 1e-9) + burst
        stats = factory.stats()
        n = sum(expected.values())
        total = sum(len(users) for _, users in pattern)
        assert stats.created == n
        assert (stats.admission.rate.admitted, stats.admission.rate.limited) == (n, total - n)

    def test_many_users_many_threads_get_their_burst_exactly(self):
        """
        32 threads of 4 users at one instant, burst 5: exactly 5 per user get
        an engine, 3 per user are refused with a ``Retry-After`` of one
        emission interval (0.1 s, sent as 1 s); the counters add up.
        """
        clock = FakeClock()
        limiter = uc.LocalRateLimiter(10, burst=5, clock=clock)
        factory = uc.EngineFactory(
            lambda ctx: ctx.user_id, per_user=8, admission=uc.Admission(rate=limiter)
        )
        results = run_at_once(factory, [make_ctx(i % 4) for i in range(32)])
        got = Counter(r for r in results if isinstance(r, str))
        assert got == {f"u-{i}": 5 for i in range(4)}
        refused = [r for r in results if not isinstance(r, str)]
        assert len(refused) == 12
        assert all(isinstance(r, uc.RateLimitedError) for r in refused)
        assert {r.status for r in refused} == {429}
        assert [r.wait for r in refused] == [pytest.approx(0.1)] * 12
        assert {r.retry_after for r in refused} == {1}  # whole seconds, rounded up
        stats = factory.stats()
        assert (stats.created, stats.closed, stats.in_use) == (20, 20, 0)
        assert stats.admission.rate == uc.RateLimitStats(
            admitted=20, limited=12, keys=4, rate=10.0, burst=5
        )

    def test_a_rate_limiter_without_a_sync_admit_is_refused_clearly(self):
        """
        A rate limiter that can only be checked from an event loop (a
        `RedisRateLimiter`) is refused in a thread with an error that names
        the fix, before any slot is taken or engine created.
        """
        redis = pytest.importorskip("usercontext.redis")
        url = os.environ.get("USERCONTEXT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
        limiter = redis.RedisRateLimiter(url, rate=5)
        calls = []
        factory = uc.EngineFactory(calls.append, admission=uc.Admission(rate=limiter))
        fix = r"use a usercontext\.LocalRateLimiter"
        with pytest.raises(TypeError, match=fix) as caught, factory.engine(make_ctx(1)):
            pass  # pragma: no cover
        assert "has no admit_nowait(key)" in str(caught.value)
        assert calls == []
        assert factory.stats().in_use == 0
        anyio.run(limiter.aclose)


class TestShed:
    def test_user_and_global_queue_bounds_refuse_at_once(self):
        """
        With both slots of a `ThreadQuota` (total 2) held and two threads
        waiting, a third request of a waiting user is refused for its user's
        queue (429) and one of a new user for the global queue (503), at
        once; the waiters are then served, and the quota counted no
        refusal.
        """
        quota = uc.ThreadQuota(per_key=1, total=2)
        shed = uc.Shed(max_waiting_per_user=1, max_waiting=2, clock=FakeClock())
        factory = uc.EngineFactory(
            lambda ctx: ctx.user_id, thread_quota=quota, admission=uc.Admission(shed=shed)
        )
        holder = Holder(factory)
        holder.hold(make_ctx(1))
        holder.hold(make_ctx(2))
        wait_for(lambda: holder.entered == 2)
        holder.hold(make_ctx(1))
        holder.hold(make_ctx(3))
        wait_for(lambda: shed.stats().waiting == 2)
        started = time.monotonic()
        with pytest.raises(uc.LoadShedError) as mine, factory.engine(make_ctx(1)):
            pass  # pragma: no cover
        with pytest.raises(uc.LoadShedError) as everyone, factory.engine(make_ctx(4)):
            pass  # pragma: no cover
        assert time.monotonic() - started < 1.0  # refused, not queued (no timeout)
        assert (mine.value.reason, mine.value.status, mine.value.waiting) == ("user_queue", 429, 1)
        assert (everyone.value.reason, everyone.value.status) == ("queue", 503)
        assert everyone.value.waiting == 2
        assert mine.value.retry_after == everyone.value.retry_after == 1
        holder.join()
        assert holder.entered == 4
        assert not holder.errors
        assert shed.stats() == uc.ShedStats(
            waiting=0, peak_waiting=2, shed=2, user_queue=1, queue=1, deadline=0, hold=0.0
        )  # the waiters were granted a slot at no time of the frozen clock: hold 0
        q = quota.stats()
        assert (q.granted, q.rejected, q.timed_out, q.in_use) == (4, 0, 0, 0)
        stats = factory.stats()
        assert (stats.created, stats.in_use) == (4, 0)
        assert stats.admission.shed.shed == 2

    def test_deadline_by_the_factory_timeout(self):
        """
        A thread can wait no longer than the factory's *timeout*: once a
        waiter taught the policy that a slot is held 10 s (on a fake clock),
        the next request, which expects 10 s, is refused at once with that
        as its ``Retry-After``, instead of timing out after 0.3 s.
        """
        clock = FakeClock()
        shed = uc.Shed(clock=clock)
        factory = uc.EngineFactory(
            lambda ctx: ctx.user_id,
            per_user=1,
            timeout=0.3,
            admission=uc.Admission(shed=shed),
        )
        holder = Holder(factory)
        holder.hold(make_ctx(1))
        wait_for(lambda: holder.entered == 1)
        holder.hold(make_ctx(1))  # waits its whole timeout, 10 s on the fake clock
        wait_for(lambda: shed.stats().waiting == 1)
        clock.now += 10
        wait_for(lambda: len(holder.errors) == 1)
        assert isinstance(holder.errors[0], uc.QuotaTimeoutError)
        assert shed.stats().hold == 10
        started = time.monotonic()
        with pytest.raises(uc.LoadShedError) as caught, factory.engine(make_ctx(1)):
            pass  # pragma: no cover
        assert time.monotonic() - started < 0.3
        assert (caught.value.reason, caught.value.status) == ("deadline", 503)
        assert caught.value.expected_wait == 10
        assert caught.value.retry_after == 10
        holder.join()
        assert shed.stats().deadline == 1

    def test_zero_timeout_is_refused_by_the_quota_not_shed(self):
        """
        With *timeout* 0 nobody waits: the quota refuses (its own error and
        counter) and the shed policy counts nothing.
        """
        quota = uc.ThreadQuota(per_key=1)
        shed = uc.Shed(max_waiting=0)
        factory = uc.EngineFactory(
            lambda ctx: 1, thread_quota=quota, timeout=0, admission=uc.Admission(shed=shed)
        )
        holder = Holder(factory)
        holder.hold(make_ctx(1))
        wait_for(lambda: holder.entered == 1)
        with pytest.raises(uc.QuotaExceededError), factory.engine(make_ctx(1)):
            pass  # pragma: no cover
        holder.join()
        assert shed.stats().shed == 0
        assert quota.stats().rejected == 1

    def test_an_interrupted_waiter_is_counted_out_and_teaches_nothing(self):
        """
        A waiter interrupted by a signal while it blocks (SIGINT, delivered
        to the main thread) leaves the queue and the shed policy's count,
        and its wait teaches nothing.
        """
        clock = FakeClock()
        shed = uc.Shed(clock=clock)
        quota = uc.ThreadQuota(per_key=1)
        factory = uc.EngineFactory(
            lambda ctx: 1, thread_quota=quota, admission=uc.Admission(shed=shed)
        )
        holder = Holder(factory)
        holder.hold(make_ctx(1))
        wait_for(lambda: holder.entered == 1)

        class Interrupted(BaseException):
            pass

        def handler(signum, frame):
            raise Interrupted

        def interrupt():
            wait_for(lambda: shed.stats().waiting == 1)
            clock.now += 5
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            threading.Thread(target=interrupt).start()
            with pytest.raises(Interrupted), factory.engine(make_ctx(1)):
                pass  # pragma: no cover
        finally:
            signal.signal(signal.SIGINT, previous)
        holder.join()
        assert shed.stats().waiting == 0
        assert shed.stats().hold is None
        q = quota.stats()
        assert (q.cancelled, q.in_use, q.waiting) == (1, 0, 0)


class Backend:
    """
    A sync engine backend that fails while *down*, counting the calls of
    create; with *gate* set, create blocks on it first.
    """

    def __init__(self):
        self.down = True
        self.calls = 0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def create(self, ctx):
        with self._lock:
            self.calls += 1
        if self.gate is not None:
            self.gate.wait()
        if self.down:
            raise BoomError("the engine backend is down")
        return ctx.user_id


class TestCircuitBreaker:
    def test_opens_in_threads_and_lets_one_probe_through(self):
        """
        After 3 failed creations in threads the breaker opens: 8 threads at
        once are refused (503) without calling create. After the cool-down
        (fake clock), of 8 threads at once exactly one is the probe, the 7
        others are refused while it is out; the probe succeeds and closes
        the breaker.
        """
        clock = FakeClock()
        backend = Backend()
        breaker = uc.CircuitBreaker(failures=3, within=10, cool_down=5, clock=clock)
        factory = uc.EngineFactory(
            backend.create, per_user=16, admission=uc.Admission(breaker=breaker)
        )
        results = run_at_once(factory, [make_ctx(i) for i in range(3)])
        assert all(isinstance(r, BoomError) for r in results)
        assert backend.calls == 3
        assert breaker.stats().state == "open"
        results = run_at_once(factory, [make_ctx(i) for i in range(8)])
        assert all(isinstance(r, uc.CircuitOpenError) for r in results)
        assert {(r.status, r.retry_after) for r in results} == {(503, 5)}
        assert backend.calls == 3
        clock.now += 5
        backend.down = False
        backend.gate = threading.Event()
        probe = threading.Thread(target=lambda: run_at_once(factory, [make_ctx(0)]))
        probe.start()
        wait_for(lambda: backend.calls == 4)  # the probe is in create
        results = run_at_once(factory, [make_ctx(i) for i in range(1, 8)])
        assert all(isinstance(r, uc.CircuitOpenError) for r in results)
        assert {r.retry_after for r in results} == {5}  # a probe is out: a whole cool-down
        backend.gate.set()
        probe.join()
        assert breaker.stats() == uc.BreakerStats(
            state="closed", open=0, opened=1, refused=15, probes=1, failures=3
        )
        assert run_at_once(factory, [make_ctx(i) for i in range(8)]) == [f"u-{i}" for i in range(8)]
        stats = factory.stats()
        assert (stats.created, stats.create_errors, stats.in_use) == (9, 3, 0)
        assert stats.admission.breaker.refused == 15

    def test_per_user_breakers_and_an_interrupted_creation(self):
        """
        With *per_user*, one user's failing creations open only that user's
        breaker; a creation interrupted by a BaseException is no verdict
        either way (the probe is out no more, the breaker stays open).
        """
        clock = FakeClock()
        breaker = uc.CircuitBreaker(failures=2, cool_down=5, per_user=True, clock=clock)

        class Interrupted(BaseException):
            pass

        interrupt = {"u-3"}

        def create(ctx):
            if ctx.user_id in interrupt:
                raise Interrupted
            if ctx.user_id == "u-1":
                raise BoomError("bad settings of u-1")
            return ctx.user_id

        factory = uc.EngineFactory(create, admission=uc.Admission(breaker=breaker))
        results = run_at_once(factory, [make_ctx(1), make_ctx(1), make_ctx(2)])
        assert sorted(map(type, results), key=str) == sorted([BoomError, BoomError, str], key=str)
        refused = run_at_once(factory, [make_ctx(1)])[0]
        assert isinstance(refused, uc.CircuitOpenError)
        assert refused.key == "u-1"
        assert run_at_once(factory, [make_ctx(2)]) == ["u-2"]
        with pytest.raises(Interrupted), factory.engine(make_ctx(3)):
            pass  # pragma: no cover
        stats = breaker.stats()
        assert (stats.state, stats.open, stats.failures, stats.refused) == ("open", 1, 2, 1)
        # u-1's probe, interrupted: no verdict; the next one may probe again.
        clock.now += 5
        interrupt.add("u-1")
        with pytest.raises(Interrupted), factory.engine(make_ctx(1)):
            pass  # pragma: no cover
        interrupt.discard("u-1")
        assert breaker.stats().probes == 1
        assert isinstance(run_at_once(factory, [make_ctx(1)])[0], BoomError)  # probes again
        assert breaker.stats().probes == 2
        assert breaker.stats().opened == 2

    def test_a_probe_that_closes_the_breaker_while_another_request_checks_it(self):
        """
        A request that saw the breaker open, and finds it closed by a probe
        once it takes the breaker's lock (here the probe runs from within
        its read of the clock), goes through as in the closed state: no
        refusal, no second probe.
        """
        clock = HookClock()
        backend = Backend()
        breaker = uc.CircuitBreaker(failures=1, cool_down=5, clock=clock)
        factory = uc.EngineFactory(backend.create, admission=uc.Admission(breaker=breaker))
        assert isinstance(run_at_once(factory, [make_ctx(1)])[0], BoomError)
        clock.now += 5
        backend.down = False
        probed = []
        clock.hook = lambda: probed.extend(run_at_once(factory, [make_ctx(2)]))
        assert run_at_once(factory, [make_ctx(1)]) == ["u-1"]
        assert probed == ["u-2"]
        assert breaker.stats() == uc.BreakerStats(
            state="closed", open=0, opened=1, refused=0, probes=1, failures=1
        )


class HookClock(FakeClock):
    """
    A fake clock that runs *hook* once, at the next reading.
    """

    hook = None

    def __call__(self):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.now


@pytest.mark.anyio
async def test_threads_and_an_event_loop_share_one_policy():
    """
    ``async with`` on the event loop and ``with`` in 8 worker threads draw
    on one rate limit at one instant: exactly *burst* requests of the user
    get an engine in all, whichever path they took.
    """
    clock = FakeClock()
    limiter = uc.LocalRateLimiter(1, burst=6, clock=clock)
    factory = uc.EngineFactory(
        lambda ctx: ctx.user_id, per_user=32, admission=uc.Admission(rate=limiter)
    )
    got: list[object] = []

    async def on_loop():
        for _ in range(4):
            try:
                async with factory.engine(make_ctx(1)) as engine:
                    got.append(engine)
            except uc.RateLimitedError as e:
                got.append(e)
            await anyio.lowlevel.checkpoint()

    async def in_thread():
        got.extend(await anyio.to_thread.run_sync(run_at_once, factory, [make_ctx(1)] * 4))

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_loop)
        tg.start_soon(in_thread)
        tg.start_soon(in_thread)
    assert len(got) == 12
    assert got.count("u-1") == 6
    assert sum(isinstance(r, uc.RateLimitedError) for r in got) == 6
    stats = factory.stats()
    assert (stats.created, stats.admission.rate.admitted, stats.admission.rate.limited) == (6, 6, 6)
