"""
Admission control for `EngineFactory`: the `Admission` policy, load shedding
(`Shed`) and the circuit breaker on engine creation (`CircuitBreaker`).

The rate limiters are in `_rate`. An `EngineFactory` without an admission
policy never reaches this module: its hot path checks one attribute.
"""

from __future__ import annotations

import math
import threading
import time

from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from . import _checks
from ._rate import RateLimiter, RateLimitStats
from .exceptions import CircuitOpenError, LoadShedError, QuotaTimeoutError


if TYPE_CHECKING:
    from collections.abc import Callable

    from ._quota import Lease


__all__ = [
    "Admission",
    "AdmissionStats",
    "BreakerStats",
    "CircuitBreaker",
    "Shed",
    "ShedStats",
    "admit",
]

# The weight of a new waiter in what the shed policy learnt of how long a
# slot is held.
_ALPHA = 0.1
# The fewest per-user breaker states kept before a sweep of the idle ones.
_MIN_SWEEP = 64


def _clock(clock: Callable[[], float] | None) -> Callable[[], float]:
    if clock is not None and not callable(clock):
        msg = f"clock must be a function giving seconds, or None, got {clock!r}."  # type: ignore[unreachable]
        raise TypeError(msg)
    return clock or time.monotonic


@attrs.frozen
class ShedStats:
    """
    A snapshot of a `Shed` policy's counters.

    Attributes:
        waiting: Requests waiting for an engine slot right now.
        peak_waiting: The most requests that waited at once.
        shed: Requests refused at once since creation, for any reason (the
            sum of the three below).
        user_queue: Refused because their user's queue was full.
        queue: Refused because the global queue was full.
        deadline: Refused because the expected wait exceeded what the
            request could wait.
        hold: How long a slot is held, in seconds, as learnt from how long
            requests waited (a running mean), or `None` before the first
            request that waited.

    .. versionadded:: 0.1.0
    """

    waiting: int
    peak_waiting: int
    shed: int
    user_queue: int
    queue: int
    deadline: int
    hold: float | None


