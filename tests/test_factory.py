"""
Tests of `EngineFactory`: engines created per request under each user's quota,
bound to the request's context, always closed, never shared between users.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import threading
import time
import warnings

from collections import Counter

import anyio
import pytest

from anyio.lowlevel import checkpoint

import usercontext as uc
import usercontext._lifecycle as lifecycle

from usercontext import EngineFactory, FactoryStats, LocalQuota, ThreadQuota, UserContext
from usercontext.exceptions import (
    CloseTimeoutError,
    EngineDeadlineError,
    FactoryClosedError,
    IsolationError,
    NoContextError,
    QuotaExceededError,
    QuotaTimeoutError,
    UserContextError,
)


_ids = itertools.count(1)


class Engine:
    """
    A stand-in for an expensive engine: it knows its user and how often it was
    closed.
    """

    def __init__(self, user_id, tag=None):
        self.id = next(_ids)
        self.user_id = user_id
        self.tag = tag
        self.closed = 0

    def __repr__(self):
        return f"<Engine #{self.id} of {self.user_id}>"


class BoomError(Exception):
    """
    An error raised on purpose by a hook or a body.
    """


class Fatal(BaseException):
    """
    Stands for a KeyboardInterrupt or SystemExit raised by a hook.
    """


def _user(user_id):
    return UserContext(user_id=user_id, thread_id="t-1", run_id="r-1")


def _make_engine(ctx):
    return Engine(ctx.user_id)


def _close_engine(engine):
    engine.closed += 1


async def _until(predicate, *, timeout=5.0):
    """
    Let other tasks run until *predicate* holds; fail after *timeout*.
    """
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  # polls state that has no event
            await anyio.sleep(0.001)


def _settled(factory):
    """
    Assert that *factory* holds nothing: no engine in use, no slot taken, and
    every engine created is closed or idle.
    """
    s = factory.stats()
    assert s.in_use == 0
    assert s.top == ()
    assert s.quota.waiting == 0
    assert s.created == s.closed + s.idle
    assert factory.quota.stats().in_use == 0


def _recording_creates(events):
    """
    A create hook of each kind, recording what happens in *events*.
    """

    def value(c):
        events.append("create")
        return Engine(c.user_id)

    async def awaitable(c):
        await checkpoint()
        return value(c)

    @contextlib.asynccontextmanager
    async def async_cm(c):
        engine = value(c)
        await checkpoint()
        yield engine
        events.append("exit")

    @contextlib.contextmanager
    def sync_cm(c):
        yield value(c)
        events.append("exit")

    return {"value": value, "awaitable": awaitable, "async_cm": async_cm, "sync_cm": sync_cm}


def _recording_closes(events):
    """
    A sync and an async close hook, recording in *events*.
    """

    def sync(engine):
        engine.closed += 1
        events.append("close")

    async def async_(engine):
        await checkpoint()
        sync(engine)

    return {"sync": sync, "async": async_}


class _FailFirst:
    """
    Hooks failing as *path* says, for the first engine only.
    """

    def __init__(self, path):
        self.path = path
        self.calls = 0

    def create(self, c):
        self.calls += 1
        if self.calls > 1:
            return Engine(c.user_id)
        return getattr(self, f"_{self.path}", self._ok)(c)

    def _ok(self, c):
        return Engine(c.user_id, "first")

    def _create_fails(self, c):
        raise BoomError("create")

    async def _async_create_fails(self, c):
        await checkpoint()
        raise BoomError("create")

    @contextlib.asynccontextmanager
    async def _enter_fails(self, c):
        raise BoomError("enter")
        yield  # a generator, so a context manager

    @contextlib.asynccontextmanager
    async def _exit_raises(self, c):
        yield Engine(c.user_id, "first")
        raise BoomError("exit")

    async def close(self, engine):
        if engine.tag == "first" and self.path == "close_raises":
            raise BoomError("close")
        if engine.tag == "first" and self.path == "close_hangs":
            await anyio.sleep_forever()
        engine.closed += 1


async def _body(path, outer):
    if path == "body_fails":
        raise BoomError("body")
    if path == "body_cancelled":
        outer.cancel()
        await checkpoint()


# path -> (the error raised, or None; created, closed, create_errors, close_errors)
_PATHS = {
    "create_fails": ("create", 0, 0, 1, 0),
    "async_create_fails": ("create", 0, 0, 1, 0),
    "enter_fails": ("enter", 0, 0, 1, 0),
    "body_fails": ("body", 1, 1, 0, 0),
    "body_cancelled": (None, 1, 1, 0, 0),
    "close_raises": ("close", 1, 1, 0, 1),
    "exit_raises": ("exit", 1, 1, 0, 1),
    "close_hangs": (CloseTimeoutError, 1, 1, 0, 1),
}


def _sync_gen(c, behaviour):
    """
    A generator create whose cleanup behaves as *behaviour* says.
    """
    try:
        yield Engine(c.user_id)
    except KeyError:
        if behaviour == "reraise":
            raise
        if behaviour == "other":
            raise BoomError("cleanup") from None
        if behaviour == "again":
            yield None
        return
    if behaviour == "other":
        raise BoomError("cleanup")
    yield None  # "again" after a good body: yields twice


async def _async_gen(c, behaviour):
    """
    The async twin of `_sync_gen`.
    """
    try:
        yield Engine(c.user_id)
    except KeyError:
        if behaviour == "reraise":
            raise
        if behaviour == "other":
            raise BoomError("cleanup") from None
        if behaviour == "again":
            yield None
        return
    if behaviour == "other":
        raise BoomError("cleanup")
    yield None


# (behaviour, body fails) -> (error raised, what its note or message says, close_errors)
_GEN_CASES = {
    ("swallow", True): (KeyError, "", 0),
    ("reraise", True): (KeyError, "", 0),
    ("other", True): (KeyError, "BoomError: cleanup", 1),
    ("again", True): (KeyError, "yielded again after an exception", 1),
    ("again", False): (RuntimeError, "yielded more than once", 1),
    ("other", False): (BoomError, "cleanup", 1),
}


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
        create = _recording_creates(events)[kind]
        close = _recording_closes(events)[close_kind]
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
        _settled(factory)

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
        _settled(factory)

    @pytest.mark.parametrize("kind", ["generator", "async_generator"])
    @pytest.mark.parametrize("case", list(_GEN_CASES))
    async def test_generator_cleanup(self, ctx, kind, case):
        """
        A generator create gets the body's error thrown in at its yield, as
        contextlib's managers do: swallowing or re-raising it is no cleanup
        error; raising another error, or yielding again, is one. The body's
        error propagates, with the cleanup error as a note; after a good body the
        cleanup error is raised.
        """
        behaviour, body_fails = case
        raised, note, close_errors = _GEN_CASES[case]
        make = _sync_gen if kind == "generator" else _async_gen
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
        _settled(factory)

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
        _settled(factory)

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
        factory = EngineFactory(_make_engine)
        async with factory.engine(ctx) as engine:
            pass
        assert engine.closed == 0
        assert (factory.stats().created, factory.stats().closed) == (1, 1)
        _settled(factory)

    async def test_ctx_defaults_to_current(self, ctx):
        """
        Without ctx, engine() uses current(); the outer binding is restored after.
        """
        factory = EngineFactory(_make_engine, close=_close_engine)
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
        factory = EngineFactory(_make_engine)
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
        factory = EngineFactory(_make_engine, per_user=2, total=3)
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
            await _until(lambda: factory.stats().in_use == 3)
            s = factory.stats()
            assert s.quota.waiting == 2
            assert factory.quota.stats().in_use == 3
            gate.set()
        assert peaks["u-42"] <= 2
        assert peaks["u-99"] <= 2
        assert peaks["all"] == 3
        assert factory.stats().peak == 3
        assert factory.stats().created == 5
        _settled(factory)

    @pytest.mark.parametrize("path", list(_PATHS))
    async def test_slot_released_on_every_path(self, ctx, path):
        """
        Whatever fails (create, entering, the body, its cancellation, closing,
        exiting, a close that hangs), the engine is closed, the slot is released,
        and the user's next request gets an engine at once.
        """
        hooks = _FailFirst(path)
        factory = EngineFactory(
            hooks.create, close=hooks.close, per_user=1, timeout=0, close_timeout=0.2
        )
        error = None
        start = time.perf_counter()
        with anyio.CancelScope() as outer:
            try:
                async with factory.engine(ctx):
                    await _body(path, outer)
            except (BoomError, CloseTimeoutError) as e:
                error = e
        elapsed = time.perf_counter() - start

        expected, *counts = _PATHS[path]
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
        _settled(factory)

        async with factory.engine(ctx) as engine:  # timeout=0: a leaked slot would refuse it
            assert engine.tag is None
        assert engine.closed == 1
        _settled(factory)

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
            factory = EngineFactory(_make_engine, close=sync_close)
        elif where == "async_close":
            factory = EngineFactory(_make_engine, close=async_close)
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

        factory = EngineFactory(_make_engine, close=close)
        with anyio.CancelScope() as outer:
            async with factory.engine(ctx) as engine:
                outer.cancel()
                await anyio.sleep_forever()
        assert outer.cancelled_caught
        assert closed == [engine]
        _settled(factory)

    async def test_close_hangs_cut_at_close_timeout(self, ctx, caplog):
        """
        A close that hangs is cut after close_timeout: with a good body the
        CloseTimeoutError (a TimeoutError) is raised; with a failing body, the
        body's error propagates, noting and logging the cut close.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        async def close(engine):
            await anyio.sleep_forever()

        factory = EngineFactory(_make_engine, close=close, close_timeout=0.3)
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
        _settled(factory)

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
        _settled(factory)

    async def test_close_error_raised_when_the_body_succeeds(self, ctx, caplog):
        """
        A close error after a good body is raised, never silently lost; a second
        one is attached to it and logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            raise RuntimeError("close")

        factory = EngineFactory(_make_engine, close=close)
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
        _settled(factory)

    async def test_close_error_of_a_cancelled_body_is_logged(self, ctx, caplog):
        """
        When the body is cancelled and close fails, the cancellation propagates
        and the close error is logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            raise RuntimeError("close")

        factory = EngineFactory(_make_engine, close=close)
        with anyio.CancelScope() as outer:
            async with factory.engine(ctx):
                outer.cancel()
                await checkpoint()
        assert outer.cancelled_caught
        assert [r.getMessage() for r in caplog.records] == [
            "Closing an engine of user 'u-42' failed: RuntimeError: close"
        ]
        assert factory.stats().close_errors == 1
        _settled(factory)

    async def test_deadline(self, ctx, other_ctx):
        """
        deadline=s cancels only the body that runs past it and raises
        EngineDeadlineError (a TimeoutError); concurrent engines, of the same
        user or another, running past that moment are unaffected.
        """
        closed = []

        def close(engine):
            closed.append(engine.user_id)

        factory = EngineFactory(_make_engine, close=close, deadline=0.4)
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
        _settled(factory)

    async def test_deadline_with_a_failing_close(self, ctx):
        """
        A body cut by its deadline raises EngineDeadlineError, carrying the
        close error as a note.
        """

        def close(engine):
            raise RuntimeError("close")

        factory = EngineFactory(_make_engine, close=close, deadline=0.05)
        with pytest.raises(EngineDeadlineError) as ei:
            async with factory.engine(ctx):
                await anyio.sleep_forever()
        assert ei.value.__notes__ == ["While closing its engine: RuntimeError: close"]
        assert (factory.stats().deadline_errors, factory.stats().close_errors) == (1, 1)
        _settled(factory)

    async def test_body_finishing_in_time_is_not_a_deadline_hit(self, ctx):
        """
        With or without a deadline, a body that finishes normally, or raises,
        is no deadline hit.
        """
        for deadline in (None, 5.0):
            factory = EngineFactory(_make_engine, deadline=deadline)
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
        factory = EngineFactory(_make_engine, per_user=1, timeout=0)
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
        _settled(factory)

    async def test_stats_when_timed_out(self, ctx):
        """
        With timeout>0 a request waits (counted as waiting), then raises
        QuotaTimeoutError and is counted as timed out.
        """
        factory = EngineFactory(_make_engine, per_user=1, timeout=0.2)
        during = []

        async def late():
            start = time.perf_counter()
            with pytest.raises(QuotaTimeoutError):
                async with factory.engine(ctx):
                    pass
            during.append(time.perf_counter() - start)

        async with factory.engine(ctx), anyio.create_task_group() as tg:
            tg.start_soon(late)
            await _until(lambda: factory.stats().quota.waiting == 1)
            s = factory.stats()
            assert (s.in_use, s.quota.waiting, s.quota.timed_out) == (1, 1, 0)
        assert 0.2 <= during[0] < 0.5
        s, q = factory.stats(), factory.stats().quota
        assert (q.timed_out, q.rejected, s.created, s.closed, q.waiting) == (1, 0, 1, 1, 0)
        _settled(factory)

    async def test_stats_top_users(self):
        """
        top lists the users with the most engines in use, most
        first, cut at top.
        """
        factory = EngineFactory(_make_engine, per_user=5)
        gate = anyio.Event()

        async def use(user_id):
            async with factory.engine(_user(user_id)):
                await gate.wait()

        async with anyio.create_task_group() as tg:
            for user_id in ("u-1", "u-2", "u-2", "u-3", "u-3", "u-3"):
                tg.start_soon(use, user_id)
            await _until(lambda: factory.stats().in_use == 6)
            assert factory.stats(top=2).top == (("u-3", 3), ("u-2", 2))
            assert factory.stats().top == (("u-3", 3), ("u-2", 2), ("u-1", 1))
            gate.set()
        _settled(factory)

    async def test_given_quota(self, ctx):
        """
        A quota given to the factory is the one it draws from; per_user and total
        are then ignored.
        """
        quota = LocalQuota(per_key=1, total=1)
        factory = EngineFactory(_make_engine, quota=quota, per_user=5, total=9, timeout=0)
        assert factory.quota is quota
        async with factory.engine(ctx):
            assert quota.stats().in_use == 1
            with pytest.raises(QuotaExceededError) as ei:
                async with factory.engine(ctx):
                    pass
            assert (ei.value.scope, ei.value.limit) == ("key", 1)
        other = quota.try_acquire("u-7")
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
            EngineFactory(_make_engine, per_user=-1)

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
        create = kwargs.pop("create", _make_engine)
        with pytest.raises(error) as ei:
            EngineFactory(create, **kwargs)
        assert message in str(ei.value)

    async def test_good_edge_arguments(self, ctx):
        """
        timeout=0, pool_idle=0, pool_max=0 and integer seconds are accepted.
        """
        factory = EngineFactory(
            _make_engine, timeout=0, close_timeout=1, deadline=2, idle_ttl=3, pool_max=0
        )
        async with factory.engine(ctx) as engine:
            pass
        assert engine.user_id == "u-42"


