"""
The in-process quotas: `LocalQuota` for one event loop (asyncio or trio) and
`ThreadQuota` for threaded services.

Both share one bookkeeping core. A grant on the uncontended path is a few dict
operations and never awaits: anyio's limiter checkpoints on every acquire, which
costs more than the rest of a request's isolation. Only a request that must wait
parks on a waiter, and waiters are served FIFO per key and round-robin across
keys, so one user with a hundred queued requests cannot starve another.
"""

from __future__ import annotations

import threading
import time

from collections import deque
from typing import TYPE_CHECKING, Any

import anyio

from . import _checks
from ._lifecycle import asyncio_task
from ._quota import Lease, QuotaStats, _new_lease, grant_lease, snapshot
from .exceptions import LeaseReleasedError, QuotaError, QuotaExceededError, QuotaTimeoutError


if TYPE_CHECKING:
    import asyncio

    from collections.abc import Callable
    from types import TracebackType
    from typing import TypeAlias

    PerKey: TypeAlias = "int | Callable[[str], int]"


__all__ = ["LocalQuota", "ThreadQuota"]


class _Waiter:
    """
    A waiter of a thread, or of a trio task: it wakes by *wake* (a lock's
    release, an `anyio.Event`'s set). A waiter of an asyncio task is a bare
    future instead; this one answers the two calls the quota makes of either.
    """

    __slots__ = ("_wake", "granted")

    def __init__(self, wake: Callable[[], object]) -> None:
        self._wake = wake
        self.granted = False

    def done(self) -> bool:
        """
        Say whether it stopped waiting: never while queued, as it leaves the
        queue itself when it does (a future is done once cancelled).
        """
        return False

    def set_result(self, granted: bool) -> None:  # noqa: FBT001  # as a future's
        """
        Grant it the slot (*granted* is True), and wake it.
        """
        self.granted = granted
        self._wake()


if TYPE_CHECKING:
    # What a queue holds: a _Waiter, or (on asyncio) a future that a grant
    # resolves with True and a timeout with False.
    Waiter: TypeAlias = "_Waiter | asyncio.Future[bool]"


