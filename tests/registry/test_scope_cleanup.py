"""
Tests of a scope's cleanup: reverse order, every path, shielded and cut,
errors collected and never masking the body's own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

import anyio
import pytest

from anyio.lowlevel import checkpoint

import usercontext as uc

from usercontext import Registry
from usercontext.exceptions import (
    CloseTimeoutError,
)


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

from registry_helpers import (
    ASYNC_KINDS,
    EXIT_KINDS,
    KINDS,
    SYNC_KINDS,
    BoomError,
    Fatal,
    Tracker,
    fail,
    raises_if,
    settled,
    until,
)


class TestCleanup:
    """
    Cleanup runs for every resource, in reverse order of creation, on every
    path; errors never stop other cleanups and never mask the body's error.
    """

    @pytest.mark.parametrize("outcome", ["success", "error", "cancel"])
    async def test_fifty_in_reverse_order(self, registry, ctx, outcome):
        """
        50 resources of every kind are each closed once, in exactly the reverse
        order of creation, when the body succeeds, raises, or is cancelled from
        an enclosing cancel scope; each cleanup gets the body's exception, and
        async cleanups can still await when the body was cancelled.
        """
        tracker = Tracker(registry, delay=0.001)
        for i in range(50):
            tracker.add(i, KINDS[i % len(KINDS)])

        with anyio.CancelScope() as cs, raises_if(outcome) as raised:
            async with registry.scope(ctx) as scope:
                got = [await scope.aget(i) for i in range(50)]
                assert registry.stats().top[0] == ("0", 1)
                if outcome == "error":
                    raise BoomError("body")
                if outcome == "cancel":
                    cs.cancel()
                    await anyio.sleep_forever()

        assert tracker.created == list(range(50))
        assert tracker.closed == list(range(49, -1, -1))
        assert [r.closed for r in got] == [1] * 50
        assert cs.cancelled_caught is (outcome == "cancel")
        expected = {
            "success": type(None),
            "error": BoomError,
            "cancel": anyio.get_cancelled_exc_class(),
        }[outcome]
        given = {type(tracker.given[i]) for i in range(50) if KINDS[i % len(KINDS)] in EXIT_KINDS}
        assert given == {expected}
        if outcome == "error":
            assert not hasattr(raised.value, "close_errors")
            assert not hasattr(raised.value, "__notes__")
        s = registry.stats()
        assert (s.opened, s.created, s.close_errors) == (1, 50, 0)
        settled(registry)

    @pytest.mark.parametrize("outcome", ["success", "error"])
    def test_fifty_in_reverse_order_sync(self, registry, ctx, outcome):
        """
        In a sync scope too, 50 resources of each sync kind are closed once, in
        reverse order, whether the body succeeds or raises.
        """
        tracker = Tracker(registry)
        for i in range(50):
            tracker.add(i, SYNC_KINDS[i % len(SYNC_KINDS)])

        with raises_if(outcome), registry.scope(ctx) as scope:
            got = [scope.get(i) for i in range(50)]
            if outcome == "error":
                raise BoomError("body")

        assert tracker.closed == list(range(49, -1, -1))
        assert [r.closed for r in got] == [1] * 50
        settled(registry)

    async def test_three_of_ten_fail_body_succeeds(self, registry, ctx, caplog):
        """
        When 3 of 10 cleanups raise and the body succeeded, the other 7 still
        run, and the 3 errors are raised as one ExceptionGroup, in cleanup
        order, and logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, KINDS[i % len(KINDS)])
        tracker.fail.update({2, 5, 8})

        with pytest.raises(ExceptionGroup) as ei:
            async with registry.scope(ctx) as scope:
                for i in range(10):
                    await scope.aget(i)

        assert tracker.closed == list(range(9, -1, -1))
        group = ei.value
        assert group.message == "3 cleanup(s) of a scope of user 'u-42' failed"
        assert [str(e) for e in group.exceptions] == [f"cleanup of {i}" for i in (8, 5, 2)]
        assert all(type(e) is BoomError for e in group.exceptions)
        assert [r.getMessage() for r in caplog.records] == [
            f"A cleanup of a scope of user 'u-42' failed: BoomError: cleanup of {i}"
            for i in (8, 5, 2)
        ]
        assert registry.stats().close_errors == 3
        settled(registry)

    async def test_three_of_ten_fail_body_fails(self, registry, ctx, caplog):
        """
        When the body raised too, its exception propagates with its type (an
        `except ValueError` catches it), the 3 cleanup errors attached as notes
        and as `close_errors`, and logged; the other 7 cleanups ran.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, KINDS[i % len(KINDS)])
        tracker.fail.update({2, 5, 8})
        body_error = ValueError("body")
        caught = None

        try:
            async with registry.scope(ctx) as scope:
                for i in range(10):
                    await scope.aget(i)
                raise body_error
        except ValueError as e:
            caught = e

        assert caught is body_error
        assert tracker.closed == list(range(9, -1, -1))
        assert [str(e) for e in caught.close_errors] == [f"cleanup of {i}" for i in (8, 5, 2)]
        assert caught.__notes__ == [
            f"While cleaning up the scope: BoomError: cleanup of {i}" for i in (8, 5, 2)
        ]
        assert [(r.name, r.levelno) for r in caplog.records] == [("usercontext", logging.ERROR)] * 3
        assert registry.stats().close_errors == 3
        settled(registry)

    def test_three_of_ten_fail_sync(self, registry, ctx, caplog):
        """
        In the sync form, 3 failing cleanups of 10 are raised as one group of
        3 after the other 7 ran.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, SYNC_KINDS[i % len(SYNC_KINDS)])
        tracker.fail.update({3, 5, 7})

        with pytest.raises(ExceptionGroup) as ei, registry.scope(ctx) as scope:
            for i in range(10):
                scope.get(i)

        assert [str(e) for e in ei.value.exceptions] == [f"cleanup of {i}" for i in (7, 5, 3)]
        assert tracker.closed == list(range(9, -1, -1))
        assert len(caplog.records) == 3
        assert registry.stats().close_errors == 3
        settled(registry)

    def test_three_of_ten_fail_sync_body_fails(self, registry, ctx, caplog):
        """
        In the sync form with no event loop running (a thread, a WSGI app),
        the body's ValueError propagates with the 3 cleanup errors attached
        after the other 7 cleanups ran.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, SYNC_KINDS[i % len(SYNC_KINDS)])
        tracker.fail.update({3, 5, 7})

        with pytest.raises(ValueError, match=r"^body") as ei, registry.scope(ctx) as scope:
            for i in range(10):
                scope.get(i)
            raise ValueError("body")

        assert [str(e) for e in ei.value.close_errors] == [f"cleanup of {i}" for i in (7, 5, 3)]
        assert len(ei.value.__notes__) == 3
        assert tracker.closed == list(range(9, -1, -1))
        assert len(caplog.records) == 3
        settled(registry)

    async def test_close_runs_after_a_failing_exit(self, registry, ctx):
        """
        A resource's close still runs when its exit raised, in both forms; both
        errors are reported, exit's first.
        """
        closed = []

        def gen(c):
            yield "db"
            raise BoomError("exit")

        def close(value):
            closed.append(value)
            raise BoomError("close")

        registry.register("db", gen, close=close)
        with pytest.raises(ExceptionGroup) as async_ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
        with pytest.raises(ExceptionGroup) as sync_ei, registry.scope(ctx) as scope:
            scope.get("db")

        assert closed == ["db", "db"]
        for ei in (async_ei, sync_ei):
            assert [str(e) for e in ei.value.exceptions] == ["exit", "close"]
        assert registry.stats().close_errors == 4

    async def test_nested_scopes_add_up_close_errors(self, registry, ctx):
        """
        A body error leaving two nested scopes carries the cleanup errors of
        both, inner first.
        """
        registry.register("inner", lambda c: "inner", close=fail)
        registry.register("outer", lambda c: "outer", close=fail)

        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as outer:
                await outer.aget("outer")
                async with registry.scope(ctx) as inner:
                    await inner.aget("inner")
                    raise ValueError("body")

        assert [str(e) for e in ei.value.close_errors] == ["inner", "outer"]
        assert registry.stats().close_errors == 2

    @pytest.mark.parametrize("kind", ["gen", "async_gen"])
    async def test_generator_sees_the_body_error(self, registry, ctx, kind):
        """
        A generator's try/finally runs with the body's exception in flight, as
        under contextlib; re-raising it is no cleanup error. Without an error,
        the finally sees none.
        """
        seen = []

        def gen(c):
            try:
                yield "db"
            finally:
                seen.append(sys.exc_info()[1])

        async def agen(c):
            try:
                yield "db"
            finally:
                seen.append(sys.exc_info()[1])

        registry.register("db", gen if kind == "gen" else agen)
        body_error = ValueError("body")

        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                raise body_error
        async with registry.scope(ctx) as scope:
            await scope.aget("db")

        assert seen == [body_error, None]
        assert ei.value is body_error
        assert not hasattr(body_error, "close_errors")
        assert registry.stats().close_errors == 0

    @pytest.mark.parametrize("kind", ["gen", "async_gen", "sync_cm"])
    async def test_cleanup_cannot_swallow_the_body_error(self, registry, ctx, kind):
        """
        A generator that catches the body's exception and returns, or an exit
        that returns True, does not suppress it: the body's error still
        propagates, and it is no cleanup error.
        """
        swallowed = []

        def gen(c):
            try:
                yield "db"
            except ValueError as e:
                swallowed.append(e)

        async def agen(c):
            try:
                yield "db"
            except ValueError as e:
                swallowed.append(e)

        class Suppressing:
            def __enter__(self):
                return "db"

            def __exit__(self, exc_type, exc, tb):
                swallowed.append(exc)
                return True

        provider = {"gen": gen, "async_gen": agen, "sync_cm": lambda c: Suppressing()}[kind]
        registry.register("db", provider)

        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                raise ValueError("body")

        assert swallowed == [ei.value]
        assert registry.stats().close_errors == 0

    @pytest.mark.parametrize("kind", ["gen", "async_gen"])
    async def test_generator_raising_another_error(self, registry, ctx, kind):
        """
        A generator that answers the body's exception with another one is a
        cleanup error, chained to the body's.
        """

        def gen(c):
            try:
                yield "db"
            except ValueError as e:
                raise BoomError("cleanup") from e

        async def agen(c):
            try:
                yield "db"
            except ValueError as e:
                raise BoomError("cleanup") from e

        registry.register("db", gen if kind == "gen" else agen)
        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                raise ValueError("body")

        [error] = ei.value.close_errors
        assert isinstance(error, BoomError)
        assert error.__cause__ is ei.value
        assert ei.value.__notes__ == ["While cleaning up the scope: BoomError: cleanup"]

    @pytest.mark.parametrize("kind", ["gen", "async_gen"])
    @pytest.mark.parametrize("body_fails", [False, True])
    async def test_generator_yielding_twice(self, registry, ctx, kind, body_fails):
        """
        A generator that yields again instead of finishing is closed (its
        finally runs) and reported as a RuntimeError.
        """
        finished = []

        def gen(c):
            try:
                while True:
                    with contextlib.suppress(ValueError):
                        yield "db"
            finally:
                finished.append(True)

        async def agen(c):
            try:
                while True:
                    with contextlib.suppress(ValueError):
                        yield "db"
            finally:
                finished.append(True)

        registry.register("db", gen if kind == "gen" else agen)
        expected = ExceptionGroup if not body_fails else ValueError
        with pytest.raises(expected) as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                if body_fails:
                    raise ValueError("body")

        errors = ei.value.close_errors if body_fails else ei.value.exceptions
        [error] = errors
        assert type(error) is RuntimeError
        what = "yielded again after an exception" if body_fails else "yielded more than once"
        assert str(error).endswith(f" {what}.")
        assert finished == [True]

    @pytest.mark.parametrize("where", ["sync_close", "async_close", "gen"])
    async def test_fatal_cleanup_error_runs_the_others(self, registry, ctx, where):
        """
        A BaseException that is no Exception (KeyboardInterrupt, SystemExit)
        from one cleanup propagates, but only after every other cleanup ran,
        as with contextlib.ExitStack: nothing is left open.
        """
        closed = []

        def sync_close(value):
            raise Fatal

        async def async_close(value):
            await checkpoint()
            raise Fatal

        def gen(c):
            yield "fatal"
            raise Fatal

        for key in ("a", "b"):
            registry.register(key, lambda c, key=key: key, close=closed.append)
        if where == "gen":
            registry.register("fatal", gen)
        else:
            close = sync_close if where == "sync_close" else async_close
            registry.register("fatal", lambda c: "fatal", close=close)

        with pytest.raises(Fatal):
            async with registry.scope(ctx) as scope:
                for key in ("a", "fatal", "b"):
                    await scope.aget(key)

        assert closed == ["b", "a"]
        settled(registry)

    @pytest.mark.parametrize("body_fails", [False, True])
    def test_generator_yielding_twice_sync(self, registry, ctx, body_fails):
        """
        In a sync scope too, a generator that yields again instead of
        finishing is closed and reported as a RuntimeError.
        """
        finished = []

        def gen(c):
            try:
                while True:
                    with contextlib.suppress(ValueError):
                        yield "db"
            finally:
                finished.append(True)

        registry.register("db", gen)
        expected = ValueError if body_fails else ExceptionGroup
        with pytest.raises(expected) as ei, registry.scope(ctx) as scope:
            scope.get("db")
            if body_fails:
                raise ValueError("body")

        errors = ei.value.close_errors if body_fails else ei.value.exceptions
        [error] = errors
        assert type(error) is RuntimeError
        what = "yielded again after an exception" if body_fails else "yielded more than once"
        assert str(error).endswith(f" {what}.")
        assert finished == [True]
        settled(registry)

    def test_fatal_cleanup_error_runs_the_others_sync(self, registry, ctx):
        """
        In a sync scope too, a fatal error from one cleanup does not skip the
        cleanups of resources created before it.
        """
        closed = []

        def fatal(value):
            raise Fatal

        registry.register("a", lambda c: "a", close=closed.append)
        registry.register("fatal", lambda c: "fatal", close=fatal)

        with pytest.raises(Fatal), registry.scope(ctx) as scope:
            scope.get("a")
            scope.get("fatal")

        assert closed == ["a"]
        settled(registry)

    def test_get_in_a_cleanup_of_a_closed_key_sync(self, registry, ctx):
        """
        A cleanup that asks its scope for a key whose resource is closed
        already gets a new one, which the scope closes in turn: nothing closed
        is handed out, and nothing is left open.
        """
        events = []

        def b(_ctx):
            events.append("open b")
            yield "b"
            events.append("close b")

        def a(_ctx):
            events.append("open a")
            yield "a"
            events.append(f"close a, got {scope.get('b')}")

        registry.register("a", a)
        registry.register("b", b)

        with registry.scope(ctx) as scope:
            scope.get("a")
            scope.get("b")

        assert events == ["open a", "open b", "close b", "open b", "close a, got b", "close b"]
        stats = registry.stats()
        assert (stats.created, stats.closed, stats.in_use, stats.scopes) == (3, 3, 0, 0)
        settled(registry)


class TestCleanupUnderPressure:
    """
    Async cleanups are shielded from cancellation and bounded by the
    registry's close_timeout.
    """

    @pytest.mark.parametrize("body", ["succeeds", "cancelled"])
    async def test_cancelled_again_during_cleanup(self, registry, ctx, body):
        """
        Cancelling the request again, and its caller, while its async cleanups
        await does not cut them: all 10 run to the end, in reverse order, and
        the cancellation then takes effect.
        """
        tracker = Tracker(registry, delay=0.01)
        for i in range(10):
            tracker.add(i, ASYNC_KINDS[i % len(ASYNC_KINDS)])
        request_scope = anyio.CancelScope()
        after_cleanup = []

        async def request():
            with request_scope:
                async with registry.scope(ctx) as scope:
                    for i in range(10):
                        await scope.aget(i)
                    if body == "cancelled":
                        request_scope.cancel()
                        await anyio.sleep_forever()
                after_cleanup.append(True)
                await checkpoint()
                after_cleanup.append(False)  # never: the request is cancelled

        async def canceller():
            await until(lambda: tracker.closed)
            request_scope.cancel()
            outer.cancel()

        start = time.monotonic()
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                tg.start_soon(canceller)

        assert tracker.closed == list(range(9, -1, -1))
        assert time.monotonic() - start >= 10 * 0.01
        assert after_cleanup == ([True] if body == "succeeds" else [])
        assert request_scope.cancelled_caught or outer.cancelled_caught
        settled(registry)

    @pytest.mark.parametrize("kind", ASYNC_KINDS)
    async def test_hanging_cleanup_cut_at_timeout(self, ctx, caplog, kind):
        """
        A cleanup that hangs is cancelled after close_timeout (0.3 s, give or
        take 0.1 s); the cleanups after it still run, and the
        CloseTimeoutError (a TimeoutError) is raised and logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        registry = Registry(close_timeout=0.3)
        tracker = Tracker(registry)
        tracker.add(0, "gen")
        tracker.add(1, kind)
        tracker.add(2, "async_gen")
        tracker.hang.add(1)

        with pytest.raises(ExceptionGroup) as ei:
            async with registry.scope(ctx) as scope:
                for i in range(3):
                    await scope.aget(i)

        assert tracker.closed == [2, 0]
        assert tracker.cut == [1]
        assert abs(tracker.times[0] - tracker.times[2] - 0.3) <= 0.1
        [error] = ei.value.exceptions
        assert isinstance(error, CloseTimeoutError)
        assert isinstance(error, TimeoutError)
        assert str(error) == (
            "Closing resource 1 took longer than its timeout of 0.3 s and was cut. "
            "Make the cleanup faster or raise the timeout."
        )
        assert [r.getMessage() for r in caplog.records] == [
            f"A cleanup of a scope of user 'u-42' failed: CloseTimeoutError: {error}"
        ]
        assert registry.stats().close_errors == 1
        settled(registry)

    async def test_hanging_cleanup_with_a_failing_body(self, ctx):
        """
        When the body failed, a cleanup cut at the timeout is attached to the
        body's error; each hanging cleanup gets its own timeout.
        """
        registry = Registry(close_timeout=0.3)
        tracker = Tracker(registry)
        for i in range(3):
            tracker.add(i, "async_gen")
        tracker.hang.update({0, 1})

        start = time.monotonic()
        with pytest.raises(BoomError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                for i in range(3):
                    await scope.aget(i)
                raise BoomError("body")

        assert abs(time.monotonic() - start - 0.6) <= 0.15
        assert tracker.closed == [2]
        assert tracker.cut == [1, 0]
        assert [type(e) for e in ei.value.close_errors] == [CloseTimeoutError] * 2
        assert [str(e).split(" took")[0] for e in ei.value.close_errors] == [
            "Closing resource 1",
            "Closing resource 0",
        ]
        settled(registry)

    async def test_cancelled_body_with_failing_cleanup(self, registry, ctx, caplog):
        """
        A cancelled body's cancellation propagates unchanged, with no notes;
        a failing cleanup is logged and counted.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        registry.register("db", lambda c: "db", close=fail)
        registry.register("cache", lambda c: "cache")

        cancelled = []

        with anyio.CancelScope() as cs:
            try:
                async with registry.scope(ctx) as scope:
                    await scope.aget("db")
                    await scope.aget("cache")
                    cs.cancel()
                    await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class() as e:
                cancelled.append(e)
                raise

        assert cs.cancelled_caught
        [e] = cancelled
        assert not hasattr(e, "__notes__")
        assert not hasattr(e, "close_errors")
        assert [r.getMessage() for r in caplog.records] == [
            "A cleanup of a scope of user 'u-42' failed: BoomError: db"
        ]
        assert registry.stats().close_errors == 1
        settled(registry)


class TestCleanupWithoutAwait:
    """
    An async generator whose code has no await cannot suspend in its cleanup,
    so the shielded, bounded cancel scope is left out for it: a cancellation
    could not reach it, nor a deadline cut it. Every other async cleanup is
    shielded from its first step.
    """

    async def test_only_awaiting_cleanups_get_a_cancel_scope(self, registry, ctx):
        """
        The cleanup of an async generator without await sees no deadline of
        its own; one with an await sees the cleanup timeout as its deadline.
        Both run, in reverse order, with the scope's context bound.
        """
        seen = []

        async def no_await(c):
            yield "no_await"
            seen.append(("no_await", anyio.current_effective_deadline(), uc.current()))

        async def awaiting(c):
            yield "awaiting"
            await checkpoint()
            seen.append(("awaiting", anyio.current_effective_deadline(), uc.current()))

        registry.register("awaiting", awaiting)
        registry.register("no_await", no_await)
        # Inside a cancel scope (as in any task group): there the cleanup
        # timeout is a scope's deadline. Outside any, on asyncio, it is a timer
        # of the loop (test_scope_cut.py).
        with anyio.CancelScope():
            async with registry.scope(ctx) as scope:
                await scope.aget("awaiting")
                await scope.aget("no_await")
                start = anyio.current_time()

        [(first, unbounded, ctx1), (second, deadline, ctx2)] = seen
        assert (first, second) == ("no_await", "awaiting")
        assert unbounded == math.inf
        assert 4.0 < deadline - start < 6.0  # the default close_timeout, 5 s
        assert ctx1 is ctx2 is ctx
        settled(registry)

    async def test_cancelled_body(self, registry, ctx):
        """
        When the body was cancelled, an async generator without await is
        thrown the cancellation and finishes; the cancellation propagates.
        """
        given = []

        async def no_await(c):
            try:
                yield "db"
            except BaseException as e:
                given.append(e)
                raise

        registry.register("db", no_await)
        with anyio.CancelScope() as cs:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                cs.cancel()
                await anyio.sleep_forever()

        assert cs.cancelled_caught
        [e] = given
        assert isinstance(e, anyio.get_cancelled_exc_class())
        assert registry.stats().close_errors == 0
        settled(registry)

    async def test_provider_switching_generators(self, registry, ctx):
        """
        A provider may return an async generator with an await in one scope
        and one without in the next: each is cleaned up as what it is.
        """
        deadlines = []

        async def no_await(c):
            yield "no_await"
            deadlines.append(anyio.current_effective_deadline())

        async def awaiting(c):
            yield "awaiting"
            await checkpoint()
            deadlines.append(anyio.current_effective_deadline())

        made = iter([awaiting, no_await, awaiting, no_await])

        def provider(c):
            return next(made)(c)

        registry.register("db", provider)
        with anyio.CancelScope():  # see test_only_awaiting_cleanups_get_a_cancel_scope
            for expected in ("awaiting", "no_await", "awaiting", "no_await"):
                async with registry.scope(ctx) as scope:
                    assert await scope.aget("db") == expected

        assert [d == math.inf for d in deadlines] == [False, True, False, True]
        settled(registry)

    @pytest.mark.parametrize("first", ["checkpoint_if_cancelled", "sleep", "fail_after"])
    async def test_first_step_of_an_awaiting_cleanup_is_shielded(self, ctx, first):
        """
        An awaiting cleanup runs inside its shielded scope from its first
        step: in a cancelled body it can check for cancellation, sleep, or
        open a cancel scope of its own at once, and it finishes, on both
        loops. Run before the scope was entered, the same first step would
        leave cancel scopes exited out of order (or, on trio, make
        `checkpoint_if_cancelled` fail).
        """
        done = []

        async def cleanup():
            if first == "checkpoint_if_cancelled":
                await anyio.lowlevel.checkpoint_if_cancelled()
                await anyio.sleep(0.01)
            elif first == "sleep":
                await anyio.sleep(0.01)
            else:
                with anyio.fail_after(1):
                    await anyio.sleep(0.01)
            done.append(True)

        async def agen(c):
            try:
                yield "db"
            finally:
                await cleanup()

        registry = Registry(close_timeout=1)
        registry.register("db", agen)
        with anyio.CancelScope() as cs:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                cs.cancel()
                await anyio.sleep_forever()

        assert done == [True]
        assert cs.cancelled_caught
        assert registry.stats().close_errors == 0
