"""
`Registry` and `Scope`: per-request resources, opened lazily, owned by one
user, and closed in reverse order, always.
"""

from __future__ import annotations

import builtins
import importlib
import sys
import warnings

from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
import attrs

from ._current import _get, _var, bind, current
from ._util import (
    ASYNC_CM,
    ASYNC_GEN,
    AWAITABLE,
    GEN,
    SYNC_CM,
    add_note,
    describe,
    drive,
    finish_agen,
    finish_gen,
    first_value,
    first_value_async,
    kind_of,
    logger,
)
from .exceptions import IsolationError, ScopeClosedError


if TYPE_CHECKING:
    from collections.abc import Callable, Hashable
    from contextlib import AbstractContextManager
    from types import TracebackType

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
            ``(key, count)`` pairs, most first.
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


class _Provider:
    __slots__ = ("close", "key", "make")

    def __init__(self, key: Hashable, make: Callable[[UserContext], Any], close: Any) -> None:
        self.key = key
        self.make = make
        self.close = close


class _Value:
    """
    An override: a fixed value, with nothing to clean up.
    """

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


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
        timeout: object = cleanup_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            msg = f"cleanup_timeout must be a number of seconds, got {timeout!r}."
            raise TypeError(msg)
        if not timeout > 0:
            msg = f"cleanup_timeout must be > 0 seconds, got {cleanup_timeout!r}."
            raise ValueError(msg)
        self._providers: dict[Hashable, _Provider | _Value] = {}
        self._cleanup_timeout = float(cleanup_timeout)
        self._scopes_open = 0
        self._scopes_opened = 0
        self._resources_open: dict[Hashable, int] = {}
        self._resources_created = 0
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
        if hooks[1] is not None and not callable(hooks[1]):
            msg = f"close must be callable or None, got {close!r}."
            raise TypeError(msg)
        if key in self._providers and not replace:
            msg = (
                f"{_key_name(key)} is registered already. Pass replace=True to replace its "
                "provider, or use registry.override() in tests."
            )
            raise KeyError(msg)
        self._providers[key] = _Provider(key, provider, close)

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
        return _Override(self, key, _Value(value))

    def scope(self, ctx: UserContext | None = None) -> Scope:
        """
        Return a new `Scope` for *ctx* (`usercontext.current` by default).

        Use it as ``async with registry.scope(ctx) as scope:`` or, for sync
        code, ``with``. It binds *ctx* for its body.

        Raises:
            usercontext.exceptions.NoContextError: If *ctx* is omitted and none
                is bound.
        """
        return Scope(self, current() if ctx is None else ctx)

    def stats(self, top: int = 10) -> RegistryStats:
        """
        Return a snapshot of the counters, with the *top* keys most open.
        """
        ranked = sorted(self._resources_open.items(), key=lambda kv: -kv[1])[:top]
        return RegistryStats(
            scopes_open=self._scopes_open,
            scopes_opened=self._scopes_opened,
            resources_open=tuple((_key_name(k), n) for k, n in ranked),
            resources_created=self._resources_created,
            cleanup_errors=self._cleanup_errors,
        )

    def __repr__(self) -> str:
        return f"<usercontext.Registry(num_providers={len(self._providers)})>"


class _Override:
    __slots__ = ("_key", "_registry", "_saved", "_value")

    def __init__(self, registry: Registry, key: Hashable, value: _Value) -> None:
        self._registry = registry
        self._key = key
        self._value = value

    def __enter__(self) -> None:
        providers = self._registry._providers  # noqa: SLF001
        self._saved = providers.get(self._key)
        providers[self._key] = self._value

    def __exit__(self, *exc_info: object) -> None:
        providers = self._registry._providers  # noqa: SLF001
        if self._saved is None:
            del providers[self._key]
        else:
            providers[self._key] = self._saved


