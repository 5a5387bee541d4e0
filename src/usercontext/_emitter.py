"""
Per-user event streams: `Event`, `Emitter`, `EmitterHub` and the sinks.

Each user has one stream: a sequence counter, a bounded replay history and the
sinks attached to it (one per open connection). Every sink has its own bounded
queue and its own delivery task, so a slow connection delays nobody else.

The hot path, `Emitter.emit_nowait`, takes no lock, never awaits and spawns
nothing: it builds the event, appends it to each sink's deque and wakes a
delivery task only if it sleeps. anyio's memory streams and events checkpoint on
every operation (~10 µs on asyncio), so they only appear where something waits.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import json
import math
import os
import random
import re
import time

from collections import deque
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import anyio
import anyio.lowlevel
import attrs

from . import _checks
from ._context import UserContext
from ._current import _get as _current_or_none
from ._current import current
from ._lifecycle import describe, logger, shielded
from .exceptions import (
    EmitterClosedError,
    EmitterFullError,
    EmitterTimeoutError,
    IsolationError,
    SinkClosedError,
)


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType
    from typing import TypeAlias

    from typing_extensions import Self

    Overflow: TypeAlias = Literal["block", "drop_oldest", "drop_newest", "error"]


__all__ = [
    "AGENT_COMPLETED",
    "AGENT_ERROR",
    "AGENT_STARTED",
    "AGENT_THINKING",
    "EVENTS_MISSED",
    "TOOL_COMPLETED",
    "TOOL_EXECUTING",
    "Attachment",
    "CallbackSink",
    "DeadLetter",
    "Emitter",
    "EmitterHub",
    "EmitterStats",
    "Event",
    "RecordingSink",
    "Retry",
    "Sink",
    "SinkStats",
]

AGENT_STARTED = "agent_started"
"""
The type of the event that says an agent started working on a request.

.. versionadded:: 0.1.0
"""

AGENT_THINKING = "agent_thinking"
"""
The type of the events that report an agent's progress while it reasons.

.. versionadded:: 0.1.0
"""

TOOL_EXECUTING = "tool_executing"
"""
The type of the event that says an agent called a tool.

.. versionadded:: 0.1.0
"""

TOOL_COMPLETED = "tool_completed"
"""
The type of the event that says a tool call returned.

.. versionadded:: 0.1.0
"""

AGENT_COMPLETED = "agent_completed"
"""
The type of the event that says an agent finished; critical by default.

.. versionadded:: 0.1.0
"""

AGENT_ERROR = "agent_error"
"""
The type of the event that says an agent failed; critical by default.

.. versionadded:: 0.1.0
"""

EVENTS_MISSED = "events_missed"
"""
The type of the notice a sink gets when it resumes after events it can no longer
get: they left the replay history, or belong to an earlier stream of the
user. Its ``data`` is ``{"missed": n, "after_seq": k,
"stream_id": ...}``, where *n* is `None` when the count is unknown (the stream
was started anew). Its ``seq`` is the last one it accounts for: a client that
keeps its position as the ``seq`` of the last event it got stays right. The
type is reserved: `Emitter.emit` refuses it.

