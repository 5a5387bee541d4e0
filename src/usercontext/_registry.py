"""
`Registry`: what each request may use, and how to open and close it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs

from . import _checks
from ._current import current
from ._provider import Counts, Provider, key_name
from ._scope import _NEW, Scope, _LeakWarningScope


if TYPE_CHECKING:
    from collections.abc import Callable, Hashable
    from contextlib import AbstractContextManager

    from ._context import UserContext

T = TypeVar("T")
_new = object.__new__

__all__ = ["Registry", "RegistryStats"]


@attrs.frozen
class RegistryStats:
    """
    A snapshot of a `Registry`'s counters.

    Attributes:
        in_use: Resources created and not yet closed, over all keys.
        top: The keys with the most resources in use, as ``(key, count)``
            pairs, most first (ties in the order the keys were first
            registered).
        scopes: Scopes entered and not yet closed.
        opened: Scopes entered since the registry was created.
        created: Resources created since the registry was created.
        closed: Resources closed since the registry was created
            (created = closed + in_use).
        close_errors: Cleanups that raised or timed out.

    .. versionadded:: 0.1.0
    """

    in_use: int
    top: tuple[tuple[str, int], ...]
    scopes: int
    opened: int
    created: int
    closed: int
    close_errors: int


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
        close_timeout: How long closing one resource (each async cleanup)
            may take before it is cut, in seconds.

    A registry holds providers only, never a resource (each `Scope` holds
    and closes its own), so it has nothing to close itself.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, close_timeout: float = 5.0) -> None:
        _checks.seconds("close_timeout", close_timeout)
        self._providers: dict[Hashable, Provider] = {}
        # Per key ever registered, in order; kept when a provider is replaced.
        self._counts: dict[Hashable, Counts] = {}
        self._close_timeout = float(close_timeout)
        self._opened = 0  # scopes entered
        self._left = 0  # scopes left: open = entered - left
        self._close_errors = 0

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
            msg = f"The provider of {key_name(key)} must be callable, got {provider!r}."
            raise TypeError(msg)
        _checks.function("close", hooks[1], allow_none=True)
        if key in self._providers and not replace:
            msg = (
                f"{key_name(key)} is registered already. Pass replace=True to replace its "
                "provider, or use registry.override() in tests."
            )
            raise KeyError(msg)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = Counts(key)
        self._providers[key] = Provider(provider, close, counts)

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
        return _Override(self, key, Provider(None, None, Counts(key), value))

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
        scope = _new(_LeakWarningScope)
        scope._registry = self
        scope._ctx = ctx
        scope._resources = {}
        scope._awaits_close = False
        scope._state = _NEW
        scope._frame = None
        return scope

    def _open_scope(self, ctx: UserContext) -> Scope:
        """
        Return a new scope of *ctx*, open already, for a caller that binds
        *ctx* around its whole use itself and closes it on every path (the
        ASGI middleware): it binds nothing, and needs no warning for being
        dropped open, nor the frame that warning would name.
        """
        scope = _new(Scope)
        scope._registry = self
        scope._ctx = ctx
        scope._resources = {}
        scope._awaits_close = False
        scope._state = ctx  # open: see Scope.__aenter__
        scope._frame = None
        scope._token = None
        self._opened += 1
        return scope

    def stats(self, top: int = 10) -> RegistryStats:
        """
        Return a snapshot of the counters, with the *top* keys most open.
        """
        counts = self._counts.values()
        open_ = [(c.key, c.created - c.closed) for c in counts if c.created != c.closed]
        ranked = sorted(open_, key=lambda kv: -kv[1])[:top]
        created = sum(c.created for c in counts)
        closed = sum(c.closed for c in counts)
        return RegistryStats(
            in_use=created - closed,
            top=tuple((key_name(k), n) for k, n in ranked),
            scopes=self._opened - self._left,
            opened=self._opened,
            created=created,
            closed=closed,
            close_errors=self._close_errors,
        )

    def __repr__(self) -> str:
        return f"<usercontext.Registry(num_providers={len(self._providers)})>"


class _Override:
    __slots__ = ("_key", "_registry", "_saved", "_value")

    def __init__(self, registry: Registry, key: Hashable, value: Provider) -> None:
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
