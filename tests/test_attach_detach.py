"""
Tests of `attach` and `detach`: bind split in two, with bind's isolation
rules, on threads, asyncio and trio.
"""

from __future__ import annotations

import contextvars
import threading

import anyio
import pytest

import usercontext as uc


# Every test here must leave no attach undone: the leak guard checks it.
pytestmark = pytest.mark.usercontext_leaks


class TestAttach:
    def test_attach_detach(self, ctx):
        """
        attach binds the context until detach; detach restores nothing bound.
        """
        token = uc.attach(ctx)
        assert uc.current() is ctx
        assert token.ctx is ctx
        assert "attached" in repr(token)
        uc.detach(token)
        assert uc.current_or_none() is None
        assert "detached" in repr(token)

    def test_nests_children_of_the_same_user(self, ctx):
        """
        A child attached over its parent is detached back to the parent.
        """
        outer = uc.attach(ctx)
        sub = ctx.child()
        inner = uc.attach(sub)
        assert uc.current() is sub
        uc.detach(inner)
        assert uc.current() is ctx
        uc.detach(outer)
        assert uc.current_or_none() is None

    def test_refuses_another_user(self, ctx, other_ctx):
        """
        Attaching another user's context over one bound raises IsolationError,
        as bind does, and leaves the bound one in place.
        """
        token = uc.attach(ctx)
        with pytest.raises(uc.IsolationError, match=r"u-99.*u-42"):
            uc.attach(other_ctx)
        assert uc.current() is ctx
        uc.detach(token)

    def test_refuses_a_non_context(self):
        """
        attach checks its argument's type; detach too.
        """
        with pytest.raises(TypeError, match=r"takes a usercontext.UserContext, got dict"):
            uc.attach({"user_id": "u-42"})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"AttachToken.*got str"):
            uc.detach("token")  # type: ignore[arg-type]

    def test_detached_twice(self, ctx):
        """
        A second detach of one token raises and names the fix.
        """
        token = uc.attach(ctx)
        uc.detach(token)
        with pytest.raises(RuntimeError, match=r"detached already: detach each token once"):
            uc.detach(token)
        assert uc.current_or_none() is None

    def test_out_of_order(self, ctx):
        """
        Detaching the outer token while an inner one is attached raises and
        changes nothing; both then detach in order.
        """
        outer = uc.attach(ctx)
        sub = ctx.child()
        inner = uc.attach(sub)
        with pytest.raises(RuntimeError, match=r"most recent first"):
            uc.detach(outer)
        assert uc.current() is sub
        uc.detach(inner)
        assert uc.current() is ctx
        uc.detach(outer)
        assert uc.current_or_none() is None

    def test_out_of_order_inside_a_bind(self, ctx):
        """
        Detaching inside a bind entered after the attach raises and changes
        nothing; after the bind, the token detaches.
        """
        token = uc.attach(ctx)
        sub = ctx.child()
        with uc.bind(sub):
            with pytest.raises(RuntimeError, match="most recent first"):
                uc.detach(token)
            assert uc.current() is sub
        assert uc.current() is ctx
        uc.detach(token)
        assert uc.current_or_none() is None

    def test_out_of_order_after_a_bind_left_out_of_order(self, ctx):
        """
        When a bind that began before the attach has left already, nothing
        is bound and the token can only restore what was bound before it:
        detach raises, and the token is spent.
        """

        def scenario():
            sub = ctx.child()
            outer = uc.bind(ctx)
            outer.__enter__()
            token = uc.attach(sub)
            outer.__exit__(None, None, None)
            assert uc.current_or_none() is None
            with pytest.raises(RuntimeError, match=r"most recent first"):
                uc.detach(token)
            with pytest.raises(RuntimeError, match=r"detached already"):
                uc.detach(token)

        contextvars.copy_context().run(scenario)

    def test_other_thread(self, ctx):
        """
        A token detached in another thread raises ValueError there, naming the
        fix, and the attach still holds where it was made.
        """
        token = uc.attach(ctx)
        errors = []

        def elsewhere():
            try:
                uc.detach(token)
            except ValueError as e:
                errors.append(str(e))

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert len(errors) == 1
        assert "another thread or task" in errors[0]
        assert uc.current() is ctx
        uc.detach(token)
        assert uc.current_or_none() is None

    def test_threads_each_attach_their_own(self):
        """
        Eight threads attach their own user's context, 100 times each, and
        never see another's.
        """
        seen_wrong = []

        def work(n):
            for i in range(100):
                mine = uc.UserContext(user_id=f"u-{n}", thread_id="t", run_id=f"r-{i}")
                token = uc.attach(mine)
                if uc.current() is not mine:
                    seen_wrong.append(n)
                uc.detach(token)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert seen_wrong == []


class TestAttachAsync:
    async def test_tasks_each_attach_their_own(self):
        """
        Twenty tasks attach their own user's context across checkpoints and
        see only it; the parent task sees none.
        """
        seen = {}

        async def work(n):
            mine = uc.UserContext(user_id=f"u-{n}", thread_id="t", run_id="r")
            token = uc.attach(mine)
            await anyio.sleep(0.01)
            seen[n] = uc.current().user_id
            uc.detach(token)

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(work, n)
        assert seen == {n: f"u-{n}" for n in range(20)}
        assert uc.current_or_none() is None

    async def test_other_task(self, ctx):
        """
        A token detached in another task raises ValueError.
        """
        token = uc.attach(ctx)
        errors = []

        async def elsewhere():
            try:
                uc.detach(token)
            except ValueError as e:
                errors.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(elsewhere)
        assert len(errors) == 1
        assert uc.current() is ctx
        uc.detach(token)
