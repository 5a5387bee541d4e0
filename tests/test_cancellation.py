"""
Tests of cleanup under each loop's native cancellation: on asyncio a plain
``Task.cancel()`` (once or twice), `asyncio.timeout` and `asyncio.wait_for`,
which anyio's shield does not stop by itself; on trio its cancel scopes
(``cancel()``, ``move_on_after``, ``fail_after``), which are its native
cancellation. Every shielded step must run to its end (or its own timeout),
and the cancellation must come out after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time

import anyio
import anyio.lowlevel
import pytest

import usercontext as uc

from usercontext import EmitterHub, EngineFactory, Registry, ThreadQuota
from usercontext.asgi import UserContextMiddleware, request_state
from usercontext.exceptions import FactoryClosedError, SinkClosedError

from helpers import BoomError


WAYS = ["cancel", "cancel_twice", "timeout", "wait_for"]


@pytest.fixture(name="way", params=WAYS)
def _way(request, anyio_backend):
    """
    How the work is cancelled: on asyncio ``Task.cancel()`` once or twice,
    `asyncio.timeout` or `asyncio.wait_for`; on trio a cancel scope's
    ``cancel()`` once or twice, ``move_on_after`` or ``fail_after``.
    """
    if request.param == "timeout" and anyio_backend == "asyncio" and sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout is new in Python 3.11")
    return request.param


async def cancel_during(body, way, at, *, again=0.03):
    """
    Run ``await body()``, cancel it *at* seconds in, the *way* given (the
    second cancellation of ``cancel_twice`` comes *again* seconds later), and
    check that the cancellation (or the timeout it turns into) came out.
    Return the seconds it took. A hang fails after 10 s.
    """
    start = time.monotonic()
    with anyio.fail_after(10):
        try:
            asyncio.current_task()
        except RuntimeError:
            await _trio_cancel_during(body, way, at, again)
        else:
            await _asyncio_cancel_during(body, way, at, again)
    return time.monotonic() - start


async def _asyncio_cancel_during(body, way, at, again):
    if way == "timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(at):
                await body()
    elif way == "wait_for":
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(body(), at)
    else:
        task = asyncio.ensure_future(body())
        await asyncio.sleep(at)
        task.cancel()
        if way == "cancel_twice":
            await asyncio.sleep(again)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def _trio_cancel_during(body, way, at, again):
    async def then_checkpoint():
        # trio's cancellation is level-triggered: it comes out at the next
        # checkpoint inside the cancelled scope, after the shielded steps.
        await body()
        await anyio.lowlevel.checkpoint()

    if way == "timeout":
        with anyio.move_on_after(at) as scope:
            await then_checkpoint()
        assert scope.cancelled_caught
    elif way == "wait_for":
        with pytest.raises(TimeoutError), anyio.fail_after(at):
            await then_checkpoint()
    else:
        scope = anyio.CancelScope()

        async def run():
            with scope:
                await then_checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(at)
            scope.cancel()
            if way == "cancel_twice":
                await anyio.sleep(again)
                scope.cancel()
        assert scope.cancelled_caught


def _resources(registry, kind, n, log, pause):
    """
    Register resources 0..n-1 of *kind* whose async cleanup sleeps *pause*
    seconds, then logs the resource's number.
    """
    for i in range(n):
        if kind == "async_gen":

            async def provider(_ctx, i=i):
                yield i
                await anyio.sleep(pause)
                log.append(i)

            registry.register(i, provider)
        elif kind == "async_cm":

            @contextlib.asynccontextmanager
            async def cm(i=i):
                yield i
                await anyio.sleep(pause)
                log.append(i)

            registry.register(i, lambda _ctx, cm=cm: cm())
        else:

            async def close(i):
                await anyio.sleep(pause)
                log.append(i)

            registry.register(i, lambda _ctx, i=i: i, close=close)


def _open_all(registry, ctx, keys):
    async def request():
        async with registry.scope(ctx) as scope:
            for key in keys:
                await scope.aget(key)

    return request


def _tolerant(request):
    """
    Wrap *request* so that cleanup errors raised as a group are let go: on
    trio the cancellation comes out only at the next checkpoint, so a scope
    whose body finished raises its cleanup errors first.
    """

    async def run():
        with contextlib.suppress(Exception):
            await request()

    return run


class TestScopeCleanup:
    """
    `Scope` cleanup: every async step runs to its end under native
    cancellation, in reverse order, and the cancellation comes out after.
    """

    @pytest.mark.parametrize("kind", ["async_gen", "async_cm", "close_hook"])
    async def test_every_cleanup_runs_in_reverse_order(self, ctx, way, kind):
        """
        10 resources whose cleanups take 30 ms each, cancelled 50 ms into the
        cleanup (and again 30 ms later): all 10 are closed, last first, which
        takes the full 300 ms; the cancellation comes out after.
        """
        registry = Registry()
        closed = []
        _resources(registry, kind, 10, closed, 0.03)

        took = await cancel_during(_open_all(registry, ctx, range(10)), way, 0.05)

        assert closed == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
        assert took >= 0.29
        stats = registry.stats()
        assert (stats.scopes, stats.top, stats.close_errors) == (0, (), 0)

    async def test_commit_completes(self, ctx, way):
        """
        A commit that takes 100 ms, cancelled 20 ms in, completes: the app
        knows its changes were saved.
        """
        registry = Registry()
        log = []

        async def session(_ctx):
            yield "session"
            log.append("commit started")
            await anyio.sleep(0.1)
            log.append("committed")

        registry.register("session", session)

        took = await cancel_during(_open_all(registry, ctx, ["session"]), way, 0.02)

        assert log == ["commit started", "committed"]
        assert took >= 0.1

    async def test_close_timeout_still_cuts(self, ctx, way, caplog):
        """
        A hanging cleanup is still cut at the cleanup timeout (0.2 s) when the
        task is cancelled meanwhile; the cut is logged, the cleanup before it
        still runs, and the cancellation comes out.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        registry = Registry(close_timeout=0.2)
        closed = []
        _resources(registry, "async_gen", 1, closed, 0.01)

        async def hangs(_ctx):
            yield "hangs"
            await anyio.sleep(100)

        registry.register("hangs", hangs)

        took = await cancel_during(_tolerant(_open_all(registry, ctx, [0, "hangs"])), way, 0.05)

        assert 0.2 <= took < 1.0
        assert closed == [0]
        assert any(
            "Closing resource 'hangs' took longer than its timeout of 0.2 s" in r.getMessage()
            for r in caplog.records
        )
        assert registry.stats().scopes == 0

    async def test_cleanups_own_cancel_scopes_still_work(self, ctx, way):
        """
        While a native cancellation is held, a cleanup's own cancel scopes
        still cancel it: a 50 ms ``move_on_after`` it enters after the
        cancellation arrived ends a long sleep, and the cleanup goes on.
        """
        registry = Registry()
        log = []

        async def session(_ctx):
            yield "session"
            await anyio.sleep(0.03)
            with anyio.move_on_after(0.05) as inner:
                await anyio.sleep(10)
            log.append(inner.cancelled_caught)
            await anyio.sleep(0.01)
            log.append("done")

        registry.register("session", session)

        took = await cancel_during(_open_all(registry, ctx, ["session"]), way, 0.01, again=0.01)

        assert log == [True, "done"]
        assert took < 1.0

    async def test_checkpoints_in_a_cleanup(self, ctx, way):
        """
        A cleanup that only passes checkpoints (a bare yield on asyncio) for
        100 ms runs to its end; one inside a 20 ms ``move_on_after`` is cut
        by that scope.
        """
        registry = Registry()
        log = []

        async def session(_ctx):
            yield "session"
            with anyio.move_on_after(0.02) as inner:
                while True:
                    await anyio.lowlevel.checkpoint()
            log.append(inner.cancelled_caught)
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                await anyio.lowlevel.checkpoint()
            log.append("done")

        registry.register("session", session)

        took = await cancel_during(_open_all(registry, ctx, ["session"]), way, 0.05)

        assert log == [True, "done"]
        assert took >= 0.1

    async def test_failing_cleanup_under_cancellation(self, ctx, way, caplog):
        """
        A cleanup that fails after the cancellation arrived has its error
        logged; the cleanups after it run, and the cancellation comes out.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        registry = Registry()
        closed = []
        _resources(registry, "async_gen", 1, closed, 0.01)

        async def fails(_ctx):
            yield "fails"
            await anyio.sleep(0.05)
            raise BoomError("the commit failed")

        registry.register("fails", fails)

        await cancel_during(_tolerant(_open_all(registry, ctx, [0, "fails"])), way, 0.02)

        assert closed == [0]
        assert any("BoomError: the commit failed" in r.getMessage() for r in caplog.records)
        assert registry.stats().scopes == 0

    async def test_middleware_closes_the_scope(self, way):
        """
        The ASGI middleware's scope close (a commit of 100 ms before a held
        response is sent) completes under cancellation of the request.
        """
        registry = Registry()
        log = []

        async def session(_ctx):
            yield "session"
            await anyio.sleep(0.1)
            log.append("committed")

        registry.register("session", session)

        async def app(scope, receive, send):
            await request_state(scope).resources.aget("session")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        def resolve(scope):
            return uc.UserContext(user_id="u-42", thread_id="t-1", run_id="r-1")

        mw = UserContextMiddleware(app, resolver=resolve, registry=registry)
        sent = []

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            sent.append(message["type"])

        async def request():
            await mw({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)

        took = await cancel_during(request, way, 0.02)

        assert log == ["committed"]
        assert took >= 0.1
        assert registry.stats().scopes == 0


def _run(main):
    """
    Run *main* on a fresh asyncio loop: for tests of asyncio's own task protocol.
    """
    return asyncio.run(main())


class TestAsyncioTaskProtocol:
    """
    A cleanup on asyncio gets what its task would give it, under a held
    cancellation too.
    """

    def test_awaitable_the_task_refuses(self, ctx):
        """
        An awaitable that yields something a task refuses gets the task's
        RuntimeError thrown in, as without the shield.
        """
        seen = []

        class BadYield:
            def __await__(self):
                try:
                    yield 42
                except RuntimeError as e:
                    seen.append(str(e))

        registry = Registry()
        registry.register("r", lambda _ctx: "r", close=lambda _r: BadYield())

        _run(_open_all(registry, ctx, ["r"]))

        assert seen == ["Task got bad yield: 42"]

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
    @pytest.mark.parametrize("cancelled", [False, True])
    def test_asyncio_timeout_inside_a_cleanup(self, ctx, cancelled):
        """
        An `asyncio.timeout` inside a cleanup that expires (20 ms, around a
        50 ms sleep) takes its cancellation back when it exits: the scope
        raises no cancellation of its own; the caller's cancellation (10 ms
        in), if any, still comes out. The cleanup runs to its end either way.
        """
        log = []

        async def session(_ctx):
            yield "session"
            async with asyncio.timeout(0.02) as inner:
                await asyncio.sleep(0.05)
            log.append(("expired", inner.expired()))

        registry = Registry()
        registry.register("session", session)

        async def main():
            task = asyncio.ensure_future(_open_all(registry, ctx, ["session"])())
            if cancelled:
                await asyncio.sleep(0.01)
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                log.append("cancelled")
            log.append(("pending", task.cancelling()))

        _run(main)

        if cancelled:
            assert log == [("expired", True), "cancelled", ("pending", 1)]
        else:
            assert log == [("expired", True), ("pending", 0)]

    def test_future_done_when_its_scope_is_cancelled(self, ctx):
        """
        When a cleanup's cancel scope is cancelled in the loop iteration in
        which the future it awaits completes, the cancellation is thrown in,
        as a task does, and the scope catches it.
        """
        log = []

        async def session(_ctx):
            yield "session"
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            with anyio.CancelScope() as inner:
                loop.call_soon(fut.set_result, 1)
                loop.call_soon(inner.cancel)
                await fut
            log.append(("caught", inner.cancelled_caught, fut.result()))

        registry = Registry()
        registry.register("session", session)

        _run(_open_all(registry, ctx, ["session"]))

        assert log == [("caught", True, 1)]


class Engine:
    def __init__(self, user_id):
        self.user_id = user_id


def _settled(factory):
    s = factory.stats()
    assert (s.in_use, s.top, s.quota.waiting) == (0, (), 0)
    assert s.created == s.closed + s.idle
    assert factory.quota.stats().in_use == 0


class TestEngineFactory:
    """
    `EngineFactory`: engines are closed, and slots given back, under native
    cancellation.
    """

    async def test_close_completes(self, ctx, way):
        """
        An engine's close of 100 ms, cancelled 20 ms in, completes, and the
        slot is given back.
        """
        closed = []

        async def close(engine):
            await anyio.sleep(0.1)
            closed.append(engine)

        factory = EngineFactory(Engine, close=close)

        async def request():
            async with factory.engine(ctx):
                pass

        took = await cancel_during(request, way, 0.02)

        assert len(closed) == 1
        assert took >= 0.1
        _settled(factory)

    async def test_reset_completes_then_the_engine_is_closed(self, ctx, way, anyio_backend):
        """
        A reset for reuse of 100 ms, cancelled 20 ms in, completes; the
        engine is then closed, not parked, and the slot given back.
        """
        log = []

        async def reset(_engine):
            await anyio.sleep(0.1)
            log.append("reset")

        factory = EngineFactory(
            Engine, close=lambda _e: log.append("closed"), pool_idle=1, reset=reset
        )

        async def request():
            async with factory.engine(ctx):
                pass

        await cancel_during(request, way, 0.02)

        if anyio_backend == "asyncio":
            # The cancellation comes out of the reset: the engine is closed.
            assert log == ["reset", "closed"]
            assert factory.stats().idle == 0
        else:
            # trio's waits for the next checkpoint: the reset engine is parked.
            assert log == ["reset"]
            assert factory.stats().idle == 1
        _settled(factory)

    async def test_aclose_closes_every_idle_engine(self, ctx, way):
        """
        aclose() cancelled while it closes 10 idle engines (30 ms each)
        closes all 10, then the cancellation comes out.
        """
        closed = []

        async def close(engine):
            await anyio.sleep(0.03)
            closed.append(engine)

        factory = EngineFactory(Engine, close=close, per_user=10, pool_idle=10)
        async with anyio.create_task_group() as tg:
            ready = anyio.Event()
            for _ in range(10):

                async def use():
                    async with factory.engine(ctx):
                        await ready.wait()

                tg.start_soon(use)
            await anyio.sleep(0.01)
            ready.set()
        assert factory.stats().idle == 10

        took = await cancel_during(factory.aclose, way, 0.05)

        assert len(closed) == 10
        assert took >= 0.29
        _settled(factory)
        assert factory.stats().idle == 0

    async def test_aclose_cancelled_while_bodies_run(self, ctx, way):
        """
        aclose(timeout=5) cancelled while a body still runs stops waiting:
        the body is cut at once (it sees FactoryClosedError), its engine is
        closed (50 ms), and then the cancellation comes out.
        """
        closed = []
        seen = []

        async def close(engine):
            await anyio.sleep(0.05)
            closed.append(engine)

        factory = EngineFactory(Engine, close=close)

        async def body():
            try:
                async with factory.engine(ctx):
                    await anyio.sleep(10)
            except FactoryClosedError as e:
                seen.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(body)
            await anyio.sleep(0.01)
            took = await cancel_during(lambda: factory.aclose(timeout=5), way, 0.05, again=0.02)

        assert took < 1.0
        assert len(closed) == 1
        assert len(seen) == 1
        assert str(seen[0]).endswith("the body was cancelled because aclose() was cancelled.")
        _settled(factory)


class TestEngineLeftInAnotherTask:
    """
    An engine entered in one task and left in another (an async generator
    finished by another task, as streaming responses do) is closed, and its
    slot given back.
    """

    @pytest.mark.parametrize("deadline", [None, 5.0])
    async def test_closed_and_given_back(self, ctx, anyio_backend, deadline):
        """
        The generator takes the engine in one task and is closed by another:
        the engine is closed once, the slot is free for the next request.
        """
        closed = []
        factory = EngineFactory(Engine, close=closed.append, per_user=1, deadline=deadline)

        async def stream():
            async with factory.engine(ctx) as engine:
                yield engine

        gen = stream()
        await _in_a_plain_task(anyio_backend, gen.__anext__)
        assert factory.stats().in_use == 1

        await gen.aclose()

        assert len(closed) == 1
        _settled(factory)
        async with factory.engine(ctx):
            pass
        assert len(closed) == 2

    def test_entering_task_keeps_its_scopes(self, ctx):
        """
        On asyncio an engine with no deadline holds no cancel scope over its
        body: the task of a task group that took it from a generator ends
        cleanly, and the task that finishes the generator closes the engine.
        (On trio the body's cancel scope stays in that task, by trio's rule.)
        """
        closed = []
        factory = EngineFactory(Engine, close=closed.append, per_user=1)

        async def stream():
            async with factory.engine(ctx) as engine:
                yield engine

        async def main():
            gen = stream()
            async with anyio.create_task_group() as tg:
                tg.start_soon(gen.__anext__)
            await gen.aclose()

        _run(main)

        assert len(closed) == 1
        _settled(factory)


async def _in_a_plain_task(backend, fn):
    """
    Run *fn* in a new task of the loop's own kind (no anyio cancel scope of
    its own), and wait for it.
    """
    if backend == "asyncio":
        await asyncio.ensure_future(fn())
    else:
        import trio  # only on trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fn)


class TestStatsUnderThreads:
    def test_peak_never_above_total(self):
        """
        32 threads, each of its own user, use `with factory.engine()` 200 times each with
        total=5: the bodies never see more than 5 at once, and the stats
        never count more (peak <= 5), round after round.
        """
        quota = ThreadQuota(per_key=2, total=5)
        factory = EngineFactory(Engine, per_user=2, total=5, thread_quota=quota)
        lock = threading.Lock()
        now = [0]
        seen = [0]

        def worker(n):
            ctx = uc.UserContext(user_id=f"u-{n}", thread_id="t-1", run_id="r-1")
            for _ in range(200):
                with factory.engine(ctx):
                    with lock:
                        now[0] += 1
                        seen[0] = max(seen[0], now[0])
                    time.sleep(0)
                    with lock:
                        now[0] -= 1

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as a loaded machine may
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)

        s = factory.stats()
        assert seen[0] <= 5
        assert seen[0] <= s.peak <= 5
        assert (s.created, s.closed, s.in_use) == (6400, 6400, 0)


class TestHub:
    """
    `EmitterHub`: its close and its dead-letter hook finish under native
    cancellation.
    """

    async def test_close_does_not_hang(self, ctx, way):
        """
        Leaving ``async with EmitterHub()`` cancelled while a slow sink
        drains ends within the drain timeout (0.3 s): the hub is closed,
        and every event is delivered or handed to the dead-letter hook.
        """
        letters = []

        class SlowSink:
            async def send(self, batch):
                await anyio.sleep(0.05)

        hub = EmitterHub(drain_timeout=0.3, max_batch=1, on_dead_letter=letters.append)

        async def run():
            async with hub:
                hub.attach(ctx.user_id, SlowSink())
                emitter = hub.emitter(ctx)
                for i in range(20):
                    emitter.emit_nowait("step", {"i": i})

        took = await cancel_during(run, way, 0.02)

        assert took < 1.0
        assert hub.closed
        s = hub.stats()
        assert s.delivered + sum(s.dropped.values()) + s.dead_lettered == 20
        assert s.dead_lettered == sum(len(d.events) for d in letters)

    async def test_dead_letter_hook_completes(self, ctx, anyio_backend):
        """
        A dead-letter hook of 100 ms runs to its end when its task is
        cancelled 20 ms in: on asyncio natively, as a loop's shutdown cancels
        every task; on trio by the scope around the hub.
        """
        log = []
        hooked = anyio.Event()

        async def hook(letter):
            hooked.set()
            await anyio.sleep(0.1)
            log.append(len(letter.events))

        class ClosedSink:
            async def send(self, batch):
                raise SinkClosedError("gone")

        outer = anyio.CancelScope()

        async def service():
            with outer:
                async with EmitterHub(on_dead_letter=hook) as hub:
                    hub.attach(ctx.user_id, ClosedSink())
                    hub.emitter(ctx).emit_nowait("step", {"i": 1})
                    await anyio.sleep(10)

        with anyio.fail_after(5):
            if anyio_backend == "asyncio":
                before = asyncio.all_tasks()
                main = asyncio.ensure_future(service())
                await hooked.wait()
                await asyncio.sleep(0.02)
                tasks = asyncio.all_tasks() - before
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                assert main.cancelled()
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(service)
                    await hooked.wait()
                    await anyio.sleep(0.02)
                    outer.cancel()

        assert log == [1]


class TestAcloseCutsBodies:
    """
    aclose() cuts the bodies still running after its timeout, and only them.
    """

    async def test_another_cancellation_is_not_taken_for_aclose(self, ctx, anyio_backend):
        """
        A body cancelled by aclose() and, at the same time, by its caller
        gets the caller's cancellation, not FactoryClosedError; its engine
        is closed.
        """
        closed = []
        factory = EngineFactory(Engine, close=closed.append)
        outcome = []
        entered = anyio.Event()
        outer = anyio.CancelScope()

        async def body():
            with outer:
                try:
                    async with factory.engine(ctx):
                        entered.set()
                        await anyio.sleep(10)
                except BaseException as e:
                    outcome.append(type(e))
                    raise

        with anyio.fail_after(5):
            if anyio_backend == "asyncio":
                task = asyncio.ensure_future(body())
                await entered.wait()
                task.cancel()
                await factory.aclose(timeout=0)
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(body)
                    await entered.wait()
                    outer.cancel()
                    await factory.aclose(timeout=0)

        assert outcome == [anyio.get_cancelled_exc_class()]
        assert len(closed) == 1
        _settled(factory)

    async def test_a_body_closing_its_engine_is_not_cut(self, ctx):
        """
        aclose() after its timeout does not cut a body that has ended and is
        closing its engine (100 ms): the close completes, and the request
        sees no error.
        """
        closed = []
        closing = anyio.Event()

        async def close(engine):
            closing.set()
            await anyio.sleep(0.1)
            closed.append(engine)

        factory = EngineFactory(Engine, close=close)
        outcome = []

        async def request():
            async with factory.engine(ctx):
                pass
            outcome.append("done")

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await closing.wait()
                await factory.aclose(timeout=0)

        assert outcome == ["done"]
        assert len(closed) == 1
        _settled(factory)
