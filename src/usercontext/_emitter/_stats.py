"""
The hub's counters, and the frozen snapshots of them that `EmitterHub.stats`
returns.
"""

from __future__ import annotations

import heapq

from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs


if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ._state import _Attached


@attrs.frozen
class SinkStats:
    """
    A snapshot of one attached sink.

    Attributes:
        user_id: The user it receives events of.
        sink: Its repr.
        pending: Events waiting for it, the batch being sent included.
        peak_pending: The most events ever pending for it at once.
        lag_s: How long ago its oldest pending event was emitted, in seconds.
        delivered: Events it accepted.
        dropped: Events it will not get, dropped by the overflow policy.
        send_errors: Sends to it that raised or timed out.

    .. versionadded:: 0.1.0
    """

    user_id: str
    sink: str
    pending: int
    peak_pending: int
    lag_s: float
    delivered: int
    dropped: int
    send_errors: int


@attrs.frozen
class EmitterStats:
    """
    A snapshot of an `EmitterHub`'s gauges and counters.

    Deliveries and drops are counted per sink: an event delivered to two
    connections counts twice. For one sink, once its buffer is empty,
    ``delivered + sum(dropped.values()) + dead_lettered`` equals the events
    routed to it.

    ``dropped`` is a read-only mapping from a reason to the events a sink will
    not get for it: ``"oldest"`` (evicted for a newer one by ``drop_oldest``),
    ``"newest"`` (refused by ``drop_newest``, or because only critical events
    were buffered), ``"detached"`` (pending when the sink was detached).

    Attributes:
        users: Users with state held right now.
        attached: Sinks attached right now.
        waiting: Calls of `Emitter.emit` waiting for room right now.
        peak_pending: The most events ever pending for one sink at once.
        emitted: Events accepted by `Emitter.emit` and `Emitter.emit_nowait`.
        delivered: Events accepted by a sink.
        dropped: Events a sink will not get, by reason.
        rejected: Emits refused because a buffer was full
            (`usercontext.exceptions.EmitterFullError`).
        timed_out: Emits that waited for room past their timeout.
        retried: Sends retried after an error.
        dead_lettered: Events handed to the dead-letter hook.
        unrouted: Events emitted while their user had no sink attached (kept
            for replay only).
        replayed: Events queued again, from the history, for sinks that resumed.
        missed: Events that resuming sinks were told they missed.
        send_errors: Sends that raised or timed out.
        publish_errors: Calls of `Emitter.emit` that the hub's bus failed
            (`usercontext.exceptions.BackendUnavailableError`); 0 without a bus.
        top: The sinks with the most events pending, most first.

    .. versionadded:: 0.1.0
    """

    users: int
    attached: int
    waiting: int
    peak_pending: int
    emitted: int
    delivered: int
    dropped: Mapping[str, int]
    rejected: int
    timed_out: int
    retried: int
    dead_lettered: int
    unrouted: int
    replayed: int
    missed: int
    send_errors: int
    publish_errors: int
    top: tuple[SinkStats, ...]


class Counters:
    """
    What a hub counts since it was made, shared by the parts that count it.
    """

    __slots__ = (
        "dead_lettered",
        "delivered",
        "dropped",
        "emitted",
        "missed",
        "peak_pending",
        "publish_errors",
        "rejected",
        "replayed",
        "retried",
        "send_errors",
        "timed_out",
        "unrouted",
        "waiting",
    )

    def __init__(self) -> None:
        self.emitted = self.delivered = self.rejected = self.timed_out = 0
        self.retried = self.send_errors = self.dead_lettered = self.unrouted = 0
        self.replayed = self.missed = self.waiting = self.publish_errors = 0
        # The most pending for one sink, among the sinks that ended.
        self.peak_pending = 0
        self.dropped: dict[str, int] = {}

    def drop(self, a: _Attached, reason: str, n: int) -> None:
        """
        Count *n* events that the sink of *a* will not get, for *reason*.
        """
        a.dropped += n
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def snapshot(
        self, users: int, attached: Iterable[_Attached], now: float, top: int
    ) -> EmitterStats:
        """
        Return the counters, with the gauges of the hub and its *top* sinks most
        behind at *now*.
        """
        sinks = list(attached)
        peak = max([self.peak_pending, *(max(a.peak, len(a.queue) + a.inflight) for a in sinks)])
        lagging = heapq.nlargest(top, sinks, key=lambda a: len(a.queue) + a.inflight)
        return EmitterStats(
            users=users,
            attached=len(sinks),
            waiting=self.waiting,
            peak_pending=peak,
            emitted=self.emitted,
            delivered=self.delivered,
            dropped=MappingProxyType(dict(self.dropped)),
            rejected=self.rejected,
            timed_out=self.timed_out,
            retried=self.retried,
            dead_lettered=self.dead_lettered,
            unrouted=self.unrouted,
            replayed=self.replayed,
            missed=self.missed,
            send_errors=self.send_errors,
            publish_errors=self.publish_errors,
            top=tuple(_sink_stats(a, now) for a in lagging),
        )


def _sink_stats(a: _Attached, now: float) -> SinkStats:
    oldest = a.batch[0] if a.batch else (a.queue[0] if a.queue else None)
    pending = len(a.queue) + a.inflight
    return SinkStats(
        user_id=a.stream.user_id,
        sink=repr(a.sink),
        pending=pending,
        peak_pending=max(a.peak, pending),
        lag_s=0.0 if oldest is None else max(0.0, now - oldest.ts),
        delivered=a.delivered,
        dropped=a.dropped,
        send_errors=a.send_errors,
    )
