from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import multiprocessing
import operator
import threading
import time
import types

import anyio
import anyio.lowlevel
import pytest

import usercontext

from usercontext import (
    ContextExecutor,
    IsolationError,
    NoContextError,
    UserContext,
    _context,
    _executor,
    bind,
    current,
    current_or_none,
    isolated,
    to_thread,
    wrap,
)


probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="unset")


def user_of_current():
    """
    Return the user_id bound in the running code, or None.
    """
    ctx = current_or_none()
    return None if ctx is None else ctx.user_id


class Stop(BaseException):
    """
    A BaseException that is neither an Exception nor a cancellation.
    """


# Run in child processes: they must be importable module-level functions.
def remote_current():
    """
    Return the context bound in the child process.
    """
    return current_or_none()


def remote_describe(prefix, *, suffix):
    """
    Describe the bound context, to check that arguments arrive.
    """
    return f"{prefix}{current().user_id}{suffix}"


_user_at_start = "initializer not run"


def remember_user_at_start():
    """
    A pool initializer: note the user bound while the worker starts.
    """
    global _user_at_start  # noqa: PLW0603  # the worker's own record
    _user_at_start = user_of_current()


def remote_start_and_now():
    """
    Return the user bound when the worker started and the one bound now.
    """
    return _user_at_start, user_of_current()


def remote_new_context(user_id):
    """
    Create a context in the worker, under the worker's rules.
    """
    return UserContext(user_id=user_id, thread_id="u-2", run_id="u-3").user_id


START_METHODS = [
    pytest.param(
        method,
        marks=pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning"),
    )
    for method in multiprocessing.get_all_start_methods()
]


class TestCurrent:
    def test_nothing_bound(self):
        """
        Without a bound context, current() raises NoContextError, a LookupError,
        whose message says how to bind one; current_or_none() returns None.
        """
        with pytest.raises(NoContextError) as ei:
            current()

        assert isinstance(ei.value, LookupError)
        assert isinstance(ei.value, usercontext.UserContextError)
        assert "with usercontext.bind(ctx):" in str(ei.value)
        assert "current_or_none()" in str(ei.value)
        assert current_or_none() is None

    def test_bound(self, ctx):
        """
        Inside bind(), current() and current_or_none() return the bound context.
        """
        with bind(ctx):
            assert current() is ctx
            assert current_or_none() is ctx


