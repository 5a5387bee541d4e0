"""
`EngineUse`: one request's use of an engine from an `EngineFactory`, in
``async with`` or ``with``: the quota slot, the engine, the binding of the
context, the deadline, and the close.
"""

from __future__ import annotations

import math
import sys

from asyncio import CancelledError, current_task
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from ._current import bind, current
from ._lifecycle import add_note, describe, enter, kind_of, leave, logger, running_task
from .exceptions import EngineDeadlineError, FactoryClosedError, LeaseLostError


if TYPE_CHECKING:
    from types import TracebackType

    from ._context import UserContext
    from ._factory import EngineFactory

E = TypeVar("E")

__all__ = ["EngineUse"]

# Task.cancelling() and uncancel(), by which a native cancellation of one's
# own is told apart from others' (Python 3.11+).
_CANCELLING = sys.version_info >= (3, 11)
_SYNC_FIX = "use `async with factory.engine()` instead of `with`"
# The reason given to abort() when the quota lost the lease.
_LOST = "the quota lease was lost"


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
    _cancelling: int  # its Task.cancelling() then, on asyncio

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

    def _lose(self) -> None:
        """
        The quota lost the lease (it expired while held): cut the body short.
        """
        self.abort(_LOST)

    async def __aenter__(self) -> E:
        f = self._factory
        f._check_open()
        ctx = self._ctx = self._ctx if self._ctx is not None else current()
        b = self._bind = bind(ctx)
        b.__enter__()
        try:
            lease = await f._quota.acquire(ctx.user_id, timeout=f._timeout)
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
                try:
                    await f._quota.arelease(lease)
                finally:
                    f._settle()
                raise
        except BaseException:
            b.__exit__(None, None, None)
            raise
        self._lease = lease
        self._made = made
        f._counters.start(ctx.user_id)
        f._uses.add(self)
        if not f._local_quota:
            # A network quota's lease can be lost: the body is cut then.
            lease.add_lost_callback(self._lose)
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
            # Task.cancelling() is new in Python 3.11, which _CANCELLING checks.
            self._cancelling = task.cancelling() if _CANCELLING else 0  # pyright: ignore[reportAttributeAccessIssue, reportUnknownMemberType]
            return made.engine
        scope = self._scope = anyio.CancelScope(
            deadline=math.inf if deadline is None else anyio.current_time() + deadline
        )
        scope.__enter__()
        self._task = running_task()
        return made.engine

    async def __aexit__(  # noqa: C901, PLR0912, PLR0915  # one exit, in order, written out for speed
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
            c.deadline_errors += 1
        exc_info = (None, None, None) if caught else (exc_type, exc, tb)
        try:
            pool = f._pool
            if pool is None:
                errors = await f._close_made(self._made, exc_info)
            else:
                errors = await f._park_or_close(self._made, exc_info)
                if len(pool):
                    await f._sweep()
        finally:
            # Counted out before the slot is given back, so that the next
            # holder is never counted beside this one.
            c.stop(ctx.user_id)
            try:
                if f._local_quota:
                    # Never waits: no coroutine of the protocol's arelease() on the hot path.
                    self._lease.release()
                else:
                    # A network quota's release is a round trip.
                    await f._quota.arelease(self._lease)
            finally:
                f._uses.discard(self)
                f._settle()
                self._bind.__exit__(None, None, None)
        if hit:
            error: BaseException = EngineDeadlineError(
                f"The body using an engine of user {ctx.user_id!r} ran past its deadline of "
                f"{f._deadline} s and was cancelled. Make it finish sooner or raise the "
                "factory's deadline."
            )
        elif caught and self._why is _LOST:
            error = LeaseLostError(
                f"The quota lease of user {ctx.user_id!r} expired while the body used an "
                "engine (the process was paused or cut off past the lease's time to live), "
                "so its slot may have gone to someone else: the body was cancelled. Retry "
                "the work under a new lease."
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
            report(errors, body_error, ctx.user_id)
            return
        report(errors, error, ctx.user_id)
        raise error

    def __enter__(self) -> E:
        f = self._factory
        f._check_open()
        ctx = self._ctx = self._ctx if self._ctx is not None else current()
        b = self._bind = bind(ctx)
        b.__enter__()
        try:
            lease = f._threads().acquire(ctx.user_id, timeout=f._timeout)
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
        c = f._sync_counters
        with f._sync_lock:
            c.created += 1
            c.start(ctx.user_id)
        return made.engine

    def _create(self, ctx: UserContext) -> Made[E]:
        f = self._factory
        try:
            result: object = f._create(ctx)
            return Made(
                ctx.user_id, enter(result, kind_of(type(result)), "create function", _SYNC_FIX)
            )
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
        errors: list[BaseException] = []
        try:
            fatal = leave(
                self._made.entered,
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
            self._lease.release()
            self._bind.__exit__(None, None, None)
        if fatal is not None:
            report(errors, fatal, ctx.user_id)
            raise fatal
        if errors and exc is None:
            report(errors[1:], errors[0], ctx.user_id)
            raise errors[0]
        report(errors, exc, ctx.user_id)