_NEW, _OPEN, _CLOSED = 0, 1, 2
_MISSING: Any = object()
_ASYNC_KINDS = (AWAITABLE, ASYNC_CM, ASYNC_GEN)


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
        self._resources: dict[object, object] = {}
        # (key, kind, what to exit, close hook, value), in order of creation.
        self._opened: list[tuple[object, str, Any, Any, object]] = []
        self._state = _NEW

    @property
    def ctx(self) -> UserContext:
        """
        The context this scope belongs to.
        """
        return self._ctx

    def _refuse(self, key: object) -> None:
        """
        Raise why *key* cannot be handed out now (called when a check failed).
        """
        if self._state != _OPEN:
            what = "not entered yet" if self._state == _NEW else "closed"
            msg = (
                f"This scope is {what}: resources can be asked for only inside "
                "`async with registry.scope(ctx) as scope:` (or `with`)."
            )
            raise ScopeClosedError(msg)
        bound = current()
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
        bound = _get(None)
        if self._state != _OPEN or (
            bound is not ctx and bound is not None and bound.user_id != ctx.user_id
        ):
            self._refuse(key)
        value = self._resources.get(key, _MISSING)
        if value is not _MISSING:
            return value
        provider = self._provider(key)
        if isinstance(provider, _Value):
            return provider.value
        result = provider.make(ctx)
        kind = kind_of(type(result))
        if kind is ASYNC_CM and hasattr(result, "__enter__"):
            kind = SYNC_CM  # both kinds: a sync scope enters it the sync way
        if kind in _ASYNC_KINDS:
            if kind is AWAITABLE and hasattr(result, "close"):
                result.close()  # no "never awaited" warning on top of the error
            msg = (
                f"The provider of {_key_name(key)} is asynchronous; use "
                "`await scope.aget(key)` in an `async with` scope."
            )
            raise TypeError(msg)
        if kind is GEN:
            value = first_value(result, f"provider of {_key_name(key)}")
        elif kind is SYNC_CM:
            value = result.__enter__()
        else:
            value, result = result, None
        return self._keep(provider, kind, result, value)

    @overload
    async def aget(self, key: type[T]) -> T: ...
    @overload
    async def aget(self, key: Hashable) -> Any: ...
    async def aget(self, key: object) -> Any:
        """
        Return the resource *key*, creating it on first use; any provider works.

        Raises:
            KeyError: If nothing is registered for *key*.
            usercontext.exceptions.IsolationError: If another user's context
                is bound.
            usercontext.exceptions.ScopeClosedError: Outside the scope's block.
        """
        ctx = self._ctx
        bound = _get(None)
        if self._state != _OPEN or (
            bound is not ctx and bound is not None and bound.user_id != ctx.user_id
        ):
            self._refuse(key)
        value = self._resources.get(key, _MISSING)
        if value is not _MISSING:
            return value
        provider = self._provider(key)
        if isinstance(provider, _Value):
            return provider.value
        result = provider.make(ctx)
        kind = kind_of(type(result))
        if kind is AWAITABLE:
            result = await result
            kind = kind_of(type(result))
        if kind is ASYNC_GEN:
            value = await first_value_async(result, f"provider of {_key_name(key)}")
        elif kind is ASYNC_CM:
            value = await result.__aenter__()
        elif kind is GEN:
            value = first_value(result, f"provider of {_key_name(key)}")
        elif kind is SYNC_CM:
            value = result.__enter__()
        else:
            value, result = result, None
        return self._keep(provider, kind, result, value)

    def _provider(self, key: object) -> _Provider | _Value:
        provider = self._registry._providers.get(key)  # noqa: SLF001
        if provider is None:
            msg = (
                f"Nothing is registered for {_key_name(key)}. Register a provider first: "
                "registry.register(key, provider)."
            )
            raise KeyError(msg)
        return provider

    def _keep(self, provider: _Provider, kind: str, obj: Any, value: object) -> object:
        key = provider.key
        self._resources[key] = value
        self._opened.append((key, kind, obj, provider.close, value))
        registry = self._registry
        registry._resources_created += 1  # noqa: SLF001
        counts = registry._resources_open  # noqa: SLF001
        counts[key] = counts.get(key, 0) + 1
        return value

    # -- entering and leaving --

    def _enter(self) -> None:
        if self._state != _NEW:
            msg = "A scope can be entered once; open a new one with registry.scope()."
            raise RuntimeError(msg)
        ctx = self._ctx
        prev = _get(None)
        if prev is not None and prev.user_id != ctx.user_id:
            bind(ctx).__enter__()  # raises IsolationError with bind's explanation
        # Where the scope was opened, for the warning if it is never closed; the
        # line number is worked out from the instruction offset only then.
        frame = sys._getframe(2)  # noqa: SLF001
        self._code = frame.f_code
        self._lasti = frame.f_lasti
        self._token = _var.set(ctx)
        self._state = _OPEN
        registry = self._registry
        registry._scopes_open += 1  # noqa: SLF001
        registry._scopes_opened += 1  # noqa: SLF001

    def _leave(self) -> None:
        self._state = _CLOSED
        self._resources.clear()
        self._registry._scopes_open -= 1  # noqa: SLF001
        try:  # noqa: SIM105  # see bind.__exit__: left in another Context, nothing to undo
            _var.reset(self._token)
        except ValueError:
            pass

    def _forget(self, key: object) -> None:
        counts = self._registry._resources_open  # noqa: SLF001
        n = counts[key] - 1
        if n:
            counts[key] = n
        else:
            del counts[key]

    def __enter__(self) -> Self:
        self._enter()
        return self

    def __exit__(  # noqa: C901  # one branch per kind of resource, inline for speed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors: list[BaseException] = []
        fatal: BaseException | None = None
        opened = self._opened
        try:
            while opened:
                key, kind, obj, close, value = opened.pop()
                self._forget(key)
                try:
                    if kind is GEN:
                        finish_gen(obj, exc)
                    elif kind is SYNC_CM:
                        obj.__exit__(exc_type, exc, tb)
                    elif kind in _ASYNC_KINDS:
                        msg = (
                            f"{_key_name(key)} was opened with aget() but its scope was left "
                            "with a sync `with`: its async cleanup cannot run. Use `async with`."
                        )
                        raise TypeError(msg)  # noqa: TRY301  # collected like any cleanup error
                except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                    errors.append(e)
                except BaseException as e:  # noqa: BLE001  # raised below, after the others
                    fatal = fatal or e
                if close is not None:
                    try:
                        result = close(value)
                        if result is not None and kind_of(type(result)) is AWAITABLE:
                            if hasattr(result, "close"):
                                result.close()
                            msg = (
                                f"The close hook of {_key_name(key)} is asynchronous; "
                                "use `async with registry.scope()`."
                            )
                            raise TypeError(msg)  # noqa: TRY301  # collected like the others
                    except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                        errors.append(e)
                    except BaseException as e:  # noqa: BLE001  # raised below
                        fatal = fatal or e
        finally:
            self._leave()
        self._raise(errors, exc, fatal, cancelled=False)

    async def __aenter__(self) -> Self:
        self._enter()
        return self

    async def __aexit__(  # noqa: C901  # one branch per kind of resource, inline for speed
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        errors: list[BaseException] = []
        fatal: BaseException | None = None
        timeout = self._registry._cleanup_timeout  # noqa: SLF001
        opened = self._opened
        try:
            while opened:
                key, kind, obj, close, value = opened.pop()
                self._forget(key)
                try:
                    if kind is GEN:
                        finish_gen(obj, exc)
                    elif kind is SYNC_CM:
                        obj.__exit__(exc_type, exc, tb)
                    elif kind is ASYNC_GEN:
                        await drive(finish_agen(obj, exc), timeout, "resource %r", key)
                    elif kind is ASYNC_CM:
                        await drive(obj.__aexit__(exc_type, exc, tb), timeout, "resource %r", key)
                except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                    errors.append(e)
                except BaseException as e:  # noqa: BLE001  # raised below, after the others
                    fatal = fatal or e
                if close is not None:
                    try:
                        result = close(value)
                        if result is not None and kind_of(type(result)) is AWAITABLE:
                            await drive(result, timeout, "resource %r", key)
                    except Exception as e:  # noqa: BLE001  # collected; every cleanup runs
                        errors.append(e)
                    except BaseException as e:  # noqa: BLE001  # raised below
                        fatal = fatal or e
        finally:
            self._leave()
        cancelled = exc is not None and isinstance(exc, anyio.get_cancelled_exc_class())
        self._raise(errors, exc, fatal, cancelled=cancelled)

    def _raise(
        self,
        errors: list[BaseException],
        exc: BaseException | None,
        fatal: BaseException | None,
        *,
        cancelled: bool,
    ) -> None:
        if errors:
            self._registry._cleanup_errors += len(errors)  # noqa: SLF001
            for error in errors:
                logger.error(
                    "A cleanup of a scope of user %r failed: %s",
                    self._ctx.user_id,
                    describe(error),
                )
        if fatal is not None:
            raise fatal
        if not errors:
            return
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
