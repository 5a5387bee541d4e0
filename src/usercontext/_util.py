"""
Small helpers shared by the modules that close things.
"""

from __future__ import annotations

import logging

from types import AsyncGeneratorType, GeneratorType
from typing import TYPE_CHECKING, Any

import anyio

from .exceptions import CloseTimeoutError


if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable
    from types import TracebackType

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
        raise _no_yield(what) from None


async def first_value_async(agen: AsyncGenerator[Any, None], what: str) -> Any:
    """
    Return the first value of the async generator *agen* made by *what*.

    Raises:
        RuntimeError: If it returned without yielding.
    """
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        raise _no_yield(what) from None


def _no_yield(what: str) -> RuntimeError:
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
        try:
            next(gen)
        except StopIteration:
            return
        gen.close()
        msg = f"The generator {gen!r} yielded more than once."
        raise RuntimeError(msg)
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
    await agen.aclose()
    what = "more than once" if exc is None else "again after an exception"
    msg = f"The async generator {agen!r} yielded {what}."
    raise RuntimeError(msg)


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
