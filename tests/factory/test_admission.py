"""
`EngineFactory` with an `Admission` policy: load shedding (`Shed`), the
circuit breaker on *create* (`CircuitBreaker`), their stats, and the
policy's arguments. The rate limit's properties are in ``tests/test_rate.py``.
"""

from __future__ import annotations

import math
import pickle

import anyio
import pytest

import usercontext as uc

from helpers import BoomError, make_ctx, until


pytestmark = pytest.mark.anyio


class FakeClock:
    """
    A clock that moves only when told to.
    """

    def __init__(self, now=500.0):
        self.now = now

    def __call__(self):
        return self.now


class Holder:
    """
    Holds engines of a factory in background tasks until released.
    """

    def __init__(self, factory, tg):
        self.factory = factory
        self.tg = tg
        self.release = anyio.Event()
        self.entered = 0
        self.errors: list[BaseException] = []

    def hold(self, ctx, *, clock=None, hold=0.0):
        async def run():
            try:
                async with self.factory.engine(ctx):
                    self.entered += 1
                    await self.release.wait()
                    if clock is not None:
                        clock.now += hold
            except uc.UserContextError as e:
                self.errors.append(e)

        self.tg.start_soon(run)


async def teach(factory, holders, waiter, clock, waited):
    """
    Have *waiter* wait *waited* seconds (on *clock*) behind requests of
    *holders*, which fill the slots it needs, so that the factory's shed
    policy learns how long a slot is held.
    """
    async with anyio.create_task_group() as tg:
        holder = Holder(factory, tg)
        for ctx in holders:
            holder.hold(ctx)
        await until(lambda: holder.entered == len(holders))
        holder.hold(waiter)
        await until(lambda: factory.stats().admission.shed.waiting == 1)
        clock.now += waited
        holder.release.set()
    assert holder.entered == len(holders) + 1


class TestArguments:
    @pytest.mark.parametrize(
        ("make", "error", "match"),
        [
            (lambda: uc.Admission(rate=10), TypeError, r"LocalRateLimiter\(10, burst=20\)"),
            (lambda: uc.Admission(shed=3), TypeError, r"shed must be a usercontext.Shed"),
            (lambda: uc.Admission(breaker=True), TypeError, "breaker must be"),
            (lambda: uc.Shed(max_waiting=-1), ValueError, "max_waiting must be at least 0"),
            (lambda: uc.Shed(max_waiting_per_user="2"), TypeError, "max_waiting_per_user"),
            (lambda: uc.Shed(deadline=1), TypeError, "deadline must be True or False"),
            (lambda: uc.Shed(retry_after=0), ValueError, "retry_after"),
            (lambda: uc.Shed(clock="now"), TypeError, "clock must be a function"),
            (lambda: uc.CircuitBreaker(failures=0), ValueError, "failures must be at least 1"),
            (lambda: uc.CircuitBreaker(within=-1), ValueError, "within"),
            (lambda: uc.CircuitBreaker(cool_down=None), TypeError, "cool_down"),
            (lambda: uc.CircuitBreaker(per_user="yes"), TypeError, "per_user must be True"),
            (
                lambda: uc.EngineFactory(lambda ctx: 1, admission=uc.Shed()),
                TypeError,
                r"admission must be a usercontext.Admission",
            ),
            (
                lambda: uc.LoadShedError(
                    "u-1", reason="x", waiting=0, expected_wait=0, retry_after=1
                ),
                ValueError,
                "reason=...",
            ),
        ],
    )
    def test_bad(self, make, error, match):
        """
        A bad part or setting raises at construction, naming it and what it
        accepts.
        """
        with pytest.raises(error, match=match):
            make()

    def test_one_policy_per_factory(self):
        """
        A policy serves one factory: a second one is refused (its breaker
        and counters would mix two engine types), while a rate limiter may
        be shared.
        """
        limiter = uc.LocalRateLimiter(10)
        admission = uc.Admission(rate=limiter)
        factory = uc.EngineFactory(lambda ctx: 1, admission=admission)
        assert factory.admission is admission
        with pytest.raises(ValueError, match="give each EngineFactory its own Admission"):
            uc.EngineFactory(lambda ctx: 1, admission=admission)
        uc.EngineFactory(lambda ctx: 1, admission=uc.Admission(rate=limiter))

    def test_reprs(self):
        """
        The reprs name the parts and the settings.
        """
        assert repr(uc.Admission()) == "<usercontext.Admission(nothing)>"
        both = uc.Admission(rate=uc.LocalRateLimiter(1), breaker=uc.CircuitBreaker())
        assert repr(both) == "<usercontext.Admission(rate, breaker)>"
        assert repr(uc.Shed(max_waiting=3)) == (
            "<usercontext.Shed(max_waiting_per_user=None, max_waiting=3, deadline=True, waiting=0)>"
        )
        assert repr(uc.CircuitBreaker()) == (
            "<usercontext.CircuitBreaker(failures=5, within=10, cool_down=5, per_user=False)>"
        )

    def test_no_policy(self):
        """
        Without a policy the factory reports none.
        """
        factory = uc.EngineFactory(lambda ctx: 1)
        assert factory.admission is None
        assert factory.stats().admission is None