class _Core:
    """
    The bookkeeping shared by both quotas. Callers hold whatever lock they need.
    """

    def __init__(self, per_key: PerKey, total: int | None) -> None:
        _checks.limit("per_key", per_key, allow_none=False)
        _checks.limit("total", total, allow_none=True)
        self._per_key = per_key
        self._fixed: int | None
        self._fn: Callable[[str], int] | None
        self._fixed, self._fn = (per_key, None) if isinstance(per_key, int) else (None, per_key)
        self._total = total
        self._in_use: dict[str, int] = {}
        self._total_in_use = 0
        # Keys with waiters, in round-robin order: a served key moves to the end.
        self._waiters: dict[str, deque[Waiter]] = {}
        self._n_waiting: int = 0
        self._granted = 0
        self._rejected = 0
        self._timed_out = 0
        self._cancelled = 0
        self._peak = 0

    def _limit(self, key: str) -> int:
        if self._fixed is not None:
            return self._fixed
        limit = self._fn(key)  # type: ignore[misc]  # set whenever _fixed is None
        if type(limit) is not int or limit < 0:
            msg = f"per_key({key!r}) must return a non-negative int, got {limit!r}."
            raise TypeError(msg)
        return limit

    def _take_now(self, key: str) -> bool:
        """
        Take a slot of *key* if one is free right now and nobody waits ahead,
        and say whether it did; the caller makes the lease, if it needs one
        (`EngineFactory` holds the slot of a `LocalQuota` without one). Never
        waits and counts no rejection.
        """
        in_use = self._in_use
        n = in_use.get(key, 0)
        if (
            # A fixed limit of 0 is falsy and takes the slow _limit: still right.
            n >= (self._fixed or self._limit(key))
            or (self._total is not None and self._total_in_use >= self._total)
            or (self._waiters and key in self._waiters)
        ):
            return False
        in_use[key] = n + 1
        total = self._total_in_use = self._total_in_use + 1
        self._granted += 1
        if total > self._peak:  # noqa: PLR1730  # max() is a call, slower on the hot path
            self._peak = total
        return True

    def acquire_nowait(self, key: str) -> Lease:
        """
        Return a `Lease` of *key* if a slot is free right now and nobody of
        *key* waits ahead; never wait.

        Raises:
            usercontext.exceptions.QuotaExceededError: If no slot is free.
        """
        if not self._take_now(key):
            self._rejected += 1
            raise self._full_error(QuotaExceededError, key, 0.0, 0.0)
        return grant_lease(self._lease_type, self, key)

    def _return(self, key: str) -> None:
        n = self._in_use[key] - 1
        if n:
            self._in_use[key] = n
        else:
            del self._in_use[key]
        self._total_in_use -= 1
        if self._waiters:
            self._wake_next(key)

    def _wake_next(self, key: str) -> None:
        """
        Grant what a slot of *key* just freed up.
        """
        if self._total is None:
            self._dispatch_key(key)
        else:
            self._dispatch()

    if TYPE_CHECKING:
        # Lease.release comes here: ThreadQuota returns the slot under its lock.
        # LocalQuota's leases release themselves and never call it.
        def _give_back(self, lease: Lease) -> None: ...

    _lease_type: type[Lease] = Lease

    def release(self, lease: Lease) -> None:
        """
        Hand the slot of *lease* back and grant it to the next waiter, if any.

        Raises:
            usercontext.exceptions.LeaseReleasedError: If *lease* was already
                handed back.
            ValueError: If *lease* is another quota's.
        """
        if lease._quota is not self:
            if lease._quota is None:
                msg = (
                    f"{lease!r} was already released. Release each lease once; "
                    "Lease.release() and leaving `async with` are safe to repeat."
                )
                raise LeaseReleasedError(msg)
            msg = f"{lease!r} belongs to another quota; release it through that one."
            raise ValueError(msg)
        lease._quota = None
        self._return(lease._key)

    def _pop_alive(self, queue: deque[Waiter]) -> Waiter | None:
        while queue:
            w = queue.popleft()
            self._n_waiting -= 1
            if not w.done():  # a future is done once cancelled or timed out
                return w
        return None

    def _grant(self, key: str, w: Waiter) -> None:
        """
        Give *w* a slot of *key*, and wake it.
        """
        in_use = self._in_use
        in_use[key] = in_use.get(key, 0) + 1
        total = self._total_in_use = self._total_in_use + 1
        self._granted += 1
        if total > self._peak:  # noqa: PLR1730  # max() is a call, slower on the hot path
            self._peak = total
        w.set_result(True)

    def _dispatch_key(self, key: str) -> None:
        """
        Grant the waiters of *key* that fit (with no total limit, only its
        own slots matter).
        """
        queue = self._waiters.get(key)
        if queue is None:
            return
        # A fixed limit of 0 is falsy and takes the slow _limit: still right.
        limit = self._fixed or self._limit(key)
        in_use = self._in_use
        while queue and in_use.get(key, 0) < limit:
            w = queue.popleft()
            self._n_waiting -= 1
            if not w.done():
                self._grant(key, w)
        if not queue:
            del self._waiters[key]

    def _dispatch(self) -> None:
        """
        Grant every waiter that fits: FIFO per key, round-robin across keys.
        """
        progress = True
        while progress and self._waiters:
            progress = False
            for key in list(self._waiters):
                if self._total is not None and self._total_in_use >= self._total:
                    return
                if self._in_use.get(key, 0) >= self._limit(key):
                    continue
                queue = self._waiters.pop(key)
                w = self._pop_alive(queue)
                if w is not None:
                    self._grant(key, w)
                    progress = True
                if queue:
                    self._waiters[key] = queue  # to the end of the ring

    def _enqueue(self, key: str, w: Waiter) -> None:
        queue = self._waiters.get(key)
        if queue is None:
            queue = self._waiters[key] = deque()
        queue.append(w)
        self._n_waiting += 1

    def _forget(self, key: str, w: Waiter) -> None:
        """
        Remove a waiter of *key* that stops waiting without a grant.
        """
        queue = self._waiters.get(key)
        if queue is not None and w in queue:
            queue.remove(w)
            self._n_waiting -= 1
            if not queue:
                del self._waiters[key]

    def _full_error(
        self, cls: type[QuotaError], key: str, waited: float, timeout: float | None
    ) -> QuotaError:
        limit = self._limit(key)
        in_use = self._in_use.get(key, 0)
        if in_use >= limit or self._total is None:
            return cls(key, limit, "key", in_use, waited, timeout)
        return cls(key, self._total, "total", self._total_in_use, waited, timeout)

    def _stats(self, top: int) -> QuotaStats:
        return snapshot(self, self._total_in_use, self._in_use, self._waiters, top)

    def _set_limits(self, per_key: PerKey | None, total: int | None, *, set_total: bool) -> None:
        # Check both before changing either: a bad call changes nothing.
        if per_key is not None:
            _checks.limit("per_key", per_key, allow_none=False)
        if set_total:
            _checks.limit("total", total, allow_none=True)
        if per_key is not None:
            self._per_key = per_key
            self._fixed, self._fn = (per_key, None) if isinstance(per_key, int) else (None, per_key)
        if set_total:
            self._total = total
        self._dispatch()


