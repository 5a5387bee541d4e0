"""
Helpers shared by several test modules: waiting for a condition, contexts of
numbered users, errors raised on purpose, a logging handler that keeps its
records.

Test modules import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``
for the conftest.py there). Helpers used by one module stay in that module.
"""

from __future__ import annotations

import itertools
import logging

from typing import TYPE_CHECKING

import anyio

import usercontext as uc


if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterable


async def until(predicate: Callable[[], object], *, timeout: float = 5.0) -> None:
    """
    Let other tasks and threads run until *predicate* holds; fail after
    *timeout* seconds.
    """
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  # polls state that has no event
            await anyio.sleep(0.001)


def make_ctx(i: object, **kw: object) -> uc.UserContext:
    """
    A root context of user ``u-{i}``, in thread ``t-{i}`` and run ``r-{i}``,
    with the other fields *kw*.
    """
    return uc.UserContext(user_id=f"u-{i}", thread_id=f"t-{i}", run_id=f"r-{i}", **kw)  # type: ignore[arg-type]


def switches(ids: Iterable[Hashable]) -> int:
    """
    How often consecutive entries of *ids* differ: how interleaved they are.
    """
    return sum(a != b for a, b in itertools.pairwise(ids))


class BoomError(Exception):
    """
    An error raised on purpose by a body, a hook or a cleanup.
    """


class Fatal(BaseException):
    """
    Stands for a KeyboardInterrupt or SystemExit raised by a hook or a cleanup.
    """


class KeepRecords(logging.Handler):
    """
    A logging handler that keeps every record it handles in `records`
    (a new list, or the one given).
    """

    def __init__(self, records: list[logging.LogRecord] | None = None) -> None:
        super().__init__()
        self.records = [] if records is None else records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
