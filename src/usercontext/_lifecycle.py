"""
The lifecycle of what a provider returns: its kinds (a value, an awaitable, a
sync or async context manager, a sync or async generator), entering it, and
leaving it again, in sync and async code, with async cleanups shielded from
cancellation and cut after a timeout.

The engine factory and the registry's scopes both go through here. A scope's
hot paths keep their own copy of `enter`, `aenter`, `leave` and `aleave`
inline for speed; each names its twin here, and a test runs both on the same
cases.
"""

from __future__ import annotations

import asyncio.tasks
import dis
import logging
import os
import sys
import threading
import types

from asyncio import CancelledError, current_task
from types import AsyncGeneratorType, GeneratorType
from typing import TYPE_CHECKING, Any

import anyio

from .exceptions import CloseTimeoutError


if TYPE_CHECKING:
    from asyncio import Future
    from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
    from types import CodeType, TracebackType
    from typing import TypeAlias

    ExcInfo: TypeAlias = tuple[
        type[BaseException] | None, BaseException | None, TracebackType | None
    ]


logger = logging.getLogger("usercontext")


# How many cancellations of a task are pending: Task.cancelling(), new in
# Python 3.11. Before, nothing counts them: every one held is raised again.
_cancelling: Callable[[Any], int] = (
    (lambda task: task.cancelling()) if sys.version_info >= (3, 11) else (lambda _task: 0)
)
_counted = sys.version_info >= (3, 11)


def add_note(exc: BaseException, note: str) -> None:
    """
    Add *note* to *exc*, as `BaseException.add_note` does on Python 3.11+.
    """
    notes: list[str] | None = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        # Declared from Python 3.11 on, set the same way before.
        exc.__notes__ = notes  # pyright: ignore[reportAttributeAccessIssue]
    notes.append(note)


def describe(exc: BaseException) -> str:
    """
    Return ``"TypeName: message"`` for *exc*.
    """
    return f"{type(exc).__qualname__}: {exc}"


async def drive(awaitable: Awaitable[Any], timeout: float, what: str, *what_args: object) -> Any:
    """
    Await a cleanup: shielded from cancellation, cut after *timeout* seconds.

    The scope is entered before the cleanup's first step: a cleanup may open
    cancel scopes of its own, and those must nest inside ours on both loops.
    On asyncio, a task that no anyio cancel scope encloses needs no shield
    from one: the cleanup is only guarded against native cancellation, and
    cut by a timer of the loop.

    Raises:
        usercontext.exceptions.CloseTimeoutError: If it was cut; the message
            names ``what % what_args``.
    """
    task = _unscoped_task()
    if task is not None:
        # No anyio cancel scope around the task: none can cancel it, so none
        # need be shielded from, and the cut is a timer of the loop (see
        # _Cut) instead of anyio's scope and deadline, which cost a cleanup
        # several times its own work.
        cut = _Cut(timeout, what, what_args)
        timer = task.get_loop().call_later(timeout, cut.fire)
        try:
            return await _guard(awaitable, task, cut)
        finally:
            timer.cancel()
    scope = anyio.move_on_after(timeout, shield=True)
    try:
        with scope:
            return await shielded(awaitable)
    except CancelledError:
        if scope.cancel_called:
            # Cut, and the task was cancelled natively meanwhile: that
            # cancellation wins (the scope let it through), and the cut is logged.
            logger.error(_cut(timeout, what, *what_args))  # noqa: TRY400  # a cut, not a crash
        raise
    raise CloseTimeoutError(_cut(timeout, what, *what_args))


def _cut(timeout: float, what: str, *what_args: object) -> str:
    return (
        f"Closing {what % what_args} took longer than its timeout of {timeout} s and was "
        "cut. Make the cleanup faster or raise the timeout."
    )


_modules = sys.modules  # where _unscoped_task looks for anyio's asyncio backend