class TestPool:
    """
    Idle engines kept for reuse by the same user only.
    """

    async def test_reused_by_the_same_user_only(self, ctx, other_ctx):
        """
        With pool_idle=1 each user gets back their own engine and never another
        user's; created == closed + idle throughout.
        """
        factory = EngineFactory(_make_engine, close=_close_engine, pool_idle=1)
        seen = []
        for c in (ctx, ctx, other_ctx, ctx, other_ctx, ctx):
            async with factory.engine(c) as engine:
                assert engine.user_id == c.user_id
                seen.append((c.user_id, engine.id))
        by_user = {user: {i for u, i in seen if u == user} for user, _ in seen}
        assert {user: len(ids) for user, ids in by_user.items()} == {"u-42": 1, "u-99": 1}
        assert by_user["u-42"].isdisjoint(by_user["u-99"])
        s = factory.stats()
        assert (s.created, s.reused, s.idle, s.closed) == (2, 4, 2, 0)
        _settled(factory)

        await factory.aclose()
        s = factory.stats()
        assert (s.idle, s.closed) == (0, 2)
        _settled(factory)

    async def test_up_to_pool_idle_per_user(self, ctx):
        """
        At most pool_idle engines of a user are parked; the rest are closed.
        """
        factory = EngineFactory(_make_engine, close=_close_engine, per_user=3, pool_idle=2)
        gate = anyio.Event()
        engines = []

        async def use():
            async with factory.engine(ctx) as engine:
                engines.append(engine)
                await gate.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(use)
            await _until(lambda: len(engines) == 3)
            gate.set()
        assert sorted(e.closed for e in engines) == [0, 0, 1]
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (3, 1, 2)
        parked = {e.id for e in engines if not e.closed}
        for _ in range(2):
            async with factory.engine(ctx) as engine:
                assert engine.id in parked
        assert factory.stats().reused == 2
        _settled(factory)
        await factory.aclose()

    @pytest.mark.parametrize("reset_kind", ["sync", "async"])
    async def test_reset_before_parking(self, ctx, reset_kind):
        """
        reset (sync or async) is called on an engine before it is parked, not on
        an engine whose body failed (that one is closed).
        """
        resets = []
        if reset_kind == "sync":
            reset = resets.append
        else:

            async def reset(engine):
                await checkpoint()
                resets.append(engine)

        factory = EngineFactory(_make_engine, close=_close_engine, pool_idle=1, reset=reset)
        async with factory.engine(ctx) as engine:
            assert resets == []
        assert resets == [engine]
        assert factory.stats().idle == 1
        with pytest.raises(BoomError):
            async with factory.engine(ctx) as again:
                raise BoomError
        assert again is engine
        assert resets == [engine]
        assert engine.closed == 1
        assert factory.stats().idle == 0
        _settled(factory)

    async def test_failing_reset_closes_the_engine(self, ctx, caplog):
        """
        An engine whose reset fails is closed instead of parked, with a warning,
        and the next request gets a new engine.
        """
        caplog.set_level(logging.WARNING, logger="usercontext")

        def reset(engine):
            raise BoomError("dirty")

        factory = EngineFactory(_make_engine, close=_close_engine, pool_idle=1, reset=reset)
        async with factory.engine(ctx) as first:
            pass
        assert first.closed == 1
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.WARNING, "Resetting an engine for reuse failed, closing it: BoomError: dirty")
        ]
        async with factory.engine(ctx) as second:
            assert second is not first
        s = factory.stats()
        assert (s.created, s.closed, s.idle, s.reused) == (2, 2, 0, 0)

    async def test_stale_idle_engines_closed(self, ctx, other_ctx):
        """
        Idle engines parked longer than idle_ttl are closed when an engine is
        next given back; fresher ones stay.
        """
        factory = EngineFactory(_make_engine, close=_close_engine, pool_idle=1, idle_ttl=0.2)
        async with factory.engine(ctx) as old:
            pass
        await anyio.sleep(0.25)
        async with factory.engine(other_ctx) as fresh:
            pass
        assert old.closed == 1
        assert fresh.closed == 0
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (2, 1, 1)
        async with factory.engine(other_ctx) as again:
            assert again is fresh
        assert factory.stats().idle == 1
        _settled(factory)
        await factory.aclose()

    async def test_stale_idle_engine_never_handed_out(self, ctx):
        """
        An idle engine older than idle_ttl is not handed out again: the user gets
        a new engine and the stale one is closed.
        """
        factory = EngineFactory(_make_engine, close=_close_engine, pool_idle=1, idle_ttl=0.1)
        async with factory.engine(ctx) as old:
            pass
        await anyio.sleep(0.15)
        async with factory.engine(ctx) as new:
            assert new is not old
        assert old.closed == 1
        assert factory.stats().reused == 0
        await factory.aclose()

    async def test_pool_max_closes_the_oldest(self):
        """
        Beyond pool_max idle engines over all users, the oldest is closed.
        """
        factory = EngineFactory(_make_engine, close=_close_engine, pool_idle=2, pool_max=2)
        engines = {}
        for user_id in ("u-1", "u-2", "u-3"):
            async with factory.engine(_user(user_id)) as engine:
                engines[user_id] = engine
        assert {u: e.closed for u, e in engines.items()} == {"u-1": 1, "u-2": 0, "u-3": 0}
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (3, 1, 2)
        _settled(factory)
        await factory.aclose()
        assert [e.closed for e in engines.values()] == [1, 1, 1]

    async def test_pool_max_evicts_one_of_a_users_engines(self, ctx, other_ctx):
        """
        Eviction by pool_max takes a user's oldest idle engine and keeps the rest
        of that user's idle engines for reuse.
        """
        factory = EngineFactory(
            _make_engine, close=_close_engine, per_user=2, pool_idle=2, pool_max=2
        )
        gate = anyio.Event()
        engines = []

        async def use(c):
            async with factory.engine(c) as engine:
                engines.append(engine)
                await gate.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, ctx)
            tg.start_soon(use, ctx)
            await _until(lambda: len(engines) == 2)
            gate.set()
        async with factory.engine(other_ctx) as newest:
            pass
        assert sorted(e.closed for e in engines) == [0, 1]
        assert newest.closed == 0
        (kept,) = (e for e in engines if not e.closed)
        async with factory.engine(ctx) as engine:
            assert engine is kept
        s = factory.stats()
        assert (s.created, s.closed, s.idle, s.reused) == (3, 1, 2, 1)
        await factory.aclose()
        _settled(factory)

    async def test_sweep_can_empty_the_pool(self, ctx, other_ctx):
        """
        When every idle engine is stale and the engine given back is not parked
        (its body failed), the pool ends up empty.
        """
        factory = EngineFactory(_make_engine, close=_close_engine, pool_idle=1, idle_ttl=0.1)
        async with factory.engine(other_ctx) as stale:
            pass
        await anyio.sleep(0.15)
        with pytest.raises(BoomError):
            async with factory.engine(ctx) as failed:
                raise BoomError
        assert (stale.closed, failed.closed) == (1, 1)
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (2, 2, 0)
        assert (len(factory._pool), factory._pool._by_user) == (0, {})

    async def test_other_users_close_errors_stay_theirs(self, ctx, other_ctx, caplog):
        """
        When a request's exit closes another user's idle engine (stale or evicted)
        and that close fails, the request does not see the error (it is not its
        engine, and the error may carry the other user's data); it is logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            if engine.user_id == "u-99":
                raise RuntimeError("secret of u-99")

        factory = EngineFactory(_make_engine, close=close, pool_idle=1, idle_ttl=0.1)
        async with factory.engine(other_ctx):
            pass
        await anyio.sleep(0.15)
        async with factory.engine(ctx):
            pass  # must not raise u-99's close error
        assert any("secret of u-99" in r.getMessage() for r in caplog.records)

        factory = EngineFactory(_make_engine, close=close, pool_idle=1, pool_max=1)
        async with factory.engine(other_ctx):
            pass
        async with factory.engine(ctx):
            pass  # evicts u-99's engine, whose close fails: not u-42's business
        await factory.aclose()

    async def test_aclose_closes_idle_engines(self, ctx, other_ctx, caplog):
        """
        aclose() closes every idle engine, logging (not raising) close errors.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            engine.closed += 1
            if engine.user_id == "u-99":
                raise RuntimeError("close")

        factory = EngineFactory(_make_engine, close=close, per_user=2, pool_idle=2)
        gate = anyio.Event()
        engines = []

        async def use(c):
            async with factory.engine(c) as engine:
                engines.append(engine)
                await gate.wait()

        async with anyio.create_task_group() as tg:
            for c in (ctx, ctx, other_ctx):
                tg.start_soon(use, c)
            await _until(lambda: len(engines) == 3)
            gate.set()
        assert factory.stats().idle == 3
        await factory.aclose()
        assert [e.closed for e in engines] == [1, 1, 1]
        assert [r.getMessage() for r in caplog.records] == [
            "Closing an idle engine of user 'u-99' failed: RuntimeError: close"
        ]
        s = factory.stats()
        assert (s.created, s.closed, s.idle, s.close_errors) == (3, 3, 0, 1)
        _settled(factory)


