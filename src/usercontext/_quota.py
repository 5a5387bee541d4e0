"""
The contract of per-key and global limits on concurrent work: the `Quota`
protocol a backend implements, the `Lease` of one slot, and `QuotaStats`.

The in-process quotas, `LocalQuota` and `ThreadQuota`, are in `_local_quota`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import sys

from typing import TYPE_CHECKING, Any, NoReturn, Protocol, SupportsIndex, runtime_checkable

import attrs

from .exceptions import LeaseLostError


if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping
    from types import TracebackType

    from typing_extensions import Self


__all__ = ["Lease", "LosableLease", "Quota", "QuotaStats"]

_logger = logging.getLogger("usercontext")
# Task.cancelling() and uncancel(), by which a cancellation of one's own is
# told apart from others' (Python 3.11+).
_CANCELLING = sys.version_info >= (3, 11)


class _Granter(Protocol):
    """
    What a lease needs of the quota that granted it.
    """

    def _give_back(self, lease: Lease) -> None: ...


@attrs.frozen
class QuotaStats:
    """
    A snapshot of a quota's counters, as this quota object sees them.

    The gauges say what holds and waits right now, the counters count
    requests since creation, each exactly once: a request ends granted,
    rejected, timed out or cancelled. A quota shared across processes (a
    network backend) reports the requests made through this object.

    Attributes:
        in_use: Slots held right now.
        waiting: Requests waiting for a slot right now.
        granted: Slots granted since creation.
        rejected: Requests refused at once (``timeout=0`` or ``acquire_nowait``).
        timed_out: Requests that gave up after their timeout.
        cancelled: Requests cancelled while waiting.
        peak: The most slots ever held at once.
        keys: Keys with slots held or requests waiting right now.
        total: The global limit, or `None`.
        top: The keys holding the most slots, as ``(key, in_use)`` pairs,
            most first.

    .. versionadded:: 0.1.0
    """

    in_use: int
    waiting: int
    granted: int
    rejected: int
    timed_out: int
    cancelled: int
    peak: int
    keys: int
    total: int | None
    top: tuple[tuple[str, int], ...]


class _Counts(Protocol):
    """
    The counters every quota keeps for `QuotaStats`, under the same names.
    """

    _n_waiting: int
    _granted: int
    _rejected: int
    _timed_out: int
    _cancelled: int
    _peak: int
    _total: int | None


def snapshot(
    q: _Counts, in_use: int, held: Mapping[str, int], waiting: Collection[str], top: int
) -> QuotaStats:
    """
    Return the `QuotaStats` of *q*: *in_use* slots held, *held* per key, the
    keys with requests *waiting*, and the *top* keys holding the most.
    """
    return QuotaStats(
        in_use=in_use,
        waiting=q._n_waiting,
        granted=q._granted,
        rejected=q._rejected,
        timed_out=q._timed_out,
        cancelled=q._cancelled,
        peak=q._peak,
        keys=len(held.keys() | set(waiting)),
        total=q._total,
        top=tuple(heapq.nlargest(top, held.items(), key=lambda kv: kv[1])),
    )


class Lease:
    """
    One slot of a quota, held for *key* until released.

    Only a quota grants leases, through ``acquire`` or ``acquire_nowait``: a
    lease cannot be made by hand, copied, pickled or pointed at another key,
    so every release hands back a slot its quota granted, once. Release it
    with `arelease` or `release` (both idempotent), or use it as a context
    manager (``async with`` or ``with``), which releases it on exit.

    The leases of `LocalQuota` and `ThreadQuota` release without waiting, in
    both colours. A backend whose release needs a round trip (a network
    quota) grants a subclass whose `arelease` awaits it; ``async with`` works
    for every quota.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_key", "_quota")

    _quota: _Granter | None  # None once released
    _key: str

    def __init__(self, *args: object, **kwargs: object) -> None:  # noqa: ARG002  # refused, whatever it is given
        msg = (
            "A Lease is granted by a quota, never made by hand: call "
            "`await quota.acquire(key)` or `quota.acquire_nowait(key)` and release what it "
            "returns. Releasing a slot the quota never granted would let it admit more "
            "work than its limits."
        )
        raise TypeError(msg)

    @property
    def key(self) -> str:
        """
        The key (usually a user id) the slot is held for.
        """
        return self._key

    @property
    def released(self) -> bool:
        """
        Whether this lease was handed back.
        """
        return self._quota is None

    def release(self) -> None:
        """
        Hand the slot back to the quota; further calls do nothing.
        """
        quota = self._quota
        if quota is not None:
            quota._give_back(self)

    async def arelease(self) -> None:
        """
        Hand the slot back to the quota, in async code; further calls do
        nothing. It is never lost to a cancellation: the slot is handed back
        even if the caller is cancelled.
        """
        self.release()

    @property
    def lost(self) -> bool:
        """
        Whether the quota found that this lease had expired while it was held
        (its holder paused or cut off past the lease's time to live), so its
        slot may have gone to someone else. The leases of `LocalQuota` are
        never lost.
        """
        return False

    def add_lost_callback(self, callback: Callable[[], object]) -> None:
        """
        Have *callback* called, once and without arguments, if the quota finds
        this lease lost while it is held; `EngineFactory` cancels the body
        using the engine with it. A lease that cannot be lost (those of
        `LocalQuota`) never calls it.

        A backend whose leases can be lost grants a subclass that calls the
        callbacks; ``async with`` such a lease cancels its body when the loss
        is noticed and raises `usercontext.exceptions.LeaseLostError` in its
        place.
        """

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # copy.copy and pickle both come here: a copy would be a second
        # handle on one slot, released twice.
        msg = (
            f"{self!r} is one slot of one quota: it cannot be copied or pickled. Pass the "
            "lease itself, and release it once, in the process that acquired it."
        )
        raise TypeError(msg)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.arelease()

    def __repr__(self) -> str:
        state = "released" if self._quota is None else "held"
        return f"<usercontext.Lease(key={self._key!r}, {state})>"