class _Cut:
    """
    The deadline of a cleanup `drive` runs without a cancel scope: when it
    fires, the future the cleanup waits on is cancelled, and so is each one
    it waits on after (a bare yield gets a `CancelledError` thrown in), as a
    cancel scope's deadline would; `_guard` then raises `CloseTimeoutError`
    for the `CancelledError` that comes out of the cleanup, with the message
    `drive` gives (made only then).
    """

    __slots__ = ("fired", "fut", "timeout", "what", "what_args")

    def __init__(self, timeout: float, what: str, what_args: tuple[object, ...]) -> None:
        self.timeout = timeout
        self.what = what
        self.what_args = what_args
        self.fired = False
        self.fut: Future[Any] | None = None

    @property
    def message(self) -> str:
        return _cut(self.timeout, self.what, *self.what_args)

    def fire(self) -> None:
        self.fired = True
        fut = self.fut
        if fut is not None:
            fut.cancel()


def _unscoped_task() -> Any:
    """
    Return the running asyncio task if no anyio cancel scope encloses it (then
    no cancel scope can cancel it), else `None`; `None` on trio too.
    """
    try:
        task = current_task()
    except RuntimeError:  # no asyncio loop: trio
        return None
    backend = _modules.get("anyio._backends._asyncio")
    if backend is None:
        return task  # anyio never ran on this loop: no scope of its exists
    # anyio's own record of each task's innermost cancel scope; if a release
    # of anyio names it otherwise, every cleanup takes the scoped way.
    states = getattr(backend, "_task_states", None)
    if states is None:  # pragma: no cover  # the anyio the tests run has it
        return None
    state = states.get(task)
    if state is None or getattr(state, "cancel_scope", True) is None:
        return task
    return None


def shielded(awaitable: Awaitable[Any]) -> Awaitable[Any]:
    """
    Return *awaitable*, made to hold against the native cancellation of an
    asyncio task, for use inside a shielding cancel scope.

    anyio's shield holds against anyio's cancel scopes only. A plain
    ``Task.cancel()`` (from `asyncio.timeout`, `asyncio.wait_for`, a server, or
    the loop's shutdown) would still cut the awaitable. On asyncio, it runs in
    the same task (its own cancel scopes, context and task identity stay
    valid), but waits on each of its futures through a proxy: a native
    cancellation cancels the proxy, is remembered, and is raised again once
    the awaitable has finished; a cancellation of one of the cancel scopes
    inside the shield (its own, or a cleanup timeout) reaches it as usual.
    On trio every cancellation is a cancel scope, so *awaitable* is returned
    as is.
    """
    try:
        task = current_task()
    except RuntimeError:  # no asyncio loop: trio
        return awaitable
    return _guard(awaitable, task)


class _LoopOfThread(threading.local):
    loop: object = None


if sys.version_info >= (3, 12):
    asyncio_task = current_task  # pragma: no cover  # run there by CI, not by coverage
else:
    # Before Python 3.12, asyncio.current_task() asks get_running_loop(), which
    # makes a getpid() system call on every call (to tell a forked child):
    # more than the rest of an uncontended engine use. The loop last seen
    # running in this thread is kept instead, and the task it runs now read
    # from asyncio's own table; a loop that runs no task (stopped, or not
    # this thread's any more) has no entry there, and the slow way is taken.
    _loop_of_thread = _LoopOfThread()
    _current_tasks: dict[object, asyncio.Task[Any]] = getattr(asyncio.tasks, "_current_tasks")  # noqa: B009  # private, undeclared

    def asyncio_task() -> asyncio.Task[Any] | None:
        """
        Return the running asyncio task, as `asyncio.current_task` does.

        Raises:
            RuntimeError: If no asyncio loop runs in this thread (trio).
        """
        loop = _loop_of_thread.loop
        if loop is not None:
            task = _current_tasks.get(loop)
            if task is not None:
                return task
        task = current_task()
        if task is not None:  # pragma: no branch  # a coroutine on asyncio runs in a task
            _loop_of_thread.loop = task.get_loop()
        return task

    def _forget_loop() -> None:
        # A child forked inside a task inherits asyncio's table as it was:
        # its entry would name the parent's task.
        _loop_of_thread.loop = None

    os.register_at_fork(after_in_child=_forget_loop)


