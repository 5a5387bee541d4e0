"""
Tests for per-user event streams: `Event`, `Emitter`, `EmitterHub` and the
sinks shipped with them. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import logging
import math
import random
import sys

from types import MappingProxyType

import anyio
import anyio.lowlevel
import attrs
import pytest

import usercontext as uc

from usercontext import _emitter
from usercontext._emitter import _make_encoder, _parse_last_seq


TYPE = "tool_executing"


class GateSink:
    """
    Records batches; while *gate* is not set, each send waits for it.
    """

    def __init__(self, user_id="u-42"):
        self.user_id = user_id
        self.gate = anyio.Event()
        self.events = []
        self.calls = 0
        self.started = anyio.Event()

    async def send(self, events):
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        self.events.extend(events)


class FlakySink(uc.RecordingSink):
    """
    Fails its first *failures* sends with *error*, then records.
    """

    def __init__(self, failures, error=None):
        super().__init__()
        self.failures = failures
        self.error = error or OSError("connection reset")
        self.attempts = 0

    async def send(self, events):
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        await super().send(events)


async def _until(predicate, timeout=5.0):
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  # polls the state of the code under test
            await anyio.sleep(0.001)


def _pending(hub):
    return sum(s.pending for s in hub.stats().sinks)


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
        monkeypatch.setattr(_emitter, "_TYPES_MAX", 2)
        monkeypatch.setattr(_emitter, "_TYPES", {})

        for kind in ("one", "two", "three"):
            uc.Event(kind, None, 1, "a-1", 1, "u-42")

        assert _emitter._TYPES == {"three": '"three"'}

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
        assert _emitter._json_default(MappingProxyType({"a": 1})) == {"a": 1}
        with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
            _emitter._json_default({1})

    def test_fallback_without_c_accelerator(self, monkeypatch):
        """
        Without the C encoder, the standard library's encoder gives the same
        output and refuses NaN too.
        """
        import json.encoder

        monkeypatch.setattr(json.encoder, "c_make_encoder", None)
        encode = _make_encoder()
        value = {"a": [1, 2.5, None, "é"], "m": MappingProxyType({"b": True})}

        assert encode(value) == _emitter._encode(value)
        with pytest.raises(ValueError, match="Out of range float"):
            encode(math.nan)


class TestRetry:
    def test_delay(self):
        """
        Waits double from *backoff* up to *max_backoff*; jitter takes 50-100%.
        """
        retry = uc.Retry(backoff=0.1, max_backoff=0.5, jitter=False)
        jittered = uc.Retry(backoff=0.1, max_backoff=0.5)

        assert [retry.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
        for n in (1, 2, 3, 4):
            assert 0.5 * retry.delay(n) <= jittered.delay(n) <= retry.delay(n)

    def test_delay_of_a_late_retry(self):
        """
        A late retry of a sink given many attempts waits *max_backoff*: the
        doubling does not overflow.
        """
        retry = uc.Retry(attempts=10_000, backoff=0.5, max_backoff=2.0, jitter=False)

        assert retry.delay(1_100) == 2.0
        assert retry.delay(9_999) == 2.0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"attempts": 0}, ValueError, "attempts must be at least 1"),
            ({"attempts": 1.5}, TypeError, "attempts must be an int"),
            ({"backoff": -1}, ValueError, "backoff must be >= 0"),
            ({"max_backoff": "1"}, TypeError, "max_backoff must be a number"),
            ({"timeout": 0}, ValueError, "timeout must be > 0"),
            ({"timeout": math.nan}, ValueError, "timeout must be > 0"),
            ({"jitter": 1}, TypeError, "jitter must be a bool"),
        ],
    )
    def test_rules(self, kwargs, error, match):
        """
        Bad retry settings are refused with the rule they break.
        """
        with pytest.raises(error, match=match):
            uc.Retry(**kwargs)


class TestSinks:
    async def test_recording_sink(self):
        """
        The recording sink keeps events and batches, and wait_for returns once
        enough arrived.
        """
        sink = uc.RecordingSink()
        events = [uc.Event(TYPE, None, i, f"a-{i}", 1, "u-42") for i in (1, 2, 3)]
        got = []

        async def waiter(n):
            await sink.wait_for(n)
            got.append(n)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, 3)
            tg.start_soon(waiter, 1)
            await anyio.sleep(0.01)
            await sink.send(events[:1])
            await anyio.sleep(0.01)
            assert got == [1]
            await sink.send(events[1:])
        await sink.wait_for(2)

        assert got == [1, 3]
        assert sink.events == events
        assert sink.batches == [tuple(events[:1]), tuple(events[1:])]
        assert repr(sink) == "<usercontext.RecordingSink(events=3)>"
        assert isinstance(sink, uc.Sink)

    async def test_callback_sink(self):
        """
        The callback sink calls a sync or an async callback with each batch.
        """
        seen = []

        async def acall(events):
            await anyio.lowlevel.checkpoint()
            seen.append(("async", len(events)))

        def scall(events):
            seen.append(("sync", len(events)))

        events = [uc.Event(TYPE, None, 1, "a-1", 1, "u-42")]
        await uc.CallbackSink(acall).send(events)
        await uc.CallbackSink(scall).send(events)

        assert seen == [("async", 1), ("sync", 1)]
        assert repr(uc.CallbackSink(scall)).endswith("scall)>")
        with pytest.raises(TypeError, match="takes a callable"):
            uc.CallbackSink(3)  # type: ignore[arg-type]

    async def test_recording_sink_cancelled_wait_leaves_nothing(self):
        """
        A wait_for that times out leaves no waiter behind in the sink.
        """
        sink = uc.RecordingSink()

        for _ in range(3):
            with anyio.move_on_after(0.001):
                await sink.wait_for(5)

        assert sink._waiters == []


class TestHubSettings:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"maxsize": 0}, ValueError, "maxsize must be at least 1"),
            ({"overflow": "drop"}, ValueError, "'block', 'drop_oldest', 'drop_newest', 'error'"),
            ({"critical": "agent_error"}, TypeError, "for one type write"),
            ({"critical": [1]}, TypeError, "collection of event types"),
            ({"critical": None}, TypeError, r"for none \(\)"),
            ({"retry": 3}, TypeError, "usercontext.Retry"),
            ({"replay": -1}, ValueError, "replay must be at least 0"),
            ({"timeout": -1}, ValueError, "timeout must be >= 0"),
            ({"idle_ttl": 0}, ValueError, "idle_ttl must be > 0"),
            ({"max_batch": 0}, ValueError, "max_batch must be at least 1"),
            ({"drain_timeout": None}, TypeError, "drain_timeout must be a number"),
            ({"max_event_size": 1}, ValueError, "max_event_size must be at least 2"),
            ({"on_dead_letter": "log"}, TypeError, "on_dead_letter must be a callable"),
        ],
    )
    def test_rules(self, kwargs, error, match):
        """
        Bad hub settings are refused with the rule they break.
        """
        with pytest.raises(error, match=match):
            uc.EmitterHub(**kwargs)

    async def test_critical_types_from_an_iterator(self, ctx):
        """
        Critical types may come from any iterable, read once: an iterator's
        types are critical too.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=2, critical=iter(["done"])) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait("done")
            await sink.started.wait()
            emitter.emit_nowait("done")
            with pytest.raises(uc.EmitterFullError, match="critical event"):
                emitter.emit_nowait("done")
            sink.gate.set()

        assert [e.type for e in sink.events] == ["done", "done"]

    def test_max_batch_is_at_most_half_the_buffer(self):
        """
        A batch never takes more than half a buffer, so drop_oldest always has
        buffered events to drop.
        """
        assert uc.EmitterHub(maxsize=100, max_batch=256)._max_batch == 50
        assert uc.EmitterHub(maxsize=1, max_batch=256)._max_batch == 1
        assert uc.EmitterHub(maxsize=1000, max_batch=8)._max_batch == 8


