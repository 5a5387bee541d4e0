"""
`Scope`: the resources of one request, opened lazily, owned by one user, and
closed in reverse order, always.
"""

from __future__ import annotations

import builtins
import importlib
import sys
import warnings

from types import GeneratorType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio

from ._current import _get, _var, bind
from ._lifecycle import (
    ASYNC_CM,
    ASYNC_GEN,
    ASYNC_GEN_NO_AWAIT,
    AWAITABLE,
    GEN,
    PLAIN,
    SYNC_CM,
    add_note,
    async_yielded_again,
    can_suspend,
    describe,
    drive,
    finish_agen,
    finish_gen,
    kind_of,
    left_async,
    logger,
    no_yield,
    refuse,
    yielded_again,
)
from ._provider import key_name, unknown
from .exceptions import IsolationError, ScopeClosedError


if TYPE_CHECKING:
    from collections.abc import Hashable
    from types import FrameType, TracebackType

    from typing_extensions import Self

    from ._context import UserContext
    from ._provider import Provider
    from ._registry import Registry

# ExceptionGroup is a builtin from Python 3.11 on; the backport (a dependency of
# anyio there) provides it before.
ExceptionGroup_: Any = (
    getattr(builtins, "ExceptionGroup", None)
    or importlib.import_module("exceptiongroup").ExceptionGroup
)

T = TypeVar("T")

__all__ = ["Scope"]

_Entry = tuple["Provider", str, Any, Any]
_SYNC_FIX = "use `async with registry.scope()` and `await scope.aget(key)`"
_ENTERED_ONCE = "A scope can be entered once; open a new one with registry.scope()."


def _collect(errors: list[BaseException] | None, error: BaseException) -> list[BaseException]:
    if errors is None:
        return [error]
    errors.append(error)
    return errors


# A scope's _state: _NEW, then its context while open, then _CLOSED. Holding
# the context there lets get() check "open, and this user's context bound" with
# one comparison.
_NEW: Any = object()
_CLOSED: Any = object()
_getframe = sys._getframe
_GENERATOR: Any = GeneratorType  # Any: what the provider made stays Any to type checkers
_set = _var.set
_reset = _var.reset


