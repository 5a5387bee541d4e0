"""
A hub's side of an `EventBus`: the users it follows, and the one path by which
their events, emitted here or on another instance, reach the local sinks.

An event is routed when it is the next one of its stream (``seq`` one above the
last routed); a repeat is dropped; a gap, a new stream id or a position ahead
makes the user *catch up*: the hub reads what it missed from the bus, in order.
A sink whose buffer is full and may not drop (``block``, ``error``, or a
critical event among critical ones) *pauses* its user: nothing is lost, the bus
holds the events, and the user catches up once the sink made room.
"""

from __future__ import annotations

import json

from typing import TYPE_CHECKING, Any

import anyio

from usercontext._lifecycle import logger

from ._event import _EMPTY, _encode, _freeze_slow, _ids_json, new_event


if TYPE_CHECKING:
    from collections.abc import Callable

    from ._bus import EventBus
    from ._event import Event
    from ._overflow import OverflowPolicy
    from ._state import _Attached, _Stream
    from ._stats import Counters
    from ._streams import Streams


# Entries read from the bus at once, when catching up or replaying.
READ_BATCH = 500
# The pause between two tries to follow a user while the bus is unavailable.
RETRY_S = 0.1

_FOLLOWING, _LIVE, _CATCHING, _PAUSED = range(4)


def encode(
    kind: str, ts: float, ctx_ids: tuple[str | None, str | None, str | None], data_json: str
) -> str:
    """
    The payload of an event on the bus: its type, time and ids as a JSON array,
    a newline (which compact JSON never holds), then its data's JSON.
    """
    return f"{_encode([kind, ts, *ctx_ids])}\n{data_json}"


def decode(user_id: str, stream_id: str, seq: int, payload: str) -> Event:
    """
    Make the event *seq* of *user_id*'s stream from its payload.
    """
    head, data_json = payload.split("\n", 1)
    kind, ts, thread_id, run_id, request_id = json.loads(head)
    data = json.loads(data_json)
    frozen = _EMPTY if data == {} else _freeze_slow(data, "data", 0)
    return new_event(
        kind,
        frozen,
        seq,
        stream_id,
        ts,
        user_id,
        thread_id,
        run_id,
        request_id,
        data_json,
        _ids_json(user_id, thread_id, run_id, request_id),
    )


def _decode(user_id: str, stream_id: str, seq: int, payload: str) -> Event | None:
    """
    Make the event *seq* from its payload, or log why it is not one and
    return `None`: one bad entry must not stop the stream.
    """
    try:
        return decode(user_id, stream_id, seq, payload)
    except Exception:  # logged, and skipped
        logger.exception("usercontext: entry %d of user %r is not an event", seq, user_id)
        return None


class _Follow:
    """
    A user the hub follows: its stream, how many sinks (attached or attaching)
    want it, and where its routing stands.
    """

    __slots__ = ("changed", "dirty", "error", "ready", "refs", "seen", "state", "stream")

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.refs = 0
        self.state = _FOLLOWING
        # The highest seq notified while not live, in the current stream.
        self.seen = 0
        # A notification came that the seq alone does not cover.
        self.dirty = False
        self.ready = anyio.Event()
        self.changed = anyio.Event()
        self.error: BaseException | None = None


class _Resume:
    """
    Stands in a paused user's queue of waiting producers: a delivery that made
    room wakes it, and the user catches up.
    """

    __slots__ = ("follow", "follower")

    def __init__(self, follower: Follower, follow: _Follow) -> None:
        self.follower = follower
        self.follow = follow

    def wake(self) -> None:
        if self.follower.closed:
            return  # the hub closes: nothing to resume
        waiters: Any = self.follow.stream.waiters  # it stands among producers' waiters
        waiters.remove(self)
        self.follower.resume(self.follow)


