"""
The overflow decision: what an emit does when a sink's buffer is full, or
producers wait ahead of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usercontext.exceptions import EmitterFullError, EmitterTimeoutError


if TYPE_CHECKING:
    from ._event import Event
    from ._policies import Overflow
    from ._state import _Attached, _Stream, _Waiter
    from ._stats import Counters


class OverflowPolicy:
    """
    A hub's overflow policy, its bound and its critical types, applied to the
    emits that find a buffer full.
    """

    __slots__ = ("counters", "critical", "maxsize", "policy")

    def __init__(
        self, policy: Overflow, maxsize: int, critical: frozenset[str], counters: Counters
    ) -> None:
        self.policy: Overflow = policy
        self.maxsize = maxsize
        self.critical = critical
        self.counters = counters

    def full_error(
        self, user_id: str, kind: str, waited: float, timeout: float | None
    ) -> EmitterFullError:
        """
        Count and return the error of an emit that found no room, after
        waiting *waited* seconds (0 when it did not wait).
        """
        critical = kind in self.critical
        if waited:
            self.counters.timed_out += 1
            return EmitterTimeoutError(
                user_id, self.maxsize, self.policy, critical, waited, timeout
            )
        self.counters.rejected += 1
        return EmitterFullError(user_id, self.maxsize, self.policy, critical, waited, timeout)

    def plan(
        self, s: _Stream, kind: str, me: _Waiter | None
    ) -> list[tuple[_Attached, int | None]] | None:
        """
        Decide what an event of *kind* does to the full buffers of *s*: for
        each full sink, the index of the buffered event to drop, or `None` to
        skip the new one. Return `None` if the event must wait, or raise if it
        is refused.

        *me* is the waiting producer that emits, if any.
        """
        policy = self.policy
        if policy == "error":
            raise self.full_error(s.user_id, kind, 0.0, None)
        if policy == "block":
            return None
        critical = kind in self.critical
        if critical and s.waiters and s.waiters[0] is not me:
            return None  # critical events wait their turn
        maxsize = self.maxsize
        plan: list[tuple[_Attached, int | None]] = []
        for a in s.sinks:
            q = a.queue
            if len(q) + a.inflight < maxsize:
                continue
            victim: int | None = None
            if policy == "drop_oldest" or critical:
                indexes = range(len(q)) if policy == "drop_oldest" else range(len(q) - 1, -1, -1)
                for i in indexes:
                    if q[i].type not in self.critical:
                        victim = i
                        break
                if victim is None and critical:
                    return None
            plan.append((a, victim))
        return plan

    def route(self, s: _Stream, plan: list[tuple[_Attached, int | None]], ev: Event) -> None:
        """
        Carry out *plan*, then queue *ev* for every sink of *s* it did not skip.
        """
        counters = self.counters
        maxsize = self.maxsize
        skip: list[_Attached] = []
        for a, victim in plan:
            a.peak = max(a.peak, maxsize)
            if victim is None:
                skip.append(a)
                counters.drop(a, "newest", 1)
            else:
                del a.queue[victim]
                counters.drop(a, "oldest" if self.policy == "drop_oldest" else "newest", 1)
        for a in s.sinks:
            if a not in skip:
                a.queue.append(ev)
                a.wake()
        if not s.sinks:
            counters.unrouted += 1
        if s.history is not None:
            s.history.append(ev)
        counters.emitted += 1
