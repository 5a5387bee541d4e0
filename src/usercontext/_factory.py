"""
`EngineFactory`: expensive per-request engines, created under each user's quota
and always closed.
"""

from __future__ import annotations

import heapq
import threading

from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import anyio
import attrs

from . import _checks
from ._admission import Admission, AdmissionStats
from ._engine_use import EngineUse, Made, report
from ._idle_pool import IdlePool
from ._lifecycle import (
    AWAITABLE,
    PLAIN,
    aleave,
    describe,
    drive,
    kind_of,
    logger,
    shielded,
)
from ._local_quota import LocalQuota, ThreadQuota
from ._quota import QuotaStats  # noqa: TC001  # the docs resolve FactoryStats.quota at runtime
from .exceptions import FactoryClosedError


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AbstractAsyncContextManager, AbstractContextManager
    from types import TracebackType
    from typing import TypeAlias

    from typing_extensions import Self

    from ._context import UserContext
    from ._lifecycle import ExcInfo
    from ._local_quota import PerKey
    from ._quota import Lease, Quota

    Entered: TypeAlias = tuple[str, Any, Any]

E = TypeVar("E")

if TYPE_CHECKING:
    Makes: TypeAlias = E | Awaitable[E] | AbstractAsyncContextManager[E] | AbstractContextManager[E]

__all__ = ["EngineFactory", "FactoryStats"]

_NO_ERROR: ExcInfo = (None, None, None)
_new_use = object.__new__


@attrs.frozen
class FactoryStats:
    """
    A snapshot of an `EngineFactory`'s counters.

    Attributes:
        in_use: Engines in use right now, in ``async with`` and ``with``.
        idle: Engines parked in the idle pool right now.
        peak: The most engines in use at once (in ``async with``, or in
            ``with``, whichever was higher).
        top: The users with the most engines in use, as ``(user_id, count)``
            pairs, most first.
        created: Engines created.
        closed: Engines closed (created = closed + in_use + idle once settled).
        reused: Engines handed out again from the idle pool.
        create_errors: Calls of *create* that raised.
        close_errors: Errors raised (or timeouts hit) while closing engines.
        deadline_errors: Bodies cancelled by the *deadline*.
        quota: The stats of the quota ``async with`` draws from: its
            ``waiting``, ``rejected`` and ``timed_out`` are the factory's
            requests (and those of whatever else shares the quota).
        thread_quota: The stats of the quota ``with`` draws from, or `None`
            before the first ``with`` (when no *thread_quota* was given).
        admission: The stats of the factory's `Admission` policy, or `None`
            without one.

    .. versionadded:: 0.1.0
    """

    in_use: int
    idle: int
    peak: int
    top: tuple[tuple[str, int], ...]
    created: int
    closed: int
    reused: int
    create_errors: int
    close_errors: int
    deadline_errors: int
    quota: QuotaStats
    thread_quota: QuotaStats | None
    admission: AdmissionStats | None = None


class _Counters:
    __slots__ = (
        "by_user",
        "close_errors",
        "closed",
        "create_errors",
        "created",
        "deadline_errors",
        "in_use",
        "peak",
        "reused",
    )

    def __init__(self) -> None:
        self.created = self.closed = self.in_use = self.peak = self.reused = 0
        self.create_errors = self.close_errors = self.deadline_errors = 0
        self.by_user: dict[str, int] = {}

    def start(self, user_id: str) -> None:
        in_use = self.in_use = self.in_use + 1
        self.peak = max(self.peak, in_use)
        self.by_user[user_id] = self.by_user.get(user_id, 0) + 1

    def stop(self, user_id: str) -> None:
        self.in_use -= 1
        n = self.by_user[user_id] - 1
        if n:
            self.by_user[user_id] = n
        else:
            del self.by_user[user_id]


