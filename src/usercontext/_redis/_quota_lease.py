"""
The lease of a `usercontext.redis.RedisQuota` and its Redis-specific stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from usercontext._quota import Lease, LosableLease, _new_lease


if TYPE_CHECKING:
    from ._quota import RedisQuota


__all__ = ["RedisLease", "RedisQuotaStats"]


class RedisLease(LosableLease):
    """
    One slot of a `usercontext.redis.RedisQuota`: a lease in Redis, renewed
    by the quota's background task while it is held.

    Release it with ``await lease.arelease()`` (a round trip, which a
    cancellation of the caller does not interrupt) or by leaving ``async
    with``. If the quota finds it lost (it expired while its holder was
    paused past its time to live), `lost` turns true, the body of ``async
    with`` it is cancelled and `usercontext.exceptions.LeaseLostError` is
    raised in its place.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_fence", "_id", "_local")

    _quota: RedisQuota | None  # pyright: ignore[reportIncompatibleVariableOverride]
    _id: str
    _fence: int | None
    _local: Lease | None

    @property
    def fence(self) -> int | None:
        """
        This grant's fencing token, a number that grows with every grant of
        the key's hash tag (per user without a total limit, for the
        whole quota with one), so a resource that remembers the highest
        token it saw can refuse a holder whose lease was lost and granted
        again since. `None` for a lease granted by the process-local
        fallback while Redis was unavailable (``on_unavailable="fail_open"``).
        """
        return self._fence

    async def arelease(self) -> None:
        """
        Hand the slot back to the quota (a round trip); further calls do
        nothing. It is never lost to a cancellation of the caller.
        """
        quota = self._quota
        if quota is not None:
            await quota.arelease(self)

    def __repr__(self) -> str:
        state = "released" if self._quota is None else ("lost" if self._lost else "held")
        return f"<usercontext.redis.RedisLease(key={self._key!r}, fence={self._fence!r}, {state})>"


def new_lease(quota: RedisQuota, key: str, lease_id: str, fence: int | None) -> RedisLease:
    """
    Make the `RedisLease` of a slot *quota* granted, bypassing the refusing
    ``__init__``.
    """
    lease: RedisLease = _new_lease(RedisLease)
    lease._quota = quota
    lease._key = key
    lease._id = lease_id
    lease._fence = fence
    lease._local = None
    lease._init_losable()
    return lease


@attrs.frozen
class RedisQuotaStats:
    """
    What a `usercontext.redis.RedisQuota` did with Redis, beside the
    `usercontext.QuotaStats` of `RedisQuota.stats`.

    Attributes:
        available: Whether Redis is used right now (`False` while the
            quota serves from its process-local fallback).
        lost: Leases found expired while held (their holder paused past the
            time to live); their bodies were cancelled.
        fallbacks: Requests served by the process-local fallback quota while
            Redis was unavailable (``on_unavailable="fail_open"``).
        outages: Times Redis was found unavailable and the quota switched to
            its fallback.
        wakeups: Wake-up messages received: slots handed to this process's
            waiters by a release in any process.
        renewals: Rounds of the background task renewing leases and
            waiters (one round trip each).
        script_loads: Times a script was loaded again after Redis answered
            ``NOSCRIPT`` (a restarted server or ``SCRIPT FLUSH``).
        acquire_errors: Requests refused with
            `usercontext.exceptions.BackendUnavailableError`.
        release_errors: Releases that did not reach Redis (the slot comes
            back when its lease expires).
        renew_errors: Renewal rounds that did not reach Redis.

    .. versionadded:: 0.1.0
    """

    available: bool
    lost: int
    fallbacks: int
    outages: int
    wakeups: int
    renewals: int
    script_loads: int
    acquire_errors: int
    release_errors: int
    renew_errors: int