def running_task() -> object:
    """
    Return the task running now, on asyncio or on trio.
    """
    try:
        return current_task()
    except RuntimeError:  # no asyncio loop: trio, which anyio's trio backend imported
        return sys.modules["trio"].lowlevel.current_task()


def _meant_for_it() -> bool:
    """
    Say whether a cancellation that reached a `shielded` awaitable comes from a
    cancel scope inside the shield: anyio delivers one only when such a scope is
    cancelled or past its deadline, which a native cancellation never makes so.
    """
    return anyio.current_effective_deadline() <= anyio.current_time()


@types.coroutine
def _guard(  # noqa: C901, PLR0912, PLR0915  # the task protocol, step by step
    awaitable: Awaitable[Any], task: Any, cut: _Cut | None = None
) -> Generator[Any, Any, Any]:
    steps = awaitable.__await__()
    pending = _cancelling(task)
    held: list[CancelledError] = []  # native cancellations, raised again at the end
    value: Any = None
    result: Any = None
    thrown: BaseException | None = None
    try:
        while True:
            try:
                yielded = steps.send(value) if thrown is None else steps.throw(thrown)
            except StopIteration as stop:
                result = stop.value
                break
            value = thrown = None
            if getattr(yielded, "_asyncio_future_blocking", None):
                # Waited on as its task would, through proxies that a native
                # cancellation cancels instead of it. (Written out here: a
                # generator delegated to is not traced on Python 3.11 after a
                # throw, so coverage would miss what follows.)
                fut: Future[Any] = yielded
                fut._asyncio_future_blocking = False
                if cut is not None:
                    if cut.fired:
                        fut.cancel()  # past the deadline: each wait is cut
                    else:
                        cut.fut = fut
                while not fut.done():
                    proxy = fut.get_loop().create_future()
                    wake = _waker(proxy)
                    fut.add_done_callback(wake)
                    try:
                        yield from proxy
                    except CancelledError as e:
                        fut.remove_done_callback(wake)
                        if not _meant_for_it():
                            held.append(e)
                        elif not fut.cancel(*e.args[:1]):
                            thrown = e  # done meanwhile: thrown in, as a task would
                continue
            # A bare yield (one loop iteration), or something the task refuses
            # by throwing an error in: passed on, and what comes back.
            try:
                value = yield yielded
            except CancelledError as e:
                if _meant_for_it():
                    thrown = e
                else:
                    held.append(e)
            except BaseException as e:  # handed to the awaitable, as a task does
                thrown = e
            if thrown is None and cut is not None and cut.fired:
                thrown = CancelledError()  # past the deadline: a step of the loop is cut too
    except BaseException as e:  # raised below
        error: BaseException | None = e
    else:
        error = None
    # A cancellation held is raised now, unless an asyncio.timeout inside the
    # awaitable took it back (each undoes its own when it exits), as
    # Task.cancelling() counts: it was that timeout's, not the caller's.
    if held and (_cancelling(task) > pending or not _counted):
        if isinstance(error, Exception):
            logger.error(
                "A shielded cleanup step failed while its task was being cancelled: %s",
                describe(error),
            )
        if cut is not None and cut.fired:
            # Cut, and the task was cancelled natively meanwhile: that
            # cancellation wins, and the cut is logged (as `drive` does).
            logger.error(cut.message)
        # Raised outside the handler: chained to a cut by a cancel scope, it
        # would pass for that scope's own and be swallowed by it.
        raise held[0]
    if error is not None:
        if cut is not None and cut.fired and isinstance(error, CancelledError):
            raise CloseTimeoutError(cut.message) from None
        raise error
    return result


def _waker(proxy: Future[Any]) -> Callable[[object], None]:
    def wake(_fut: object) -> None:
        if not proxy.done():
            proxy.set_result(None)

    return wake