class TestLifecycle:
    async def test_not_running(self, ctx):
        """
        Before it is entered, a hub gives no emitters and takes no sinks, and
        says how to start it.
        """
        hub = uc.EmitterHub()

        with pytest.raises(RuntimeError, match=r"not running\. Enter it first"):
            hub.emitter(ctx)
        with pytest.raises(RuntimeError, match="not running"):
            hub.attach("u-42", uc.RecordingSink())
        assert not hub.closed
        await hub.aclose()
        assert hub.closed
        with pytest.raises(RuntimeError, match="closed already; a hub runs once"):
            await hub.__aenter__()

    async def test_close_unstarted_twice(self):
        """
        Closing a hub that never ran, twice, is fine.
        """
        hub = uc.EmitterHub()
        await hub.aclose()
        await hub.aclose()
        assert hub.closed

    async def test_entered_once(self):
        """
        A hub runs once.
        """
        async with uc.EmitterHub() as hub:
            with pytest.raises(RuntimeError, match="entered already"):
                await hub.__aenter__()
            assert repr(hub) == (
                "<usercontext.EmitterHub(maxsize=1000, overflow='drop_oldest', running, "
                "users=0, attached=0)>"
            )

    async def test_emit_after_close_raises(self, ctx):
        """
        Once closed, emitting (even through an emitter made before), attaching
        and making emitters raise EmitterClosedError.
        """
        async with uc.EmitterHub() as hub:
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
        assert hub.closed

        with pytest.raises(uc.EmitterClosedError, match="the EmitterHub is closed"):
            emitter.emit_nowait(TYPE)
        with pytest.raises(uc.EmitterClosedError):
            await emitter.emit(TYPE)
        with pytest.raises(uc.EmitterClosedError):
            hub.emitter(ctx)
        with pytest.raises(uc.EmitterClosedError):
            hub.attach("u-42", uc.RecordingSink())
        assert hub.stats().emitted == 1
        assert hub.stats().users == 0

    async def test_close_drains_everything_in_time(self, ctx):
        """
        Leaving the hub delivers everything buffered to a working sink.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(maxsize=10_000) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            for i in range(5_000):
                emitter.emit_nowait(TYPE, {"i": i})
            assert len(sink.events) == 0

        assert [e.seq for e in sink.events] == list(range(1, 5_001))
        assert hub.stats().delivered == 5_000

    async def test_close_deadline_dead_letters_the_rest(self, ctx):
        """
        A sink stalled past the drain deadline is cut at the deadline, and what
        it did not get goes to the dead-letter hook with reason "hub_closed".
        """
        letters = []
        sink = GateSink()
        hub = uc.EmitterHub(on_dead_letter=letters.append)
        async with hub:
            attachment = hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            for i in range(10):
                emitter.emit_nowait(TYPE, {"i": i})
            await sink.started.wait()
            started = anyio.current_time()
            await hub.aclose(drain_timeout=0.05)
            elapsed = anyio.current_time() - started
            await hub.aclose()  # again: returns at once

        assert 0.04 <= elapsed < 1.0
        assert [len(letter.events) for letter in letters] == [10]
        assert letters[0].reason == "hub_closed"
        assert letters[0].error is None
        assert attachment.reason == "hub_closed"
        assert not attachment.attached
        assert hub.stats().dead_lettered == 10
        with pytest.raises(ValueError, match="drain_timeout must be >= 0"):
            await hub.aclose(drain_timeout=-1)

    async def test_second_close_waits_for_the_first(self, ctx):
        """
        A second aclose() waits until the first one finished.
        """
        sink = GateSink()
        order = []
        async with uc.EmitterHub() as hub:
            hub.attach("u-42", sink)
            hub.emitter(ctx).emit_nowait(TYPE)
            await sink.started.wait()

            async def close(name, timeout):
                await hub.aclose(drain_timeout=timeout)
                order.append(name)

            async with anyio.create_task_group() as tg:
                tg.start_soon(close, "first", 0.05)
                await anyio.sleep(0.01)
                tg.start_soon(close, "second", 0)

        assert order == ["first", "second"]

    async def test_host_cancellation_still_drains(self, ctx):
        """
        When the code around the hub is cancelled, the hub still delivers what
        it buffered (bounded by the drain timeout) before it stops.
        """
        sink = uc.RecordingSink()
        with anyio.CancelScope() as scope:
            async with uc.EmitterHub() as hub:
                hub.attach("u-42", sink)
                for i in range(100):
                    hub.emitter(ctx).emit_nowait(TYPE, {"i": i})
                scope.cancel()
                await anyio.sleep(1)

        assert scope.cancelled_caught
        assert len(sink.events) == 100

    async def test_body_error_propagates(self, ctx):
        """
        An error in the hub's block propagates unchanged, after the drain.
        """
        sink = uc.RecordingSink()
        with pytest.raises(KeyError, match="boom"):
            async with uc.EmitterHub() as hub:
                hub.attach("u-42", sink)
                hub.emitter(ctx).emit_nowait(uc.AGENT_ERROR)
                raise KeyError("boom")

        assert [e.type for e in sink.events] == [uc.AGENT_ERROR]

    async def test_delivery_bug_is_logged_not_raised(self, ctx, monkeypatch, caplog):
        """
        An unexpected error inside a delivery task is logged, and does not take
        the hub (or the service around it) down.
        """

        async def broken(_a, _batch):
            raise RuntimeError("bug")

        letters = []
        async with uc.EmitterHub(on_dead_letter=letters.append) as hub:
            monkeypatch.setattr(hub, "_send", broken)
            attachment = hub.attach("u-42", uc.RecordingSink())
            hub.emitter(ctx).emit_nowait(TYPE)
            with anyio.fail_after(5):
                await attachment.wait()

        assert "the delivery task of" in caplog.text
        assert not attachment.attached
        assert attachment.reason == "failed"
        ((letter),) = letters
        assert (letter.reason, len(letter.events)) == ("failed", 1)
        assert isinstance(letter.error, RuntimeError)

    async def test_delivery_bug_with_nothing_pending(self, ctx, monkeypatch):
        """
        A delivery task that fails with nothing pending stops its sink, with
        reason "failed", and hands nothing to the dead-letter hook.
        """

        async def broken(_a):
            raise RuntimeError("bug")

        letters = []
        async with uc.EmitterHub(on_dead_letter=letters.append) as hub:
            monkeypatch.setattr(hub, "_sleep", broken)
            attachment = hub.attach("u-42", uc.RecordingSink())
            with anyio.fail_after(5):
                await attachment.wait()

        assert attachment.reason == "failed"
        assert letters == []


class TestEmitting:
    async def test_events_carry_the_context(self, ctx):
        """
        Events carry the ids of the context that emitted them, and one seq
        sequence per user, shared by the user's emitters.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub() as hub:
            hub.attach("u-42", sink)
            child = ctx.child(run_id="r-2")
            first = await hub.emitter(ctx).emit(uc.AGENT_STARTED, {"agent": "triage"})
            second = hub.emitter(child).emit_nowait(uc.TOOL_EXECUTING)
            with uc.bind(ctx):
                third = await hub.emitter().emit(uc.AGENT_COMPLETED)
            with anyio.fail_after(5):
                await sink.wait_for(3)

        assert sink.events == [first, second, third]
        assert [e.seq for e in sink.events] == [1, 2, 3]
        assert (first.run_id, second.run_id) == ("r-1", "r-2")
        assert second.request_id == child.request_id
        assert {e.user_id for e in sink.events} == {"u-42"}
        stream = first.event_id.rpartition("-")[0]
        assert [e.event_id for e in sink.events] == [f"{stream}-{i}" for i in (1, 2, 3)]
        assert len(stream) == 16

    async def test_emitter_rules(self, ctx, other_ctx):
        """
        Emitters come from a context, and refuse to serve another user's bound
        context, bad types and oversized data.
        """
        async with uc.EmitterHub(max_event_size=20) as hub:
            emitter = hub.emitter(ctx)
            assert emitter.ctx is ctx
            assert emitter.hub is hub
            assert emitter.user_id == "u-42"
            assert repr(emitter) == (
                f"<usercontext.Emitter(user_id='u-42', request_id={ctx.request_id!r})>"
            )
            with pytest.raises(uc.NoContextError):
                hub.emitter()
            with pytest.raises(TypeError, match=r"takes a usercontext\.UserContext"):
                hub.emitter("u-42")  # type: ignore[arg-type]
            with uc.bind(other_ctx), pytest.raises(uc.IsolationError, match="'u-99' is bound"):
                emitter.emit_nowait(TYPE)
            with uc.bind(ctx.child()):
                emitter.emit_nowait(TYPE)  # the same user: fine
            with pytest.raises(ValueError, match="over the hub's max_event_size of 20"):
                emitter.emit_nowait(TYPE, {"text": "x" * 50})
            with pytest.raises(ValueError, match="reserved"):
                emitter.emit_nowait(uc.EVENTS_MISSED)
            with pytest.raises(TypeError, match="must be a str"):
                emitter.emit_nowait(None)  # type: ignore[arg-type]
            assert hub.stats().emitted == 1

    async def test_no_sink_events_are_unrouted(self, ctx):
        """
        Events emitted while a user has no sink are counted as unrouted and kept
        for replay only.
        """
        async with uc.EmitterHub() as hub:
            for _ in range(3):
                hub.emitter(ctx).emit_nowait(TYPE)
            stats = hub.stats()

        assert (stats.emitted, stats.unrouted, stats.delivered, stats.users) == (3, 3, 0, 1)

    async def test_emit_nowait_is_plain_and_reentrant(self, ctx):
        """
        emit_nowait is a plain function that takes no lock: a sink may emit
        from inside its own send, and a cancelled scope does not stop it.
        """
        got = []
        async with uc.EmitterHub() as hub:
            emitter = hub.emitter(ctx)

            def callback(events):
                got.extend(e.type for e in events)
                if len(got) == 1:
                    emitter.emit_nowait("echo")

            hub.attach("u-42", uc.CallbackSink(callback))
            with anyio.CancelScope() as scope:  # noqa: ASYNC100  # no checkpoint is the point
                scope.cancel()
                emitter.emit_nowait(TYPE)
            await _until(lambda: len(got) == 2)

        assert not inspect.iscoroutinefunction(uc.Emitter.emit_nowait)
        assert got == [TYPE, "echo"]

    async def test_bad_timeout_is_refused_with_room(self, ctx):
        """
        A bad *timeout* is refused even when the event fits without waiting.
        """
        async with uc.EmitterHub() as hub:
            emitter = hub.emitter(ctx)
            with pytest.raises(ValueError, match="timeout must be >= 0"):
                await emitter.emit(TYPE, timeout=-1)
            with pytest.raises(TypeError, match="timeout must be a number"):
                await emitter.emit(TYPE, timeout="1")  # type: ignore[arg-type]
            await emitter.emit(TYPE, timeout=None)
            stats = hub.stats()

        assert stats.emitted == 1


