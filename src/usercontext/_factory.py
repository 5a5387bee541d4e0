"""
`EngineFactory`: expensive per-request engines, created under each user's quota
and always closed.
"""

from __future__ import annotations

import heapq
import math
import sys
import threading
import time

from asyncio import CancelledError, current_task
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import anyio
import attrs

from . import _checks
from ._current import bind, current
from ._local_quota import LocalQuota, ThreadQuota
from ._util import (
    ASYNC_CM,
    ASYNC_GEN,
    AWAITABLE,
    GEN,
    PLAIN,
    SYNC_CM,
    add_note,
    async_gen_exit,
    describe,
    first_value,
    first_value_async,
    gen_exit,
    kind_of,
    logger,
    run_steps,
    running_task,
    shielded,
)
from .exceptions import (
    EngineDeadlineError,
    FactoryClosedError,
    QuotaExceededError,
    QuotaTimeoutError,
)


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from types import TracebackType
    from typing import TypeAlias

    from ._context import UserContext
    from ._local_quota import PerKey
    from ._quota import Quota

E = TypeVar("E")

if TYPE_CHECKING:
    Made: TypeAlias = E | Awaitable[E] | AbstractAsyncContextManager[E] | AbstractContextManager[E]

__all__ = ["EngineFactory", "FactoryStats"]

# Task.cancelling() and uncancel(), by which a native cancellation of one's
# own is told apart from others' (Python 3.11+).
_CANCELLING = sys.version_info >= (3, 11)


@attrs.frozen
class FactoryStats:
    """
    A snapshot of an `EngineFactory`'s counters.

    Attributes:
        created: Engines created.
        closed: Engines closed (created = closed + active + idle once settled).
        active: Engines in use right now.
        active_per_user: The users with the most engines in use, as
            ``(user_id, count)`` pairs, most first.
        waiting: Requests waiting for a quota slot right now.
        rejected: Requests refused because the quota was full (``timeout=0``).
        timed_out: Requests that gave up waiting for a slot.
        create_errors: Calls of *create* that raised.
        close_errors: Errors raised (or timeouts hit) while closing engines.
        deadline_hits: Bodies cancelled by the *deadline*.
        peak_active: The most engines in use at once.
        reused: Engines handed out again from the idle pool.
        idle: Engines parked in the idle pool right now.

    .. versionadded:: 0.1.0
    """

    created: int
    closed: int
    active: int
    active_per_user: tuple[tuple[str, int], ...]
    waiting: int
    rejected: int
    timed_out: int
    create_errors: int
    close_errors: int
    deadline_hits: int
    peak_active: int
    reused: int
    idle: int


class _Counters:
    __slots__ = (
        "active",
        "by_user",
        "close_errors",
        "closed",
        "create_errors",
        "created",
        "deadline_hits",
        "peak",
        "rejected",
        "reused",
        "timed_out",
    )

    def __init__(self) -> None:
        self.created = self.closed = self.active = self.peak = self.reused = 0
        self.rejected = self.timed_out = self.create_errors = self.close_errors = 0
        self.deadline_hits = 0
        self.by_user: dict[str, int] = {}

    def start(self, user_id: str) -> None:
        active = self.active = self.active + 1
        self.peak = max(self.peak, active)
        self.by_user[user_id] = self.by_user.get(user_id, 0) + 1

    def stop(self, user_id: str) -> None:
        self.active -= 1
        n = self.by_user[user_id] - 1
        if n:
            self.by_user[user_id] = n
        else:
            del self.by_user[user_id]


class _Made(Generic[E]):
    """
    An engine and how to undo what creating it entered.
    """

    __slots__ = ("engine", "exit", "parked_at", "user_id")

    def __init__(self, user_id: str, engine: E, exit_: Any) -> None:
        self.user_id = user_id
        self.engine = engine
        self.exit = exit_
        self.parked_at = 0.0


