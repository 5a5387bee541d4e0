"""
Tests of an `EmitterHub` with a bus, through `EventBus` alone: `MemoryBus`, a
bus in memory that several hubs of one process share, loses, repeats and
refuses on demand what a real backend does only under faults. It is also what
a third-party backend has to do. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import GateSink, until

import usercontext as uc

from usercontext.testing import RecordingSink

from helpers import KeepRecords


class _Stream:
    def __init__(self, number: int) -> None:
        self.id = f"{number:016x}"
        self.seq = 0
        self.entries: list[tuple[int, str]] = []


class Log:
    """
    The streams that several `MemoryBus` share, as a Redis would hold them.
    """

    def __init__(self, maxlen: int = 1000) -> None:
        self.maxlen = maxlen
        self.streams: dict[str, _Stream] = {}
        self.buses: list[MemoryBus] = []
        self.started = 0

    def stream(self, user_id: str) -> _Stream:
        if user_id not in self.streams:
            self.started += 1
            self.streams[user_id] = _Stream(self.started)
        return self.streams[user_id]

    def restart(self, user_id: str) -> None:
        """
        Lose the stream of *user_id*, as an expiry or a Redis restart would.
        """
        del self.streams[user_id]


class MemoryBus:
    """
    An `EventBus` in memory. *drop* notifications are lost, *fail_follow*
    follows and *fail_read* reads raise `BackendUnavailableError`, and
    *on_read* runs before each read.
    """

    def __init__(self, log: Log) -> None:
        self.log = log
        self.notify = None
        self.followed: set[str] = set()
        self.drop = self.fail_follow = self.fail_read = 0
        self.on_read = self.on_follow = None
        self.closed = False

    async def start(self, notify):
        self.notify = notify
        self.log.buses.append(self)

    async def aclose(self):
        self.closed = True
        self.log.buses.remove(self)

    async def publish(self, user_id, payload):
        await anyio.lowlevel.checkpoint()
        s = self.log.stream(user_id)
        s.seq += 1
        s.entries = [*s.entries, (s.seq, payload)][-self.log.maxlen :]
        for bus in list(self.log.buses):
            if user_id in bus.followed:
                if bus.drop:
                    bus.drop -= 1
                else:
                    bus.notify(user_id, s.id, s.seq, payload)
        return s.id, s.seq

    async def follow(self, user_id):
        await anyio.lowlevel.checkpoint()
        if self.fail_follow:
            self.fail_follow -= 1
            raise uc.BackendUnavailableError("no backend")
        self.followed.add(user_id)
        s = self.log.stream(user_id)
        position = s.id, s.seq
        if self.on_follow is not None:
            self.on_follow()  # an event stored after the position was read
        return position

    def unfollow(self, user_id):
        self.followed.discard(user_id)

    async def read(self, user_id, after, limit):
        await anyio.lowlevel.checkpoint()
        if self.on_read is not None:
            self.on_read()
        if self.fail_read:
            self.fail_read -= 1
            raise uc.BackendUnavailableError("no backend")
        s = self.log.stream(user_id)
        return s.id, s.seq, [e for e in s.entries if e[0] > after][:limit]

    def append(self, user_id, payload):
        """
        Store *payload* at once, and notify the followers.
        """
        s = self.log.stream(user_id)
        s.seq += 1
        s.entries.append((s.seq, payload))
        for bus in self.log.buses:
            if user_id in bus.followed:
                bus.notify(user_id, s.id, s.seq, payload)

    def position(self, user_id):
        s = self.log.stream(user_id)
        self.notify(user_id, s.id, s.seq, None)


@pytest.fixture(name="log")
def _log():
    return Log()


@pytest.fixture(name="bus")
def _bus(log):
    return MemoryBus(log)


def ctx_of(user="u-1"):
    return uc.UserContext(user_id=user, thread_id="t", run_id="r")


async def followed(hub, user="u-1"):
    await until(lambda: user in hub._follower.users and hub._follower.users[user].state == 1)


class TestProtocol:
    def test_memory_bus_is_an_event_bus(self, bus):
        """
        EventBus is a runtime-checkable protocol.
        """
        assert isinstance(bus, uc.EventBus)
        assert not isinstance(object(), uc.EventBus)

    async def test_events_round_trip(self, bus):
        """
        An event read back from the bus equals the one emit returned: type,
        data, ids, seq, event_id, time and JSON.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            ctx = uc.UserContext(user_id="u-1", thread_id="t", run_id="r", request_id="q")
            sent = [
                await hub.emitter(ctx).emit("x", {"a": [1, {"b": None}], "c": "é"}),
                await hub.emitter(ctx).emit("y"),
                await hub.emitter(ctx).emit("z", 42),
            ]
            await until(lambda: len(sink.events) == 3)
        assert sink.events == sent
        assert [e.json for e in sink.events] == [e.json for e in sent]
        assert sink.events[0].data["a"][1]["b"] is None