class TestStalledSink:
    @pytest.mark.parametrize(
        ("overflow", "reason"), [("drop_oldest", "oldest"), ("drop_newest", "newest")]
    )
    async def test_drop_policies_hold_the_bound(self, ctx, overflow, reason):
        """
        Under a drop policy, 100,000 events to a stalled sink with a bound of
        1,000: emit_nowait never waits, the buffer never holds more than 1,000,
        and every event is delivered or dropped: dropped == emitted - delivered.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=1000, overflow=overflow) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE, {"i": 0})
            await sink.started.wait()  # one event in flight, stalled
            peak = 0
            for i in range(1, 100_000):
                emitter.emit_nowait(TYPE, {"i": i})
                if i % 997 == 0:
                    peak = max(peak, _pending(hub))
            stalled = hub.stats()
            sink.gate.set()
            await _until(lambda: _pending(hub) == 0)
            stats = hub.stats()

        assert sink.calls >= 2
        assert peak == stalled.depth_peak == stalled.sinks[0].pending == 1000
        assert stats.depth_peak == 1000
        assert stats.emitted == 100_000
        assert stats.delivered == len(sink.events) == 1000
        assert dict(stats.dropped) == {reason: 99_000}
        assert sum(stats.dropped.values()) == stats.emitted - stats.delivered
        seqs = [e.seq for e in sink.events]
        if overflow == "drop_oldest":
            assert seqs == [1, *range(99_002, 100_001)]
        else:
            assert seqs == list(range(1, 1001))
        assert stalled.sinks[0].dropped == 99_000
        assert stalled.sinks[0].lag_s >= 0

    async def test_block_waits_and_resumes(self, ctx):
        """
        Under "block", a producer of 100,000 events to a stalled sink waits at
        the bound of 1,000 and resumes when the sink does; nothing is dropped.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=1000, overflow="block", timeout=None) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            done = anyio.Event()

            async def produce():
                for i in range(100_000):
                    await emitter.emit(TYPE, {"i": i})
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                await _until(lambda: hub.stats().emitted == 1000)
                await anyio.sleep(0.02)
                blocked = hub.stats()
                assert not done.is_set()
                with pytest.raises(uc.EmitterFullError, match="overflow='block'"):
                    emitter.emit_nowait(TYPE)
                sink.gate.set()
            await _until(lambda: _pending(hub) == 0)
            stats = hub.stats()

        assert blocked.emitted == 1000
        assert blocked.sinks[0].pending == 1000
        assert stats.emitted == stats.delivered == 100_000
        assert stats.dropped == {}
        assert stats.depth_peak <= 1000
        assert stats.rejected == 1
        assert [e.seq for e in sink.events] == list(range(1, 100_001))

    async def test_error_policy_raises(self, ctx):
        """
        Under "error", an emit that finds the buffer full raises
        EmitterFullError at once, and counts a rejection.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=4, overflow="error") as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            for _ in range(3):
                await emitter.emit(TYPE)
            with pytest.raises(uc.EmitterFullError) as ei:
                await emitter.emit(TYPE)
            with pytest.raises(uc.EmitterFullError):
                emitter.emit_nowait(uc.AGENT_COMPLETED)
            sink.gate.set()

        e = ei.value
        assert (e.user_id, e.maxsize, e.overflow, e.critical, e.waited, e.timeout) == (
            "u-42",
            4,
            "error",
            False,
            0.0,
            None,
        )
        assert "holds its 4 events" in str(e)
        assert "detach the slow sink" in str(e)
        assert hub.stats().rejected == 2
        assert len(sink.events) == 4

    @pytest.mark.parametrize("overflow", ["block", "error"])
    async def test_bad_event_on_a_full_buffer_is_refused_as_such(self, ctx, overflow):
        """
        An event with a bad type or data is refused for what is wrong with it,
        at once, even when the buffer is full: it neither waits for room nor
        counts as rejected.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=2, overflow=overflow, timeout=5) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)
            with pytest.raises(TypeError, match="must be a str"):
                emitter.emit_nowait(7)  # type: ignore[arg-type]
            with anyio.fail_after(1), pytest.raises(TypeError, match="holds a bytes"):
                await emitter.emit(TYPE, {"b": b"raw"})
            stats = hub.stats()
            sink.gate.set()

        assert (stats.emitted, stats.rejected, stats.timed_out) == (2, 0, 0)

    async def test_waiting_emit_sends_the_data_it_was_given(self, ctx):
        """
        An emit that waits for room sends its data as it was when called, not
        as it is when room comes.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=None) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)
            data = {"step": 1}
            got = []

            async def produce():
                got.append(await emitter.emit(TYPE, data))

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                await anyio.sleep(0.01)
                data["step"] = 2
                sink.gate.set()

        assert got[0].data == {"step": 1}
        assert json.loads(sink.events[-1].json)["data"] == {"step": 1}

    async def test_block_timeout(self, ctx):
        """
        Under "block", an emit waits up to its timeout and then raises
        EmitterTimeoutError; timeout=0 raises at once; the wait changes nothing.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=0.05) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)
            with pytest.raises(uc.EmitterTimeoutError) as ei:
                await emitter.emit(TYPE)
            with pytest.raises(uc.EmitterFullError) as now:
                await emitter.emit(TYPE, timeout=0)
            with pytest.raises(ValueError, match="timeout must be >= 0"):
                await emitter.emit(TYPE, timeout=-1)
            sink.gate.set()
            stats = hub.stats()

        assert ei.value.waited >= 0.04
        assert ei.value.timeout == 0.05
        assert isinstance(ei.value, TimeoutError)
        assert "Waited" in str(ei.value)
        assert not isinstance(now.value, uc.EmitterTimeoutError)
        assert (stats.emitted, stats.timed_out, stats.rejected) == (2, 1, 1)
        assert stats.sinks[0].pending == 2
        assert hub._streams == {}

    async def test_waiters_are_served_in_order(self, ctx):
        """
        Producers blocked on a full buffer get room first come, first served,
        and a waiter that gives up passes its turn on.
        """
        sink = GateSink()
        order = []
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=None) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)

            async def produce(name, timeout=None):
                try:
                    event = await emitter.emit(TYPE, {"name": name}, timeout=timeout)
                except uc.EmitterTimeoutError:
                    order.append(f"{name} gave up")
                else:
                    order.append((name, event.seq))

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce, "a", 0.02)
                await anyio.sleep(0.005)
                for name in "bcd":
                    tg.start_soon(produce, name)
                    await anyio.sleep(0.005)
                await anyio.sleep(0.05)
                assert order == ["a gave up"]
                sink.gate.set()

        assert order == ["a gave up", ("b", 3), ("c", 4), ("d", 5)]

    async def test_cancelled_waiter_passes_its_turn(self, ctx):
        """
        A waiter cancelled at the head of the line wakes the next one, even
        when the room it was woken for is the last that will come: here the
        sink is detached (one wake, for the head) as the head is cancelled.
        """
        sink = GateSink()
        got = []
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=None) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    first = anyio.CancelScope()

                    async def cancelled():
                        with first:
                            await emitter.emit(TYPE, {"n": "first"})

                    tg.start_soon(cancelled)

                    async def second():
                        got.append(await emitter.emit(TYPE, {"n": "second"}))

                    await anyio.sleep(0.01)
                    tg.start_soon(second)
                    await anyio.sleep(0.01)
                    first.cancel()
                    hub.detach("u-42", sink)
            sink.gate.set()

        assert [e.data["n"] for e in got] == ["second"]
        assert hub.stats().emitted == 3

    async def test_no_overtaking_while_producers_wait(self, ctx):
        """
        When room appears while a producer waits, a new emit does not take it
        first: emit_nowait raises, and the waiting producer goes first.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=None) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)
            got = []

            async def produce():
                got.append(await emitter.emit(TYPE, {"n": "waiting"}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                await anyio.sleep(0.01)
                hub.detach("u-42", sink)  # room for everyone, and the waiter is woken
                with pytest.raises(uc.EmitterFullError):
                    emitter.emit_nowait(TYPE, {"n": "late"})
            late = emitter.emit_nowait(TYPE, {"n": "late"})
            sink.gate.set()

        assert got[0].seq == 3
        assert late.seq == 4

    async def test_close_wakes_waiters(self, ctx):
        """
        A producer waiting for room when the hub closes gets EmitterClosedError.
        """
        sink = GateSink()
        errors = []
        hub = uc.EmitterHub(maxsize=2, overflow="block", timeout=None, drain_timeout=0.01)
        async with hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)

            async def produce():
                try:
                    await emitter.emit(TYPE)
                except uc.EmitterClosedError as e:
                    errors.append(e)

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                await anyio.sleep(0.01)
                await hub.aclose()

        assert len(errors) == 1


class TestCritical:
    async def test_critical_events_survive_drop_oldest(self, ctx):
        """
        Under drop_oldest, critical events in a full buffer are never dropped:
        the oldest non-critical event goes instead.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=100, overflow="drop_oldest") as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(uc.AGENT_STARTED)
            await sink.started.wait()
            criticals = []
            for i in range(5_000):
                if i % 250 == 0:
                    criticals.append(emitter.emit_nowait(uc.AGENT_COMPLETED, {"i": i}).seq)
                else:
                    emitter.emit_nowait(TYPE, {"i": i})
            criticals.append(emitter.emit_nowait(uc.AGENT_ERROR).seq)
            sink.gate.set()
            await _until(lambda: _pending(hub) == 0)
            stats = hub.stats()

        delivered = [e.seq for e in sink.events if e.type in (uc.AGENT_COMPLETED, uc.AGENT_ERROR)]
        assert delivered == criticals
        assert len(criticals) == 21
        assert stats.delivered == 100
        assert stats.dropped["oldest"] == 5_001 - 100 + 1  # the first event was delivered

    async def test_bad_event_on_a_full_buffer_drops_nothing(self, ctx):
        """
        An event refused for its type or size while the buffer is full is
        refused before anything is dropped to make room for it.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=2, max_event_size=10) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)
            with pytest.raises(TypeError, match="must be a str"):
                emitter.emit_nowait(7)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="max_event_size"):
                emitter.emit_nowait(TYPE, {"text": "x" * 20})
            stats = hub.stats()
            sink.gate.set()

        assert (stats.emitted, stats.dropped) == (2, {})
        assert [e.seq for e in sink.events] == [1, 2]

    async def test_critical_event_evicts_newest_under_drop_newest(self, ctx):
        """
        Under drop_newest, a critical event that finds the buffer full drops
        the newest non-critical event instead of itself.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=4, overflow="drop_newest", replay=0) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await sink.started.wait()
            for _ in range(5):
                emitter.emit_nowait(TYPE)
            done = emitter.emit_nowait(uc.AGENT_COMPLETED)
            sink.gate.set()
            await _until(lambda: _pending(hub) == 0)

        assert [e.seq for e in sink.events] == [1, 2, 3, done.seq]
        assert hub.stats().dropped == {"newest": 3}  # seqs 5 and 6 refused, 4 evicted

    @pytest.mark.parametrize("overflow", ["drop_oldest", "drop_newest"])
    async def test_buffer_full_of_critical_events(self, ctx, overflow):
        """
        When a buffer holds only critical events, a new critical event waits
        for room (or emit_nowait raises), and a non-critical one is dropped.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=4, overflow=overflow, timeout=5) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(uc.AGENT_COMPLETED)
            await sink.started.wait()
            for _ in range(3):
                emitter.emit_nowait(uc.AGENT_ERROR)
            with pytest.raises(uc.EmitterFullError) as ei:
                emitter.emit_nowait(uc.AGENT_ERROR)
            emitter.emit_nowait(TYPE)  # dropped
            got = []

            async def wait_for_room():
                got.append(await emitter.emit(uc.AGENT_COMPLETED))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_room)
                tg.start_soon(wait_for_room)
                await anyio.sleep(0.02)
                assert got == []
                emitter.emit_nowait(TYPE)  # dropped too: critical events wait ahead
                sink.gate.set()
            await _until(lambda: _pending(hub) == 0)

        assert ei.value.critical
        assert "critical events, which are never dropped" in str(ei.value)
        assert hub.stats().unrouted == 0
        done, error = uc.AGENT_COMPLETED, uc.AGENT_ERROR
        assert [e.type for e in sink.events] == [done, error, error, error, done, done]
        assert hub.stats().dropped == {"newest": 2}
        assert hub.stats().rejected == 1


class TestCriticalWaiters:
    async def test_events_pass_a_critical_waiter_when_room_appears(self, ctx):
        """
        A non-critical event is not held behind a critical event waiting for
        room: with the sink gone, it is emitted (unrouted) at once.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=2, replay=0) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(uc.AGENT_COMPLETED)
            await sink.started.wait()
            emitter.emit_nowait(uc.AGENT_COMPLETED)
            got = []

            async def wait_for_room():
                got.append(await emitter.emit(uc.AGENT_ERROR))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_room)
                await anyio.sleep(0.01)
                hub.detach("u-42", sink)
                passing = emitter.emit_nowait(TYPE)
            sink.gate.set()
            stats = hub.stats()

        assert (passing.seq, got[0].seq) == (3, 4)
        assert stats.unrouted == 2