# What a provider or factory returned, by type; see kind_of.
PLAIN, AWAITABLE, ASYNC_CM, SYNC_CM, GEN, ASYNC_GEN = (
    "plain",
    "awaitable",
    "async context manager",
    "context manager",
    "generator",
    "async generator",
)
# An entered async generator whose code has no await: its cleanup runs to the
# end without suspending, so a cancel scope around it could neither see a
# cancellation nor reach a deadline, and it is left out.
ASYNC_GEN_NO_AWAIT = "async generator without await"
_kinds: dict[type[object], str] = {}
_KINDS_MAX = 1024


def kind_of(cls: type[object]) -> str:
    """
    Say what an object of type *cls*, returned by a provider, is to be treated as.

    Cached per type: ``hasattr`` on a type costs more than the rest of handing
    out a resource. Generators come first, then context managers, then
    awaitables (an object that is both a context manager and awaitable is
    entered).
    """
    kind = _kinds.get(cls)
    if kind is None:
        if issubclass(cls, GeneratorType):
            kind = GEN
        elif issubclass(cls, AsyncGeneratorType):
            kind = ASYNC_GEN
        elif hasattr(cls, "__aenter__"):
            kind = ASYNC_CM
        elif hasattr(cls, "__enter__"):
            kind = SYNC_CM
        elif hasattr(cls, "__await__"):
            kind = AWAITABLE
        else:
            kind = PLAIN
        if len(_kinds) < _KINDS_MAX:
            _kinds[cls] = kind
    return kind


def first_value(gen: Generator[Any, None, Any], what: str) -> Any:
    """
    Return the first value of the generator *gen* made by *what*.

    Raises:
        RuntimeError: If it returned without yielding, rather than letting
            `StopIteration` escape (which would end a caller's loop silently).
    """
    try:
        return next(gen)
    except StopIteration:
        raise no_yield(what) from None


async def first_value_async(agen: AsyncGenerator[Any, None], what: str) -> Any:
    """
    Return the first value of the async generator *agen* made by *what*.

    Raises:
        RuntimeError: If it returned without yielding.
    """
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        raise no_yield(what) from None


def no_yield(what: str) -> RuntimeError:
    """
    Return the error for a generator made by *what* that returned without
    yielding.
    """
    return RuntimeError(
        f"The generator {what} returned without yielding. Yield the resource once; the code "
        "after the yield is its cleanup."
    )


def finish_gen(gen: Generator[Any, None, Any], exc: BaseException | None) -> None:
    """
    Run the cleanup of a generator resource, as `contextlib.contextmanager`
    does: resume it, or throw the body's exception *exc* into it.
    """
    if exc is None:
        # A for loop ends without raising StopIteration: cheaper than next().
        for _ in gen:
            raise yielded_again(gen)
        return
    try:
        gen.throw(exc)
    except StopIteration:
        return
    except BaseException as e:
        if e is exc:
            return  # it let the body's exception through: not a cleanup error
        raise
    gen.close()
    msg = f"The generator {gen!r} yielded again after an exception."
    raise RuntimeError(msg)


async def finish_agen(agen: AsyncGenerator[Any, None], exc: BaseException | None) -> None:
    """
    Run the cleanup of an async generator resource, as
    `contextlib.asynccontextmanager` does.
    """
    try:
        if exc is None:
            await agen.__anext__()
        else:
            await agen.athrow(exc)
    except StopAsyncIteration:
        return
    except BaseException as e:
        if e is exc:
            return
        raise
    raise await async_yielded_again(agen, after_exception=exc is not None)


async def async_yielded_again(
    agen: AsyncGenerator[Any, None], *, after_exception: bool = False
) -> RuntimeError:
    """
    Close *agen*, which yielded again when it was to finish, and return the
    error saying so.
    """
    await agen.aclose()
    what = "again after an exception" if after_exception else "more than once"
    return RuntimeError(f"The async generator {agen!r} yielded {what}.")


