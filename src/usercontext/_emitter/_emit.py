"""
`Emitter`: the hot path of every event, from a request to the buffers of its
user's sinks.

`Emitter.emit_nowait` takes no lock, never awaits and spawns nothing: it builds
the event, appends it to each sink's deque and wakes a delivery task only if it
sleeps. anyio's memory streams and events checkpoint on every operation (~10 µs
on asyncio), so they only appear where something waits: a producer waiting for
room waits here, on an event of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from usercontext import _checks
from usercontext._current import _get as _current_or_none
from usercontext.exceptions import IsolationError

from ._event import (
    _EMPTY,
    _TYPES,
    Event,
    _check_type,
    _Draft,
    _freeze,
    _new_draft,
    _time,
    freeze_lazy,
    new_event,
    size_error,
)
from ._follow import encode
from ._state import _Waiter


if TYPE_CHECKING:
    import asyncio

    from usercontext._context import UserContext

    from ._hub import EmitterHub
    from ._state import _Stream
    from ._stats import Counters


_UNSET: Any = object()


class Emitter:
    """
    Emits events to the stream of one user, on behalf of one context.

    Get one with `EmitterHub.emitter`. Every event carries the ids of the
    context, and the next ``seq`` of the user's stream, shared by all the
    user's emitters. Use it on the event loop of its hub; from a worker thread,
    call ``anyio.from_thread.run_sync(emitter.emit_nowait, type, data)``.

    Touching it while another user's context is bound raises
    `usercontext.exceptions.IsolationError`.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_counters", "_ctx", "_hub", "_stream", "user_id")

    # Set by EmitterHub.emitter, which makes every emitter (one per request)
    # without the call of an __init__.
    user_id: str
    _hub: EmitterHub
    _ctx: UserContext
    _stream: _Stream
    _counters: Counters  # the hub's, one lookup away on the hot path

    @property
    def ctx(self) -> UserContext:
        """
        The context whose ids the events carry.
        """
        return self._ctx

    @property
    def hub(self) -> EmitterHub:
        """
        The hub this emitter feeds.
        """
        return self._hub

    def emit_nowait(self, type: str, data: object = None) -> Event:  # noqa: A002  # the field's name
        """
        Emit an event of *type* with *data* without waiting, and return it.

        It never awaits and takes no lock. When a sink's buffer is full, the
        hub's overflow policy applies: under ``drop_oldest`` and
        ``drop_newest`` an event is dropped (and counted); under ``error`` and
        ``block`` (which cannot wait here) it raises. A critical event is never
        dropped: if a buffer holds nothing it may drop instead, it raises.

        Raises:
            usercontext.exceptions.EmitterFullError: If the event does not fit
                and may not be dropped.
            usercontext.exceptions.EmitterClosedError: After the hub closed.
            TypeError: If *type* is not a str, or *data* holds a value that is
                not JSON.
            ValueError: If *type* breaks a rule, or *data* is not valid JSON
                (NaN, circular) or is over the hub's *max_event_size*.
        """
        ev = self._emit(type, data, None)
        if ev is None:
            raise self._hub._overflow.full_error(self.user_id, type, 0.0, None)
        return ev

    async def emit(
        self,
        type: str,  # noqa: A002  # the field's name
        data: object = None,
        *,
        timeout: float | None = _UNSET,
    ) -> Event:
        """
        Emit an event of *type* with *data*, and return it.

        It does not suspend when there is room. When a sink's buffer is full,
        the hub's overflow policy applies; under ``block``, and for a critical
        event that finds only critical events buffered, it waits (first come,
        first served) up to *timeout* seconds (the hub's by default). The event
        is validated, and its data copied, when it is called, before it waits.

        Raises:
            usercontext.exceptions.EmitterTimeoutError: If no room came in time.
            usercontext.exceptions.EmitterFullError: Under the ``error`` policy,
                or with ``timeout=0`` when it would have to wait.
            usercontext.exceptions.EmitterClosedError: After the hub closed, or
                if it closes while this waits.
            TypeError: See `emit_nowait`.
            ValueError: See `emit_nowait`, or if *timeout* is negative.
        """
        if timeout is not _UNSET:
            _checks.seconds("timeout", timeout, allow_none=True, zero_ok=True)
        ev = self._emit(type, data, None)
        if ev is not None:
            return ev
        return await self._wait_and_emit(
            type, data, self._hub._timeout if timeout is _UNSET else timeout
        )

    def _emit(  # noqa: C901, PLR0912, PLR0915  # the hot path, written out
        self, kind: str, data: object, me: _Waiter | None
    ) -> Event | None:
        """
        Emit at once if every sink has room; return `None` if it must wait.

        *me* is a waiting producer whose event was validated already; then
        *kind* and *data* are ignored.
        """
        s = self._stream
        if s.dead:
            s = self._revive()
        bound = _current_or_none(None)
        if bound is not None and bound is not self._ctx and bound.user_id != self.user_id:
            raise self._isolation_error(bound.user_id)
        hub = self._hub
        # Validate first: a bad event is refused as such, whatever the buffers hold.
        frozen: object
        data_json: str | None
        if me is None:
            if kind.__class__ is not str or kind not in _TYPES:
                kind = _check_type(kind)
            if data is None:
                frozen = _EMPTY
                data_json = "{}"
            else:
                frozen, data_json = freeze_lazy(data, hub._max_event_size)
        else:
            kind, frozen, data_json = me.kind, me.frozen, me.data_json
        maxsize = hub._maxsize
        sinks = s.sinks
        for a in sinks:
            if len(a.queue) + a.inflight >= maxsize:
                return self._emit_full(s, kind, frozen, data_json, me)
        if s.waiters and s.waiters[0] is not me:
            return self._emit_full(s, kind, frozen, data_json, me)
        ctx = self._ctx
        seq = s.seq = s.seq + 1
        ts = s.last = _time()
        # new_event, written out: this is the hot path of every event.
        ev: Any = _new_draft(_Draft)
        ev.type = kind
        ev.data = frozen
        ev.seq = seq
        ev.event_id = f"{s.stream_id}-{seq}"
        ev.ts = ts
        ev.user_id = self.user_id
        ev.thread_id = ctx.thread_id
        ev.run_id = ctx.run_id
        ev.request_id = ctx.request_id
        ev._data_json = data_json
        ev._ids_json = None
        ev._json = None
        ev.__class__ = Event
        event: Event = ev
        if sinks:
            for a in sinks:
                a.queue.append(event)
                w = a.waiter
                # _Attached.wake, written out. A task's future is done only if
                # the task was cancelled: its own cleanup then clears it.
                if w is not None and not w.done():
                    a.waiter = None
                    w.set_result(None)
        else:
            self._counters.unrouted += 1
        if s.history is not None:
            s.history.append(event)
        self._counters.emitted += 1
        return event

    def _emit_full(
        self, s: _Stream, kind: str, frozen: object, data_json: str | None, me: _Waiter | None
    ) -> Event | None:
        """
        Emit when a buffer is full or producers wait ahead, as the hub's
        overflow policy decides; `None` means wait.
        """
        overflow = self._hub._overflow
        plan = overflow.plan(s, kind, me)
        if plan is None:
            return None
        ev = self._build(s, kind, frozen, data_json)
        overflow.route(s, plan, ev)
        return ev

    async def _wait_and_emit(self, kind: str, data: object, timeout: float | None) -> Event:
        """
        Wait for room, first come first served, then emit; raise after
        *timeout* seconds.
        """
        hub = self._hub
        if timeout is not None and timeout <= 0:
            raise hub._overflow.full_error(self.user_id, kind, 0.0, timeout)
        s = self._stream
        # The data is copied now: the event is what the caller passed, not what
        # the data holds when room comes.
        me = self._prepare(kind, data)
        s.waiters.append(me)
        counters = hub._counters
        counters.waiting += 1
        start = anyio.current_time()
        try:
            if me.loop is not None:
                ev = await self._wait_on_loop(me, me.loop, timeout)
            else:
                ev = None
                with anyio.move_on_after(timeout):
                    ev = await self._wait(me)
            if ev is not None:
                return ev
        finally:
            counters.waiting -= 1
            first = bool(s.waiters) and s.waiters[0] is me
            s.waiters.remove(me)
            if first:
                s.wake_waiter()
        raise hub._overflow.full_error(
            self.user_id, kind, max(anyio.current_time() - start, 1e-9), timeout
        )

    async def _wait(self, me: _Waiter) -> Event:
        """
        Wait for room until the event of *me* is emitted (trio).
        """
        while True:
            await me.signal
            me.rearm()
            ev = self._emit(me.kind, None, me)
            if ev is not None:
                return ev

    async def _wait_on_loop(
        self, me: _Waiter, loop: asyncio.AbstractEventLoop, timeout: float | None
    ) -> Event | None:
        """
        Wait as `_wait` does, on asyncio, with a timer for *timeout* rather
        than a cancel scope (which costs more than the wait itself); return
        `None` once it passed.
        """
        timer = None if timeout is None else loop.call_later(timeout, me.expire)
        try:
            while True:
                await me.signal
                if me.expired:
                    return None
                me.rearm()
                ev = self._emit(me.kind, None, me)
                if ev is not None:
                    return ev
        finally:
            if timer is not None:
                timer.cancel()

    def _prepare(self, kind: str, data: object) -> _Waiter:
        """
        Validate an event that must wait, and return its waiter.
        """
        kind = _check_type(kind)
        if data is None:
            frozen: object = _EMPTY
            data_json: str | None = "{}"
        else:
            frozen, data_json = freeze_lazy(data, self._hub._max_event_size)
        return _Waiter(kind, frozen, data_json, self._hub._delivery.loop)

    def _build(self, s: _Stream, kind: str, frozen: object, data_json: str | None) -> Event:
        """
        Make the next event of *s* from a validated type and data.
        """
        ctx = self._ctx
        seq = s.seq = s.seq + 1
        ts = s.last = _time()
        return new_event(
            kind,
            frozen,
            seq,
            s.stream_id,
            ts,
            self.user_id,
            ctx.thread_id,
            ctx.run_id,
            ctx.request_id,
            data_json,
            None,
        )

    def _revive(self) -> _Stream:
        """
        Return the user's stream anew after it was evicted, or raise if closed.
        """
        s = self._stream = self._hub._stream_of(self.user_id)
        return s

    def _isolation_error(self, other: str) -> IsolationError:
        return IsolationError(
            f"The emitter of user {self.user_id!r} was used while a context of user "
            f"{other!r} is bound. Get an emitter for the bound context with "
            "hub.emitter() instead of passing one between users' requests."
        )

    def __repr__(self) -> str:
        return (
            f"<usercontext.Emitter(user_id={self.user_id!r}, request_id={self._ctx.request_id!r})>"
        )