class TestRouting:
    async def test_a_lost_notification_is_read_back(self, bus):
        """
        Event 2's notification is lost: event 3's shows the gap, and the sink
        gets 1, 2, 3 in order.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            emitter = hub.emitter(ctx_of())
            await emitter.emit("x")
            bus.drop = 1
            await emitter.emit("x")
            await emitter.emit("x")
            await until(lambda: len(sink.events) == 3)
        assert [e.seq for e in sink.events] == [1, 2, 3]

    async def test_a_lost_last_notification_is_found_by_a_position(self, bus):
        """
        The last event's notification is lost; a position brings it.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            bus.drop = 1
            await hub.emitter(ctx_of()).emit("x")
            await anyio.sleep(0.01)
            assert sink.events == []
            bus.position("u-1")
            bus.position("u-1")  # a position reached already changes nothing
            await until(lambda: len(sink.events) == 1)
        assert [e.seq for e in sink.events] == [1]

    async def test_repeats_are_dropped(self, bus, log):
        """
        A notification heard twice is routed once.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            ev = await hub.emitter(ctx_of()).emit("x")
            payload = log.streams["u-1"].entries[0][1]
            bus.notify("u-1", ev.event_id.split("-")[0], 1, payload)
            await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(sink.events) == 2)
        assert [e.seq for e in sink.events] == [1, 2]

    async def test_notifications_of_users_not_followed_are_ignored(self, bus):
        """
        A notification of a user the hub does not follow changes nothing.
        """
        async with uc.EmitterHub(bus=bus) as hub:
            bus.notify("u-9", "0" * 16, 1, None)
            assert hub.stats().users == 0

    async def test_a_gap_read_in_several_reads(self, bus, monkeypatch):
        """
        A gap longer than one read is read in several.
        """
        monkeypatch.setattr("usercontext._emitter._follow.READ_BATCH", 2)
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            bus.drop = 5
            for _ in range(6):
                await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(sink.events) == 6)
        assert [e.seq for e in sink.events] == [1, 2, 3, 4, 5, 6]

    async def test_a_catch_up_after_the_last_sink_left(self, bus, log):
        """
        A catch-up that starts after its user's last sink left, or whose
        read returns after it, does nothing.
        """
        async with uc.EmitterHub(bus=bus) as hub:
            attachment = await hub.aattach("u-1", RecordingSink())
            log.streams["u-1"].seq = 3
            bus.position("u-1")
            attachment.detach()
            await anyio.sleep(0.01)
            attachment = await hub.aattach("u-1", RecordingSink())
            log.streams["u-1"].seq = 4
            bus.on_read = attachment.detach
            bus.position("u-1")
            await anyio.sleep(0.01)
            assert hub._follower.users == {}

    async def test_entries_that_are_not_events_are_skipped_and_logged(self, bus):
        """
        A payload that is not an event is logged and skipped, both live and
        when reading back a gap.
        """
        records = []
        handler = KeepRecords(records)
        logging.getLogger("usercontext").addHandler(handler)
        sink = RecordingSink()
        try:
            async with uc.EmitterHub(bus=bus) as hub:
                await hub.aattach("u-1", sink)
                await bus.publish("u-1", "garbage")
                bus.drop = 1
                await bus.publish("u-1", "more garbage")
                await hub.emitter(ctx_of()).emit("x")
                await until(lambda: len(sink.events) == 1)
        finally:
            logging.getLogger("usercontext").removeHandler(handler)
        assert [e.seq for e in sink.events] == [3]
        assert [r.getMessage() for r in records] == [
            "usercontext: entry 1 of user 'u-1' is not an event",
            "usercontext: entry 2 of user 'u-1' is not an event",
        ]

    async def test_a_failed_read_is_tried_again(self, bus):
        """
        Reading a gap back fails twice; the third read brings it.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            bus.drop, bus.fail_read = 1, 2
            await hub.emitter(ctx_of()).emit("x")
            await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(sink.events) == 2)
        assert bus.fail_read == 0
        assert [e.seq for e in sink.events] == [1, 2]

    async def test_events_trimmed_before_a_gap_is_read_are_missed(self, log, bus):
        """
        With 3 events held, a gap of 5 read back gives a notice of 2 missed,
        then the 3 held.
        """
        log.maxlen = 3
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            bus.drop = 4
            for _ in range(5):
                await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(sink.events) == 4)
            stats = hub.stats()
        assert sink.events[0].type == uc.EVENTS_MISSED
        assert dict(sink.events[0].data) | {"stream_id": None} == {
            "missed": 2,
            "after_seq": 0,
            "stream_id": None,
        }
        assert [e.seq for e in sink.events] == [2, 3, 4, 5]
        assert stats.missed == 2

    async def test_a_stream_started_anew(self, log, bus):
        """
        The user's stream is lost and started anew: the sinks get a notice
        with missed None, then the new stream from seq 1.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", sink)
            first = await hub.emitter(ctx_of()).emit("x")
            log.restart("u-1")
            second = await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(sink.events) == 3)
        assert [(e.type, e.seq) for e in sink.events] == [
            ("x", 1),
            (uc.EVENTS_MISSED, 1),
            ("x", 1),
        ]
        assert sink.events[1].data["missed"] is None
        assert first.event_id != second.event_id

    async def test_events_during_the_follow_are_read_back(self, bus, log):
        """
        A notification that comes while the hub follows the user (of a stream
        id it does not know yet) is checked by reading the stream.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.emitter(ctx_of()).emit("x")
            payload = log.streams["u-1"].entries[0][1]
            bus.on_follow = lambda: bus.append("u-1", payload)
            await hub.aattach("u-1", sink)
            await until(lambda: len(sink.events) == 1)
        assert [e.seq for e in sink.events] == [2]