class TestShed:
    async def test_user_queue(self):
        """
        With one slot per user held and one request of that user waiting,
        the next request of that user is refused at once with 429 and
        ``user_queue``; another user is not affected; the quota counts no
        rejection; the waiter is served once the slot is free.
        """
        shed = uc.Shed(max_waiting_per_user=1)
        factory = uc.EngineFactory(
            lambda ctx: ctx.user_id, per_user=1, admission=uc.Admission(shed=shed)
        )
        a, b = make_ctx(1), make_ctx(2)
        async with anyio.create_task_group() as tg:
            holder = Holder(factory, tg)
            holder.hold(a)
            await until(lambda: holder.entered == 1)
            holder.hold(a)  # waits
            await until(lambda: shed.stats().waiting == 1)
            with pytest.raises(uc.LoadShedError) as caught:
                async with factory.engine(a):
                    pass
            e = caught.value
            assert (e.status, e.error, e.reason, e.key, e.waiting) == (
                429,
                "user_queue_full",
                "user_queue",
                "u-1",
                1,
            )
            assert e.headers["Retry-After"] == "1"
            assert "User 'u-1' already has 1 requests waiting" in e.detail
            async with factory.engine(b) as engine:  # u-2 has its own queue
                assert engine == "u-2"
            holder.release.set()
        assert holder.entered == 2
        assert not holder.errors
        stats = factory.stats()
        assert stats.created == 3
        assert stats.quota.rejected == 0
        assert stats.quota.granted == 3
        assert stats.admission == uc.AdmissionStats(
            rate=None,
            shed=uc.ShedStats(
                waiting=0,
                peak_waiting=1,
                shed=1,
                user_queue=1,
                queue=0,
                deadline=0,
                hold=stats.admission.shed.hold,
            ),
            breaker=None,
        )
        assert stats.admission.shed.hold is not None

    async def test_global_queue(self):
        """
        With every slot held and *max_waiting* requests waiting in all, a
        request of any user is refused with 503 and ``queue``.
        """
        shed = uc.Shed(max_waiting=2)
        factory = uc.EngineFactory(lambda ctx: 1, total=1, admission=uc.Admission(shed=shed))
        async with anyio.create_task_group() as tg:
            holder = Holder(factory, tg)
            for i in range(3):
                holder.hold(make_ctx(i))
            await until(lambda: shed.stats().waiting == 2)
            with pytest.raises(uc.LoadShedError) as caught:
                await factory.engine(make_ctx(9)).__aenter__()
            assert (caught.value.status, caught.value.reason) == (503, "queue")
            assert caught.value.error == "queue_full"
            holder.release.set()
        assert holder.entered == 3
        assert shed.stats().queue == 1
        assert shed.stats().peak_waiting == 2

    async def test_deadline(self):
        """
        Once slots are known to be held 2 s on average, a request that finds
        its user's only slot taken expects to wait 2 s: it is refused at once
        when the factory's timeout, or the caller's own deadline, is
        shorter, and waits when it is longer.
        """
        clock = FakeClock()
        shed = uc.Shed(clock=clock, retry_after=0.5)
        factory = uc.EngineFactory(
            lambda ctx: 1, per_user=1, timeout=1.0, admission=uc.Admission(shed=shed)
        )
        patient = uc.EngineFactory(
            lambda ctx: 1, per_user=1, timeout=30, admission=uc.Admission(shed=uc.Shed(clock=clock))
        )
        a = make_ctx(1)
        for f in (factory, patient):
            # The first in line of one slot expects to wait one hold.
            await teach(f, [a], a, clock, 2.0)
        assert shed.stats().hold == 2.0
        async with anyio.create_task_group() as tg:
            holder = Holder(factory, tg)
            holder.hold(a, clock=clock, hold=2.0)
            await until(lambda: holder.entered == 1)
            with pytest.raises(uc.LoadShedError) as caught:
                async with factory.engine(a):
                    pass
            e = caught.value
            assert (e.status, e.reason, e.error) == (503, "deadline", "deadline_unreachable")
            assert e.expected_wait == 2.0
            assert e.retry_after == 2  # the expected wait, not the least of 0.5 s
            assert "The expected wait of 2.000 s is too long" in e.detail
            holder.release.set()
        async with anyio.create_task_group() as tg:
            holder = Holder(patient, tg)
            holder.hold(a, clock=clock, hold=2.0)
            await until(lambda: holder.entered == 1)
            # The caller's own deadline counts too.
            with anyio.move_on_after(5), pytest.raises(uc.LoadShedError, match="expected wait"):
                # move_on_after(5) is > 2: not shed by it; fail_after(0.5) is.
                with anyio.fail_after(0.5):
                    await patient.engine(a).__aenter__()

            # A caller who can wait longer than expected waits, and is served.
            async def release_once_queued():
                await until(lambda: patient.stats().admission.shed.waiting == 1)
                holder.release.set()

            tg.start_soon(release_once_queued)
            with anyio.fail_after(5):
                async with patient.engine(a):
                    pass
        assert patient.stats().admission.shed.deadline == 1
        assert patient.stats().created == 4

    async def test_deadline_behind_the_total_limit(self):
        """
        Under a *total* limit, the expected wait counts every request ahead
        over the slots they share: with 2 slots held 1 s on average, the
        first two waiters expect 0.5 s and 1 s and wait (timeout 1 s), the
        third expects 1.5 s and is refused.
        """
        clock = FakeClock()
        shed = uc.Shed(clock=clock)
        factory = uc.EngineFactory(
            lambda ctx: 1, per_user=5, total=2, timeout=1.0, admission=uc.Admission(shed=shed)
        )
        # The first in line of two slots expects half a hold: it waited 0.5 s.
        await teach(factory, [make_ctx(1), make_ctx(2)], make_ctx(3), clock, 0.5)
        assert shed.stats().hold == 1.0
        async with anyio.create_task_group() as tg:
            holder = Holder(factory, tg)
            holder.hold(make_ctx(1))
            holder.hold(make_ctx(2))
            await until(lambda: holder.entered == 2)
            holder.hold(make_ctx(3))
            holder.hold(make_ctx(3))
            await until(lambda: shed.stats().waiting == 2)
            with pytest.raises(uc.LoadShedError) as caught:
                await factory.engine(make_ctx(3)).__aenter__()
            assert caught.value.expected_wait == 1.5
            assert caught.value.waiting == 2
            holder.release.set()
        assert holder.entered == 4
        assert not holder.errors
        assert shed.stats().peak_waiting == 2
        # The two waiters were served at once on the fake clock, after
        # expecting to wait a half and a whole hold, in either order: the
        # decayed sums (by 0.9) of 0.5 s over 0.5 shares, then 0 s twice.
        hold = shed.stats().hold
        assert hold in (pytest.approx(0.405 / 1.855), pytest.approx(0.405 / 1.805))
        # A waiter whose limits are unknown expects nothing, and teaches nothing.
        ticket = shed._enter("u-9", math.inf, None, None)
        assert ticket[1] == 0.0
        clock.now += 5
        shed._leave("u-9", ticket, learn=True)
        assert shed.stats().hold == hold

    async def test_free_slot_and_zero_timeout_never_shed(self):
        """
        A request that finds a free slot is never shed, even with bounds of
        0; with ``timeout=0`` a full quota refuses it as before
        (`QuotaExceededError`), counted by the quota, not the shed policy.
        """
        shed = uc.Shed(max_waiting_per_user=0, max_waiting=0)
        factory = uc.EngineFactory(
            lambda ctx: 1, per_user=1, timeout=0, admission=uc.Admission(shed=shed)
        )
        async with factory.engine(make_ctx(1)):
            with pytest.raises(uc.QuotaExceededError):
                async with factory.engine(make_ctx(1)):
                    pass
        assert shed.stats().shed == 0
        assert factory.stats().quota.rejected == 1

    async def test_no_shed_waits(self):
        """
        A policy without shedding (a rate limit only) lets requests wait for
        a slot as the factory does without a policy.
        """
        factory = uc.EngineFactory(
            lambda ctx: 1,
            per_user=1,
            admission=uc.Admission(rate=uc.LocalRateLimiter(1000, burst=10)),
        )
        async with anyio.create_task_group() as tg:
            holder = Holder(factory, tg)
            holder.hold(make_ctx(1))
            holder.hold(make_ctx(1))
            await until(lambda: factory.stats().quota.waiting == 1)
            holder.release.set()
        assert holder.entered == 2

    async def test_cancelled_waiter_counted_out(self):
        """
        A waiter cancelled while it waits leaves the shed policy's queue.
        """
        shed = uc.Shed(max_waiting_per_user=1)
        factory = uc.EngineFactory(lambda ctx: 1, per_user=1, admission=uc.Admission(shed=shed))
        async with factory.engine(make_ctx(1)):
            with anyio.move_on_after(0.05):
                async with factory.engine(make_ctx(1)):
                    pass
            assert shed.stats().waiting == 0
        assert factory.stats().quota.cancelled == 1

    async def test_refused_by_rate_before_queueing(self):
        """
        The rate limit is checked first: a refused request neither queues nor
        creates, and the factory's counters are unchanged.
        """
        clock = FakeClock()
        factory = uc.EngineFactory(
            lambda ctx: 1, admission=uc.Admission(rate=uc.LocalRateLimiter(1, clock=clock))
        )
        async with factory.engine(make_ctx(1)):
            pass
        with pytest.raises(uc.RateLimitedError):
            async with factory.engine(make_ctx(1)):
                pass
        stats = factory.stats()
        assert (stats.created, stats.quota.granted, stats.in_use) == (1, 1, 0)
        assert stats.admission.rate.limited == 1