_MISSING: Any = object()


class _LocalLease(Lease):
    """
    A lease of a `LocalQuota`, whose release needs no lock and no await.
    """

    __slots__ = ()

    # Only a LocalQuota grants it, so its quota is always one (or None): a
    # narrower type than the base's, which pyright reports as an override of
    # a mutable attribute (where the release below assigns it).
    _quota: _Core | None

    def release(self) -> None:
        quota = self._quota
        if quota is not None:
            self._quota = None  # pyright: ignore[reportIncompatibleVariableOverride]
            quota._return(self._key)  # LocalQuota._return: no lock needed

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The release never awaits: no coroutine of arelease() on the way.
        self.release()


class LocalQuota(_Core):
    """
    Per-key and global limits on concurrent work within one event loop.

    At most *per_key* leases are held per key and at most *total* overall,
    at every instant, including under cancellation and timeouts. A request
    that must wait is served FIFO within its key; freed global slots go
    round-robin across the keys that have waiters. Per-key state disappears as
    soon as a key holds nothing and waits for nothing.

    It implements the `Quota` protocol, and adds what needs no round trip:
    `acquire_nowait`, a sync `release`, and `set_limits`. It works on asyncio
    and trio; use one instance per event loop. For threads, use `ThreadQuota`.

    Args:
        per_key: The per-key limit, or a callable returning the limit of a key
            (for example, paid users get 5). Limits can be changed later
            through `set_limits`; changes apply to the next grants.
        total: The global limit, or `None` for none.

    >>> import anyio, usercontext as uc
    >>> quota = uc.LocalQuota(per_key=2, total=100)
    >>> async def main():
    ...     async with await quota.acquire("u-42") as lease:
    ...         return quota.stats().in_use, lease.key
    >>> anyio.run(main)
    (1, 'u-42')

    .. versionadded:: 0.1.0
    """

    _lease_type = _LocalLease

    def __init__(self, *, per_key: PerKey = 2, total: int | None = None) -> None:
        super().__init__(per_key, total)

    async def acquire(self, key: str, *, timeout: float | None = None) -> Lease:
        """
        Wait for a slot of *key* and return its `Lease`, which is also an
        async context manager: ``async with await quota.acquire(key):``.

        A free slot is granted without suspending. Otherwise, *timeout* `None`
        waits as long as it takes, a positive number waits at most that many
        seconds and then raises `usercontext.exceptions.QuotaTimeoutError`, and ``0``
        raises `usercontext.exceptions.QuotaExceededError` at once. A request
        cancelled while it waits, even right after being granted, leaves no slot
        taken.
        """
        # _take_now, written out: this is the hot path of a quota used alone.
        in_use = self._in_use
        n = in_use.get(key, 0)
        if (
            n < (self._fixed or self._limit(key))
            and (self._total is None or self._total_in_use < self._total)
            and not (self._waiters and key in self._waiters)
        ):
            in_use[key] = n + 1
            total = self._total_in_use = self._total_in_use + 1
            self._granted += 1
            if total > self._peak:  # noqa: PLR1730  # max() is a call, slower on the hot path
                self._peak = total
            lease = _new_lease(_LocalLease)
            lease._quota = self
            lease._key = key
            return lease
        if timeout is not None and timeout <= 0:
            # _wait refuses too; refusing here saves its coroutine on the
            # path of a caller that asked not to wait.
            self._rejected += 1
            raise self._full_error(QuotaExceededError, key, 0.0, timeout)
        await self._wait(key, timeout)
        return grant_lease(_LocalLease, self, key)

    async def arelease(self, lease: Lease) -> None:
        """
        Hand the slot of *lease* back and grant it to the next waiter, if any.
        It never suspends, so a cancellation cannot interrupt it.

        Raises:
            usercontext.exceptions.LeaseReleasedError: If *lease* was already
                handed back.
            ValueError: If *lease* is another quota's.
        """
        if lease._quota is self:
            lease.release()  # a _LocalLease's, written out for the hot path
        else:
            self.release(lease)  # raises the error that fits

    def stats(self, *, top: int = 10) -> QuotaStats:
        """
        Return a snapshot of the counters, with the *top* busiest keys.
        """
        return self._stats(top)

    def set_limits(self, *, per_key: PerKey | None = None, total: int | None = _MISSING) -> None:
        """
        Change the limits; waiters that now fit are granted at once.

        Leases already held are kept even if they exceed a lowered limit; new
        grants wait until use is under it.
        """
        self._set_limits(per_key, total, set_total=total is not _MISSING)

    def _return(self, key: str) -> None:
        """
        Take back a slot of *key*, or hand it straight to the next waiter of
        *key* when that is where it would go (no total limit, a fixed
        per-key limit it fits): the usual case of a busy user, without the
        dispatch's calls. The slot stays held throughout, so the counts are
        those of a return and a grant.
        """
        in_use = self._in_use
        n = in_use[key]
        waiters = self._waiters
        fixed = self._fixed
        if waiters and self._total is None and fixed is not None and n <= fixed:
            queue = waiters.get(key)
            if queue is not None:
                while queue:
                    w = queue.popleft()
                    self._n_waiting -= 1
                    if not w.done():  # a future is done once cancelled or timed out
                        w.set_result(True)
                        self._granted += 1
                        if not queue:
                            del waiters[key]
                        return
                del waiters[key]
        if n > 1:
            in_use[key] = n - 1
        else:
            del in_use[key]
        self._total_in_use -= 1
        if waiters:
            self._wake_next(key)

    def _queue_future(self, key: str, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bool]:
        """
        Queue a future of *loop* for a slot of *key* (which `_take_now` found
        taken) and return it, for a wait with no timeout on asyncio.

        The caller awaits the future and, if that raises, calls `_abandon`
        with it; once the future is done the slot is the caller's. No
        coroutine of the quota's own, nor any object but the future, is kept
        per waiter.
        """
        fut = loop.create_future()
        # _enqueue, written out: one call per waiter.
        queue = self._waiters.get(key)
        if queue is None:
            queue = self._waiters[key] = deque()
        queue.append(fut)
        self._n_waiting += 1
        return fut

    async def _wait(self, key: str, timeout: float | None) -> None:
        """
        Wait for a slot of *key*, which `_take_now` found taken, and take it;
        the caller holds it (with a lease, or by key). A *timeout* of 0 or less
        refuses at once.
        """
        if timeout is not None and timeout <= 0:
            self._rejected += 1
            raise self._full_error(QuotaExceededError, key, 0.0, timeout)
        try:
            # The loop of the running task: asyncio_task() finds it without
            # the getpid() call of get_running_loop() before Python 3.12.
            task = asyncio_task()
        except RuntimeError:  # not asyncio: trio
            await self._wait_anyio(key, timeout)
            return
        assert task is not None  # noqa: S101  # an awaiting coroutine on asyncio runs in a task
        loop = task.get_loop()
        # A bare future is the cheapest waiter on asyncio, and it shows in the
        # tail latency of a busy quota. No cancel scope around the wait: a
        # cancellation cancels the future, and a timeout is a timer of the
        # loop that resolves it with False, a grant with True.
        fut: asyncio.Future[bool] = loop.create_future()
        self._enqueue(key, fut)
        # The clock is read only for a timeout, which it starts.
        start = 0.0 if timeout is None else loop.time()
        timer = None if timeout is None else loop.call_at(start + timeout, self._expire, key, fut)
        try:
            granted = await fut
        except BaseException:
            # Cancelled from outside: never keep or lose a slot on the way out.
            if timer is not None:
                timer.cancel()
            self._abandon(key, fut)
            raise
        if granted:
            if timer is not None:
                timer.cancel()
            return
        # Resolved by the timer, which took it off the queue.
        self._timed_out += 1
        raise self._full_error(QuotaTimeoutError, key, loop.time() - start, timeout)

    def _expire(self, key: str, fut: asyncio.Future[bool]) -> None:
        """
        The timer of an asyncio wait: give up on *fut* unless it was granted
        (or cancelled) first.
        """
        if not fut.done():
            self._forget(key, fut)
            fut.set_result(False)

    def _abandon(self, key: str, w: Waiter) -> None:
        """
        Undo the wait of *w* for *key*, cancelled from outside, even right
        after its grant.
        """
        if isinstance(w, _Waiter):
            granted = w.granted
        else:
            granted = w.done() and not w.cancelled() and w.result()
        if granted:
            self._return(key)
        else:
            self._forget(key, w)
            self._cancelled += 1

    async def _wait_anyio(self, key: str, timeout: float | None) -> None:
        # trio: an anyio.Event, and a cancel scope only when there is a timeout.
        signal = anyio.Event()
        w = _Waiter(signal.set)
        self._enqueue(key, w)
        # The loop's clock, which the timeout runs on: under a mock clock (trio's
        # autojump in tests) the wall clock would report no wait at all.
        start = anyio.current_time()
        try:
            if timeout is None:
                await signal.wait()
            else:
                with anyio.move_on_after(timeout):
                    await signal.wait()
        except BaseException:
            self._abandon(key, w)
            raise
        if w.granted:
            return
        self._forget(key, w)
        self._timed_out += 1
        raise self._full_error(QuotaTimeoutError, key, anyio.current_time() - start, timeout)

    def __repr__(self) -> str:
        return (
            f"<usercontext.LocalQuota(per_key={self._per_key!r}, total={self._total!r}, "
            f"in_use={self._total_in_use}, waiting={self._n_waiting})>"
        )


