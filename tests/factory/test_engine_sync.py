"""
Tests of `with EngineFactory.engine()`: the same contract for threads, on a
`ThreadQuota`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import warnings

from collections import Counter

import anyio
import pytest

from factory_helpers import (
    BoomError,
    Engine,
    close_engine,
    make_engine,
    try_sync,
    user,
)

import usercontext as uc

from usercontext import EngineFactory, ThreadQuota
from usercontext.exceptions import (
    FactoryClosedError,
    IsolationError,
    NoContextError,
    QuotaExceededError,
    QuotaTimeoutError,
)


class TestEngineSync:
    """
    ``with EngineFactory.engine()``: the same contract for threads, on a ThreadQuota.
    """

    def test_sync_create_kinds(self, ctx):
        """
        create may return an engine or a sync context manager; the engine is
        used with ctx bound, then exited and closed.
        """
        events = []

        @contextlib.contextmanager
        def cm_create(c):
            events.append("enter")
            yield Engine(c.user_id)
            events.append("exit")

        for create in (make_engine, cm_create):
            factory = EngineFactory(create, close=close_engine)
            with factory.engine(ctx) as engine:
                assert uc.current() is ctx
                assert factory.stats().in_use == 1
                assert factory._thread_quota.stats().in_use == 1
            assert engine.closed == 1
            assert uc.current_or_none() is None
            s = factory.stats()
            assert (s.created, s.closed, s.in_use, s.peak) == (1, 1, 0, 1)
            assert factory._thread_quota.stats().in_use == 0
        assert events == ["enter", "exit"]

    def test_sync_generator_create(self, ctx):
        """
        `with factory.engine()` takes a generator create: its cleanup runs on exit, with the
        body's error thrown in.
        """
        events = []

        def gen(c):
            try:
                yield Engine(c.user_id)
            except KeyError:
                events.append("saw the error")
                raise
            events.append("cleanup")

        factory = EngineFactory(gen)
        with factory.engine(ctx) as engine:
            assert isinstance(engine, Engine)
        with pytest.raises(KeyError), factory.engine(ctx):
            raise KeyError("body")
        assert events == ["cleanup", "saw the error"]
        s = factory.stats()
        assert (s.created, s.closed, s.close_errors) == (2, 2, 0)

    def test_sync_generator_that_never_yields(self, ctx):
        """
        In `with` too, a generator create that returns without yielding
        raises a clear RuntimeError (never a bare StopIteration).
        """

        def gen(c):
            return
            yield

        factory = EngineFactory(gen)
        with pytest.raises(RuntimeError, match="without yielding"), factory.engine(ctx):
            pass
        assert factory.stats().create_errors == 1
        assert factory._thread_quota.stats().in_use == 0

    def test_threads(self):
        """
        16 threads x 200 cycles, 4 users, per_user=2: each user never has more
        than 2 engines, each engine sees its own user's context, and every
        engine is closed.
        """
        factory = EngineFactory(make_engine, close=close_engine, per_user=2)
        users = [user(f"u-{i}") for i in range(4)]
        lock = threading.Lock()
        active = Counter()
        peaks = Counter()
        errors = []
        barrier = threading.Barrier(16)

        def work(n):
            try:
                barrier.wait()
                for i in range(200):
                    c = users[(n + i) % 4]
                    with factory.engine(c) as engine:
                        assert uc.current() is c
                        assert engine.user_id == c.user_id
                        with lock:
                            active[c.user_id] += 1
                            peaks[c.user_id] = max(peaks[c.user_id], active[c.user_id])
                        time.sleep(0)
                        with lock:
                            active[c.user_id] -= 1
                    assert engine.closed == 1
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert max(peaks.values()) <= 2
        s = factory.stats()
        assert (s.created, s.closed, s.in_use, s.create_errors, s.close_errors) == (
            3200,
            3200,
            0,
            0,
            0,
        )
        assert s.peak <= 8
        q = factory._thread_quota.stats()
        assert (q.granted, q.in_use, q.waiting, q.keys) == (3200, 0, 0, 0)

    def test_refuses_async_create(self, ctx):
        """
        `with factory.engine()` refuses an async create with TypeError, without leaving a
        never-awaited coroutine behind, and releases the slot.
        """

        async def create(c):
            return Engine(c.user_id)

        class Awaitable:
            def __await__(self):
                yield

        for hook in (create, lambda c: Awaitable()):
            factory = EngineFactory(hook)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with (
                    pytest.raises(
                        TypeError,
                        match=r"The create function is asynchronous \(it returned an awaitable\)",
                    ),
                    factory.engine(ctx),
                ):
                    pass
                gc.collect()
            assert caught == []
            s = factory.stats()
            assert (s.create_errors, s.created, s.in_use) == (1, 0, 0)
            assert factory._thread_quota.stats().in_use == 0
            assert uc.current_or_none() is None

    @pytest.mark.parametrize("kind", ["async_cm", "async_generator"])
    def test_refuses_async_context_managers(self, ctx, kind):
        """
        `with factory.engine()` refuses a create returning an async context manager or an
        async generator with TypeError, instead of handing it out as the engine.
        """

        @contextlib.asynccontextmanager
        async def async_cm(c):
            yield Engine(c.user_id)

        async def agen(c):
            yield Engine(c.user_id)

        factory = EngineFactory(async_cm if kind == "async_cm" else agen)
        with (
            pytest.raises(
                TypeError, match=r"create function is asynchronous \(it returned an async"
            ),
            factory.engine(ctx),
        ):
            pass
        assert factory.stats().create_errors == 1
        assert factory._thread_quota.stats().in_use == 0

    def test_refuses_async_close(self, ctx):
        """
        `with factory.engine()` refuses an async close with TypeError, without leaving a
        never-awaited coroutine behind, and releases the slot.
        """
        closed = []

        async def close(engine):
            closed.append(engine)

        factory = EngineFactory(make_engine, close=close)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with (
                pytest.raises(
                    TypeError, match=r"The close hook of an engine of user 'u-42' is asynchronous"
                ),
                factory.engine(ctx),
            ):
                pass
            gc.collect()
        assert caught == []
        assert closed == []
        s = factory.stats()
        assert (s.close_errors, s.in_use) == (1, 0)
        assert factory._thread_quota.stats().in_use == 0

    def test_errors(self, ctx, caplog):
        """
        As with engine(): create errors are counted and release the slot, a
        body's error propagates with close errors as notes, and a close error
        after a good body is raised.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def failing_create(c):
            raise BoomError("create")

        factory = EngineFactory(failing_create)
        with pytest.raises(BoomError, match="create"), factory.engine(ctx):
            pass
        assert factory.stats().create_errors == 1
        assert factory._thread_quota.stats().in_use == 0

        @contextlib.contextmanager
        def create(c):
            try:
                yield Engine(c.user_id)
            finally:
                raise BoomError("exit")

        def close(engine):
            raise RuntimeError("close")

        factory = EngineFactory(create, close=close)
        with pytest.raises(KeyError) as ei, factory.engine(ctx):
            raise KeyError("body")
        assert ei.value.__notes__ == [
            "While closing its engine: BoomError: exit",
            "While closing its engine: RuntimeError: close",
        ]
        assert len(caplog.records) == 2

        with pytest.raises(BoomError, match="exit") as ei, factory.engine(ctx):
            pass
        assert ei.value.__notes__ == ["While closing its engine: RuntimeError: close"]
        s = factory.stats()
        assert (s.created, s.closed, s.close_errors, s.in_use) == (2, 2, 4, 0)
        assert factory._thread_quota.stats().in_use == 0

    def test_rejected_and_timed_out(self, ctx):
        """
        With timeout=0 a full thread quota refuses at once (rejected); with
        timeout>0 a thread waits (counted as waiting), then times out.
        """
        factory = EngineFactory(make_engine, per_user=1, timeout=0)
        with factory.engine(ctx):
            outcome = []
            t = threading.Thread(target=lambda: outcome.append(try_sync(factory, ctx)))
            t.start()
            t.join(5)
            assert isinstance(outcome[0], QuotaExceededError)
        s, q = factory.stats(), factory.stats().thread_quota
        assert (q.rejected, q.timed_out, s.created, s.closed) == (1, 0, 1, 1)
        assert factory.stats().quota.rejected == 0  # the other colour's quota

        factory = EngineFactory(make_engine, per_user=1, timeout=0.2)
        with factory.engine(ctx):
            outcome = []
            t = threading.Thread(target=lambda: outcome.append(try_sync(factory, ctx)))
            t.start()
            deadline = time.monotonic() + 5
            while factory.stats().thread_quota.waiting != 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert factory.stats().thread_quota.waiting == 1
            t.join(5)
            assert isinstance(outcome[0], QuotaTimeoutError)
        s, q = factory.stats(), factory.stats().thread_quota
        assert (q.rejected, q.timed_out, q.waiting, s.in_use) == (0, 1, 0, 0)

    def test_context(self, ctx, other_ctx):
        """
        engine() uses current() by default, raises NoContextError without
        one, and IsolationError for another user's context, taking nothing.
        """
        factory = EngineFactory(make_engine, thread_quota=ThreadQuota(per_key=1))
        with pytest.raises(NoContextError), factory.engine():
            pass
        with uc.bind(ctx):
            with factory.engine() as engine:
                assert uc.current() is ctx
            with pytest.raises(IsolationError), factory.engine(other_ctx):
                pass
        assert engine.user_id == "u-42"
        assert factory._thread_quota.stats().granted == 1
        assert factory.stats().created == 1

    def test_closed_factory(self, ctx):
        """
        After aclose(), engine() raises FactoryClosedError.
        """
        factory = EngineFactory(make_engine)
        anyio.run(factory.aclose)
        with pytest.raises(FactoryClosedError), factory.engine(ctx):
            pass

    def test_thread_quota_made_once(self, ctx):
        """
        When two threads make the lazy thread quota at once, both use the one
        made first.
        """
        factory = EngineFactory(make_engine)
        winner = ThreadQuota(per_key=2)
        real_lock = factory._sync_lock

        class RacingLock:
            """
            Lets "another thread" install its quota just before this one looks.
            """

            def __enter__(self):
                real_lock.acquire()
                factory._thread_quota = winner
                factory._sync_lock = real_lock

            def __exit__(self, *exc):
                real_lock.release()

        factory._sync_lock = RacingLock()
        with factory.engine(ctx):
            assert winner.stats().in_use == 1
        assert factory._thread_quota is winner

    async def test_stats_combine_both_paths(self, ctx):
        """
        stats() adds the engines of engine() and engine(), and the waiters
        of both quotas.
        """
        factory = EngineFactory(make_engine, per_user=1)
        async with factory.engine(ctx):
            with factory.engine(ctx):
                s = factory.stats()
                assert (s.in_use, s.created, s.peak) == (2, 2, 1)
                assert s.top == (("u-42", 2),)
        s = factory.stats()
        assert (s.in_use, s.created, s.closed) == (0, 2, 2)