class TestOverflow:
    async def test_critical_events_wait_in_the_bus(self, bus):
        """
        Under drop_oldest with maxsize 2, critical events that find only
        critical ones buffered pause the user; all 6 arrive, in order.
        """
        sink = GateSink("u-1")
        async with uc.EmitterHub(bus=bus, maxsize=2, max_batch=1) as hub:
            await hub.aattach("u-1", sink)
            for _ in range(6):
                await hub.emitter(ctx_of()).emit(uc.AGENT_COMPLETED)
            await anyio.sleep(0.01)
            assert hub.stats().top[0].pending == 2
            sink.gate.set()
            await until(lambda: len(sink.events) == 6)
            stats = hub.stats()
        assert [e.seq for e in sink.events] == [1, 2, 3, 4, 5, 6]
        assert stats.dropped == {}

    async def test_drop_newest_skips_the_new_event(self, bus):
        """
        Under drop_newest with maxsize 2, a stalled sink keeps the first two
        and the others are dropped as "newest"; a second sink with room gets
        them all.
        """
        stalled, free = GateSink("u-1"), RecordingSink()
        async with uc.EmitterHub(bus=bus, maxsize=2, max_batch=1, overflow="drop_newest") as hub:
            await hub.aattach("u-1", stalled)
            await hub.aattach("u-1", free)
            for _ in range(5):
                await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(free.events) == 5)
            stats = hub.stats()
            stalled.gate.set()
            await until(lambda: len(stalled.events) == 2)
        assert [e.seq for e in stalled.events] == [1, 2]
        assert stats.dropped == {"newest": 3}

    async def test_a_paused_sink_detached(self, bus):
        """
        Detaching the sink that paused its user resumes the user for the
        other sinks.
        """
        stalled, other = GateSink("u-1"), GateSink("u-1")
        async with uc.EmitterHub(bus=bus, maxsize=1, max_batch=1, overflow="block") as hub:
            stalled_attachment = await hub.aattach("u-1", stalled)
            await hub.aattach("u-1", other)
            for _ in range(3):
                await hub.emitter(ctx_of()).emit("x")
            await anyio.sleep(0.01)
            other.gate.set()
            stalled_attachment.detach()
            await until(lambda: len(other.events) == 3)
        assert [e.seq for e in other.events] == [1, 2, 3]

    async def test_the_last_paused_sink_detached(self, bus):
        """
        Detaching the only sink of a paused user stops following it.
        """
        stalled = GateSink("u-1")
        async with uc.EmitterHub(bus=bus, maxsize=1, max_batch=1, overflow="error") as hub:
            attachment = await hub.aattach("u-1", stalled)
            for _ in range(3):
                await hub.emitter(ctx_of()).emit("x")
            await anyio.sleep(0.01)
            attachment.detach()
            await anyio.sleep(0.01)
            assert hub._follower.users == {}
        assert bus.followed == set()

    async def test_the_hub_closes_while_a_user_is_paused(self, bus):
        """
        A hub that closes with a paused user closes in time.
        """
        stalled = GateSink("u-1")
        hub = uc.EmitterHub(bus=bus, maxsize=1, max_batch=1, overflow="block", drain_timeout=0.05)
        async with hub:
            await hub.aattach("u-1", stalled)
            for _ in range(3):
                await hub.emitter(ctx_of()).emit("x")
            await anyio.sleep(0.01)
        assert hub.closed
        assert bus.closed


