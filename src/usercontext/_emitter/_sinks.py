"""
Sinks: where a user's events go, one per open connection.
"""

from __future__ import annotations

import inspect

from typing import TYPE_CHECKING, Protocol, runtime_checkable


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._event import Event


@runtime_checkable
class Sink(Protocol):
    """
    Where a user's events go: one object per open connection.

    The hub calls `send` from the sink's own delivery task with the events
    gathered since the last call, in order, one batch at a time; the next call
    waits for this one. Write a batch in one go (one socket write, one
    WebSocket message) and wait until it is accepted, as
    ``writer.write(...); await writer.drain()`` does.

    If `send` raises, the hub retries the same batch (see `Retry`), so delivery
    is at least once: a send that failed half-way may repeat events, and
    clients drop repeats by ``seq``. Raise
    `usercontext.exceptions.SinkClosedError` when the connection is gone for
    good: the hub then stops at once instead of retrying.

    .. versionadded:: 0.1.0
    """

    async def send(self, events: Sequence[Event]) -> None:
        """
        Deliver *events*, a batch in stream order.
        """
        ...


class CallbackSink:
    """
    A sink that calls *callback* with each batch of events.

    *callback* may be a plain function or a coroutine function; what it
    returns is ignored, and what it raises is retried as for any sink.

    On asyncio, a plain function cannot block, so the hub calls it without
    waking a task: once per turn of the event loop, for every user with new
    events, in the context the hub was entered in, with what was emitted
    since. If it returns an awaitable, the sink's task awaits it, bounded by
    `Retry`'s *timeout*, before the next batch.

    >>> import usercontext as uc
    >>> seen = []
    >>> sink = uc.CallbackSink(lambda events: seen.extend(e.seq for e in events))

    .. versionadded:: 0.1.0
    """

    def __init__(self, callback: Callable[[Sequence[Event]], object]) -> None:
        fn: object = callback
        if not callable(fn):
            msg = f"CallbackSink takes a callable, got {callback!r}."
            raise TypeError(msg)
        self.callback = callback

    async def send(self, events: Sequence[Event]) -> None:
        """
        Call the callback with *events*, and await what it returns if awaitable.
        """
        result = self.callback(events)
        if inspect.isawaitable(result):
            await result

    def __repr__(self) -> str:
        name = getattr(self.callback, "__qualname__", repr(self.callback))
        return f"<usercontext.CallbackSink({name})>"
