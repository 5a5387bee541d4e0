"""
Tests of `usercontext.Event`: its fields, the checks its type and data pass,
and its JSON.
"""

from __future__ import annotations

import enum
import inspect
import json
import math
import pydoc
import sys

from types import MappingProxyType

import attrs
import pytest

from emitter_helpers import TYPE

import usercontext as uc

from usercontext._emitter import _event
from usercontext._emitter._event import _make_encoder


class TestEvent:
    def test_fields_and_json(self):
        """
        An event keeps its fields, and its JSON holds them all, compact.
        """
        event = uc.Event(TYPE, {"tool": "search"}, 3, "ab-3", 1.25, "u-42", "t-7", "r-1", "q-1")

        assert (event.type, event.seq, event.event_id, event.ts) == (TYPE, 3, "ab-3", 1.25)
        assert json.loads(event.json) == {
            "type": TYPE,
            "seq": 3,
            "event_id": "ab-3",
            "ts": 1.25,
            "user_id": "u-42",
            "thread_id": "t-7",
            "run_id": "r-1",
            "request_id": "q-1",
            "data": {"tool": "search"},
        }
        assert event.json is event.json  # built once
        assert " " not in event.json

    def test_introspection_lists_every_field(self):
        """
        Help and introspection read the class's fields, data among them, as
        they read any attrs class's.
        """
        text = pydoc.render_doc(uc.Event, renderer=pydoc.plaintext)
        fields = [f.name for f in attrs.fields(uc.Event) if not f.name.startswith("_")]

        for name in fields:
            assert f"|  {name}\n" in text
        members = dict(inspect.getmembers(uc.Event))
        assert {*fields} <= members.keys()
        assert uc.Event.__match_args__[:2] == ("type", "data")

    def test_data_is_read_only_and_copied(self):
        """
        Data is copied into read-only form: dicts become read-only mappings,
        lists become tuples, and changing the original changes nothing.
        """
        source = {"steps": [1, {"b": [2, 3]}], "m": MappingProxyType({"x": 1}), "n": None}
        event = uc.Event(TYPE, source, 1, "a-1", 1.0, "u-42")
        source["steps"].append(4)
        source["new"] = True

        assert isinstance(event.data, MappingProxyType)
        assert event.data["steps"] == (1, MappingProxyType({"b": (2, 3)}))
        assert "new" not in event.data
        with pytest.raises(TypeError):
            event.data["x"] = 1  # type: ignore[index]
        assert json.loads(event.json)["data"] == {
            "steps": [1, {"b": [2, 3]}],
            "m": {"x": 1},
            "n": None,
        }

    @pytest.mark.parametrize(
        ("data", "frozen", "encoded"),
        [
            (None, MappingProxyType({}), {}),
            ("thinking...", "thinking...", "thinking..."),
            (3, 3, 3),
            ([1, "a"], (1, "a"), [1, "a"]),
            ({"é": "ü"}, MappingProxyType({"é": "ü"}), {"é": "ü"}),
        ],
    )
    def test_any_json_value(self, data, frozen, encoded):
        """
        Data may be any JSON value; None means an empty mapping. The JSON is
        ASCII, with other characters escaped.
        """
        event = uc.Event(TYPE, data, 1, "a-1", 1.0, "u-42")

        assert event.data == frozen
        assert json.loads(event.json)["data"] == encoded
        assert event.json.isascii()

    @pytest.mark.parametrize(
        ("data", "error", "match"),
        [
            ({"b": b"raw"}, TypeError, r"Event.data\['b'\] holds a bytes"),
            ({"s": {1, 2}}, TypeError, "holds a set"),
            ({1: "a"}, TypeError, "key 1 is a int, not a str"),
            ({"x": math.nan}, ValueError, "not valid JSON.*Replace NaN"),
            ({"x": [math.inf]}, ValueError, "not valid JSON"),
            (object(), TypeError, "holds a object"),
        ],
    )
    def test_data_refused(self, data, error, match):
        """
        Data JSON cannot carry is refused at construction, naming the value and
        the fix.
        """
        with pytest.raises(error, match=match):
            uc.Event(TYPE, data, 1, "a-1", 1.0, "u-42")

    def test_circular_and_deep_data_refused(self):
        """
        Data that contains itself, or nests deeper than 32 levels, is refused.
        """
        loop: dict = {}
        loop["self"] = loop
        deep: list = []
        for _ in range(40):
            deep = [deep]

        with pytest.raises(ValueError, match="nests containers deeper than 32"):
            uc.Event(TYPE, loop, 1, "a-1", 1.0, "u-42")
        with pytest.raises(ValueError, match="nests containers deeper than 32"):
            uc.Event(TYPE, deep, 1, "a-1", 1.0, "u-42")

    def test_enum_like_values(self):
        """
        Subclasses of str and int (enums) are kept as they are and encoded as
        their value.
        """

        class Level(int):
            pass

        event = uc.Event(TYPE, {"level": Level(2), "tags": [Level(1)]}, 1, "a-1", 1.0, "u-42")

        assert json.loads(event.json)["data"] == {"level": 2, "tags": [1]}

    @pytest.mark.parametrize(
        ("kind", "error", "match"),
        [
            ("", ValueError, "1 to 64 characters"),
            ("x" * 65, ValueError, "1 to 64 characters"),
            (" padded", ValueError, "printable"),
            ("two\nlines", ValueError, "printable"),
            (3, TypeError, "must be a str"),
            (uc.EVENTS_MISSED, ValueError, "reserved"),
        ],
    )
    def test_type_rules(self, kind, error, match):
        """
        The type is a short printable str, and not the reserved notice type.
        """
        with pytest.raises(error, match=match):
            uc.Event(kind, None, 1, "a-1", 1.0, "u-42")

    @pytest.mark.parametrize(
        ("changes", "error", "match"),
        [
            ({"seq": -1}, ValueError, "seq must be a non-negative int"),
            ({"seq": "1"}, TypeError, "seq must be a non-negative int"),
            ({"ts": math.nan}, ValueError, "ts must be a finite number"),
            ({"ts": "now"}, TypeError, "ts must be a finite number"),
            ({"user_id": ""}, ValueError, "user_id must be a non-empty str"),
            ({"event_id": None}, TypeError, "event_id must be a non-empty str"),
            ({"thread_id": 7}, TypeError, "thread_id must be a non-empty str"),
        ],
    )
    def test_field_rules(self, changes, error, match):
        """
        Sequence, timestamp and ids are checked at construction: a value of
        the wrong type raises TypeError, a bad value of the right type
        ValueError.
        """
        fields = {"type": TYPE, "data": None, "seq": 1, "event_id": "a-1", "ts": 1, "user_id": "u"}

        with pytest.raises(error, match=match):
            uc.Event(**{**fields, **changes})

    def test_frozen_hashable_and_short_repr(self):
        """
        Events are frozen, equal by value, hashable even with mapping data, and
        their repr hides the data.
        """
        a = uc.Event(TYPE, {"secret": "p4ss"}, 1, "a-1", 1, "u-42")
        b = uc.Event(TYPE, {"secret": "p4ss"}, 1, "a-1", 1, "u-42")

        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            a.seq = 2  # type: ignore[misc]
        assert a == b
        assert len({a, b}) == 1
        assert a.ts == 1.0
        assert isinstance(a.ts, float)
        assert "p4ss" not in repr(a)
        assert repr(a) == (
            "Event(type='tool_executing', seq=1, event_id='a-1', user_id='u-42', data_bytes=17)"
        )

    def test_type_cache_is_bounded(self, monkeypatch):
        """
        The cache of validated types is emptied when full.
        """
        monkeypatch.setattr(_event, "_TYPES_MAX", 2)
        monkeypatch.setattr(_event, "_TYPES", {})

        for kind in ("one", "two", "three"):
            uc.Event(kind, None, 1, "a-1", 1, "u-42")

        assert _event._TYPES == {"three": '"three"'}

    def test_str_enum_types_and_keys(self):
        """
        A str enum member is a str: it is taken as an event type, and as a key
        of the data, by its value.
        """

        class Kind(str, enum.Enum):
            STARTED = "agent_started"

        event = uc.Event(Kind.STARTED, {Kind.STARTED: 1, "tags": [Kind.STARTED]}, 1, "a-1", 1, "u")

        assert event.type == "agent_started"
        assert type(event.type) is str
        assert list(event.data) == ["agent_started", "tags"]
        assert type(next(iter(event.data))) is str
        assert event.data["agent_started"] == 1
        assert json.loads(event.json)["type"] == "agent_started"
        assert json.loads(event.json)["data"] == {"agent_started": 1, "tags": ["agent_started"]}


class TestEncoder:
    def test_json_default(self):
        """
        Read-only mappings are encoded as objects; other values are refused.
        """
        assert _event._json_default(MappingProxyType({"a": 1})) == {"a": 1}
        with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
            _event._json_default({1})

    def test_fallback_without_c_accelerator(self, monkeypatch):
        """
        Without the C encoder, the standard library's encoder gives the same
        output and refuses NaN too.
        """
        # As on PyPy: no _json, the module of the C encoder.
        monkeypatch.setitem(sys.modules, "_json", None)
        encode = _make_encoder()
        value = {"a": [1, 2.5, None, "é"], "m": MappingProxyType({"b": True})}

        assert encode(value) == _event._encode(value)
        with pytest.raises(ValueError, match="Out of range float"):
            encode(math.nan)
