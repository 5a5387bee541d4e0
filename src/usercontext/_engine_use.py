"""
`EngineUse`: one request's use of an engine from an `EngineFactory`, in
``async with`` or ``with``: the quota slot, the engine, the binding of the
context, the deadline, and the close.
"""

from __future__ import annotations

import math
import sys

from asyncio import CancelledError
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._admission import admit
from ._admission_threads import admit_thread
from ._context import UserContext
from ._current import _get, _var, bind, current
from ._lifecycle import (
    AWAITABLE,
    PLAIN,
    add_note,
    aenter,
    asyncio_task,
    describe,
    enter,
    kind_of,
    leave,
    logger,
    running_task,
)
from .exceptions import EngineDeadlineError, FactoryClosedError, LeaseLostError


if TYPE_CHECKING:
    from contextvars import Token
    from types import TracebackType

    from ._factory import EngineFactory
    from ._lifecycle import ExcInfo
    from ._quota import Lease

E = TypeVar("E")

__all__ = ["EngineUse"]

# Task.cancelling() and uncancel(), by which a native cancellation of one's
# own is told apart from others' (Python 3.11+).
_CANCELLING = sys.version_info >= (3, 11)
_SYNC_FIX = "use `async with factory.engine()` instead of `with`"
# The reason given to abort() when the quota lost the lease.
_LOST = "the quota lease was lost"
_NO_ERROR: ExcInfo = (None, None, None)


class Made(Generic[E]):
    """
    An engine, and what `usercontext._lifecycle` needs to close it.
    """

    __slots__ = ("engine", "entered", "parked_at", "user_id")

    def __init__(self, user_id: str, entered: tuple[str, Any, Any]) -> None:
        self.user_id = user_id
        self.entered = entered
        self.engine: E = entered[2]
        self.parked_at = 0.0


def _bind(ctx: UserContext) -> Token[UserContext] | None:
    """
    Bind *ctx* for a body, as `usercontext.bind` does, and return the token
    that undoes it, or `None` if *ctx* was bound already (the usual case: the
    request's scope bound it, and `EngineFactory.engine` took it from there).
    """
    prev = _get(None)
    if prev is ctx:
        return None
    # Not a UserContext (a caller without type checks): bind() says so.
    if isinstance(ctx, UserContext) and (prev is None or prev.user_id == ctx.user_id):  # type: ignore[redundant-expr]
        return _var.set(ctx)
    bind(ctx).__enter__()  # raises the error that fits: another user's, or no context
    raise AssertionError  # pragma: no cover  # unreachable


def report(errors: list[BaseException], body_error: BaseException | None, user_id: str) -> None:
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


