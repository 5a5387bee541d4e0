"""
Tests of `usercontext.EmitterHub`'s settings and lifecycle: entering, closing
and draining. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, GateSink

import usercontext as uc

from usercontext.testing import RecordingSink


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
        assert uc.EmitterHub(maxsize=100, max_batch=256)._delivery.max_batch == 50
        assert uc.EmitterHub(maxsize=1, max_batch=256)._delivery.max_batch == 1
        assert uc.EmitterHub(maxsize=1000, max_batch=8)._delivery.max_batch == 8

    def test_settings_are_keywords(self):
        """
        Every setting is passed by keyword: a positional one is refused.
        """
        with pytest.raises(TypeError, match="positional argument"):
            uc.EmitterHub(1000)  # type: ignore[misc]


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
            hub.attach("u-42", RecordingSink())
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
            hub.attach("u-42", RecordingSink())
        assert hub.stats().emitted == 1
        assert hub.stats().users == 0

    async def test_close_drains_everything_in_time(self, ctx):
        """
        Leaving the hub delivers everything buffered to a working sink.
        """
        sink = RecordingSink()
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
            await hub.aclose(timeout=0.05)
            elapsed = anyio.current_time() - started
            await hub.aclose()  # again: returns at once

        assert 0.04 <= elapsed < 1.0
        assert [len(letter.events) for letter in letters] == [10]
        assert letters[0].reason == "hub_closed"
        assert letters[0].error is None
        assert attachment.reason == "hub_closed"
        assert not attachment.attached
        assert hub.stats().dead_lettered == 10
        with pytest.raises(ValueError, match="timeout must be >= 0"):
            await hub.aclose(timeout=-1)

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
                await hub.aclose(timeout=timeout)
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
        sink = RecordingSink()
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
        sink = RecordingSink()
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

        async def broken(_a, _batch, _first):
            raise RuntimeError("bug")

        letters = []
        async with uc.EmitterHub(on_dead_letter=letters.append) as hub:
            monkeypatch.setattr(hub._delivery, "_send", broken)
            attachment = hub.attach("u-42", RecordingSink())
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
            monkeypatch.setattr(hub._delivery, "_sleep", broken)
            attachment = hub.attach("u-42", RecordingSink())
            with anyio.fail_after(5):
                await attachment.wait()

        assert attachment.reason == "failed"
        assert letters == []
