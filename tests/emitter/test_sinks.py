"""
Tests of the sinks shipped with the library: `usercontext.CallbackSink` and
`usercontext.testing.RecordingSink`. Every async test runs on asyncio and on trio.
"""

from __future__ import annotations

import subprocess
import sys

import anyio
import anyio.lowlevel
import pytest

from emitter_helpers import TYPE

import usercontext as uc

from usercontext.testing import RecordingSink


class TestSinks:
    async def test_recording_sink(self):
        """
        The recording sink keeps events and batches, and wait_for returns once
        enough arrived.
        """
        sink = RecordingSink()
        events = [uc.Event(TYPE, None, i, f"a-{i}", 1, "u-42") for i in (1, 2, 3)]
        got = []

        async def waiter(n):
            await sink.wait_for(n)
            got.append(n)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, 3)
            tg.start_soon(waiter, 1)
            await anyio.sleep(0.01)
            await sink.send(events[:1])
            await anyio.sleep(0.01)
            assert got == [1]
            await sink.send(events[1:])
        await sink.wait_for(2)

        assert got == [1, 3]
        assert sink.events == events
        assert sink.batches == [tuple(events[:1]), tuple(events[1:])]
        assert repr(sink) == "<usercontext.testing.RecordingSink(events=3)>"
        assert isinstance(sink, uc.Sink)

    async def test_callback_sink(self):
        """
        The callback sink calls a sync or an async callback with each batch.
        """
        seen = []

        async def acall(events):
            await anyio.lowlevel.checkpoint()
            seen.append(("async", len(events)))

        def scall(events):
            seen.append(("sync", len(events)))

        events = [uc.Event(TYPE, None, 1, "a-1", 1, "u-42")]
        await uc.CallbackSink(acall).send(events)
        await uc.CallbackSink(scall).send(events)

        assert seen == [("async", 1), ("sync", 1)]
        assert repr(uc.CallbackSink(scall)).endswith("scall)>")
        with pytest.raises(TypeError, match="takes a callable"):
            uc.CallbackSink(3)  # type: ignore[arg-type]

    async def test_recording_sink_cancelled_wait_leaves_nothing(self):
        """
        A wait_for that times out leaves no waiter behind in the sink.
        """
        sink = RecordingSink()

        for _ in range(3):
            with anyio.move_on_after(0.001):
                await sink.wait_for(5)

        assert sink._waiters == []


class TestTestingModule:
    def test_imported_only_when_asked(self):
        """
        `import usercontext` does not import `usercontext.testing`, and
        importing it imports no test framework.
        """
        code = (
            "import sys, usercontext\n"
            "assert 'usercontext.testing' not in sys.modules\n"
            "import usercontext.testing\n"
            "assert not {'pytest', 'unittest'} & set(sys.modules), sorted(sys.modules)\n"
            "print(usercontext.testing.RecordingSink.__module__)\n"
        )
        result = subprocess.run(  # noqa: S603  # our own interpreter on our own code
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )

        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "usercontext.testing"