class Scope:
    """
    The resources of one request, created on first use and cleaned up on exit.

    Get one from `Registry.scope`. Inside ``async with`` use `aget`; inside
    ``with``, `get` (which refuses providers that need awaiting).

    On exit, every resource is cleaned up in reverse order of creation, even if
    the body failed or was cancelled: each async cleanup is shielded from
    cancellation and cut after the registry's *close_timeout*, and a failing
    or hanging cleanup does not stop the others. If the body raised, its
    exception propagates unchanged, with the cleanup errors logged, added as
    notes and listed in its ``close_errors`` attribute; if only cleanups
    failed, they are raised together as an `ExceptionGroup`.

    A scope belongs to its context's user: using it while another user's
    context is bound raises `usercontext.exceptions.IsolationError`.

    .. versionadded:: 0.1.0
    """

    # The hot paths (entering, get and aget, leaving) are written out in each
    # method rather than shared through helpers: a call costs about as much
    # as the rest of a line of bookkeeping.
    __slots__ = (
        "_awaits_close",
        "_ctx",
        "_frame",
        "_lasti",
        "_registry",
        "_resources",
        "_state",
        "_token",
    )

    _frame: FrameType | None
    _lasti: int

    def __init__(self, registry: Registry, ctx: UserContext) -> None:
        self._registry = registry
        self._ctx = ctx
        # Per key, in order of creation (popitem() takes the last first):
        # (provider, kind, what to exit, value): the provider holds the
        # counts and the close hook.
        self._resources: dict[object, _Entry] = {}
        # Whether a resource or close hook may need awaiting on exit: a
        # scope of sync resources only can be left with __exit__ by an
        # owner that runs no body of its own (see Registry._open_scope).
        self._awaits_close = False
        self._state = _NEW
        # The frame that entered the scope, while it is open: what a scope
        # dropped open is told by, and where it was entered.
        self._frame = None

    @property
    def ctx(self) -> UserContext:
        """
        The context this scope belongs to.
        """
        return self._ctx

    def _check(self, key: object) -> UserContext:
        """
        Raise if *key* cannot be handed out now, else return the scope's
        context; called when the scope is not open or the context bound is
        not the scope's own.
        """
        state = self._state
        if state is _NEW or state is _CLOSED:
            what = "not entered yet" if state is _NEW else "closed"
            msg = (
                f"This scope is {what}: resources can be asked for only inside "
                "`async with registry.scope(ctx) as scope:` (or `with`)."
            )
            raise ScopeClosedError(msg)
        bound = _get(None)
        if bound is None or bound.user_id == self._ctx.user_id:
            return self._ctx  # a thread started without a context, or a child context
        msg = (
            f"{key_name(key)} belongs to a scope of user {self._ctx.user_id!r}, but "
            f"user {bound.user_id!r} asked for it. Open a scope for that user instead."
        )
        raise IsolationError(msg)

    @overload
    def get(self, key: type[T]) -> T: ...
    @overload
    def get(self, key: Hashable) -> Any: ...
    def get(self, key: object) -> Any:  # noqa: C901, PLR0912  # inline for speed
        """
        Return the resource *key*, creating it on first use.

        Raises:
            KeyError: If nothing is registered for *key*.
            TypeError: If its provider needs awaiting: use `aget`.
            usercontext.exceptions.IsolationError: If another user's context
                is bound.
            usercontext.exceptions.ScopeClosedError: Outside the scope's block.
        """
        ctx = self._state  # the scope's context while it is open
        if _get(None) is not ctx:
            ctx = self._check(key)
        resources = self._resources
        if key in resources:
            return resources[key][3]
        try:  # free when the key is registered (Python 3.11+), unlike a .get() call
            provider = self._registry._providers[key]
        except KeyError:
            provider = None  # raised below, without the KeyError as its context
        if provider is None:
            raise unknown(key)
        make = provider.make
        if make is None:
            return provider.value  # an override
        result: Any = make(ctx)
        # The twin of _lifecycle.enter, inline, generators first: a for loop
        # takes the first value without the call to next() and its try.
        if type(result) is _GENERATOR:
            for value in result:  # noqa: B007  # the first value is the resource
                break
            else:
                raise no_yield(f"provider of {key_name(key)}")
            kind = GEN
        else:
            last = provider.last
            kind = last[1] if last[0] is type(result) else provider.kind(result)
            if kind is SYNC_CM or (kind is ASYNC_CM and hasattr(result, "__enter__")):
                kind = SYNC_CM  # both kinds: a sync scope enters it the sync way
                value = result.__enter__()
            elif kind is PLAIN:
                value, result = result, None
            else:
                raise refuse(result, kind, f"The provider of {key_name(key)}", _SYNC_FIX)
        if provider.close is not None:
            self._awaits_close = True  # the hook may return an awaitable
        provider.counts.created += 1
        resources[key] = (provider, kind, result, value)
        return value

    @overload
    async def aget(self, key: type[T]) -> T: ...
    @overload
    async def aget(self, key: Hashable) -> Any: ...
    async def aget(self, key: object) -> Any:  # noqa: C901, PLR0912, PLR0915  # inline for speed
        """
        Return the resource *key*, creating it on first use; any provider works.

        Raises:
            KeyError: If nothing is registered for *key*.
            usercontext.exceptions.IsolationError: If another user's context
                is bound.
            usercontext.exceptions.ScopeClosedError: Outside the scope's block.
        """
        ctx = self._state  # as in get
        if _get(None) is not ctx:
            ctx = self._check(key)
        resources = self._resources
        if key in resources:
            return resources[key][3]
        try:  # free when the key is registered (Python 3.11+), unlike a .get() call
            provider = self._registry._providers[key]
        except KeyError:
            provider = None  # raised below, without the KeyError as its context
        if provider is None:
            raise unknown(key)
        make = provider.make
        if make is None:
            return provider.value  # an override
        result = make(ctx)
        if type(result) is _GENERATOR:
            # A sync generator first, as in get: the common provider of a
            # request's session, opened in an async scope.
            for value in result:  # noqa: B007  # the first value is the resource
                break
            else:
                raise no_yield(f"provider of {key_name(key)}")
            if provider.close is not None:
                self._awaits_close = True  # the hook may return an awaitable
            provider.counts.created += 1
            resources[key] = (provider, GEN, result, value)
            return value
        last = provider.last
        kind = last[1] if last[0] is type(result) else provider.kind(result)
        # The twin of _lifecycle.aenter, inline (and can_suspend cached per
        # provider).
        if kind is AWAITABLE:
            result = await result
            # pyright takes the type of an Any value for type[Unknown].
            kind = kind_of(type(result))  # pyright: ignore[reportUnknownArgumentType]
        if kind is ASYNC_GEN:
            try:
                value = await result.__anext__()
            except StopAsyncIteration:
                raise no_yield(f"provider of {key_name(key)}") from None
            code = result.ag_code
            seen = provider.code
            if seen[0] is code:
                awaits = seen[1]
            else:
                awaits = can_suspend(code)
                provider.code = (code, awaits)
            if not awaits:
                kind = ASYNC_GEN_NO_AWAIT
        elif kind is ASYNC_CM:
            value = await result.__aenter__()
        elif kind is GEN:
            try:
                value = next(result)
            except StopIteration:
                raise no_yield(f"provider of {key_name(key)}") from None
        elif kind is SYNC_CM:
            value = result.__enter__()
        else:
            value, result = result, None
        if provider.close is not None or (kind is not SYNC_CM and kind is not PLAIN):
            self._awaits_close = True
        provider.counts.created += 1
        resources[key] = (provider, kind, result, value)
        return value

    # -- entering and leaving --

    def __enter__(self) -> Self:
        if self._state is not _NEW:
            raise RuntimeError(_ENTERED_ONCE)
        ctx = self._state = self._ctx
        prev = _get(None)
        if prev is not None and prev is not ctx and prev.user_id != ctx.user_id:
            self._state = _NEW
            bind(ctx).__enter__()  # raises IsolationError with bind's explanation
        # Where the scope was entered, for the warning if it is never closed:
        # the caller's frame, whose code is read only then, and the offset of
        # the instruction that entered, which the frame moves on from.
        frame = self._frame = _getframe(1)
        self._lasti = frame.f_lasti
        # Already bound (by a middleware, say): nothing to set, nothing to reset.
        self._token = None if prev is ctx else _set(ctx)
        # Scopes open = entered - left: one counter to move here, not two.
        self._registry._opened += 1
        return self

    async def __aenter__(self) -> Self:
        # As __enter__, written out again.
        if self._state is not _NEW:
            raise RuntimeError(_ENTERED_ONCE)
        ctx = self._ctx
        prev = _get(None)
        if prev is not None and prev is not ctx and prev.user_id != ctx.user_id:
            bind(ctx).__enter__()
        frame = self._frame = _getframe(1)
        self._lasti = frame.f_lasti
        # Already bound (by a middleware, say): nothing to set, nothing to reset.
        self._token = None if prev is ctx else _set(ctx)
        self._state = ctx
        self._registry._opened += 1
        return self

    def __exit__(  # noqa: C901, PLR0912  # a branch per kind, inline for speed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Made on the first failure: every cleanup error, the fatal ones
        # (not an Exception) raised after the others by _raise.
        errors: list[BaseException] | None = None
        opened = self._resources
        try:
            while opened:
                provider, kind, obj, value = opened.popitem()[1]
                provider.counts.closed += 1
                # The twin of _lifecycle.leave, inline.
                try:
                    if kind is GEN:
                        if exc is None:
                            # A for loop ends without raising StopIteration.
                            for _ in obj:
                                raise yielded_again(obj)  # noqa: TRY301  # collected below
                        else:
                            finish_gen(obj, exc)
                    elif kind is SYNC_CM:
                        obj.__exit__(exc_type, exc, tb)
                    elif kind is not PLAIN:
                        what = key_name(provider.counts.key)
                        raise left_async(kind, what, _SYNC_FIX)  # noqa: TRY301  # collected
                except BaseException as e:  # collected; every cleanup runs
                    errors = _collect(errors, e)
                if provider.close is not None:
                    try:
                        result = provider.close(value)
                        if result is not None and kind_of(type(result)) is AWAITABLE:
                            what = f"The close hook of {key_name(provider.counts.key)}"
                            raise refuse(result, AWAITABLE, what, _SYNC_FIX)  # noqa: TRY301
                    except BaseException as e:  # collected; every cleanup runs
                        errors = _collect(errors, e)
        finally:
            self._state = _CLOSED
            self._frame = None  # which holds the scope, through its locals
            self._registry._left += 1
            token = self._token
            if token is not None:
                try:  # noqa: SIM105  # see bind.__exit__: left in another Context, nothing to undo
                    _reset(token)
                except ValueError:
                    pass
        if errors is not None:
            self._raise(errors, exc, cancelled=False)

    async def __aexit__(  # noqa: C901, PLR0912  # a branch per kind, inline for speed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Made on the first failure: every cleanup error, the fatal ones
        # (not an Exception) raised after the others by _raise.
        errors: list[BaseException] | None = None
        opened = self._resources
        try:
            while opened:
                provider, kind, obj, value = opened.popitem()[1]
                provider.counts.closed += 1
                # The twin of _lifecycle.aleave, inline; the kinds most providers
                # make first.
                try:
                    if kind is GEN:
                        if exc is None:
                            for _ in obj:  # as in __exit__
                                raise yielded_again(obj)  # noqa: TRY301  # collected below
                        else:
                            finish_gen(obj, exc)
                    elif kind is ASYNC_GEN_NO_AWAIT:
                        if exc is None:
                            # Cheaper than awaiting __anext__ in a try.
                            async for _ in obj:
                                raise await async_yielded_again(obj)  # noqa: TRY301  # collected
                        else:
                            await finish_agen(obj, exc)
                    elif kind is SYNC_CM:
                        obj.__exit__(exc_type, exc, tb)
                    elif kind is ASYNC_GEN:
                        await drive(
                            finish_agen(obj, exc),
                            self._registry._close_timeout,
                            "resource %r",
                            provider.counts.key,
                        )
                    elif kind is ASYNC_CM:
                        await drive(
                            obj.__aexit__(exc_type, exc, tb),
                            self._registry._close_timeout,
                            "resource %r",
                            provider.counts.key,
                        )
                except BaseException as e:  # collected; every cleanup runs
                    errors = _collect(errors, e)
                if provider.close is not None:
                    try:
                        result = provider.close(value)
                        if result is not None and kind_of(type(result)) is AWAITABLE:
                            await drive(
                                result,  # type: ignore[arg-type]  # an awaitable, by its kind
                                self._registry._close_timeout,
                                "resource %r",
                                provider.counts.key,
                            )
                    except BaseException as e:  # collected; every cleanup runs
                        errors = _collect(errors, e)
        finally:
            self._state = _CLOSED
            self._frame = None  # which holds the scope, through its locals
            self._registry._left += 1
            token = self._token
            if token is not None:
                try:  # noqa: SIM105  # see bind.__exit__: left in another Context, nothing to undo
                    _reset(token)
                except ValueError:
                    pass
        if errors is not None:
            cancelled = exc is not None and isinstance(exc, anyio.get_cancelled_exc_class())
            self._raise(errors, exc, cancelled=cancelled)

    def _raise(
        self,
        failed: list[BaseException],
        exc: BaseException | None,
        *,
        cancelled: bool,
    ) -> None:
        # The first failure that is not an Exception (a cancellation, say) is
        # raised; the Exceptions are logged, and raised or noted.
        fatal = next((e for e in failed if not isinstance(e, Exception)), None)
        errors = [e for e in failed if isinstance(e, Exception)]
        if errors:
            self._registry._close_errors += len(errors)
            for error in errors:
                logger.error(
                    "A cleanup of a scope of user %r failed: %s",
                    self._ctx.user_id,
                    describe(error),
                )
        if fatal is not None:
            raise fatal
        # Called only when a cleanup failed: without a fatal error, errors holds it.
        if exc is None:
            msg = f"{len(errors)} cleanup(s) of a scope of user {self._ctx.user_id!r} failed"
            raise ExceptionGroup_(msg, errors)
        if cancelled:
            return  # logged above; a cancellation carries no notes
        for error in errors:
            add_note(exc, f"While cleaning up the scope: {describe(error)}")
        exc.close_errors = [*getattr(exc, "close_errors", ()), *errors]  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        state = self._state
        state = "new" if state is _NEW else "closed" if state is _CLOSED else "open"
        return (
            f"<usercontext.Scope(user_id={self._ctx.user_id!r}, {state}, "
            f"resources={len(self._resources)})>"
        )


class _LeakWarningScope(Scope):  # pyright: ignore[reportUnusedClass]  # made by Registry.scope
    """
    The scope `Registry.scope` returns: its user may forget to close it, and
    dropped open it says so with a `ResourceWarning` naming where it was
    entered. The ASGI middleware opens and closes its scopes itself, and
    makes plain ones (`Registry._open_scope`): a finalizer costs every scope
    a call when it goes.
    """

    __slots__ = ()

    def __del__(self) -> None:
        if self._frame is not None:  # open; run for every scope, so kept short
            code = self._frame.f_code
            lineno = next(
                (line for start, end, line in code.co_lines() if start <= self._lasti < end),
                None,
            )
            warnings.warn(
                f"A scope of user {self._ctx.user_id!r} opened at "
                f"{code.co_filename}:{lineno} was never closed, so its resources were "
                "not cleaned up. Use `async with registry.scope(ctx):` (or `with`).",
                ResourceWarning,
                stacklevel=1,
            )