class EngineFactory(Generic[E]):
    """
    Create an expensive engine per request, under per-user and global quotas,
    and always close it.

    ``async with factory.engine(ctx) as engine:`` takes a slot of
    ``ctx.user_id`` from the quota, creates the engine with ``create(ctx)``,
    binds *ctx* for the body, then closes the engine (shielded from
    cancellation, cut after *close_timeout*) and gives the slot back, on every
    path: create fails, the body fails or is cancelled, close fails or hangs.
    Engines are never shared between users.

    Args:
        create: Makes an engine from a `usercontext.UserContext`. It may return
            the engine, an awaitable of it, or an (async) context manager whose
            ``__aenter__``/``__enter__`` gives the engine and whose exit closes it.
        close: Closes an engine; sync or async. Runs after a context manager's
            exit, if both apply.
        quota: The quota to draw from; a `LocalQuota` of *per_user* and *total*
            by default (those two are ignored when *quota* is given).
        per_user: Engines in use at once per user, or a callable
            ``user_id -> int``.
        total: Engines in use at once overall, or `None`.
        timeout: How long to wait for a slot: `None` waits, ``0`` rejects at
            once with `usercontext.exceptions.QuotaExceededError`, a positive number
            raises `usercontext.exceptions.QuotaTimeoutError` after that many seconds.
        close_timeout: How long closing one engine may take before it is cut
            and reported as `usercontext.exceptions.CloseTimeoutError`.
        deadline: How long a body may use its engine before it is cancelled
            (cooperatively, that body only) and
            `usercontext.exceptions.EngineDeadlineError` is raised.
        pool_idle: Keep up to this many idle engines per user for reuse by the
            same user only (0, the default, closes every engine after use).
        pool_max: The most idle engines kept over all users; the oldest is
            closed to make room.
        idle_ttl: Idle engines older than this many seconds are closed.
        reset: Called (sync or async) on an engine before it is parked for
            reuse; if it raises, the engine is closed instead.
        thread_quota: The quota of `engine_sync`; a `ThreadQuota` of
            *per_user* and *total* by default.

    .. versionadded:: 0.1.0
    """

    # One overload per form of create, so that type checkers infer the engine type.
    @overload
    def __init__(
        self,
        create: Callable[[UserContext], AbstractAsyncContextManager[E]],
        *,
        close: Callable[[E], object] | None = None,
        quota: Quota | None = None,
        per_user: PerKey = 2,
        total: int | None = None,
        timeout: float | None = None,
        close_timeout: float = 5.0,
        deadline: float | None = None,
        pool_idle: int = 0,
        pool_max: int = 64,
        idle_ttl: float = 60.0,
        reset: Callable[[E], object] | None = None,
        thread_quota: ThreadQuota | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        create: Callable[[UserContext], Awaitable[E]],
        *,
        close: Callable[[E], object] | None = None,
        quota: Quota | None = None,
        per_user: PerKey = 2,
        total: int | None = None,
        timeout: float | None = None,
        close_timeout: float = 5.0,
        deadline: float | None = None,
        pool_idle: int = 0,
        pool_max: int = 64,
        idle_ttl: float = 60.0,
        reset: Callable[[E], object] | None = None,
        thread_quota: ThreadQuota | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        create: Callable[[UserContext], AbstractContextManager[E]],
        *,
        close: Callable[[E], object] | None = None,
        quota: Quota | None = None,
        per_user: PerKey = 2,
        total: int | None = None,
        timeout: float | None = None,
        close_timeout: float = 5.0,
        deadline: float | None = None,
        pool_idle: int = 0,
        pool_max: int = 64,
        idle_ttl: float = 60.0,
        reset: Callable[[E], object] | None = None,
        thread_quota: ThreadQuota | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        create: Callable[[UserContext], E],
        *,
        close: Callable[[E], object] | None = None,
        quota: Quota | None = None,
        per_user: PerKey = 2,
        total: int | None = None,
        timeout: float | None = None,
        close_timeout: float = 5.0,
        deadline: float | None = None,
        pool_idle: int = 0,
        pool_max: int = 64,
        idle_ttl: float = 60.0,
        reset: Callable[[E], object] | None = None,
        thread_quota: ThreadQuota | None = None,
    ) -> None: ...

    def __init__(  # noqa: PLR0913
        self,
        create: Callable[[UserContext], Made[E]],
        *,
        close: Callable[[E], object] | None = None,
        quota: Quota | None = None,
        per_user: PerKey = 2,
        total: int | None = None,
        timeout: float | None = None,
        close_timeout: float = 5.0,
        deadline: float | None = None,
        pool_idle: int = 0,
        pool_max: int = 64,
        idle_ttl: float = 60.0,
        reset: Callable[[E], object] | None = None,
        thread_quota: ThreadQuota | None = None,
    ) -> None:
        _checks.function("create", create)
        _checks.function("close", close, allow_none=True)
        _checks.function("reset", reset, allow_none=True)
        _checks.seconds("timeout", timeout, allow_none=True, zero_ok=True)
        _checks.seconds("close_timeout", close_timeout, allow_none=True)
        _checks.seconds("deadline", deadline, allow_none=True)
        _checks.seconds("idle_ttl", idle_ttl, allow_none=True)
        _checks.count("pool_idle", pool_idle, minimum=0)
        _checks.count("pool_max", pool_max, minimum=0)
        self._create = create
        self._close = close
        _checks.limit("per_user", per_user, allow_none=False)
        _checks.limit("total", total, allow_none=True)
        self._quota: Quota = (
            quota if quota is not None else LocalQuota(per_key=per_user, total=total)
        )
        self._per_user = per_user
        self._total = total
        self._thread_quota = thread_quota
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._deadline = deadline
        self._pool_idle = pool_idle
        self._pool_max = pool_max
        self._idle_ttl = idle_ttl
        self._reset = reset
        self._counters = _Counters()
        self._sync_counters = _Counters()
        self._sync_lock = threading.Lock()
        self._idle: dict[str, list[_Made[E]]] = {}
        self._idle_lru: OrderedDict[int, _Made[E]] = OrderedDict()
        self._uses: set[_EngineUse[E]] = set()
        self._creating = 0
        self._closed = False
        self._drained: anyio.Event | None = None

    @property
    def quota(self) -> Quota:
        """
        The quota `engine` draws from.
        """
        return self._quota

    def engine(self, ctx: UserContext | None = None) -> AbstractAsyncContextManager[E]:
        """
        Return an async context manager giving an engine for *ctx*.

        *ctx* defaults to `usercontext.current`. The body runs with *ctx* bound.

        Raises:
            usercontext.exceptions.FactoryClosedError: After `aclose`.
            usercontext.exceptions.QuotaExceededError: If the quota is full and
                *timeout* is 0.
            usercontext.exceptions.QuotaTimeoutError: If no slot freed up in time.
            usercontext.exceptions.EngineDeadlineError: If the body ran past
                the *deadline*.
        """
        return _EngineUse(self, ctx)

    def engine_sync(self, ctx: UserContext | None = None) -> AbstractContextManager[E]:
        """
        Return a context manager giving an engine for *ctx*, for threads.

        It follows `engine`, on a thread-safe `ThreadQuota`, with these
        differences: *create*, *close* and context managers must be sync, the
        *deadline* does not apply (a thread cannot be cancelled), engines are
        not pooled, and a close that hangs cannot be cut.
        """
        return _SyncEngineUse(self, ctx)

    def stats(self, top: int = 10) -> FactoryStats:
        """
        Return a snapshot of the counters, with the *top* busiest users.
        """
        a, s = self._counters, self._sync_counters
        with self._sync_lock:
            by_user = dict(a.by_user)
            for user_id, n in s.by_user.items():
                by_user[user_id] = by_user.get(user_id, 0) + n
            waiting = self._quota.stats(top=0).waiting
            if self._thread_quota is not None:
                waiting += self._thread_quota.stats(top=0).waiting
            return FactoryStats(
                created=a.created + s.created,
                closed=a.closed + s.closed,
                active=a.active + s.active,
                active_per_user=tuple(heapq.nlargest(top, by_user.items(), key=lambda kv: kv[1])),
                waiting=waiting,
                rejected=a.rejected + s.rejected,
                timed_out=a.timed_out + s.timed_out,
                create_errors=a.create_errors + s.create_errors,
                close_errors=a.close_errors + s.close_errors,
                deadline_hits=a.deadline_hits,
                peak_active=max(a.peak, s.peak),
                reused=a.reused,
                idle=len(self._idle_lru),
            )

    async def aclose(self, timeout: float = 10.0) -> None:
        """
        Stop creating engines and close everything.

        New requests get `usercontext.exceptions.FactoryClosedError` at once.
        Bodies still running get *timeout* seconds to finish; then they are
        cancelled (they see `usercontext.exceptions.FactoryClosedError`), and
        their engines closed. Idle engines are closed. Calling it again waits
        for the first call's work and returns. If it is cancelled (on asyncio
        natively too), it stops waiting, cancels the bodies at once, closes
        every engine, and then raises the cancellation.
        """
        _checks.seconds("timeout", timeout, allow_none=True, zero_ok=True)
        self._closed = True
        # A cancellation (of the caller, or natively of its asyncio task)
        # cuts the wait for bodies short, never the closing: it is raised once
        # every engine is closed.
        cancelled: BaseException | None = None
        if self._uses or self._creating:
            drained = self._drained = self._drained or anyio.Event()
            try:
                with anyio.move_on_after(timeout):
                    await drained.wait()
            except BaseException as e:  # noqa: BLE001  # raised once everything is closed
                cancelled = e
            why = (
                "aclose() was cancelled"
                if cancelled is not None
                else f"the factory's close timeout of {timeout:g} s passed"
            )
            for use in list(self._uses):
                use.abort(why)
            with anyio.CancelScope(shield=True):
                try:
                    await shielded(drained.wait())
                except BaseException as e:  # noqa: BLE001  # raised once everything is closed
                    cancelled = cancelled or e
        with anyio.CancelScope(shield=True):
            while self._idle_lru:
                _, made = self._idle_lru.popitem(last=False)
                self._forget_idle(made)
                try:
                    await self._close_idle(made)
                except BaseException as e:  # noqa: BLE001  # raised after the others
                    cancelled = cancelled or e
        if cancelled is not None:
            raise cancelled

    # -- internals --

    def _settle(self) -> None:
        """
        Tell a waiting `aclose` when no engine is in use or being made any more.
        """
        if self._drained is not None and not self._uses and not self._creating:
            self._drained.set()

    def _check_open(self) -> None:
        if self._closed:
            msg = "This EngineFactory is closed and creates no more engines; create a new one."
            raise FactoryClosedError(msg)

    async def _obtain(self, ctx: UserContext) -> _Made[E]:
        if self._pool_idle:
            if self._idle_lru:
                await self._sweep()  # never hand out a stale engine
            made = self._take_idle(ctx.user_id)
            if made is not None:
                self._counters.reused += 1
                return made
        c = self._counters
        try:
            result: Any = self._create(ctx)
            kind = kind_of(type(result))
            if kind is AWAITABLE:
                result = await result
                kind = kind_of(type(result))
            if kind is ASYNC_CM:
                made = _Made(ctx.user_id, await result.__aenter__(), result.__aexit__)
            elif kind is ASYNC_GEN:
                made = _Made(
                    ctx.user_id, await first_value_async(result, "create"), async_gen_exit(result)
                )
            elif kind is SYNC_CM:
                made = _Made(ctx.user_id, result.__enter__(), result.__exit__)
            elif kind is GEN:
                made = _Made(ctx.user_id, first_value(result, "create"), gen_exit(result))
            else:
                made = _Made(ctx.user_id, result, None)
        except Exception:
            c.create_errors += 1
            raise
        c.created += 1
        return made

    def _take_idle(self, user_id: str) -> _Made[E] | None:
        stack = self._idle.get(user_id)
        if not stack:
            return None
        made = stack.pop()
        if not stack:
            del self._idle[user_id]
        del self._idle_lru[id(made)]
        return made

    async def _park_or_close(
        self,
        made: _Made[E],
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> list[BaseException]:
        if exc is None and self._pool_idle and not self._closed:
            stack = self._idle.get(made.user_id)
            if stack is None or len(stack) < self._pool_idle:
                try:
                    failed = self._reset is not None and await run_steps(
                        [(self._reset, (made.engine,))],
                        self._close_timeout,
                        "the reset of an engine of user %r",
                        made.user_id,
                    )
                except BaseException:
                    # Cancelled while resetting (the reset ran to its end):
                    # closed rather than parked half-known, then raised.
                    _report(await self._close_made(made, None, None, None), None, made.user_id)
                    raise
                if failed:
                    logger.warning(
                        "Resetting an engine for reuse failed, closing it: %s",
                        "; ".join(map(describe, failed)),
                    )
                else:
                    made.parked_at = time.monotonic()
                    self._idle.setdefault(made.user_id, []).append(made)
                    self._idle_lru[id(made)] = made
                    while len(self._idle_lru) > self._pool_max:
                        _, old = self._idle_lru.popitem(last=False)
                        self._forget_idle(old)
                        await self._close_idle(old)
                    return []
        return await self._close_made(made, exc_type, exc, tb)

    def _forget_idle(self, made: _Made[E]) -> None:
        stack = self._idle[made.user_id]
        stack.remove(made)
        if not stack:
            del self._idle[made.user_id]

    async def _sweep(self) -> None:
        """
        Close the idle engines older than the idle TTL.
        """
        stale = time.monotonic() - self._idle_ttl
        while self._idle_lru:
            made = next(iter(self._idle_lru.values()))
            if made.parked_at > stale:
                break
            del self._idle_lru[id(made)]
            self._forget_idle(made)
            await self._close_idle(made)

    async def _close_idle(self, made: _Made[E]) -> None:
        # An idle engine is closed on the way of some other request, maybe of
        # another user: its errors are logged, never handed to that request.
        for error in await self._close_made(made, None, None, None):
            logger.error(
                "Closing an idle engine of user %r failed: %s", made.user_id, describe(error)
            )

    async def _close_made(
        self,
        made: _Made[E],
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> list[BaseException]:
        """
        Close *made*, shielded and bounded by the close timeout; return the errors.
        """
        c = self._counters
        c.closed += 1
        close = self._close
        if made.exit is None and close is not None:
            # The common case, a plain engine and a sync close, needs no scope.
            try:
                result = close(made.engine)
            except Exception as e:  # noqa: BLE001  # reported by the caller
                c.close_errors += 1
                return [e]
            if result is None or kind_of(type(result)) is not AWAITABLE:
                return []
            steps: list[tuple[Callable[..., object], tuple[Any, ...]]] = [(_await, (result,))]
        else:
            steps = []
            if made.exit is not None:
                steps.append((made.exit, (exc_type, exc, tb)))
            if close is not None:
                steps.append((close, (made.engine,)))
        errors = await run_steps(steps, self._close_timeout, "an engine of user %r", made.user_id)
        c.close_errors += len(errors)
        return errors


def _await(awaitable: Awaitable[object]) -> Awaitable[object]:
    return awaitable


def _report(errors: list[BaseException], body_error: BaseException | None, user_id: str) -> None:
    """
    Never lose a close error: log each, and attach it to the body's error.
    """
    for error in errors:
        logger.error("Closing an engine of user %r failed: %s", user_id, describe(error))
        # Cancellations are BaseExceptions, not Exceptions: they carry no notes.
        if isinstance(body_error, Exception):
            add_note(body_error, f"While closing its engine: {describe(error)}")
    if body_error is not None:
        body_error.close_errors = [*getattr(body_error, "close_errors", ()), *errors]  # type: ignore[attr-defined]


class _EngineUse(Generic[E]):
    __slots__ = (
        "_aborted",
        "_bind",
        "_cancelling",
        "_ctx",
        "_factory",
        "_lease",
        "_made",
        "_scope",
        "_task",
        "_why",
    )
    _scope: anyio.CancelScope | None
    _task: Any  # the asyncio or trio task that entered

    def __init__(self, factory: EngineFactory[E], ctx: UserContext | None) -> None:
        self._factory = factory
        self._ctx = ctx
        self._aborted = False
        self._why = ""

    def abort(self, why: str) -> None:
        """
        Cut the body short because the factory is closing: *why* completes
        "the body was cancelled because ..." in the error the body sees.
        """
        self._aborted = True
        self._why = why
        scope = self._scope
        if scope is not None:
            scope.cancel()  # a no-op once the body has ended
        elif self._task is not None:  # None once the body has ended
            self._task.cancel("The EngineFactory was closed.")

    async def __aenter__(self) -> E:
        f = self._factory
        f._check_open()
        ctx = self._ctx = self._ctx if self._ctx is not None else current()
        b = self._bind = bind(ctx)
        b.__enter__()
        c = f._counters
        try:
            try:
                lease = await f._quota.acquire(ctx.user_id, timeout=f._timeout)
            except QuotaTimeoutError:
                c.timed_out += 1
                raise
            except QuotaExceededError:
                c.rejected += 1
                raise
            try:
                f._check_open()
                f._creating += 1
                try:
                    made = await f._obtain(ctx)
                finally:
                    f._creating -= 1
                if f._closed:
                    await f._close_idle(made)
                    f._check_open()
            except BaseException:
                await f._quota.arelease(lease)
                f._settle()
                raise
        except BaseException:
            b.__exit__(None, None, None)
            raise
        self._lease = lease
        self._made = made
        c.start(ctx.user_id)
        f._uses.add(self)
        deadline = f._deadline
        try:
            task = current_task()
        except RuntimeError:  # no asyncio loop: trio
            task = None
        if task is not None and deadline is None:
            # No cancel scope held open over the body: it costs more than the
            # rest, and one left in the task that entered it (by an async
            # generator another task finishes) breaks that task's scopes.
            # aclose() cuts the body with a native cancellation instead.
            self._scope = None
            self._task = task
            self._cancelling = task.cancelling() if _CANCELLING else 0
            return made.engine
        scope = self._scope = anyio.CancelScope(
            deadline=math.inf if deadline is None else anyio.current_time() + deadline
        )
        scope.__enter__()
        self._task = running_task()
        return made.engine

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        f = self._factory
        ctx = self._ctx
        assert ctx is not None  # noqa: S101  # set by __aenter__
        scope = self._scope
        if scope is None:
            # Cut by aclose() (natively) if it cancelled the task, and nothing
            # else did: asyncio.timeout's rule, by Task.cancelling().
            caught = (
                self._aborted
                and (not _CANCELLING or self._task.uncancel() <= self._cancelling)
                and isinstance(exc, CancelledError)
            )
            self._task = None  # the body has ended: aclose() must not cancel the close
        elif running_task() is self._task:
            # trio's scopes return True from __exit__ even without an exception.
            caught = bool(scope.__exit__(exc_type, exc, tb)) and exc is not None
        else:
            # Left in another task than the one that entered it (an async
            # generator finished by another task, as streaming responses do):
            # its cancel scope cannot be exited here, and its body has ended,
            # so the deadline is dropped; the engine is closed as usual.
            scope.deadline = math.inf
            caught = False
        body_error = None if caught else exc
        c = f._counters
        hit = caught and not self._aborted
        if hit:
            c.deadline_hits += 1
        try:
            errors = await f._park_or_close(
                self._made, None if caught else exc_type, body_error, None if caught else tb
            )
            if f._idle_lru:
                await f._sweep()
        finally:
            # Counted out before the slot is given back, so that the next
            # holder is never counted beside this one.
            c.stop(ctx.user_id)
            await f._quota.arelease(self._lease)
            f._uses.discard(self)
            f._settle()
            self._bind.__exit__(None, None, None)
        if hit:
            error: BaseException = EngineDeadlineError(
                f"The body using an engine of user {ctx.user_id!r} ran past its deadline of "
                f"{f._deadline} s and was cancelled. Make it finish sooner or raise the "
                "factory's deadline."
            )
        elif caught:
            error = FactoryClosedError(
                f"The EngineFactory was closed while user {ctx.user_id!r} used an engine; "
                f"the body was cancelled because {self._why}."
            )
        elif errors and body_error is None:
            error = errors[0]
            errors = errors[1:]
        else:
            _report(errors, body_error, ctx.user_id)
            return
        _report(errors, error, ctx.user_id)
        raise error


_ASYNC_KINDS = (AWAITABLE, ASYNC_CM, ASYNC_GEN)


def _refuse_async(result: object, hook: str) -> str:
    """
    Return the kind of *result*, or raise `TypeError` if it needs an event loop.
    """
    kind = PLAIN if result is None else kind_of(type(result))
    if kind in _ASYNC_KINDS:
        close = getattr(result, "close", None)
        if kind is AWAITABLE and close is not None:
            close()  # no "never awaited" warning on top of the error
        msg = (
            f"engine_sync() needs a sync {hook}, but it returned an {kind}; "
            "use `async with factory.engine()` instead."
        )
        raise TypeError(msg)
    return kind


class _SyncEngineUse(Generic[E]):
    __slots__ = ("_bind", "_ctx", "_factory", "_lease", "_made")

    def __init__(self, factory: EngineFactory[E], ctx: UserContext | None) -> None:
        self._factory = factory
        self._ctx = ctx

    def __enter__(self) -> E:
        f = self._factory
        f._check_open()
        ctx = self._ctx = self._ctx if self._ctx is not None else current()
        b = self._bind = bind(ctx)
        b.__enter__()
        c = f._sync_counters
        try:
            quota = f._thread_quota
            if quota is None:
                with f._sync_lock:
                    if f._thread_quota is None:
                        f._thread_quota = ThreadQuota(per_key=f._per_user, total=f._total)
                    quota = f._thread_quota
            try:
                lease = quota.acquire(ctx.user_id, timeout=f._timeout)
            except (QuotaTimeoutError, QuotaExceededError) as e:
                with f._sync_lock:
                    if isinstance(e, QuotaTimeoutError):
                        c.timed_out += 1
                    else:
                        c.rejected += 1
                raise
            try:
                made = self._create(ctx)
            except BaseException:
                lease.release()
                raise
        except BaseException:
            b.__exit__(None, None, None)
            raise
        self._lease = lease
        self._made = made
        with f._sync_lock:
            c.created += 1
            c.start(ctx.user_id)
        return made.engine

    def _create(self, ctx: UserContext) -> _Made[E]:
        f = self._factory
        try:
            result: Any = f._create(ctx)
            kind = _refuse_async(result, "create")
            if kind is SYNC_CM:
                return _Made(ctx.user_id, result.__enter__(), result.__exit__)
            if kind is GEN:
                return _Made(ctx.user_id, first_value(result, "create"), gen_exit(result))
            return _Made(ctx.user_id, result, None)
        except Exception:
            with f._sync_lock:
                f._sync_counters.create_errors += 1
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        f = self._factory
        ctx = self._ctx
        assert ctx is not None  # noqa: S101  # set by __enter__
        made = self._made
        errors: list[BaseException] = []
        try:
            if made.exit is not None:
                try:
                    made.exit(exc_type, exc, tb)
                except Exception as e:  # noqa: BLE001  # collected and reported
                    errors.append(e)
            if f._close is not None:
                try:
                    _refuse_async(f._close(made.engine), "close")
                except Exception as e:  # noqa: BLE001  # collected and reported
                    errors.append(e)
        finally:
            c = f._sync_counters
            with f._sync_lock:
                c.closed += 1
                c.close_errors += len(errors)
                c.stop(ctx.user_id)
            # Given back only once counted out: another thread takes the slot
            # at once, and must never be counted beside this one.
            self._lease.release()
            self._bind.__exit__(None, None, None)
        if errors and exc is None:
            _report(errors[1:], errors[0], ctx.user_id)
            raise errors[0]
        _report(errors, exc, ctx.user_id)
