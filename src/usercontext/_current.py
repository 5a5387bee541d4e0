"""
The one `ContextVar` that holds the current `UserContext`, and the ways to
carry it across tasks, threads, executors and processes.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import inspect

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from ._context import UserContext
from .exceptions import IsolationError, NoContextError


if TYPE_CHECKING:
    from collections.abc import Awaitable
    from types import TracebackType

    from typing_extensions import ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "ContextExecutor",
    "bind",
    "current",
    "current_or_none",
    "isolated",
    "to_thread",
    "wrap",
]

# One variable holding one frozen object: every extra ContextVar makes each
# set/reset in the process slower. None marks "unbound" after a cross-Context
# exit (see bind.__exit__).
_var: contextvars.ContextVar[UserContext | None] = contextvars.ContextVar("usercontext")
_get = _var.get

_NO_CONTEXT = (
    "No UserContext is bound. Bind one around the work with "
    "`with usercontext.bind(ctx):` (or `async with`, or the ASGI middleware), or use "
    "usercontext.current_or_none() where running without a user is fine."
)


def current() -> UserContext:
    """
    Return the `UserContext` bound for the running code.

    Raises:
        usercontext.exceptions.NoContextError: If none is bound.

    .. versionadded:: 0.1.0
    """
    ctx = _get(None)
    if ctx is None:
        raise NoContextError(_NO_CONTEXT)
    return ctx


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
    work in a fresh Context instead (`isolated`, a new task, or a thread).

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

    _token: contextvars.Token[UserContext | None]

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
                "(usercontext.isolated, a new task or thread) instead of nesting it."
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
        token = self._token
        try:
            _var.reset(token)
        except ValueError:
            # The block ends in another Context than it began in (an async
            # generator finalised elsewhere, a streaming body): a token cannot be
            # used there, so restore by value, and only if ours is still bound.
            if _get(None) is self._ctx:
                old = token.old_value
                _var.set(None if old is contextvars.Token.MISSING else old)

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
    return await anyio.to_thread.run_sync(
        contextvars.copy_context().run,
        fn,
        *args,
        abandon_on_cancel=abandon_on_cancel,
        limiter=limiter,
    )


def _run_in_process(data: dict[str, Any] | None, fn: Callable[..., T], args: Any, kwargs: Any) -> T:
    if data is None:
        return contextvars.copy_context().run(fn, *args, **kwargs)
    ctx = UserContext.from_dict(data)
    return contextvars.copy_context().run(bind(ctx)(fn), *args, **kwargs)


class ContextExecutor(concurrent.futures.Executor):
    """
    Wrap an executor so each task runs with its *submitter's* context.

    A task submitted with `submit` (or `map`, or ``loop.run_in_executor``)
    runs in a copy of the Context that was current at submission, not the one
    the pool's threads inherited when they started, and nothing it changes
    leaks into the next task the same thread runs.

    Processes cannot share a Context: for a `concurrent.futures.ProcessPoolExecutor`
    (or with *processes* set to `True`) the current `UserContext` is sent
    through `UserContext.to_dict` and bound in the child for the task. The child
    validates it with its own rules: call `usercontext.configure` in the pool's
    initializer if you changed them.

    Args:
        executor: The executor to wrap; it is shut down with this one.
        processes: Whether *executor* runs tasks in other processes; guessed
            from its type when `None`.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, executor: concurrent.futures.Executor, *, processes: bool | None = None
    ) -> None:
        self._executor = executor
        self._processes = (
            isinstance(executor, concurrent.futures.ProcessPoolExecutor)
            if processes is None
            else processes
        )

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """
        Schedule ``fn(*args, **kwargs)`` under the current context.
        """
        if self._processes:
            ctx = _get(None)
            return self._executor.submit(
                _run_in_process, None if ctx is None else ctx.to_dict(), fn, args, kwargs
            )
        return self._executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:  # noqa: FBT001, FBT002  # the signature of Executor.shutdown
        """
        Shut the wrapped executor down.
        """
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"<usercontext.ContextExecutor({self._executor!r})>"


def isolated(fn: Callable[P, T]) -> Callable[P, T]:
    """
    Decorate *fn* so each call runs in a fresh copy of the current Context.

    Nothing the call binds or sets leaks into the caller, or into the next
    request served by the same thread or task; and inside it, another user's
    context may be bound. Async functions run in a child task of a task group
    (the only portable way to give a coroutine its own Context); their result
    and exceptions reach the caller unchanged.

    .. versionadded:: 0.1.0
    """
    if inspect.iscoroutinefunction(fn):
        afn: Callable[..., Awaitable[Any]] = fn

        @functools.wraps(fn)
        async def async_isolated(*args: Any, **kwargs: Any) -> Any:
            outcome: list[Any] = []

            async def run() -> None:
                try:
                    outcome.append((True, await afn(*args, **kwargs)))
                except Exception as e:  # noqa: BLE001  # re-raised below, outside the group
                    outcome.append((False, e))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
            ok, value = outcome[0]
            if ok:
                return value
            raise value

        return async_isolated  # type: ignore[return-value]

    @functools.wraps(fn)
    def sync_isolated(*args: P.args, **kwargs: P.kwargs) -> T:
        return contextvars.copy_context().run(fn, *args, **kwargs)

    return sync_isolated
