"""
Tests of the cheap delivery paths: the send watchdog (a timer per sink on
asyncio 3.11+, anyio's fail_after elsewhere), and sinks that cannot block,
flushed once per loop turn on asyncio. Every async test runs on asyncio and
on trio, where the same behaviour comes from the general paths.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, GateSink, until

import usercontext as uc

from usercontext._emitter import _delivery
from usercontext._emitter._delivery import Delivery
from usercontext._emitter._state import _Attached, _Stream
from usercontext.testing import RecordingSink


class TestWatchdog:
    async def test_a_later_send_gets_its_own_deadline(self, ctx):
        """
        The watchdog armed by a first send fires during a second, younger
        one: it waits for that send's own deadline instead of cutting it, and
        fires again once idle without harm.
        """
        calls = []

        async def send(events):
            calls.append(len(events))
            if len(calls) == 2:
                await anyio.sleep(0.15)  # past the first send's deadline, within its own

        retry = uc.Retry(attempts=1, timeout=0.3)
        async with uc.EmitterHub(retry=retry) as hub:
            hub.attach("u-42", uc.CallbackSink(send))
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await until(lambda: len(calls) == 1)
            await anyio.sleep(0.2)
            emitter.emit_nowait(TYPE)
            await until(lambda: hub.stats().delivered == 2)
            await anyio.sleep(0.4)  # the re-armed watchdog fires with nothing in flight
            emitter.emit_nowait(TYPE)
            await until(lambda: hub.stats().delivered == 3)
            stats = hub.stats()

        assert calls == [1, 1, 1]
        assert (stats.send_errors, stats.retried, stats.dead_lettered) == (0, 0, 0)

    async def test_a_sink_that_swallows_the_cut_has_delivered(self, ctx):
        """
        A sink that catches the cancellation of its overdue send and returns
        has delivered the batch; its task goes on delivering, and the hub
        closes in time.
        """
        caught = []

        async def send(events):
            if not caught:
                try:
                    await anyio.sleep(5)
                except anyio.get_cancelled_exc_class():
                    caught.append(len(events))

        retry = uc.Retry(attempts=1, timeout=0.02)
        with anyio.fail_after(4):
            async with uc.EmitterHub(retry=retry) as hub:
                hub.attach("u-42", uc.CallbackSink(send))
                await anyio.sleep(0.01)  # its task sleeps
                emitter = hub.emitter(ctx)
                emitter.emit_nowait(TYPE)
                await until(lambda: hub.stats().delivered == 1)
                emitter.emit_nowait(TYPE)
                await until(lambda: hub.stats().delivered == 2)
                stats = hub.stats()

        assert caught == [1]
        assert (stats.send_errors, stats.dead_lettered) == (0, 0)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_watchdog_off_path_is_the_same(self, ctx, monkeypatch):
        """
        Where the watchdog is not available (Python 3.10), asyncio bounds
        each send with fail_after: a hung send is cut and retried the same.
        """
        monkeypatch.setattr(_delivery, "_WATCHDOG", False)
        calls = []

        async def hang_once(events):
            calls.append(len(events))
            if len(calls) == 1:
                await anyio.sleep(10)

        retry = uc.Retry(attempts=2, backoff=0, timeout=0.02)
        async with uc.EmitterHub(retry=retry) as hub:
            assert not hub._delivery.watch
            hub.attach("u-42", uc.CallbackSink(hang_once))
            hub.emitter(ctx).emit_nowait(TYPE)
            await until(lambda: len(calls) == 2)
            stats = hub.stats()

        assert (stats.send_errors, stats.retried, stats.delivered) == (1, 1, 1)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the watchdog needs Task.uncancel()")
def test_another_cancellation_is_not_taken_back():
    """
    When the watchdog and someone else both cancelled the delivery task,
    the watchdog takes back its own cancellation only, and the other one is
    raised.
    """

    async def main():
        task = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        task.cancel()
        task.cancel()
        a = _Attached(_Stream("u-42", 0, 0.0), RecordingSink())
        a.task, a.timed_out = task, True
        taken = Delivery._cut(a)
        still = task.cancelling()
        a.timed_out = True
        alone = Delivery._cut(a)
        with pytest.raises(asyncio.CancelledError):
            await task
        return taken, still, alone, a.timed_out

    assert asyncio.run(main()) == (False, 1, True, False)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="a native cut needs Task.uncancel()")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
class TestNativeCut:
    """
    On asyncio 3.11+ a delivery task has no cancel scope: a detach, or the
    close's deadline, cuts its send in progress by a native cancellation,
    which the task takes back.
    """

    async def test_a_detach_cuts_the_send_and_the_task_ends_cleanly(self, ctx):
        sink = GateSink()
        async with uc.EmitterHub() as hub:
            attachment = hub.attach("u-42", sink)
            a = attachment._attached
            assert a.scope is None
            hub.emitter(ctx).emit_nowait(TYPE)
            await sink.started.wait()
            assert a.cuttable
            dropped = attachment.detach()
            await attachment.wait()
            stats = hub.stats()

        assert (a.task.done(), a.task.cancelled()) == (True, False)
        assert (a.cuts, a.cuttable, a.task.cancelling()) == (0, False, 0)
        assert (dropped, sink.events, attachment.reason) == (1, [], "detached")
        assert (stats.delivered, stats.dead_lettered, stats.send_errors) == (0, 0, 0)

    async def test_a_detach_cuts_the_wait_before_a_retry(self, ctx):
        calls = []

        async def fail(events):
            calls.append(len(events))
            raise OSError("connection reset")

        retry = uc.Retry(attempts=3, backoff=30)
        with anyio.fail_after(4):
            async with uc.EmitterHub(retry=retry) as hub:
                attachment = hub.attach("u-42", uc.CallbackSink(fail))
                hub.emitter(ctx).emit_nowait(TYPE)
                await until(lambda: attachment._attached.cuttable)  # waiting to retry
                attachment.detach()
                await attachment.wait()
                stats = hub.stats()

        assert calls == [1]
        assert not attachment._attached.task.cancelled()
        assert (stats.send_errors, stats.retried, stats.dead_lettered) == (1, 1, 0)

    async def test_another_cancellation_of_a_send_ends_the_task(self, ctx):
        """
        A cancellation the hub did not send (the loop's shutdown, say) is
        not taken back: the task ends cancelled, and its batch goes to the
        dead-letter hook.
        """
        letters = []
        sink = GateSink()
        async with uc.EmitterHub(on_dead_letter=letters.append) as hub:
            attachment = hub.attach("u-42", sink)
            task = attachment._attached.task
            hub.emitter(ctx).emit_nowait(TYPE)
            await sink.started.wait()
            task.cancel()
            await attachment.wait()

        assert task.cancelled()
        assert [(len(d.events), d.reason) for d in letters] == [(1, "hub_closed")]


class TestDirectSinks:
    async def test_each_loop_turn_delivers_in_order(self, ctx, other_ctx):
        """
        A plain-function callback gets each user's events in order, one call
        per turn with what was emitted since, in the hub's context: not the
        context bound where the events were emitted.
        """
        probe = contextvars.ContextVar("probe", default="hub")
        batches: dict[str, list[list[int]]] = {"u-42": [], "u-99": []}
        seen_probe = set()

        def record(events):
            seen_probe.add(probe.get())
            batches[events[0].user_id].append([e.seq for e in events])

        async with uc.EmitterHub() as hub:
            hub.attach("u-42", uc.CallbackSink(record))
            hub.attach("u-99", uc.CallbackSink(record))
            mine, theirs = hub.emitter(ctx), hub.emitter(other_ctx)
            token = probe.set("request")
            try:
                for turn in range(3):
                    for _ in range(turn + 1):
                        mine.emit_nowait(TYPE)
                        theirs.emit_nowait(TYPE)
                    await anyio.sleep(0.01)
            finally:
                probe.reset(token)

        assert batches["u-42"] == batches["u-99"] == [[1], [2, 3], [4, 5, 6]]
        assert seen_probe == {"hub"}

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_no_task_until_one_is_needed(self, ctx):
        """
        A direct sink gets its delivery task only when it needs one: it is
        delivered to by the flushes, and a detach ends its delivery at once,
        with what it did not get counted as dropped.
        """
        seen = []
        async with uc.EmitterHub() as hub:
            attachment = hub.attach("u-42", uc.CallbackSink(seen.append))
            a = attachment._attached
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            await anyio.sleep(0.01)
            emitter.emit_nowait(TYPE)  # detached before the next flush
            assert attachment.detach() == 1
            ended = a.ended
            await attachment.wait()
            stats = hub.stats()

        assert (a.task, ended, attachment.reason) == (None, True, "detached")
        assert [[e.seq for e in batch] for batch in seen] == [[1]]
        assert (stats.delivered, dict(stats.dropped)) == (1, {"detached": 1})

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_replay_is_delivered_without_an_emit(self, ctx):
        """
        Events replayed to a direct sink at its attach are delivered by the
        next flush, with no emit to kick it.
        """
        seen = []
        async with uc.EmitterHub(replay=10) as hub:
            emitter = hub.emitter(ctx)
            for _ in range(3):
                emitter.emit_nowait(TYPE)
            hub.attach("u-42", uc.CallbackSink(seen.append), last_seq=1)
            await anyio.sleep(0.01)
            stats = hub.stats()

        assert [[e.seq for e in batch] for batch in seen] == [[2, 3]]
        assert (stats.delivered, stats.replayed) == (2, 2)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_a_callback_that_cancels_its_task_is_not_handed_over(self, ctx):
        """
        A callback whose task was cancelled while it ran (by the callback
        itself, here) raises: the flush leaves the batch to the cancelled
        task, which gives it to the dead-letter hook as it ends.
        """
        calls = []
        letters = []
        attachment = None

        def callback(events):
            calls.append([e.seq for e in events])
            if len(calls) == 2:
                return  # the task's retry
            if len(calls) == 3:
                attachment._attached.task.cancel()  # the task sleeps: its future is cancelled
            raise OSError("connection reset")

        retry = uc.Retry(attempts=5, backoff=0.01)
        async with uc.EmitterHub(retry=retry, on_dead_letter=letters.append) as hub:
            attachment = hub.attach("u-42", uc.CallbackSink(callback))
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)  # fails: its task is started, and retries
            await until(lambda: hub.stats().delivered == 1)
            await anyio.sleep(0.01)  # the task sleeps, and the flushes deliver
            emitter.emit_nowait(TYPE)
            await attachment.wait()

        assert calls == [[1], [1], [2]]
        assert attachment._attached.task.cancelled()
        assert [(d.reason, len(d.events)) for d in letters] == [("hub_closed", 1)]

    async def test_a_failing_callback_is_retried_by_its_task(self, ctx):
        """
        A callback that raises is retried with the same batch, after a
        backoff, and the events behind it follow in order.
        """
        seen = []

        def flaky(events):
            seen.append([e.seq for e in events])
            if len(seen) == 1:
                raise OSError("connection reset")

        retry = uc.Retry(attempts=2, backoff=0.01)
        async with uc.EmitterHub(retry=retry) as hub:
            hub.attach("u-42", uc.CallbackSink(flaky))
            await anyio.sleep(0.01)  # its task sleeps
            emitter = hub.emitter(ctx)
            emitter.emit_nowait(TYPE)
            emitter.emit_nowait(TYPE)
            await until(lambda: len(seen) >= 1)
            emitter.emit_nowait(TYPE)
            await until(lambda: hub.stats().delivered == 3)
            stats = hub.stats()

        assert seen[:2] == [[1, 2], [1, 2]]
        assert [s for batch in seen[2:] for s in batch] == [3]
        assert (stats.send_errors, stats.retried, stats.delivered) == (1, 1, 3)

    async def test_a_closed_callback_is_given_up(self, ctx):
        """
        A callback that says its connection is closed is given up at once;
        its events go to the dead-letter hook.
        """
        letters = []

        def closed(_events):
            raise uc.SinkClosedError("gone")

        async with uc.EmitterHub(on_dead_letter=letters.append) as hub:
            attachment = hub.attach("u-42", uc.CallbackSink(closed))
            hub.emitter(ctx).emit_nowait(TYPE)
            with anyio.fail_after(5):
                await attachment.wait()

        assert attachment.reason == "sink_closed"
        assert [(letter.reason, len(letter.events)) for letter in letters] == [("sink_closed", 1)]

    async def test_an_awaitable_result_is_awaited_by_its_task(self, ctx):
        """
        A plain function that returns an awaitable has it awaited, under the
        send timeout, before the next batch: order holds.
        """
        seen = []

        async def slow(events):
            await anyio.sleep(0.01)
            seen.extend(e.seq for e in events)

        async with uc.EmitterHub() as hub:
            hub.attach("u-42", uc.CallbackSink(lambda events: slow(events)))  # noqa: PLW0108  # a plain function that returns a coroutine
            await anyio.sleep(0.01)  # its task sleeps: the flush calls the function
            emitter = hub.emitter(ctx)
            for _ in range(3):
                emitter.emit_nowait(TYPE)
                await anyio.lowlevel.checkpoint()
            await until(lambda: hub.stats().delivered == 3)

        assert seen == [1, 2, 3]

    async def test_detached_before_the_flush_gets_nothing(self, ctx):
        """
        A sink detached in the turn its events were emitted gets none of
        them; they are counted as dropped for it.
        """
        seen = []
        async with uc.EmitterHub() as hub:
            attachment = hub.attach("u-42", uc.CallbackSink(seen.extend))
            await anyio.sleep(0.01)  # its task sleeps: the flush would deliver
            hub.emitter(ctx).emit_nowait(TYPE)
            dropped = attachment.detach()
            with anyio.fail_after(5):
                await attachment.wait()
            stats = hub.stats()

        assert (dropped, seen) == (1, [])
        assert stats.dropped == {"detached": 1}

    async def test_the_close_delivers_what_a_flush_has_not(self, ctx):
        """
        Events emitted in the turn the hub closes reach a direct sink through
        its task's drain.
        """
        seen = []
        async with uc.EmitterHub() as hub:
            hub.attach("u-42", uc.CallbackSink(seen.extend))
            await anyio.sleep(0.01)
            emitter = hub.emitter(ctx)
            for _ in range(3):
                emitter.emit_nowait(TYPE)

        assert [e.seq for e in seen] == [1, 2, 3]
        assert hub.stats().delivered == 3


def test_direct_sinks_on_a_loop_without_a_ready_queue(ctx):
    """
    On uvloop, which keeps no deque of ready handles, each flush is
    scheduled by call_soon: the same batches, in order, and a sink that
    fails still gets its retry.
    """
    uvloop = pytest.importorskip("uvloop")
    batches = []

    def record(events):
        batches.append([e.seq for e in events])
        if len(batches) == 2:
            raise OSError("connection reset")

    async def main():
        async with uc.EmitterHub(retry=uc.Retry(backoff=0)) as hub:
            assert hub._delivery._ready is None
            hub.attach("u-42", uc.CallbackSink(record))
            await asyncio.sleep(0.01)
            emitter = hub.emitter(ctx)
            for turn in range(3):
                for _ in range(turn + 1):
                    emitter.emit_nowait(TYPE)
                await asyncio.sleep(0.01)
            return hub.stats()

    stats = uvloop.run(main())

    assert batches == [[1], [2, 3], [2, 3], [4, 5, 6]]
    assert (stats.delivered, stats.retried) == (6, 1)


class TestDirectSinksUnderLoad:
    async def test_a_flush_sends_batches_of_max_batch(self, ctx):
        """
        What a turn emitted reaches a direct sink in batches of at most
        *max_batch* events, in order.
        """
        batches = []
        async with uc.EmitterHub(maxsize=10, max_batch=2) as hub:
            hub.attach(
                "u-42", uc.CallbackSink(lambda events: batches.append([e.seq for e in events]))
            )
            await anyio.sleep(0.01)
            emitter = hub.emitter(ctx)
            for _ in range(5):
                emitter.emit_nowait(TYPE)
            await until(lambda: hub.stats().delivered == 5)
            stats = hub.stats()

        assert batches == [[1, 2], [3, 4], [5]]
        assert stats.peak_pending == 5

    async def test_a_blocked_producer_is_let_in_by_the_flush(self, ctx):
        """
        Under "block", a producer waiting for room in a direct sink's buffer
        gets it once the flush delivered: every event arrives, in order.
        """
        seen = []
        async with uc.EmitterHub(maxsize=2, overflow="block", timeout=5) as hub:
            hub.attach("u-42", uc.CallbackSink(lambda events: seen.extend(e.seq for e in events)))
            await anyio.sleep(0.01)
            emitter = hub.emitter(ctx)
            with anyio.fail_after(5):
                for _ in range(7):
                    await emitter.emit(TYPE)
            await until(lambda: len(seen) == 7)
            stats = hub.stats()

        assert seen == list(range(1, 8))
        assert (stats.delivered, stats.timed_out, stats.dropped) == (7, 0, {})

    async def test_a_callback_that_detaches_its_sink_gets_no_more(self, ctx):
        """
        A callback that detaches its own sink, then fails, gets nothing
        more: the rest of the turn's events are dropped for it, counted, and
        the hub goes on.
        """
        calls = []
        attachments = []

        def detach_and_fail(events):
            calls.append([e.seq for e in events])
            attachments[0].detach()
            raise OSError("gone")

        async with uc.EmitterHub(maxsize=10, max_batch=2) as hub:
            attachments.append(hub.attach("u-42", uc.CallbackSink(detach_and_fail)))
            await anyio.sleep(0.01)
            emitter = hub.emitter(ctx)
            for _ in range(5):
                emitter.emit_nowait(TYPE)
            with anyio.fail_after(5):
                await attachments[0].wait()
            stats = hub.stats()

        assert calls == [[1, 2]]
        assert attachments[0].reason == "detached"
        assert (stats.delivered, stats.dead_lettered, stats.dropped) == (0, 0, {"detached": 5})
