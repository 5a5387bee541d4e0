"""
`usercontext.LocalRateLimiter`: GCRA with a burst, per key, with a fake clock.

The property test drives arrival patterns through an `EngineFactory` with an
`Admission` policy, on asyncio and on trio, and checks the bound of every
window.
"""

from __future__ import annotations

import pickle

import anyio
import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import usercontext as uc

from helpers import make_ctx


class FakeClock:
    """
    A clock that moves only when told to.
    """

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class TestArguments:
    @pytest.mark.parametrize(
        ("args", "kwargs", "error", "match"),
        [
            (("10",), {}, TypeError, "rate must be a number of requests per second"),
            ((True,), {}, TypeError, "rate must be a number"),
            ((0,), {}, ValueError, "finite number of requests per second > 0"),
            ((float("inf"),), {}, ValueError, "finite"),
            ((float("nan"),), {}, ValueError, "finite"),
            ((10,), {"burst": 1.5}, TypeError, "burst must be an int"),
            ((10,), {"burst": 0}, ValueError, "burst must be at least 1"),
            ((10,), {"clock": 3}, TypeError, "clock must be a function"),
        ],
    )
    def test_bad(self, args, kwargs, error, match):
        """
        A bad setting raises at construction, naming the argument and what
        it accepts.
        """
        with pytest.raises(error, match=match):
            uc.LocalRateLimiter(*args, **kwargs)


class TestLocalRateLimiter:
    def test_burst_then_rate(self):
        """
        *burst* requests pass at once, the next is refused with the exact
        wait until one more would pass, and one passes after that wait.
        """
        clock = FakeClock()
        limiter = uc.LocalRateLimiter(4, burst=3, clock=clock)
        for _ in range(3):
            limiter.admit_nowait("u-1")
        with pytest.raises(uc.RateLimitedError) as caught:
            limiter.admit_nowait("u-1")
        e = caught.value
        assert (e.key, e.rate, e.burst) == ("u-1", 4.0, 3)
        assert e.wait == pytest.approx(0.25)
        assert e.retry_after == 1  # rounded up for the header
        assert e.status == 429
        assert e.error == "rate_limited"
        assert e.headers == {"Retry-After": "1"}
        assert isinstance(e, uc.TooManyRequestsError)
        assert "4 per second with bursts of 3" in str(e)
        limiter.admit_nowait("u-2")  # another key has its own bucket, idle again by the end
        clock.now += e.wait
        limiter.admit_nowait("u-1")
        with pytest.raises(uc.RateLimitedError):
            limiter.admit_nowait("u-1")
        assert limiter.stats() == uc.RateLimitStats(
            admitted=5, limited=2, keys=1, rate=4.0, burst=3
        )
        assert (limiter.rate, limiter.burst) == (4.0, 3)
        assert repr(limiter) == "<usercontext.LocalRateLimiter(rate=4, burst=3, keys=1)>"

    def test_idle_keys_cost_nothing(self):
        """
        A key whose bucket is full again keeps no state: a million users
        leave nothing once their time has passed, and the table never grows
        beyond twice the keys active since the last sweep.
        """
        clock = FakeClock()
        limiter = uc.LocalRateLimiter(1000, burst=1, clock=clock)
        most = 0
        for i in range(100_000):
            limiter.admit_nowait(f"u-{i}")
            clock.now += 0.0001  # each key is idle again 10 keys later
            most = max(most, len(limiter._tat))
        assert most <= 64
        clock.now += 1
        assert limiter.stats().keys == 0
        assert limiter.stats().admitted == 100_000

    def test_error_pickles(self):
        """
        The refusal crosses process boundaries with its attributes.
        """
        limiter = uc.LocalRateLimiter(1, clock=FakeClock())
        limiter.admit_nowait("u-1")
        with pytest.raises(uc.RateLimitedError) as caught:
            limiter.admit_nowait("u-1")
        copy = pickle.loads(pickle.dumps(caught.value))  # noqa: S301  # our own pickle
        assert (copy.key, copy.wait, copy.retry_after) == ("u-1", 1.0, 1)

    async def test_protocol(self):
        """
        It is a `RateLimiter`, and its coroutine admits as `admit_nowait` does.
        """
        limiter = uc.LocalRateLimiter(1, clock=FakeClock())
        assert isinstance(limiter, uc.RateLimiter)
        await limiter.admit("u-1")
        with pytest.raises(uc.RateLimitedError):
            await limiter.admit("u-1")