class TestSinksAreIndependent:
    async def test_slow_sink_delays_nobody_else(self, ctx, other_ctx):
        """
        A stalled connection neither delays another connection of the same
        user nor another user; each connection gets every event, in order.
        """
        stalled = GateSink()
        fast, other = uc.RecordingSink(), uc.RecordingSink()
        async with uc.EmitterHub(maxsize=50) as hub:
            hub.attach("u-42", stalled)
            hub.attach("u-42", fast)
            hub.attach("u-99", other)
            mine, theirs = hub.emitter(ctx), hub.emitter(other_ctx)
            for i in range(200):
                mine.emit_nowait(TYPE, {"i": i})
                theirs.emit_nowait(TYPE, {"i": i})
                if i % 20 == 0:
                    await anyio.lowlevel.checkpoint()
            with anyio.fail_after(5):
                await fast.wait_for(200)
                await other.wait_for(200)
            stats = hub.stats(top=1)
            stalled.gate.set()

        assert [e.seq for e in fast.events] == list(range(1, 201))
        assert [e.seq for e in other.events] == list(range(1, 201))
        assert {e.user_id for e in other.events} == {"u-99"}
        assert {e.user_id for e in fast.events} == {"u-42"}
        assert stats.attached == 3
        assert len(stats.sinks) == 1
        assert stats.sinks[0].sink == repr(stalled)
        assert stats.sinks[0].pending == 50


