"""
Tests of the overflow policies: what emits do when a sink's buffer is full,
and the critical events no policy drops. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import json

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, GateSink, pending_events, until

import usercontext as uc


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
                    peak = max(peak, pending_events(hub))
            stalled = hub.stats()
            sink.gate.set()
            await until(lambda: pending_events(hub) == 0)
            stats = hub.stats()

        assert sink.calls >= 2
        assert peak == stalled.peak_pending == stalled.top[0].pending == 1000
        assert stats.peak_pending == 1000
        assert stats.emitted == 100_000
        assert stats.delivered == len(sink.events) == 1000
        assert dict(stats.dropped) == {reason: 99_000}
        assert sum(stats.dropped.values()) == stats.emitted - stats.delivered
        seqs = [e.seq for e in sink.events]
        if overflow == "drop_oldest":
            assert seqs == [1, *range(99_002, 100_001)]
        else:
            assert seqs == list(range(1, 1001))
        assert stalled.top[0].dropped == 99_000
        assert stalled.top[0].peak_pending == 1000
        assert stalled.top[0].lag_s >= 0

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
                await until(lambda: hub.stats().emitted == 1000)
                await anyio.sleep(0.02)
                blocked = hub.stats()
                assert not done.is_set()
                with pytest.raises(uc.EmitterFullError, match="overflow='block'"):
                    emitter.emit_nowait(TYPE)
                sink.gate.set()
            await until(lambda: pending_events(hub) == 0)
            stats = hub.stats()

        assert blocked.emitted == 1000
        assert blocked.top[0].pending == blocked.top[0].peak_pending == 1000
        assert blocked.waiting == 1  # the producer, waiting for room
        assert stats.waiting == 0
        assert stats.emitted == stats.delivered == 100_000
        assert stats.dropped == {}
        assert stats.peak_pending <= 1000
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
            emitter = await _fill(hub, ctx, sink)
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
            emitter = await _fill(hub, ctx, sink)
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
            emitter = await _fill(hub, ctx, sink)
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
        assert stats.top[0].pending == 2
        assert hub._table.streams == {}

    async def test_waiters_are_served_in_order(self, ctx):
        """
        Producers blocked on a full buffer get room first come, first served,
        and a waiter that gives up passes its turn on.
        """
        sink = GateSink()
        order = []
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=None) as hub:
            emitter = await _fill(hub, ctx, sink)
            produce = _producer(emitter, order)

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

    async def test_a_waiter_behind_the_head_gives_up_alone(self, ctx):
        """
        A producer that gives up behind the head of the line leaves it
        without waking anyone: the head keeps waiting, and gets the room.
        """
        sink = GateSink()
        order = []
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=None) as hub:
            emitter = await _fill(hub, ctx, sink)
            produce = _producer(emitter, order)

            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(produce, "head")
                    await anyio.sleep(0.005)
                    tg.start_soon(produce, "behind", 0.01)
                    await anyio.sleep(0.05)
                    assert order == ["behind gave up"]
                    assert hub.stats().waiting == 1
                    sink.gate.set()

        assert order == ["behind gave up", ("head", 3)]

    async def test_cancelled_waiter_passes_its_turn(self, ctx):
        """
        A waiter cancelled at the head of the line wakes the next one, even
        when the room it was woken for is the last that will come: here the
        sink is detached (one wake, for the head) as the head is cancelled.
        """
        sink = GateSink()
        got = []
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=None) as hub:
            emitter = await _fill(hub, ctx, sink)

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
            emitter = await _fill(hub, ctx, sink)
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
            emitter = await _fill(hub, ctx, sink)

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
            await until(lambda: pending_events(hub) == 0)
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
            emitter = await _fill(hub, ctx, sink)
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
            await until(lambda: pending_events(hub) == 0)

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
            await until(lambda: pending_events(hub) == 0)

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


async def _fill(hub, ctx, sink):
    """
    Attach *sink* (a `GateSink`) for the user ``u-42`` of *ctx*, and emit two
    events: the first held by the sink, the second in the buffer. Return the
    user's emitter.
    """
    hub.attach("u-42", sink)
    emitter = hub.emitter(ctx)
    emitter.emit_nowait(TYPE)
    await sink.started.wait()
    emitter.emit_nowait(TYPE)
    return emitter


def _producer(emitter, order):
    """
    A producer that emits one event named *name* and records in *order* its
    seq, or that it gave up.
    """

    async def produce(name, timeout=None):
        try:
            event = await emitter.emit(TYPE, {"name": name}, timeout=timeout)
        except uc.EmitterTimeoutError:
            order.append(f"{name} gave up")
        else:
            order.append((name, event.seq))

    return produce
