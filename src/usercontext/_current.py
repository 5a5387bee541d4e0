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

from ._context import UserContext, described_rules
from .exceptions import ConfigurationError, IsolationError, NoContextError


if TYPE_CHECKING:
    from collections.abc import Awaitable, Generator
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
    run: Callable[..., Any] = contextvars.copy_context().run
    return await anyio.to_thread.run_sync(
        run,
        fn,
        *args,
        abandon_on_cancel=abandon_on_cancel,
        limiter=limiter,
    )


def _run_in_process(
    data: dict[str, Any] | None,
    rules: str,
    fn: Callable[..., T],
    args: Any,
    kwargs: Any,
) -> T:
    """
    Run one task of a `ContextExecutor` in a worker process, under the context
    *data* describes, or none; check first that the worker's rules are *rules*,
    those of the submitter.
    """
    # Compared as text computed once per configure(): a short string costs
    # each task far less to send than the IdRules object.
    here = described_rules()
    if rules != here:
        msg = (
            "This worker process validates contexts by other rules than the process that "
            f"submitted the task: here {here}, there {rules}. usercontext.configure() "
            "applies to one process only: call it with the same rules in the pool's "
            "initializer, such as ProcessPoolExecutor(initializer=functools.partial("
            "usercontext.configure, id_rules=RULES, max_depth=DEPTH))."
        )
        raise ConfigurationError(msg)
    # A worker forked while a context was bound inherited it in its Context: run
    # every task in one where none is bound, so a task sent without a context
    # sees none, whatever the start method and whoever started the worker.
    context = _fresh_context()
    if data is None:
        return context.run(fn, *args, **kwargs)
    ctx = UserContext.from_dict(data)
    return context.run(bind(ctx)(fn), *args, **kwargs)


class ContextExecutor(concurrent.futures.Executor):
    """
    Wrap an executor so each task runs with its *submitter's* context.

    A task submitted with `submit` (or `map`, or ``loop.run_in_executor``)
    runs in a copy of the Context that was current at submission, not the one
    the pool's threads inherited when they started, and nothing it changes
    leaks into the next task the same thread runs.

    Processes cannot share a Context: for a `concurrent.futures.ProcessPoolExecutor`
    (or with *processes* set to `True`) the current `UserContext` is sent
    through `UserContext.to_dict` and bound in the worker for the task; a task
    submitted with none bound runs with none, in every worker, whatever the
    start method (fork, forkserver, spawn). The worker validates the context
    with its own rules, which must be the submitter's: if you call
    `usercontext.configure`, call it in the pool's initializer too. A task
    sent to a worker whose rules differ raises
    `usercontext.exceptions.ConfigurationError` instead of running.

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
            # Submitted in a Context with no user bound: a pool that forks its
            # workers on this call copies the caller's Context into them.
            return _fresh_context().run(
                self._executor.submit,
                _run_in_process,
                None if ctx is None else ctx.to_dict(),
                described_rules(),
                fn,
                args,
                kwargs,
            )
        return self._executor.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:  # noqa: FBT001, FBT002  # the signature of Executor.shutdown
        """
        Shut the wrapped executor down.
        """
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"<usercontext.ContextExecutor({self._executor!r})>"


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


class _InContext:
    """
    Await a coroutine with each of its steps run in *context*.

    A task runs every step of its coroutines in the task's own Context; this
    runs the steps of one coroutine in another, which is what a new task would
    do, without a task: the coroutine stays in the caller's task, under the
    caller's cancel scopes, on asyncio and trio alike.
    """

    __slots__ = ("_coro", "_run")

    def __init__(self, coro: Any, context: contextvars.Context) -> None:
        self._coro = coro
        self._run = context.run

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        run = self._run
        send = coro.send
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    yielded = run(send, value)
                else:
                    thrown, error = error, None
                    yielded = run(coro.throw, thrown)
            except StopIteration as e:
                return e.value
            try:
                value = yield yielded
            except GeneratorExit:
                run(coro.close)
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
            return await _InContext(afn(*args, **kwargs), _fresh_context())

        return async_isolated  # type: ignore[return-value]

    @functools.wraps(fn)
    def sync_isolated(*args: P.args, **kwargs: P.kwargs) -> T:
        return _fresh_context().run(fn, *args, **kwargs)

    return sync_isolated
