"""
`usercontext.testing`'s kit, used directly (no pytest plugin): the context
factory, the isolation checker and the leak guard.
"""

from __future__ import annotations

import contextvars
import sys
import threading

import anyio
import pytest

import usercontext as uc

from usercontext._testing_leaks import _classes
from usercontext.testing import (
    ContextFactory,
    CrossUserObservation,
    IsolationChecker,
    Leak,
    LeakGuard,
)


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


class TestContextFactory:
    def test_make(self):
        """
        Each context is of a new user, with fields overridden or added.
        """
        contexts = ContextFactory(prefix="tenant")

        first, second = contexts.users(2)
        third = contexts.make(user_id="alice", metadata={"plan": "pro"})

        assert (first.user_id, first.thread_id, first.run_id) == ("tenant-1", "t-1", "r-1")
        assert second.user_id == "tenant-2"
        assert (third.user_id, third.run_id, dict(third.metadata)) == (
            "alice",
            "r-3",
            {"plan": "pro"},
        )

    def test_bad_prefix(self):
        """
        A prefix that makes invalid user ids is refused at once, naming the field.
        """
        with pytest.raises(uc.InvalidContextError, match="user_id"):
            ContextFactory(prefix="bad\n")

    def test_bind_and_unbind(self, ctx):
        """
        Binds nest (most recent current) and are all undone, most recent first.
        """
        contexts = ContextFactory()

        made = contexts.bind()
        child = contexts.bind(made.child(run_id="r-2"))

        assert uc.current() is child
        assert repr(contexts) == "<usercontext.testing.ContextFactory(bound=2)>"
        contexts.unbind_all()
        assert uc.current_or_none() is None
        assert repr(contexts) == "<usercontext.testing.ContextFactory(bound=0)>"

    def test_bind_takes_a_context_or_fields(self, ctx):
        """
        A context and fields together are refused; nothing is bound.
        """
        with pytest.raises(TypeError, match="not both"):
            ContextFactory().bind(ctx, user_id="u-1")
        assert uc.current_or_none() is None

    def test_other_context_left_for_later(self):
        """
        A bind made in another Context (thread) is left by `unbind_all` here,
        undone there, and dropped by `forget`.
        """
        contexts = ContextFactory()
        done = []

        def bind_and_unbind():
            contexts.bind()
            done.append(uc.current().user_id)

        thread = threading.Thread(target=bind_and_unbind)
        thread.start()
        thread.join()
        contexts.unbind_all()

        assert done == ["u-1"]
        assert repr(contexts) == "<usercontext.testing.ContextFactory(bound=1)>"
        contexts.forget()
        assert repr(contexts) == "<usercontext.testing.ContextFactory(bound=0)>"

    def test_left_bound_over_it(self, ctx):
        """
        When something left bound over its binds, `unbind_all` keeps the
        token and leaves what is bound as it is, for the leak guard to report.
        """
        contexts = ContextFactory()

        def body():
            contexts.bind(user_id="u-42")
            uc.bind(ctx).__enter__()
            contexts.unbind_all()
            return uc.current_or_none(), repr(contexts)

        bound, state = contextvars.copy_context().run(body)

        assert bound is ctx
        assert state == "<usercontext.testing.ContextFactory(bound=1)>"


