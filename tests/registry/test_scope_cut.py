"""
Tests of the cut of an async cleanup at the registry's close timeout, on the
way each loop takes: a deadline of a shielding cancel scope on trio (and on
asyncio inside a cancel scope), a timer of the loop on asyncio outside any.
Each holds on both: the cleanup is cancelled at the timeout, and every wait
it starts after is cancelled at once, until it ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import anyio
import pytest

from anyio.lowlevel import checkpoint

from usercontext import Registry, _lifecycle
from usercontext.exceptions import CloseTimeoutError


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

from registry_helpers import settled


TIMEOUT = 0.2


def cut_error(group):
    """
    Return the one error of *group*, checking that it is the cut.
    """
    [error] = group.exceptions
    assert isinstance(error, CloseTimeoutError)
    return error


class TestCut:
    async def test_each_wait_after_the_deadline_is_cut(self, ctx):
        """
        A cleanup that catches the cut and waits again is cancelled again at
        once: it ends at the timeout, not at twice the timeout, and the
        cancellation it lets out is the `CloseTimeoutError`.
        """
        seen = []

        async def stubborn(c):
            yield "db"
            try:
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class():
                seen.append("first wait cut")
            try:
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class():
                seen.append("second wait cut")
                raise

        registry = Registry(close_timeout=TIMEOUT)
        registry.register("db", stubborn)
        start = time.monotonic()
        with pytest.raises(ExceptionGroup) as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
        took = time.monotonic() - start

        assert seen == ["first wait cut", "second wait cut"]
        assert TIMEOUT * 0.9 <= took < TIMEOUT * 1.9
        assert "took longer than its timeout of 0.2 s" in str(cut_error(ei.value))
        settled(registry)

    async def test_a_cleanup_that_only_yields_is_cut(self, ctx):
        """
        A cleanup that never waits on anything but hands the loop a turn at a
        time (a checkpoint in a loop) is cut at the timeout too.
        """
        turns = []

        async def spinning(c):
            yield "db"
            while True:
                await checkpoint()
                turns.append(1)

        registry = Registry(close_timeout=TIMEOUT)
        registry.register("db", spinning)
        start = time.monotonic()
        with pytest.raises(ExceptionGroup) as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
        took = time.monotonic() - start

        cut_error(ei.value)
        assert turns  # it ran until the deadline
        assert TIMEOUT * 0.9 <= took < TIMEOUT * 1.9
        settled(registry)

    async def test_a_cleanup_that_finishes_in_time_is_not_cut(self, ctx):
        """
        A cleanup that waits less than the timeout finishes, and nothing is
        cut after it: the next wait of the same task is not cancelled.
        """
        done = []

        async def quick(c):
            yield "db"
            await anyio.sleep(0.01)
            done.append(True)

        registry = Registry(close_timeout=TIMEOUT)
        registry.register("db", quick)
        async with registry.scope(ctx) as scope:
            await scope.aget("db")
        await anyio.sleep(TIMEOUT * 1.5)  # past the deadline the cleanup had

        assert done == [True]
        settled(registry)

    async def test_before_anyio_ran_on_the_loop(self, ctx, monkeypatch):
        """
        Where anyio's asyncio backend was never loaded (a plain asyncio
        service), a cleanup is cut and finishes the same way.
        """
        monkeypatch.setattr(_lifecycle, "_modules", {})
        done = []

        async def quick(c):
            yield "quick"
            await anyio.sleep(0.01)
            done.append(True)

        async def hanging(c):
            yield "hanging"
            await anyio.sleep(10)

        registry = Registry(close_timeout=TIMEOUT)
        registry.register("quick", quick)
        registry.register("hanging", hanging)
        with pytest.raises(ExceptionGroup) as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("hanging")
                await scope.aget("quick")

        assert done == [True]
        cut_error(ei.value)
        settled(registry)


SCRIPT = """
import asyncio, json, sys
import usercontext as uc

async def main():
    loaded = "anyio._backends._asyncio" in sys.modules
    registry = uc.Registry(close_timeout=0.1)
    closed = []

    async def quick(c):
        yield "quick"
        await asyncio.sleep(0)
        closed.append("quick")

    async def hanging(c):
        yield "hanging"
        await asyncio.sleep(10)

    registry.register("quick", quick)
    registry.register("hanging", hanging)
    ctx = uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")
    async with registry.scope(ctx) as scope:
        await scope.aget("quick")
    try:
        async with registry.scope(ctx) as scope:
            await scope.aget("hanging")
    except ExceptionGroup as e:
        cut = [type(x).__name__ for x in e.exceptions]
    print(json.dumps({"loaded": loaded, "closed": closed, "cut": cut}))

asyncio.run(main())
"""


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the script uses the builtin ExceptionGroup")
def test_plain_asyncio_without_anyio_running():
    """
    On a plain asyncio loop where anyio never ran, an awaiting cleanup
    finishes, and a hanging one is cut at the timeout.
    """
    out = subprocess.run(  # noqa: S603  # our own interpreter and code
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout

    assert json.loads(out) == {"loaded": False, "closed": ["quick"], "cut": ["CloseTimeoutError"]}
