"""
Small helpers shared by the modules that close things.
"""

from __future__ import annotations

import inspect
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


async def run_steps(
    steps: Iterable[tuple[Callable[..., object], tuple[Any, ...]]],
    timeout: float,
    what: str,
    *what_args: object,
) -> list[BaseException]:
    """
    Call each cleanup step in order and return the errors they raised.

    A step that returns an awaitable is awaited inside a cancel scope that is
    shielded from outside cancellation and cut after *timeout* seconds (then a
    `usercontext.exceptions.CloseTimeoutError` naming ``what % what_args`` is added and the
    remaining steps are skipped). The scope is entered only when there is
    something to await: a cancel scope costs several microseconds, more than a
    sync cleanup.
    """
    errors: list[BaseException] = []
    scope: anyio.CancelScope | None = None
    try:
        for fn, args in steps:
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    if scope is None:
                        scope = anyio.move_on_after(timeout, shield=True)
                        scope.__enter__()
                    await result
            except Exception as e:  # noqa: BLE001, PERF203  # collected; each step must run
                errors.append(e)
    except BaseException as e:
        # A shielded scope is cancelled only by its own deadline.
        if scope is None or not scope.__exit__(type(e), e, e.__traceback__):
            raise
        errors.append(
            CloseTimeoutError(
                f"Closing {what % what_args} took longer than its timeout of {timeout} s "
                "and was cut. Make the cleanup faster or raise the timeout."
            )
        )
        return errors
    if scope is not None:
        scope.__exit__(None, None, None)
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


def gen_exit(gen: Generator[Any, None, Any]) -> ExitFn:
    """
    Return an exit function that finishes *gen* as `contextlib.contextmanager`
    does: resume it, or throw the body's exception into it.
    """

    def exit_(
        exc_type: type[BaseException] | None,  # noqa: ARG001  # the exit protocol's
        exc: BaseException | None,
        tb: TracebackType | None,  # noqa: ARG001
    ) -> None:
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

    return exit_


def async_gen_exit(agen: AsyncGenerator[Any, None]) -> Callable[..., Awaitable[None]]:
    """
    Return an async exit function that finishes *agen* as
    `contextlib.asynccontextmanager` does.
    """

    async def exit_(
        exc_type: type[BaseException] | None,  # noqa: ARG001  # the exit protocol's
        exc: BaseException | None,
        tb: TracebackType | None,  # noqa: ARG001
    ) -> None:
        if exc is None:
            try:
                await agen.__anext__()
            except StopAsyncIteration:
                return
            await agen.aclose()
            msg = f"The async generator {agen!r} yielded more than once."
            raise RuntimeError(msg)
        try:
            await agen.athrow(exc)
        except StopAsyncIteration:
            return
        except BaseException as e:
            if e is exc:
                return
            raise
        await agen.aclose()
        msg = f"The async generator {agen!r} yielded again after an exception."
        raise RuntimeError(msg)

    return exit_
