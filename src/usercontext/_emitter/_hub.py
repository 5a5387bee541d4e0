"""
`EmitterHub`: the running home of every user's stream. It checks its settings,
runs the delivery tasks and the sweeper in its task group, attaches and
detaches sinks, and closes in order; the stream table, the overflow decision
and the delivery tasks are its collaborators.
"""

from __future__ import annotations

import asyncio

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import anyio

from usercontext import _checks
from usercontext._context import UserContext
from usercontext._current import _get as _current_or_none
from usercontext._current import current
from usercontext._lifecycle import logger, shielded
from usercontext.exceptions import EmitterClosedError, IsolationError

from ._bus import EventBus
from ._delivery import Delivery
from ._emit import BusEmitter, Emitter
from ._event import AGENT_COMPLETED, AGENT_ERROR, EVENTS_MISSED, _time
from ._follow import Follower
from ._overflow import OverflowPolicy
from ._policies import _OVERFLOWS, Retry
from ._state import Attachment, _Attached, parse_last_seq
from ._stats import Counters
from ._streams import Streams


# An emitter is made without an __init__ call: one is made per request.
_new = object.__new__


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from typing_extensions import Self

    from ._event import Event
    from ._policies import DeadLetter, Overflow
    from ._sinks import Sink
    from ._state import _Stream
    from ._stats import EmitterStats