class BusEmitter(Emitter):
    """
    The emitter of a hub with a bus: an event goes to the bus first, and
    reaches the sinks (on every instance) from there.
    """

    __slots__ = ()

    def emit_nowait(self, type: str, data: object = None) -> Event:  # noqa: A002, ARG002  # the signature of Emitter's
        msg = (
            "emit_nowait() cannot be used with an EmitterHub that has a bus: an event is "
            "emitted once the bus stored it, which takes a round trip. Use "
            "`await emitter.emit(type, data)` instead (from a worker thread: "
            "`anyio.from_thread.run(emitter.emit, type, data)`)."
        )
        raise RuntimeError(msg)

    async def emit(
        self,
        type: str,  # noqa: A002  # the field's name
        data: object = None,
        *,
        timeout: float | None = _UNSET,
    ) -> Event:
        if timeout is not _UNSET:
            _checks.seconds("timeout", timeout, allow_none=True, zero_ok=True)
        s = self._stream
        if s.dead:
            self._revive()
        bound = _current_or_none(None)
        if bound is not None and bound is not self._ctx and bound.user_id != self.user_id:
            raise self._isolation_error(bound.user_id)
        hub = self._hub
        kind = _check_type(type)
        if data is None:
            frozen: object = _EMPTY
            data_json = "{}"
        else:
            frozen, data_json = _freeze(data)
            if len(data_json) > hub._max_event_size:
                raise size_error(len(data_json), hub._max_event_size)
        ctx = self._ctx
        ts = _time()
        payload = encode(kind, ts, (ctx.thread_id, ctx.run_id, ctx.request_id), data_json)
        bus = hub._bus
        assert bus is not None  # noqa: S101  # this class serves hubs with a bus
        try:
            stream_id, seq = await bus.publish(self.user_id, payload)
        except Exception:
            self._counters.publish_errors += 1
            raise
        self._counters.emitted += 1
        return new_event(
            kind,
            frozen,
            seq,
            stream_id,
            ts,
            self.user_id,
            ctx.thread_id,
            ctx.run_id,
            ctx.request_id,
            data_json,
            None,
        )