.. versionadded:: 0.1.0
"""

_OVERFLOWS = ("block", "drop_oldest", "drop_newest", "error")
_MAX_TYPE_LENGTH = 64
_MAX_NESTING = 32
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_SCALARS = frozenset({str, int, float, bool, type(None)})
_EVENT_ID = re.compile(r"(?:([0-9a-f]{16})-)?([0-9]{1,19})")
# Errors that mean the sink can never accept events again: retrying is useless.
_CLOSED = (SinkClosedError, anyio.ClosedResourceError, anyio.BrokenResourceError)


# -- JSON ----------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    msg = f"Object of type {type(value).__name__} is not JSON serializable"
    raise TypeError(msg)


def _make_encoder() -> Callable[[object], str]:
    """
    Return the fastest encoder to compact ASCII JSON that refuses NaN.

    `json.dumps` builds a new C encoder on every call, which costs twice the
    encoding of a small event; one built here is reused. ASCII output keeps lone
    surrogates escaped, so every event can be written as UTF-8.
    """
    try:
        from json.encoder import (  # type: ignore[attr-defined]  # the C accelerator
            c_make_encoder,
            encode_basestring_ascii,
        )

        # (markers, default, encoder, indent, key_separator, item_separator,
        # sort_keys, skipkeys, allow_nan): it takes no keywords.
        options = (
            None,
            _json_default,
            encode_basestring_ascii,
            None,
            ":",
            ",",
            False,
            False,
            False,
        )
        c_encode = c_make_encoder(*options)
        c_encode({"probe": [1, 2.5, None]}, 0)
    except Exception:  # noqa: BLE001  # no C accelerator (PyPy, a future CPython): the stdlib way
        return json.JSONEncoder(
            separators=(",", ":"), allow_nan=False, default=_json_default
        ).encode

    def encode(value: object) -> str:
        return "".join(c_encode(value, 0))

    return encode


_encode = _make_encoder()


def _data_error(path: str, reason: str) -> TypeError:
    return TypeError(
        f"Event.{path} {reason}. Event data must be JSON: a dict with str keys, list, "
        "tuple, str, int, float, bool or None, nested; convert other values first, such as "
        "str(value) or value.isoformat()."
    )


def _freeze_slow(value: object, path: str, nesting: int) -> object:
    if value.__class__ in _SCALARS or isinstance(value, (str, int, float)):
        return value
    if nesting >= _MAX_NESTING:
        msg = (
            f"Event.{path} nests containers deeper than {_MAX_NESTING} levels, or contains "
            "itself. Flatten the event data."
        )
        raise ValueError(msg)
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            if key.__class__ is not str:
                if not isinstance(key, str):
                    raise _data_error(
                        f"{path} key {key!r}", f"is a {type(key).__name__}, not a str"
                    )
                # A str enum: keep its value, as JSON does, so that lookups by str work.
                key = str.__str__(key)  # noqa: PLW2901
            if item.__class__ in _SCALARS:
                out[key] = item
            else:
                out[key] = _freeze_slow(item, f"{path}[{key!r}]", nesting + 1)
        return MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        return tuple(
            [
                item
                if item.__class__ in _SCALARS
                else _freeze_slow(item, f"{path}[{i}]", nesting + 1)
                for i, item in enumerate(value)
            ]
        )
    raise _data_error(path, f"holds a {type(value).__name__}, which is not JSON")


def _freeze(data: object) -> tuple[object, str]:
    """
    Return a read-only copy of *data* and its JSON, or raise a clear error.
    """
    frozen: object
    source: object
    if data.__class__ is dict:
        # The common case, a flat dict of scalars, without a recursive call.
        for key, item in data.items():
            if key.__class__ is not str or item.__class__ not in _SCALARS:
                frozen = _freeze_slow(data, "data", 0)
                break
        else:
            frozen = MappingProxyType(data.copy())
        source = data
    elif data.__class__ in _SCALARS:
        frozen = source = data
    else:
        frozen = source = _freeze_slow(data, "data", 0)
    try:
        return frozen, _encode(source)
    except ValueError as e:
        msg = f"Event.data is not valid JSON: {e}. Replace NaN and infinities, such as with None."
        raise ValueError(msg) from None


# Event types that passed the rules, with their JSON. Services use a handful.
_TYPES: dict[str, str] = {}
_TYPES_MAX = 4096
# The users dropped by one sweep after which the per-user tables are copied.
_COMPACT_AFTER = 1024


def _check_type(value: object) -> str:
    """
    Return *value* as a plain str if it is a valid event type, or raise.
    """
    if value.__class__ is not str:
        if not isinstance(value, str):
            msg = (
                f"Event.type must be a str, got {type(value).__name__} ({value!r}). "
                "Use one of the constants such as usercontext.AGENT_STARTED, or your own str."
            )
            raise TypeError(msg)
        # A str enum member: its value, so that types compare and encode as str.
        value = str.__str__(value)
    assert isinstance(value, str)  # noqa: S101  # for mypy
    if not value or len(value) > _MAX_TYPE_LENGTH:
        msg = (
            f"Event.type must be 1 to {_MAX_TYPE_LENGTH} characters long, got "
            f"{len(value)} ({value[:80]!r}). Use a short name such as 'tool_completed'."
        )
        raise ValueError(msg)
    if not value.isprintable() or value.strip() != value:
        msg = (
            f"Event.type must be printable, without surrounding whitespace, got {value!r}. "
            "Use a short name such as 'tool_completed'."
        )
        raise ValueError(msg)
    if value == EVENTS_MISSED:
        msg = (
            f"Event type {EVENTS_MISSED!r} is reserved for the notices the hub sends "
            "when a sink missed events. Choose another type."
        )
        raise ValueError(msg)
    if len(_TYPES) >= _TYPES_MAX:
        _TYPES.clear()
    _TYPES[value] = _encode(value)
    return value


# -- Events --------------------------------------------------------------------


def _ids_json(
    user_id: str, thread_id: str | None, run_id: str | None, request_id: str | None
) -> str:
    return (
        f'"user_id":{_encode(user_id)},"thread_id":{_encode(thread_id)},'
        f'"run_id":{_encode(run_id)},"request_id":{_encode(request_id)}'
    )


@attrs.frozen(repr=False, weakref_slot=False, unsafe_hash=False)
class Event:
    """
    One event of one user's stream: frozen, with read-only JSON data.

    Emitters create events; you read them in sinks. *data* is copied into
    read-only form (dicts become read-only mappings, lists become tuples) and
    encoded to JSON once, at creation: a value that JSON cannot carry (bytes,
    a set, NaN, a non-str key) is refused there, with an error that names it.

    Args:
        type: What happened, 1 to 64 printable characters, such as
            `AGENT_STARTED` or any type of your own; a member of a str enum
            is taken as its value.
        data: The payload: a JSON value, usually a dict.
        seq: The position in the user's stream; strictly increasing.
        event_id: A unique id: the stream's id and *seq*, as ``"<stream>-<seq>"``.
        ts: When it was emitted, in seconds since the epoch.
        user_id: The user whose stream it belongs to.
        thread_id: The thread of the context that emitted it.
        run_id: The run of the context that emitted it.
        request_id: The request of the context that emitted it.

    >>> import usercontext as uc
    >>> event = uc.Event("agent_started", {"agent": "triage"}, 1, "0f-1", 1.5, "u-42")
    >>> event.data["agent"], event.seq
    ('triage', 1)
    >>> event.json
    '{"type":"agent_started","seq":1,"event_id":"0f-1","ts":1.5,"user_id":"u-42","thread_id":null,"run_id":null,"request_id":null,"data":{"agent":"triage"}}'

    .. versionadded:: 0.1.0
    """

    type: str
    data: Any
    seq: int
    event_id: str
    ts: float
    user_id: str
    thread_id: str | None = None
    run_id: str | None = None
    request_id: str | None = None
    _data_json: str = attrs.field(init=False, eq=False)
    _ids_json: str = attrs.field(init=False, eq=False)
    _json: str | None = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        kind = _check_type(self.type)
        frozen, data_json = (_EMPTY, "{}") if self.data is None else _freeze(self.data)
        # A value of the wrong type raises TypeError, a bad value of the right type ValueError.
        if self.seq.__class__ is not int or self.seq < 0:
            msg = f"Event.seq must be a non-negative int, got {self.seq!r}."
            raise TypeError(msg) if self.seq.__class__ is not int else ValueError(msg)
        if self.ts.__class__ not in (int, float) or not math.isfinite(self.ts):
            msg = f"Event.ts must be a finite number of seconds since the epoch, got {self.ts!r}."
            raise TypeError(msg) if self.ts.__class__ not in (int, float) else ValueError(msg)
        for name in ("event_id", "user_id", "thread_id", "run_id", "request_id"):
            value = getattr(self, name)
            if (value is None and name not in ("event_id", "user_id")) or (
                value.__class__ is str and value
            ):
                continue
            msg = f"Event.{name} must be a non-empty str, got {value!r}."
            raise ValueError(msg) if value.__class__ is str else TypeError(msg)
        setattr_ = object.__setattr__
        setattr_(self, "type", kind)
        setattr_(self, "data", frozen)
        setattr_(self, "ts", float(self.ts))
        setattr_(self, "_data_json", data_json)
        setattr_(
            self, "_ids_json", _ids_json(self.user_id, self.thread_id, self.run_id, self.request_id)
        )
        setattr_(
            self,
            "_json",
            f'{{"type":{_encode(self.type)},"seq":{self.seq},"event_id":{_encode(self.event_id)},'
            f'"ts":{self.ts!r},{self._ids_json},"data":{data_json}}}',
        )

    @property
    def json(self) -> str:
        """
        The event as one compact JSON object (ASCII), built once and cached.

        It holds ``type``, ``seq``, ``event_id``, ``ts``, the four ids and
        ``data``; sinks join these strings, so no event is encoded twice.
        """
        text = self._json
        if text is None:
            # Built lazily only for the hub's own events, whose type passed the
            # rules and whose id is hex and digits: nothing to escape.
            text = (
                f'{{"type":{_TYPES.get(self.type) or _encode(self.type)},"seq":{self.seq},'
                f'"event_id":"{self.event_id}","ts":{self.ts!r},{self._ids_json},'
                f'"data":{self._data_json}}}'
            )
            object.__setattr__(self, "_json", text)
        return text

    def __hash__(self) -> int:
        # The data may hold mappings, which cannot be hashed; event ids are unique.
        return hash(self.event_id)

    def __repr__(self) -> str:
        # Data may hold personal data: show its size only.
        return (
            f"Event(type={self.type!r}, seq={self.seq}, event_id={self.event_id!r}, "
            f"user_id={self.user_id!r}, data_bytes={len(self._data_json)})"
        )


class _Draft:
    """
    A mutable twin of `Event`, slot for slot, made into an `Event` by assigning
    ``__class__`` (as `usercontext.UserContext` is built): much cheaper than
    going through a frozen class's ``__setattr__``, on the hottest path.
    """

    __slots__ = tuple(a.name for a in attrs.fields(Event))

    type: str
    data: Any
    seq: int
    event_id: str
    ts: float
    user_id: str
    thread_id: str | None
    run_id: str | None
    request_id: str | None
    _data_json: str
    _ids_json: str
    _json: str | None


_new_draft = _Draft.__new__
_time = time.time


def _new_event(  # noqa: PLR0913, PLR0917  # every field of an event, on the hot path
    type: str,  # noqa: A002  # the field's name
    data: object,
    seq: int,
    stream_id: str,
    ts: float,
    user_id: str,
    thread_id: str | None,
    run_id: str | None,
    request_id: str | None,
    data_json: str,
    ids_json: str,
) -> Event:
    ev = _new_draft(_Draft)
    ev.type = type
    ev.data = data
    ev.seq = seq
    ev.event_id = f"{stream_id}-{seq}"
    ev.ts = ts
    ev.user_id = user_id
    ev.thread_id = thread_id
    ev.run_id = run_id
    ev.request_id = request_id
    ev._data_json = data_json
    ev._ids_json = ids_json
    ev._json = None
    ev.__class__ = Event  # type: ignore[assignment]
    return ev  # type: ignore[return-value]


# -- Sinks ---------------------------------------------------------------------


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


class RecordingSink:
    """
    A sink that keeps every event it gets in memory, for tests.

    Attributes:
        events: Every event received, in order.
        batches: Every batch received, as tuples, in order.

    It keeps everything, without a bound: use it in tests, not in production.

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
        return f"<usercontext.RecordingSink(events={len(self.events)})>"


