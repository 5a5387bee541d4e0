"""
Tests of `async with EngineFactory.engine()`: an engine per request, under
the quota, always closed; the factory's arguments and stats.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

from collections import Counter

import anyio
import anyio.lowlevel
import pytest

from anyio.lowlevel import checkpoint
from factory_helpers import (
    GEN_CASES,
    PATHS,
    BoomError,
    Engine,
    FailFirst,
    Fatal,
    async_gen,
    body,
    close_engine,
    make_engine,
    recording_closes,
    recording_creates,
    settled,
    sync_gen,
    until,
    user,
)

import usercontext as uc
import usercontext._lifecycle as lifecycle

from usercontext import EngineFactory, FactoryStats, LocalQuota
from usercontext.exceptions import (
    CloseTimeoutError,
    EngineDeadlineError,
    IsolationError,
    NoContextError,
    QuotaExceededError,
    QuotaTimeoutError,
    UserContextError,
)


class TestEngine:
    """
    `EngineFactory.engine`: one engine per request, on every path.
    """

    @pytest.mark.parametrize("kind", ["value", "awaitable", "async_cm", "sync_cm"])
    @pytest.mark.parametrize("close_kind", ["sync", "async"])
    async def test_create_kinds(self, ctx, kind, close_kind):
        """
        create may return an engine, an awaitable, an async or a sync context
        manager; close may be sync or async. The engine is made, entered, used
        with ctx bound and the slot held, then exited and closed, once.
        """
        events = []
        create = recording_creates(events)[kind]
        close = recording_closes(events)[close_kind]
        factory = EngineFactory(create, close=close)
        async with factory.engine(ctx) as engine:
            events.append("body")
            assert isinstance(engine, Engine)
            assert engine.user_id == "u-42"
            assert uc.current() is ctx
            assert factory.quota.stats().in_use == 1
            s = factory.stats()
            assert (s.in_use, s.top, s.created) == (1, (("u-42", 1),), 1)

        expected = ["create", "body", "exit", "close"] if kind.endswith("cm") else None
        assert events == (expected or ["create", "body", "close"])
        assert engine.closed == 1
        assert uc.current_or_none() is None
        s = factory.stats()
        assert (s.created, s.closed, s.peak) == (1, 1, 1)
        settled(factory)

    @pytest.mark.parametrize("kind", ["generator", "async_generator"])
    async def test_generator_creates(self, ctx, kind):
        """
        create may be a generator (sync or async) yielding the engine once; the
        code after the yield runs when the engine is closed, before close.
        """
        events = []

        def gen(c):
            engine = Engine(c.user_id)
            events.append("create")
            yield engine
            events.append("cleanup")

        async def agen(c):
            engine = Engine(c.user_id)
            events.append("create")
            await checkpoint()
            yield engine
            await checkpoint()
            events.append("cleanup")

        def close(engine):
            events.append("close")

        factory = EngineFactory(gen if kind == "generator" else agen, close=close)
        async with factory.engine(ctx) as engine:
            assert isinstance(engine, Engine)
            events.append("body")
        assert events == ["create", "body", "cleanup", "close"]
        s = factory.stats()
        assert (s.created, s.closed, s.close_errors) == (1, 1, 0)
        settled(factory)

    @pytest.mark.parametrize("kind", ["generator", "async_generator"])
    @pytest.mark.parametrize("case", list(GEN_CASES))
    async def test_generator_cleanup(self, ctx, kind, case):
        """
        A generator create gets the body's error thrown in at its yield, as
        contextlib's managers do: swallowing or re-raising it is no cleanup
        error; raising another error, or yielding again, is one. The body's
        error propagates, with the cleanup error as a note; after a good body the
        cleanup error is raised.
        """
        behaviour, body_fails = case
        raised, note, close_errors = GEN_CASES[case]
        make = sync_gen if kind == "generator" else async_gen
        factory = EngineFactory(lambda c: make(c, behaviour))
        with pytest.raises(raised) as ei:
            async with factory.engine(ctx):
                if body_fails:
                    raise KeyError("body")
        notes = getattr(ei.value, "__notes__", [])
        if body_fails:
            assert len(notes) == (1 if note else 0)
            assert all(note in n for n in notes)
        else:
            assert notes == []
            assert note in str(ei.value)
        assert factory.stats().close_errors == close_errors
        settled(factory)

    @pytest.mark.parametrize("kind", ["generator", "async_generator"])
    async def test_generator_that_never_yields(self, ctx, kind):
        """
        A generator create that returns without yielding raises a clear
        RuntimeError, counts as a create error and releases the slot.
        """

        def gen(c):
            return
            yield

        async def agen(c):
            return
            yield

        factory = EngineFactory(gen if kind == "generator" else agen)
        with pytest.raises(RuntimeError, match="without yielding"):
            async with factory.engine(ctx):
                pass
        assert factory.stats().create_errors == 1
        settled(factory)

    async def test_awaitable_context_manager_is_entered(self, ctx):
        """
        An object that is both awaitable and an async context manager is entered,
        not awaited.
        """
        events = []

        class Both:
            def __await__(self):
                events.append("awaited")
                yield

            async def __aenter__(self):
                events.append("entered")
                return Engine("u-42")

            async def __aexit__(self, *exc):
                events.append("exited")

        factory = EngineFactory(lambda c: Both())
        async with factory.engine(ctx) as engine:
            assert isinstance(engine, Engine)
        assert events == ["entered", "exited"]

    async def test_kinds_cache_is_bounded(self, ctx, monkeypatch):
        """
        What create returns is recognised by its type, through a bounded cache:
        types beyond the bound are still recognised, just not remembered.
        """
        monkeypatch.setattr(lifecycle, "_kinds", {})
        monkeypatch.setattr(lifecycle, "_KINDS_MAX", 2)
        classes = [type(f"Engine{i}", (), {}) for i in range(4)]
        made = []
        factory = EngineFactory(lambda c: classes[len(made)]())
        for _ in range(4):
            async with factory.engine(ctx) as engine:
                made.append(engine)
        assert [type(e) for e in made] == classes
        assert len(lifecycle._kinds) == 2

    async def test_no_close_hook(self, ctx):
        """
        Without a close hook an engine is simply dropped, and counted as closed.
        """
        factory = EngineFactory(make_engine)
        async with factory.engine(ctx) as engine:
            pass
        assert engine.closed == 0
        assert (factory.stats().created, factory.stats().closed) == (1, 1)
        settled(factory)

    async def test_ctx_defaults_to_current(self, ctx):
        """
        Without ctx, engine() uses current(); the outer binding is restored after.
        """
        factory = EngineFactory(make_engine, close=close_engine)
        child = ctx.child(run_id="r-2")
        with uc.bind(child):
            async with factory.engine() as engine:
                assert uc.current() is child
            assert uc.current() is child
        assert engine.user_id == "u-42"
        assert factory.quota.stats().granted == 1

    async def test_no_context(self):
        """
        Without ctx and with nothing bound, engine() raises NoContextError and
        takes nothing.
        """
        calls = []
        factory = EngineFactory(calls.append)
        with pytest.raises(NoContextError):
            async with factory.engine():
                pass
        assert calls == []
        assert factory.quota.stats().granted == 0
        assert factory.stats().created == 0

    async def test_other_users_context_is_refused(self, ctx, other_ctx):
        """
        engine(ctx_of_B) while A's context is bound raises IsolationError before
        anything is acquired or created.
        """
        calls = []
        factory = EngineFactory(calls.append)
        with uc.bind(ctx):
            with pytest.raises(IsolationError, match="'u-99' while a context of user 'u-42'"):
                async with factory.engine(other_ctx):
                    pass
            assert uc.current() is ctx
        assert calls == []
        s = factory.quota.stats()
        assert (s.granted, s.in_use, s.waiting, s.keys) == (0, 0, 0, 0)
        assert factory.stats().created == 0

    async def test_tasks_in_the_body_see_ctx(self, ctx):
        """
        Tasks started in the body see the request's context.
        """
        factory = EngineFactory(make_engine)
        seen = []

        async def child():
            seen.append(uc.current())

        async with factory.engine(ctx), anyio.create_task_group() as tg:
            tg.start_soon(child)
        assert seen == [ctx]

    async def test_per_user_and_total(self, ctx, other_ctx):
        """
        At most per_user engines of a user are in use at once (the next request
        waits), and at most total overall.
        """
        factory = EngineFactory(make_engine, per_user=2, total=3)
        active = Counter()
        peaks = Counter()
        gate = anyio.Event()

        async def use(c):
            async with factory.engine(c):
                active[c.user_id] += 1
                peaks[c.user_id] = max(peaks[c.user_id], active[c.user_id])
                peaks["all"] = max(peaks["all"], active.total())
                await gate.wait()
                active[c.user_id] -= 1

        async with anyio.create_task_group() as tg:
            for c in (ctx, ctx, ctx, other_ctx, other_ctx):
                tg.start_soon(use, c)
            # Every task asked (trio may run them in any order): three in
            # use, two waiting, and it stays so.
            await until(lambda: factory.stats().quota.waiting == 2)
            for _ in range(10):
                await anyio.lowlevel.checkpoint()
            s = factory.stats()
            assert (s.in_use, s.quota.waiting) == (3, 2)
            assert factory.quota.stats().in_use == 3
            gate.set()
        assert peaks["u-42"] <= 2
        assert peaks["u-99"] <= 2
        assert peaks["all"] == 3
        assert factory.stats().peak == 3
        assert factory.stats().created == 5
        settled(factory)

    async def test_waiters_of_a_user_served_in_arrival_order(self, ctx):
        """
        Requests of one user past its limit wait, and get the freed slots in
        the order they came (each slot handed straight on), one at a time.
        """
        factory = EngineFactory(make_engine, per_user=1)
        order = []
        gates = [anyio.Event() for _ in range(4)]

        async def use(i):
            async with factory.engine(ctx):
                order.append(i)
                assert factory.stats().in_use == 1
                await gates[i].wait()

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(use, i)
                # Each comes once the one before it is in: in use, or queued.
                await until(lambda i=i: len(order) + factory.quota.stats().waiting == i + 1)
            assert order == [0]
            for i in range(4):
                gates[i].set()
                await until(lambda i=i: len(order) == min(i + 2, 4))
        assert order == [0, 1, 2, 3]
        s = factory.quota.stats()
        assert (s.granted, s.waiting, s.in_use, s.peak, s.cancelled) == (4, 0, 0, 1, 0)
        assert factory.stats().created == 4
        settled(factory)

    @pytest.mark.parametrize("path", list(PATHS))
    async def test_slot_released_on_every_path(self, ctx, path):
        """
        Whatever fails (create, entering, the body, its cancellation, closing,
        exiting, a close that hangs), the engine is closed, the slot is released,
        and the user's next request gets an engine at once.
        """
        hooks = FailFirst(path)
        factory = EngineFactory(
            hooks.create, close=hooks.close, per_user=1, timeout=0, close_timeout=0.2
        )
        error = None
        start = time.perf_counter()
        with anyio.CancelScope() as outer:
            try:
                async with factory.engine(ctx):
                    await body(path, outer)
            except (BoomError, CloseTimeoutError) as e:
                error = e
        elapsed = time.perf_counter() - start

        expected, *counts = PATHS[path]
        if expected is CloseTimeoutError:
            assert isinstance(error, CloseTimeoutError)
            assert 0.2 <= elapsed < 0.4
        elif expected is None:
            assert error is None
            assert outer.cancelled_caught
        else:
            assert isinstance(error, BoomError)
            assert str(error) == expected
        s = factory.stats()
        assert [s.created, s.closed, s.create_errors, s.close_errors] == counts
        assert factory.quota.stats().in_use == 0
        settled(factory)

        async with factory.engine(ctx) as engine:  # timeout=0: a leaked slot would refuse it
            assert engine.tag is None
        assert engine.closed == 1
        settled(factory)

    @pytest.mark.parametrize("where", ["sync_exit", "async_exit", "async_close", "sync_close"])
    async def test_fatal_cleanup_error_propagates(self, ctx, where):
        """
        A BaseException that is no Exception (KeyboardInterrupt, SystemExit) from
        an engine's exit or close is not collected: it propagates once every
        cleanup step has run, and the slot is still released.
        """
        closed = []

        @contextlib.contextmanager
        def sync_cm(c):
            yield Engine(c.user_id)
            raise Fatal

        @contextlib.asynccontextmanager
        async def async_cm(c):
            yield Engine(c.user_id)
            await checkpoint()
            raise Fatal

        async def async_close(engine):
            await checkpoint()
            raise Fatal

        def sync_close(engine):
            raise Fatal

        if where == "sync_close":
            factory = EngineFactory(make_engine, close=sync_close)
        elif where == "async_close":
            factory = EngineFactory(make_engine, close=async_close)
        else:
            create = sync_cm if where == "sync_exit" else async_cm
            factory = EngineFactory(create, close=closed.append)
        with pytest.raises(Fatal):
            async with factory.engine(ctx):
                pass
        assert len(closed) == (1 if where.endswith("exit") else 0)
        assert factory.quota.stats().in_use == 0
        assert factory.stats().in_use == 0
        assert uc.current_or_none() is None

    async def test_close_is_shielded_from_cancellation(self, ctx):
        """
        A cancelled body's engine is still closed completely: close runs
        shielded, even when it awaits.
        """
        closed = []

        async def close(engine):
            for _ in range(3):
                await anyio.sleep(0.01)
            closed.append(engine)

        factory = EngineFactory(make_engine, close=close)
        with anyio.CancelScope() as outer:
            async with factory.engine(ctx) as engine:
                outer.cancel()
                await anyio.sleep_forever()
        assert outer.cancelled_caught
        assert closed == [engine]
        settled(factory)

    async def test_close_hangs_cut_at_close_timeout(self, ctx, caplog):
        """
        A close that hangs is cut after close_timeout: with a good body the
        CloseTimeoutError (a TimeoutError) is raised; with a failing body, the
        body's error propagates, noting and logging the cut close.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        async def close(engine):
            await anyio.sleep_forever()

        factory = EngineFactory(make_engine, close=close, close_timeout=0.3)
        start = time.perf_counter()
        with pytest.raises(CloseTimeoutError) as ei:
            async with factory.engine(ctx):
                pass
        assert 0.3 <= time.perf_counter() - start < 0.5
        assert isinstance(ei.value, TimeoutError)
        assert isinstance(ei.value, UserContextError)
        message = str(ei.value)
        for part in ("an engine of user 'u-42'", "0.3 s", "was cut", "Make "):
            assert part in message

        caplog.clear()
        start = time.perf_counter()
        with pytest.raises(BoomError) as ei:
            async with factory.engine(ctx):
                raise BoomError("body")
        assert 0.3 <= time.perf_counter() - start < 0.5
        assert ei.value.__notes__ == [f"While closing its engine: CloseTimeoutError: {message}"]
        assert [type(e) for e in ei.value.close_errors] == [CloseTimeoutError]
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (
                logging.ERROR,
                f"Closing an engine of user 'u-42' failed: CloseTimeoutError: {message}",
            )
        ]
        s = factory.stats()
        assert (s.closed, s.close_errors) == (2, 2)
        settled(factory)

    async def test_close_errors_never_mask_the_body_error(self, ctx, caplog):
        """
        When the body and close both fail, the body's error propagates with its
        type intact; the close errors (of the context manager's exit and of close)
        are attached as notes and as close_errors, and logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        exit_error = BoomError("exit")
        close_error = RuntimeError("close")

        @contextlib.asynccontextmanager
        async def create(c):
            try:
                yield Engine(c.user_id)
            finally:
                raise exit_error

        def close(engine):
            raise close_error

        factory = EngineFactory(create, close=close)
        body_error = KeyError("body")
        body_error.__notes__ = ["a note of its own"]
        with pytest.raises(KeyError) as ei:
            async with factory.engine(ctx):
                raise body_error
        assert ei.value is body_error
        assert body_error.__notes__ == [
            "a note of its own",
            "While closing its engine: BoomError: exit",
            "While closing its engine: RuntimeError: close",
        ]
        assert body_error.close_errors == [exit_error, close_error]
        assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
            (
                "usercontext",
                logging.ERROR,
                "Closing an engine of user 'u-42' failed: BoomError: exit",
            ),
            (
                "usercontext",
                logging.ERROR,
                "Closing an engine of user 'u-42' failed: RuntimeError: close",
            ),
        ]
        assert factory.stats().close_errors == 2
        settled(factory)

    async def test_close_error_raised_when_the_body_succeeds(self, ctx, caplog):
        """
        A close error after a good body is raised, never silently lost; a second
        one is attached to it and logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            raise RuntimeError("close")

        factory = EngineFactory(make_engine, close=close)
        with pytest.raises(RuntimeError, match="close") as ei:
            async with factory.engine(ctx):
                pass
        assert not hasattr(ei.value, "__notes__")
        assert caplog.records == []

        @contextlib.contextmanager
        def create(c):
            yield Engine(c.user_id)
            raise BoomError("exit")

        factory = EngineFactory(create, close=close)
        with pytest.raises(BoomError, match="exit") as ei:
            async with factory.engine(ctx):
                pass
        assert ei.value.__notes__ == ["While closing its engine: RuntimeError: close"]
        assert [type(e) for e in ei.value.close_errors] == [RuntimeError]
        assert [r.getMessage() for r in caplog.records] == [
            "Closing an engine of user 'u-42' failed: RuntimeError: close"
        ]
        settled(factory)

    async def test_close_error_of_a_cancelled_body_is_logged(self, ctx, caplog):
        """
        When the body is cancelled and close fails, the cancellation propagates
        and the close error is logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            raise RuntimeError("close")

        factory = EngineFactory(make_engine, close=close)
        with anyio.CancelScope() as outer:
            async with factory.engine(ctx):
                outer.cancel()
                await checkpoint()
        assert outer.cancelled_caught
        assert [r.getMessage() for r in caplog.records] == [
            "Closing an engine of user 'u-42' failed: RuntimeError: close"
        ]
        assert factory.stats().close_errors == 1
        settled(factory)

    async def test_deadline(self, ctx, other_ctx):
        """
        deadline=s cancels only the body that runs past it and raises
        EngineDeadlineError (a TimeoutError); concurrent engines, of the same
        user or another, running past that moment are unaffected.
        """
        closed = []

        def close(engine):
            closed.append(engine.user_id)

        factory = EngineFactory(make_engine, close=close, deadline=0.4)
        results = {}

        async def use(name, c, delay, duration):
            await anyio.sleep(delay)
            start = time.perf_counter()
            try:
                async with factory.engine(c):
                    await anyio.sleep(duration)
            except EngineDeadlineError as e:
                results[name] = ("deadline", time.perf_counter() - start, e)
            else:
                results[name] = ("ok", time.perf_counter() - start, None)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, "stuck", ctx, 0, math.inf)
            tg.start_soon(use, "same user", ctx, 0.2, 0.25)
            tg.start_soon(use, "other user", other_ctx, 0.15, 0.3)

        outcome, elapsed, error = results["stuck"]
        assert outcome == "deadline"
        assert 0.4 <= elapsed < 0.6
        assert isinstance(error, TimeoutError)
        assert str(error) == (
            "The body using an engine of user 'u-42' ran past its deadline of 0.4 s and was "
            "cancelled. Make it finish sooner or raise the factory's deadline."
        )
        assert results["same user"][0] == "ok"
        assert results["other user"][0] == "ok"
        assert sorted(closed) == ["u-42", "u-42", "u-99"]
        s = factory.stats()
        assert (s.deadline_errors, s.created, s.closed) == (1, 3, 3)
        settled(factory)

    async def test_deadline_with_a_failing_close(self, ctx):
        """
        A body cut by its deadline raises EngineDeadlineError, carrying the
        close error as a note.
        """

        def close(engine):
            raise RuntimeError("close")

        factory = EngineFactory(make_engine, close=close, deadline=0.05)
        with pytest.raises(EngineDeadlineError) as ei:
            async with factory.engine(ctx):
                await anyio.sleep_forever()
        assert ei.value.__notes__ == ["While closing its engine: RuntimeError: close"]
        assert (factory.stats().deadline_errors, factory.stats().close_errors) == (1, 1)
        settled(factory)

    async def test_body_finishing_in_time_is_not_a_deadline_hit(self, ctx):
        """
        With or without a deadline, a body that finishes normally, or raises,
        is no deadline hit.
        """
        for deadline in (None, 5.0):
            factory = EngineFactory(make_engine, deadline=deadline)
            async with factory.engine(ctx):
                await checkpoint()
            with pytest.raises(BoomError):
                async with factory.engine(ctx):
                    raise BoomError
            s = factory.stats()
            assert (s.deadline_errors, s.created, s.closed) == (0, 2, 2)

    async def test_stats_when_refused(self, ctx, other_ctx):
        """
        With timeout=0 a full quota refuses at once (QuotaExceededError, counted as
        rejected); the figures of stats() follow the scenario.
        """
        factory = EngineFactory(make_engine, per_user=1, timeout=0)
        for c in (ctx, other_ctx):
            async with factory.engine(c):
                pass
        async with factory.engine(ctx):
            with pytest.raises(QuotaExceededError) as ei:
                async with factory.engine(ctx):
                    pass
            assert (ei.value.key, ei.value.scope) == ("u-42", "key")
            assert factory.stats() == FactoryStats(
                in_use=1,
                idle=0,
                peak=1,
                top=(("u-42", 1),),
                created=3,
                closed=2,
                reused=0,
                create_errors=0,
                close_errors=0,
                deadline_errors=0,
                quota=factory.quota.stats(),
                thread_quota=None,
            )
            q = factory.stats().quota
            assert (q.in_use, q.waiting, q.rejected, q.timed_out) == (1, 0, 1, 0)
        assert factory.stats().quota.rejected == 1
        settled(factory)

    async def test_stats_when_timed_out(self, ctx):
        """
        With timeout>0 a request waits (counted as waiting), then raises
        QuotaTimeoutError and is counted as timed out.
        """
        factory = EngineFactory(make_engine, per_user=1, timeout=0.2)
        during = []

        async def late():
            start = time.perf_counter()
            with pytest.raises(QuotaTimeoutError):
                async with factory.engine(ctx):
                    pass
            during.append(time.perf_counter() - start)

        async with factory.engine(ctx), anyio.create_task_group() as tg:
            tg.start_soon(late)
            await until(lambda: factory.stats().quota.waiting == 1)
            s = factory.stats()
            assert (s.in_use, s.quota.waiting, s.quota.timed_out) == (1, 1, 0)
        assert 0.2 <= during[0] < 0.5
        s, q = factory.stats(), factory.stats().quota
        assert (q.timed_out, q.rejected, s.created, s.closed, q.waiting) == (1, 0, 1, 1, 0)
        settled(factory)

    async def test_stats_top_users(self):
        """
        top lists the users with the most engines in use, most
        first, cut at top.
        """
        factory = EngineFactory(make_engine, per_user=5)
        gate = anyio.Event()

        async def use(user_id):
            async with factory.engine(user(user_id)):
                await gate.wait()

        async with anyio.create_task_group() as tg:
            for user_id in ("u-1", "u-2", "u-2", "u-3", "u-3", "u-3"):
                tg.start_soon(use, user_id)
            await until(lambda: factory.stats().in_use == 6)
            assert factory.stats(top=2).top == (("u-3", 3), ("u-2", 2))
            assert factory.stats().top == (("u-3", 3), ("u-2", 2), ("u-1", 1))
            gate.set()
        settled(factory)

    async def test_given_quota(self, ctx):
        """
        A quota given to the factory is the one it draws from; per_user and total
        are then ignored.
        """
        quota = LocalQuota(per_key=1, total=1)
        factory = EngineFactory(make_engine, quota=quota, per_user=5, total=9, timeout=0)
        assert factory.quota is quota
        async with factory.engine(ctx):
            assert quota.stats().in_use == 1
            with pytest.raises(QuotaExceededError) as ei:
                async with factory.engine(ctx):
                    pass
            assert (ei.value.scope, ei.value.limit) == ("key", 1)
        other = quota.acquire_nowait("u-7")
        with pytest.raises(QuotaExceededError) as ei:
            async with factory.engine(ctx):
                pass
        assert (ei.value.scope, ei.value.limit) == ("total", 1)
        other.release()
        assert quota.stats().granted == 2
        assert factory.stats().quota.rejected == 2

    def test_bad_per_user_names_per_user(self):
        """
        A bad per_user is reported under its own name.
        """
        with pytest.raises(ValueError, match="per_user"):
            EngineFactory(make_engine, per_user=-1)

    @pytest.mark.parametrize(
        ("kwargs", "error", "message"),
        [
            ({"create": None}, TypeError, "create must be a callable, got None."),
            ({"create": 42}, TypeError, "create must be a callable, got 42."),
            ({"close": "x"}, TypeError, "close must be a callable or None, got 'x'."),
            ({"reset": 1}, TypeError, "reset must be a callable or None, got 1."),
            ({"timeout": -1}, ValueError, "timeout must be >= 0 seconds or None, got -1."),
            ({"timeout": math.nan}, ValueError, "timeout must be >= 0 seconds or None"),
            ({"timeout": "5"}, TypeError, "timeout must be a number of seconds or None, got '5'."),
            ({"timeout": True}, TypeError, "timeout must be a number of seconds or None"),
            ({"close_timeout": 0}, ValueError, "close_timeout must be > 0 seconds or None, got 0."),
            ({"deadline": -0.5}, ValueError, "deadline must be > 0 seconds or None, got -0.5."),
            ({"idle_ttl": 0.0}, ValueError, "idle_ttl must be > 0 seconds or None, got 0.0."),
            ({"pool_idle": -1}, ValueError, "pool_idle must be at least 0, got -1."),
            ({"pool_max": -1}, ValueError, "pool_max must be at least 0, got -1."),
            ({"pool_idle": 1.5}, TypeError, "pool_idle must be an int, got 1.5."),
            ({"total": -1}, ValueError, "total must be a non-negative int or None, got -1."),
            ({"total": "3"}, TypeError, "total must be a non-negative int or None"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, message):
        """
        Bad arguments raise TypeError or ValueError at construction, with a
        message naming the argument.
        """
        create = kwargs.pop("create", make_engine)
        with pytest.raises(error) as ei:
            EngineFactory(create, **kwargs)
        assert message in str(ei.value)

    async def test_good_edge_arguments(self, ctx):
        """
        timeout=0, pool_idle=0, pool_max=0 and integer seconds are accepted.
        """
        factory = EngineFactory(
            make_engine, timeout=0, close_timeout=1, deadline=2, idle_ttl=3, pool_max=0
        )
        async with factory.engine(ctx) as engine:
            pass
        assert engine.user_id == "u-42"


class ProtocolQuota:
    """
    A quota that is only the `Quota` protocol, over a `LocalQuota`, and counts
    the calls the factory makes into it.
    """

    def __init__(self):
        self.inner = uc.LocalQuota(per_key=1)
        self.calls = Counter()

    async def acquire(self, key, *, timeout=None):
        self.calls["acquire"] += 1
        return await self.inner.acquire(key, timeout=timeout)

    async def arelease(self, lease):
        self.calls["arelease"] += 1
        await checkpoint()  # a round trip would suspend here
        await self.inner.arelease(lease)

    def stats(self, *, top=10):
        return self.inner.stats(top=top)


class TestAnyQuota:
    async def test_through_the_protocol(self, ctx):
        """
        A quota that is only the protocol is acquired and released through it,
        once per engine use, whether the body returns or raises; a release that
        suspends still gives the slot back before the block is left.
        """
        quota = ProtocolQuota()
        assert isinstance(quota, uc.Quota)
        factory = EngineFactory(make_engine, quota=quota)

        for _ in range(3):
            async with factory.engine(ctx):
                assert quota.inner.stats().in_use == 1
        with pytest.raises(BoomError):
            async with factory.engine(ctx):
                raise BoomError

        assert quota.calls == {"acquire": 4, "arelease": 4}
        stats = factory.stats()
        assert (stats.in_use, stats.created, stats.closed) == (0, 4, 4)
        assert stats.quota.in_use == 0
        assert stats.quota.granted == 4
