"""
The state of each user's stream and of each attached sink (one per
connection), and the `Attachment` a connection holds.
"""

from __future__ import annotations

import os
import re

from collections import deque
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import anyio

from ._event import EVENTS_MISSED, _encode, _ids_json, _time, new_event


if TYPE_CHECKING:
    import asyncio

    from collections.abc import Callable
    from types import TracebackType

    from typing_extensions import Self

    from ._event import Event
    from ._sinks import Sink


_EVENT_ID = re.compile(r"(?:([0-9a-f]{16})-)?([0-9]{1,19})")


class Signal:
    """
    The waiter of an idle delivery task on trio, shaped like an asyncio future.
    """

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()

    def done(self) -> bool:
        return self.event.is_set()

    def set_result(self, _: None) -> None:
        self.event.set()

    def __await__(self) -> Any:
        return self.event.wait().__await__()


class _Waiter:
    """
    A producer waiting for room in a full buffer, with its validated event.

    It waits on a future of the running asyncio loop (*loop*), made anew
    after each wake-up, or on a `Signal` on trio: no anyio call (each looks
    the backend up) per wake-up.
    """

    __slots__ = ("data_json", "expired", "frozen", "kind", "loop", "signal")

    signal: Any

    def __init__(
        self,
        kind: str,
        frozen: object,
        data_json: str | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.kind = kind
        self.frozen = frozen
        self.data_json = data_json
        self.loop = loop
        self.signal = Signal() if loop is None else loop.create_future()
        self.expired = False  # its timeout passed (asyncio)

    def rearm(self) -> None:
        """
        Wait anew, after a wake-up.
        """
        loop = self.loop
        self.signal = Signal() if loop is None else loop.create_future()

    def wake(self) -> None:
        signal = self.signal
        if not signal.done():
            signal.set_result(None)

    def expire(self) -> None:
        self.expired = True
        self.wake()


class _Stream:
    """
    The state of one user: sequence, replay history, sinks, waiting producers.
    """

    __slots__ = (
        "dead",
        "history",
        "idle_since",
        "last",
        "seq",
        "sinks",
        "stream_id",
        "user_id",
        "waiters",
    )

    user_id: str
    stream_id: str
    seq: int
    sinks: tuple[_Attached, ...]
    history: deque[Event] | None
    waiters: deque[_Waiter]
    last: float
    idle_since: float
    dead: bool

    def __init__(self, user_id: str, replay: int, now: float) -> None:
        self.user_id = user_id
        self.stream_id = os.urandom(8).hex()
        self.seq = 0
        self.sinks = ()
        self.history = deque(maxlen=replay) if replay else None
        self.waiters = deque()
        self.last = now
        self.idle_since = now
        self.dead = False

    def wake_waiter(self) -> None:
        if self.waiters:
            self.waiters[0].wake()

    def replay_into(
        self, a: _Attached, stream_id: str | None, after: int
    ) -> tuple[int, int | None]:
        """
        Queue for *a* the held events after *after*, behind a notice if some
        are missing; return how many were queued, and how many are missing
        (`None` when unknown).
        """
        history = list(self.history) if self.history is not None else []
        first_held = history[0].seq if history else self.seq + 1
        missed: int | None
        if (stream_id is not None and stream_id != self.stream_id) or after > self.seq:
            events, missed = history, None
        elif after >= first_held - 1:
            events, missed = history[max(0, after - first_held + 1) :], 0
        else:
            events, missed = history, first_held - 1 - after
        # Every held event is queued, even past maxsize: the history holds them
        # already (the queue only refers to them), and cutting the replay would
        # tell the sink it missed events that are still there to send. Until the
        # sink is back under maxsize, emits find it full and the policy applies.
        if missed != 0:
            before = events[0].seq - 1 if events else self.seq
            a.queue.append(self.notice(before, after, missed))
        a.queue.extend(events)
        return len(events), missed

    def notice(self, seq: int, after: int, missed: int | None) -> Event:
        """
        Return an `EVENTS_MISSED` notice of this stream, numbered *seq*.
        """
        data = {"missed": missed, "after_seq": after, "stream_id": self.stream_id}
        return new_event(
            EVENTS_MISSED,
            MappingProxyType(data),
            seq,
            self.stream_id,
            _time(),
            self.user_id,
            None,
            None,
            None,
            _encode(data),
            _ids_json(self.user_id, None, None, None),
        )


class _Attached:
    """
    One sink of one user, with its queue and its delivery task's state.
    """

    __slots__ = (
        "batch",
        "cuts",
        "cuttable",
        "delivered",
        "done",
        "draining",
        "dropped",
        "ended",
        "future",
        "halted",
        "handover",
        "inflight",
        "kick",
        "peak",
        "queue",
        "reason",
        "scope",
        "send_errors",
        "sending",
        "sink",
        "stream",
        "task",
        "timed_out",
        "timer",
        "unlinked",
        "waiter",
    )

    stream: _Stream
    sink: Sink
    queue: deque[Event]
    inflight: int
    batch: tuple[Event, ...]
    waiter: Any
    scope: anyio.CancelScope | None
    cuttable: bool
    cuts: int
    halted: bool
    draining: bool
    unlinked: bool
    ended: bool
    reason: str | None
    delivered: int
    dropped: int
    send_errors: int
    peak: int
    done: anyio.Event | None
    task: asyncio.Task[Any] | None
    future: Any
    kick: Any
    handover: Any
    sending: float | None
    timer: asyncio.TimerHandle | None
    timed_out: bool

    def __init__(self, stream: _Stream, sink: Sink) -> None:
        self.stream = stream
        self.sink = sink
        self.queue = deque()
        self.inflight = 0
        # A tuple: a sink cannot change the batch that is retried or dead-lettered.
        self.batch = ()
        self.waiter = None
        # The delivery's cancel scope on trio and Python 3.10 (see
        # Delivery.native): on asyncio 3.11+, the task is cut natively, and
        # only in a send or the wait before a retry (`cuttable`); `cuts` counts
        # the cancellations sent that it has not taken back yet.
        self.scope = None
        self.cuttable = False
        self.cuts = 0
        self.halted = False  # detached, or past the close's deadline: no more sends
        self.draining = False  # the hub closes: stop once the queue is empty
        self.unlinked = False  # no longer routed to
        self.ended = False  # the delivery task finished
        self.reason = None
        self.delivered = self.dropped = self.send_errors = self.peak = 0
        self.done = None
        # The delivery task on asyncio (which keeps it alive), and the send
        # watchdog's state (asyncio 3.11+): when the send in progress started
        # (loop time), the timer, and whether it fired.
        self.task = None
        # The delivery task's own waiter while it sleeps; for a direct sink
        # (flushed once per loop turn), the kick an emit wakes instead, and
        # the first try of a batch the flush handed over to the task.
        self.future = None
        self.kick = None
        self.handover = None
        self.sending = None
        self.timer = None
        self.timed_out = False

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def cancel(self) -> None:
        """
        Cut the delivery task's send in progress, or its wait before a retry:
        by its cancel scope, or natively while it is in one (the dead-letter
        hook is not cut, as a shield would hold it).
        """
        scope = self.scope
        if scope is not None:
            scope.cancel()
        elif self.cuttable:
            self.cuttable = False
            self.cuts += 1
            self.task.cancel()  # type: ignore[union-attr]  # a native delivery has its task


class Attachment:
    """
    A sink attached to a user's stream, returned by `EmitterHub.attach`.

    Use it as a context manager (``with`` or ``async with``) to detach the sink
    on the way out, or call `detach`.

    Attributes:
        user_id: The user whose events the sink gets.
        sink: The sink.
        replayed: Events queued for the sink from the replay history.
        missed: Events after *last_seq* it can no longer get (0 when none,
            `None` when unknown because the stream was started anew); it was
            sent an `EVENTS_MISSED` notice when not 0.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_attached", "_detach", "missed", "replayed", "sink", "user_id")

    user_id: str
    sink: Sink
    replayed: int
    missed: int | None

    def __init__(
        self,
        detach: Callable[[_Attached], int],
        attached: _Attached,
        replayed: int,
        missed: int | None,
    ) -> None:
        self._detach = detach
        self._attached = attached
        self.user_id = attached.stream.user_id
        self.sink = attached.sink
        self.replayed = replayed
        self.missed = missed

    @property
    def attached(self) -> bool:
        """
        Whether the sink still receives events.
        """
        return not self._attached.unlinked

    @property
    def reason(self) -> str | None:
        """
        The reason the sink stopped, one of ``"detached"``, ``"failed"``,
        ``"sink_closed"`` and ``"hub_closed"``; `None` while it receives events,
        and after the hub closed with everything delivered.
        """
        return self._attached.reason

    def detach(self) -> int:
        """
        Detach the sink, as `EmitterHub.detach` does; return the events dropped.
        """
        return self._detach(self._attached)

    async def wait(self) -> None:
        """
        Wait until the sink's delivery task ended: after `detach`, a send
        that failed for good, or the hub's close.
        """
        a = self._attached
        if a.ended:
            return
        if a.done is None:
            a.done = anyio.Event()
        await a.done.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<usercontext.Attachment(user_id={self.user_id!r}, sink={self.sink!r}, {state})>"


def parse_last_seq(last_seq: int | str) -> tuple[str | None, int]:
    if last_seq.__class__ is int:
        assert isinstance(last_seq, int)  # noqa: S101  # for mypy
        if last_seq >= 0:
            return None, last_seq
    elif isinstance(last_seq, str):
        m = _EVENT_ID.fullmatch(last_seq.strip())
        if m is not None:
            return m.group(1), int(m.group(2))
    # The value first, cut short: a WebSocket's close reason carries the
    # message, and holds 123 bytes.
    shown = repr(last_seq)
    if len(shown) > 40:  # noqa: PLR2004  # a value to recognise, not to read whole
        shown = f"{shown[:37]}..."
    msg = (
        f"last_seq {shown} is not a non-negative int or an event id such as "
        f"'0123456789abcdef-42' (what SSE sends back as Last-Event-ID)."
    )
    given: object = last_seq
    raise (ValueError if given.__class__ is int or isinstance(given, str) else TypeError)(msg)


# -- Emitters -----------------------------------------------------------------------

_UNSET: Any = object()