class CallbackSink:
    """
    A sink that calls *callback* with each batch of events.

    *callback* may be a plain function or a coroutine function; what it
    returns is ignored, and what it raises is retried as for any sink.

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


# -- Policies and reports ------------------------------------------------------


@attrs.frozen
class Retry:
    """
    How a failing send is retried before its sink is given up.

    A batch is tried up to *attempts* times. Each try may take at most
    *timeout* seconds (then it counts as failed), and the *n*-th retry waits
    ``backoff * 2 ** (n - 1)`` seconds, at most *max_backoff*; with *jitter*,
    a random 50-100% of that, so that many failing connections do not retry in
    step. When the last try fails, the sink is detached and its undelivered
    events go to the hub's dead-letter hook.

    Args:
        attempts: Tries per batch, the first included (1 means no retry).
        backoff: The wait before the first retry, in seconds.
        max_backoff: The longest wait between tries, in seconds.
        timeout: The longest a single send may take, in seconds, or `None`.
        jitter: Whether to randomise each wait.

    .. versionadded:: 0.1.0
    """

    attempts: int = 4
    backoff: float = 0.05
    max_backoff: float = 2.0
    timeout: float | None = 10.0
    jitter: bool = True

    def __attrs_post_init__(self) -> None:
        _checks.count("Retry.attempts", self.attempts, minimum=1)
        _checks.seconds("Retry.backoff", self.backoff, allow_none=False, zero_ok=True)
        _checks.seconds("Retry.max_backoff", self.max_backoff, allow_none=False, zero_ok=True)
        _checks.seconds("Retry.timeout", self.timeout, allow_none=True, zero_ok=False)
        jitter: object = self.jitter
        if jitter.__class__ is not bool:
            msg = f"Retry.jitter must be a bool, got {self.jitter!r}."
            raise TypeError(msg)

    def delay(self, retry: int) -> float:
        """
        Return the wait before the *retry*-th retry (1 for the first), in seconds.
        """
        # The exponent is capped: 2.0 ** 1024 overflows, and 2 ** 64 backoffs
        # exceed any max_backoff already.
        base: float = min(self.max_backoff, self.backoff * 2.0 ** min(retry - 1, 64))
        return base * random.uniform(0.5, 1.0) if self.jitter else base  # noqa: S311  # not crypto


@attrs.frozen
class DeadLetter:
    """
    Events that could not be delivered to a sink, handed to the hub's
    *on_dead_letter* hook (or logged as a warning when there is none).

    Attributes:
        user_id: The user the events belong to.
        sink: The sink they were meant for; it is detached.
        events: The undelivered events, in order: the batch being sent, then
            the ones queued behind it (never a hub's `EVENTS_MISSED` notice).
        reason: ``"failed"`` when every retry failed, ``"sink_closed"`` when
            the sink said it is closed for good, ``"hub_closed"`` when the hub's
            drain deadline passed first.
        error: The last error, if any.

    .. versionadded:: 0.1.0
    """

    user_id: str
    sink: Sink
    events: tuple[Event, ...]
    reason: Literal["failed", "sink_closed", "hub_closed"]
    error: BaseException | None


@attrs.frozen
class SinkStats:
    """
    A snapshot of one attached sink.

    Attributes:
        user_id: The user it receives events of.
        sink: Its repr.
        pending: Events waiting for it, the batch being sent included.
        lag_s: How long ago its oldest pending event was emitted, in seconds.
        delivered: Events it accepted.
        dropped: Events it will not get, dropped by the overflow policy.
        failures: Sends to it that failed or timed out.

    .. versionadded:: 0.1.0
    """

    user_id: str
    sink: str
    pending: int
    lag_s: float
    delivered: int
    dropped: int
    failures: int


@attrs.frozen
class EmitterStats:
    """
    A snapshot of an `EmitterHub`'s counters.

    Deliveries and drops are counted per sink: an event delivered to two
    connections counts twice. For one sink, once its buffer is empty,
    ``delivered + sum(dropped.values()) + dead_lettered`` equals the events
    routed to it.

    ``dropped`` is a read-only mapping from a reason to the events a sink will
    not get for it: ``"oldest"`` (evicted for a newer one by ``drop_oldest``),
    ``"newest"`` (refused by ``drop_newest``, or because only critical events
    were buffered), ``"detached"`` (pending when the sink was detached).

    Attributes:
        emitted: Events accepted by `Emitter.emit` and `Emitter.emit_nowait`.
        delivered: Events accepted by a sink.
        rejected: Emits refused because a buffer was full
            (`usercontext.exceptions.EmitterFullError`).
        timed_out: Emits that waited for room past their timeout.
        retried: Sends retried after a failure.
        failed: Sends that raised or timed out.
        dead_lettered: Events handed to the dead-letter hook.
        unrouted: Events emitted while their user had no sink attached (kept
            for replay only).
        replayed: Events queued again, from the history, for sinks that resumed.
        missed: Events that resuming sinks were told they missed.
        depth_peak: The most events ever buffered for one sink.
        users: Users with state held right now.
        attached: Sinks attached right now.
        sinks: The sinks with the most events pending, most first.

    .. versionadded:: 0.1.0
    """

    emitted: int
    delivered: int
    dropped: Mapping[str, int]
    rejected: int
    timed_out: int
    retried: int
    failed: int
    dead_lettered: int
    unrouted: int
    replayed: int
    missed: int
    depth_peak: int
    users: int
    attached: int
    sinks: tuple[SinkStats, ...]


# -- State -----------------------------------------------------------------------


class _Signal:
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
    """

    __slots__ = ("data_json", "event", "frozen", "kind")

    def __init__(self, kind: str, frozen: object, data_json: str) -> None:
        self.event = anyio.Event()
        self.kind = kind
        self.frozen = frozen
        self.data_json = data_json

    def wake(self) -> None:
        self.event.set()


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

    def __init__(self, user_id: str, replay: int, now: float) -> None:
        self.user_id = user_id
        self.stream_id = os.urandom(8).hex()
        self.seq = 0
        self.sinks: tuple[_Attached, ...] = ()
        self.history: deque[Event] | None = deque(maxlen=replay) if replay else None
        self.waiters: deque[_Waiter] = deque()
        self.last = now
        self.idle_since = now
        self.dead = False

    def wake_waiter(self) -> None:
        if self.waiters:
            self.waiters[0].wake()


class _Attached:
    """
    One sink of one user, with its queue and its delivery task's state.
    """

    __slots__ = (
        "attachment",
        "batch",
        "delivered",
        "done",
        "draining",
        "dropped",
        "ended",
        "failures",
        "inflight",
        "peak",
        "queue",
        "reason",
        "scope",
        "sink",
        "stream",
        "unlinked",
        "waiter",
    )

    def __init__(self, stream: _Stream, sink: Sink) -> None:
        self.stream = stream
        self.sink = sink
        self.queue: deque[Event] = deque()
        self.inflight = 0
        # A tuple: a sink cannot change the batch that is retried or dead-lettered.
        self.batch: tuple[Event, ...] = ()
        self.waiter: Any = None
        self.scope = anyio.CancelScope(shield=True)
        self.draining = False  # the hub closes: stop once the queue is empty
        self.unlinked = False  # no longer routed to
        self.ended = False  # the delivery task finished
        self.reason: str | None = None
        self.delivered = self.dropped = self.failures = self.peak = 0
        self.done: anyio.Event | None = None
        self.attachment: Attachment

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)


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

    __slots__ = ("_attached", "_hub", "missed", "replayed", "sink", "user_id")

    def __init__(
        self, hub: EmitterHub, attached: _Attached, replayed: int, missed: int | None
    ) -> None:
        self._hub = hub
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
        return self._hub._detach(self._attached)

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