class LosableLease(Lease):
    """
    The base of the leases of a backend that can lose them (a lease that
    expired while its holder was paused): it keeps the callbacks of
    `Lease.add_lost_callback`, and ``async with`` it cancels its body (on
    asyncio) when the loss is noticed, raising
    `usercontext.exceptions.LeaseLostError` in its place.

    The backend calls `_lose` from its own task when it finds the lease lost.
    """

    __slots__ = ("_callbacks", "_cancelling", "_lost", "_task")

    _callbacks: list[Callable[[], object]] | None
    _lost: bool
    _task: Any  # the asyncio task in ``async with`` the lease, else None
    _cancelling: int

    def _init_losable(self) -> None:
        self._callbacks = None
        self._lost = False
        self._task = None
        self._cancelling = 0

    @property
    def lost(self) -> bool:
        """
        Whether the quota found that this lease had expired while it was held
        (its holder paused or cut off past the lease's time to live), so its
        slot may have gone to someone else.
        """
        return self._lost

    def add_lost_callback(self, callback: Callable[[], object]) -> None:
        """
        Have *callback* called, once and without arguments, if the quota finds
        this lease lost while it is held.
        """
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    def _lose(self) -> None:
        """
        Mark the lease lost, call its callbacks (logging their errors), and
        cancel the body of ``async with`` it, if any.
        """
        if self._lost:
            return
        self._lost = True
        callbacks, self._callbacks = self._callbacks or [], None
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: PERF203  # each callback runs, whatever the others do
                _logger.exception("A lost-lease callback of %r failed", self)
        task = self._task
        if task is not None:
            task.cancel(f"The quota lease of key {self._key!r} was lost.")

    async def __aenter__(self) -> Self:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not asyncio: trio
            return self
        if task is not None:  # pragma: no branch  # a coroutine on asyncio runs in a task
            self._task = task
            # Task.cancelling() is new in Python 3.11.
            self._cancelling = task.cancelling() if _CANCELLING else 0  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        await self.arelease()
        if (
            self._lost
            and task is not None
            and isinstance(exc, asyncio.CancelledError)
            and (not _CANCELLING or task.uncancel() <= self._cancelling)
        ):
            msg = (
                f"The quota lease of key {self._key!r} expired while it was held (its "
                "holder was paused or cut off past the lease's time to live), so its slot "
                "may have gone to someone else: the body was cancelled. Retry the work "
                "under a new lease."
            )
            raise LeaseLostError(msg) from None


