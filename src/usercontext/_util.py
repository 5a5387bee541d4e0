"""
Small helpers shared by the modules that close things.
"""

from __future__ import annotations

import inspect
import logging

from typing import TYPE_CHECKING, Any

import anyio

from .exceptions import CloseTimeoutError


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


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