class Backend:
    """
    An engine backend that fails while *down*, counting the calls of create.
    """

    def __init__(self):
        self.down = True
        self.calls = 0
        self.gate: anyio.Event | None = None

    async def create(self, ctx):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise BoomError("the engine backend is down")
        return ctx.user_id


class TestCircuitBreaker:
    async def attempt(self, factory, ctx):
        try:
            async with factory.engine(ctx) as engine:
                return engine
        except (BoomError, uc.CircuitOpenError) as e:
            return e

    async def test_opens_within_k_failures_and_recovers_within_one_cool_down(self):
        """
        After *failures* failed creations within the window the breaker
        opens: the next requests are refused at once (503, Retry-After the
        rest of the cool-down) without calling create. Once the cool-down
        has passed, one probe goes through: a failed probe opens it for
        another cool-down, a successful one closes it.
        """
        clock = FakeClock()
        backend = Backend()
        breaker = uc.CircuitBreaker(failures=3, within=10, cool_down=5, clock=clock)
        factory = uc.EngineFactory(backend.create, admission=uc.Admission(breaker=breaker))
        ctx = make_ctx(1)
        for _ in range(3):
            assert isinstance(await self.attempt(factory, ctx), BoomError)
            clock.now += 1
        assert backend.calls == 3
        assert breaker.stats().state == "open"
        refused = await self.attempt(factory, ctx)
        assert isinstance(refused, uc.CircuitOpenError)
        assert (refused.status, refused.error, refused.key) == (503, "circuit_open", None)
        assert (refused.failures, refused.within) == (3, 10)
        assert refused.engine == "Backend.create"
        assert refused.retry_after == 4  # opened at the third failure, 1 s ago
        assert "Creating Backend.create engines failed 3 times within 10 s" in str(refused)
        assert pickle.loads(pickle.dumps(refused)).retry_after == 4  # noqa: S301  # our own pickle
        clock.now += 3.9
        assert isinstance(await self.attempt(factory, ctx), uc.CircuitOpenError)
        assert backend.calls == 3  # create was not called while open
        clock.now += 0.1
        assert breaker.stats().state == "half_open"
        assert isinstance(await self.attempt(factory, ctx), BoomError)  # the probe fails
        assert backend.calls == 4
        assert breaker.stats().state == "open"
        clock.now += 5  # one cool-down after the backend healed
        backend.down = False
        assert await self.attempt(factory, ctx) == "u-1"
        assert breaker.stats() == uc.BreakerStats(
            state="closed", open=0, opened=2, refused=2, probes=2, failures=4
        )
        assert await self.attempt(factory, ctx) == "u-1"
        stats = factory.stats()
        assert (stats.created, stats.create_errors) == (2, 4)
        assert stats.admission.breaker.refused == 2

    async def test_failures_outside_the_window_do_not_open(self):
        """
        Failures spread wider than *within* never open the breaker.
        """
        clock = FakeClock()
        backend = Backend()
        breaker = uc.CircuitBreaker(failures=2, within=1, clock=clock)
        factory = uc.EngineFactory(backend.create, admission=uc.Admission(breaker=breaker))
        for _ in range(5):
            assert isinstance(await self.attempt(factory, make_ctx(1)), BoomError)
            clock.now += 1.5
        assert breaker.stats().state == "closed"
        assert breaker.stats().failures == 5
        assert backend.calls == 5

    async def test_one_probe_at_a_time(self):
        """
        While a probe is creating, other requests are refused with a
        Retry-After of one cool-down; a probe cancelled mid-creation is no
        verdict, so the next request probes again.
        """
        clock = FakeClock()
        backend = Backend()
        breaker = uc.CircuitBreaker(failures=1, cool_down=2, clock=clock)
        factory = uc.EngineFactory(backend.create, admission=uc.Admission(breaker=breaker))
        assert isinstance(await self.attempt(factory, make_ctx(1)), BoomError)
        clock.now += 2
        backend.gate = anyio.Event()
        with anyio.move_on_after(0.2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.attempt, factory, make_ctx(1))
                await until(lambda: backend.calls == 2)
                refused = await self.attempt(factory, make_ctx(2))
                assert isinstance(refused, uc.CircuitOpenError)
                assert refused.retry_after == 2
                await anyio.sleep_forever()  # the probe is cancelled by move_on_after
        assert breaker.stats().state == "half_open"
        backend.gate = None
        backend.down = False
        assert await self.attempt(factory, make_ctx(1)) == "u-1"
        assert breaker.stats().state == "closed"

    async def test_refused_at_create_after_waiting(self):
        """
        Requests that passed the check before queueing are checked again at
        *create*: after the first of them probed and failed, the next is
        refused there, and gives its slot back.
        """
        clock = FakeClock()
        backend = Backend()
        backend.down = False
        breaker = uc.CircuitBreaker(failures=1, cool_down=1, clock=clock)
        factory = uc.EngineFactory(
            backend.create, per_user=1, admission=uc.Admission(breaker=breaker)
        )
        results = []

        async def run(ctx):
            results.append(await self.attempt(factory, ctx))

        async with anyio.create_task_group() as tg:
            holder = Holder(factory, tg)
            holder.hold(make_ctx(1))  # holds u-1's only slot
            await until(lambda: holder.entered == 1)
            backend.down = True
            assert isinstance(await self.attempt(factory, make_ctx(2)), BoomError)
            clock.now += 1  # half open: both pass the check and queue
            tg.start_soon(run, make_ctx(1))
            tg.start_soon(run, make_ctx(1))
            await until(lambda: factory.stats().quota.waiting == 2)
            holder.release.set()
        assert isinstance(results[0], BoomError)  # the probe
        assert isinstance(results[1], uc.CircuitOpenError)
        assert backend.calls == 3
        assert factory.stats().quota.in_use == 0

    async def test_per_user(self):
        """
        With *per_user*, one user's failures open only that user's breaker;
        a user whose breaker closed again, or whose failures are old, leaves
        no state behind.
        """
        clock = FakeClock()
        backend = Backend()
        breaker = uc.CircuitBreaker(failures=2, within=5, cool_down=1, per_user=True, clock=clock)

        async def create(ctx):
            if ctx.user_id == "u-2":
                return ctx.user_id
            return await backend.create(ctx)

        factory = uc.EngineFactory(create, admission=uc.Admission(breaker=breaker))
        for _ in range(2):
            assert isinstance(await self.attempt(factory, make_ctx(1)), BoomError)
        refused = await self.attempt(factory, make_ctx(1))
        assert isinstance(refused, uc.CircuitOpenError)
        assert refused.key == "u-1"
        assert "for user 'u-1'" in str(refused)
        assert await self.attempt(factory, make_ctx(2)) == "u-2"
        assert breaker.stats().state == "open"
        assert breaker.stats().open == 1
        clock.now += 1
        backend.down = False
        assert await self.attempt(factory, make_ctx(1)) == "u-1"
        assert breaker.stats().state == "closed"
        assert not breaker._circuits
        # Many users failing once each: their states are swept once old.
        backend.down = True
        for i in range(100):
            assert isinstance(await self.attempt(factory, make_ctx(f"x{i}")), BoomError)
        assert len(breaker._circuits) == 100
        clock.now += 10
        assert breaker.stats().open == 0
        assert not breaker._circuits

    async def test_open_per_user_states_are_swept(self):
        """
        A user's open breaker with no probe for longer than a cool-down and
        a window is dropped: the user's next request probes.
        """
        clock = FakeClock()
        breaker = uc.CircuitBreaker(failures=1, within=1, cool_down=1, per_user=True, clock=clock)
        breaker._done("u-1", probe=False, ok=False)
        assert breaker.stats().open == 1
        clock.now += 1.5
        assert breaker.stats().open == 1  # past its cool-down only: kept
        clock.now += 1
        assert breaker.stats().open == 0
        # An open factory-wide breaker is never dropped.
        shared = uc.CircuitBreaker(failures=1, within=1, cool_down=1, clock=clock)
        shared._done("u-1", probe=False, ok=False)
        clock.now += 100
        assert shared.stats().state == "half_open"

    async def test_late_failure_while_open_is_not_counted_twice(self):
        """
        A creation that began before the breaker opened and fails after it
        leaves it open, with the same opening.
        """
        clock = FakeClock()
        breaker = uc.CircuitBreaker(failures=1, clock=clock)
        breaker._done("u-1", probe=False, ok=False)
        breaker._done("u-1", probe=False, ok=False)
        assert breaker.stats().opened == 1
        assert breaker.stats().failures == 2


class TestSlowMake:
    async def test_pooled_create_fails_or_is_cancelled(self):
        """
        A pooling factory (its engines made on the slow path, with no
        breaker) counts a failed creation, and a creation cancelled midway
        creates nothing; the slot is given back either way.
        """
        calls = []

        async def create(ctx):
            calls.append(ctx.user_id)
            if len(calls) == 1:
                raise BoomError("no engine")
            await anyio.sleep_forever()

        factory = uc.EngineFactory(create, pool_idle=1)
        with pytest.raises(BoomError):
            async with factory.engine(make_ctx(1)):
                pass
        with anyio.move_on_after(0.05):
            async with factory.engine(make_ctx(1)):
                pass
        stats = factory.stats()
        assert (stats.create_errors, stats.created, stats.quota.in_use) == (1, 0, 0)
        assert len(calls) == 2