def yielded_again(gen: Generator[Any, None, Any]) -> RuntimeError:
    """
    Close *gen*, which yielded after its first value with no exception thrown
    in, and return the error saying so.
    """
    gen.close()
    return RuntimeError(f"The generator {gen!r} yielded more than once.")


# The opcodes through which a coroutine or an async generator awaits, on any
# Python version: without one of them, its code cannot suspend.
_AWAIT_OPS = frozenset(
    dis.opmap[name]
    for name in (
        "GET_AWAITABLE",
        "GET_AITER",
        "GET_ANEXT",
        "BEFORE_ASYNC_WITH",
        "END_ASYNC_FOR",
        "SEND",
        "YIELD_FROM",
    )
    if name in dis.opmap
)
_suspends: dict[int, tuple[CodeType, bool]] = {}
_SUSPENDS_MAX = 1024


def can_suspend(code: CodeType) -> bool:
    """
    Say whether a coroutine or async generator running *code* may ever await.

    One that cannot completes each step without suspending: a cancel scope
    around it would neither see a cancellation nor reach a deadline. Cached
    per code object, by id; a cached code object is kept alive, so its id
    cannot be reused by another.
    """
    entry = _suspends.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1]
    suspends = any(i.opcode in _AWAIT_OPS for i in dis.get_instructions(code))
    if len(_suspends) < _SUSPENDS_MAX:
        _suspends[id(code)] = (code, suspends)
    return suspends


def refuse(result: Any, kind: str, what: str, fix: str) -> TypeError:
    """
    Return the error for *result*, of *kind*, made by *what*, which sync code
    cannot enter; *fix* says what to use instead.
    """
    if kind is AWAITABLE and hasattr(result, "close"):
        result.close()  # no "never awaited" warning on top of the error
    return TypeError(f"{what} is asynchronous (it returned an {kind}); {fix}.")


def left_async(kind: str, what: str, fix: str) -> TypeError:
    """
    Return the error for *what*, an entered *kind*, left by sync code although
    its cleanup needs an event loop; *fix* says what to use instead.
    """
    return TypeError(
        f"{what} ({kind}) was entered by async code but left by sync code, so its async "
        f"cleanup cannot run; {fix}."
    )


def enter(result: Any, kind: str, what: str, fix: str) -> tuple[str, Any, Any]:
    """
    Enter *result*, of *kind* (`kind_of` its type), made by *what*, the sync
    way: return what `leave` needs, ``(kind, to_exit, value)``.

    An object that is both an async and a sync context manager is entered the
    sync way. Scope.get is its inline twin.

    Raises:
        TypeError: If *result* needs an event loop (`refuse`, with *fix*).
        RuntimeError: If a generator returned without yielding.
    """
    if kind is GEN:
        return GEN, result, first_value(result, what)
    if kind is SYNC_CM or (kind is ASYNC_CM and hasattr(result, "__enter__")):
        return SYNC_CM, result, result.__enter__()
    if kind is PLAIN:
        return PLAIN, None, result
    raise refuse(result, kind, f"The {what}", fix)


async def aenter(result: Any, kind: str, what: str) -> tuple[str, Any, Any]:
    """
    Enter *result*, of *kind*, made by *what*, in async code: any kind works.
    Return what `aleave` needs, ``(kind, to_exit, value)``.

    An awaitable is awaited and what it gives entered in turn. An async
    generator that cannot await gets the kind `ASYNC_GEN_NO_AWAIT`.
    Scope.aget is its inline twin.

    Raises:
        RuntimeError: If a generator returned without yielding.
    """
    if kind is AWAITABLE:
        result = await result
        # pyright takes the type of an Any value for type[Unknown].
        kind = kind_of(type(result))  # pyright: ignore[reportUnknownArgumentType]
    if kind is ASYNC_GEN:
        value = await first_value_async(result, what)
        return (ASYNC_GEN if can_suspend(result.ag_code) else ASYNC_GEN_NO_AWAIT), result, value
    if kind is ASYNC_CM:
        return ASYNC_CM, result, await result.__aenter__()
    if kind is GEN:
        return GEN, result, first_value(result, what)
    if kind is SYNC_CM:
        return SYNC_CM, result, result.__enter__()
    return PLAIN, None, result