class TestBind:
    def test_with(self, ctx):
        """
        `with bind(ctx) as c` binds ctx, hands it out, and unbinds on exit.
        """
        with bind(ctx) as c:
            assert c is ctx
            assert current() is ctx

        assert current_or_none() is None

    def test_with_exception(self, ctx):
        """
        An exception leaves the block unbound and passes through.
        """
        with pytest.raises(KeyError, match="boom"), bind(ctx):
            raise KeyError("boom")

        assert current_or_none() is None

    async def test_async_with(self, ctx):
        """
        `async with bind(ctx)` binds and unbinds too.
        """
        async with bind(ctx) as c:
            assert c is ctx
            await anyio.lowlevel.checkpoint()
            assert current() is ctx

        assert current_or_none() is None

    def test_nesting(self, ctx):
        """
        Nested binds of the same user restore the previous context on exit.
        """
        child = ctx.child()
        grandchild = child.child()
        with bind(ctx):
            with bind(child):
                with bind(grandchild):
                    assert current() is grandchild
                assert current() is child
                with bind(ctx.evolve(run_id="r-2")) as sibling:
                    assert current() is sibling
                assert current() is child
            assert current() is ctx
        assert current_or_none() is None

    def test_other_user_refused(self, ctx, other_ctx):
        """
        Binding another user's context inside an active one raises
        IsolationError and leaves the outer context bound.
        """
        with bind(ctx):
            with (
                pytest.raises(IsolationError, match="'u-99' while a context of user 'u-42'"),
                bind(other_ctx),
            ):
                pytest.fail("entered another user's context")  # pragma: no cover
            assert current() is ctx
            with bind(ctx.child()):
                assert current().user_id == "u-42"
        assert current_or_none() is None

    def test_same_user_root_allowed(self, ctx):
        """
        Another root context of the same user may be bound inside.
        """
        other_root = UserContext(user_id="u-42", thread_id="t-other", run_id="r-other")
        with bind(ctx), bind(other_root):
            assert current() is other_root

    def test_sequential_other_users(self, ctx, other_ctx):
        """
        Binding users one after the other is fine.
        """
        with bind(ctx):
            assert current() is ctx
        with bind(other_ctx):
            assert current() is other_ctx

    @pytest.mark.parametrize("value", [None, "u-42", {"user_id": "u-42"}, object()])
    def test_not_a_context(self, value):
        """
        bind() of anything but a UserContext raises TypeError.
        """
        with pytest.raises(TypeError, match=r"bind\(\) takes a usercontext\.UserContext"):
            bind(value)

    def test_dict_form_refused(self, ctx):
        """
        The dict form of a context is not a context.
        """
        with pytest.raises(TypeError, match="got dict"):
            bind(ctx.to_dict())  # type: ignore[arg-type]

    def test_decorator_sync(self, ctx):
        """
        As a decorator, bind() binds for each call of a sync function, and
        keeps its name and arguments.
        """

        @bind(ctx)
        def fn(a, *, b):
            """Doc."""
            return current(), a + b

        assert fn(1, b=2) == (ctx, 3)
        assert fn(3, b=4) == (ctx, 7)
        assert current_or_none() is None
        assert fn.__name__ == "fn"
        assert fn.__doc__ == "Doc."

    def test_decorator_sync_exception(self, ctx):
        """
        An exception raised by a decorated function unbinds and passes through.
        """

        @bind(ctx)
        def fn():
            raise ValueError(current().user_id)

        with pytest.raises(ValueError, match="u-42"):
            fn()

        assert current_or_none() is None

    async def test_decorator_async(self, ctx):
        """
        As a decorator of an async function, bind() binds for the whole call,
        across awaits.
        """

        @bind(ctx)
        async def fn(a):
            await anyio.lowlevel.checkpoint()
            return current(), a

        assert await fn(5) == (ctx, 5)
        assert current_or_none() is None
        assert fn.__name__ == "fn"

    async def test_decorator_concurrent_calls(self, ctx):
        """
        Concurrent calls of one decorated function each bind anew.
        """
        seen = []

        @bind(ctx)
        async def fn(i):
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
                seen.append((i, current() is ctx))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(fn, i)

        assert len(seen) == 30
        assert all(ok for _, ok in seen)

    def test_reentered_object_fails(self, ctx):
        """
        Entering one bind object twice at once fails loudly on the second exit.
        """
        b = bind(ctx)

        def run():
            with pytest.raises(RuntimeError, match="already been used"), b, b:
                pass

        contextvars.copy_context().run(run)

    def test_exit_in_another_context(self, ctx):
        """
        A bind entered in one Context and left in another does not raise and
        leaves the other Context unbound.
        """
        b = bind(ctx)
        first = contextvars.copy_context()
        first.run(b.__enter__)
        assert first.run(current_or_none) is ctx

        second = contextvars.copy_context()
        second.run(b.__exit__, None, None, None)

        assert second.run(current_or_none) is None
        assert current_or_none() is None

    def test_exit_in_a_copy(self, ctx):
        """
        A bind left in a copy of the Context it was entered in does not raise
        and leaves the copy as it was: the copy inherited the context, as a
        task started inside the block would.
        """
        b = bind(ctx)
        first = contextvars.copy_context()
        first.run(b.__enter__)
        second = first.copy()
        assert second.run(current_or_none) is ctx

        second.run(b.__exit__, None, None, None)

        assert second.run(current_or_none) is ctx
        assert first.run(current_or_none) is ctx

    def test_exit_in_a_copy_keeps_inherited(self, ctx):
        """
        Left in another Context, a nested bind leaves the inherited value alone.
        """
        child = ctx.child()
        outer, inner = bind(ctx), bind(child)
        first = contextvars.copy_context()
        first.run(outer.__enter__)
        first.run(inner.__enter__)
        second = first.copy()

        second.run(inner.__exit__, None, None, None)

        assert second.run(current_or_none) is child

    def test_exit_in_another_context_leaves_others_alone(self, ctx):
        """
        Left in a Context where another context is bound, a bind changes nothing.
        """
        b = bind(ctx)
        first = contextvars.copy_context()
        first.run(b.__enter__)
        sibling = ctx.child()

        def other():
            with bind(sibling):
                b.__exit__(None, None, None)
                return current()

        assert contextvars.copy_context().run(other) is sibling

    async def test_async_generator_closed_elsewhere(self, ctx):
        """
        An async generator that binds inside and is closed from another task
        neither raises nor binds anything in the closing task.
        """
        entered = []

        async def stream():
            async with bind(ctx):
                entered.append(current())
                yield 1
                yield 2  # pragma: no cover  # never reached: closed after the first item

        agen = stream()

        async def consume_one():
            assert await agen.__anext__() == 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume_one)

        assert entered == [ctx]
        assert current_or_none() is None
        await agen.aclose()
        assert current_or_none() is None

    async def test_streaming_body(self, ctx):
        """
        A response body that binds inside, starts in the handler's task and is
        finished by another task (as a server streams it) ends without error
        and leaves the finishing task unbound. A generator runs in the Context
        of whichever task resumes it, so the later chunks see no context, and
        never another user's.
        """
        seen = []

        async def body():
            async with bind(ctx.child()):
                for i in range(3):
                    await anyio.lowlevel.checkpoint()
                    seen.append(user_of_current())
                    yield i

        gen = body()
        chunks = []
        async with anyio.create_task_group() as tg:

            async def send_first():
                chunks.append(await gen.__anext__())

            tg.start_soon(send_first)
        chunks.extend([chunk async for chunk in gen])

        assert chunks == [0, 1, 2]
        assert seen == ["u-42", None, None]
        assert current_or_none() is None

    async def test_tasks_do_not_leak(self, isolation_checker):
        """
        Tasks in a task group, 10 users' at once, each see only what they
        bind, at every checkpoint.
        """

        async def work(ctx):
            seen = []
            for _ in range(5):
                await anyio.lowlevel.checkpoint()
                seen.append(current().user_id)
            return seen

        report = await isolation_checker.acheck(work)

        assert report.results == {u: ([u] * 5, [u] * 5) for u in report.users}
        assert current_or_none() is None

    async def test_child_tasks_inherit(self, ctx):
        """
        Tasks started under a bound context see it, and what they bind stays
        theirs.
        """
        seen = []

        async def work():
            seen.append(current())
            with bind(current().child()):
                await anyio.lowlevel.checkpoint()

        async with bind(ctx), anyio.create_task_group() as tg:
            tg.start_soon(work)
            tg.start_soon(work)
            await anyio.lowlevel.checkpoint()
            assert current() is ctx

        assert seen == [ctx, ctx]

    def test_repr(self, ctx):
        """
        repr names the user and the request.
        """
        assert repr(bind(ctx)) == (
            f"<usercontext.bind(user_id='u-42', request_id={ctx.request_id!r})>"
        )