class TestIsolationChecker:
    def test_threads_pass(self):
        """
        Isolated sync code passes: 5 users x 3 calls, all at once, each
        result its own.
        """
        inside = []

        def handler(ctx):
            inside.append(threading.get_ident())
            return {"user": uc.current().user_id, "ctx": uc.current()}

        report = IsolationChecker(users=5, per_user=3).check(handler)

        assert report.users == ("u-0", "u-1", "u-2", "u-3", "u-4")
        assert report.calls == 15
        assert len(set(inside)) == 15
        assert {user: [r["user"] for r in results] for user, results in report.results.items()} == {
            f"u-{i}": [f"u-{i}"] * 3 for i in range(5)
        }

    async def test_tasks_pass(self):
        """
        Isolated async code passes, with every task started before any call
        goes on.
        """
        started = []

        async def handler(ctx):
            started.append(ctx.user_id)
            await anyio.lowlevel.checkpoint()
            assert len(started) == 20
            return [uc.current().user_id]

        report = await IsolationChecker(users=10).acheck(handler)

        assert report.calls == 20

    async def test_tasks_fail(self):
        """
        A shared cache fails the check in tasks, naming both users and what
        was seen.
        """
        cache = {}

        async def handler(ctx):
            await anyio.lowlevel.checkpoint()
            return cache.setdefault("k", f"hello {ctx.user_id}")

        with pytest.raises(AssertionError) as e:
            await IsolationChecker(users=2, per_user=1).acheck(handler)

        assert str(e.value) in (
            "1 cross-user observation in 2 calls of 2 users:\n"
            f"- the call of user '{b}' saw user '{a}': result is 'hello {a}'"
            for a, b in (("u-0", "u-1"), ("u-1", "u-0"))
        )

    def test_where_it_looks(self):
        """
        Another user is found in mapping keys and values, sequences, sets,
        objects' attributes, a UserContext, and as a whole word of a string
        only; what is bound at the end counts; nesting deeper than 8 levels
        is not searched.
        """
        other = uc.UserContext(user_id="bob", thread_id="t", run_id="r")
        own = uc.UserContext(user_id="alice", thread_id="t", run_id="r")

        class Row:
            def __init__(self):
                self.owner = "bob"

        deep: object = "bob"
        for _ in range(9):
            deep = [deep]

        def handler(ctx):
            if ctx.user_id == "bob":
                return None
            return {
                "bob": 1,
                "list": ["x", ("bobby", "bob-2", "alice")],
                "set": frozenset({other}),
                "row": Row(),
                "deep": deep,
                "type": Row,
            }

        with pytest.raises(AssertionError) as e:
            IsolationChecker(users=[own, other], per_user=1).check(handler)

        assert str(e.value).splitlines()[1:] == [
            "- the call of user 'alice' saw user 'bob': result key 'bob' is 'bob'",
            f"- the call of user 'alice' saw user 'bob': result['set'][0] is {other!r}",
            "- the call of user 'alice' saw user 'bob': result['row'].owner is 'bob'",
        ]

    def test_bound_at_the_end(self):
        """
        A call that ends with another user's context bound is an observation.
        """
        other = uc.UserContext(user_id="zed", thread_id="t", run_id="r")

        def handler(ctx):
            if ctx.user_id == "u-0":
                uc.isolated(lambda: None)()
                uc._current._var.set(other)

        with pytest.raises(AssertionError, match=r"user 'u-0' saw user 'zed': bound at the end"):
            IsolationChecker(users=2, per_user=1).check(handler)

    def test_errors(self):
        """
        Calls that raise fail the check with their exceptions together.
        """

        def handler(ctx):
            if ctx.user_id == "u-1":
                raise LookupError(ctx.user_id)

        with pytest.raises(ExceptionGroup) as e:
            IsolationChecker(users=3, per_user=2).check(handler)

        assert str(e.value) == "2 of 6 calls raised (2 sub-exceptions)"
        assert [str(x) for x in e.value.exceptions] == ["u-1", "u-1"]

    async def test_async_errors(self):
        """
        In tasks too.
        """

        async def handler(ctx):
            raise LookupError(ctx.user_id)

        with pytest.raises(ExceptionGroup, match="4 of 4 calls raised"):
            await IsolationChecker(users=2).acheck(handler)

    async def test_wrong_colour(self):
        """
        `check` refuses a coroutine function, `acheck` a sync one.
        """

        async def handler(ctx):
            return None

        checker = IsolationChecker()
        with pytest.raises(TypeError, match=r"use `await acheck\("):
            checker.check(handler)
        with pytest.raises(TypeError, match=r"use check\("):
            await checker.acheck(repr)

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"users": 1}, ValueError, "at least 2"),
            ({"users": True}, TypeError, "a number of users"),
            ({"users": ["u-1", "u-2"]}, TypeError, "a list or tuple of usercontext.UserContext"),
            ({"per_user": 0}, ValueError, "per_user must be a positive int, got 0"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        """
        Bad arguments are refused, naming the field.
        """
        with pytest.raises(error, match=match):
            IsolationChecker(**kwargs)

    def test_users_of_one_user(self, ctx):
        """
        Contexts must be of different users.
        """
        with pytest.raises(ValueError, match="each of a different user"):
            IsolationChecker(users=[ctx, ctx.child()])

    def test_users_and_repr(self, ctx, other_ctx):
        """
        It shows its users and size.
        """
        checker = IsolationChecker(users=[ctx, other_ctx], per_user=4)

        assert checker.users == (ctx, other_ctx)
        assert repr(checker) == "<usercontext.testing.IsolationChecker(users=2, per_user=4)>"
        assert str(CrossUserObservation("a", "b", "b", "result")) == (
            "the call of user 'a' saw user 'b': result is 'b'"
        )


class TestLeakGuard:
    def test_clean(self, ctx):
        """
        Work that closes what it opens leaves nothing.
        """
        registry = uc.Registry()
        quota = uc.LocalQuota()
        with LeakGuard() as guard:
            with registry.scope(ctx), quota.acquire_nowait("k"):
                pass
            assert repr(guard) == "<usercontext.testing.LeakGuard(started)>"
        assert repr(guard) == "<usercontext.testing.LeakGuard(stopped)>"

    def test_leaks_raise(self, ctx):
        """
        As a context manager it raises, listing what leaked and where; what
        was open before it started is no leak.
        """
        quota = uc.LocalQuota(per_key=5)
        before = quota.acquire_nowait("k-0")

        with pytest.raises(AssertionError) as e, LeakGuard():
            lease = quota.acquire_nowait("k-1")  # LEASE
            quota.acquire_nowait("k-2")

        assert str(e.value).splitlines()[:2] == [
            "2 things left behind:",
            (
                "- a quota slot of key 'k-1' is still held (<usercontext.Lease(key='k-1', held)>)"
                f", made at tests/test_testing.py:{_line('# LEASE')}"
            ),
        ]
        assert (
            str(e.value)
            .splitlines()[2]
            .startswith(
                "- <usercontext.LocalQuota(per_key=5, total=None, in_use=3, waiting=0)> holds 1 "
                "slot "
                "that no live lease or engine accounts for"
            )
        )
        assert (
            str(e.value)
            .splitlines()[2]
            .endswith("(made before the leak guard started, so where is unknown)")
        )
        for held in (before, lease):
            held.release()

    def test_body_error_wins(self, ctx):
        """
        When the work raised, its error propagates, not the leaks.
        """

        def body():
            with pytest.raises(LookupError), LeakGuard():
                uc.attach(ctx)
                raise LookupError

        contextvars.copy_context().run(body)

    def test_accept(self, ctx):
        """
        `accept` takes what is open now as the starting point, keeping the
        context bound at `start` as the reference.
        """
        guard = LeakGuard()
        guard.start()
        quota = uc.LocalQuota()
        lease = quota.acquire_nowait("k")
        guard.accept()

        assert guard.stop() == []
        lease.release()

    @pytest.mark.parametrize("method", ["leaks", "accept"])
    def test_not_started(self, method):
        """
        `leaks` and `accept` before `start` say what to do.
        """
        with pytest.raises(RuntimeError, match=r"call start\(\) before the work"):
            getattr(LeakGuard(), method)()

    def test_classes(self):
        """
        The kinds it looks for are the classes and their subclasses, each
        once however it is reached; none when their module is not loaded.
        """

        class A(uc.LocalQuota):
            pass

        class B(uc.LocalQuota):
            pass

        class C(A, B):
            pass

        assert _classes("_local_quota", "LocalQuota") >= {uc.LocalQuota, A, B, C}
        assert _classes("_not_loaded", "Anything") == set()

    def test_frames(self):
        """
        *frames* must be a positive int.
        """
        with pytest.raises(ValueError, match="frames must be a positive int, got 0"):
            LeakGuard(frames=0)

    def test_tracing_left_on(self):
        """
        When tracemalloc traces already, the guard leaves it on.
        """
        import tracemalloc

        tracemalloc.start(4)
        try:
            guard = LeakGuard()
            guard.start()
            guard.stop()
            assert tracemalloc.is_tracing()
        finally:
            tracemalloc.stop()

    def test_half_made_objects(self):
        """
        An object whose ``__init__`` raised, kept alive by its traceback,
        holds nothing and is no leak.
        """
        with LeakGuard(), pytest.raises(TypeError) as e:
            uc.EngineFactory(None)  # type: ignore[arg-type]

        assert "create must be a callable" in str(e.value)

    def test_str(self):
        """
        A leak reads as a sentence with its place, or says that it is unknown.
        """
        assert str(Leak("hub", "a hub is running", "app.py:3")) == (
            "a hub is running, made at app.py:3"
        )
        assert str(Leak("hub", "x", None)).endswith("so where is unknown)")

    async def test_engines_and_hub(self, ctx):
        """
        An engine left in use is named once (its quota slot is the engine's),
        and so is a running hub.
        """
        factory = uc.EngineFactory(lambda c: object(), per_user=3)
        hub = uc.EmitterHub()
        guard = LeakGuard()
        guard.start()
        use = factory.engine(ctx)
        await use.__aenter__()
        await hub.__aenter__()

        leaks = guard.stop()

        assert [leak.kind for leak in leaks] == ["context", "hub", "engine"]
        await hub.__aexit__(None, None, None)
        await use.__aexit__(None, None, None)
        await factory.aclose()


def _line(marker: str) -> int:
    with open(__file__, encoding="utf-8") as f:  # noqa: PTH123
        (number,) = [i for i, line in enumerate(f, 1) if marker in line and "_line(" not in line]
    return number
