"""
Tests of delivery to sinks: each sink's own task, retries, dead letters, and
many users on flaky connections. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import contextlib
import logging
import random

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, FlakySink, GateSink, until

import usercontext as uc

from usercontext.testing import RecordingSink


class TestSinksAreIndependent:
    async def test_slow_sink_delays_nobody_else(self, ctx, other_ctx):
        """
        A stalled connection neither delays another connection of the same
        user nor another user; each connection gets every event, in order.
        """
        stalled = GateSink()
        fast, other = RecordingSink(), RecordingSink()
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
        assert len(stats.top) == 1
        assert stats.top[0].sink == repr(stalled)
        assert stats.top[0].pending == 50


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
        assert (stats.send_errors, stats.retried, stats.delivered, stats.dead_lettered) == (
            2,
            2,
            5,
            0,
        )

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
        assert (stats.send_errors, stats.retried, stats.dead_lettered) == (3, 2, 5)
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
            await until(lambda: len(calls) == 2)
            stats = hub.stats()

        assert (stats.send_errors, stats.retried, stats.delivered) == (1, 1, 1)

    async def test_without_send_timeout(self, ctx):
        """
        With Retry(timeout=None), sends are not cut.
        """
        sink = RecordingSink()
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
        assert stats.send_errors > 0
        assert stats.retried > 0
        assert stats.missed == 0
        assert len(connections) > users
        assert {letter.reason for letter in letters} <= {"sink_closed", "failed"}
        assert all(e.user_id == letter.user_id for letter in letters for e in letter.events)
