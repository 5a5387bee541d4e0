"""
The one `ContextVar` that holds the current `UserContext`, and the ways to
carry it across tasks, threads, executors and processes.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import types

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._context import UserContext
from .exceptions import IsolationError, NoContextError


if TYPE_CHECKING:
    from collections.abc import Awaitable, Generator
    from types import TracebackType

    import anyio

    from typing_extensions import ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "bind",
    "current",
    "current_or_none",
    "isolated",
    "to_thread",
    "wrap",
]

# One variable holding one frozen object: every extra ContextVar makes each
# set/reset in the process slower. It is never set to None: "unbound" is a
# Context where it was never set (see _fresh_context).
_var: contextvars.ContextVar[UserContext] = contextvars.ContextVar("usercontext")
_get = _var.get

_NO_CONTEXT = (
    "No UserContext is bound. Bind one around the work with "
    "`with usercontext.bind(ctx):` (or `async with`, or a decorator), or use "
    "usercontext.current_or_none() where running without a user is fine."
)


def current() -> UserContext:
    """
    Return the `UserContext` bound for the running code.

    Raises:
        usercontext.exceptions.NoContextError: If none is bound.

    .. versionadded:: 0.1.0
    """
    try:
        return _get()
    except LookupError:
        raise NoContextError(_NO_CONTEXT) from None


def current_or_none() -> UserContext | None:
    """
    Return the `UserContext` bound for the running code, or `None`.

    .. versionadded:: 0.1.0
    """
    return _get(None)


class bind:  # noqa: N801  # used like a function, as contextlib's are
    """
    Bind *ctx* as the current context for a block or a function.

    Use it as ``with bind(ctx):``, ``async with bind(ctx):``, or as a decorator
    of sync and async functions (each call binds anew). Leaving the block
    restores the context that was current before, so binds nest.

    Binding a context of a different user while one is bound raises
    `usercontext.exceptions.IsolationError`: one user's work must not run
    inside another's. Children of the same user are fine. Run another user's
    work in a fresh Context instead, with `isolated` (tasks and threads
    started from here inherit the bound context, so they do not do).

    Enter each `bind` object once at a time; create one per block.

    Args:
        ctx: The context to bind.

    Raises:
        TypeError: If *ctx* is not a `UserContext`.

    >>> import usercontext as uc
    >>> ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    >>> with uc.bind(ctx):
    ...     uc.current() is ctx
    True
    >>> uc.current_or_none() is None
    True

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_ctx", "_token")

    _token: contextvars.Token[UserContext]

    def __init__(self, ctx: UserContext) -> None:
        if type(ctx) is not UserContext and not isinstance(ctx, UserContext):
            msg = f"bind() takes a usercontext.UserContext, got {type(ctx).__name__}."  # type: ignore[unreachable]
            raise TypeError(msg)
        self._ctx = ctx

    def __enter__(self) -> UserContext:
        ctx = self._ctx
        prev = _get(None)
        if prev is not None and prev.user_id != ctx.user_id:
            msg = (
                f"Cannot bind a context of user {ctx.user_id!r} while a context of user "
                f"{prev.user_id!r} is bound. Run the other user's work in a fresh Context "
                "with usercontext.isolated instead of nesting it."
            )
            raise IsolationError(msg)
        # Entering one bind twice at once overwrites this token; the second exit
        # then fails loudly in ContextVar.reset ("Token has already been used").
        self._token = _var.set(ctx)
        return ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The block may end in another Context than it began in (an async
        # generator finalised by another task, a streaming body). The token is
        # no good there, and that Context never ran our __enter__: it holds what
        # it inherited, as a task started inside the block would, so it is left
        # as it is.
        try:  # noqa: SIM105  # contextlib.suppress would double the cost of a bind
            _var.reset(self._token)
        except ValueError:
            pass

    async def __aenter__(self) -> UserContext:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: F) -> F:
        ctx = self._ctx
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            msg = (
                f"bind() cannot decorate generator function {fn.__qualname__}: it would bind "
                "only while the generator is created. Use `with bind(ctx):` inside its body."
            )
            raise TypeError(msg)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_bound(*args: Any, **kwargs: Any) -> Any:
                with bind(ctx):
                    return await fn(*args, **kwargs)

            return async_bound  # type: ignore[return-value]

        @functools.wraps(fn)
        def bound(*args: Any, **kwargs: Any) -> Any:
            with bind(ctx):
                return fn(*args, **kwargs)

        return bound  # type: ignore[return-value]

    def __repr__(self) -> str:
        ctx = self._ctx
        return f"<usercontext.bind(user_id={ctx.user_id!r}, request_id={ctx.request_id!r})>"