class TestWrap:
    def test_later_in_thread(self, ctx):
        """
        A wrapped callback sees the context of the wrap() call, when run later
        in another thread.
        """
        with bind(ctx):
            callback = wrap(user_of_current)
        results = []
        t = threading.Thread(target=lambda: results.append((callback(), user_of_current())))
        t.start()
        t.join()

        assert results == [("u-42", None)]
        assert current_or_none() is None

    def test_arguments_and_result(self, ctx):
        """
        Arguments and the result pass through.
        """
        with bind(ctx):
            add = wrap(operator.add)

        assert add(2, 3) == 5

    def test_changes_stay_in_call(self, ctx):
        """
        What a call changes stays in that call.
        """

        def change():
            before = (probe.get(), current())
            probe.set("changed")
            bind(current().child()).__enter__()
            return before

        with bind(ctx):
            wrapped = wrap(change)
        token = probe.set("mine")
        try:
            assert wrapped() == ("unset", ctx)
            assert wrapped() == ("unset", ctx)
            assert probe.get() == "mine"
        finally:
            probe.reset(token)

    def test_concurrent_calls(self, ctx):
        """
        Many threads may call one wrapped function at the same time.
        """
        barrier = threading.Barrier(16)
        errors = []
        results = []

        def fn(i):
            barrier.wait()
            with bind(current().child(run_id=f"r-{i}")):
                time.sleep(0.001)
                return current().user_id, current().run_id

        with bind(ctx):
            wrapped = wrap(fn)

        def runner(i):
            try:
                results.append(wrapped(i))
            except BaseException as e:  # pragma: no cover  # shown by the assert
                errors.append(e)

        threads = [threading.Thread(target=runner, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert errors == []
        assert sorted(results) == sorted(("u-42", f"r-{i}") for i in range(16))

    def test_coroutine_function_refused(self):
        """
        wrap() of a coroutine function raises TypeError.
        """

        async def handler():
            pass  # pragma: no cover

        with pytest.raises(TypeError, match="coroutine function"):
            wrap(handler)

    def test_keeps_name(self):
        """
        The wrapper keeps the wrapped function's name.
        """
        assert wrap(user_of_current).__name__ == "user_of_current"


class TestToThread:
    async def test_carries_context(self, ctx):
        """
        to_thread() runs the function in a worker thread that sees the caller's
        context, with arguments passed.
        """

        def fn(a, b):
            return threading.get_ident(), current(), a + b

        async with bind(ctx):
            ident, seen, total = await to_thread(fn, 1, 2)

        assert ident != threading.get_ident()
        assert seen is ctx
        assert total == 3

    async def test_no_leak_back(self, ctx):
        """
        What the thread binds or sets does not reach the caller.
        """

        def fn():
            probe.set("thread")
            bind(current().child()).__enter__()
            return current()

        async with bind(ctx):
            child = await to_thread(fn)
            assert child.parent_request_id == ctx.request_id
            assert current() is ctx
            assert probe.get() == "unset"

    async def test_unbound(self):
        """
        Without a bound context the thread sees none.
        """
        assert await to_thread(user_of_current) is None

    async def test_limiter(self, ctx):
        """
        The limiter is used.
        """
        limiter = anyio.CapacityLimiter(1)

        def fn():
            return limiter.borrowed_tokens, current().user_id

        async with bind(ctx):
            assert await to_thread(fn, limiter=limiter) == (1, "u-42")
        assert limiter.borrowed_tokens == 0

    async def test_many_users(self, isolation_checker):
        """
        Concurrent to_thread calls of 10 users, 2 each at once, each see
        their own context in the worker thread.
        """

        async def work(ctx):
            return await to_thread(current)

        report = await isolation_checker.acheck(work)

        assert report.calls == 20
        assert report.results == {c.user_id: (c, c) for c in isolation_checker.users}


class TestContextExecutorThreads:
    def test_submitter_context(self, ctx, other_ctx):
        """
        Tasks see the context current at submission, not the one of the
        code that created the executor and started its threads.
        """
        with bind(ctx):
            executor = ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
            assert executor.submit(user_of_current).result() == "u-42"
            assert executor.submit(user_of_current).result() == "u-42"
        with executor:
            assert executor.submit(user_of_current).result() is None
            with bind(other_ctx):
                assert executor.submit(user_of_current).result() == "u-99"
                assert executor.submit(current).result() is other_ctx

    def test_no_leak_between_tasks(self, ctx):
        """
        Nothing a task binds or sets leaks into the next task of the same thread.
        """

        def dirty():
            probe.set("dirty")
            bind(current().child()).__enter__()
            return threading.get_ident()

        def clean():
            return threading.get_ident(), probe.get(), current_or_none()

        with ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=1)) as executor:
            with bind(ctx):
                first = executor.submit(dirty).result()
            second, value, seen = executor.submit(clean).result()

        assert first == second
        assert (value, seen) == ("unset", None)

    def test_arguments(self, ctx):
        """
        Positional and keyword arguments pass through.
        """
        with (
            ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=1)) as executor,
            bind(ctx),
        ):
            future = executor.submit(remote_describe, "<", suffix=">")
            assert future.result() == "<u-42>"

    def test_map(self, ctx):
        """
        map() runs every item under the caller's context, in order.
        """

        def fn(i):
            return i, current().user_id

        with (
            ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=3)) as executor,
            bind(ctx),
        ):
            assert list(executor.map(fn, range(20))) == [(i, "u-42") for i in range(20)]

    def test_shutdown(self):
        """
        shutdown() shuts the wrapped executor down; leaving `with` does too.
        """
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        executor = ContextExecutor(pool)
        executor.shutdown()

        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit(int)
        with pytest.raises(RuntimeError, match="shutdown"):
            executor.submit(int)

        with ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=1)) as executor:
            assert executor.submit(int, "3").result() == 3
        with pytest.raises(RuntimeError):
            executor.submit(int)

    def test_shutdown_cancel_futures(self):
        """
        shutdown(wait=False, cancel_futures=True) cancels queued tasks.
        """
        gate = threading.Event()
        executor = ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        running = executor.submit(gate.wait, 10)
        queued = [executor.submit(int) for _ in range(5)]

        executor.shutdown(wait=False, cancel_futures=True)
        gate.set()

        assert running.result() is True
        assert all(f.cancelled() for f in queued)

    def test_run_in_executor(self, ctx):
        """
        asyncio's loop.run_in_executor goes through submit() and carries the
        context.
        """

        async def main():
            async with bind(ctx):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(executor, user_of_current)

        with ContextExecutor(concurrent.futures.ThreadPoolExecutor(max_workers=1)) as executor:
            assert asyncio.run(main()) == "u-42"

    def test_repr(self):
        """
        repr shows the wrapped executor.
        """
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            assert repr(ContextExecutor(pool)) == f"<usercontext.ContextExecutor({pool!r})>"


