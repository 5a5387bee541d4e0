"""
The hub's table of streams: one per user with state held, the users idle
without a sink (dropped after a time to live), and the attached sinks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from ._event import EVENTS_MISSED, _time
from ._state import _Stream


if TYPE_CHECKING:
    from collections.abc import Callable

    from ._state import _Attached


# The users dropped by one sweep after which the per-user tables are copied.
_COMPACT_AFTER = 1024


class Streams:
    """
    Users' streams by user id, the idle ones among them, and the attached
    sinks by sink.
    """

    __slots__ = ("attached", "idle", "idle_ttl", "released", "replay", "streams")

    def __init__(self, replay: int, idle_ttl: float) -> None:
        self.replay = replay
        self.idle_ttl = idle_ttl
        self.streams: dict[str, _Stream] = {}
        # Users without sinks, oldest first by the time they became idle.
        self.idle: dict[str, _Stream] = {}
        self.attached: dict[int, _Attached] = {}
        # Called with the user of each sink unlinked, when the hub has a bus.
        self.released: Callable[[str], None] | None = None

    def get(self, user_id: str) -> _Stream:
        """
        Return the stream of *user_id*, started anew if none is held.
        """
        s = self.streams.get(user_id)
        if s is None:
            s = self.streams[user_id] = _Stream(user_id, self.replay, _time())
            self.idle[user_id] = s
        return s

    def link(self, a: _Attached) -> None:
        """
        Route the events of its stream to *a* from now on.
        """
        self.attached[id(a.sink)] = a
        s = a.stream
        s.sinks = (*s.sinks, a)
        self.idle.pop(s.user_id, None)

    def detach(self, a: _Attached) -> int:
        """
        Detach *a* and cancel its delivery; return the events it will not get.
        """
        if a.unlinked:
            return 0
        pending = len(a.queue) + a.inflight
        head = a.batch or a.queue
        if head and head[0].type is EVENTS_MISSED:
            pending -= 1  # a notice, not an event of the stream
        a.reason = "detached"
        a.halted = True
        self.unlink(a)
        future = a.future
        if future is not None and not future.done():
            # Its task sleeps: woken, it ends, which costs far less than a
            # cancellation (a send in progress must be cut instead).
            a.waiter = None
            future.set_result(None)
        else:
            a.cancel()
        return pending

    def unlink(self, a: _Attached) -> None:
        """
        Stop routing events to *a*, and let producers waiting on it go on.
        """
        if a.unlinked:
            return
        a.unlinked = True
        self.attached.pop(id(a.sink), None)
        s = a.stream
        s.sinks = tuple(x for x in s.sinks if x is not a)
        if not s.sinks and not s.dead:
            s.idle_since = s.last = _time()
            self.idle[s.user_id] = s
        if self.released is not None:
            self.released(s.user_id)
        s.wake_waiter()

    def close(self) -> None:
        """
        Mark every stream dead, and wake the producers waiting for room.
        """
        for s in self.streams.values():
            s.dead = True
            for w in s.waiters:
                w.wake()

    def clear(self) -> None:
        """
        Forget every user.
        """
        self.streams.clear()
        self.idle.clear()

    async def sweep_every(self, scope: anyio.CancelScope) -> None:
        """
        Drop idle users every half time to live, until *scope* is cancelled.
        """
        with scope:
            while True:
                await anyio.sleep(max(self.idle_ttl / 2, 0.001))
                await self.sweep()

    async def sweep(self) -> None:
        """
        Drop the users idle for longer than the TTL, oldest first.

        The idle table is ordered by when users became idle, so the scan stops at
        the first user idle for less than the TTL. A user who emitted since is
        moved to the end rather than dropped.
        """
        horizon = _time() - self.idle_ttl
        # One pass to find them, then the deletions: taking the first entry
        # again after each deletion rescans the deleted slots, O(n**2) in all.
        expired: list[str] = []
        for user_id, s in self.idle.items():
            if s.idle_since > horizon:
                break
            expired.append(user_id)
        done = 0
        for i, user_id in enumerate(expired, 1):
            if i % 10_000 == 0:
                await anyio.lowlevel.checkpoint()
            # Look again: the user may have attached (or the hub closed) meanwhile.
            idle = self.idle
            found = idle.get(user_id)
            if found is None or found.idle_since > horizon:
                continue
            s = found
            del idle[user_id]
            if s.last > horizon:
                s.idle_since = s.last
                idle[user_id] = s
                continue
            s.dead = True
            del self.streams[user_id]
            if s.history is not None:
                # Freed now rather than by the cycle collector: a sink that
                # was attached refers to the stream from a cycle of its own.
                s.history.clear()
            done += 1
        if done >= _COMPACT_AFTER and done > len(self.streams):
            # A dict keeps its table when entries are deleted: copy the two
            # tables, so that a flood of users leaves no memory behind.
            self.streams = dict(self.streams)
            self.idle = dict(self.idle)