def leave(  # noqa: PLR0913  # what one resource needs; a bundle would cost an allocation
    entered: tuple[str, Any, Any],
    close: Callable[[Any], object] | None,
    exc_info: ExcInfo,
    errors: list[BaseException],
    *,
    fix: str,
    what: str,
    what_args: tuple[object, ...] = (),
) -> BaseException | None:
    """
    Undo what `enter` entered, the sync way, then call *close* with the value;
    both steps run whatever the other did.

    The body's exception (*exc_info*, as `sys.exc_info` gives it) is thrown
    into a generator and handed to a context manager's exit. Errors are
    appended to *errors*. A fatal error (a `BaseException` that is no
    `Exception`, such as KeyboardInterrupt) is returned, for the caller to
    raise once its other cleanups ran.
    Scope.__exit__ is its inline twin.

    *fix* says what to use instead when a cleanup needs an event loop; *what*
    ``%`` *what_args* names what is left in the error.
    """
    kind, obj, value = entered
    exc_type, exc, tb = exc_info
    fatal: BaseException | None = None
    try:
        if kind is GEN:
            finish_gen(obj, exc)
        elif kind is SYNC_CM:
            obj.__exit__(exc_type, exc, tb)
        elif kind is not PLAIN:
            raise left_async(kind, what % what_args, fix)  # noqa: TRY301  # collected
    except Exception as e:  # collected; the close hook runs too
        errors.append(e)
    except BaseException as e:  # returned, raised by the caller
        fatal = e
    if close is not None:
        try:
            result = close(value)
            if result is not None and kind_of(type(result)) is AWAITABLE:
                what = f"The close hook of {what % what_args}"
                raise refuse(result, AWAITABLE, what, fix)  # noqa: TRY301  # collected
        except Exception as e:  # collected
            errors.append(e)
        except BaseException as e:  # returned, raised by the caller
            fatal = fatal or e
    return fatal


async def aleave(  # noqa: C901, PLR0913  # a branch per kind; as leave
    entered: tuple[str, Any, Any],
    close: Callable[[Any], object] | None,
    exc_info: ExcInfo,
    errors: list[BaseException],
    *,
    timeout: float,
    what: str,
    what_args: tuple[object, ...] = (),
) -> BaseException | None:
    """
    Undo what `aenter` (or `enter`) entered, in async code, then call *close*
    with the value, as `leave` does.

    Each async step is shielded from cancellation and cut after *timeout*
    seconds (`drive`; *what* ``%`` *what_args* names what is closed in the
    error). Scope.__aexit__ is its inline twin.
    """
    kind, obj, value = entered
    exc_type, exc, tb = exc_info
    fatal: BaseException | None = None
    try:
        if kind is ASYNC_GEN_NO_AWAIT:
            await finish_agen(obj, exc)
        elif kind is GEN:
            finish_gen(obj, exc)
        elif kind is SYNC_CM:
            obj.__exit__(exc_type, exc, tb)
        elif kind is ASYNC_GEN:
            await drive(finish_agen(obj, exc), timeout, what, *what_args)
        elif kind is ASYNC_CM:
            await drive(obj.__aexit__(exc_type, exc, tb), timeout, what, *what_args)
    except Exception as e:  # collected; the close hook runs too
        errors.append(e)
    except BaseException as e:  # returned, raised by the caller
        fatal = e
    if close is not None:
        try:
            result = close(value)
            if result is not None and kind_of(type(result)) is AWAITABLE:
                await drive(result, timeout, what, *what_args)  # type: ignore[arg-type]
        except Exception as e:  # collected
            errors.append(e)
        except BaseException as e:  # returned, raised by the caller
            fatal = fatal or e
    return fatal