class TestOneObjectBothColours:
    """
    `factory.engine(ctx)` serves `with` and `async with` alike.
    """

    async def test_both_colours_one_factory(self, ctx):
        """
        The same factory hands out engines to `with` (on its thread quota)
        and `async with` (on its quota); the stats add both up and nest both
        quotas' stats.
        """
        factory = EngineFactory(make_engine, close=close_engine)
        assert factory.stats().thread_quota is None
        use = factory.engine(ctx)
        assert isinstance(use, uc.EngineUse)
        with use as a:
            async with factory.engine(ctx) as b:
                s = factory.stats()
                assert (s.in_use, s.top, s.peak) == (2, (("u-42", 2),), 1)
                assert (s.quota.in_use, s.thread_quota.in_use) == (1, 1)
        assert (a.closed, b.closed) == (1, 1)
        s = factory.stats()
        assert (s.created, s.closed, s.in_use) == (2, 2, 0)

    def test_enters_dual_context_managers_the_sync_way(self, ctx):
        """
        A create returning an object that is both a context manager and an
        async one is entered with `with`, as Scope.get does.
        """
        factory = EngineFactory(lambda c: contextlib.nullcontext(Engine(c.user_id)))
        with factory.engine(ctx) as engine:
            assert engine.user_id == "u-42"
        assert factory.stats().closed == 1

    def test_fatal_error_of_an_exit_still_closes(self, ctx, caplog):
        """
        A KeyboardInterrupt from the engine's exit is raised after the close
        hook ran, with the close hook's error logged and listed.
        """

        class Interrupt(BaseException):
            pass

        @contextlib.contextmanager
        def create(c):
            yield Engine(c.user_id)
            raise Interrupt

        def close(engine):
            raise BoomError(engine.user_id)

        factory = EngineFactory(create, close=close)
        with (
            caplog.at_level(logging.ERROR, "usercontext"),
            pytest.raises(Interrupt) as ei,
            factory.engine(ctx),
        ):
            pass
        assert [str(e) for e in ei.value.close_errors] == ["u-42"]
        assert "Closing an engine of user 'u-42' failed: BoomError: u-42" in caplog.text
        s = factory.stats()
        assert (s.closed, s.close_errors, s.in_use) == (1, 1, 0)
        assert factory.stats().thread_quota.in_use == 0

    async def test_fatal_error_of_an_async_exit_still_closes(self, ctx, caplog):
        """
        In `async with` too, a fatal error of the exit is raised once the
        close hook ran, and the slot is given back.
        """

        class Interrupt(BaseException):
            pass

        @contextlib.asynccontextmanager
        async def create(c):
            yield Engine(c.user_id)
            raise Interrupt

        def close(engine):
            raise BoomError(engine.user_id)

        factory = EngineFactory(create, close=close)
        with caplog.at_level(logging.ERROR, "usercontext"), pytest.raises(Interrupt) as ei:
            async with factory.engine(ctx):
                pass
        assert [str(e) for e in ei.value.close_errors] == ["u-42"]
        s = factory.stats()
        assert (s.closed, s.close_errors, s.in_use, s.quota.in_use) == (1, 1, 0, 0)