class Shed:
    """
    Load shedding: refuse a request at once, instead of queueing it for an
    engine slot, when waiting is pointless.

    A request that finds no free slot is refused with
    `usercontext.exceptions.LoadShedError` when its user already has
    *max_waiting_per_user* requests waiting (``reason="user_queue"``, a
    ``429``), when *max_waiting* requests wait in all (``"queue"``, a
    ``503``), or, with *deadline* on, when the wait it can expect exceeds what
    it can wait (``"deadline"``, a ``503``): the factory's *timeout*, or the
    caller's own deadline (the nearest enclosing ``anyio.fail_after`` or
    ``move_on_after``), whichever is sooner; in a thread (``with
    factory.engine()``), the factory's *timeout*. The expected wait is the
    requests ahead (and itself), divided by the slots they wait for, times
    how long a slot is held, which the policy learns from how long the
    requests that waited did wait (it sheds by deadline once one has; with a
    network quota, such as `usercontext.redis.RedisQuota`, once one waited
    its whole timeout, and a request counts as waiting from the start of its
    round trip). Its ``Retry-After`` is that expected wait, and at least
    *retry_after*.

    A request that gets a slot at once is never shed, and a shed request
    changes no counter of the quota. Under a spike, the admitted requests
    keep their latency: the queue stays short instead of growing.

    Args:
        max_waiting_per_user: The most requests of one user waiting for a
            slot, or `None`.
        max_waiting: The most requests waiting in all, or `None`.
        deadline: Whether to refuse requests that cannot get a slot in time.
        retry_after: The least ``Retry-After`` of a refusal, in seconds.
        clock: A function giving seconds; ``time.monotonic`` by default.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a bound is negative or *retry_after* is not > 0.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        max_waiting_per_user: int | None = None,
        max_waiting: int | None = None,
        deadline: bool = True,
        retry_after: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        for name, value in (
            ("max_waiting_per_user", max_waiting_per_user),
            ("max_waiting", max_waiting),
        ):
            if value is not None:
                _checks.count(name, value, minimum=0)
        if type(deadline) is not bool:
            msg = f"deadline must be True or False, got {deadline!r}."  # type: ignore[unreachable]
            raise TypeError(msg)
        _checks.seconds("retry_after", retry_after)
        self._max_user = max_waiting_per_user
        self._max = max_waiting
        self._deadline = deadline
        self._retry_after = retry_after
        self.clock: Callable[[], float] = _clock(clock)
        self._waiting: dict[str, int] = {}
        self._n_waiting = 0
        self._peak = 0
        self._hold: float | None = None
        self._waited = self._shares = 0.0  # decayed sums, for _hold
        self._by_reason = {"user_queue": 0, "queue": 0, "deadline": 0}
        # Requests of threads (``with factory.engine()``) and of an event
        # loop may count in at once.
        self._lock = threading.Lock()

    def stats(self) -> ShedStats:
        """
        Return a snapshot of the counters.
        """
        with self._lock:
            by = dict(self._by_reason)
            waiting, peak, hold = self._n_waiting, self._peak, self._hold
        return ShedStats(
            waiting=waiting,
            peak_waiting=peak,
            shed=sum(by.values()),
            user_queue=by["user_queue"],
            queue=by["queue"],
            deadline=by["deadline"],
            hold=hold,
        )

    def _enter(
        self, key: str, budget: float, per_key: int | None, total: int | None
    ) -> tuple[float, float]:
        """
        Count a request of *key* that must wait for a slot, or refuse it; it
        can wait *budget* seconds (`math.inf`: as long as it takes). Return
        its ticket for `_leave`: when it began to wait, and the share of a
        slot's hold time it expects to wait (0 when unknown).
        """
        with self._lock:
            mine = self._waiting.get(key, 0)
            n = self._n_waiting
            share = 0.0
            if per_key:
                share = (mine + 1) / per_key
            if total:
                share = max(share, (n + 1) / total)
            hold = self._hold
            expected = 0.0 if hold is None else share * hold
            if self._max_user is not None and mine >= self._max_user:
                self._refuse(key, "user_queue", mine, expected)
            if self._max is not None and n >= self._max:
                self._refuse(key, "queue", n, expected)
            if self._deadline and expected > max(budget, 0.0):
                self._refuse(key, "deadline", max(mine, n), expected)
            self._waiting[key] = mine + 1
            n = self._n_waiting = n + 1
            if n > self._peak:  # noqa: PLR1730  # the style of the quota's counters
                self._peak = n
            return self.clock(), share

    def _budget(self, timeout: float | None) -> float:
        """
        How long a request of an event loop can wait: the factory's
        *timeout*, or the caller's own deadline, whichever is sooner.
        """
        budget = math.inf if timeout is None else timeout
        deadline = anyio.current_effective_deadline()
        if deadline < math.inf:
            budget = min(budget, deadline - anyio.current_time())
        return budget

    def _leave(self, key: str, ticket: tuple[float, float], *, learn: bool) -> None:
        """
        Count out a request of *key* that stopped waiting; with *learn* (it
        was granted a slot, or waited its whole timeout), learn from how long
        it waited how long a slot is held: it expected to wait its share of
        one hold.
        """
        began, share = ticket
        now = self.clock() if learn and share else 0.0
        with self._lock:
            mine = self._waiting[key] - 1
            if mine:
                self._waiting[key] = mine
            else:
                del self._waiting[key]
            self._n_waiting -= 1
            if learn and share:
                # The ratio of decayed sums, waited over shares: a waiter first
                # in line may wait long by chance, and a ratio per waiter would
                # let it weigh as much as a whole queue's worth of waiting.
                keep = 1 - _ALPHA
                self._waited = self._waited * keep + (now - began)
                self._shares = self._shares * keep + share
                self._hold = self._waited / self._shares

    def _refuse(self, key: str, reason: str, waiting: int, expected: float) -> None:
        self._by_reason[reason] += 1
        raise LoadShedError(
            key,
            reason=reason,
            waiting=waiting,
            expected_wait=expected,
            retry_after=max(self._retry_after, expected),
        )

    def __repr__(self) -> str:
        return (
            f"<usercontext.Shed(max_waiting_per_user={self._max_user!r}, "
            f"max_waiting={self._max!r}, deadline={self._deadline!r}, "
            f"waiting={self._n_waiting})>"
        )


@attrs.frozen
class BreakerStats:
    """
    A snapshot of a `CircuitBreaker`'s counters.

    Attributes:
        state: ``"closed"``, ``"open"`` or ``"half_open"`` (open, with its
            cool-down over: the next creation is a probe); with *per_user*,
            that of the breaker with the most recent change, or
            ``"closed"`` when no user's is open.
        open: Breakers open right now (0 or 1 without *per_user*).
        opened: How many times a breaker opened.
        refused: Requests refused at once because a breaker was open.
        probes: Creations let through as probes.
        failures: Failed creations the breaker counted.

    .. versionadded:: 0.1.0
    """

    state: str
    open: int
    opened: int
    refused: int
    probes: int
    failures: int


class _Circuit:
    """
    The state of one breaker: the recent failures while closed, when it
    opened, and whether a probe is out.
    """

    __slots__ = ("failed", "opened_at", "probing")

    def __init__(self) -> None:
        self.failed: deque[float] = deque()
        self.opened_at: float | None = None
        self.probing = False


class CircuitBreaker:
    """
    A circuit breaker on engine creation: after *failures* failed calls of
    the factory's *create* within *within* seconds, the factory stops
    calling it and refuses at once with
    `usercontext.exceptions.CircuitOpenError` (a ``503`` with
    ``Retry-After``). Once *cool_down* seconds have passed, it lets one
    creation through as a probe (the others are still refused): if the probe
    succeeds the breaker closes, if it fails the breaker opens for another
    cool-down.

    There is one breaker per factory (an engine type), or with *per_user*
    one per user, so that a user whose engines fail (a bad configuration of
    theirs) does not shut the engine off for everyone; per-user breakers
    that are closed and have no recent failure leave no state behind.

    Only *create* raising an `Exception` counts as a failure; a request
    cancelled while creating is no verdict either way.

    Args:
        failures: Failures within *within* seconds that open the breaker.
        within: The window failures are counted in, in seconds.
        cool_down: Seconds the breaker stays open before a probe.
        per_user: One breaker per user instead of one per factory.
        clock: A function giving seconds; ``time.monotonic`` by default.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If *failures* is below 1, or a time is not > 0.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        failures: int = 5,
        within: float = 10.0,
        cool_down: float = 5.0,
        per_user: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        _checks.count("failures", failures, minimum=1)
        _checks.seconds("within", within)
        _checks.seconds("cool_down", cool_down)
        if type(per_user) is not bool:
            msg = f"per_user must be True or False, got {per_user!r}."  # type: ignore[unreachable]
            raise TypeError(msg)
        self._failures = failures
        self._within = within
        self._cool_down = cool_down
        self._per_user = per_user
        self.clock: Callable[[], float] = _clock(clock)
        self.engine: str = "these"  # the factory's create, once attached
        self._circuits: dict[str | None, _Circuit] = {}
        self._sweep_at = _MIN_SWEEP
        self._last = "closed"
        self._opened = 0
        self._refused = 0
        self._probes = 0
        self._failed = 0
        # Creations in threads (``with factory.engine()``) and on an event
        # loop may end at once.
        self._lock = threading.Lock()

    def stats(self) -> BreakerStats:
        """
        Return a snapshot of the counters.
        """
        now = self.clock()
        with self._lock:
            self._sweep(now)
            open_ = [c for c in self._circuits.values() if c.opened_at is not None]
            if not self._per_user:
                state = self._state(self._circuits.get(None), now)
            else:
                state = self._last if open_ else "closed"
            return BreakerStats(
                state=state,
                open=len(open_),
                opened=self._opened,
                refused=self._refused,
                probes=self._probes,
                failures=self._failed,
            )

    def _state(self, circuit: _Circuit | None, now: float) -> str:
        if circuit is None or circuit.opened_at is None:
            return "closed"
        return "open" if now < circuit.opened_at + self._cool_down else "half_open"

    def _check(self, key: str) -> None:
        """
        Refuse a request of *key* at once if its breaker is open and no probe
        may go now; it may still be refused when it reaches *create*.
        """
        k = key if self._per_user else None
        circuit = self._circuits.get(k)
        if circuit is None or circuit.opened_at is None:
            return  # closed: no lock taken
        now = self.clock()
        with self._lock:
            # Again under the lock: a probe may have closed it meanwhile.
            circuit = self._circuits.get(k)
            if circuit is not None and circuit.opened_at is not None:
                self._gate(circuit, key, now)

    def _gate(self, circuit: _Circuit, key: str, now: float) -> None:
        opened_at = circuit.opened_at
        assert opened_at is not None  # noqa: S101  # called for an open breaker
        left = opened_at + self._cool_down - now
        if left > 0 or circuit.probing:
            self._refused += 1
            raise CircuitOpenError(
                self.engine,
                key=key if self._per_user else None,
                failures=self._failures,
                within=self._within,
                retry_after=left if left > 0 else self._cool_down,
            )

    def _start(self, key: str) -> bool:
        """
        Say whether a creation for *key* may go, as a probe (`True`) or in
        the closed state (`False`); refuse it if its breaker is open.
        """
        now = self.clock()
        with self._lock:
            circuit = self._circuits.get(key if self._per_user else None)
            if circuit is None or circuit.opened_at is None:
                return False
            # Checked and set under the lock: one probe at a time.
            self._gate(circuit, key, now)
            circuit.probing = True
            self._probes += 1
            self._last = "half_open"
            return True

    def _done(self, key: str, *, probe: bool, ok: bool | None) -> None:
        """
        Record how a creation for *key* ended: *ok* `True` (created), `False`
        (*create* raised) or `None` (cancelled: no verdict).
        """
        now = self.clock()
        with self._lock:
            self._record(key if self._per_user else None, now, probe=probe, ok=ok)

    def _record(self, k: str | None, now: float, *, probe: bool, ok: bool | None) -> None:
        circuit = self._circuits.get(k)
        if probe and circuit is not None:
            circuit.probing = False
            if ok:
                del self._circuits[k]  # closed, with no failure on record
                self._last = "closed"
        if ok is not False:
            return
        self._failed += 1
        if circuit is None:
            if len(self._circuits) >= self._sweep_at:
                self._sweep(now)  # before the new state, which is idle until it counts
            circuit = self._circuits[k] = _Circuit()
        if probe:
            self._open(circuit, now)
        elif circuit.opened_at is None:  # else it began before the breaker opened
            failed = circuit.failed
            failed.append(now)
            while failed[0] <= now - self._within:
                failed.popleft()
            if len(failed) >= self._failures:
                failed.clear()
                self._open(circuit, now)

    def _open(self, circuit: _Circuit, now: float) -> None:
        circuit.opened_at = now
        self._opened += 1
        self._last = "open"

    def _sweep(self, now: float) -> None:
        """
        Drop the states that say nothing any more: closed with no failure
        within the window, or open with no probe out for longer than a
        cool-down and a window (the next creation is a probe either way).
        """
        circuits = self._circuits
        for key in [k for k, c in circuits.items() if self._idle(c, now)]:
            del circuits[key]
        self._sweep_at = max(_MIN_SWEEP, 2 * len(circuits))

    def _idle(self, circuit: _Circuit, now: float) -> bool:
        if circuit.opened_at is None:
            return not circuit.failed or circuit.failed[-1] <= now - self._within
        return (
            self._per_user
            and not circuit.probing
            and now >= circuit.opened_at + self._cool_down + self._within
        )

    def __repr__(self) -> str:
        return (
            f"<usercontext.CircuitBreaker(failures={self._failures}, within={self._within:g}, "
            f"cool_down={self._cool_down:g}, per_user={self._per_user!r})>"
        )