def wrap(fn: Callable[P, T]) -> Callable[P, T]:
    """
    Capture the current Context for a callback that runs later, elsewhere.

    Each call of the returned function runs *fn* in a copy of the Context that
    was current when `wrap` was called: it sees the same `current` (and every
    other context variable), whichever thread calls it, and what it changes
    stays in that copy. Calls may run concurrently.

    Raises:
        TypeError: If *fn* is a coroutine function; tasks started in a task
            group already copy the Context.

    .. versionadded:: 0.1.0
    """
    if inspect.iscoroutinefunction(fn):
        msg = (
            f"wrap() takes a sync callable, got coroutine function {fn.__qualname__}. "
            "Start it in a task group instead: tasks copy the Context they are started from."
        )
        raise TypeError(msg)
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> T:
        return captured.copy().run(fn, *args, **kwargs)

    return wrapped


async def to_thread(
    fn: Callable[..., T],
    /,
    *args: Any,
    abandon_on_cancel: bool = False,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """
    Run *fn* in a worker thread with a copy of the caller's Context.

    It works on asyncio and trio, through `anyio.to_thread.run_sync`, whose
    *abandon_on_cancel* and *limiter* it takes.

    .. versionadded:: 0.1.0
    """
    # Imported on the first call: `import usercontext` need not load it.
    import anyio.to_thread

    run: Callable[..., Any] = contextvars.copy_context().run
    return await anyio.to_thread.run_sync(
        run,
        fn,
        *args,
        abandon_on_cancel=abandon_on_cancel,
        limiter=limiter,
    )


def _fresh_context() -> contextvars.Context:
    """
    Return a copy of the current Context in which no `UserContext` is bound.

    A ContextVar cannot be unset, so the copy is built from an empty Context
    with every other variable carried over.
    """
    if _get(None) is None:  # nothing bound: a plain copy is fresh already
        return contextvars.copy_context()
    fresh = contextvars.Context()
    for var, value in contextvars.copy_context().items():
        if var is not _var:
            fresh.run(var.set, value)
    return fresh


@types.coroutine
def isolated_call(coro: Any, context: contextvars.Context) -> Generator[Any, Any, Any]:
    """
    Await *coro* with each of its steps run in *context*.

    A task runs every step of its coroutines in the task's own Context; this
    runs the steps of one coroutine in another, which is what a new task would
    do, without a task: the coroutine stays in the caller's task, under the
    caller's cancel scopes, on asyncio and trio alike. It is one generator: an
    awaiting request keeps one object alive for it, and binds no method
    between its steps (the garbage collector visits whatever a waiting request
    holds, again and again).
    """
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            if error is None:
                yielded = context.run(coro.send, value)
            else:
                thrown, error = error, None
                yielded = context.run(coro.throw, thrown)
        except StopIteration as e:
            return e.value
        try:
            value = yield yielded
        except GeneratorExit:
            context.run(coro.close)
            raise
        except BaseException as e:  # thrown into the coroutine, as a task would
            error = e


def isolated(fn: Callable[P, T]) -> Callable[P, T]:
    """
    Decorate *fn* so each call runs in a fresh Context with no user bound.

    The call sees every other context variable of its caller, but no
    `UserContext`: it binds its own, and nothing it binds or sets leaks into
    the caller, or into the next request served by the same thread or task.
    Use it where one task or thread serves request after request. An async
    function runs in the caller's task, under the caller's cancel scopes, with
    each of its steps run in its own Context (no task is started); its result
    and exceptions reach the caller unchanged.

    .. versionadded:: 0.1.0
    """
    if inspect.iscoroutinefunction(fn):
        afn: Callable[..., Awaitable[Any]] = fn

        @functools.wraps(fn)
        async def async_isolated(*args: Any, **kwargs: Any) -> Any:
            return await isolated_call(afn(*args, **kwargs), _fresh_context())

        return async_isolated  # type: ignore[return-value]

    @functools.wraps(fn)
    def sync_isolated(*args: P.args, **kwargs: P.kwargs) -> T:
        return _fresh_context().run(fn, *args, **kwargs)

    return sync_isolated