class Follower:
    """
    The users a hub follows on its bus, and the routing of their events into
    the hub's sinks.
    """

    def __init__(
        self,
        bus: EventBus,
        table: Streams,
        counters: Counters,
        overflow: OverflowPolicy,
    ) -> None:
        self.bus = bus
        self.table = table
        self.counters = counters
        self.overflow = overflow
        self.users: dict[str, _Follow] = {}
        self.spawn: Callable[..., Any] | None = None
        self.closed = False
        self._scopes: set[anyio.CancelScope] = set()

    # -- following

    def acquire(self, s: _Stream) -> _Follow:
        """
        Count one more sink that wants the events of *s*, following its user
        (in a task) if it is the first.
        """
        f = self.users.get(s.user_id)
        if f is None:
            f = self.users[s.user_id] = _Follow(s)
            self._start(self._follow, f)
        f.refs += 1
        return f

    async def ready(self, f: _Follow) -> None:
        """
        Wait until *f* is followed; raise what the bus raised if it could not be.
        """
        while not f.ready.is_set():
            changed = f.changed
            await changed.wait()
            if not f.ready.is_set() and f.error is not None:
                raise f.error

    def release(self, user_id: str) -> None:
        """
        Count one sink less; stop following the user after the last.
        """
        f = self.users.get(user_id)
        if f is None:
            return
        f.refs -= 1
        if f.refs <= 0:
            del self.users[user_id]
            self.bus.unfollow(user_id)

    def close(self) -> None:
        """
        Stop routing, and cancel the tasks that follow and catch up.
        """
        self.closed = True
        self.users.clear()
        for scope in list(self._scopes):
            scope.cancel()

    def _start(self, fn: Callable[[_Follow], Any], f: _Follow) -> None:
        assert self.spawn is not None  # noqa: S101  # set by the running hub
        self.spawn(self._scoped, fn, f)

    async def _scoped(self, fn: Callable[[_Follow], Any], f: _Follow) -> None:
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                await fn(f)
            except Exception:  # a bug here must not take the hub down
                logger.exception("usercontext: following user %r failed", f.stream.user_id)
            finally:
                self._scopes.discard(scope)

    def _current(self, f: _Follow) -> bool:
        return not self.closed and self.users.get(f.stream.user_id) is f

    async def _follow(self, f: _Follow) -> None:
        s = f.stream
        while self._current(f):
            try:
                stream_id, seq = await self.bus.follow(s.user_id)
            except Exception as e:  # the bus is unavailable: try again, while wanted
                f.error = e
                changed, f.changed = f.changed, anyio.Event()
                changed.set()
                await anyio.sleep(RETRY_S)
                continue
            if not self._current(f):
                return
            s.stream_id = stream_id
            s.seq = seq
            f.state = _LIVE
            f.ready.set()
            f.changed.set()
            if f.dirty or f.seen > seq:
                self.catch_up(f)
            return

    # -- routing

    def notify(self, user_id: str, stream_id: str, seq: int, payload: str | None) -> None:
        """
        Take an entry of a followed user's stream (or a position, when
        *payload* is `None`) from the bus.
        """
        f = self.users.get(user_id)
        if f is None:
            return
        s = f.stream
        same = stream_id == s.stream_id
        if f.state != _LIVE:
            if same:
                f.seen = max(f.seen, seq)
            else:
                f.dirty = True
            return
        if same:
            if seq <= s.seq:
                return  # a repeat, or a position already reached
            if seq == s.seq + 1 and payload is not None:
                ev = _decode(user_id, stream_id, seq, payload)
                if ev is None or self.route(s, ev):
                    s.seq = seq
                    return
                self._pause(f)
                return
        self.catch_up(f)

    def catch_up(self, f: _Follow) -> None:
        """
        Read what *f*'s user missed from the bus, in a task.
        """
        f.state = _CATCHING
        self._start(self._catch_up, f)

    def resume(self, f: _Follow) -> None:
        """
        Go on with a paused user, once a sink made room.
        """
        if f.state == _PAUSED and self._current(f):
            self.catch_up(f)

    def _pause(self, f: _Follow) -> None:
        f.state = _PAUSED
        f.seen = max(f.seen, f.stream.seq + 1)
        f.stream.waiters.append(_Resume(self, f))  # type: ignore[arg-type]

    async def _catch_up(self, f: _Follow) -> None:
        s = f.stream
        user_id = s.user_id
        while self._current(f):
            f.dirty = False
            try:
                stream_id, last, entries = await self.bus.read(user_id, s.seq, READ_BATCH)
            except Exception:  # the bus is unavailable: it reports a position once back
                await anyio.sleep(RETRY_S)
                continue
            if not self._current(f):
                return
            if stream_id != s.stream_id:
                # The stream was started anew (it expired, or Redis lost it):
                # the sinks learn that seq starts again, and how far they got.
                self._notice(s, s.seq, None)
                s.stream_id = stream_id
                s.seq = 0
                f.seen = 0
                continue
            first = entries[0][0] if entries else last + 1
            if first > s.seq + 1 and last > s.seq:
                missed = first - 1 - s.seq
                self.counters.missed += missed * len(s.sinks)
                self._notice(s, first - 1, missed)
                s.seq = first - 1
            for seq, payload in entries:
                ev = _decode(user_id, stream_id, seq, payload)
                if ev is not None and not self.route(s, ev):
                    self._pause(f)
                    return
                s.seq = seq
            if s.seq >= last and s.seq >= f.seen and not f.dirty:
                f.state = _LIVE
                return

    def _notice(self, s: _Stream, seq: int, missed: int | None) -> None:
        """
        Tell every sink of *s* that events after *seq* are missing.
        """
        notice = s.notice(seq, s.seq, missed)
        for a in s.sinks:
            a.queue.append(notice)
            a.wake()

    def route(self, s: _Stream, ev: Event) -> bool:
        """
        Queue *ev* for the sinks of *s*, as the overflow policy says when a
        buffer is full; return `False`, queuing nothing, if it must wait.
        """
        maxsize = self.overflow.maxsize
        sinks = s.sinks
        for a in sinks:
            if len(a.queue) + a.inflight >= maxsize:
                return self._route_full(s, ev)
        for a in sinks:
            a.queue.append(ev)
            if a.waiter is not None:
                a.wake()
        return True

    def _route_full(self, s: _Stream, ev: Event) -> bool:
        overflow = self.overflow
        if overflow.policy in ("block", "error"):
            return False  # no emitter here to wait or to raise to: wait for room
        plan = overflow.plan(s, ev.type, None)
        if plan is None:
            return False
        skip: list[_Attached] = []
        for a, victim in plan:
            a.peak = max(a.peak, overflow.maxsize)
            if victim is None:
                skip.append(a)
                self.counters.drop(a, "newest", 1)
            else:
                del a.queue[victim]
                self.counters.drop(a, "oldest" if overflow.policy == "drop_oldest" else "newest", 1)
        for a in s.sinks:
            if a not in skip:
                a.queue.append(ev)
                a.wake()
        return True

    # -- replay

    async def replay(
        self, f: _Follow, stream_id: str | None, after: int
    ) -> tuple[list[Event], int | None]:
        """
        Read from the bus the events a sink resuming after *after* (of the
        stream *stream_id*) gets before the live ones: up to the last one routed
        here, behind a notice if some are missing. Return them, and how many
        are missing (`None` when unknown).
        """
        s = f.stream
        user_id = s.user_id
        current = s.stream_id
        missed: int | None = 0
        if (stream_id is not None and stream_id != current) or after > s.seq:
            missed, after = None, 0
        events: list[Event] = []
        cursor = after
        while cursor < s.seq:
            read_id, _, entries = await self.bus.read(user_id, cursor, READ_BATCH)
            if read_id != current or s.stream_id != current:
                # Started anew meanwhile: the sink learns it as the others do.
                return [s.notice(s.seq, after, None)], None
            if cursor == after and missed is not None:
                missed = (entries[0][0] if entries else s.seq + 1) - 1 - after
            held = [(seq, payload) for seq, payload in entries if seq <= s.seq]
            events.extend(
                ev for seq, payload in held if (ev := _decode(user_id, current, seq, payload))
            )
            if not held or len(held) < len(entries):
                break
            cursor = held[-1][0]
        if missed != 0:
            before = events[0].seq - 1 if events else s.seq
            events.insert(0, s.notice(before, after, missed))
        return events, missed