class TestContextExecutorProcesses:
    def test_process_pool(self, ctx):
        """
        With a process pool, the child process sees a context equal to the
        submitter's, sent through the codec; without one bound it sees none.
        """
        rich = ctx.child(connection_id="ws-1", metadata={"plan": "pro", "tags": ["a"]})
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
        with ContextExecutor(pool) as executor:
            assert executor._processes is True
            with bind(rich):
                seen = executor.submit(remote_current).result(timeout=60)
                described = executor.submit(remote_describe, "[", suffix="]").result(timeout=60)
            unbound = executor.submit(remote_current).result(timeout=60)

        assert seen == rich
        assert seen is not rich
        assert described == "[u-42]"
        assert unbound is None

    @pytest.mark.parametrize("method", START_METHODS)
    def test_worker_started_under_a_user(self, method, ctx, other_ctx):
        """
        A worker started by a task of user u-42 runs a task submitted with no
        context with none, and a task of u-99 with u-99's, whatever the start
        method. Its initializer ran with no user bound either: the pool started
        it from a Context without one.
        """
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context(method),
            initializer=remember_user_at_start,
        )
        with ContextExecutor(pool) as executor:
            with bind(ctx):
                first = executor.submit(remote_start_and_now).result(timeout=60)
            unbound = executor.submit(remote_start_and_now).result(timeout=60)
            with bind(other_ctx):
                other = executor.submit(remote_start_and_now).result(timeout=60)

        assert first == (None, "u-42")
        assert unbound == (None, None)
        assert other == (None, "u-99")

    @pytest.mark.parametrize("method", START_METHODS)
    def test_worker_forked_by_someone_else(self, method, ctx, other_ctx):
        """
        A worker that the pool itself started while u-42 was bound (a plain
        submit, outside ContextExecutor; with fork it inherits u-42) still runs
        tasks sent through ContextExecutor with their own context, or none.
        """
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context(method)
        )
        with ContextExecutor(pool) as executor:
            with bind(ctx):
                direct = pool.submit(user_of_current).result(timeout=60)
            unbound = executor.submit(user_of_current).result(timeout=60)
            with bind(other_ctx):
                other = executor.submit(user_of_current).result(timeout=60)

        assert direct == ("u-42" if method == "fork" else None)
        assert unbound is None
        assert other == "u-99"

    def test_rules_must_reach_spawned_workers(self):
        """
        A spawned worker without the submitter's rules refuses the task with a
        ConfigurationError that says to configure it in the initializer; with
        the initializer it applies them, and the InvalidContextError it raises
        reaches the submitter with its field, value and reason.
        """
        rules = usercontext.IdRules(pattern=r"u-[0-9]+")
        usercontext.configure(id_rules=rules, max_depth=8)
        ctx = UserContext(user_id="u-1", thread_id="u-2", run_id="u-3")
        spawn = multiprocessing.get_context("spawn")

        bare = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn)
        with ContextExecutor(bare) as executor, bind(ctx):
            future = executor.submit(remote_current)
            with pytest.raises(usercontext.ConfigurationError) as ei:
                future.result(timeout=60)
        message = str(ei.value)
        assert "by other rules than the process that submitted the task" in message
        assert "here IdRules(max_length=256," in message
        assert "pattern=None) with max_depth=32" in message
        assert "there IdRules(max_length=256," in message
        assert "pattern='u-[0-9]+') with max_depth=8" in message
        assert "initializer=functools.partial(usercontext.configure" in message

        configured = concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=spawn,
            initializer=functools.partial(usercontext.configure, id_rules=rules, max_depth=8),
        )
        with ContextExecutor(configured) as executor:
            with bind(ctx):
                seen = executor.submit(remote_current).result(timeout=60)
            made = executor.submit(remote_new_context, "u-7").result(timeout=60)
            refused = executor.submit(remote_new_context, "alice").exception(timeout=60)

        assert seen == ctx
        assert made == "u-7"
        assert isinstance(refused, usercontext.InvalidContextError)
        assert (refused.field, refused.value) == ("user_id", "alice")
        assert refused.reason == "does not match the pattern 'u-[0-9]+' of the configured IdRules"

    def test_worker_refusal_reaches_the_submitter(self):
        """
        An InvalidContextError raised in a worker reaches the submitter with its
        field, value and reason, and the pool keeps working (it used to fail
        to unpickle, which broke the whole pool).
        """
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
        with ContextExecutor(pool) as executor:
            refused = executor.submit(remote_new_context, "null").exception(timeout=60)
            after = executor.submit(remote_new_context, "u-8").result(timeout=60)

        assert type(refused) is usercontext.InvalidContextError
        assert (refused.field, refused.value, refused.reason) == (
            "user_id",
            "null",
            "is a placeholder, not a real id",
        )
        assert str(refused).startswith("Invalid UserContext.user_id: is a placeholder")
        assert after == "u-8"

    def test_rules_mismatch_in_process(self, ctx):
        """
        _run_in_process refuses a task sent under other rules before running it.
        """
        ran = []
        other = _context._describe_rules(usercontext.IdRules(max_length=10), 32)

        with pytest.raises(usercontext.ConfigurationError, match="max_length=10"):
            _executor._run_in_process(ctx.to_dict(), other, ran.append, (1,), {})
        assert ran == []

    def test_processes_flag(self, ctx):
        """
        processes=True sends the context through the codec, here to a thread:
        the task sees an equal copy, not the same object.
        """
        with ContextExecutor(
            concurrent.futures.ThreadPoolExecutor(max_workers=1), processes=True
        ) as executor:
            assert executor.submit(remote_current).result() is None
            with bind(ctx):
                seen = executor.submit(remote_current).result()

        assert seen == ctx
        assert seen is not ctx

    def test_processes_false(self):
        """
        processes=False keeps the thread path even for an explicit choice.
        """
        with ContextExecutor(
            concurrent.futures.ThreadPoolExecutor(max_workers=1), processes=False
        ) as executor:
            assert executor._processes is False

    def test_run_in_process(self, ctx):
        """
        _run_in_process binds the decoded context for the call only, and runs
        unbound without one; it validates what it decodes.
        """
        run = functools.partial(_executor._run_in_process, rules=_context.described_rules())

        assert run(None, fn=user_of_current, args=(), kwargs={}) is None
        assert run(ctx.to_dict(), fn=remote_current, args=(), kwargs={}) == ctx
        assert (
            run(ctx.to_dict(), fn=remote_describe, args=("(",), kwargs={"suffix": ")"}) == "(u-42)"
        )
        assert current_or_none() is None
        with pytest.raises(usercontext.InvalidContextError):
            run({**ctx.to_dict(), "user_id": "null"}, fn=remote_current, args=(), kwargs={})

    def test_run_in_process_no_leak(self, ctx):
        """
        What the task sets does not stay in the worker.
        """

        def dirty():
            probe.set("dirty")

        rules = _context.described_rules()
        _executor._run_in_process(None, rules, dirty, (), {})
        _executor._run_in_process(ctx.to_dict(), rules, dirty, (), {})

        assert probe.get() == "unset"