class TestAclose:
    """
    `EngineFactory.aclose`: stop, let running bodies finish, close everything.
    """

    async def test_no_engine_after_aclose(self, ctx):
        """
        After aclose(), engine() raises FactoryClosedError at once and takes
        nothing; calling aclose() again is fine.
        """
        calls = []
        factory = EngineFactory(calls.append)
        await factory.aclose()
        with pytest.raises(FactoryClosedError, match="is closed and creates no more engines"):
            async with factory.engine(ctx):
                pass
        assert isinstance(FactoryClosedError(), RuntimeError)
        assert calls == []
        assert factory.quota.stats().granted == 0
        await factory.aclose()
        with pytest.raises(ValueError, match="timeout must be >= 0 seconds"):
            await factory.aclose(timeout=-1)

    async def test_running_bodies_get_the_timeout_then_are_cancelled(self, ctx, other_ctx):
        """
        Bodies running at aclose(timeout=t) get t seconds to finish; those still
        running are cancelled and see FactoryClosedError; all engines are closed
        and a second aclose() returns at once.
        """
        factory = EngineFactory(_make_engine, close=_close_engine)
        results = {}
        engines = []

        async def use(name, c, duration):
            try:
                async with factory.engine(c) as engine:
                    engines.append(engine)
                    await anyio.sleep(duration)
            except FactoryClosedError as e:
                results[name] = e
            else:
                results[name] = "ok"

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, "quick", ctx, 0.1)
            tg.start_soon(use, "stuck", other_ctx, math.inf)
            await _until(lambda: factory.stats().in_use == 2)
            start = time.perf_counter()
            await factory.aclose(timeout=0.3)
            elapsed = time.perf_counter() - start
            assert factory.stats().in_use == 0

        assert 0.3 <= elapsed < 0.5
        assert results["quick"] == "ok"
        assert isinstance(results["stuck"], FactoryClosedError)
        assert str(results["stuck"]) == (
            "The EngineFactory was closed while user 'u-99' used an engine; the body was "
            "cancelled because the factory's close timeout of 0.3 s passed."
        )
        assert [e.closed for e in engines] == [1, 1]
        s = factory.stats()
        assert (s.created, s.closed, s.deadline_errors) == (2, 2, 0)
        _settled(factory)
        start = time.perf_counter()
        await factory.aclose(timeout=5)
        assert time.perf_counter() - start < 0.1

    async def test_bodies_finishing_in_time(self, ctx):
        """
        aclose() returns as soon as the last running body finishes.
        """
        factory = EngineFactory(_make_engine)

        async def use():
            async with factory.engine(ctx):
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            await _until(lambda: factory.stats().in_use == 1)
            start = time.perf_counter()
            await factory.aclose(timeout=5)
            assert time.perf_counter() - start < 1
        _settled(factory)

    async def test_request_waiting_for_a_slot(self, ctx):
        """
        A request still waiting for a slot when the factory closes gets
        FactoryClosedError once the slot frees, and creates nothing.
        """
        factory = EngineFactory(_make_engine, per_user=1)
        results = []

        async def use(hold):
            try:
                async with factory.engine(ctx):
                    await anyio.sleep(hold)
            except FactoryClosedError as e:
                results.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, math.inf)
            await _until(lambda: factory.stats().in_use == 1)
            tg.start_soon(use, 0)
            await _until(lambda: factory.stats().quota.waiting == 1)
            await factory.aclose(timeout=0.05)
        assert len(results) == 2
        s = factory.stats()
        assert (s.created, s.closed) == (1, 1)
        _settled(factory)

    async def test_engine_being_created_during_aclose(self, ctx):
        """
        A request whose engine is being created while aclose() runs never runs
        its body: it sees FactoryClosedError, and aclose() returns only once
        that engine is closed too.
        """
        events = []

        async def create(c):
            await anyio.sleep(0.2)
            return Engine(c.user_id)

        def close(engine):
            events.append("closed")

        factory = EngineFactory(create, close=close)
        outcome = []

        async def use():
            try:
                async with factory.engine(ctx):
                    events.append("body")
            except FactoryClosedError:
                outcome.append("refused")

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            await anyio.sleep(0.05)
            await factory.aclose(timeout=0.05)
            events.append("aclose returned")
        assert "body" not in events
        assert outcome == ["refused"]
        assert events == ["closed", "aclose returned"]
        _settled(factory)


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

        for create in (_make_engine, cm_create):
            factory = EngineFactory(create, close=_close_engine)
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
        factory = EngineFactory(_make_engine, close=_close_engine, per_user=2)
        users = [_user(f"u-{i}") for i in range(4)]
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

        factory = EngineFactory(_make_engine, close=close)
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
        factory = EngineFactory(_make_engine, per_user=1, timeout=0)
        with factory.engine(ctx):
            outcome = []
            t = threading.Thread(target=lambda: outcome.append(_try_sync(factory, ctx)))
            t.start()
            t.join(5)
            assert isinstance(outcome[0], QuotaExceededError)
        s, q = factory.stats(), factory.stats().thread_quota
        assert (q.rejected, q.timed_out, s.created, s.closed) == (1, 0, 1, 1)
        assert factory.stats().quota.rejected == 0  # the other colour's quota

        factory = EngineFactory(_make_engine, per_user=1, timeout=0.2)
        with factory.engine(ctx):
            outcome = []
            t = threading.Thread(target=lambda: outcome.append(_try_sync(factory, ctx)))
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
        factory = EngineFactory(_make_engine, thread_quota=ThreadQuota(per_key=1))
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
        factory = EngineFactory(_make_engine)
        anyio.run(factory.aclose)
        with pytest.raises(FactoryClosedError), factory.engine(ctx):
            pass

    def test_thread_quota_made_once(self, ctx):
        """
        When two threads make the lazy thread quota at once, both use the one
        made first.
        """
        factory = EngineFactory(_make_engine)
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
        factory = EngineFactory(_make_engine, per_user=1)
        async with factory.engine(ctx):
            with factory.engine(ctx):
                s = factory.stats()
                assert (s.in_use, s.created, s.peak) == (2, 2, 1)
                assert s.top == (("u-42", 2),)
        s = factory.stats()
        assert (s.in_use, s.created, s.closed) == (0, 2, 2)


def _try_sync(factory, ctx):
    try:
        with factory.engine(ctx):
            return "ok"
    except (QuotaExceededError, QuotaTimeoutError) as e:
        return e