class TestFollow:
    async def test_aattach_raises_when_the_bus_is_unavailable(self, bus):
        """
        aattach raises what follow raised, and leaves nothing attached.
        """
        bus.fail_follow = 1
        async with uc.EmitterHub(bus=bus) as hub:
            with pytest.raises(uc.BackendUnavailableError):
                await hub.aattach("u-1", RecordingSink())
            assert hub.stats().attached == 0
            assert hub._follower.users == {}

    async def test_attach_follows_once_the_bus_is_back(self, bus):
        """
        A sink attached while follow fails gets events once it succeeds.
        """
        bus.fail_follow = 2
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            hub.attach("u-1", sink)
            await followed(hub)
            await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(sink.events) == 1)

    async def test_a_sink_detached_before_the_follow_ran(self, bus):
        """
        A sink attached and detached at once: the user is never followed.
        """
        async with uc.EmitterHub(bus=bus) as hub:
            hub.attach("u-1", RecordingSink()).detach()
            await anyio.sleep(0.01)
        assert bus.followed == set()

    async def test_a_sink_detached_while_the_follow_waits(self, bus):
        """
        The follow returns after the only sink left: the user is not routed.
        """
        bus.fail_follow = 1
        async with uc.EmitterHub(bus=bus) as hub:
            attachment = hub.attach("u-1", RecordingSink())
            await anyio.lowlevel.checkpoint()
            attachment.detach()
            await anyio.sleep(0.2)
            assert hub._follower.users == {}

    async def test_a_sink_detached_while_the_follow_succeeds(self, bus):
        """
        The follow succeeds after the only sink left: the user is not routed.
        """
        async with uc.EmitterHub(bus=bus) as hub:
            attachment = hub.attach("u-1", RecordingSink())
            bus.on_follow = attachment.detach
            await anyio.sleep(0.01)
            assert hub._follower.users == {}

    async def test_two_sinks_then_one(self, bus):
        """
        The user stays followed while one of two sinks remains.
        """
        first, second = RecordingSink(), RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", first)
            (await hub.aattach("u-1", second)).detach()
            await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(first.events) == 1)
            assert bus.followed == {"u-1"}

    async def test_the_hub_closes_while_follow_is_retried(self, bus):
        """
        Closing the hub cancels a follow that keeps failing.
        """
        bus.fail_follow = 10**6
        async with uc.EmitterHub(bus=bus) as hub:
            hub.attach("u-1", RecordingSink())
            await anyio.sleep(0.05)
        assert bus.fail_follow < 10**6

    async def test_a_bus_that_breaks_its_contract_is_logged(self, bus):
        """
        A read that returns nonsense ends the catch-up with a logged error,
        not the hub.
        """
        records = []
        handler = KeepRecords(records)
        logging.getLogger("usercontext").addHandler(handler)
        try:
            async with uc.EmitterHub(bus=bus) as hub:
                await hub.aattach("u-1", RecordingSink())

                stream_id = bus.log.streams["u-1"].id

                async def nonsense(*_):
                    return stream_id, 5, [None]

                bus.read = nonsense
                bus.log.streams["u-1"].seq = 5
                bus.position("u-1")
                await until(lambda: records)
        finally:
            logging.getLogger("usercontext").removeHandler(handler)
        assert records[0].getMessage() == "usercontext: following user 'u-1' failed"

    async def test_closing_a_bus_that_fails_is_logged(self, bus):
        """
        A bus whose aclose raises is logged; the hub closes all the same.
        """
        records = []
        handler = KeepRecords(records)
        logging.getLogger("usercontext").addHandler(handler)

        async def fail():
            raise OSError("gone")

        bus.aclose = fail
        hub = uc.EmitterHub(bus=bus)
        try:
            async with hub:
                pass
        finally:
            logging.getLogger("usercontext").removeHandler(handler)
        assert hub.closed
        assert records[0].getMessage() == "usercontext: closing the hub's bus failed"


