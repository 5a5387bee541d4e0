"""
Tests of `usercontext.Emitter`: what an emitted event carries, and the rules
of the emitter. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import inspect
import json
import math

from types import MappingProxyType

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, until

import usercontext as uc

from usercontext.testing import RecordingSink


class TestEmitting:
    async def test_events_carry_the_context(self, ctx):
        """
        Events carry the ids of the context that emitted them, and one seq
        sequence per user, shared by the user's emitters.
        """
        sink = RecordingSink()
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
            await until(lambda: len(got) == 2)

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


class TestLazyJson:
    @pytest.mark.parametrize(
        ("data", "error", "match"),
        [
            ({"b": b"raw"}, TypeError, r"Event.data\['b'\] holds a bytes"),
            ({1: "a"}, TypeError, "key 1 is a int, not a str"),
            ({"x": math.nan}, ValueError, "not valid JSON.*Replace NaN"),
            ({"x": -math.inf}, ValueError, "not valid JSON"),
            ({"n": 10**5000}, ValueError, "not valid JSON"),
            ({"s": "x" * 200}, ValueError, "over the hub's max_event_size of 100"),
        ],
    )
    async def test_bad_data_is_refused_at_emit(self, ctx, data, error, match):
        """
        The JSON of an emitted event is encoded when a sink first reads it,
        but data it could not carry is still refused by the emit, with the
        same errors, before anything is queued.
        """
        async with uc.EmitterHub(max_event_size=100) as hub:
            emitter = hub.emitter(ctx)
            with pytest.raises(error, match=match):
                emitter.emit_nowait(TYPE, data)
            with pytest.raises(error, match=match):
                await emitter.emit(TYPE, data)
            assert hub.stats().emitted == 0

    @pytest.mark.parametrize(
        "data",
        [
            {"s": "é" * 5, "i": -(2**62), "f": 2.5, "b": True, "n": None},
            {"s": "\U0001f600" * 8},  # near the limit: its size is measured, not bounded
            {"l": [1, {"a": "b"}]},
            "text",
        ],
    )
    async def test_json_read_later_is_the_constructors(self, ctx, data):
        """
        An emitted event's JSON, built on first use, is what `Event` builds
        at construction for the same fields.
        """
        async with uc.EmitterHub(max_event_size=120) as hub:
            ev = hub.emitter(ctx).emit_nowait(TYPE, data)
        made = uc.Event(TYPE, data, ev.seq, ev.event_id, ev.ts, "u-42", "t-7", "r-1", ev.request_id)

        assert repr(ev) == repr(made)
        assert ev.json == made.json
        assert ev.json is ev.json  # built once
        assert json.loads(ev.json)["data"] == json.loads(made.json)["data"]

    @pytest.mark.parametrize("json_first", [False, True], ids=["data first", "json first"])
    async def test_emitted_data_is_a_read_only_copy(self, ctx, json_first):
        """
        An emitted event's data is the data as it was when emitted, read-only,
        the same mapping at every read, and equal to that of an `Event` made
        with the same fields, whether its JSON was read first or not.
        """
        source = {"agent": "triage", "n": 1}
        async with uc.EmitterHub() as hub:
            ev = hub.emitter(ctx).emit_nowait(TYPE, source)
        source["agent"] = "changed"
        if json_first:
            assert json.loads(ev.json)["data"] == {"agent": "triage", "n": 1}

        data = ev.data
        assert type(data) is MappingProxyType
        assert data == {"agent": "triage", "n": 1}
        assert ev.data is data
        with pytest.raises(TypeError):
            data["agent"] = "x"  # type: ignore[index]
        made = uc.Event(
            TYPE,
            {"agent": "triage", "n": 1},
            ev.seq,
            ev.event_id,
            ev.ts,
            "u-42",
            "t-7",
            "r-1",
            ev.request_id,
        )
        assert ev == made
        assert hash(ev) == hash(made)
