"""
`RedisRateLimiter`: the `usercontext.RateLimiter` protocol on Redis, so that a
user's rate limit holds across processes and hosts.

One Lua script, GCRA as in Redis Cell: each user with recent requests has
one key holding its theoretical arrival time (TAT) in microseconds on the
Redis server's clock, which expires when the TAT passes, so an idle user
leaves nothing behind.
"""

# redis-py's asyncio client types Redis.from_url with untyped **kwargs.
# pyright: reportUnknownMemberType=false

from __future__ import annotations

import logging

from typing import TYPE_CHECKING, Literal

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from usercontext import _checks
from usercontext._rate import LocalRateLimiter, RateLimitStats, check_rate
from usercontext.exceptions import BackendUnavailableError, RateLimitedError

from . import _client
from ._quota_keeper import DOWN, within


if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self


__all__ = ["RedisRateLimiter"]

_logger = logging.getLogger("usercontext")

# The settings (emission interval and tolerance, in microseconds) are written
# into the text, so a call sends only the key. A reply of 0 admits; any other
# is the wait in microseconds.
_SCRIPT = r"""
local T = %(interval)d
local TAU = %(tolerance)d
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - TAU - now
if wait > 0 then return wait end
local new = tat + T
redis.call('SET', KEYS[1], string.format('%%d', new), 'PX', math.ceil((new - now) / 1000))
return 0
"""


class RedisRateLimiter:
    """
    A per-key rate limit shared through Redis by every process and host that
    uses the same Redis and *prefix*: at most *rate* requests per second per
    key on average, and *burst* at once.

    It is the algorithm of `usercontext.LocalRateLimiter` (GCRA, as in Redis
    Cell), run by one Lua script on the Redis server's clock, so processes
    whose clocks disagree share one limit. A key's state is one string that
    expires as soon as the key's bucket is full again. Each `admit` is one
    round trip. Use the same *rate*, *burst* and *prefix* in every process.

    **When Redis is unavailable** (no answer within *backend_timeout*),
    *on_unavailable* decides: ``"fail_closed"`` (the default) raises
    `usercontext.exceptions.BackendUnavailableError` (a ``503``),
    ``"fail_open"`` logs a warning and limits per process, with a
    `usercontext.LocalRateLimiter` of the same settings, until Redis answers.

    Args:
        redis: A ``redis.asyncio.Redis`` client (yours: it is not closed), or
            a URL such as ``"redis://localhost:6379/0"`` (the limiter makes
            the client and closes it in `aclose`).
        rate: Requests per second per key, sustained.
        burst: Requests of one key admitted at once (at least 1).
        prefix: The prefix of every key of the limiter.
        on_unavailable: ``"fail_closed"`` or ``"fail_open"``, as above.
        backend_timeout: Seconds each call may take before Redis counts as
            unavailable.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If a number is out of range, *prefix* is empty, or
            *on_unavailable* is not one of the two policies.

    .. versionadded:: 0.1.0
    """

    def __init__(  # noqa: PLR0913  # keyword-only settings, each checked and documented
        self,
        redis: Redis | str,
        *,
        rate: float,
        burst: int = 1,
        prefix: str = "usercontext:rate",
        on_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed",
        backend_timeout: float = 0.25,
    ) -> None:
        check_rate(rate, burst)
        if not isinstance(prefix, str):
            msg = f"prefix must be a non-empty str, got {prefix!r}."  # type: ignore[unreachable]  # checked for untyped callers
            raise TypeError(msg)
        if not prefix:
            msg = f"prefix must be a non-empty str, got {prefix!r}."
            raise ValueError(msg)
        if on_unavailable not in ("fail_closed", "fail_open"):
            msg = f"on_unavailable must be 'fail_closed' or 'fail_open', got {on_unavailable!r}."
            raise ValueError(msg)
        _checks.seconds("backend_timeout", backend_timeout)
        if isinstance(redis, str):
            client: Redis = _client.from_url(redis, backend_timeout)
            self._owned = True
        elif isinstance(redis, Redis):
            client = redis
            self._owned = False
        else:
            msg = (  # type: ignore[unreachable]  # checked for untyped callers
                "redis must be a redis.asyncio.Redis client or a URL such as "
                f"'redis://localhost:6379/0', got {redis!r}."
            )
            raise TypeError(msg)
        self._client = client
        self._rate = float(rate)
        self._burst = burst
        self._prefix = prefix + ":"
        self._timeout = backend_timeout
        self._fail_open = on_unavailable == "fail_open"
        interval = round(1_000_000 / rate)
        self._script = client.register_script(
            _SCRIPT % {"interval": interval, "tolerance": (burst - 1) * interval}
        )
        self._fallback: LocalRateLimiter | None = None
        self._admitted = 0
        self._limited = 0
        self._unavailable = 0

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

    async def admit(self, key: str) -> None:
        """
        Admit one request of *key*, or refuse it, in one round trip.

        Raises:
            usercontext.exceptions.RateLimitedError: If *key* is over its rate.
            usercontext.exceptions.BackendUnavailableError: If Redis did not
                answer in time and *on_unavailable* is ``"fail_closed"``.
        """
        try:
            wait = await self._call(key)
        except DOWN as e:
            self._unavailable += 1
            if not self._fail_open:
                msg = (
                    f"Redis did not answer the rate limiter within {self._timeout:g} s, so the "
                    "request was refused (on_unavailable='fail_closed'). Retry shortly, or "
                    "pass on_unavailable='fail_open' to limit per process meanwhile."
                )
                raise BackendUnavailableError(msg) from e
            fallback = self._fallback
            if fallback is None:
                _logger.warning(
                    "Redis did not answer the rate limiter: limiting per process until it does."
                )
                fallback = self._fallback = LocalRateLimiter(self._rate, burst=self._burst)
            try:
                fallback.admit_nowait(key)
            except RateLimitedError:
                self._limited += 1
                raise
            self._admitted += 1
            return
        self._fallback = None
        if wait:
            self._limited += 1
            raise RateLimitedError(key, rate=self._rate, burst=self._burst, wait=wait / 1e6)
        self._admitted += 1

    async def _call(self, key: str) -> int:
        """
        Run the script for *key* within *backend_timeout*, loading it on
        ``NOSCRIPT``; return the wait in microseconds (0: admitted).
        """
        name = self._prefix + key
        script = self._script
        client = self._client
        async with within(self._timeout):
            try:
                return int(await client.evalsha(script.sha, 1, name))
            except NoScriptError:
                # Redis restarted, or its scripts were flushed: load it again.
                await client.script_load(script.script)
                return int(await client.evalsha(script.sha, 1, name))

    def stats(self) -> RateLimitStats:
        """
        Return a snapshot of the counters of this object (its keys live in
        Redis: `usercontext.RateLimitStats.keys` is 0).
        """
        return RateLimitStats(
            admitted=self._admitted,
            limited=self._limited,
            keys=0,
            rate=self._rate,
            burst=self._burst,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """
        Close the Redis client, if the limiter made it from a URL.
        """
        if self._owned:
            await self._client.aclose()

    def __repr__(self) -> str:
        return (
            f"<usercontext.redis.RedisRateLimiter(rate={self._rate:g}, burst={self._burst}, "
            f"prefix={self._prefix[:-1]!r})>"
        )
