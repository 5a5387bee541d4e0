"""
Helpers for testing code that uses usercontext.

`ContextFactory` makes valid contexts and binds them. `IsolationChecker` runs
a callable as many users at once and fails on any cross-user observation.
`LeakGuard` finds what a piece of work left behind: a context bound, a scope
open, a quota slot held, an engine open, a hub running. `RecordingSink` keeps
the events a hub delivers. `QuotaConformance` is the conformance suite of the
`usercontext.Quota` protocol, for the authors of a quota backend.

``import usercontext`` does not import this module, and it imports no test
framework: use it from pytest, unittest or a plain script alike. The pytest
plugin (``usercontext.pytest_plugin``) offers them as fixtures.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import itertools

from typing import TYPE_CHECKING, Any

import anyio

from . import _attach, _context
from ._quota_conformance import QuotaConformance
from ._testing_isolation import CrossUserObservation, IsolationChecker, IsolationReport
from ._testing_leaks import Leak, LeakGuard


if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._attach import AttachToken
    from ._context import UserContext
    from ._emitter import Event


__all__ = [
    "ContextFactory",
    "CrossUserObservation",
    "IsolationChecker",
    "IsolationReport",
    "Leak",
    "LeakGuard",
    "QuotaConformance",
    "RecordingSink",
]


class ContextFactory:
    """
    Make valid contexts for tests, and bind them until `unbind_all`.

    Each context `make` returns is of a new user unless *user_id* is given:
    ``u-1``, ``u-2`` ..., in thread ``t-1``, run ``r-1`` and so on.

    >>> import usercontext as uc
    >>> from usercontext.testing import ContextFactory
    >>> contexts = ContextFactory()
    >>> ctx = contexts.bind()
    >>> uc.current().user_id
    'u-1'
    >>> contexts.unbind_all()
    >>> uc.current_or_none() is None
    True

    Args:
        prefix: What user ids begin with, before ``-`` and a number.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, prefix: str = "u") -> None:
        _context.UserContext(user_id=f"{prefix}-1", thread_id="t-1", run_id="r-1")  # checks it
        self._prefix = prefix
        self._numbers = itertools.count(1)
        self._tokens: list[AttachToken] = []

    def make(self, **fields: Any) -> UserContext:
        """
        Return a new root context of a new user, with *fields* overriding the
        generated ``user_id``, ``thread_id`` and ``run_id`` (and passing any
        other field of `usercontext.UserContext`).

        Raises:
            usercontext.exceptions.InvalidContextError: If a field is invalid.
        """
        n = next(self._numbers)
        ids: dict[str, Any] = {
            "user_id": f"{self._prefix}-{n}",
            "thread_id": f"t-{n}",
            "run_id": f"r-{n}",
        }
        return _context.UserContext(**{**ids, **fields})

    def users(self, count: int) -> list[UserContext]:
        """
        Return *count* new contexts, each of a different user.
        """
        return [self.make() for _ in range(count)]

    def bind(self, ctx: UserContext | None = None, /, **fields: Any) -> UserContext:
        """
        Bind *ctx* (or a new context made from *fields*) until `unbind_all`,
        and return it.

        Raises:
            usercontext.exceptions.IsolationError: If a context of another
                user is bound.
        """
        if ctx is None:
            ctx = self.make(**fields)
        elif fields:
            msg = "bind() takes a context or the fields of a new one, not both."
            raise TypeError(msg)
        self._tokens.append(_attach.attach(ctx))
        return ctx

    def unbind_all(self) -> None:
        """
        Undo every `bind` made in the running Context (thread, task), most
        recent first; those made elsewhere are left for a call there.
        """
        self._tokens = [t for t in reversed(self._tokens) if not _detached(t)][::-1]

    def forget(self) -> None:
        """
        Drop the binds made in other Contexts that have ended (a test's task):
        there is nothing left to undo.
        """
        self._tokens.clear()

    def __repr__(self) -> str:
        return f"<usercontext.testing.ContextFactory(bound={len(self._tokens)})>"


def _detached(token: AttachToken) -> bool:
    """
    Detach *token* if it can be here; tell whether it was.
    """
    try:
        _attach.detach(token)
    except ValueError:  # bound in another Context: undone there, or gone with it
        return False
    except RuntimeError:  # something bound over it was left: a leak to report
        return False
    return True


class RecordingSink:
    """
    A sink that keeps every event it gets in memory, for tests.

    Attach it to a hub as any sink (see `usercontext.EmitterHub.attach`), then
    look at what it got, or wait for it with `wait_for`.

    Attributes:
        events: Every event received, in order.
        batches: Every batch received, as tuples, in order.

    It keeps everything, without a bound: use it in tests, not in production.

    >>> import anyio, usercontext as uc
    >>> from usercontext.testing import RecordingSink
    >>> async def main():
    ...     sink = RecordingSink()
    ...     async with uc.EmitterHub() as hub:
    ...         hub.attach("u-42", sink)
    ...         ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    ...         hub.emitter(ctx).emit_nowait(uc.AGENT_STARTED)
    ...         with anyio.fail_after(5):
    ...             await sink.wait_for(1)
    ...     return [e.type for e in sink.events]
    >>> anyio.run(main)
    ['agent_started']

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.batches: list[tuple[Event, ...]] = []
        self._waiters: list[tuple[int, anyio.Event]] = []

    async def send(self, events: Sequence[Event]) -> None:
        """
        Record *events* as one batch.
        """
        batch = tuple(events)
        self.batches.append(batch)
        self.events.extend(batch)
        if self._waiters:
            n = len(self.events)
            for want, signal in self._waiters:
                if n >= want:
                    signal.set()
            self._waiters = [w for w in self._waiters if n < w[0]]

    async def wait_for(self, count: int) -> None:
        """
        Wait until at least *count* events have been recorded.

        Bound it with a timeout, such as ``with anyio.fail_after(5):``.
        """
        if len(self.events) >= count:
            return
        waiter = (count, anyio.Event())
        self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            # Cancelled (a timeout, say): leave no waiter behind.
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def __repr__(self) -> str:
        return f"<usercontext.testing.RecordingSink(events={len(self.events)})>"