class EngineFactory(Generic[E]):
    """
    Create an expensive engine per request, under per-user and global quotas,
    and always close it.

    ``async with factory.engine(ctx) as engine:`` takes a slot of
    ``ctx.user_id`` from the quota, creates the engine with ``create(ctx)``,
    binds *ctx* for the body, then closes the engine (shielded from
    cancellation, cut after *close_timeout*) and gives the slot back, on every
    path: create fails, the body fails or is cancelled, close fails or hangs.
    Engines are never shared between users. Sync code (threads) uses the same
    object with ``with``; see `engine`.

    ``async with factory:`` closes the factory on exit, as `aclose` does.

    Args:
        create: Makes an engine from a `usercontext.UserContext`. It may return
            the engine, an awaitable of it, an (async) context manager whose
            ``__aenter__``/``__enter__`` gives the engine and whose exit closes
            it, or an (async) generator whose first value is the engine and
            whose rest closes it.
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
        thread_quota: The quota of ``with factory.engine()``; a `ThreadQuota`
            of *per_user* and *total* by default.
        admission: The `Admission` policy (rate limit, load shedding,
            circuit breaker) that ``async with factory.engine()`` checks before
            queueing or creating anything, or `None` (no cost then).

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
        admission: Admission | None = None,
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
        admission: Admission | None = None,
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
        admission: Admission | None = None,
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
        admission: Admission | None = None,
    ) -> None: ...

    def __init__(  # noqa: PLR0913
        self,
        create: Callable[[UserContext], Makes[E]],
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
        admission: Admission | None = None,
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
        _checks.limit("per_user", per_user, allow_none=False)
        _checks.limit("total", total, allow_none=True)
        if admission is not None and not isinstance(admission, Admission):
            msg = (  # type: ignore[unreachable]  # checked for untyped callers
                "admission must be a usercontext.Admission(rate=..., shed=..., "
                f"breaker=...) or None, got {admission!r}."
            )
            raise TypeError(msg)
        self._admission = admission
        self._create = create
        self._close = close
        self._quota: Quota = (
            quota if quota is not None else LocalQuota(per_key=per_user, total=total)
        )
        # A LocalQuota's release never waits: the hot path calls it directly.
        self._local_quota = type(self._quota) is LocalQuota
        # The hot path: a LocalQuota and no admission policy.
        self._fast = self._local_quota and admission is None
        self._breaker = None if admission is None else admission.breaker
        self._per_user = per_user
        self._total = total
        self._thread_quota = thread_quota
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._deadline = deadline
        # None when nothing is pooled: the hot path then skips the pool.
        self._pool: IdlePool[Made[E]] | None = (
            IdlePool(pool_idle, pool_max, idle_ttl) if pool_idle else None
        )
        self._reset = reset
        # An engine is made on the slow path when it may come from the pool,
        # or its creation goes through a circuit breaker.
        self._slow_make = self._pool is not None or self._breaker is not None
        # The type of plain engine create last returned: one of it needs no
        # kind_of() call.
        self._plain_type: type[object] | None = None
        self._counters = _Counters()
        self._sync_counters = _Counters()
        self._sync_lock = threading.Lock()
        # The uses in async with, from the engine's creation to its slot's
        # return: how many are in use, and what aclose() waits for and cuts.
        self._uses: set[EngineUse[E]] = set()
        self._peak = 0  # the most uses at once
        self._creating = 0
        self._closed = False
        self._drained: anyio.Event | None = None
        if admission is not None:
            # Last: a factory that failed to be made does not own it.
            admission._attach(self, getattr(create, "__qualname__", None) or repr(create))

    @property
    def admission(self) -> Admission | None:
        """
        The factory's `Admission` policy, or `None`.
        """
        return self._admission

    @property
    def quota(self) -> Quota:
        """
        The quota ``async with factory.engine()`` draws from.
        """
        return self._quota

    def engine(self, ctx: UserContext | None = None) -> EngineUse[E]:
        """
        Return an `EngineUse` giving an engine for *ctx*, in ``async with`` or,
        in sync code (threads), ``with``.

        *ctx* defaults to `usercontext.current`. The body runs with *ctx*
        bound. ``with`` draws from a thread-safe `ThreadQuota` (*thread_quota*)
        and differs from ``async with`` in this: *create*, *close* and what
        *create* returns must be sync, the *deadline* does not apply (a thread
        cannot be cancelled), engines are not pooled, a close that hangs
        cannot be cut, and `aclose` does not wait for it.

        Raises:
            usercontext.exceptions.FactoryClosedError: After `aclose`.
            usercontext.exceptions.QuotaExceededError: If the quota is full and
                *timeout* is 0.
            usercontext.exceptions.QuotaTimeoutError: If no slot freed up in time.
            usercontext.exceptions.EngineDeadlineError: If the body ran past
                the *deadline*.
            usercontext.exceptions.RateLimitedError: If the *admission*
                policy's rate limit refused the request.
            usercontext.exceptions.LoadShedError: If the *admission* policy
                shed the request instead of queueing it.
            usercontext.exceptions.CircuitOpenError: If the *admission*
                policy's circuit breaker is open.
        """
        # EngineUse(self, ctx), without the call of its __init__: one is
        # made per request.
        u: EngineUse[E] = _new_use(EngineUse)  # pyright: ignore[reportUnknownVariableType]
        u._factory = self
        u._ctx = ctx
        return u

    def stats(self, top: int = 10) -> FactoryStats:
        """
        Return a snapshot of the counters, with the *top* busiest users.
        """
        a, s = self._counters, self._sync_counters
        # The engines in use in async with are counted from the uses
        # themselves, here rather than on every request.
        uses = [use._ctx.user_id for use in self._uses]  # type: ignore[union-attr]  # set on entry
        with self._sync_lock:
            by_user = dict(s.by_user)
            for user_id in uses:
                by_user[user_id] = by_user.get(user_id, 0) + 1
            threads = self._thread_quota
            return FactoryStats(
                in_use=len(uses) + s.in_use,
                idle=0 if self._pool is None else len(self._pool),
                peak=max(self._peak, s.peak),
                top=tuple(heapq.nlargest(top, by_user.items(), key=lambda kv: kv[1])),
                created=a.created + s.created,
                closed=a.closed + s.closed,
                reused=a.reused,
                create_errors=a.create_errors + s.create_errors,
                close_errors=a.close_errors + s.close_errors,
                deadline_errors=a.deadline_errors,
                quota=self._quota.stats(top=top),
                thread_quota=None if threads is None else threads.stats(top=top),
                admission=None if self._admission is None else self._admission.stats(),
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

    async def aclose(self, *, timeout: float = 10.0) -> None:
        """
        Stop creating engines and close everything.

        New requests get `usercontext.exceptions.FactoryClosedError` at once.
        Bodies still running in ``async with`` get *timeout* seconds to finish;
        then they are cancelled (they see
        `usercontext.exceptions.FactoryClosedError`), and their engines closed.
        Idle engines are closed. Calling it again waits for the first call's
        work and returns. If it is cancelled (on asyncio natively too), it stops
        waiting, cancels the bodies at once, closes every engine, and then
        raises the cancellation.
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
            except BaseException as e:  # raised once everything is closed
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
                except BaseException as e:  # raised once everything is closed
                    cancelled = cancelled or e
        if self._pool is not None:
            with anyio.CancelScope(shield=True):
                for made in self._pool.drain():
                    try:
                        await self._close_idle(made.entered, made.user_id)
                    except BaseException as e:  # noqa: PERF203  # raised after the others
                        cancelled = cancelled or e
        if cancelled is not None:
            raise cancelled

    def __repr__(self) -> str:
        create = getattr(self._create, "__qualname__", None) or repr(self._create)
        state = "closed" if self._closed else "open"
        in_use = len(self._uses) + self._sync_counters.in_use
        idle = 0 if self._pool is None else len(self._pool)
        return f"<usercontext.EngineFactory({create}, {state}, in_use={in_use}, idle={idle})>"

    # -- internals, called by EngineUse --

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

    def _threads(self) -> ThreadQuota:
        """
        Return the quota of ``with``, made on first use.
        """
        quota = self._thread_quota
        if quota is None:
            with self._sync_lock:
                if self._thread_quota is None:
                    self._thread_quota = ThreadQuota(per_key=self._per_user, total=self._total)
                quota = self._thread_quota
        return quota

    async def _reuse(self, user_id: str) -> Made[E] | None:
        """
        Return an idle engine of *user_id* from the pool, if there is one.
        """
        pool = self._pool
        assert pool is not None  # noqa: S101  # called only with a pool
        if len(pool):
            await self._sweep()  # never hand out a stale engine
        made = pool.take(user_id)
        if made is not None:
            self._counters.reused += 1
        return made

    async def _give_back(self, lease: Lease | None, user_id: str) -> None:
        """
        Hand back the slot of *lease*, or of *user_id* held without a lease
        (a `LocalQuota`'s, which are all held so).
        """
        if lease is None:
            self._quota._return(user_id)  # type: ignore[attr-defined]  # a LocalQuota
        else:
            # A network quota's release is a round trip.
            await self._quota.arelease(lease)

    async def _park_or_close(self, made: Made[E], exc_info: ExcInfo) -> list[BaseException]:
        pool = self._pool
        if (
            pool is not None
            and exc_info[1] is None
            and not self._closed
            and pool.has_room(made.user_id)
        ):
            failed = None
            try:
                failed = await self._reset_engine(made)
            except BaseException:
                # Cancelled while resetting (the reset ran to its end):
                # closed rather than parked half-known, then raised.
                report(
                    await self._close_entered(made.entered, made.user_id, _NO_ERROR),
                    None,
                    made.user_id,
                )
                raise
            if failed is None:
                for old in pool.park(made):
                    await self._close_idle(old.entered, old.user_id)
                return []
            logger.warning("Resetting an engine for reuse failed, closing it: %s", describe(failed))
        return await self._close_entered(made.entered, made.user_id, exc_info)

    async def _reset_engine(self, made: Made[E]) -> Exception | None:
        """
        Run the *reset* hook on *made*, shielded and bounded; return its error.
        """
        if self._reset is None:
            return None
        try:
            result = self._reset(made.engine)
            if result is not None and kind_of(type(result)) is AWAITABLE:
                await drive(
                    result,  # type: ignore[arg-type]
                    self._close_timeout,
                    "the reset of an engine of user %r",
                    made.user_id,
                )
        except Exception as e:  # the engine is closed instead
            return e
        return None

    async def _sweep(self) -> None:
        """
        Close the idle engines older than the idle TTL.
        """
        assert self._pool is not None  # noqa: S101  # called only with a pool
        for made in self._pool.take_stale():
            await self._close_idle(made.entered, made.user_id)

    async def _close_idle(self, entered: Entered, user_id: str) -> None:
        # An idle engine is closed on the way of some other request, maybe of
        # another user: its errors are logged, never handed to that request.
        for error in await self._close_entered(entered, user_id, _NO_ERROR):
            logger.error("Closing an idle engine of user %r failed: %s", user_id, describe(error))

    async def _drive_close(self, result: Awaitable[object], user_id: str) -> None:
        """
        Await what the close hook returned, shielded and cut after the close timeout.
        """
        await drive(result, self._close_timeout, "an engine of user %r", user_id)

    async def _close_entered(
        self, entered: Entered, user_id: str, exc_info: ExcInfo
    ) -> list[BaseException]:
        """
        Close the engine *entered* of *user_id*, shielded and bounded by the
        close timeout; return the errors. `EngineUse.__aexit__` has the plain
        case inline.
        """
        c = self._counters
        c.closed += 1
        close = self._close
        if entered[0] is PLAIN and close is not None:
            # The twin of aleave for a plain engine: with a sync close it
            # needs no coroutine nor list.
            try:
                result = close(entered[2])
                if result is not None and kind_of(type(result)) is AWAITABLE:
                    await self._drive_close(result, user_id)  # type: ignore[arg-type]  # by its kind
            except Exception as e:  # reported by the caller
                c.close_errors += 1
                return [e]
            return []
        errors: list[BaseException] = []
        fatal = await aleave(
            entered,
            self._close,
            exc_info,
            errors,
            timeout=self._close_timeout,
            what="an engine of user %r",
            what_args=(user_id,),
        )
        c.close_errors += len(errors)
        if fatal is not None:
            report(errors, fatal, user_id)
            raise fatal
        return errors
