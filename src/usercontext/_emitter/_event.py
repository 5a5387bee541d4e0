"""
An event of a user's stream, and its JSON: the event types the library names,
the checks an event passes, and the encoder that writes each event once.
"""

from __future__ import annotations

import json
import math
import time

from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs


if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    # The values event data is made of. Callers pass values of any type; what
    # is not one of these is refused at run time, with an error that names it.
    _JsonValue: TypeAlias = (
        Mapping[Any, Any] | list[Any] | tuple[Any, ...] | str | int | float | None
    )


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

_MAX_TYPE_LENGTH = 64
_MAX_NESTING = 32
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _json_default(value: _JsonValue) -> object:
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
        from _json import make_encoder as c_make_encoder  # the C accelerator
        from json.encoder import encode_basestring_ascii

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
    except Exception:  # no C accelerator (PyPy, a future CPython): the stdlib way
        return json.JSONEncoder(
            separators=(",", ":"), allow_nan=False, default=_json_default
        ).encode

    def encode(value: object) -> str:
        return "".join(c_encode(value, 0))

    return encode


_encode = _make_encoder()
_encode_str: Callable[[str], str] = encode_basestring_ascii


def _data_error(path: str, reason: str) -> TypeError:
    return TypeError(
        f"Event.{path} {reason}. Event data must be JSON: a dict with str keys, list, "
        "tuple, str, int, float, bool or None, nested; convert other values first, such as "
        "str(value) or value.isoformat()."
    )


def _freeze_slow(value: _JsonValue, path: str, nesting: int) -> object:
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


# A flat dict's JSON is at most this many characters per character of its
# keys and str values (an astral character, escaped as a surrogate pair), plus
# this many per item (quotes, separators, and any number, bool or null).
_PER_CHAR = 12
_PER_ITEM = 32
_INT_BOUND = 1 << 63


def freeze_lazy(data: Any, limit: int) -> tuple[object, str | None]:  # noqa: C901  # the hot path, written out
    """
    Return a copy of *data* to be an event's data (a dict is wrapped
    read-only when first read, see `_Data`) and its JSON, or `None` for the
    JSON when it is sure to be valid and within *limit* characters: it is
    then encoded on first use. Raise as `_freeze` does, or if the JSON is over
    *limit*.
    """
    if data.__class__ is dict:
        # A flat dict of str keys and plain values, its size bounded without
        # encoding it: the common case, encoded only if a sink reads it.
        chars = 0
        for key, item in data.items():
            cls = item.__class__
            if key.__class__ is not str:
                break
            if cls is str:
                chars += len(item)
            elif cls is float:
                if item - item != 0.0:  # NaN or an infinity: refused by the encoder
                    break
            elif cls is int:
                if not -_INT_BOUND < item < _INT_BOUND:  # long ints: the encoder checks
                    break
            elif cls is not bool and item is not None:
                break
            chars += len(key)
        else:
            if chars * _PER_CHAR + len(data) * _PER_ITEM + 2 <= limit:
                # The copy, wrapped read-only when first read (see _Data).
                return data.copy(), None
    frozen, data_json = _freeze(data)
    if len(data_json) > limit:
        raise size_error(len(data_json), limit)
    return frozen, data_json


def _freeze(data: Any) -> tuple[object, str]:
    """
    Return a read-only copy of *data* and its JSON, or raise a clear error.
    """
    # *data* is Any: the fast path tests its exact class, which type checkers
    # do not narrow on.
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


def _ids_json(
    user_id: str, thread_id: str | None, run_id: str | None, request_id: str | None
) -> str:
    # The string encoder alone: ids are str or None, and the encoder's list
    # and join would cost more than the escaping.
    return (
        f'"user_id":{_encode_str(user_id)},'
        f'"thread_id":{"null" if thread_id is None else _encode_str(thread_id)},'
        f'"run_id":{"null" if run_id is None else _encode_str(run_id)},'
        f'"request_id":{"null" if request_id is None else _encode_str(request_id)}'
    )


@attrs.frozen(repr=False, weakref_slot=False, unsafe_hash=False)
class Event:
    """
    One event of one user's stream: frozen, with read-only JSON data.

    Emitters create events; you read them in sinks. *data* is copied into
    read-only form (dicts become read-only mappings, lists become tuples) and
    checked at creation: a value that JSON cannot carry (bytes, a set, NaN, a
    non-str key) is refused there, with an error that names it. The JSON
    (`json`) is encoded once; for an emitted event, when first read.

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
    _data_json: str | None = attrs.field(init=False, eq=False)
    _ids_json: str | None = attrs.field(init=False, eq=False)
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
                f'"event_id":"{self.event_id}","ts":{self.ts!r},{self._ids()},'
                f'"data":{self._data()}}}'
            )
            object.__setattr__(self, "_json", text)
        return text

    def _data(self) -> str:
        """
        The JSON of the data, encoded on first use: emits validate the data
        and bound its size, and most sinks never read it.
        """
        text = self._data_json
        if text is None:
            text = _encode(_read_data(self))  # a dict as emitted: no view made to encode it
            object.__setattr__(self, "_data_json", text)
        return text

    def _ids(self) -> str:
        text = self._ids_json
        if text is None:
            text = _ids_json(self.user_id, self.thread_id, self.run_id, self.request_id)
            object.__setattr__(self, "_ids_json", text)
        return text

    def __hash__(self) -> int:
        # The data may hold mappings, which cannot be hashed; event ids are unique.
        return hash(self.event_id)

    def __repr__(self) -> str:
        # Data may hold personal data: show its size only.
        return (
            f"Event(type={self.type!r}, seq={self.seq}, event_id={self.event_id!r}, "
            f"user_id={self.user_id!r}, data_bytes={len(self._data())})"
        )


# The slot of Event.data, under the view below.
_data_slot: Any = Event.__dict__["data"]
_read_data = _data_slot.__get__
_write_data = _data_slot.__set__


class _Data:
    """
    `Event.data`: the slot, read through a read-only view of a dict made on
    the first read. An emitter keeps its copy of the data as a plain dict,
    since most sinks never read it (they read the JSON, or count events), and
    a view per event would cost every event an object; an event made by
    `Event(...)` holds its view from the start.
    """

    __slots__ = ()

    def __get__(self, ev: Event | None, owner: type | None = None) -> Any:
        if ev is None:
            return self
        value = _read_data(ev)
        if value.__class__ is dict:
            value = MappingProxyType(value)
            _write_data(ev, value)
        return value

    def __set__(self, ev: Event, value: object) -> None:
        _write_data(ev, value)


Event.data = _Data()  # attrs' slot, read through the view


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
    _data_json: str | None
    _ids_json: str | None
    _json: str | None


_new_draft = _Draft.__new__
_time = time.time


def new_event(  # noqa: PLR0913, PLR0917  # every field of an event, on the hot path
    type: str,  # noqa: A002  # the field's name
    data: object,
    seq: int,
    stream_id: str,
    ts: float,
    user_id: str,
    thread_id: str | None,
    run_id: str | None,
    request_id: str | None,
    data_json: str | None,
    ids_json: str | None,
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


def size_error(size: int, limit: int) -> ValueError:
    return ValueError(
        f"Event.data is {size:,} characters of JSON, over the hub's max_event_size of "
        f"{limit:,}. Send a reference (an id or a URL) to the large content instead, or "
        "raise max_event_size."
    )
