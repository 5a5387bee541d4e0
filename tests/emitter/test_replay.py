"""
Tests of resuming a stream: `EmitterHub.attach(..., last_seq=...)`, the replay
history and the `EVENTS_MISSED` notice. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, FlakySink, GateSink, emit_history, pending_events, until

import usercontext as uc

from usercontext._emitter._state import parse_last_seq
from usercontext.testing import RecordingSink


class TestReplay:
    async def test_resume_within_the_window(self, ctx):
        """
        A sink attached with last_seq first gets the held events after it, then
        live ones, without a notice.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(replay=10) as hub:
            emit_history(hub, ctx, 8)
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
        sink = RecordingSink()
        async with uc.EmitterHub(replay=5) as hub:
            events = emit_history(hub, ctx, 20)
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
        first, second = RecordingSink(), RecordingSink()
        async with uc.EmitterHub(replay=10) as hub:
            events = emit_history(hub, ctx, 4)
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
        sink = RecordingSink()
        async with uc.EmitterHub(replay=10) as hub:
            emit_history(hub, ctx, 3)
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
        sink = RecordingSink()
        async with uc.EmitterHub(replay=0) as hub:
            emit_history(hub, ctx, 4)
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
        sink = RecordingSink()
        async with uc.EmitterHub(maxsize=4, replay=10, overflow="block") as hub:
            emit_history(hub, ctx, 10)
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
            emit_history(hub, ctx, 10)
            attachment = hub.attach("u-42", sink, last_seq=1)
            emitter = hub.emitter(ctx)
            for _ in range(3):  # before the delivery task runs: the buffer is full
                emitter.emit_nowait(TYPE)
            sink.gate.set()
            await until(lambda: pending_events(hub) == 0)
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
            emit_history(hub, ctx, 5)
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
            emit_history(hub, ctx, 3)
            attachment = hub.attach("u-42", sink, last_seq=1)
            await sink.started.wait()
            await hub.aclose(timeout=0.01)

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
        with pytest.raises(error, match=r"last_seq .+ is not a non-negative int or an event id"):
            parse_last_seq(last_seq)

    def test_parse_last_seq(self):
        """
        Plain numbers, in int or str form, and event ids are understood.
        """
        assert parse_last_seq(7) == (None, 7)
        assert parse_last_seq("7") == (None, 7)
        assert parse_last_seq("0123456789abcdef-7") == ("0123456789abcdef", 7)