class EngineUse(Generic[E]):
    """
    One use of an engine from `EngineFactory.engine`: ``async with`` (or, in
    sync code, ``with``) gives the engine and closes it after the body.

    .. versionadded:: 0.1.0
    """

    __slots__ = (
        "_aborted",
        "_cancelling",
        "_ctx",
        "_engine",
        "_entered",
        "_factory",
        "_lease",
        "_made",
        "_scope",
        "_task",
        "_token",
        "_why",
    )
    _token: Token[UserContext] | None  # None when the context was bound already
    _lease: Lease | None  # None for a slot of a LocalQuota, held by key
    # What the factory's close needs; None for a plain engine in async with.
    _entered: tuple[str, Any, Any] | None
    _engine: Any
    _made: Made[E] | None  # the engine as the idle pool keeps it, when pooling
    _scope: anyio.CancelScope | None
    _task: Any  # the asyncio or trio task that entered
    _cancelling: int  # its Task.cancelling() then, on asyncio

    def __init__(self, factory: EngineFactory[E], ctx: UserContext | None) -> None:
        # EngineFactory.engine makes it without this call: keep both alike.
        self._factory = factory
        self._ctx = ctx

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

    def _lose(self) -> None:
        """
        The quota lost the lease (it expired while held): cut the body short.
        """
        self.abort(_LOST)

    async def __aenter__(self) -> E:  # noqa: C901, PLR0912, PLR0915  # the lifecycle in one place
        f = self._factory
        if f._closed:
            f._check_open()
        # _bind, written out, with the usual case first: no ctx given, and
        # the one bound taken (current() raises when none is).
        prev = _get(None)
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = prev if prev is not None else current()
            token = None
        elif prev is ctx:
            token = None
        elif isinstance(ctx, UserContext) and (prev is None or prev.user_id == ctx.user_id):  # type: ignore[redundant-expr]  # see _bind
            token = _var.set(ctx)
        else:
            token = _bind(ctx)  # raises
        self._token = token
        key = ctx.user_id
        # The asyncio task, found once: a wait's future is of its loop, and
        # aclose() cancels it to cut the body.
        try:
            task = asyncio_task()
        except RuntimeError:  # no asyncio loop: trio
            task = None
        try:
            quota: Any = f._quota
            if f._fast:
                # A slot of a LocalQuota is held without a Lease, and handed
                # back by key.
                lease = None
                if not quota._take_now(key):
                    if task is not None and f._timeout is None:
                        # Without a timeout on asyncio, the wait is a bare
                        # future awaited here: no coroutine of the quota's
                        # held per waiter.
                        fut = quota._queue_future(key, task.get_loop())
                        try:
                            await fut
                        except BaseException:
                            quota._abandon(key, fut)
                            raise
                    else:
                        await quota._wait(key, f._timeout)
            elif f._admission is not None:
                # Checked before anything is queued or created; see _admission.
                lease = await admit(f, f._admission, key)
            else:
                lease = await quota.acquire(key, timeout=f._timeout)
            try:
                if f._closed:
                    f._check_open()
                # _creating counts the creations aclose() must wait for: those
                # that await (a plain engine from a sync create never does).
                made: Made[E] | None = None
                entered: tuple[str, Any, Any] | None
                engine: Any
                if f._slow_make:
                    made, entered = await self._make(ctx, key)
                    engine = entered[2]
                else:
                    # _make's usual case (no pool, no breaker), written out.
                    c = f._counters
                    try:
                        engine = f._create(ctx)
                        cls = type(engine)  # pyright: ignore[reportUnknownVariableType]
                        if cls is f._plain_type:
                            # The usual case: a plain engine, which needs no
                            # entering and no record of it (entered is None).
                            entered = None
                        else:
                            kind = kind_of(cls)  # pyright: ignore[reportUnknownArgumentType]
                            if kind is PLAIN:
                                f._plain_type = cls
                                entered = None
                            else:
                                f._creating += 1
                                try:
                                    entered = await aenter(engine, kind, "create function")
                                finally:
                                    f._creating -= 1
                                engine = entered[2]
                    except Exception:
                        c.create_errors += 1
                        raise
                    c.created += 1
                if f._closed:
                    await f._close_idle(entered or (PLAIN, None, engine), key)
                    f._check_open()
            except BaseException:
                try:
                    await f._give_back(lease, key)
                finally:
                    f._settle()
                raise
        except BaseException:
            if token is not None:
                _var.reset(token)  # in the Context it was set in
            raise
        self._lease = lease
        self._entered = entered
        self._engine = engine
        self._made = made
        self._aborted = False  # read once the body has begun: abort() is only for those
        uses = f._uses
        uses.add(self)
        n = len(uses)
        if n > f._peak:  # noqa: PLR1730  # max() is a call, slower on the hot path
            f._peak = n
        if lease is not None and not f._local_quota:
            # A network quota's lease can be lost: the body is cut then.
            lease.add_lost_callback(self._lose)
        deadline = f._deadline
        if task is not None and deadline is None:
            # No cancel scope held open over the body: it costs more than the
            # rest, and one left in the task that entered it (by an async
            # generator another task finishes) breaks that task's scopes.
            # aclose() cuts the body with a native cancellation instead.
            self._scope = None
            self._task = task
            # Task.cancelling() is new in Python 3.11, which _CANCELLING checks.
            self._cancelling = task.cancelling() if _CANCELLING else 0  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
            return engine  # type: ignore[no-any-return]
        scope = self._scope = anyio.CancelScope(
            deadline=math.inf if deadline is None else anyio.current_time() + deadline
        )
        scope.__enter__()
        self._task = running_task()
        return engine  # type: ignore[no-any-return]

    async def __aexit__(  # noqa: C901, PLR0912, PLR0915  # one exit, in order, written out for speed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        f = self._factory
        ctx = self._ctx
        assert ctx is not None  # noqa: S101  # set by __aenter__
        key = ctx.user_id
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
        c = f._counters
        errors: list[BaseException] | None = None
        try:
            pool = f._pool
            if pool is not None:
                made = self._made
                assert made is not None  # noqa: S101  # set when pooling
                errors = await f._park_or_close(made, _NO_ERROR if caught else (exc_type, exc, tb))
                if len(pool):
                    await f._sweep()  # the stale engines of every user go on the way out too
            else:
                entered = self._entered
                close = f._close
                if entered is None:
                    # _close_entered's plain case, inline: the usual case,
                    # and with a sync close it needs no coroutine nor list.
                    c.closed += 1
                    if close is not None:
                        try:
                            result = close(self._engine)
                            if result is not None and kind_of(type(result)) is AWAITABLE:
                                await f._drive_close(result, key)  # type: ignore[arg-type]  # by its kind
                        except Exception as e:  # reported below
                            c.close_errors += 1
                            errors = [e]
                else:
                    errors = await f._close_entered(
                        entered, key, _NO_ERROR if caught else (exc_type, exc, tb)
                    )
        finally:
            # Counted out before the slot is given back, so that the next
            # holder is never counted beside this one.
            f._uses.discard(self)
            try:
                lease = self._lease
                if lease is None:
                    # A LocalQuota's slot held without a lease: handed back at once.
                    f._quota._return(key)  # type: ignore[attr-defined]
                else:
                    await f._give_back(lease, key)
            finally:
                if f._drained is not None:
                    f._settle()
                token = self._token
                if token is not None:
                    # The body may end in another Context than it began in (an
                    # async generator finalised by another task): the token is
                    # no good there, and that Context is left as it is, as
                    # usercontext.bind leaves it.
                    try:  # noqa: SIM105  # contextlib.suppress costs more than the reset
                        _var.reset(token)
                    except ValueError:
                        pass
        if caught:
            hit = not self._aborted
            error = self._cut_error(hit, key)
            if hit:
                c.deadline_errors += 1
        elif errors and exc is None:
            error = errors[0]
            errors = errors[1:]
        elif exc is None:
            return
        else:
            report(errors or [], exc, key)
            return
        report(errors or [], error, key)
        raise error

    async def _make(
        self, ctx: UserContext, key: str
    ) -> tuple[Made[E] | None, tuple[str, Any, Any]]:
        """
        Make the engine of a factory that pools engines or has a circuit
        breaker: reuse an idle engine of *key*, or create one under the
        breaker, which counts how it ended. Return it as the pool keeps it
        (`None` without a pool) and what closing it needs.
        """
        f = self._factory
        pool = f._pool
        if pool is not None:
            f._creating += 1
            try:
                made = await f._reuse(key)
            finally:
                f._creating -= 1
            if made is not None:
                return made, made.entered
        breaker = f._breaker
        probe = False if breaker is None else breaker._start(key)
        try:
            result: Any = f._create(ctx)
            kind = kind_of(type(result))  # pyright: ignore[reportUnknownArgumentType]
            if kind is PLAIN:
                entered: tuple[str, Any, Any] = (PLAIN, None, result)
            else:
                f._creating += 1
                try:
                    entered = await aenter(result, kind, "create function")
                finally:
                    f._creating -= 1
        except Exception:
            f._counters.create_errors += 1
            if breaker is not None:
                breaker._done(key, probe=probe, ok=False)
            raise
        except BaseException:
            if breaker is not None:
                breaker._done(key, probe=probe, ok=None)  # cancelled: no verdict
            raise
        if breaker is not None:
            breaker._done(key, probe=probe, ok=True)
        f._counters.created += 1
        return (None if pool is None else Made(key, entered)), entered

    def _cut_error(self, deadline: bool, key: str) -> BaseException:  # noqa: FBT001  # private
        """
        Return the error of a body cut short: by the *deadline*, a lost lease,
        or `EngineFactory.aclose`.
        """
        if deadline:
            return EngineDeadlineError(
                f"The body using an engine of user {key!r} ran past its deadline of "
                f"{self._factory._deadline} s and was cancelled. Make it finish sooner or "
                "raise the factory's deadline."
            )
        if self._why is _LOST:
            return LeaseLostError(
                f"The quota lease of user {key!r} expired while the body used an "
                "engine (the process was paused or cut off past the lease's time to live), "
                "so its slot may have gone to someone else: the body was cancelled. Retry "
                "the work under a new lease."
            )
        return FactoryClosedError(
            f"The EngineFactory was closed while user {key!r} used an engine; "
            f"the body was cancelled because {self._why}."
        )

    def __enter__(self) -> E:
        f = self._factory
        f._check_open()
        ctx = self._ctx = self._ctx if self._ctx is not None else current()
        token = self._token = _bind(ctx)
        try:
            gate = f._admission
            if gate is None:
                lease = f._threads().acquire(ctx.user_id, timeout=f._timeout)
            else:
                lease = admit_thread(f, gate, ctx.user_id)
            try:
                entered = self._create(ctx)
            except BaseException:
                lease.release()
                raise
        except BaseException:
            if token is not None:
                _var.reset(token)  # in the Context it was set in
            raise
        self._lease = lease
        self._entered = entered
        c = f._sync_counters
        with f._sync_lock:
            c.created += 1
            c.start(ctx.user_id)
        return entered[2]  # type: ignore[no-any-return]

    def _create(self, ctx: UserContext) -> tuple[str, Any, Any]:
        f = self._factory
        breaker = f._breaker
        if breaker is None:
            try:
                result: object = f._create(ctx)
                return enter(result, kind_of(type(result)), "create function", _SYNC_FIX)
            except Exception:
                with f._sync_lock:
                    f._sync_counters.create_errors += 1
                raise
        # Under the breaker, which counts how the creation ended.
        key = ctx.user_id
        probe = breaker._start(key)
        try:
            result = f._create(ctx)
            entered = enter(result, kind_of(type(result)), "create function", _SYNC_FIX)
        except Exception:
            with f._sync_lock:
                f._sync_counters.create_errors += 1
            breaker._done(key, probe=probe, ok=False)
            raise
        except BaseException:
            breaker._done(key, probe=probe, ok=None)  # interrupted: no verdict
            raise
        breaker._done(key, probe=probe, ok=True)
        return entered

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        f = self._factory
        ctx = self._ctx
        entered = self._entered
        assert ctx is not None  # noqa: S101  # set by __enter__
        assert entered is not None  # noqa: S101  # set by __enter__, always a tuple there
        errors: list[BaseException] = []
        try:
            fatal = leave(
                entered,
                f._close,
                (exc_type, exc, tb),
                errors,
                fix=_SYNC_FIX,
                what="an engine of user %r",
                what_args=(ctx.user_id,),
            )
        finally:
            c = f._sync_counters
            with f._sync_lock:
                c.closed += 1
                c.close_errors += len(errors)
                c.stop(ctx.user_id)
            # Given back only once counted out: another thread takes the slot
            # at once, and must never be counted beside this one.
            self._lease.release()  # type: ignore[union-attr]  # a ThreadQuota's, set on entry
            token = self._token
            if token is not None:
                _var.reset(token)  # a thread's with ends in the Context it began in
        if fatal is not None:
            report(errors, fatal, ctx.user_id)
            raise fatal
        if errors and exc is None:
            report(errors[1:], errors[0], ctx.user_id)
            raise errors[0]
        report(errors, exc, ctx.user_id)