arrivals = st.lists(
    st.tuples(
        st.sampled_from(["u-1", "u-2"]),
        # The gap before each arrival, in emission intervals: bursts (0), exact
        # intervals (1) and everything between.
        st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 3, allow_nan=False)),
    ),
    min_size=1,
    max_size=120,
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.floats(0.5, 500, allow_nan=False),
    burst=st.integers(1, 12),
    pattern=arrivals,
)
def test_never_more_than_rate_times_window_plus_burst(backend, rate, burst, pattern):
    """
    Whatever the arrival pattern, an `EngineFactory` whose admission has a
    rate limit never creates more engines for one user, in any window of *w*
    seconds, than ``rate * w + burst``; every refused request is refused by
    the limit alone (a retry after its *wait* is admitted), and requests
    spaced one interval apart are all admitted.
    """
    clock = FakeClock()
    limiter = uc.LocalRateLimiter(rate, burst=burst, clock=clock)
    factory = uc.EngineFactory(
        lambda ctx: ctx.user_id, per_user=1, admission=uc.Admission(rate=limiter)
    )
    admitted: dict[str, list[float]] = {"u-1": [], "u-2": []}
    ctxs = {user: make_ctx(user[2:]) for user in admitted}
    probes = 0

    async def run():
        nonlocal probes
        for user, gap in pattern:
            clock.now += gap / rate
            try:
                async with factory.engine(ctxs[user]) as engine:
                    assert engine == user
            except uc.RateLimitedError as e:
                wait = e.wait
            else:
                admitted[user].append(clock.now)
                continue
            assert wait > 0
            # The wait is exact: a moment earlier is still refused.
            if wait > 1e-6:
                probes += 1
                limiter._clock = lambda wait=wait: clock.now + wait - 1e-7
                with pytest.raises(uc.RateLimitedError):
                    limiter.admit_nowait(user)
                limiter._clock = clock

    anyio.run(run, backend=backend)
    for times in admitted.values():
        # Over every pair of admissions (times are sorted, and equal ones
        # are all counted by the pair of the first and the last), the window
        # from one to the other holds at most rate * window + burst.
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                inside = j - i + 1
                assert inside <= rate * (times[j] - start) + burst + 1e-6, (start, times[j])
    stats = factory.stats()
    assert stats.created == sum(map(len, admitted.values()))
    assert stats.admission is not None
    assert stats.admission.rate is not None
    assert stats.admission.rate.admitted == stats.created
    assert stats.admission.rate.limited == len(pattern) - stats.created + probes


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=50, deadline=None)
@given(rate=st.floats(0.5, 500, allow_nan=False), burst=st.integers(1, 12), n=st.integers(1, 60))
def test_spaced_requests_all_pass(backend, rate, burst, n):
    """
    Requests one emission interval apart (or more) are never refused, and a
    burst of *burst* at once after an idle spell passes whole.
    """
    clock = FakeClock()
    limiter = uc.LocalRateLimiter(rate, burst=burst, clock=clock)

    async def run():
        for _ in range(burst):
            await limiter.admit("u-1")
        clock.now += burst / rate + 1e-9
        for _ in range(n):
            clock.now += 1 / rate + 1e-9
            await limiter.admit("u-1")

    anyio.run(run, backend=backend)
    assert limiter.stats().limited == 0
