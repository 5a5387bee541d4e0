"""
Tests of attaching and detaching sinks, and of `usercontext.Attachment`. Every
async test runs on asyncio and on trio.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE, GateSink, emit_history

import usercontext as uc

from usercontext._emitter import _state
from usercontext.testing import RecordingSink


class TestAttach:
    async def test_attach_rules(self, ctx, other_ctx):
        """
        attach refuses what is not a sink, a sink attached already or to
        another user, a bad user id, a bad last_seq, and another user's bound
        context.
        """
        sink = RecordingSink()
        async with uc.EmitterHub() as hub:
            hub.attach("u-42", sink)
            with pytest.raises(TypeError, match="it has no send"):
                hub.attach("u-42", object())  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="attached to user 'u-42' already"):
                hub.attach("u-42", sink)
            with pytest.raises(uc.IsolationError, match="one sink \\(one connection\\)"):
                hub.attach("u-99", sink)
            with pytest.raises(ValueError, match="non-empty str"):
                hub.attach("", RecordingSink())
            with pytest.raises(TypeError, match="non-empty str"):
                hub.attach(42, RecordingSink())  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="last_seq"):
                hub.attach("u-42", RecordingSink(), last_seq="x")
            with uc.bind(other_ctx), pytest.raises(uc.IsolationError, match="another user's"):
                hub.attach("u-42", RecordingSink())
            with uc.bind(ctx):
                hub.attach("u-42", RecordingSink())
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
            assert hub.detach("u-42", RecordingSink()) == 0
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

    async def test_peak_pending_counts_sinks_that_ended_behind(self, ctx):
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

        assert (stats.peak_pending, stats.attached) == (15, 0)

    async def test_detached_before_delivery_starts(self, ctx):
        """
        A sink detached before its delivery task ran gets nothing, even a
        replay, and even if its send never yields.
        """
        sink = RecordingSink()
        async with uc.EmitterHub() as hub:
            emit_history(hub, ctx, 3)
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
            attachment = hub.attach("u-42", RecordingSink())

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

        a = _state._Attached(_state._Stream("u-42", 0, 0.0), RecordingSink())
        a.waiter = Done()

        a.wake()

        assert a.waiter is None

    async def test_attachment_as_context_manager(self, ctx):
        """
        Leaving `with` or `async with` an attachment detaches the sink, which
        can then be attached again.
        """
        sink = RecordingSink()
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