class ThreadQuota(_Core):
    """
    The thread-safe counterpart of `LocalQuota`, for threaded (WSGI) services.

    It has the same semantics (per-key and total limits, FIFO per key,
    round-robin across keys, no state left for idle keys) with a blocking
    `acquire` and a sync `release`. It is not a `Quota`: that protocol is
    async, and a blocking ``acquire`` would stop an event loop.

    Args:
        per_key: The per-key limit, or a callable returning the limit of a key.
        total: The global limit, or `None` for none.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, per_key: PerKey = 2, total: int | None = None) -> None:
        super().__init__(per_key, total)
        self._lock = threading.Lock()

    def acquire(self, key: str, *, timeout: float | None = None) -> Lease:
        """
        Block until a slot of *key* is free and return its `Lease`.

        *timeout* `None` waits as long as it takes, a positive number waits at
        most that many seconds and then raises `usercontext.exceptions.QuotaTimeoutError`,
        and ``0`` raises `usercontext.exceptions.QuotaExceededError` at once.
        """
        with self._lock:
            if self._take_now(key):
                return grant_lease(Lease, self, key)
            if timeout is not None and timeout <= 0:
                self._rejected += 1
                raise self._full_error(QuotaExceededError, key, 0.0, timeout)
            signal = threading.Lock()
            signal.acquire()
            w = _Waiter(signal.release)
            self._enqueue(key, w)
        start = time.monotonic()
        try:
            got = signal.acquire(timeout=-1 if timeout is None else timeout)
        except BaseException:  # KeyboardInterrupt while blocked
            with self._lock:
                if w.granted:
                    self._return(key)
                else:
                    self._forget(key, w)
                    self._cancelled += 1
            raise
        if got:
            return grant_lease(Lease, self, key)
        with self._lock:
            if w.granted:  # granted between the timeout and taking the lock
                return grant_lease(Lease, self, key)
            self._forget(key, w)
            self._timed_out += 1
            raise self._full_error(QuotaTimeoutError, key, time.monotonic() - start, timeout)

    def acquire_nowait(self, key: str) -> Lease:
        """
        Return a `Lease` of *key* if a slot is free right now and nobody of
        *key* waits ahead; never wait.

        Raises:
            usercontext.exceptions.QuotaExceededError: If no slot is free.
        """
        with self._lock:
            return super().acquire_nowait(key)

    def _take(self, key: str) -> Lease | None:
        """
        Return a `Lease` of *key* if a slot is free right now, else `None`;
        unlike `acquire_nowait`, a miss counts as no rejection (the caller
        goes on to wait).
        """
        with self._lock:
            return grant_lease(Lease, self, key) if self._take_now(key) else None

    def release(self, lease: Lease) -> None:
        """
        Hand the slot of *lease* back and grant it to the next waiter, if any.

        Raises:
            usercontext.exceptions.LeaseReleasedError: If *lease* was already
                handed back.
            ValueError: If *lease* is another quota's.
        """
        with self._lock:
            super().release(lease)

    def _give_back(self, lease: Lease) -> None:
        # Checked and returned under the lock: two threads releasing one lease
        # at once return its slot once.
        with self._lock:
            if lease._quota is self:
                lease._quota = None
                self._return(lease._key)

    def stats(self, *, top: int = 10) -> QuotaStats:
        """
        Return a snapshot of the counters, with the *top* busiest keys.
        """
        with self._lock:
            return self._stats(top)

    def set_limits(self, *, per_key: PerKey | None = None, total: int | None = _MISSING) -> None:
        """
        Change the limits; waiters that now fit are granted at once.
        """
        with self._lock:
            self._set_limits(per_key, total, set_total=total is not _MISSING)

    def __repr__(self) -> str:
        return (
            f"<usercontext.ThreadQuota(per_key={self._per_key!r}, total={self._total!r}, "
            f"in_use={self._total_in_use}, waiting={self._n_waiting})>"
        )