class TestIsolated:
    def test_sync_no_leak(self, ctx):
        """
        What an isolated sync function binds or sets does not reach the caller.
        """

        @isolated
        def fn(a, *, b):
            bind(ctx).__enter__()
            probe.set("inside")
            return current().user_id, a + b

        assert fn(1, b=2) == ("u-42", 3)
        assert current_or_none() is None
        assert probe.get() == "unset"
        assert fn.__name__ == "fn"

    def test_sync_sees_caller_variables(self):
        """
        An isolated function starts from a copy of the caller's Context: it
        sees the caller's context variables.
        """

        @isolated
        def fn():
            return probe.get()

        token = probe.set("caller")
        try:
            assert fn() == "caller"
        finally:
            probe.reset(token)

    def test_sync_other_user(self, ctx, other_ctx):
        """
        Inside an isolated function another user's context can be bound, also
        when the caller has one bound; the caller's stays.
        """

        @isolated
        def fn():
            with bind(other_ctx):
                return current().user_id

        assert fn() == "u-99"
        with bind(ctx):
            assert fn() == "u-99"
            assert current() is ctx

    def test_sync_exception(self):
        """
        Exceptions pass through unchanged.
        """
        error = KeyError("k")

        @isolated
        def fn():
            raise error

        with pytest.raises(KeyError) as ei:
            fn()

        assert ei.value is error

    async def test_async_no_leak(self, ctx):
        """
        What an isolated async function binds or sets does not reach the caller.
        """

        @isolated
        async def fn(a):
            bind(ctx).__enter__()
            probe.set("inside")
            await anyio.lowlevel.checkpoint()
            return current().user_id, a

        assert await fn(7) == ("u-42", 7)
        assert current_or_none() is None
        assert probe.get() == "unset"
        assert fn.__name__ == "fn"

    async def test_async_other_user(self, ctx, other_ctx):
        """
        Inside an isolated async function another user's context can be bound,
        also when the caller has one bound; the caller's stays.
        """

        @isolated
        async def fn():
            async with bind(other_ctx):
                await anyio.lowlevel.checkpoint()
                return current().user_id

        assert await fn() == "u-99"
        async with bind(ctx):
            assert await fn() == "u-99"
            assert current() is ctx

    async def test_async_exception(self):
        """
        Exceptions pass through with their type intact, not wrapped in a group.
        """
        error = LookupError("lost")

        @isolated
        async def fn():
            await anyio.lowlevel.checkpoint()
            raise error

        with pytest.raises(LookupError) as ei:
            await fn()

        assert ei.value is error
        assert type(ei.value) is LookupError

    def test_sync_base_exception(self):
        """
        A BaseException that is not an Exception passes through unchanged.
        """

        @isolated
        def fn():
            raise Stop

        with pytest.raises(Stop):
            fn()

    async def test_async_base_exception(self):
        """
        A BaseException that is not a cancellation passes through with its
        type intact, as it does from a sync isolated function.
        """

        @isolated
        async def fn():
            await anyio.lowlevel.checkpoint()
            raise Stop

        with pytest.raises(Stop):
            await fn()

    async def test_async_cancelled(self):
        """
        Cancelling the caller's cancel scope cancels the isolated call.
        """
        states = []

        @isolated
        async def fn():
            try:
                await anyio.sleep(30)
            finally:
                states.append("cleaned up")

        start = time.monotonic()
        with anyio.move_on_after(0.05) as scope:
            await fn()
            pytest.fail("not cancelled")  # pragma: no cover

        assert scope.cancelled_caught
        assert states == ["cleaned up"]
        assert time.monotonic() - start < 5

    async def test_async_cancelled_by_sibling(self):
        """
        A cancel scope cancelled from another task cancels the isolated call.
        """
        started = anyio.Event()

        @isolated
        async def fn():
            started.set()
            await anyio.sleep(30)

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def canceller():
                    await started.wait()
                    scope.cancel()

                tg.start_soon(canceller)
                await fn()

        assert scope.cancel_called

    async def test_async_runs_in_the_callers_task(self, ctx):
        """
        An isolated async function runs in its caller's task (no task is
        started), yet sets nothing in the caller's Context, across suspensions.
        """

        @isolated
        async def fn():
            task = anyio.get_current_task().id
            async with bind(ctx):
                for _ in range(3):
                    probe.set("inside")
                    await anyio.lowlevel.checkpoint()
                    assert current() is ctx
            return task

        assert await fn() == anyio.get_current_task().id
        assert current_or_none() is None
        assert probe.get() == "unset"

    def test_async_closed_while_suspended(self, ctx):
        """
        Closing the coroutine of an isolated async function while it waits
        closes the wrapped coroutine too, in its own Context, so its cleanup
        runs and sees what it bound.
        """
        seen = []

        @types.coroutine
        def pause():
            yield "paused"

        @isolated
        async def fn():
            with bind(ctx):
                try:
                    await pause()
                finally:
                    seen.append(current_or_none())

        coro = fn()
        assert coro.send(None) == "paused"
        coro.close()

        assert seen == [ctx]
        assert current_or_none() is None


class TestBindDecoratorRefusals:
    """
    `bind` refuses to decorate what it could bind only partly.
    """

    def test_generator_functions(self, ctx):
        """
        A generator or async generator function would run unbound after its
        first step: bind() refuses to decorate it, with a message saying what
        to do instead.
        """

        def gen():
            yield current()

        async def agen():
            yield current()

        for fn in (gen, agen):
            with pytest.raises(TypeError, match=r"cannot decorate generator function .*with bind"):
                bind(ctx)(fn)
