"""
`Registry` and `Scope`: per-request resources, opened lazily, owned by one
user, and closed in reverse order, always.
"""

from __future__ import annotations

import builtins
import importlib
import sys
import warnings

from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
import attrs

from . import _checks
from ._current import _get, _var, bind, current
from ._util import (
    ASYNC_CM,
    ASYNC_GEN,
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
    logger,
    no_yield,
    yielded_again,
)
from .exceptions import IsolationError, ScopeClosedError


if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Mapping
    from contextlib import AbstractContextManager
    from types import CodeType, TracebackType

    from typing_extensions import Self

    from ._context import UserContext

# ExceptionGroup is a builtin from Python 3.11 on; the backport (a dependency of
# anyio there) provides it before.
ExceptionGroup_: Any = (
    getattr(builtins, "ExceptionGroup", None)
    or importlib.import_module("exceptiongroup").ExceptionGroup
)

T = TypeVar("T")

__all__ = ["Registry", "RegistryStats", "Scope"]


@attrs.frozen
class RegistryStats:
    """
    A snapshot of a `Registry`'s counters.

    Attributes:
        scopes_open: Scopes entered and not yet closed.
        scopes_opened: Scopes entered since the registry was created.
        resources_open: Resources created and not yet cleaned up, per key, as
            ``(key, count)`` pairs, most first (ties in the order the keys were
            first registered).
        resources_created: Resources created since the registry was created.
        cleanup_errors: Cleanups that raised or timed out.

    .. versionadded:: 0.1.0
    """

    scopes_open: int
    scopes_opened: int
    resources_open: tuple[tuple[str, int], ...]
    resources_created: int
    cleanup_errors: int


def _key_name(key: object) -> str:
    return getattr(key, "__qualname__", None) or repr(key)


_CLEARED: Mapping[object, object] = MappingProxyType({})
_ENTERED_ONCE = "A scope can be entered once; open a new one with registry.scope()."


def _kind(provider: _Provider, result: object) -> str:
    """
    Return `kind_of` the type of *result*, and remember it for *provider*:
    most return the same type every time, and get and aget look there first.
    """
    cls = type(result)
    kind = kind_of(cls)
    provider.last = (cls, kind)
    return kind


def _collect(errors: list[BaseException] | None, error: BaseException) -> list[BaseException]:
    if errors is None:
        return [error]
    errors.append(error)
    return errors


def _unknown(key: object) -> KeyError:
    msg = (
        f"Nothing is registered for {_key_name(key)}. Register a provider first: "
        "registry.register(key, provider)."
    )
    return KeyError(msg)


class _Counts:
    """
    The resources of one key created and cleaned up so far, by every provider
    registered for it: counting in a slot of an object the scope holds anyway
    costs less than keeping a dict of open counts.
    """

    __slots__ = ("closed", "created", "key")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.created = 0
        self.closed = 0


class _Provider:
    """
    What makes the resource of a key: *make* and its *close* hook, or, for an
    override, no *make* and a fixed *value*, with nothing to clean up.
    """

    # last is the type make last returned, with its kind; code is the code of
    # the async generator it last returned, and whether that can await. Each
    # is one tuple, so that threads never see half of an update.
    __slots__ = ("close", "code", "counts", "last", "make", "value")

    def __init__(
        self,
        make: Callable[[UserContext], Any] | None,
        close: Any,
        counts: _Counts,
        value: object = None,
    ) -> None:
        self.make = make
        self.close = close
        self.counts = counts
        self.value = value
        self.last: tuple[type | None, str] = (None, PLAIN)
        self.code: tuple[CodeType | None, bool] = (None, True)


