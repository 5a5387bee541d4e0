"""
Tests of what keeps an engine's uncontended path and a quota's wait free of
cancel scopes on asyncio: the running task found without asking the loop
(`usercontext._lifecycle.asyncio_task`), a `LocalQuota` slot held without a
lease, a quota timeout kept by a timer of the loop, and the native, counted
cancellation by which `EngineFactory.aclose` cuts bodies.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import warnings

import anyio
import pytest

from anyio.lowlevel import checkpoint
from factory_helpers import BoomError, Engine, close_engine, make_engine, settled, user

import usercontext._engine_use as engine_use_module
import usercontext._lifecycle as lifecycle
import usercontext._local_quota as quota_module

from usercontext import EngineFactory, EngineUse, LocalQuota, bind, current
from usercontext.exceptions import FactoryClosedError, IsolationError, QuotaTimeoutError


asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


def _no_cancel_scope(monkeypatch):
    """
    Make every anyio cancel scope and timeout made by the factory and the
    quota modules fail the test.
    """

    def refuse(*_args, **_kwargs):
        msg = "a cancel scope was made"
        raise AssertionError(msg)

    for module in (engine_use_module, quota_module):
        monkeypatch.setattr(module.anyio, "CancelScope", refuse)
        monkeypatch.setattr(module.anyio, "move_on_after", refuse)
        monkeypatch.setattr(module.anyio, "fail_after", refuse)


class TestAsyncioTask:
    """
    `asyncio_task()` is `asyncio.current_task()`, found the cheap way: under
    every loop, thread and fork, it names the task running now.
    """

    def test_in_tasks_of_one_loop_and_the_next(self):
        """
        In the tasks of one loop, then of a new loop in the same thread (the
        one seen before stopped), it is the running task, every time.
        """
        seen = []

        async def check():
            for _ in range(3):
                assert lifecycle.asyncio_task() is asyncio.current_task()
                seen.append(asyncio.current_task())
                await asyncio.sleep(0)

        async def main():
            await asyncio.gather(check(), check())

        asyncio.run(main())
        asyncio.run(main())
        assert len(seen) == 12
        assert len(set(seen)) == 4

    def test_outside_a_loop_it_raises(self):
        """
        Outside any loop (as on trio) it raises RuntimeError, as
        `asyncio.current_task()` does, also after a loop ran in this thread.
        """
        asyncio.run(asyncio.sleep(0))
        with pytest.raises(RuntimeError):
            lifecycle.asyncio_task()

    async def test_on_trio_it_raises(self, anyio_backend):
        """
        Under trio no asyncio loop runs: it raises RuntimeError.
        """
        if anyio_backend == "asyncio":
            assert lifecycle.asyncio_task() is asyncio.current_task()
        else:
            with pytest.raises(RuntimeError):
                lifecycle.asyncio_task()

    def test_loops_in_two_threads_at_once(self):
        """
        Two threads, each running its own loop at the same time, each see
        their own tasks only, in 2 x 2,000 steps.
        """
        wrong = []
        both = threading.Barrier(2)

        async def check():
            for _ in range(1_000):
                if lifecycle.asyncio_task() is not asyncio.current_task():
                    wrong.append(threading.get_ident())
                await asyncio.sleep(0)

        async def main():
            both.wait()
            await asyncio.gather(check(), check())

        threads = [threading.Thread(target=asyncio.run, args=(main(),)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == []

    def test_a_loop_moved_to_another_thread(self):
        """
        A loop first run in this thread, then run by another thread: this
        thread's next loop is not mistaken for it.
        """
        loop = asyncio.new_event_loop()
        try:

            async def here():
                return lifecycle.asyncio_task() is asyncio.current_task()

            assert loop.run_until_complete(here())
            started, release = threading.Event(), threading.Event()

            async def hold():
                started.set()
                while not release.is_set():  # noqa: ASYNC110  # runs a task in the other thread
                    await asyncio.sleep(0.001)

            other = threading.Thread(target=loop.run_until_complete, args=(hold(),))
            other.start()
            try:
                started.wait(5)

                async def mine():
                    for _ in range(50):
                        assert lifecycle.asyncio_task() is asyncio.current_task()
                        await asyncio.sleep(0.0005)

                asyncio.run(mine())
            finally:
                release.set()
                other.join()
        finally:
            loop.close()

    @pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12+ asks the loop")
    def test_forget_loop(self):
        """
        After a fork (the hook forgets the loop seen), it finds the task the
        slow way, and then the fast way again.
        """

        async def main():
            lifecycle._forget_loop()
            assert lifecycle.asyncio_task() is asyncio.current_task()
            assert lifecycle.asyncio_task() is asyncio.current_task()

        asyncio.run(main())

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
    def test_in_a_forked_child(self):
        """
        A child forked inside a task, running a loop of its own, sees its own
        task (the parent's, inherited in asyncio's table, is not it).
        """

        async def child():
            return lifecycle.asyncio_task() is asyncio.current_task()

        async def parent():
            assert lifecycle.asyncio_task() is asyncio.current_task()
            pid = os.fork()
            if pid == 0:  # pragma: no cover  # the child reports by its exit status
                ok = False
                try:
                    ok = asyncio.new_event_loop().run_until_complete(child())
                finally:
                    os._exit(0 if ok else 1)
            return pid

        with warnings.catch_warnings():
            # Python 3.12+ warns of a fork in a process that ran threads.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = asyncio.run(parent())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


class TestNoCancelScope:
    """
    On asyncio, an engine without a deadline and a quota wait make no cancel
    scope; on trio, a quota wait without a timeout makes none either.
    """

    @asyncio_only
    async def test_engine_uncontended(self, monkeypatch, ctx):
        """
        `async with factory.engine(ctx)` with room: no cancel scope, a slot of
        the LocalQuota held without a lease, and the engine closed.
        """
        factory = EngineFactory(make_engine, close=close_engine)
        _no_cancel_scope(monkeypatch)
        async with factory.engine(ctx) as engine:
            use = next(iter(factory._uses))
            assert use._lease is None
            assert factory.quota.stats().in_use == 1
            assert factory.stats().top == (("u-42", 1),)
        assert engine.closed == 1
        settled(factory)

    @pytest.mark.parametrize(
        ("anyio_backend", "timeout"), [("asyncio", None), ("asyncio", 5.0), ("trio", None)]
    )
    async def test_quota_wait(self, monkeypatch, timeout):
        """
        A wait for a slot makes no cancel scope: on asyncio with no timeout or
        with one, on trio with none (trio keeps anyio's timeout).
        """
        q = LocalQuota(per_key=1)
        holder = q.acquire_nowait("a")
        got = []

        async def wait():
            got.append(await q.acquire("a", timeout=timeout))

        async with anyio.create_task_group() as tg:
            _no_cancel_scope(monkeypatch)
            tg.start_soon(wait)
            for _ in range(3):
                await checkpoint()  # no cancel scope either, unlike a sleep
            assert q.stats().waiting == 1
            holder.release()
            monkeypatch.undo()
        assert q.stats().in_use == 1
        got[0].release()
        assert (q._in_use, q._waiters) == ({}, {})

    @asyncio_only
    async def test_engine_wait_and_timeout(self, monkeypatch, ctx):
        """
        An engine that waits for its user's slot, and one that times out,
        make no cancel scope.
        """
        factory = EngineFactory(make_engine, per_user=1, timeout=0.05)
        _no_cancel_scope(monkeypatch)
        async with factory.engine(ctx):
            with pytest.raises(QuotaTimeoutError):
                async with factory.engine(ctx):
                    pass  # pragma: no cover
        s = factory.quota.stats()
        assert (s.granted, s.timed_out, s.waiting, s.in_use) == (1, 1, 0, 0)


@asyncio_only
class TestQuotaTimer:
    """
    On asyncio, a quota's timeout is a timer of the loop that resolves the
    waiter: it leaves the queue when the timer fires.
    """

    async def test_timed_out_waiter_leaves_the_queue_when_the_timer_fires(self):
        """
        A waiter that timed out leaves the queue when its timer fires, before
        its task runs again: a slot freed then goes to the next waiter.
        """
        q = LocalQuota(per_key=1)
        holder = q.acquire_nowait("a")
        results = {}

        async def wait(name, timeout):
            try:
                lease = await q.acquire("a", timeout=timeout)
            except QuotaTimeoutError as e:
                results[name] = e
            else:
                results[name] = lease

        loop = asyncio.get_running_loop()
        first = asyncio.create_task(wait("first", 0.02))
        second = asyncio.create_task(wait("second", None))
        await asyncio.sleep(0)
        assert q.stats().waiting == 2
        fired = loop.create_future()
        # Runs in the same loop turn as the first waiter's timer, after it.
        loop.call_at(loop.time() + 0.02, lambda: fired.set_result(q.stats().waiting))
        assert await fired == 1
        holder.release()  # before the first waiter's task ran again
        await asyncio.gather(first, second)
        assert isinstance(results["first"], QuotaTimeoutError)
        assert results["second"].key == "a"
        s = q.stats()
        assert (s.in_use, s.waiting, s.timed_out, s.granted) == (1, 0, 1, 2)
        results["second"].release()

    async def test_cancelled_waiter_counts_once(self):
        """
        A waiter cancelled before its timeout counts as cancelled only: its
        timer is cancelled with it and never counts a timeout.
        """
        q = LocalQuota(per_key=1)
        holder = q.acquire_nowait("a")
        task = asyncio.create_task(q.acquire("a", timeout=0.02))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.04)  # past the timeout
        s = q.stats()
        assert (s.cancelled, s.timed_out, s.waiting) == (1, 0, 0)
        holder.release()
        assert q._in_use == {}

    async def test_granted_in_the_turn_its_timer_fires(self):
        """
        A waiter granted in the loop turn its timer fires in, just before the
        timer runs, keeps its grant: the timer finds it resolved and does
        nothing.
        """
        q = LocalQuota(per_key=1)
        holder = q.acquire_nowait("a")
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(q.acquire("a", timeout=0.02))
        await asyncio.sleep(0)
        loop.call_at(loop.time() + 0.01, holder.release)  # due before the waiter's timer
        time.sleep(0.05)  # noqa: ASYNC251  # block the loop: both are due in one turn
        lease = await task
        s = q.stats()
        assert (s.in_use, s.timed_out, s.granted, s.waiting) == (1, 0, 2, 0)
        lease.release()

    async def test_cancelled_right_after_the_timer_fired(self):
        """
        A waiter cancelled after its timer fired but before it ran again
        counts once (as cancelled) and holds nothing.
        """
        q = LocalQuota(per_key=1)
        holder = q.acquire_nowait("a")
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(q.acquire("a", timeout=0.02))
        await asyncio.sleep(0)
        fired = loop.create_future()
        loop.call_at(loop.time() + 0.02, lambda: fired.set_result(task.cancel()))
        assert await fired
        with pytest.raises(asyncio.CancelledError):
            await task
        s = q.stats()
        assert (s.cancelled, s.timed_out, s.waiting, s.in_use) == (1, 0, 0, 1)
        holder.release()


@asyncio_only
class TestEngineWaitOnAFuture:
    """
    On asyncio, an engine waiting for its user's slot with no timeout awaits
    the quota's future itself, with no coroutine of the quota's: a grant, a
    cancellation while queued, and one right after the grant each leave the
    quota as it should.
    """

    @pytest.fixture
    def no_quota_coroutine(self, monkeypatch):
        async def refused(*_args):  # pragma: no cover  # the test fails if called
            pytest.fail("the engine's wait went through LocalQuota._wait")

        monkeypatch.setattr(LocalQuota, "_wait", refused)

    async def test_granted(self, no_quota_coroutine, ctx):
        """
        The waiter gets the slot its holder hands back, and the engine.
        """
        factory = EngineFactory(make_engine, per_user=1)
        entered = asyncio.Event()
        release = asyncio.Event()

        async def hold():
            async with factory.engine(ctx):
                entered.set()
                await release.wait()

        async def wait():
            async with factory.engine(ctx) as engine:
                return engine.user_id

        holder = asyncio.create_task(hold())
        await entered.wait()
        waiter = asyncio.create_task(wait())
        await asyncio.sleep(0)
        assert factory.quota.stats().waiting == 1
        release.set()
        assert await waiter == "u-42"
        await holder
        s = factory.quota.stats()
        assert (s.granted, s.waiting, s.in_use, s.cancelled) == (2, 0, 0, 0)
        settled(factory)

    @pytest.mark.parametrize("after_grant", [False, True])
    async def test_cancelled(self, no_quota_coroutine, ctx, after_grant):
        """
        Cancelled while queued, the waiter leaves the queue (counted once);
        cancelled after its grant, before it ran again, it hands the slot
        back. Either way nothing is held and no engine is made for it.
        """
        factory = EngineFactory(make_engine, per_user=1)
        holder = factory.engine(ctx)
        await holder.__aenter__()

        async def wait():
            async with factory.engine(ctx):
                pytest.fail("the cancelled waiter got an engine")  # pragma: no cover

        task = asyncio.create_task(wait())
        await asyncio.sleep(0)
        assert factory.quota.stats().waiting == 1
        if after_grant:
            await holder.__aexit__(None, None, None)  # grants the slot to the waiter
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if not after_grant:
            await holder.__aexit__(None, None, None)
        s = factory.quota.stats()
        assert (s.waiting, s.in_use, s.cancelled) == (0, 0, 0 if after_grant else 1)
        assert factory.stats().created == 1
        assert factory.quota._in_use == {}
        settled(factory)


class TestBinding:
    """
    The body runs with its context bound; bound already, it is not bound again.
    """

    async def test_bound_already_is_kept(self, ctx):
        """
        Under a bind of the same context, the body sees it, and it is still
        bound after the body.
        """
        factory = EngineFactory(make_engine)
        with bind(ctx):
            async with factory.engine() as engine:
                assert current() is ctx
                assert engine.user_id == "u-42"
            assert current() is ctx

    async def test_another_users_context_is_refused(self, ctx, other_ctx):
        """
        Under a bind of another user's context, entering refuses with
        IsolationError and takes no slot; a wrong type raises TypeError.
        """
        factory = EngineFactory(make_engine)
        with bind(ctx):
            with pytest.raises(IsolationError):
                async with factory.engine(other_ctx):
                    pass  # pragma: no cover
            with pytest.raises(TypeError, match=r"takes a usercontext\.UserContext"):
                async with factory.engine("u-42"):  # type: ignore[arg-type]
                    pass  # pragma: no cover
        assert factory.quota.stats().granted == 0
        settled(factory)

    async def test_a_child_of_the_bound_context(self, ctx):
        """
        A child context of the bound one's user is bound for the body, and the
        parent again after it.
        """
        factory = EngineFactory(make_engine)
        child = ctx.child()
        with bind(ctx):
            async with factory.engine(child):
                assert current() is child
            assert current() is ctx


class TestUseObject:
    """
    An `EngineUse` made by hand works as the one `EngineFactory.engine` gives.
    """

    async def test_made_by_hand(self, ctx):
        """
        ``EngineUse(factory, ctx)`` gives an engine of *ctx*'s user, binds
        *ctx* for the body, and closes the engine after it.
        """
        factory = EngineFactory(make_engine, close=close_engine)
        async with EngineUse(factory, ctx) as engine:
            assert current() is ctx
            assert factory.stats().in_use == 1
        assert (engine.user_id, engine.closed) == ("u-42", 1)
        settled(factory)

    def test_sync_create_fails_under_a_bind(self, ctx):
        """
        In ``with``, under a bind of the same context, a create that fails
        leaves the context bound as it was and takes no slot.
        """

        def fail(_ctx):
            raise BoomError

        factory = EngineFactory(fail)
        with bind(ctx):
            with pytest.raises(BoomError), factory.engine():
                pass  # pragma: no cover
            assert current() is ctx
        s = factory.stats()
        assert (s.create_errors, s.thread_quota.in_use) == (1, 0)


class TestNativeAbort:
    """
    `aclose()` cuts bodies on asyncio by a counted native cancellation.
    """

    async def test_abort_by_aclose_is_told_from_an_outer_cancel(self, anyio_backend, ctx):
        """
        A body cut by aclose() raises FactoryClosedError; one whose task is
        also cancelled from outside raises the cancellation (the outer cancel
        wins), and its engine is closed all the same.
        """
        factory = EngineFactory(make_engine, close=close_engine)
        results = []
        entered = anyio.Event()

        async def body():
            try:
                async with factory.engine(ctx):
                    entered.set()
                    await anyio.sleep(10)
            except FactoryClosedError as e:
                results.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(body)
            await entered.wait()
            await factory.aclose(timeout=0)
        assert len(results) == 1
        assert "aclose() was cancelled" not in str(results[0])
        settled(factory)

        factory = EngineFactory(make_engine, close=close_engine)
        entered = anyio.Event()
        engines: list[Engine] = []
        seen = []
        with anyio.CancelScope() as outer:

            async def cut():
                try:
                    async with factory.engine(user("u-1")) as engine:
                        engines.append(engine)
                        entered.set()
                        await anyio.sleep(10)
                except BaseException as e:
                    seen.append(type(e))
                    raise

            async with anyio.create_task_group() as tg:
                tg.start_soon(cut)
                await entered.wait()
                outer.cancel()
                await factory.aclose(timeout=0)
        assert seen == [anyio.get_cancelled_exc_class()]
        assert engines[0].closed == 1
        settled(factory)