class EmitterHub:
    """
    Per-user event streams: bounded, ordered, retried and replayable.

    Enter it once, for the life of your service (in an ASGI lifespan, say):
    ``async with EmitterHub() as hub:`` runs each sink's delivery task in the
    hub's own task group, and leaving the block closes the hub (see `aclose`).
    Emit through ``hub.emitter(ctx)``; connections attach a sink to their
    user's stream with `attach`.

    Each sink has a buffer of at most *maxsize* events, the batch being sent
    included; a sink that resumes (see `attach`) first gets every event of the
    history it asked for, even more than *maxsize*. When an emit finds a buffer
    full, *overflow* decides:

    - ``"block"``: wait for room (`Emitter.emit`, up to *timeout*), or raise
      `usercontext.exceptions.EmitterFullError` (`Emitter.emit_nowait`);
    - ``"drop_oldest"``: drop the oldest buffered event that is not critical;
    - ``"drop_newest"``: drop the new event, or, for a critical one, the newest
      buffered event that is not critical;
    - ``"error"``: raise `usercontext.exceptions.EmitterFullError`.

    Events whose type is in *critical* are never dropped: when a buffer holds
    only critical events, a critical event waits (bounded by *timeout*) or
    raises. Every drop is counted by reason in `stats`.

    The last *replay* events of each user stay in a history, for sinks that
    resume (see `attach`). A user's state is dropped once it has no sink and
    has emitted nothing for *idle_ttl* seconds.

    With a *bus* (an `EventBus`, such as `usercontext.redis.RedisBus`), the
    hubs of several processes and hosts share each user's stream: an event
    emitted on any of them reaches every sink of its user on all of them, in
    the order of the stream, once, with a ``seq`` and ``event_id`` that mean
    the same everywhere; a connection resumes on any instance with
    `aattach`. `Emitter.emit` returns once the bus stored the event, and raises
    `usercontext.exceptions.BackendUnavailableError` when the bus does not
    answer in time; `Emitter.emit_nowait` is refused. Each event reaches the
    local sinks through the bus, emitted here or not; when a sink's buffer is
    full and the event may not be dropped (``block`` and ``error``, which
    cannot wait for or raise to an emitter on another instance, and a critical
    event that finds only critical events buffered), the user's stream waits
    in the bus until the sink made room, and no event is lost while the bus
    still holds it. The replay history is the bus's (*replay* is not used).

    Every setting is a keyword argument.

    Args:
        maxsize: Events buffered per sink, at most.
        overflow: What to do when a buffer is full.
        critical: Event types never dropped.
        retry: How failing sends are retried; see `Retry`.
        replay: Events kept per user for sinks that resume.
        timeout: How long `Emitter.emit` waits for room, in seconds; `None`
            waits as long as it takes.
        idle_ttl: How long a user without sinks keeps their state, in seconds.
        max_batch: The most events passed to one `Sink.send`; at most half of
            *maxsize*, so that ``drop_oldest`` always has events to drop.
        drain_timeout: How long `aclose` delivers what is buffered, when it is
            given no *timeout*.
        max_event_size: The longest JSON of an event's data, in characters.
        on_dead_letter: Called (sync or async) with a `DeadLetter` for events
            that could not be delivered; without it, they are logged as a
            warning on the ``usercontext`` logger.
        bus: The shared log of each user's events, when several instances
            serve one user's connections; `None` (the default) keeps every
            stream in this process. The hub starts and closes it.

    >>> import anyio, usercontext as uc
    >>> from usercontext.testing import RecordingSink
    >>> async def main():
    ...     sink = RecordingSink()
    ...     async with uc.EmitterHub() as hub:
    ...         hub.attach("u-42", sink)
    ...         ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    ...         await hub.emitter(ctx).emit(uc.AGENT_STARTED, {"agent": "triage"})
    ...     return [(e.type, e.seq) for e in sink.events]
    >>> anyio.run(main)
    [('agent_started', 1)]

    .. versionadded:: 0.1.0
    """

    def __init__(  # noqa: PLR0913  # every setting of the hub, by keyword
        self,
        *,
        maxsize: int = 1000,
        overflow: Overflow = "drop_oldest",
        critical: Sequence[str] = (AGENT_COMPLETED, AGENT_ERROR),
        retry: Retry | None = None,
        replay: int = 100,
        timeout: float | None = 10.0,
        idle_ttl: float = 60.0,
        max_batch: int = 256,
        drain_timeout: float = 5.0,
        max_event_size: int = 1 << 20,
        on_dead_letter: Callable[[DeadLetter], object] | None = None,
        bus: EventBus | None = None,
    ) -> None:
        _checks.count("maxsize", maxsize, minimum=1)
        if overflow not in _OVERFLOWS:
            msg = f"overflow must be one of {', '.join(map(repr, _OVERFLOWS))}; got {overflow!r}."
            raise ValueError(msg)
        given: object = critical
        msg = (
            f"critical must be a collection of event types (str), got {critical!r}; "
            "for one type write (type,), for none ()."
        )
        if isinstance(given, str) or not isinstance(given, Iterable):
            raise TypeError(msg)
        types = tuple(given)  # read once: an iterator would be empty the second time
        if not all(isinstance(t, str) for t in types):
            raise TypeError(msg)
        policy: object = retry
        if policy is not None and not isinstance(policy, Retry):
            msg = f"retry must be a usercontext.Retry, got {type(retry).__name__}."
            raise TypeError(msg)
        _checks.count("replay", replay, minimum=0)
        _checks.seconds("timeout", timeout, allow_none=True, zero_ok=True)
        _checks.seconds("idle_ttl", idle_ttl, allow_none=False, zero_ok=False)
        _checks.count("max_batch", max_batch, minimum=1)
        _checks.seconds("drain_timeout", drain_timeout, allow_none=False, zero_ok=True)
        _checks.count("max_event_size", max_event_size, minimum=2)
        _checks.function("on_dead_letter", on_dead_letter, allow_none=True)
        given_bus: object = bus
        if given_bus is not None and not isinstance(given_bus, EventBus):
            msg = (
                f"bus must be an event bus such as usercontext.redis.RedisBus (an object with "
                f"the methods of usercontext.EventBus), got {type(bus).__name__}."
            )
            raise TypeError(msg)
        # Read by emits: plain attributes of the hub, one lookup away.
        self._maxsize = maxsize
        self._max_event_size = max_event_size
        self._timeout = timeout
        self._drain_timeout = drain_timeout  # the default of aclose()
        self._counters = counters = Counters()
        self._table = table = Streams(replay if bus is None else 0, idle_ttl)
        # A notice of missed events is never dropped either: the client would
        # not know what it missed. No emitted event has its (reserved) type.
        critical_types = frozenset((*types, EVENTS_MISSED))
        self._overflow = OverflowPolicy(overflow, maxsize, critical_types, counters)
        self._delivery = Delivery(
            table,
            counters,
            Retry() if retry is None else retry,
            max(1, min(max_batch, maxsize // 2)),
            on_dead_letter,
        )
        self._bus = bus
        self._follower: Follower | None = None
        if bus is not None:
            self._follower = Follower(bus, table, counters, self._overflow)
            table.released = self._follower.release

        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._tg: Any = None
        self._sweeper_scope: anyio.CancelScope | None = None
        self._closed_event: anyio.Event | None = None

    # -- lifecycle

    async def __aenter__(self) -> Self:
        if self._state != "new":
            msg = (
                f"This EmitterHub was {'closed' if self._state == 'closed' else 'entered'} "
                "already; a hub runs once. Create a new EmitterHub."
            )
            raise RuntimeError(msg)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # trio
            loop = None
        self._delivery.start(loop)
        if self._bus is not None:
            assert self._follower is not None  # noqa: S101  # made with the bus
            await self._bus.start(self._follower.notify)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        if self._follower is not None:
            self._follower.spawn = tg.start_soon
        self._state = "running"
        self._sweeper_scope = anyio.CancelScope()
        tg.start_soon(self._table.sweep_every, self._sweeper_scope)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self.aclose()
        finally:
            # Every task of the group has ended: the body's exception is not
            # passed in, so that it propagates as raised, not in a group.
            await self._tg.__aexit__(None, None, None)

    @property
    def closed(self) -> bool:
        """
        Whether the hub stopped accepting events (`aclose` was called).
        """
        return self._state in ("closing", "closed")

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: C901  # the close, in order
        """
        Stop accepting events, deliver what is buffered, then stop.

        From now on, emitting and attaching raise
        `usercontext.exceptions.EmitterClosedError`, and so do emits waiting for
        room. Each sink gets what is buffered for it until *timeout* seconds
        (the hub's *drain_timeout* by default) have passed; then its delivery
        is cancelled, and what it did not get goes to the dead-letter hook with
        reason ``"hub_closed"``. Calling it again waits for the first close.
        Leaving ``async with`` calls it.

        Raises:
            ValueError: If *timeout* is negative.
        """
        if timeout is not None:
            _checks.seconds("timeout", timeout, allow_none=False, zero_ok=True)
        if self._state == "new":
            self._state = "closed"
            return
        if self._state != "running":
            if self._closed_event is not None:
                await self._closed_event.wait()
            return
        self._state = "closing"
        self._closed_event = anyio.Event()
        deadline = anyio.current_time() + (self._drain_timeout if timeout is None else timeout)
        table = self._table
        if self._follower is not None:
            self._follower.close()
        table.close()
        cancelled: BaseException | None = None
        if table.attached:
            with anyio.CancelScope(shield=True):
                try:
                    # Also against a native asyncio cancellation: the
                    # deliveries end by the drain deadline at the latest.
                    await shielded(self._delivery.drain(deadline))
                except BaseException as e:  # raised once the hub is closed
                    cancelled = e
        assert self._sweeper_scope is not None  # noqa: S101  # made by __aenter__
        self._sweeper_scope.cancel()
        table.clear()
        if self._bus is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await shielded(self._bus.aclose())
                except Exception:  # logged: the hub is closed all the same
                    logger.exception("usercontext: closing the hub's bus failed")
        self._state = "closed"
        self._closed_event.set()
        if cancelled is not None:
            raise cancelled

    def _check_running(self, what: str) -> None:
        if self._state == "running":
            return
        if self._state == "new":
            msg = (
                f"Cannot {what}: the EmitterHub is not running. Enter it first, for the life "
                "of your service: `async with EmitterHub() as hub:` (in an ASGI lifespan, say)."
            )
            raise RuntimeError(msg)
        msg = f"Cannot {what}: the EmitterHub is closed. Emit and attach before closing it."
        raise EmitterClosedError(msg)

    # -- users

    def _stream_of(self, user_id: str) -> _Stream:
        self._check_running("emit")
        return self._table.get(user_id)

    def emitter(self, ctx: UserContext | None = None) -> Emitter:
        """
        Return an emitter for the stream of *ctx*'s user (`usercontext.current`
        by default), whose events carry *ctx*'s ids.

        Raises:
            usercontext.exceptions.NoContextError: If *ctx* is `None` and no
                context is bound.
            usercontext.exceptions.EmitterClosedError: If the hub is closed.
            RuntimeError: If the hub is not running yet.
            TypeError: If *ctx* is not a `usercontext.UserContext`.
        """
        if ctx is None:
            ctx = current()
        elif ctx.__class__ is not UserContext and not isinstance(ctx, UserContext):
            msg = f"emitter() takes a usercontext.UserContext, got {type(ctx).__name__}."  # type: ignore[unreachable]
            raise TypeError(msg)
        if self._state != "running":
            self._check_running("emit")
        # _stream_of and Streams.get, written out: a request gets its
        # emitter on this path. Emitter has no __init__: it is made here.
        user_id = ctx.user_id
        stream = self._table.streams.get(user_id)
        if stream is None:  # Streams.get starts it
            stream = self._table.get(user_id)
        e: Emitter = _new(Emitter if self._bus is None else BusEmitter)
        e._hub = self
        e._ctx = ctx
        e._stream = stream
        e._counters = self._counters
        e.user_id = user_id
        return e

    def attach(self, user_id: str, sink: Sink, *, last_seq: int | str | None = None) -> Attachment:
        """
        Attach *sink* to the stream of *user_id*: it gets every event emitted
        from now on, in order, through its own delivery task.

        With *last_seq*, it first gets the events after *last_seq* that the
        replay history still holds, then live ones, as SSE does with
        ``Last-Event-ID``. *last_seq* is a ``seq``, or an ``event_id`` (then a
        different stream id means the user's stream was started anew). Use
        ``0`` for everything held. If some events after *last_seq* are no longer
        held, the sink first gets an `EVENTS_MISSED` notice saying how many.
        The replay may hold more than *maxsize* events: until the sink is back
        under that bound, emits find its buffer full and the overflow policy
        applies.

        With a bus, the history is the bus's, which takes a round trip to read:
        resume with `aattach`. Without *last_seq*, the sink gets the events
        that reach this instance from now on; when it is the first sink of its
        user here, that is once the hub follows the user on the bus, a round
        trip later (`aattach` returns only then).

        Raises:
            usercontext.exceptions.IsolationError: If *sink* is attached to
                another user, or a context of another user is bound.
            usercontext.exceptions.EmitterClosedError: If the hub is closed.
            RuntimeError: If the hub is not running yet, or has a bus and is
                given *last_seq*.
            TypeError: If *sink* has no ``send`` method, or *user_id* is not
                a str.
            ValueError: If *sink* is attached already, *user_id* is empty, or
                *last_seq* is not a seq or an event id.
        """
        parsed = self._check_attach(user_id, sink, last_seq)
        s = self._stream_of(user_id)
        if self._follower is None:
            replayed: int = 0
            missed: int | None = 0
            a = _Attached(s, sink)
            if parsed is not None:
                replayed, missed = s.replay_into(a, *parsed)
            return self._link(a, replayed, missed)
        if parsed is not None:
            msg = (
                "attach() cannot resume from last_seq on an EmitterHub with a bus: the "
                "history is read from the bus. Use `await hub.aattach(user_id, sink, "
                "last_seq=...)` instead."
            )
            raise RuntimeError(msg)
        self._follower.acquire(s)
        return self._link(_Attached(s, sink), 0, 0)

    async def aattach(
        self, user_id: str, sink: Sink, *, last_seq: int | str | None = None
    ) -> Attachment:
        """
        Attach *sink* to the stream of *user_id*, as `attach` does, on a hub
        with or without a bus.

        With a bus, it returns once the hub follows the user and, with
        *last_seq*, once the events to replay were read from the bus: a sink
        resumes on any instance, from the ``seq`` or ``event_id`` of the last
        event it got on any other. The replay window is what the bus holds
        (for `usercontext.redis.RedisBus`, the last *maxlen* events of the
        user, for *idle_ttl* seconds after the user's last event).

        Raises:
            usercontext.exceptions.BackendUnavailableError: If the bus did not
                answer in time; nothing is attached.
            usercontext.exceptions.IsolationError: See `attach`.
            usercontext.exceptions.EmitterClosedError: If the hub is closed,
                or closes while this waits for the bus.
            RuntimeError: If the hub is not running yet.
            TypeError: See `attach`.
            ValueError: See `attach`.
        """
        follower = self._follower
        if follower is None:
            return self.attach(user_id, sink, last_seq=last_seq)
        parsed = self._check_attach(user_id, sink, last_seq)
        s = self._stream_of(user_id)
        self._table.idle.pop(user_id, None)  # not swept while this waits
        f = follower.acquire(s)
        events: list[Event] = []
        missed: int | None = 0
        try:
            await follower.ready(f)
            if parsed is not None:
                events, missed = await follower.replay(f, *parsed)
            self._check_running("attach a sink")
            self._check_attach(user_id, sink, None)  # attached meanwhile?
        except BaseException:
            follower.release(user_id)
            if not s.sinks and not s.dead:
                self._table.idle[user_id] = s
            raise
        a = _Attached(s, sink)
        a.queue.extend(events)
        return self._link(a, len(events) - (missed != 0), missed)

    def _check_attach(
        self, user_id: str, sink: Sink, last_seq: int | str | None
    ) -> tuple[str | None, int] | None:
        """
        Refuse an attach that cannot be, before anything changes; return
        *last_seq* parsed.
        """
        self._check_running("attach a sink")
        if user_id.__class__ is not str or not user_id:
            msg = f"user_id must be a non-empty str, got {user_id!r}."
            raise ValueError(msg) if user_id.__class__ is str else TypeError(msg)
        if not callable(getattr(sink, "send", None)):
            msg = (
                f"{sink!r} is not a sink: it has no send() method. Pass an object with "
                "`async def send(self, events)`, or wrap a function in usercontext.CallbackSink."
            )
            raise TypeError(msg)
        parsed = None if last_seq is None else parse_last_seq(last_seq)
        bound = _current_or_none(None)
        if bound is not None and bound.user_id != user_id:
            msg = (
                f"Cannot attach a sink to the stream of user {user_id!r} while a context of "
                f"user {bound.user_id!r} is bound: it would receive another user's events."
            )
            raise IsolationError(msg)
        other = self._table.attached.get(id(sink))
        if other is not None:
            if other.stream.user_id != user_id:
                msg = (
                    f"{sink!r} is attached to the stream of another user; one sink (one "
                    "connection) serves one user. Create a sink per connection."
                )
                raise IsolationError(msg)
            msg = f"{sink!r} is attached to user {user_id!r} already; detach it first."
            raise ValueError(msg)
        return parsed

    def _link(self, a: _Attached, replayed: int, missed: int | None) -> Attachment:
        """
        Route the events of its stream to *a*, and start its delivery.
        """
        self._counters.replayed += replayed
        self._counters.missed += missed or 0
        # Not kept by *a*: held by the caller only, it is freed without the
        # cycle collector once dropped.
        attachment = Attachment(self._table.detach, a, replayed, missed)
        if not self._delivery.native:
            a.scope = anyio.CancelScope(shield=True)
        self._table.link(a)
        loop = self._delivery.loop
        if loop is None:  # trio
            self._tg.start_soon(self._delivery.run, a)
        elif not self._delivery.direct(a):
            # A native task, not one of the task group's: anyio's spawn costs
            # more than the rest of an attach. The task is referenced by *a*
            # until it ended; the drain waits for every task to end (each
            # unlinks its sink in its last step), as the group would.
            a.task = loop.create_task(self._delivery.run(a))
        return attachment

    def detach(self, user_id: str, sink: Sink) -> int:
        """
        Detach *sink* from the stream of *user_id*, and return how many events
        it will not get (counted as dropped, reason ``"detached"``).

        It gets nothing more: a send in progress is cancelled. Detaching a sink
        that is not attached returns 0.
        """
        a = self._table.attached.get(id(sink))
        if a is None or a.stream.user_id != user_id:
            return 0
        return self._table.detach(a)

    # -- stats

    def stats(self, top: int = 10) -> EmitterStats:
        """
        Return a snapshot of the gauges and counters, with the *top* sinks most
        behind.
        """
        table = self._table
        return self._counters.snapshot(len(table.streams), table.attached.values(), _time(), top)

    def __repr__(self) -> str:
        return (
            f"<usercontext.EmitterHub(maxsize={self._maxsize}, "
            f"overflow={self._overflow.policy!r}, {self._state}, "
            f"users={len(self._table.streams)}, attached={len(self._table.attached)})>"
        )
