"""
Per-user rate limits: the `RateLimiter` protocol, `RateLimitStats`, and the
process-local `LocalRateLimiter`.

The algorithm is GCRA (the generic cell rate algorithm, as in Redis Cell):
each key keeps one number, its *theoretical arrival time* (TAT), the time at
which its bucket would be empty again. A request at time *now* is admitted
when ``TAT - tolerance <= now`` and pushes the TAT one emission interval
(``1 / rate``) further; the tolerance, ``(burst - 1) / rate``, lets *burst*
requests through at once. A TAT in the past means the same as no TAT at all,
so a key's number is dropped once it is in the past: an idle user costs
nothing.

In any window of *w* seconds, at most ``floor(rate * w) + burst`` requests of
one key are admitted.
"""

from __future__ import annotations

import math
import threading
import time

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from .exceptions import RateLimitedError


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["LocalRateLimiter", "RateLimitStats", "RateLimiter", "check_rate"]

# The fewest keys kept before a sweep of those in the past.
_MIN_SWEEP = 64
# A nanosecond: the sums of float intervals round, and a request on time to
# the nanosecond is on time (else a burst could lose its last request).
_SLACK = 1e-9


@attrs.frozen
class RateLimitStats:
    """
    A snapshot of a rate limiter's counters, as this limiter object sees them.

    Attributes:
        admitted: Requests admitted since creation.
        limited: Requests refused with
            `usercontext.exceptions.RateLimitedError` since creation.
        keys: Keys with state in this process right now (a key whose bucket
            is full again has none; a shared backend keeps its state on its
            server and reports 0).
        rate: The sustained rate, in requests per second per key.
        burst: How many requests of one key are admitted at once.

    .. versionadded:: 0.1.0
    """

    admitted: int
    limited: int
    keys: int
    rate: float
    burst: int


@runtime_checkable
class RateLimiter(Protocol):
    """
    The contract of a per-key rate limiter: what `usercontext.Admission` and
    `usercontext.EngineFactory` rely on. `LocalRateLimiter` is the in-process
    backend; `usercontext.redis.RedisRateLimiter` shares the limit across
    processes through Redis.

    A limiter admits a request or refuses it at once; it never waits.

    .. versionadded:: 0.1.0
    """

    async def admit(self, key: str) -> None:
        """
        Admit one request of *key*, or refuse it.

        Raises:
            usercontext.exceptions.RateLimitedError: If *key* is over its
                rate; its *wait* says when a request would be admitted.
        """
        ...

    def stats(self) -> RateLimitStats:
        """
        Return a snapshot of the counters.
        """
        ...


def check_rate(rate: object, burst: object) -> None:
    """
    Refuse a *rate* that is not a finite number > 0 of requests per second,
    or a *burst* that is not an int of at least 1.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        msg = f"rate must be a number of requests per second, such as rate=10, got {rate!r}."
        raise TypeError(msg)
    if not 0 < rate < math.inf:
        msg = f"rate must be a finite number of requests per second > 0, got {rate!r}."
        raise ValueError(msg)
    if isinstance(burst, bool) or not isinstance(burst, int):
        msg = f"burst must be an int (requests admitted at once), got {burst!r}."
        raise TypeError(msg)
    if burst < 1:
        msg = f"burst must be at least 1 (requests admitted at once), got {burst!r}."
        raise ValueError(msg)


class LocalRateLimiter:
    """
    A per-key rate limit within one process: at most *rate* requests per
    second per key on average, and *burst* at once.

    It is GCRA, the algorithm of Redis Cell: each key with recent requests
    keeps one float, dropped once it lies in the past, so idle keys cost
    nothing. In any window of *w* seconds, at most ``floor(rate * w) +
    burst`` requests of one key are admitted. A refused request raises
    `usercontext.exceptions.RateLimitedError`, whose *wait* is the time
    until one would be admitted (its ``Retry-After``).

    Give it to `usercontext.Admission` as its *rate*, or call `admit_nowait`
    (or `admit`) yourself. It is thread-safe: threads (``with
    factory.engine()``) and event loops may share it.

    Args:
        rate: Requests per second per key, sustained.
        burst: Requests of one key admitted at once (at least 1).
        clock: A function giving the time in seconds; ``time.monotonic`` by
            default (tests pass a fake clock).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If *rate* is not a finite number > 0 or *burst* is
            below 1.

    >>> limiter = LocalRateLimiter(10, burst=2)
    >>> limiter.admit_nowait("u-1")
    >>> limiter.admit_nowait("u-1")
    >>> limiter.admit_nowait("u-1")
    Traceback (most recent call last):
    ...
    usercontext.exceptions.RateLimitedError: Too many requests for user 'u-1': ...

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, rate: float, *, burst: int = 1, clock: Callable[[], float] | None = None
    ) -> None:
        check_rate(rate, burst)
        if clock is not None and not callable(clock):
            msg = f"clock must be a function giving seconds, or None, got {clock!r}."  # type: ignore[unreachable]
            raise TypeError(msg)
        self._rate = float(rate)
        self._burst = burst
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) / rate
        self._clock = clock or time.monotonic
        self._tat: dict[str, float] = {}
        self._sweep_at = _MIN_SWEEP
        self._admitted = 0
        self._limited = 0
        self._lock = threading.Lock()

    @property
    def rate(self) -> float:
        """
        Requests per second per key, sustained.
        """
        return self._rate

    @property
    def burst(self) -> int:
        """
        Requests of one key admitted at once.
        """
        return self._burst

    def admit_nowait(self, key: str) -> None:
        """
        Admit one request of *key*, or refuse it; never waits.

        Raises:
            usercontext.exceptions.RateLimitedError: If *key* is over its rate.
        """
        now = self._clock()
        tats = self._tat
        with self._lock:
            tat = max(tats.get(key, now), now)
            wait = tat - self._tolerance - now
            if wait > _SLACK:
                self._limited += 1
                raise RateLimitedError(key, rate=self._rate, burst=self._burst, wait=wait)
            tats[key] = tat + self._interval
            self._admitted += 1
            if len(tats) >= self._sweep_at:
                self._sweep(now)

    async def admit(self, key: str) -> None:
        """
        Admit one request of *key*, or refuse it; never waits (the `RateLimiter`
        protocol's method: the same as `admit_nowait`).

        Raises:
            usercontext.exceptions.RateLimitedError: If *key* is over its rate.
        """
        self.admit_nowait(key)

    def stats(self) -> RateLimitStats:
        """
        Return a snapshot of the counters (dropping the keys that are idle again).
        """
        now = self._clock()
        with self._lock:
            self._sweep(now)
            keys = len(self._tat)
        return RateLimitStats(
            admitted=self._admitted,
            limited=self._limited,
            keys=keys,
            rate=self._rate,
            burst=self._burst,
        )

    def _sweep(self, now: float) -> None:
        """
        Drop the keys whose TAT is in the past; sweep again once the table
        has doubled, so the sweeps cost O(1) per request.
        """
        tats = self._tat
        for key in [key for key, tat in tats.items() if tat <= now]:
            del tats[key]
        self._sweep_at = max(_MIN_SWEEP, 2 * len(tats))

    def __repr__(self) -> str:
        return (
            f"<usercontext.LocalRateLimiter(rate={self._rate:g}, burst={self._burst}, "
            f"keys={len(self._tat)})>"
        )
