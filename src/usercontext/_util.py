"""
Small helpers shared by the modules that close things.
"""

from __future__ import annotations

import dis
import logging

from types import AsyncGeneratorType, GeneratorType
from typing import TYPE_CHECKING, Any

import anyio

from .exceptions import CloseTimeoutError


if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable
    from types import CodeType, TracebackType

    ExitFn = Callable[
        [type[BaseException] | None, BaseException | None, TracebackType | None], object
    ]


logger = logging.getLogger("usercontext")


def add_note(exc: BaseException, note: str) -> None:
    """
    Add *note* to *exc*, as `BaseException.add_note` does on Python 3.11+.
    """
    notes: Any = getattr(exc, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        exc.__notes__ = notes
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

    Raises:
        usercontext.exceptions.CloseTimeoutError: If it was cut; the message
            names ``what % what_args``.
    """
    with anyio.move_on_after(timeout, shield=True):
        return await awaitable
    msg = (
        f"Closing {what % what_args} took longer than its timeout of {timeout} s and was "
        "cut. Make the cleanup faster or raise the timeout."
    )
    raise CloseTimeoutError(msg)


async def run_steps(
    steps: Iterable[tuple[Callable[..., object], tuple[Any, ...]]],
    timeout: float,
    what: str,
    *what_args: object,
) -> list[BaseException]:
    """
    Call each cleanup step in order; return the errors they raised.

    Every step runs, whatever the others did. A step returning an awaitable is
    awaited with `drive`, so each is shielded and cut after *timeout*. An
    exception that is not an `Exception` (a KeyboardInterrupt) is re-raised once
    every step has run.
    """
    errors: list[BaseException] = []
    fatal: BaseException | None = None
    for fn, args in steps:
        try:
            result = fn(*args)
            if result is not None and kind_of(type(result)) is AWAITABLE:
                await drive(result, timeout, what, *what_args)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001, PERF203  # collected; each step must run
            errors.append(e)
        except BaseException as e:  # noqa: BLE001  # re-raised below, after the other steps
            fatal = fatal or e
    if fatal is not None:
        raise fatal
    return errors


# What a provider or factory returned, by type; see kind_of.
PLAIN, AWAITABLE, ASYNC_CM, SYNC_CM, GEN, ASYNC_GEN = (
    "plain",
    "awaitable",
    "async context manager",
    "context manager",
    "generator",
    "async generator",
)
_kinds: dict[type, str] = {}
_KINDS_MAX = 1024


def kind_of(cls: type) -> str:
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


def gen_exit(gen: Generator[Any, None, Any]) -> ExitFn:
    """
    Return an exit function (as ``__exit__``) that runs `finish_gen`.
    """
    return lambda _type, exc, _tb: finish_gen(gen, exc)


def async_gen_exit(agen: AsyncGenerator[Any, None]) -> ExitFn:
    """
    Return an exit function (as ``__aexit__``) that returns `finish_agen`.
    """
    return lambda _type, exc, _tb: finish_agen(agen, exc)