def _parse_last_seq(last_seq: int | str) -> tuple[str | None, int]:
    if last_seq.__class__ is int:
        assert isinstance(last_seq, int)  # noqa: S101  # for mypy
        if last_seq >= 0:
            return None, last_seq
    elif isinstance(last_seq, str):
        m = _EVENT_ID.fullmatch(last_seq.strip())
        if m is not None:
            return m.group(1), int(m.group(2))
    msg = (
        f"last_seq must be a non-negative int or an event id such as "
        f"'0123456789abcdef-42' (what SSE sends back as Last-Event-ID), got {last_seq!r}."
    )
    given: object = last_seq
    raise (ValueError if given.__class__ is int or isinstance(given, str) else TypeError)(msg)


# -- Emitters -----------------------------------------------------------------------

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

    __slots__ = ("_ctx", "_hub", "_ids", "_stream", "user_id")

    def __init__(self, hub: EmitterHub, ctx: UserContext, stream: _Stream) -> None:
        self._hub = hub
        self._ctx = ctx
        self._stream = stream
        self.user_id = ctx.user_id
        self._ids = _ids_json(ctx.user_id, ctx.thread_id, ctx.run_id, ctx.request_id)

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
            raise self._hub._full_error(self.user_id, type, 0.0, None)
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
        if timeout is _UNSET:
            timeout = self._hub._timeout
        else:
            _checks.seconds("timeout", timeout, allow_none=True, zero_ok=True)
        ev = self._emit(type, data, None)
        if ev is not None:
            return ev
        return await self._hub._wait_and_emit(self, type, data, timeout)

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
        if me is None:
            if kind.__class__ is not str or kind not in _TYPES:
                kind = _check_type(kind)
            if data is None:
                frozen = _EMPTY
                data_json = "{}"
            else:
                frozen, data_json = _freeze(data)
                if len(data_json) > hub._max_event_size:
                    raise hub._size_error(len(data_json))
        else:
            kind, frozen, data_json = me.kind, me.frozen, me.data_json
        maxsize = hub._maxsize
        sinks = s.sinks
        for a in sinks:
            if len(a.queue) + a.inflight >= maxsize:
                return hub._overflow_emit(self, s, kind, frozen, data_json, me)
        if s.waiters and s.waiters[0] is not me:
            return hub._overflow_emit(self, s, kind, frozen, data_json, me)
        ctx = self._ctx
        seq = s.seq = s.seq + 1
        ts = s.last = _time()
        # _new_event, written out: this is the hot path of every event.
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
        ev._ids_json = self._ids
        ev._json = None
        ev.__class__ = Event
        event: Event = ev
        if sinks:
            for a in sinks:
                a.queue.append(event)
                if a.waiter is not None:
                    a.wake()
        else:
            hub._unrouted += 1
        if s.history is not None:
            s.history.append(event)
        hub._emitted += 1
        return event

    def _prepare(self, kind: str, data: object) -> _Waiter:
        """
        Validate an event that must wait, and return its waiter.
        """
        kind = _check_type(kind)
        if data is None:
            frozen: object = _EMPTY
            data_json = "{}"
        else:
            frozen, data_json = _freeze(data)
        return _Waiter(kind, frozen, data_json)

    def _build(self, s: _Stream, kind: str, frozen: object, data_json: str) -> Event:
        """
        Make the next event of *s* from a validated type and data.
        """
        ctx = self._ctx
        seq = s.seq = s.seq + 1
        ts = s.last = _time()
        return _new_event(
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
            self._ids,
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


# -- The hub --------------------------------------------------------------------------


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
        drain_timeout: How long `aclose` delivers what is buffered, by default.
        max_event_size: The longest JSON of an event's data, in characters.
        on_dead_letter: Called (sync or async) with a `DeadLetter` for events
            that could not be delivered; without it, they are logged as a
            warning on the ``usercontext`` logger.

    >>> import anyio, usercontext as uc
    >>> async def main():
    ...     sink = uc.RecordingSink()
    ...     async with uc.EmitterHub() as hub:
    ...         hub.attach("u-42", sink)
    ...         ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    ...         await hub.emitter(ctx).emit(uc.AGENT_STARTED, {"agent": "triage"})
    ...     return [(e.type, e.seq) for e in sink.events]
    >>> anyio.run(main)
    [('agent_started', 1)]

    .. versionadded:: 0.1.0
    """

    def __init__(  # noqa: PLR0913
        self,
        maxsize: int = 1000,
        overflow: Overflow = "drop_oldest",
        critical: Sequence[str] = (AGENT_COMPLETED, AGENT_ERROR),
        retry: Retry | None = None,
        replay: int = 100,
        *,
        timeout: float | None = 10.0,
        idle_ttl: float = 60.0,
        max_batch: int = 256,
        drain_timeout: float = 5.0,
        max_event_size: int = 1 << 20,
        on_dead_letter: Callable[[DeadLetter], object] | None = None,
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
        self._maxsize = maxsize
        self._overflow: Overflow = overflow
        # A notice of missed events is never dropped either: the client would
        # not know what it missed. No emitted event has its (reserved) type.
        self._critical = frozenset((*types, EVENTS_MISSED))
        self._retry = Retry() if retry is None else retry
        self._replay = replay
        self._timeout = timeout
        self._idle_ttl = idle_ttl
        self._max_batch = max(1, min(max_batch, maxsize // 2))
        self._drain_timeout = drain_timeout
        self._max_event_size = max_event_size
        self._on_dead_letter = on_dead_letter

        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._streams: dict[str, _Stream] = {}
        # Users without sinks, oldest first by the time they became idle.
        self._idle: dict[str, _Stream] = {}
        self._attached: dict[int, _Attached] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: Any = None
        self._sweeper_scope: anyio.CancelScope | None = None
        self._closed_event: anyio.Event | None = None
        self._all_ended: anyio.Event | None = None

        self._emitted = self._delivered = self._rejected = self._timed_out = 0
        self._retried = self._failed = self._dead_lettered = self._unrouted = 0
        self._replayed = self._missed = self._peak = 0
        self._dropped: dict[str, int] = {}

    # -- lifecycle

    async def __aenter__(self) -> Self:
        if self._state != "new":
            msg = (
                f"This EmitterHub was {'closed' if self._state == 'closed' else 'entered'} "
                "already; a hub runs once. Create a new EmitterHub."
            )
            raise RuntimeError(msg)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._state = "running"
        self._sweeper_scope = anyio.CancelScope()
        tg.start_soon(self._sweeper)
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

    async def aclose(self, drain_timeout: float | None = None) -> None:  # noqa: C901  # one close, in order
        """
        Stop accepting events, deliver what is buffered, then stop.

        From now on, emitting and attaching raise
        `usercontext.exceptions.EmitterClosedError`, and so do emits waiting for
        room. Each sink gets what is buffered for it until *drain_timeout*
        seconds (the hub's by default) have passed; then its delivery is
        cancelled, and what it did not get goes to the dead-letter hook with
        reason ``"hub_closed"``. Calling it again waits for the first close.
        Leaving ``async with`` calls it.
        """
        if drain_timeout is not None:
            _checks.seconds("drain_timeout", drain_timeout, allow_none=False, zero_ok=True)
        if self._state == "new":
            self._state = "closed"
            return
        if self._state != "running":
            if self._closed_event is not None:
                await self._closed_event.wait()
            return
        self._state = "closing"
        self._closed_event = anyio.Event()
        deadline = anyio.current_time() + (
            self._drain_timeout if drain_timeout is None else drain_timeout
        )
        for s in self._streams.values():
            s.dead = True
            for w in s.waiters:
                w.wake()
        cancelled: BaseException | None = None
        if self._attached:
            self._all_ended = anyio.Event()
            for a in list(self._attached.values()):
                a.draining = True
                a.scope.deadline = deadline
                a.wake()
            with anyio.CancelScope(shield=True):
                try:
                    # Also against a native asyncio cancellation: the
                    # deliveries end by the drain deadline at the latest.
                    await shielded(self._all_ended.wait())
                except BaseException as e:  # noqa: BLE001  # raised once the hub is closed
                    cancelled = e
        assert self._sweeper_scope is not None  # noqa: S101  # made by __aenter__
        self._sweeper_scope.cancel()
        self._streams.clear()
        self._idle.clear()
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
        s = self._streams.get(user_id)
        if s is None:
            s = self._streams[user_id] = _Stream(user_id, self._replay, _time())
            self._idle[user_id] = s
        return s

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
        elif not isinstance(ctx, UserContext):
            msg = f"emitter() takes a usercontext.UserContext, got {type(ctx).__name__}."  # type: ignore[unreachable]
            raise TypeError(msg)
        return Emitter(self, ctx, self._stream_of(ctx.user_id))

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

        Raises:
            usercontext.exceptions.IsolationError: If *sink* is attached to
                another user, or a context of another user is bound.
            usercontext.exceptions.EmitterClosedError: If the hub is closed.
            RuntimeError: If the hub is not running yet.
            TypeError: If *sink* has no ``send`` method, or *user_id* is not
                a str.
            ValueError: If *sink* is attached already, *user_id* is empty, or
                *last_seq* is not a seq or an event id.
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
        parsed = None if last_seq is None else _parse_last_seq(last_seq)
        bound = _current_or_none(None)
        if bound is not None and bound.user_id != user_id:
            msg = (
                f"Cannot attach a sink to the stream of user {user_id!r} while a context of "
                f"user {bound.user_id!r} is bound: it would receive another user's events."
            )
            raise IsolationError(msg)
        other = self._attached.get(id(sink))
        if other is not None:
            if other.stream.user_id != user_id:
                msg = (
                    f"{sink!r} is attached to the stream of another user; one sink (one "
                    "connection) serves one user. Create a sink per connection."
                )
                raise IsolationError(msg)
            msg = f"{sink!r} is attached to user {user_id!r} already; detach it first."
            raise ValueError(msg)
        s = self._stream_of(user_id)
        a = _Attached(s, sink)
        replayed, missed = (0, 0) if parsed is None else self._replay_into(s, a, *parsed)
        a.attachment = Attachment(self, a, replayed, missed)
        self._attached[id(sink)] = a
        s.sinks = (*s.sinks, a)
        self._idle.pop(user_id, None)
        self._tg.start_soon(self._deliver, a)
        return a.attachment

    def _replay_into(
        self, s: _Stream, a: _Attached, stream_id: str | None, after: int
    ) -> tuple[int, int | None]:
        history = list(s.history) if s.history is not None else []
        first_held = history[0].seq if history else s.seq + 1
        missed: int | None
        if (stream_id is not None and stream_id != s.stream_id) or after > s.seq:
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
            before = events[0].seq - 1 if events else s.seq
            a.queue.append(self._notice(s, before, after, missed))
            self._missed += missed or 0
        a.queue.extend(events)
        self._replayed += len(events)
        return len(events), missed

    def _notice(self, s: _Stream, seq: int, after: int, missed: int | None) -> Event:
        data = {"missed": missed, "after_seq": after, "stream_id": s.stream_id}
        return _new_event(
            EVENTS_MISSED,
            MappingProxyType(data),
            seq,
            s.stream_id,
            _time(),
            s.user_id,
            None,
            None,
            None,
            _encode(data),
            _ids_json(s.user_id, None, None, None),
        )

    def detach(self, user_id: str, sink: Sink) -> int:
        """
        Detach *sink* from the stream of *user_id*, and return how many events
        it will not get (counted as dropped, reason ``"detached"``).

        It gets nothing more: a send in progress is cancelled. Detaching a sink
        that is not attached returns 0.
        """
        a = self._attached.get(id(sink))
        if a is None or a.stream.user_id != user_id:
            return 0
        return self._detach(a)

    def _detach(self, a: _Attached) -> int:
        if a.unlinked:
            return 0
        pending = len(a.queue) + a.inflight
        head = a.batch or a.queue
        if head and head[0].type is EVENTS_MISSED:
            pending -= 1  # a notice, not an event of the stream
        a.reason = "detached"
        self._unlink(a)
        a.scope.cancel()
        return pending

    def _unlink(self, a: _Attached) -> None:
        """
        Stop routing events to *a*, and let producers waiting on it go on.
        """
        if a.unlinked:
            return
        a.unlinked = True
        self._attached.pop(id(a.sink), None)
        s = a.stream
        s.sinks = tuple(x for x in s.sinks if x is not a)
        if not s.sinks and not s.dead:
            s.idle_since = s.last = _time()
            self._idle[s.user_id] = s
        s.wake_waiter()

    # -- emitting when full

    def _full_error(
        self, user_id: str, kind: str, waited: float, timeout: float | None
    ) -> EmitterFullError:
        critical = kind in self._critical
        if waited:
            self._timed_out += 1
            return EmitterTimeoutError(
                user_id, self._maxsize, self._overflow, critical, waited, timeout
            )
        self._rejected += 1
        return EmitterFullError(user_id, self._maxsize, self._overflow, critical, waited, timeout)

    def _size_error(self, size: int) -> ValueError:
        return ValueError(
            f"Event.data is {size:,} characters of JSON, over the hub's max_event_size of "
            f"{self._max_event_size:,}. Send a reference (an id or a URL) to the large "
            "content instead, or raise max_event_size."
        )

    def _overflow_emit(  # noqa: C901, PLR0912, PLR0913, PLR0917  # one branch per policy and case
        self,
        emitter: Emitter,
        s: _Stream,
        kind: str,
        frozen: object,
        data_json: str,
        me: _Waiter | None,
    ) -> Event | None:
        """
        Emit when a buffer is full or producers wait ahead; `None` means wait.
        """
        policy = self._overflow
        if policy == "error":
            raise self._full_error(s.user_id, kind, 0.0, None)
        if policy == "block":
            return None
        critical = kind in self._critical
        if critical and s.waiters and s.waiters[0] is not me:
            return None  # critical events wait their turn
        maxsize = self._maxsize
        plan: list[tuple[_Attached, int | None]] = []
        for a in s.sinks:
            q = a.queue
            if len(q) + a.inflight < maxsize:
                continue
            victim: int | None = None
            if policy == "drop_oldest" or critical:
                indexes = range(len(q)) if policy == "drop_oldest" else range(len(q) - 1, -1, -1)
                for i in indexes:
                    if q[i].type not in self._critical:
                        victim = i
                        break
                if victim is None and critical:
                    return None
            plan.append((a, victim))
        ev = emitter._build(s, kind, frozen, data_json)
        skip: list[_Attached] = []
        for a, victim in plan:
            a.peak = max(a.peak, maxsize)
            if victim is None:
                skip.append(a)
                self._drop(a, "newest", 1)
            else:
                del a.queue[victim]
                self._drop(a, "oldest" if policy == "drop_oldest" else "newest", 1)
        for a in s.sinks:
            if a not in skip:
                a.queue.append(ev)
                a.wake()
        if not s.sinks:
            self._unrouted += 1
        if s.history is not None:
            s.history.append(ev)
        self._emitted += 1
        return ev

    def _drop(self, a: _Attached, reason: str, n: int) -> None:
        a.dropped += n
        self._dropped[reason] = self._dropped.get(reason, 0) + n

    async def _wait_and_emit(
        self,
        emitter: Emitter,
        kind: str,
        data: object,
        timeout: float | None,
    ) -> Event:
        if timeout is not None and timeout <= 0:
            raise self._full_error(emitter.user_id, kind, 0.0, timeout)
        s = emitter._stream
        # The data is copied now: the event is what the caller passed, not what
        # the data holds when room comes.
        me = emitter._prepare(kind, data)
        s.waiters.append(me)
        start = anyio.current_time()
        try:
            with anyio.move_on_after(timeout):
                while True:
                    await me.event.wait()
                    me.event = anyio.Event()
                    ev = emitter._emit(kind, None, me)
                    if ev is not None:
                        return ev
        finally:
            first = bool(s.waiters) and s.waiters[0] is me
            s.waiters.remove(me)
            if first:
                s.wake_waiter()
        raise self._full_error(
            emitter.user_id, kind, max(anyio.current_time() - start, 1e-9), timeout
        )

    # -- delivery

    async def _deliver(self, a: _Attached) -> None:
        error: BaseException | None = None
        try:
            with a.scope:
                await self._deliver_loop(a)
        except Exception as e:  # noqa: BLE001  # a bug here must not take the service down
            logger.exception("usercontext: the delivery task of %r failed", a.sink)
            error = e
        finally:
            await self._end(a, error)

    async def _deliver_loop(self, a: _Attached) -> None:
        q = a.queue
        max_batch = self._max_batch
        while True:
            if not q:
                if a.draining:
                    return
                await self._sleep(a)
                continue
            if len(q) <= max_batch:
                batch = tuple(q)
                q.clear()
            else:
                batch = tuple([q.popleft() for _ in range(max_batch)])
            a.batch = batch
            a.inflight = n = len(batch)
            if not await self._send(a, batch):
                return
            depth = len(q) + n
            a.peak = max(a.peak, depth)
            a.inflight = 0
            a.batch = ()
            if batch[0].type is EVENTS_MISSED:
                n -= 1  # a notice, not an event of the stream
            a.delivered += n
            self._delivered += n
            s = a.stream
            if s.waiters:
                s.waiters[0].wake()

    async def _sleep(self, a: _Attached) -> None:
        loop = self._loop
        waiter = a.waiter = _Signal() if loop is None else loop.create_future()
        try:
            await waiter
        finally:
            a.waiter = None

    async def _send(self, a: _Attached, batch: tuple[Event, ...]) -> bool:
        retry = self._retry
        attempt = 1
        while True:
            if a.reason == "detached":
                return False
            try:
                if retry.timeout is None:
                    await a.sink.send(batch)
                else:
                    with anyio.fail_after(retry.timeout):
                        await a.sink.send(batch)
            except _CLOSED as e:
                a.failures += 1
                self._failed += 1
                await self._dead_letter(a, "sink_closed", e)
                return False
            except Exception as e:  # noqa: BLE001  # any failure of a sink is retried
                a.failures += 1
                self._failed += 1
                if attempt >= retry.attempts:
                    await self._dead_letter(a, "failed", e)
                    return False
                self._retried += 1
                logger.debug("usercontext: retrying a send to %r after %s", a.sink, describe(e))
                await anyio.sleep(retry.delay(attempt))
                attempt += 1
            else:
                return True

    def _take_undelivered(self, a: _Attached) -> list[Event]:
        """
        Empty the buffer of *a*, and return the events of the stream it held.
        """
        events = [*a.batch, *a.queue]
        a.peak = max(a.peak, len(events))
        a.batch = ()
        a.queue.clear()
        a.inflight = 0
        if events and events[0].type is EVENTS_MISSED:
            del events[0]  # a notice, not an event of the stream
        return events

    async def _dead_letter(self, a: _Attached, reason: str, error: BaseException | None) -> None:
        a.reason = a.reason or reason
        self._unlink(a)
        events = self._take_undelivered(a)
        if not events:
            return  # only a notice was pending: nothing of the stream is lost
        self._dead_lettered += len(events)
        letter = DeadLetter(a.stream.user_id, a.sink, tuple(events), reason, error)  # type: ignore[arg-type]
        hook = self._on_dead_letter
        if hook is None:
            logger.warning(
                "usercontext: %d event(s) of user %r could not be delivered to %r (%s%s); "
                "pass on_dead_letter to EmitterHub to handle them",
                len(events),
                a.stream.user_id,
                a.sink,
                reason,
                f": {describe(error)}" if error is not None else "",
            )
            return
        try:
            result = hook(letter)
            if inspect.isawaitable(result):
                limit = self._retry.timeout or 10.0
                with anyio.CancelScope(shield=True), anyio.move_on_after(limit) as scope:
                    await shielded(result)
                if scope.cancelled_caught:
                    logger.warning(
                        "usercontext: the on_dead_letter hook took longer than %g s for %d "
                        "event(s) of user %r and was cancelled; make it faster, or hand the "
                        "events to a task of your own",
                        limit,
                        len(events),
                        a.stream.user_id,
                    )
        except Exception:  # noqa: BLE001  # logged: the hook must not stop delivery
            logger.exception(
                "usercontext: the on_dead_letter hook failed for user %r", a.stream.user_id
            )

    async def _end(self, a: _Attached, error: BaseException | None) -> None:
        """
        Account for what *a* did not get once its delivery task ends, after
        *error* if it failed.
        """
        if a.reason == "detached":
            self._drop(a, "detached", len(self._take_undelivered(a)))
        elif a.batch or a.queue:
            # Cut by the close deadline, or by a bug in the delivery task.
            with anyio.CancelScope(shield=True):
                await self._dead_letter(a, "hub_closed" if error is None else "failed", error)
        elif error is not None:
            a.reason = a.reason or "failed"
        self._unlink(a)
        a.ended = True
        self._peak = max(self._peak, a.peak)
        if a.done is not None:
            a.done.set()
        if self._all_ended is not None and not self._attached:
            self._all_ended.set()

    # -- idle users

    async def _sweeper(self) -> None:
        assert self._sweeper_scope is not None  # noqa: S101  # made by __aenter__
        with self._sweeper_scope:
            while True:
                await anyio.sleep(max(self._idle_ttl / 2, 0.001))
                await self._sweep()

    async def _sweep(self) -> None:
        """
        Drop the users idle for longer than the TTL, oldest first.

        The idle table is ordered by when users became idle, so the scan stops at
        the first user idle for less than the TTL. A user who emitted since is
        moved to the end rather than dropped.
        """
        horizon = _time() - self._idle_ttl
        # One pass to find them, then the deletions: taking the first entry
        # again after each deletion rescans the deleted slots, O(n**2) in all.
        expired: list[str] = []
        for user_id, s in self._idle.items():
            if s.idle_since > horizon:
                break
            expired.append(user_id)
        done = 0
        for i, user_id in enumerate(expired, 1):
            if i % 10_000 == 0:
                await anyio.lowlevel.checkpoint()
            # Look again: the user may have attached (or the hub closed) meanwhile.
            idle = self._idle
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
            del self._streams[user_id]
            done += 1
        if done >= _COMPACT_AFTER and done > len(self._streams):
            # A dict keeps its table when entries are deleted: copy the two
            # tables, so that a flood of users leaves no memory behind.
            self._streams = dict(self._streams)
            self._idle = dict(self._idle)

    # -- stats

    def stats(self, top: int = 10) -> EmitterStats:
        """
        Return a snapshot of the counters, with the *top* sinks most behind.
        """
        now = _time()
        attached = list(self._attached.values())
        peak = max([self._peak, *(max(a.peak, len(a.queue) + a.inflight) for a in attached)])
        lagging = heapq.nlargest(top, attached, key=lambda a: len(a.queue) + a.inflight)
        return EmitterStats(
            emitted=self._emitted,
            delivered=self._delivered,
            dropped=MappingProxyType(dict(self._dropped)),
            rejected=self._rejected,
            timed_out=self._timed_out,
            retried=self._retried,
            failed=self._failed,
            dead_lettered=self._dead_lettered,
            unrouted=self._unrouted,
            replayed=self._replayed,
            missed=self._missed,
            depth_peak=peak,
            users=len(self._streams),
            attached=len(attached),
            sinks=tuple(_sink_stats(a, now) for a in lagging),
        )

    def __repr__(self) -> str:
        return (
            f"<usercontext.EmitterHub(maxsize={self._maxsize}, overflow={self._overflow!r}, "
            f"{self._state}, users={len(self._streams)}, attached={len(self._attached)})>"
        )


def _sink_stats(a: _Attached, now: float) -> SinkStats:
    oldest = a.batch[0] if a.batch else (a.queue[0] if a.queue else None)
    return SinkStats(
        user_id=a.stream.user_id,
        sink=repr(a.sink),
        pending=len(a.queue) + a.inflight,
        lag_s=0.0 if oldest is None else max(0.0, now - oldest.ts),
        delivered=a.delivered,
        dropped=a.dropped,
        failures=a.failures,
    )
