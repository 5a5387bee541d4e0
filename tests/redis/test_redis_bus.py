"""
Tests of `usercontext.redis.RedisBus` behind `usercontext.EmitterHub`: several
hubs (instances) share each user's stream through a real Redis.

Every test runs on asyncio only: redis-py's asyncio client does not run on
trio. Each hub has a client of its own, as an instance in another process
would; tests that kill Redis use a server of their own (``redis_server``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import anyio
import pytest
import redis.asyncio as aredis

import usercontext as uc

from usercontext.redis import RedisBus, RedisBusStats
from usercontext.testing import RecordingSink

from helpers import switches, until


@pytest.fixture(name="anyio_backend")
def _anyio_backend() -> str:
    """
    redis-py's asyncio client runs on asyncio only.
    """
    return "asyncio"


def ctx_of(user: str) -> uc.UserContext:
    return uc.UserContext(user_id=user, thread_id="t-1", run_id="r-1")


def hub_on(url: str, **kwargs: object) -> uc.EmitterHub:
    names = ("maxlen", "idle_ttl", "poll_interval", "backend_timeout")
    bus_kwargs = {k: kwargs.pop(k) for k in names if k in kwargs}
    return uc.EmitterHub(bus=RedisBus(url, **bus_kwargs), **kwargs)  # type: ignore[arg-type]


class SlowSink(RecordingSink):
    """
    A sink that takes *delay* seconds per batch.
    """

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def send(self, events):  # type: ignore[no-untyped-def]
        await anyio.sleep(self.delay)
        await super().send(events)


class TestAcrossInstances:
    async def test_every_event_reaches_every_instance_in_order_once(self, redis_db):
        """
        20 users, 50 events each emitted on A, interleaved: each user's sinks
        on A and on B get all 50, in order, once, with the same seq and
        event_id as the emit returned.
        """
        users = [f"u-{i}" for i in range(20)]
        # 20 producers open 20 connections at once: on a busy machine a
        # connect can take longer than the default 0.25 s, which is not what
        # this test is about.
        slow_ok = {"backend_timeout": 2.0}
        async with hub_on(redis_db, **slow_ok) as a, hub_on(redis_db, **slow_ok) as b:
            sinks = {}
            for u in users:
                sinks[u, "a"], sinks[u, "b"] = RecordingSink(), RecordingSink()
                await a.aattach(u, sinks[u, "a"])
                await b.aattach(u, sinks[u, "b"])
            emitters = {u: a.emitter(ctx_of(u)) for u in users}
            emitted: dict[str, list[str]] = {u: [] for u in users}
            order = []

            async def produce(u: str) -> None:
                for i in range(50):
                    ev = await emitters[u].emit("tick", {"i": i})
                    emitted[u].append(ev.event_id)
                    order.append(u)

            async with anyio.create_task_group() as tg:
                for u in users:
                    tg.start_soon(produce, u)
            await until(lambda: all(len(s.events) == 50 for s in sinks.values()))
            stats_a, stats_b = a.stats(), b.stats()

        assert switches(order) > 500  # the users' emits were interleaved
        for (u, _), sink in sinks.items():
            assert [e.seq for e in sink.events] == list(range(1, 51))
            assert [e.data["i"] for e in sink.events] == list(range(50))
            assert [e.event_id for e in sink.events] == emitted[u]
        assert (stats_a.emitted, stats_a.delivered, stats_b.emitted, stats_b.delivered) == (
            1000,
            1000,
            0,
            1000,
        )

    async def test_resume_on_the_other_instance(self, redis_db):
        """
        A connection that got events 1..6 on A resumes on B from its last
        event_id: B replays 7..10 from Redis, then live events.
        """
        async with hub_on(redis_db) as a, hub_on(redis_db) as b:
            first = RecordingSink()
            attached = await a.aattach("u-1", first)
            emitter = a.emitter(ctx_of("u-1"))
            for i in range(10):
                await emitter.emit("tick", {"i": i})
            await until(lambda: len(first.events) == 10)
            attached.detach()
            again = RecordingSink()
            resumed = await b.aattach("u-1", again, last_seq=first.events[5].event_id)
            await emitter.emit("tick", {"i": 10})
            await until(lambda: len(again.events) == 5)
            by_seq = RecordingSink()
            await b.aattach("u-1", by_seq, last_seq=9)
            await until(lambda: len(by_seq.events) == 2)

        assert [e.seq for e in again.events] == [7, 8, 9, 10, 11]
        assert (resumed.replayed, resumed.missed) == (4, 0)
        assert [e.seq for e in by_seq.events] == [10, 11]

    async def test_stats(self, redis_db):
        """
        Each bus counts what it did: A stored 10 events and follows nobody;
        B follows the user, received the 10 notifications, read the stream
        once for a resume, and polled positions; no errors, no disconnect.
        """
        bus_a, bus_b = RedisBus(redis_db), RedisBus(redis_db, poll_interval=0.02)
        assert bus_a.stats() == RedisBusStats(
            connected=True,
            followed=0,
            published=0,
            publish_errors=0,
            received=0,
            reads=0,
            polls=0,
            poll_errors=0,
            disconnects=0,
        )
        async with uc.EmitterHub(bus=bus_a) as a, uc.EmitterHub(bus=bus_b) as b:
            sink = RecordingSink()
            await b.aattach("u-1", sink)
            emitter = a.emitter(ctx_of("u-1"))
            for i in range(10):
                await emitter.emit("tick", {"i": i})
            await until(lambda: len(sink.events) == 10)
            again = RecordingSink()
            await b.aattach("u-1", again, last_seq=5)
            await until(lambda: len(again.events) == 5)
            await until(lambda: bus_b.stats().polls >= 2)
            stats_a, stats_b = bus_a.stats(), bus_b.stats()

        assert (stats_a.published, stats_a.followed, stats_a.received) == (10, 0, 0)
        assert (stats_b.published, stats_b.followed, stats_b.received) == (0, 1, 10)
        assert (stats_a.reads, stats_b.reads) == (0, 1)
        assert stats_b.polls >= 2
        for stats in (stats_a, stats_b):
            assert stats.connected
            assert (stats.publish_errors, stats.poll_errors, stats.disconnects) == (0, 0, 0)

    async def test_a_stream_started_anew(self, redis_db):
        """
        An event_id of another stream (the user's stream expired) gets
        everything held behind a notice with missed None.
        """
        async with hub_on(redis_db) as a:
            await a.emitter(ctx_of("u-1")).emit("tick")
            sink = RecordingSink()
            attachment = await a.aattach("u-1", sink, last_seq="0123456789abcdef-40")
            await until(lambda: len(sink.events) == 2)

        assert [e.type for e in sink.events] == [uc.EVENTS_MISSED, "tick"]
        assert sink.events[0].data["missed"] is None
        assert (attachment.replayed, attachment.missed) == (1, None)

    async def test_stream_length_is_bounded_and_older_events_are_missed(self, redis_db):
        """
        With maxlen=10, 500 events leave at most 110 in Redis (trimmed by
        whole nodes); resuming from seq 1 says how many were missed.
        """
        async with hub_on(redis_db, maxlen=10) as a:
            emitter = a.emitter(ctx_of("u-1"))
            for _ in range(500):
                await emitter.emit("tick")
            client = aredis.from_url(redis_db)
            length = await client.xlen("{usercontext:u-1}:s")
            await client.aclose()
            sink = RecordingSink()
            attachment = await a.aattach("u-1", sink, last_seq=1)
            await until(lambda: len(sink.events) == attachment.replayed + 1)

        assert 10 <= length <= 110
        notice = sink.events[0]
        assert notice.type == uc.EVENTS_MISSED
        assert attachment.missed == 500 - 1 - attachment.replayed
        assert [e.seq for e in sink.events[1:]] == list(range(501 - attachment.replayed, 501))

    async def test_idle_users_leave_no_keys(self, redis_db):
        """
        With idle_ttl=0.3 s, a user's keys are gone 0.3 s after their last
        event once no instance follows them.
        """
        client = aredis.from_url(redis_db)
        async with hub_on(redis_db, idle_ttl=0.3) as a:
            sink = RecordingSink()
            attached = await a.aattach("u-1", sink)
            await a.emitter(ctx_of("u-1")).emit("tick")
            await until(lambda: len(sink.events) == 1)
            held = sorted(await client.keys("*"))
            attached.detach()
            start = time.monotonic()
            while await client.keys("*"):  # noqa: ASYNC110  # Redis expires keys on its own
                await anyio.sleep(0.02)
            gone_after = time.monotonic() - start
        await client.aclose()

        assert held == [b"{usercontext:u-1}:m", b"{usercontext:u-1}:s"]
        assert gone_after < 1.5


class TestOverflow:
    async def test_critical_events_are_never_dropped(self, redis_db):
        """
        A slow sink with maxsize=4 under drop_oldest loses ordinary events,
        never one of the 10 critical ones, and gets the rest in order.
        """
        async with (
            hub_on(redis_db, maxsize=4, max_batch=2) as a,
            hub_on(redis_db, maxsize=4, max_batch=2) as b,
        ):
            sink = SlowSink(0.01)
            await b.aattach("u-1", sink)
            emitter = a.emitter(ctx_of("u-1"))
            critical = []
            for i in range(100):
                if i % 10 == 9:
                    critical.append((await emitter.emit(uc.AGENT_COMPLETED)).seq)
                else:
                    await emitter.emit("tick")
            await until(lambda: sink.events and sink.events[-1].seq == 100)
            stats = b.stats()

        got = [e.seq for e in sink.events]
        assert set(critical) <= set(got)
        assert got == sorted(got)
        assert sum(stats.dropped.values()) == 100 - len(got) > 0

    async def test_block_waits_in_redis_and_loses_nothing(self, redis_db):
        """
        Under block with maxsize=2, a slow sink gets all 60 events in order:
        the stream waits in Redis, not in memory.
        """
        async with (
            hub_on(redis_db) as a,
            hub_on(redis_db, maxsize=2, max_batch=1, overflow="block") as b,
        ):
            sink = SlowSink(0.002)
            await b.aattach("u-1", sink)
            emitter = a.emitter(ctx_of("u-1"))
            for _ in range(60):
                await emitter.emit("tick")
            await until(lambda: len(sink.events) == 60)
            stats = b.stats()

        assert [e.seq for e in sink.events] == list(range(1, 61))
        assert stats.peak_pending <= 2
        assert stats.dropped == {}


class TestApi:
    async def test_emit_nowait_and_attach_with_last_seq_are_refused(self, redis_db):
        """
        With a bus, emit_nowait and a sync attach with last_seq raise errors
        naming their async twins; a sync attach without last_seq works.
        """
        async with hub_on(redis_db) as a:
            emitter = a.emitter(ctx_of("u-1"))
            with pytest.raises(RuntimeError, match=r"await emitter\.emit"):
                emitter.emit_nowait("tick")
            with pytest.raises(RuntimeError, match=r"aattach"):
                a.attach("u-1", RecordingSink(), last_seq=3)
            sink = RecordingSink()
            a.attach("u-1", sink)
            await until(
                lambda: "u-1" in a._follower.users and a._follower.users["u-1"].ready.is_set()
            )  # type: ignore[union-attr]
            await emitter.emit("tick", timeout=1.0)
            await until(lambda: len(sink.events) == 1)

    async def test_aattach_without_a_bus(self):
        """
        aattach on a hub without a bus attaches and replays as attach does.
        """
        async with uc.EmitterHub() as hub:
            hub.emitter(ctx_of("u-1")).emit_nowait("tick")
            sink = RecordingSink()
            attachment = await hub.aattach("u-1", sink, last_seq=0)
            await until(lambda: len(sink.events) == 1)
        assert attachment.replayed == 1

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"redis": 42}, TypeError, "redis must be"),
            ({"prefix": "a{b"}, ValueError, "prefix must be"),
            ({"prefix": 3}, TypeError, "prefix must be"),
            ({"maxlen": 0}, ValueError, "maxlen must be at least 1"),
            ({"idle_ttl": 0}, ValueError, "idle_ttl must be > 0"),
            ({"backend_timeout": "1"}, TypeError, "backend_timeout must be a number"),
            ({"on_unavailable": "fail_open"}, ValueError, "fail_closed"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        """
        Every setting is checked, with a sentence that names it.
        """
        redis = kwargs.pop("redis", "redis://127.0.0.1:6379/0")
        with pytest.raises(error, match=match):
            RedisBus(redis, **kwargs)  # type: ignore[arg-type]

    def test_a_hub_refuses_a_bus_that_is_not_one(self):
        """
        bus must have the methods of EventBus.
        """
        with pytest.raises(TypeError, match="bus must be an event bus"):
            uc.EmitterHub(bus=object())  # type: ignore[arg-type]


class TestLifecycle:
    async def test_a_bus_serves_one_hub(self, redis_db):
        """
        A bus started twice, or used before it starts or after it closed,
        says so; closing twice is fine; the repr counts followed users.
        """
        client = aredis.from_url(redis_db)
        bus = RedisBus(client, prefix="p")
        with pytest.raises(RuntimeError, match="not running"):
            await bus.follow("u-1")
        bus.unfollow("u-1")  # nothing to stop
        async with uc.EmitterHub(bus=bus) as hub:
            with pytest.raises(RuntimeError, match="serves one"):
                await bus.start(lambda *_: None)
            await hub.aattach("u-1", RecordingSink())
            assert repr(bus) == "<usercontext.redis.RedisBus(prefix='p', maxlen=1000, followed=1)>"
        await bus.aclose()
        with pytest.raises(RuntimeError, match="serves one"):
            await bus.start(lambda *_: None)
        assert await client.ping()  # the user's client is the user's to close
        await client.aclose()

    async def test_a_bus_never_started(self, redis_db):
        """
        A bus that publishes without a hub, and closes.
        """
        bus = RedisBus(redis_db)
        published = await bus.publish("u-1", "x")
        stream_id, last, entries = await bus.read("u-1", 0, 10)
        assert published == (stream_id, 1)
        assert (last, list(entries)) == (1, [(1, "x")])
        await bus.aclose()

    async def test_channels_of_users_no_longer_followed_are_left(self, redis_db):
        """
        A channel checked after its user was unfollowed is unsubscribed.
        """
        async with hub_on(redis_db) as a:
            bus = a._bus
            (await a.aattach("u-1", RecordingSink())).detach()
            bus._recheck.add("{usercontext:u-1}:c")  # as after a reconnect
            bus._poke.set()
            await anyio.sleep(0.05)
            assert bus._pubsub.channels == {}

    async def test_two_follows_of_one_user_at_once(self, redis_db):
        """
        Two follows of one user at once both return its position.
        """
        async with hub_on(redis_db) as a:
            bus = a._bus
            first, second = await asyncio.gather(bus.follow("u-1"), bus.follow("u-1"))
            assert first == second
            assert first[1] == 0
            assert bus._confirm == {}

    async def test_a_quiet_instance_still_delivers(self, redis_db):
        """
        After a while without messages (several poll intervals), events
        still arrive.
        """
        async with hub_on(redis_db, poll_interval=0.02) as a:
            sink = RecordingSink()
            await a.aattach("u-1", sink)
            await anyio.sleep(0.1)
            await a.emitter(ctx_of("u-1")).emit("tick")
            await until(lambda: len(sink.events) == 1)


class TestFaults:
    async def test_positions_while_redis_is_down(self, redis_server):
        """
        The position poll fails quietly while Redis is down, and the sink
        gets what was emitted once it is back.
        """
        async with hub_on(redis_server.url, poll_interval=0.02) as a:
            sink = RecordingSink()
            await a.aattach("u-1", sink)
            redis_server.kill()
            await anyio.sleep(0.15)
            assert redis_server.launch()
            with anyio.fail_after(5):
                while True:
                    try:
                        await a.emitter(ctx_of("u-1")).emit("tick")
                        break
                    except uc.BackendUnavailableError:  # until it is back
                        await anyio.sleep(0.01)
            await until(lambda: [e.type for e in sink.events][-1:] == ["tick"])

    async def test_two_follows_of_one_user_while_redis_is_down(self, redis_server):
        """
        Two follows of one user that time out together leave nothing waiting.
        """
        async with hub_on(redis_server.url) as a:
            await a.aattach("u-0", RecordingSink())
            redis_server.kill()
            bus = a._bus
            results = await asyncio.gather(
                bus.follow("u-1"), bus.follow("u-1"), return_exceptions=True
            )
            assert [type(r) for r in results] == [uc.BackendUnavailableError] * 2
            assert bus._confirm == {}

    async def test_aattach_while_redis_is_down(self, redis_server):
        """
        aattach raises BackendUnavailableError within 0.5 s while Redis is
        down, and attaches once it is back.
        """
        async with hub_on(redis_server.url) as a:
            await a.aattach("u-0", RecordingSink())
            redis_server.kill()
            start = time.monotonic()
            with pytest.raises(uc.BackendUnavailableError):
                await a.aattach("u-1", RecordingSink())
            refused_after = time.monotonic() - start
            assert redis_server.launch()
            sink = RecordingSink()
            for _ in range(100):
                try:
                    await a.aattach("u-1", sink)
                    break
                except uc.BackendUnavailableError:  # until the reconnect
                    await anyio.sleep(0.02)
            await a.emitter(ctx_of("u-1")).emit("tick")
            await until(lambda: len(sink.events) == 1)
        assert refused_after < 0.5

    async def test_redis_killed_and_back(self, redis_server):
        """
        Redis killed: emit raises BackendUnavailableError within 0.5 s.
        Restarted (empty: it keeps nothing on disk): the events emitted on A
        from then on reach B's sink within 1 s, each once, after a notice that
        the stream started anew.
        """
        url = redis_server.url
        async with hub_on(url) as a, hub_on(url, poll_interval=0.05) as b:
            sink = RecordingSink()
            await b.aattach("u-1", sink)
            emitter = a.emitter(ctx_of("u-1"))
            for _ in range(5):
                await emitter.emit("tick")
            await until(lambda: len(sink.events) == 5)
            redis_server.kill()
            start = time.monotonic()
            with pytest.raises(uc.BackendUnavailableError, match="Redis did not answer"):
                await emitter.emit("tick")
            refused_after = time.monotonic() - start
            assert redis_server.launch()
            back = time.monotonic()
            acked = []
            with anyio.fail_after(5):
                while len(acked) < 20:
                    try:
                        acked.append((await emitter.emit("tick")).event_id)
                    except uc.BackendUnavailableError:  # noqa: PERF203  # until Redis is back
                        await anyio.sleep(0.01)
            await until(lambda: [e.event_id for e in sink.events[-20:]] == acked, timeout=3)
            caught_up_after = time.monotonic() - back
            stats = a.stats()
            # B lost its pub/sub connection, and gets it back.
            await until(lambda: b._bus.stats().connected, timeout=3)  # type: ignore[union-attr]
            bus_a, bus_b = a._bus.stats(), b._bus.stats()  # type: ignore[union-attr]

        assert refused_after < 0.5
        assert caught_up_after < 1.0
        types = [e.type for e in sink.events]
        assert types[5] == uc.EVENTS_MISSED
        assert sink.events[5].data["missed"] is None
        assert len(sink.events) == 5 + 1 + 20
        assert [e.seq for e in sink.events[6:]] == list(range(1, 21))
        assert stats.publish_errors >= 1
        assert bus_a.publish_errors == stats.publish_errors
        assert bus_a.published == 5 + 20
        assert bus_b.disconnects >= 1

    async def test_an_emitting_process_killed_loses_nothing_acknowledged(self, redis_db):
        """
        Another process emits to u-1 and prints each acknowledged event_id; it
        is SIGKILLed after 200. Every event it saw acknowledged reaches the
        sink here, in order, once.
        """
        code = textwrap.dedent(
            f"""
            import asyncio, sys
            import usercontext as uc
            from usercontext.redis import RedisBus, RedisBusStats

            async def main():
                async with uc.EmitterHub(bus=RedisBus({redis_db!r})) as hub:
                    emitter = hub.emitter(uc.UserContext(user_id="u-1", thread_id="t", run_id="r"))
                    while True:
                        ev = await emitter.emit("tick")
                        sys.stdout.write(ev.event_id + "\\n")
                        sys.stdout.flush()

            asyncio.run(main())
            """
        )
        async with hub_on(redis_db) as b:
            sink = RecordingSink()
            await b.aattach("u-1", sink)
            process = subprocess.Popen(  # noqa: S603, ASYNC220  # this Python; returns at once
                [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
            )
            acked = []
            try:
                assert process.stdout is not None
                while len(acked) < 200:
                    line = await anyio.to_thread.run_sync(process.stdout.readline)
                    assert line, "the emitting process ended"
                    acked.append(line.strip())
                os.kill(process.pid, 9)
                acked += [line.strip() for line in process.stdout.read().splitlines()]
            finally:
                process.kill()
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()
            await until(lambda: len(sink.events) >= len(acked))
            await anyio.sleep(0.1)

        got = [e.event_id for e in sink.events]
        assert got[: len(acked)] == acked
        assert len(got) - len(acked) <= 1  # at most one stored but not yet acknowledged
        assert [e.seq for e in sink.events] == list(range(1, len(got) + 1))