class Registry:
    """
    What each request may use, and how to open and close it.

    Register a provider per key (a type, or any hashable), then open a
    `Scope` per request with `scope`. A scope creates each resource the first
    time it is asked for, keeps it for the rest of the scope, never shares it
    with another scope, and cleans everything up in reverse order of creation
    when it closes.

    >>> import usercontext as uc
    >>> registry = uc.Registry()
    >>> def connection(ctx):
    ...     conn = {"user": ctx.user_id}
    ...     yield conn          # cleanup runs after the yield
    ...     conn["closed"] = True
    >>> registry.register("conn", connection)
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    >>> with registry.scope(ctx) as scope:
    ...     conn = scope.get("conn")
    ...     conn["user"], scope.get("conn") is conn
    ('u-42', True)
    >>> conn["closed"]
    True

    Args:
        cleanup_timeout: How long each async cleanup may take before it is
            cut, in seconds.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, cleanup_timeout: float = 5.0) -> None:
        _checks.seconds("cleanup_timeout", cleanup_timeout)
        self._providers: dict[Hashable, _Provider] = {}
        # Per key ever registered, in order; kept when a provider is replaced.
        self._counts: dict[Hashable, _Counts] = {}
        self._cleanup_timeout = float(cleanup_timeout)
        self._scopes_open = 0
        self._scopes_opened = 0
        self._cleanup_errors = 0

    def register(
        self,
        key: Hashable,
        provider: Callable[[UserContext], Any],
        *,
        close: Callable[[Any], object] | None = None,
        replace: bool = False,
    ) -> None:
        """
        Register how to make the resource *key* for a request.

        ``provider(ctx)`` may return the resource itself, an awaitable of it, a
        context manager or an async context manager (entered; its exit is the
        cleanup), or a generator or async generator (its first value is the
        resource; the code after the ``yield`` is the cleanup and receives the
        body's exception, as with `contextlib.contextmanager`). *close*, sync
        or async, is called with the resource after that.

        Raises:
            KeyError: If *key* is registered already and *replace* is false.
            TypeError: If *provider* or *close* is not callable.
        """
        hash(key)
        hooks: tuple[object, object] = (provider, close)
        if not callable(hooks[0]):
            msg = f"The provider of {_key_name(key)} must be callable, got {provider!r}."
            raise TypeError(msg)
        _checks.function("close", hooks[1], allow_none=True)
        if key in self._providers and not replace:
            msg = (
                f"{_key_name(key)} is registered already. Pass replace=True to replace its "
                "provider, or use registry.override() in tests."
            )
            raise KeyError(msg)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = _Counts(key)
        self._providers[key] = _Provider(provider, close, counts)

    def __contains__(self, key: object) -> bool:
        return key in self._providers

    @overload
    def override(self, key: type[T], value: T) -> AbstractContextManager[None]: ...
    @overload
    def override(self, key: object, value: object) -> AbstractContextManager[None]: ...
    def override(self, key: object, value: object) -> AbstractContextManager[None]:
        """
        Make *key* resolve to *value* until the returned context manager exits.

        Meant for tests: ``with registry.override(Session, fake):``. The value is
        used as is, with no cleanup. Scopes resolve keys when asked, so the
        override applies to resources first asked for during it.
        """
        return _Override(self, key, _Provider(None, None, _Counts(key), value))

    def scope(self, ctx: UserContext | None = None) -> Scope:
        """
        Return a new `Scope` for *ctx* (`usercontext.current` by default).

        Use it as ``async with registry.scope(ctx) as scope:`` or, for sync
        code, ``with``. It binds *ctx* for its body.

        Raises:
            usercontext.exceptions.NoContextError: If *ctx* is omitted and none
                is bound.
        """
        # As Scope(self, ctx), without the round trip through __init__.
        if ctx is None:
            ctx = current()
        scope = _new_scope(Scope)
        scope._registry = self
        scope._ctx = ctx
        scope._resources = {}
        scope._opened = []
        scope._state = _NEW
        return scope

    def stats(self, top: int = 10) -> RegistryStats:
        """
        Return a snapshot of the counters, with the *top* keys most open.
        """
        counts = self._counts.values()
        open_ = [(c.key, c.created - c.closed) for c in counts if c.created != c.closed]
        ranked = sorted(open_, key=lambda kv: -kv[1])[:top]
        return RegistryStats(
            scopes_open=self._scopes_open,
            scopes_opened=self._scopes_opened,
            resources_open=tuple((_key_name(k), n) for k, n in ranked),
            resources_created=sum(c.created for c in counts),
            cleanup_errors=self._cleanup_errors,
        )

    def __repr__(self) -> str:
        return f"<usercontext.Registry(num_providers={len(self._providers)})>"


class _Override:
    __slots__ = ("_key", "_registry", "_saved", "_value")

    def __init__(self, registry: Registry, key: Hashable, value: _Provider) -> None:
        self._registry = registry
        self._key = key
        self._value = value

    def __enter__(self) -> None:
        providers = self._registry._providers
        self._saved = providers.get(self._key)
        providers[self._key] = self._value

    def __exit__(self, *exc_info: object) -> None:
        providers = self._registry._providers
        if self._saved is None:
            del providers[self._key]
        else:
            providers[self._key] = self._saved


_NEW, _OPEN, _CLOSED = 0, 1, 2
_new_scope = object.__new__
# An async generator whose code has no await: its cleanup runs to the end
# without suspending, so a cancel scope around it could neither see a
# cancellation nor reach a deadline, and it is left out.
_ASYNC_GEN_NO_AWAIT = "async generator without await"
_getframe = sys._getframe
_set = _var.set
_reset = _var.reset


class Scope:
    """
    The resources of one request, created on first use and cleaned up on exit.

    Get one from `Registry.scope`. Inside ``async with`` use `aget`; inside
    ``with``, `get` (which refuses providers that need awaiting).

    On exit, every resource is cleaned up in reverse order of creation, even if
    the body failed or was cancelled: each async cleanup is shielded from
    cancellation and cut after the registry's *cleanup_timeout*, and a failing
    or hanging cleanup does not stop the others. If the body raised, its
    exception propagates unchanged, with the cleanup errors logged, added as
    notes and listed in its ``cleanup_errors`` attribute; if only cleanups
    failed, they are raised together as an `ExceptionGroup`.

    A scope belongs to its context's user: using it while another user's
    context is bound raises `usercontext.exceptions.IsolationError`.

    .. versionadded:: 0.1.0
    """

    # The hot paths (entering, get and aget, leaving) are written out in each
    # method rather than shared through helpers: a call costs about as much
    # as the rest of a line of bookkeeping.
    __slots__ = (
        "_code",
        "_ctx",
        "_lasti",
        "_opened",
        "_registry",
        "_resources",
        "_state",
        "_token",
    )

    def __init__(self, registry: Registry, ctx: UserContext) -> None:
        self._registry = registry
        self._ctx = ctx
        self._resources: Mapping[object, object] = {}
        # (counts, kind, what to exit, close hook, value), in order of creation.
        self._opened: list[tuple[_Counts, str, Any, Any, object]] = []
        self._state = _NEW

    @property
    def ctx(self) -> UserContext:
        """
        The context this scope belongs to.
        """
        return self._ctx

    def _check(self, key: object) -> None:
        """
        Raise if *key* cannot be handed out now; called when the scope is not
        open or the context bound is not the scope's own.
        """
        if self._state != _OPEN:
            what = "not entered yet" if self._state == _NEW else "closed"
            msg = (
                f"This scope is {what}: resources can be asked for only inside "
                "`async with registry.scope(ctx) as scope:` (or `with`)."
            )
            raise ScopeClosedError(msg)
        bound = _get(None)
        if bound is None or bound.user_id == self._ctx.user_id:
            return  # a thread started without a context, or a child context
        msg = (
            f"{_key_name(key)} belongs to a scope of user {self._ctx.user_id!r}, but "
            f"user {bound.user_id!r} asked for it. Open a scope for that user instead."
        )
        raise IsolationError(msg)

    @overload
    def get(self, key: type[T]) -> T: ...
    @overload
    def get(self, key: Hashable) -> Any: ...
    def get(self, key: object) -> Any:
        """
        Return the resource *key*, creating it on first use.

        Raises:
            KeyError: If nothing is registered for *key*.
            TypeError: If its provider needs awaiting: use `aget`.
            usercontext.exceptions.IsolationError: If another user's context
                is bound.
            usercontext.exceptions.ScopeClosedError: Outside the scope's block.
        """
        ctx = self._ctx
        if _get(None) is not ctx or self._state != _OPEN:
            self._check(key)
        resources: dict[object, object] = self._resources  # type: ignore[assignment]
        if key in resources:
            return resources[key]
        provider = self._registry._providers.get(key)
        if provider is None:
            raise _unknown(key)
        make = provider.make
        if make is None:
            return provider.value  # an override
        result = make(ctx)
        last = provider.last
        kind = last[1] if last[0] is type(result) else _kind(provider, result)
        if kind is GEN:
            try:
                value = next(result)
            except StopIteration:
                raise no_yield(f"provider of {_key_name(key)}") from None
        elif kind is SYNC_CM or (kind is ASYNC_CM and hasattr(result, "__enter__")):
            kind = SYNC_CM  # both kinds: a sync scope enters it the sync way
            value = result.__enter__()
        elif kind is PLAIN:
            value, result = result, None
        else:
            if kind is AWAITABLE and hasattr(result, "close"):
                result.close()  # no "never awaited" warning on top of the error
            msg = (
                f"The provider of {_key_name(key)} is asynchronous; use "
                "`await scope.aget(key)` in an `async with` scope."
            )
            raise TypeError(msg)
        resources[key] = value
        counts = provider.counts
        counts.created += 1
        self._opened.append((counts, kind, result, provider.close, value))
        return value

    @overload
    async def aget(self, key: type[T]) -> T: ...
    @overload
    async def aget(self, key: Hashable) -> Any: ...
    async def aget(self, key: object) -> Any:  # noqa: C901, PLR0912  # inline for speed
        """
        Return the resource *key*, creating it on first use; any provider works.

        Raises:
            KeyError: If nothing is registered for *key*.
            usercontext.exceptions.IsolationError: If another user's context
                is bound.
            usercontext.exceptions.ScopeClosedError: Outside the scope's block.
        """
        ctx = self._ctx
        if _get(None) is not ctx or self._state != _OPEN:
            self._check(key)
        resources: dict[object, object] = self._resources  # type: ignore[assignment]
        if key in resources:
            return resources[key]
        provider = self._registry._providers.get(key)
        if provider is None:
            raise _unknown(key)
        make = provider.make
        if make is None:
            return provider.value  # an override
        result = make(ctx)
        last = provider.last
        kind = last[1] if last[0] is type(result) else _kind(provider, result)
        if kind is AWAITABLE:
            result = await result
            kind = kind_of(type(result))
        if kind is ASYNC_GEN:
            try:
                value = await result.__anext__()
            except StopAsyncIteration:
                raise no_yield(f"provider of {_key_name(key)}") from None
            code = result.ag_code
            seen = provider.code
            if seen[0] is code:
                awaits = seen[1]
            else:
                awaits = can_suspend(code)
                provider.code = (code, awaits)
            if not awaits:
                kind = _ASYNC_GEN_NO_AWAIT
        elif kind is ASYNC_CM:
            value = await result.__aenter__()
        elif kind is GEN:
            try:
                value = next(result)
            except StopIteration:
                raise no_yield(f"provider of {_key_name(key)}") from None
        elif kind is SYNC_CM:
            value = result.__enter__()
        else:
            value, result = result, None
        resources[key] = value
        counts = provider.counts
        counts.created += 1
        self._opened.append((counts, kind, result, provider.close, value))
        return value

    # -- entering and leaving --

    def __enter__(self) -> Self:
        if self._state != _NEW:
            raise RuntimeError(_ENTERED_ONCE)
        ctx = self._ctx
        prev = _get(None)
        if prev is not None and prev is not ctx and prev.user_id != ctx.user_id:
            bind(ctx).__enter__()  # raises IsolationError with bind's explanation
        # Where the scope was entered, for the warning if it is never closed;
        # the line number is worked out from the instruction offset only then.
        frame = _getframe(1)
        self._code = frame.f_code
        self._lasti = frame.f_lasti
        # Already bound (by a middleware, say): nothing to set, nothing to reset.
        self._token = None if prev is ctx else _set(ctx)
        self._state = _OPEN
        registry = self._registry
        registry._scopes_open += 1
        registry._scopes_opened += 1
        return self

    async def __aenter__(self) -> Self:
        # As __enter__, written out again.
        if self._state != _NEW:
            raise RuntimeError(_ENTERED_ONCE)
        ctx = self._ctx
        prev = _get(None)
        if prev is not None and prev is not ctx and prev.user_id != ctx.user_id:
            bind(ctx).__enter__()
        frame = _getframe(1)
        self._code = frame.f_code
        self._lasti = frame.f_lasti
        # Already bound (by a middleware, say): nothing to set, nothing to reset.
        self._token = None if prev is ctx else _set(ctx)
        self._state = _OPEN
        registry = self._registry
        registry._scopes_open += 1
        registry._scopes_opened += 1
        return self

    def __exit__(  # noqa: C901, PLR0912  # a branch per kind, inline for speed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors: list[BaseException] | None = None  # made on the first failure
        fatal: BaseException | None = None
        opened = self._opened
        try:
            while opened:
                counts, kind, obj, close, value = opened.pop()
                counts.closed += 1
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
                        msg = (
                            f"{_key_name(counts.key)} was opened with aget() but its scope was "
                            "left with a sync `with`: its async cleanup cannot run. Use "
                            "`async with`."
                        )
                        raise TypeError(msg)  # noqa: TRY301  # collected like any cleanup error
                except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                    errors = _collect(errors, e)
                except BaseException as e:  # noqa: BLE001  # raised below, after the others
                    fatal = fatal or e
                if close is not None:
                    try:
                        result = close(value)
                        if result is not None and kind_of(type(result)) is AWAITABLE:
                            if hasattr(result, "close"):
                                result.close()
                            msg = (
                                f"The close hook of {_key_name(counts.key)} is asynchronous; "
                                "use `async with registry.scope()`."
                            )
                            raise TypeError(msg)  # noqa: TRY301  # collected like the others
                    except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                        errors = _collect(errors, e)
                    except BaseException as e:  # noqa: BLE001  # raised below
                        fatal = fatal or e
        finally:
            self._state = _CLOSED
            self._resources = _CLEARED  # drops the resources now, not with the scope
            self._registry._scopes_open -= 1
            token = self._token
            if token is not None:
                try:  # noqa: SIM105  # see bind.__exit__: left in another Context, nothing to undo
                    _reset(token)
                except ValueError:
                    pass
        if errors is not None or fatal is not None:
            self._raise(errors or [], exc, fatal, cancelled=False)

    async def __aexit__(  # noqa: C901, PLR0912, PLR0915  # a branch per kind, inline for speed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors: list[BaseException] | None = None  # made on the first failure
        fatal: BaseException | None = None
        opened = self._opened
        try:
            while opened:
                counts, kind, obj, close, value = opened.pop()
                counts.closed += 1
                try:
                    if kind is _ASYNC_GEN_NO_AWAIT:
                        if exc is None:
                            # Cheaper than awaiting __anext__ in a try.
                            async for _ in obj:
                                raise await async_yielded_again(obj)  # noqa: TRY301  # collected
                        else:
                            await finish_agen(obj, exc)
                    elif kind is GEN:
                        if exc is None:
                            for _ in obj:  # as in __exit__
                                raise yielded_again(obj)  # noqa: TRY301  # collected below
                        else:
                            finish_gen(obj, exc)
                    elif kind is SYNC_CM:
                        obj.__exit__(exc_type, exc, tb)
                    elif kind is ASYNC_GEN:
                        await drive(
                            finish_agen(obj, exc),
                            self._registry._cleanup_timeout,
                            "resource %r",
                            counts.key,
                        )
                    elif kind is ASYNC_CM:
                        await drive(
                            obj.__aexit__(exc_type, exc, tb),
                            self._registry._cleanup_timeout,
                            "resource %r",
                            counts.key,
                        )
                except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                    errors = _collect(errors, e)
                except BaseException as e:  # noqa: BLE001  # raised below, after the others
                    fatal = fatal or e
                if close is not None:
                    try:
                        result = close(value)
                        if result is not None and kind_of(type(result)) is AWAITABLE:
                            await drive(
                                result,
                                self._registry._cleanup_timeout,
                                "resource %r",
                                counts.key,
                            )
                    except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                        errors = _collect(errors, e)
                    except BaseException as e:  # noqa: BLE001  # raised below
                        fatal = fatal or e
        finally:
            self._state = _CLOSED
            self._resources = _CLEARED  # drops the resources now, not with the scope
            self._registry._scopes_open -= 1
            token = self._token
            if token is not None:
                try:  # noqa: SIM105  # see bind.__exit__: left in another Context, nothing to undo
                    _reset(token)
                except ValueError:
                    pass
        if errors is not None or fatal is not None:
            cancelled = exc is not None and isinstance(exc, anyio.get_cancelled_exc_class())
            self._raise(errors or [], exc, fatal, cancelled=cancelled)

    def _raise(
        self,
        errors: list[BaseException],
        exc: BaseException | None,
        fatal: BaseException | None,
        *,
        cancelled: bool,
    ) -> None:
        if errors:
            self._registry._cleanup_errors += len(errors)
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
        exc.cleanup_errors = [*getattr(exc, "cleanup_errors", ()), *errors]  # type: ignore[attr-defined]

    def __del__(self) -> None:
        if self._state == _OPEN:
            lineno = next(
                (line for start, end, line in self._code.co_lines() if start <= self._lasti < end),
                None,
            )
            warnings.warn(
                f"A scope of user {self._ctx.user_id!r} opened at "
                f"{self._code.co_filename}:{lineno} was never closed, so its resources were "
                "not cleaned up. Use `async with registry.scope(ctx):` (or `with`).",
                ResourceWarning,
                stacklevel=1,
            )

    def __repr__(self) -> str:
        state = ("new", "open", "closed")[self._state]
        return (
            f"<usercontext.Scope(user_id={self._ctx.user_id!r}, {state}, "
            f"resources={len(self._opened)})>"
        )