class TestRetries:
    async def test_failing_sends_are_retried(self, ctx):
        """
        A send that fails is retried, with the same batch, until it succeeds.
        """
        sink = FlakySink(failures=2)
        retry = uc.Retry(attempts=3, backoff=0.001)
        async with uc.EmitterHub(retry=retry) as hub:
            hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            for i in range(5):
                emitter.emit_nowait(TYPE, {"i": i})
            with anyio.fail_after(5):
                await sink.wait_for(5)
            stats = hub.stats()

        assert [e.seq for e in sink.events] == [1, 2, 3, 4, 5]
        assert sink.attempts == 3
        assert (stats.failed, stats.retried, stats.delivered, stats.dead_lettered) == (2, 2, 5, 0)

    @pytest.mark.parametrize("hook_kind", ["sync", "async"])
    async def test_sink_that_keeps_failing_is_dead_lettered(self, ctx, hook_kind):
        """
        A sink whose every try fails is detached, and its undelivered events,
        the batch in flight first, go to the dead-letter hook.
        """
        letters = []

        async def async_hook(letter):
            await anyio.lowlevel.checkpoint()
            letters.append(letter)

        hook = letters.append if hook_kind == "sync" else async_hook
        sink = FlakySink(failures=10**6)
        retry = uc.Retry(attempts=3, backoff=0, jitter=False)
        async with uc.EmitterHub(retry=retry, on_dead_letter=hook) as hub:
            attachment = hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            for i in range(3):
                emitter.emit_nowait(TYPE, {"i": i})
            await anyio.lowlevel.checkpoint()
            for i in range(3, 5):
                emitter.emit_nowait(TYPE, {"i": i})
            with anyio.fail_after(5):
                await attachment.wait()
            emitter.emit_nowait(TYPE)  # no sink any more: unrouted
            stats = hub.stats()

        (letter,) = letters
        assert letter.reason == "failed"
        assert letter.user_id == "u-42"
        assert letter.sink is sink
        assert isinstance(letter.error, OSError)
        assert [e.seq for e in letter.events] == [1, 2, 3, 4, 5]
        assert sink.attempts == 3
        assert attachment.reason == "failed"
        assert (stats.failed, stats.retried, stats.dead_lettered) == (3, 2, 5)
        assert (stats.attached, stats.unrouted) == (0, 1)

    async def test_closed_sink_is_not_retried(self, ctx):
        """
        A sink that raises SinkClosedError (or anyio's closed-stream errors) is
        given up at once, without retries.
        """
        letters = []
        sinks = [
            FlakySink(failures=1, error=uc.SinkClosedError("gone")),
            FlakySink(failures=1, error=anyio.BrokenResourceError()),
        ]
        async with uc.EmitterHub(on_dead_letter=letters.append) as hub:
            attachments = [hub.attach("u-42", sink) for sink in sinks]
            hub.emitter(ctx).emit_nowait(TYPE)
            with anyio.fail_after(5):
                for attachment in attachments:
                    await attachment.wait()
                    await attachment.wait()  # ended: returns at once

        assert [letter.reason for letter in letters] == ["sink_closed"] * 2
        assert [s.attempts for s in sinks] == [1, 1]
        assert hub.stats().retried == 0

    async def test_send_timeout_counts_as_failure(self, ctx):
        """
        A send that hangs past the retry timeout is cut and retried.
        """
        calls = []

        async def hang_once(events):
            calls.append(len(events))
            if len(calls) == 1:
                await anyio.sleep(10)

        retry = uc.Retry(attempts=2, backoff=0, timeout=0.02)
        async with uc.EmitterHub(retry=retry) as hub:
            hub.attach("u-42", uc.CallbackSink(hang_once))
            hub.emitter(ctx).emit_nowait(TYPE)
            await _until(lambda: len(calls) == 2)
            stats = hub.stats()

        assert (stats.failed, stats.retried, stats.delivered) == (1, 1, 1)

    async def test_without_send_timeout(self, ctx):
        """
        With Retry(timeout=None), sends are not cut.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(retry=uc.Retry(timeout=None)) as hub:
            hub.attach("u-42", sink)
            hub.emitter(ctx).emit_nowait(TYPE)
            with anyio.fail_after(5):
                await sink.wait_for(1)

    async def test_dead_letters_are_never_silent(self, ctx, caplog):
        """
        Without a hook, dead letters are logged as a warning; a hook that
        raises is logged too.
        """

        def bad_hook(_letter):
            raise RuntimeError("hook bug")

        retry = uc.Retry(attempts=1)
        with caplog.at_level(logging.WARNING, logger="usercontext"):
            for hook in (None, bad_hook):
                async with uc.EmitterHub(retry=retry, on_dead_letter=hook) as hub:
                    attachment = hub.attach("u-42", FlakySink(failures=1))
                    hub.emitter(ctx).emit_nowait(TYPE)
                    with anyio.fail_after(5):
                        await attachment.wait()

        assert "1 event(s) of user 'u-42' could not be delivered" in caplog.text
        assert "OSError: connection reset" in caplog.text
        assert "the on_dead_letter hook failed for user 'u-42'" in caplog.text

    async def test_sink_cannot_change_the_batch(self, ctx):
        """
        A sink cannot empty the batch it is given: a retry, and the dead
        letter, still hold every event of it.
        """
        letters = []
        seen = []

        async def consuming(events):
            seen.append(len(events))
            with contextlib.suppress(AttributeError):
                events.clear()  # a sink that consumes its batch
            raise OSError("connection reset")

        retry = uc.Retry(attempts=2, backoff=0)
        async with uc.EmitterHub(retry=retry, on_dead_letter=letters.append) as hub:
            attachment = hub.attach("u-42", uc.CallbackSink(consuming))
            for _ in range(3):
                hub.emitter(ctx).emit_nowait(TYPE)
            with anyio.fail_after(5):
                await attachment.wait()

        assert seen == [3, 3]
        assert [len(letter.events) for letter in letters] == [3]
        assert hub.stats().dead_lettered == 3

    async def test_slow_dead_letter_hook_is_reported(self, ctx, caplog):
        """
        An async dead-letter hook that outlasts its time limit is cancelled,
        and that is logged as a warning: the events are not lost silently.
        """

        async def slow_hook(_letter):
            await anyio.sleep(10)

        retry = uc.Retry(attempts=1, timeout=0.02)
        with caplog.at_level(logging.WARNING, logger="usercontext"):
            async with uc.EmitterHub(retry=retry, on_dead_letter=slow_hook) as hub:
                attachment = hub.attach("u-42", FlakySink(failures=1))
                hub.emitter(ctx).emit_nowait(TYPE)
                with anyio.fail_after(5):
                    await attachment.wait()

        assert "on_dead_letter hook took longer than 0.02 s for 1 event(s)" in caplog.text


class TestReplay:
    async def _hub_with_history(self, hub, ctx, n):
        emitter = hub.emitter(ctx)
        return [emitter.emit_nowait(TYPE, {"i": i}) for i in range(n)]

    async def test_resume_within_the_window(self, ctx):
        """
        A sink attached with last_seq first gets the held events after it, then
        live ones, without a notice.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(replay=10) as hub:
            await self._hub_with_history(hub, ctx, 8)
            attachment = hub.attach("u-42", sink, last_seq=5)
            hub.emitter(ctx).emit_nowait(TYPE)
            with anyio.fail_after(5):
                await sink.wait_for(4)
            stats = hub.stats()

        assert [e.seq for e in sink.events] == [6, 7, 8, 9]
        assert (attachment.replayed, attachment.missed) == (3, 0)
        assert (stats.replayed, stats.missed, stats.delivered) == (3, 0, 4)

    async def test_resume_too_old(self, ctx):
        """
        When events after last_seq left the history, the sink is first told how
        many it missed, with a notice whose seq is the last one missed.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(replay=5) as hub:
            events = await self._hub_with_history(hub, ctx, 20)
            attachment = hub.attach("u-42", sink, last_seq=3)
            with anyio.fail_after(5):
                await sink.wait_for(6)
            stats = hub.stats()

        notice, *rest = sink.events
        assert notice.type == uc.EVENTS_MISSED
        assert notice.seq == 15
        assert dict(notice.data) == {
            "missed": 12,
            "after_seq": 3,
            "stream_id": events[0].event_id.rpartition("-")[0],
        }
        assert notice.event_id == events[14].event_id
        assert [e.seq for e in rest] == [16, 17, 18, 19, 20]
        assert (attachment.replayed, attachment.missed) == (5, 12)
        assert (stats.missed, stats.delivered) == (12, 5)  # the notice is not an event

    async def test_resume_from_zero_and_by_event_id(self, ctx):
        """
        last_seq=0 gets everything held; an event id of the same stream
        resumes exactly after it.
        """
        first, second = uc.RecordingSink(), uc.RecordingSink()
        async with uc.EmitterHub(replay=10) as hub:
            events = await self._hub_with_history(hub, ctx, 4)
            hub.attach("u-42", first, last_seq=0)
            hub.attach("u-42", second, last_seq=f" {events[1].event_id} ")
            with anyio.fail_after(5):
                await first.wait_for(4)
                await second.wait_for(2)

        assert [e.seq for e in first.events] == [1, 2, 3, 4]
        assert [e.seq for e in second.events] == [3, 4]

    @pytest.mark.parametrize("last_seq", [99, "0123456789abcdef-2"])
    async def test_resume_after_the_stream_restarted(self, ctx, last_seq):
        """
        A last_seq past the stream's end, or an event id of another stream,
        means the stream was started anew: the sink gets a notice with an
        unknown count, then everything held.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(replay=10) as hub:
            await self._hub_with_history(hub, ctx, 3)
            attachment = hub.attach("u-42", sink, last_seq=last_seq)
            with anyio.fail_after(5):
                await sink.wait_for(4)

        notice, *rest = sink.events
        assert (notice.type, notice.seq, notice.data["missed"]) == (uc.EVENTS_MISSED, 0, None)
        assert [e.seq for e in rest] == [1, 2, 3]
        assert attachment.missed is None

    async def test_resume_without_history(self, ctx):
        """
        With replay=0, a resuming sink is told how many it missed, and gets
        live events only.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(replay=0) as hub:
            await self._hub_with_history(hub, ctx, 4)
            hub.attach("u-42", sink, last_seq=1)
            hub.emitter(ctx).emit_nowait(TYPE)
            with anyio.fail_after(5):
                await sink.wait_for(2)

        assert [(e.type, e.seq) for e in sink.events] == [(uc.EVENTS_MISSED, 4), (TYPE, 5)]
        assert sink.events[0].data["missed"] == 3

    @pytest.mark.parametrize(("last_seq", "missed"), [(0, 0), ("0123456789abcdef-0", None)])
    async def test_replay_longer_than_the_buffer_is_delivered_whole(self, ctx, last_seq, missed):
        """
        A replay longer than the buffer still delivers every event the history
        holds: none is reported missed. While the sink holds more than the
        bound, emits find its buffer full.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(maxsize=4, replay=10, overflow="block") as hub:
            await self._hub_with_history(hub, ctx, 10)
            attachment = hub.attach("u-42", sink, last_seq=last_seq)
            with pytest.raises(uc.EmitterFullError):
                hub.emitter(ctx).emit_nowait(TYPE)
            live = await hub.emitter(ctx).emit(TYPE)
            with anyio.fail_after(5):
                await sink.wait_for(11 + (missed is None))
            stats = hub.stats()

        events = [e for e in sink.events if e.type != uc.EVENTS_MISSED]
        assert [e.seq for e in events] == [*range(1, 11), live.seq]
        assert (attachment.replayed, attachment.missed) == (10, missed)
        assert (stats.missed, stats.dropped) == (0, {})
        if missed is None:
            assert sink.events[0].type == uc.EVENTS_MISSED

    async def test_notice_survives_drop_oldest(self, ctx):
        """
        Under drop_oldest, the notice of missed events is never dropped to make
        room, and is not counted as a dropped event: for the resumed sink,
        delivered + dropped equals the events routed to it.
        """
        sink = GateSink()
        async with uc.EmitterHub(maxsize=4, replay=3) as hub:
            await self._hub_with_history(hub, ctx, 10)
            attachment = hub.attach("u-42", sink, last_seq=1)
            emitter = hub.emitter(ctx)
            for _ in range(3):  # before the delivery task runs: the buffer is full
                emitter.emit_nowait(TYPE)
            sink.gate.set()
            await _until(lambda: _pending(hub) == 0)
            stats = hub.stats()

        notice, *rest = sink.events
        assert (notice.type, notice.data["missed"]) == (uc.EVENTS_MISSED, 6)
        assert [e.seq for e in rest] == [11, 12, 13]
        assert (attachment.replayed, attachment.missed) == (3, 6)
        assert dict(stats.dropped) == {"oldest": 3}
        assert stats.delivered + stats.dropped["oldest"] == attachment.replayed + 3

    async def test_notice_is_not_counted_as_an_event(self, ctx):
        """
        A pending notice of missed events is not counted, nor handed over, as
        an event: not by detach, nor by the dead-letter hook.
        """
        letters = []
        retry = uc.Retry(attempts=1)
        async with uc.EmitterHub(replay=2, retry=retry, on_dead_letter=letters.append) as hub:
            await self._hub_with_history(hub, ctx, 5)
            stalled = GateSink()
            detached = hub.attach("u-42", stalled, last_seq=1)
            await stalled.started.wait()  # the notice and 2 events are being sent
            dropped = detached.detach()
            failing = hub.attach("u-42", FlakySink(failures=1), last_seq=1)
            with anyio.fail_after(5):
                await failing.wait()
            stats = hub.stats()

        assert dropped == 2
        assert dict(stats.dropped) == {"detached": 2}
        (letter,) = letters
        assert [e.seq for e in letter.events] == [4, 5]
        assert stats.dead_lettered == 2

    async def test_only_a_notice_pending_at_close(self, ctx):
        """
        When the hub's drain deadline cuts a sink that only has a notice
        pending, nothing of the stream is lost: no dead letter is handed over.
        """
        letters = []
        sink = GateSink()
        async with uc.EmitterHub(replay=0, on_dead_letter=letters.append) as hub:
            await self._hub_with_history(hub, ctx, 3)
            attachment = hub.attach("u-42", sink, last_seq=1)
            await sink.started.wait()
            await hub.aclose(drain_timeout=0.01)

        assert letters == []
        assert attachment.reason == "hub_closed"
        assert hub.stats().dead_lettered == 0

    @pytest.mark.parametrize(
        ("last_seq", "error"),
        [(-1, ValueError), ("abc", ValueError), ("12-3", ValueError), (True, TypeError)],
    )
    def test_bad_last_seq(self, last_seq, error):
        """
        last_seq must be a non-negative int or an event id.
        """
        with pytest.raises(error, match="last_seq must be a non-negative int or an event id"):
            _parse_last_seq(last_seq)

    def test_parse_last_seq(self):
        """
        Plain numbers, in int or str form, and event ids are understood.
        """
        assert _parse_last_seq(7) == (None, 7)
        assert _parse_last_seq("7") == (None, 7)
        assert _parse_last_seq("0123456789abcdef-7") == ("0123456789abcdef", 7)