_new_lease = Lease.__new__


def grant_lease(cls: type[Lease], quota: _Granter, key: str) -> Lease:
    """
    Make the lease of a slot *quota* just granted to *key*, bypassing the
    refusing ``__init__`` (the grant paths of ``acquire`` inline this).
    """
    lease = _new_lease(cls)
    lease._quota = quota
    lease._key = key
    return lease


@runtime_checkable
class Quota(Protocol):
    """
    The contract of an async quota backend: what `EngineFactory` and every
    other user of a quota rely on. `LocalQuota` is the in-process backend; a
    backend shared across processes (Redis) implements the same three
    methods and passes the same conformance suite,
    ``usercontext.testing.QuotaConformance``.

    Every method that may need a round trip is a coroutine, so a network
    backend never blocks the event loop. A `ThreadQuota` is not a `Quota`:
    its ``acquire`` blocks a thread.

    The guarantees a backend gives:

    - **Limits.** At most ``per_key`` leases are held per key and at most
      ``total`` overall, at every instant, under timeouts and cancellation.
      A backend whose leases expire (to recover a crashed holder's slot)
      documents what an expired lease still being used costs.
    - **Waiting.** ``acquire`` with *timeout* `None` waits as long as it
      takes; a positive *timeout* waits at most that long, then raises
      `usercontext.exceptions.QuotaTimeoutError`; ``0`` (or less) never waits
      for a slot and raises `usercontext.exceptions.QuotaExceededError` at
      once when none is free (it may still take a round trip to find out).
    - **FIFO per key.** Waiters of one key are granted in the order they
      started waiting, and a new request never takes a slot ahead of an
      older waiter of its key.
    - **Fairness across keys.** A slot freed under the *total* limit goes
      round-robin to the keys that have waiters, so one key with a hundred
      waiters cannot starve another.
    - **Cancellation.** An ``acquire`` that raises (cancelled while it
      waits, even right after it was granted, or timed out, or refused)
      leaves nothing held and nothing waiting: a slot is held only by a
      lease returned to the caller. An ``arelease`` is never lost: if its
      caller is cancelled, the slot is still handed back (a network backend
      shields the round trip).
    - **Release once.** Each lease's slot is handed back exactly once;
      `arelease` of a lease already handed back raises
      `usercontext.exceptions.LeaseReleasedError` (`Lease.arelease` and
      leaving ``async with`` are idempotent).
    - **Stats.** `stats` counts each request once, as granted, rejected,
      timed out or cancelled, and reports what is held and waited for now.
    - **Bounded state.** A key that holds nothing and waits for nothing
      leaves no state behind.

    Leases are `Lease` objects; a backend whose release needs a round trip
    grants a subclass whose `Lease.arelease` awaits it.

    .. versionadded:: 0.1.0
    """

    async def acquire(self, key: str, *, timeout: float | None = None) -> Lease:
        """
        Wait for a slot of *key* and return its `Lease`, which is also an
        async context manager: ``async with await quota.acquire(key):``.

        Args:
            key: What the limit is per, usually a user id.
            timeout: `None` waits as long as it takes, a positive number waits
                at most that many seconds, ``0`` never waits for a slot.

        Raises:
            usercontext.exceptions.QuotaExceededError: If *timeout* is 0 and
                no slot is free.
            usercontext.exceptions.QuotaTimeoutError: If no slot was free
                within *timeout*.
        """
        ...

    async def arelease(self, lease: Lease) -> None:
        """
        Hand the slot of *lease* back and grant it to the next waiter, if
        any; the slot is handed back even if the caller is cancelled.

        Raises:
            usercontext.exceptions.LeaseReleasedError: If *lease* was already
                handed back.
        """
        ...

    def stats(self, *, top: int = 10) -> QuotaStats:
        """
        Return a snapshot of the counters, with the *top* busiest keys; it
        never waits.
        """
        ...
