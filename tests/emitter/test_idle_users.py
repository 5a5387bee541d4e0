"""
Tests of the table of users' streams: idle users are dropped, and a flood of
users leaves no memory behind. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import gc
import sys
import weakref

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, until

import usercontext as uc

from usercontext._emitter import _streams
from usercontext.testing import RecordingSink


class TestIdleUsers:
    async def test_idle_users_are_dropped(self, ctx):
        """
        A user without sinks who emitted nothing for the TTL leaves no state;
        their next emit starts a new stream.
        """
        async with uc.EmitterHub(idle_ttl=0.02) as hub:
            emitter = hub.emitter(ctx)
            first = emitter.emit_nowait(TYPE)
            await until(lambda: hub.stats().users == 0)
            again = emitter.emit_nowait(TYPE)

        assert (first.seq, again.seq) == (1, 1)
        assert first.event_id.rpartition("-")[0] != again.event_id.rpartition("-")[0]

    async def test_active_and_attached_users_are_kept(self, ctx, other_ctx):
        """
        Users with a sink are never dropped, users who keep emitting are kept,
        and a user whose last sink left is dropped once idle.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(idle_ttl=0.05) as hub:
            attachment = hub.attach("u-42", sink)
            busy = hub.emitter(other_ctx)
            for _ in range(10):
                busy.emit_nowait(TYPE)
                await anyio.sleep(0.015)
            assert set(hub._table.streams) == {"u-42", "u-99"}
            attachment.detach()
            await until(lambda: hub.stats().users == 0)

    @pytest.mark.parametrize("replay", [100, 0])
    async def test_a_dropped_user_frees_its_events_at_once(self, ctx, replay):
        """
        The events a dropped user's history held are freed when the user is
        dropped, not by the cycle collector, though a sink that was attached
        still refers to the stream; without a history there is none to free.
        """
        async with uc.EmitterHub(idle_ttl=0.02, replay=replay) as hub:
            hub.attach("u-42", RecordingSink()).detach()
            stream = hub._table.streams["u-42"]
            emitter = hub.emitter(ctx)
            for _ in range(3):
                emitter.emit_nowait(TYPE)
            assert len(stream.history or ()) == (3 if replay else 0)
            await until(lambda: hub.stats().users == 0)
            assert stream.dead
            assert stream.history is None if not replay else list(stream.history) == []

    async def test_many_distinct_users_leave_nothing(self):
        """
        10,000 distinct users who emitted once leave no state after the TTL.
        """
        async with uc.EmitterHub(idle_ttl=0.05) as hub:
            for i in range(10_000):
                ctx = uc.UserContext(user_id=f"user-{i}", thread_id="t", run_id="r")
                hub.emitter(ctx).emit_nowait(TYPE, {"i": i})
            assert hub.stats().users == 10_000
            await until(lambda: hub.stats().users == 0)
            assert hub._table.idle == {}

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
            hub.attach("u-42", RecordingSink())
            for i in range(n):
                user = uc.UserContext(user_id=f"user-{i}", thread_id="t", run_id="r")
                hub.emitter(user).emit_nowait(TYPE)
            hub.emitter(ctx).emit_nowait(TYPE)
            full = sys.getsizeof(hub._table.streams)
            hub._table.idle = Counting(hub._table.idle)
            later = _streams._time() + 7200
            monkeypatch.setattr(_streams, "_time", lambda: later)
            await hub._table.sweep()
            assert Counting.scans == 1
            assert list(hub._table.streams) == ["u-42"]
            assert hub._table.idle == {}
            assert sys.getsizeof(hub._table.streams) < full / 50
            assert sys.getsizeof(hub._table.idle) < full / 50

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
            later = _streams._time() + 7200
            monkeypatch.setattr(_streams, "_time", lambda: later)

            async def attach_while_sweeping():
                while len(hub._table.streams) == n:
                    await anyio.lowlevel.checkpoint()
                hub.attach("user-10000", RecordingSink())

            async with anyio.create_task_group() as tg:
                tg.start_soon(attach_while_sweeping)
                tg.start_soon(hub._table.sweep)
            assert list(hub._table.streams) == ["user-10000"]


class TestFreedWithoutCycles:
    @pytest.mark.parametrize("kind", ["direct", "task"])
    async def test_an_ended_sink_is_freed_without_the_cycle_collector(self, ctx, kind):
        """
        Once its delivery ended and its `Attachment` is dropped, nothing of a
        sink is left for the cycle collector: a direct sink (a plain callback,
        flushed by the loop) and a sink with a delivery task alike.
        """
        got: list[int] = []

        def receive(events):
            got.extend(e.seq for e in events)

        async def areceive(events):
            receive(events)

        sink = uc.CallbackSink(receive if kind == "direct" else areceive)
        sink_ref = weakref.ref(sink)
        gc.collect()
        gc.disable()
        try:
            async with uc.EmitterHub() as hub:
                attachment = hub.attach("u-42", sink)
                hub.emitter(ctx).emit_nowait(TYPE)
                await until(lambda: got == [1])
                attachment.detach()
                await attachment.wait()
                del attachment, sink
                await anyio.lowlevel.checkpoint()
                assert sink_ref() is None
        finally:
            gc.enable()