class TestReplay:
    async def test_replay_stops_at_the_local_position(self, bus, log):
        """
        Events stored but not yet routed here are left to the routing: the
        resuming sink gets each once, in order.
        """
        first, second = RecordingSink(), RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", first)
            for _ in range(3):
                await hub.emitter(ctx_of()).emit("x")
            bus.drop = 2
            await hub.emitter(ctx_of()).emit("x")
            await hub.emitter(ctx_of()).emit("x")
            attachment = await hub.aattach("u-1", second, last_seq=1)
            bus.position("u-1")
            await until(lambda: len(second.events) == 4)
        assert [e.seq for e in second.events] == [2, 3, 4, 5]
        assert attachment.replayed == 2

    async def test_replay_in_several_reads(self, bus, monkeypatch):
        """
        A replay longer than one read is read in several.
        """
        monkeypatch.setattr("usercontext._emitter._follow.READ_BATCH", 2)
        first, second = RecordingSink(), RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", first)
            for _ in range(5):
                await hub.emitter(ctx_of()).emit("x")
            await until(lambda: len(first.events) == 5)
            attachment = await hub.aattach("u-1", second, last_seq=0)
            await until(lambda: len(second.events) == 5)
        assert [e.seq for e in second.events] == [1, 2, 3, 4, 5]
        assert attachment.replayed == 5

    async def test_all_trimmed(self, bus, log):
        """
        Resuming from before everything held: a notice, then what is held.
        """
        log.maxlen = 2
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", RecordingSink())
            for _ in range(5):
                await hub.emitter(ctx_of()).emit("x")
            await until(lambda: hub._follower.users["u-1"].stream.seq == 5)
            attachment = await hub.aattach("u-1", sink, last_seq=1)
            await until(lambda: len(sink.events) == 3)
        assert (attachment.replayed, attachment.missed) == (2, 2)
        assert [e.seq for e in sink.events] == [3, 4, 5]

    async def test_nothing_held_after_a_position(self, bus, log):
        """
        Resuming after events that are all gone, when the bus holds nothing
        past them.
        """
        log.maxlen = 2
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", RecordingSink())
            for _ in range(5):
                await hub.emitter(ctx_of()).emit("x")
            await until(lambda: hub._follower.users["u-1"].stream.seq == 5)
            log.streams["u-1"].entries = []
            attachment = await hub.aattach("u-1", sink, last_seq=1)
            await until(lambda: len(sink.events) == 1)
        assert (attachment.replayed, attachment.missed) == (0, 4)
        assert sink.events[0].data["missed"] == 4

    async def test_the_stream_starts_anew_during_a_replay(self, bus, log):
        """
        The stream is lost while a sink's replay reads it: the sink gets a
        notice that it started anew.
        """
        sink = RecordingSink()
        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", RecordingSink())
            for _ in range(3):
                await hub.emitter(ctx_of()).emit("x")
            await until(lambda: hub._follower.users["u-1"].stream.seq == 3)
            bus.on_read = lambda: log.restart("u-1")
            attachment = await hub.aattach("u-1", sink, last_seq=1)
            bus.on_read = None
            await until(lambda: len(sink.events) >= 1)
        assert attachment.missed is None
        assert sink.events[0].type == uc.EVENTS_MISSED

    async def test_a_hub_that_closes_during_aattach(self, bus):
        """
        aattach raises EmitterClosedError when the hub closed while it read
        the replay, and leaves nothing attached.
        """
        gate = anyio.Event()

        async def slow_read(user_id, after, limit):
            await gate.wait()
            return await MemoryBus.read(bus, user_id, after, limit)

        async with uc.EmitterHub(bus=bus) as hub:
            await hub.aattach("u-1", RecordingSink())
            await hub.emitter(ctx_of()).emit("x")
            await until(lambda: hub._follower.users["u-1"].stream.seq == 1)
            bus.read = slow_read
            failed = []

            async def resume():
                try:
                    await hub.aattach("u-1", RecordingSink(), last_seq=0)
                except uc.EmitterClosedError as e:
                    failed.append(e)

            async with anyio.create_task_group() as tg:
                tg.start_soon(resume)
                await anyio.sleep(0.01)
                tg.start_soon(hub.aclose)
                await anyio.sleep(0.01)
                gate.set()
        assert len(failed) == 1


class TestBusEmitter:
    async def test_emit_checks(self, bus):
        """
        emit checks its timeout and its context, and revives a swept stream.
        """
        async with uc.EmitterHub(bus=bus, idle_ttl=0.01) as hub:
            emitter = hub.emitter(ctx_of())
            with pytest.raises(ValueError, match="timeout"):
                await emitter.emit("x", timeout=-1)
            await anyio.sleep(0.05)  # swept
            assert (await emitter.emit("x", {"a": 1}, timeout=None)).seq == 1
            with uc.bind(ctx_of("u-2")), pytest.raises(uc.IsolationError):
                await emitter.emit("x")
            with pytest.raises(ValueError, match="max_event_size"):
                await emitter.emit("x", {"a": "x" * (1 << 20)})
