"""
Helpers for testing code that uses usercontext.

`RecordingSink` keeps the events a hub delivers. `QuotaConformance` is the
conformance suite of the `usercontext.Quota` protocol, for the authors of a
quota backend.

``import usercontext`` does not import this module, and it imports no test
framework: use it from pytest, unittest or a plain script alike.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from ._quota_conformance import QuotaConformance


if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._emitter import Event


__all__ = ["QuotaConformance", "RecordingSink"]


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