@attrs.frozen
class AdmissionStats:
    """
    A snapshot of an `Admission` policy's counters: each part's, or `None`
    for a part the policy does not have.

    Attributes:
        rate: The rate limiter's.
        shed: The shedding policy's.
        breaker: The circuit breaker's.

    .. versionadded:: 0.1.0
    """

    rate: RateLimitStats | None
    shed: ShedStats | None
    breaker: BreakerStats | None


class Admission:
    """
    The admission policy of an `EngineFactory`: which requests it takes on,
    checked before anything is queued or created.

    ``EngineFactory(create, admission=Admission(rate=..., shed=..., breaker=...))``
    checks, for each request of ``async with factory.engine(ctx)``, in order:

    1. the *rate* limit of ``ctx.user_id`` (a `RateLimiter`, such as
       `LocalRateLimiter` or `usercontext.redis.RedisRateLimiter`): over it,
       `usercontext.exceptions.RateLimitedError` (``429``);
    2. the *breaker* (`CircuitBreaker`): open, `usercontext.exceptions.CircuitOpenError`
       (``503``);
    3. if no slot of the quota is free, the *shed* policy (`Shed`): waiting
       would be pointless, `usercontext.exceptions.LoadShedError` (``429`` or
       ``503``).

    Every refusal carries ``retry_after``, which the web adapters send as
    ``Retry-After``. A request refused changes no counter of the quota and
    creates nothing. The policy's counters are in the factory's stats
    (`FactoryStats.admission`).

    One policy serves one factory (its breaker and shed counters are that
    factory's); a rate limiter may be shared by several policies. The policy
    applies to ``async with factory.engine()`` and to the threads' ``with``
    alike, with the same errors and counters; each part is thread-safe. In
    a thread, the rate limiter must have a sync ``admit_nowait(key)``, as
    `LocalRateLimiter` has, and the *shed* policy's deadline is the
    factory's *timeout* (a thread has no other).

    Args:
        rate: The per-user rate limit, or `None`.
        shed: The load shedding policy, or `None`.
        breaker: The circuit breaker on *create*, or `None`.

    Raises:
        TypeError: If a part is not of its kind.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        rate: RateLimiter | None = None,
        shed: Shed | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if rate is not None and not isinstance(rate, RateLimiter):
            msg = (  # type: ignore[unreachable]  # checked for untyped callers
                f"rate must be a rate limiter, such as usercontext.LocalRateLimiter(10, "
                f"burst=20), or None, got {rate!r}."
            )
            raise TypeError(msg)
        if shed is not None and not isinstance(shed, Shed):
            msg = f"shed must be a usercontext.Shed(...) or None, got {shed!r}."  # type: ignore[unreachable]
            raise TypeError(msg)
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            msg = f"breaker must be a usercontext.CircuitBreaker(...) or None, got {breaker!r}."  # type: ignore[unreachable]
            raise TypeError(msg)
        self.rate: RateLimiter | None = rate
        self.shed: Shed | None = shed
        self.breaker: CircuitBreaker | None = breaker
        self._owner: object = None

    def stats(self) -> AdmissionStats:
        """
        Return a snapshot of every part's counters.
        """
        return AdmissionStats(
            rate=None if self.rate is None else self.rate.stats(),
            shed=None if self.shed is None else self.shed.stats(),
            breaker=None if self.breaker is None else self.breaker.stats(),
        )

    def _attach(self, owner: object, engine: str) -> None:
        """
        Make this policy *owner*'s, whose engines are called *engine*.
        """
        if self._owner is not None:
            msg = (
                f"This Admission already serves {self._owner!r}: give each EngineFactory "
                "its own Admission (a rate limiter may be shared between them)."
            )
            raise ValueError(msg)
        self._owner = owner
        if self.breaker is not None:
            self.breaker.engine = engine

    async def _enter(self, key: str) -> None:
        """
        Check the rate limit and the breaker for a request of *key*.
        """
        if self.rate is not None:
            await self.rate.admit(key)
        if self.breaker is not None:
            self.breaker._check(key)

    def __repr__(self) -> str:
        parts = [
            name
            for name, part in (("rate", self.rate), ("shed", self.shed), ("breaker", self.breaker))
            if part is not None
        ]
        return f"<usercontext.Admission({', '.join(parts) or 'nothing'})>"


def limits(quota: Any, key: str) -> tuple[int | None, int | None]:
    """
    The per-key and total limits of *quota* for *key*, as far as it tells
    them (`LocalQuota` and `usercontext.redis.RedisQuota` do).
    """
    limit = getattr(quota, "_limit", None)
    per_key = limit(key) if callable(limit) else getattr(quota, "_per_key", None)
    total = getattr(quota, "_total", None)
    return (
        per_key if type(per_key) is int else None,
        total if type(total) is int else None,
    )


async def admit(factory: Any, gate: Admission, key: str) -> Lease | None:
    """
    Check the policy *gate* for a request of *key* of *factory*, then take a
    slot of the factory's quota: return its lease, or `None` for a slot of a
    `LocalQuota`, held by key.
    """
    await gate._enter(key)
    quota = factory._quota
    timeout = factory._timeout
    # A request that may not wait is refused by the quota itself.
    shed = gate.shed if timeout is None or timeout > 0 else None
    if factory._local_quota:
        if quota._take_now(key):
            return None  # a free slot: never shed
        if shed is None:
            await quota._wait(key, timeout)
            return None
        ticket = shed._enter(key, shed._budget(timeout), *limits(quota, key))
        try:
            await quota._wait(key, timeout)
        except QuotaTimeoutError:
            shed._leave(key, ticket, learn=True)
            raise
        except BaseException:
            shed._leave(key, ticket, learn=False)
            raise
        shed._leave(key, ticket, learn=True)
        return None
    if shed is None:
        return await quota.acquire(key, timeout=timeout)  # type: ignore[no-any-return]
    # A network quota tells whether a slot is free only after its round
    # trip: the request counts as waiting from its start, and only a request
    # that waited its whole timeout surely waited, to learn from.
    ticket = shed._enter(key, shed._budget(timeout), *limits(quota, key))
    try:
        lease = await quota.acquire(key, timeout=timeout)
    except QuotaTimeoutError:
        shed._leave(key, ticket, learn=True)
        raise
    except BaseException:
        shed._leave(key, ticket, learn=False)
        raise
    shed._leave(key, ticket, learn=False)
    return lease  # type: ignore[no-any-return]