class TestAttach:
    async def test_attach_rules(self, ctx, other_ctx):
        """
        attach refuses what is not a sink, a sink attached already or to
        another user, a bad user id, a bad last_seq, and another user's bound
        context.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub() as hub:
            hub.attach("u-42", sink)
            with pytest.raises(TypeError, match="it has no send"):
                hub.attach("u-42", object())  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="attached to user 'u-42' already"):
                hub.attach("u-42", sink)
            with pytest.raises(uc.IsolationError, match="one sink \\(one connection\\)"):
                hub.attach("u-99", sink)
            with pytest.raises(ValueError, match="non-empty str"):
                hub.attach("", uc.RecordingSink())
            with pytest.raises(TypeError, match="non-empty str"):
                hub.attach(42, uc.RecordingSink())  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="last_seq"):
                hub.attach("u-42", uc.RecordingSink(), last_seq="x")
            with uc.bind(other_ctx), pytest.raises(uc.IsolationError, match="another user's"):
                hub.attach("u-42", uc.RecordingSink())
            with uc.bind(ctx):
                hub.attach("u-42", uc.RecordingSink())
            assert hub.stats().attached == 2

    async def test_detach(self, ctx):
        """
        detach stops delivery at once, counts what the sink will not get as
        dropped ("detached"), and is safe to repeat.
        """
        sink = GateSink()
        async with uc.EmitterHub() as hub:
            attachment = hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            for _ in range(3):
                emitter.emit_nowait(TYPE)
            await sink.started.wait()
            emitter.emit_nowait(TYPE)
            assert hub.detach("u-99", sink) == 0  # another user's: not attached there
            assert hub.detach("u-42", sink) == 4
            assert attachment.detach() == 0
            assert hub.detach("u-42", uc.RecordingSink()) == 0
            with anyio.fail_after(5):
                await attachment.wait()
            emitter.emit_nowait(TYPE)
            sink.gate.set()
            await anyio.sleep(0.01)
            stats = hub.stats()

        assert sink.events == []
        assert attachment.reason == "detached"
        assert not attachment.attached
        assert dict(stats.dropped) == {"detached": 4}
        assert stats.unrouted == 1
        assert "detached" in repr(attachment)

    async def test_depth_peak_counts_sinks_that_ended_behind(self, ctx):
        """
        The depth peak counts the events pending for a sink that stopped before
        it got them (detached here).
        """
        sink = GateSink()
        async with uc.EmitterHub() as hub:
            attachment = hub.attach("u-42", sink)
            emitter = hub.emitter(ctx)
            for _ in range(10):
                emitter.emit_nowait(TYPE)
            await sink.started.wait()
            for _ in range(5):
                emitter.emit_nowait(TYPE)
            attachment.detach()
            with anyio.fail_after(5):
                await attachment.wait()
            stats = hub.stats()

        assert (stats.depth_peak, stats.attached) == (15, 0)

    async def test_detached_before_delivery_starts(self, ctx):
        """
        A sink detached before its delivery task ran gets nothing, even a
        replay, and even if its send never yields.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub() as hub:
            await TestReplay()._hub_with_history(hub, ctx, 3)
            attachment = hub.attach("u-42", sink, last_seq=0)
            assert attachment.detach() == 3
            await anyio.sleep(0.01)

        assert sink.events == []
        assert hub.stats().dropped == {"detached": 3}

    async def test_many_wait_for_one_attachment(self, ctx):
        """
        Several tasks may wait for the same attachment to end.
        """
        ended = []
        async with uc.EmitterHub() as hub:
            attachment = hub.attach("u-42", uc.RecordingSink())

            async def wait():
                await attachment.wait()
                ended.append(True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                tg.start_soon(wait)
                await anyio.sleep(0.01)
                attachment.detach()

        assert ended == [True, True]

    async def test_waking_a_cancelled_waiter(self):
        """
        Waking a delivery task whose waiter was already cancelled does nothing.
        """

        class Done:
            def done(self):
                return True

            def set_result(self, _):  # pragma: no cover - must not be called
                raise AssertionError

        a = _emitter._Attached(_emitter._Stream("u-42", 0, 0.0), uc.RecordingSink())
        a.waiter = Done()

        a.wake()

        assert a.waiter is None

    async def test_attachment_as_context_manager(self, ctx):
        """
        Leaving `with` or `async with` an attachment detaches the sink, which
        can then be attached again.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub() as hub:
            with hub.attach("u-42", sink) as attachment:
                assert attachment.attached
                assert "attached" in repr(attachment)
                assert (attachment.user_id, attachment.sink) == ("u-42", sink)
            assert not attachment.attached
            async with hub.attach("u-42", sink) as again:
                assert again.attached
                assert again.reason is None
            assert not again.attached


class TestIdleUsers:
    async def test_idle_users_are_dropped(self, ctx):
        """
        A user without sinks who emitted nothing for the TTL leaves no state;
        their next emit starts a new stream.
        """
        async with uc.EmitterHub(idle_ttl=0.02) as hub:
            emitter = hub.emitter(ctx)
            first = emitter.emit_nowait(TYPE)
            await _until(lambda: hub.stats().users == 0)
            again = emitter.emit_nowait(TYPE)

        assert (first.seq, again.seq) == (1, 1)
        assert first.event_id.rpartition("-")[0] != again.event_id.rpartition("-")[0]

    async def test_active_and_attached_users_are_kept(self, ctx, other_ctx):
        """
        Users with a sink are never dropped, users who keep emitting are kept,
        and a user whose last sink left is dropped once idle.
        """
        sink = uc.RecordingSink()
        async with uc.EmitterHub(idle_ttl=0.05) as hub:
            attachment = hub.attach("u-42", sink)
            busy = hub.emitter(other_ctx)
            for _ in range(10):
                busy.emit_nowait(TYPE)
                await anyio.sleep(0.015)
            assert set(hub._streams) == {"u-42", "u-99"}
            attachment.detach()
            await _until(lambda: hub.stats().users == 0)

    async def test_many_distinct_users_leave_nothing(self):
        """
        10,000 distinct users who emitted once leave no state after the TTL.
        """
        async with uc.EmitterHub(idle_ttl=0.05) as hub:
            for i in range(10_000):
                ctx = uc.UserContext(user_id=f"user-{i}", thread_id="t", run_id="r")
                hub.emitter(ctx).emit_nowait(TYPE, {"i": i})
            assert hub.stats().users == 10_000
            await _until(lambda: hub.stats().users == 0)
            assert hub._idle == {}

    async def test_sweep_is_one_pass_and_frees_the_tables(self, ctx, monkeypatch):
        """
        A sweep reads the idle table once, however many users it drops
        (restarting from the front after each deletion rescans the deleted
        slots: quadratic, minutes for a million users), and a sweep that drops
        most users gives their tables' memory back.
        """

        class Counting(dict):
            scans = 0

            def items(self):
                Counting.scans += 1
                return super().items()

        n = 3_000  # more than _COMPACT_AFTER
        async with uc.EmitterHub(idle_ttl=3600) as hub:
            hub.attach("u-42", uc.RecordingSink())
            for i in range(n):
                user = uc.UserContext(user_id=f"user-{i}", thread_id="t", run_id="r")
                hub.emitter(user).emit_nowait(TYPE)
            hub.emitter(ctx).emit_nowait(TYPE)
            full = sys.getsizeof(hub._streams)
            hub._idle = Counting(hub._idle)
            later = _emitter._time() + 7200
            monkeypatch.setattr(_emitter, "_time", lambda: later)
            await hub._sweep()
            assert Counting.scans == 1
            assert list(hub._streams) == ["u-42"]
            assert hub._idle == {}
            assert sys.getsizeof(hub._streams) < full / 50
            assert sys.getsizeof(hub._idle) < full / 50

    async def test_sweep_skips_users_that_attached_meanwhile(self, monkeypatch):
        """
        A long sweep lets other tasks run, and does not drop a user who
        attached a sink meanwhile.
        """
        n = 10_001
        async with uc.EmitterHub(idle_ttl=3600) as hub:
            for i in range(n):
                user = uc.UserContext(user_id=f"user-{i}", thread_id="t", run_id="r")
                hub.emitter(user).emit_nowait(TYPE)
            later = _emitter._time() + 7200
            monkeypatch.setattr(_emitter, "_time", lambda: later)

            async def attach_while_sweeping():
                while len(hub._streams) == n:
                    await anyio.lowlevel.checkpoint()
                hub.attach("user-10000", uc.RecordingSink())

            async with anyio.create_task_group() as tg:
                tg.start_soon(attach_while_sweeping)
                tg.start_soon(hub._sweep)
            assert list(hub._streams) == ["user-10000"]


class TestManyUsers:
    async def test_flaky_connections(self):  # noqa: C901  # one scenario, its actors inline
        """
        50 users x 1,000 events, with sends failing, hanging (then cut) and
        connections closing and reopening with last_seq at random: per user,
        after dropping repeats by seq, every event arrives, in order, and no
        event reaches another user's connection.
        """
        users, per_user = 50, 1000
        rng = random.Random(5)
        retry = uc.Retry(attempts=3, backoff=0.001, timeout=0.02)
        letters: list[uc.DeadLetter] = []
        hub = uc.EmitterHub(
            maxsize=200,
            overflow="block",
            replay=per_user,
            retry=retry,
            on_dead_letter=letters.append,
        )
        received: dict[str, dict[int, uc.Event]] = {f"user-{u}": {} for u in range(users)}
        connections: list[Connection] = []

        class Connection:
            def __init__(self, user_id):
                self.user_id = user_id
                self.seqs = []
                self.foreign = 0

            async def send(self, events):
                roll = rng.random()
                if roll < 0.03:
                    await anyio.sleep(1)  # hangs: cut by the send timeout
                keep = events if roll >= 0.08 else events[: len(events) // 2]
                for e in keep:
                    self.seqs.append(e.seq)
                    if e.user_id != self.user_id:
                        self.foreign += 1
                    received[self.user_id].setdefault(e.seq, e)
                if roll < 0.06:
                    raise OSError("flaky")
                if roll < 0.08:
                    raise uc.SinkClosedError("dropped")

        async def connect(user_id):
            last = 0
            while True:
                conn = Connection(user_id)
                connections.append(conn)
                with hub.attach(user_id, conn, last_seq=last) as attachment:
                    with anyio.move_on_after(rng.uniform(0.001, 0.03)):
                        await attachment.wait()
                seen = received[user_id]
                last = max(seen) if seen else 0
                if len(seen) == per_user:
                    return

        async def produce(user_id):
            ctx = uc.UserContext(user_id=user_id, thread_id="t", run_id="r")
            emitter = hub.emitter(ctx)
            for i in range(per_user):
                await emitter.emit(TYPE, {"i": i})
                if i % 50 == 0:
                    await anyio.lowlevel.checkpoint()

        async with hub:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for user_id in received:
                        tg.start_soon(connect, user_id)
                        tg.start_soon(produce, user_id)
            stats = hub.stats()

        for user_id, events in received.items():
            assert sorted(events) == list(range(1, per_user + 1)), user_id
            assert all(e.data["i"] == e.seq - 1 for e in events.values())
        for conn in connections:
            assert conn.foreign == 0
            first_seen = list(dict.fromkeys(conn.seqs))
            assert first_seen == sorted(first_seen)
            if first_seen:
                assert first_seen == list(range(first_seen[0], first_seen[-1] + 1))
        assert stats.emitted == users * per_user
        assert stats.failed > 0
        assert stats.retried > 0
        assert stats.missed == 0
        assert len(connections) > users
        assert {letter.reason for letter in letters} <= {"sink_closed", "failed"}
        assert all(e.user_id == letter.user_id for letter in letters for e in letter.events)
