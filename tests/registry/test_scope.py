"""
Tests of `Scope` as a block: entering, leaving, binding its context, its
repr, and the warning for a scope never closed.
"""

# A scope's body and its exit are one block: it is that block that raises or warns.
# ruff: noqa: PT031

from __future__ import annotations

import contextvars
import gc
import re
import sys
import warnings

import anyio
import pytest

from anyio.lowlevel import checkpoint

import usercontext as uc

from usercontext import Registry
from usercontext.exceptions import (
    IsolationError,
    ScopeClosedError,
    UserContextError,
)


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

from registry_helpers import (
    Fatal,
    run_in,
    settled,
)


class TestScope:
    """
    `Scope`: entering and leaving it, in both forms, and the binding of its
    context.
    """

    def test_sync_binds_ctx(self, registry, ctx):
        """
        `with registry.scope(ctx)` binds ctx for the body and returns the
        scope; nothing is bound after.
        """
        scope = registry.scope(ctx)
        assert uc.current_or_none() is None

        with scope as entered:
            assert entered is scope
            assert uc.current() is ctx
            assert scope.ctx is ctx

        assert uc.current_or_none() is None

    async def test_async_binds_ctx(self, registry, ctx):
        """
        `async with registry.scope(ctx)` binds ctx for the body, for tasks
        started in it too, and unbinds it after.
        """
        seen = []

        async def task():
            seen.append(uc.current())

        async with registry.scope(ctx) as scope:
            assert uc.current() is ctx
            async with anyio.create_task_group() as tg:
                tg.start_soon(task)
                tg.start_soon(task)

        assert seen == [ctx, ctx]
        assert scope.ctx is ctx
        assert uc.current_or_none() is None

    async def test_entered_once(self, registry, ctx):
        """
        A scope can be entered once: again while open, or after it closed, is
        a RuntimeError saying to open a new one. The open scope is unharmed.
        """
        message = "A scope can be entered once; open a new one with registry.scope()."
        registry.register("db", lambda c: "db")

        scope = registry.scope(ctx)
        async with scope:
            with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
                await scope.__aenter__()
            with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
                scope.__enter__()
            assert scope.get("db") == "db"
        assert uc.current_or_none() is None
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"), scope:
            pass
        assert registry.stats().opened == 1
        settled(registry)

    async def test_used_before_entering_or_after_exit(self, registry, tracker, ctx):
        """
        get and aget outside the scope's block raise ScopeClosedError (a
        RuntimeError), saying whether it was not entered yet or closed.
        """
        tracker.add("db", "value")
        scope = registry.scope(ctx)

        with pytest.raises(ScopeClosedError, match=r"^This scope is not entered yet: "):
            scope.get("db")
        with pytest.raises(ScopeClosedError, match=r"^This scope is not entered yet: "):
            await scope.aget("db")
        async with scope:
            await scope.aget("db")
        with pytest.raises(ScopeClosedError, match=r"^This scope is closed: "):
            scope.get("db")
        with pytest.raises(ScopeClosedError, match=r"only inside `async with registry\.scope"):
            await scope.aget("db")

        assert tracker.created == ["db"]
        assert isinstance(ScopeClosedError("x"), RuntimeError)
        assert isinstance(ScopeClosedError("x"), UserContextError)

    def test_entered_under_another_user(self, registry, ctx, other_ctx):
        """
        Entering a scope while another user's context is bound raises
        IsolationError and opens nothing; the scope can be entered later.
        """
        scope = registry.scope(ctx)

        with uc.bind(other_ctx), pytest.raises(IsolationError), scope:
            pass

        assert uc.current_or_none() is None
        assert registry.stats().opened == 0
        assert repr(scope) == "<usercontext.Scope(user_id='u-42', new, resources=0)>"
        with scope:
            assert uc.current() is ctx
        assert registry.stats().opened == 1

    def test_made_directly(self, registry, ctx):
        """
        A scope made by calling `Scope` works as one from `Registry.scope`.
        """
        registry.register("db", lambda c: "db")
        scope = uc.Scope(registry, ctx)

        assert repr(scope) == "<usercontext.Scope(user_id='u-42', new, resources=0)>"
        with scope:
            assert scope.get("db") == "db"
            assert uc.current() is ctx
        assert registry.stats().opened == 1
        settled(registry)

    async def test_entered_under_another_user_async(self, registry, ctx, other_ctx):
        """
        `async with` under another user's context raises IsolationError too,
        and opens nothing.
        """
        scope = registry.scope(ctx)

        with uc.bind(other_ctx), pytest.raises(IsolationError):
            async with scope:
                pass

        assert uc.current_or_none() is None
        assert registry.stats().opened == 0
        assert repr(scope) == "<usercontext.Scope(user_id='u-42', new, resources=0)>"

    def test_repr(self, registry, tracker, ctx):
        """
        The repr shows the user, the state and the number of open resources.
        """
        tracker.add("db", "value")
        tracker.add("cache", "gen")
        scope = registry.scope(ctx)

        assert repr(scope) == "<usercontext.Scope(user_id='u-42', new, resources=0)>"
        with scope:
            scope.get("db")
            scope.get("cache")
            assert repr(scope) == "<usercontext.Scope(user_id='u-42', open, resources=2)>"
        assert repr(scope) == "<usercontext.Scope(user_id='u-42', closed, resources=0)>"

    def test_cleanups_run_with_ctx_bound(self, registry, ctx):
        """
        Cleanups run before ctx is unbound: they see the scope's context.
        """
        seen = []

        def gen(c):
            yield "db"
            seen.append(uc.current())

        registry.register("db", gen, close=lambda _: seen.append(uc.current()))
        with registry.scope(ctx) as scope:
            scope.get("db")

        assert seen == [ctx, ctx]
        assert uc.current_or_none() is None


class TestUnclosedScope:
    """
    A scope dropped while open says where it was opened.
    """

    def test_sync(self, registry, ctx):
        """
        A scope entered with __enter__ and dropped without __exit__ emits a
        ResourceWarning naming the user and the file:line where it was entered.
        """
        registry.register("db", lambda c: "db")

        def leak():
            scope = registry.scope(ctx)
            line = sys._getframe().f_lineno + 1
            scope.__enter__()
            scope.get("db")
            del scope
            return line

        with pytest.warns(ResourceWarning) as record:
            line = contextvars.Context().run(leak)
            gc.collect()

        [warning] = record
        assert str(warning.message) == (
            f"A scope of user 'u-42' opened at {__file__}:{line} was never closed, so its "
            "resources were not cleaned up. Use `async with registry.scope(ctx):` (or `with`)."
        )

    async def test_async(self, registry, ctx):
        """
        A scope entered with __aenter__ and dropped names the line that awaited
        __aenter__.
        """

        @uc.isolated
        async def leak():
            scope = registry.scope(ctx)
            line = sys._getframe().f_lineno + 1
            await scope.__aenter__()
            del scope
            return line

        with pytest.warns(ResourceWarning, match="was never closed") as record:
            line = await leak()
            gc.collect()

        assert f" opened at {__file__}:{line} " in str(record[0].message)

    def test_closed_and_new_scopes_do_not_warn(self, registry, ctx):
        """
        A scope never entered, or entered and closed, is dropped silently.
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scope = registry.scope(ctx)
            del scope
            with registry.scope(ctx) as scope:
                pass
            del scope
            gc.collect()

        assert caught == []


class TestScopeEdges:
    """
    `Scope` on rarer paths: left in another Context, async resources in a
    sync scope, a fatal error from a sync generator's cleanup.
    """

    def test_left_in_another_context(self, registry, ctx):
        """
        A scope entered in one Context and left in another does not raise,
        and still cleans up its resources.
        """
        closed = []

        def gen(c):
            yield c.user_id
            closed.append(c.user_id)

        registry.register("res", gen)
        scope = registry.scope(ctx)
        first = contextvars.copy_context()
        first.run(scope.__enter__)
        assert first.run(scope.get, "res") == "u-42"

        contextvars.copy_context().run(scope.__exit__, None, None, None)

        assert closed == ["u-42"]
        assert registry.stats().scopes == 0

    def test_left_in_another_context_async(self, registry, ctx):
        """
        The same holds for `async with`: entered in one Context and left in
        another, a scope cleans up and does not raise.
        """
        closed = []

        async def agen(c):
            yield c.user_id
            closed.append(c.user_id)

        async def enter_and_get():
            await scope.__aenter__()
            return await scope.aget("res")

        registry.register("res", agen)
        scope = registry.scope(ctx)
        assert run_in(contextvars.copy_context(), enter_and_get()) == "u-42"

        run_in(contextvars.copy_context(), scope.__aexit__(None, None, None))

        assert closed == ["u-42"]
        settled(registry)

    async def test_async_resource_in_a_sync_scope(self, registry, ctx):
        """
        A resource opened with aget() in a scope left with a sync `with`
        cannot be cleaned up there: that is reported, never skipped silently.
        """

        async def agen(c):
            yield c.user_id

        registry.register("async", agen)
        with pytest.raises(ExceptionGroup) as ei, registry.scope(ctx) as scope:
            assert await scope.aget("async") == "u-42"

        [error] = ei.value.exceptions
        assert type(error) is TypeError
        assert str(error) == (
            "'async' (async generator without await) was entered by async code but left by "
            "sync code, so its async cleanup cannot run; use `async with registry.scope()` and "
            "`await scope.aget(key)`."
        )
        assert registry.stats().top == ()

    def test_fatal_error_from_a_generator_runs_the_others(self, registry, ctx):
        """
        A BaseException from a generator's cleanup in a sync scope does not
        skip the cleanups after it, and is raised once they ran.
        """
        closed = []

        def fatal(c):
            yield c
            raise Fatal

        def fine(c):
            yield c
            closed.append("fine")

        registry.register("fine", fine)
        registry.register("fatal", fatal)
        with pytest.raises(Fatal), registry.scope(ctx) as scope:
            scope.get("fine")
            scope.get("fatal")

        assert closed == ["fine"]
        assert registry.stats().top == ()


class TestContextAlreadyBound:
    """
    A scope entered where its context is bound already (by a middleware, say)
    leaves the binding as it found it, on both exits.
    """

    def test_sync(self, ctx):
        registry = Registry()
        registry.register("who", lambda c: c.user_id)
        with uc.bind(ctx):
            with registry.scope(ctx) as scope:
                assert uc.current() is ctx
                child = ctx.child()
                with uc.bind(child):
                    assert uc.current() is child
                assert scope.get("who") == "u-42"
            assert uc.current() is ctx
        assert uc.current_or_none() is None

    async def test_async(self, ctx):
        registry = Registry()
        registry.register("who", lambda c: c.user_id)
        async with uc.bind(ctx):
            async with registry.scope(ctx) as scope:
                await checkpoint()
                assert uc.current() is ctx
                assert await scope.aget("who") == "u-42"
            assert uc.current() is ctx
        assert uc.current_or_none() is None

    async def test_async_body_fails(self, ctx):
        registry = Registry()
        with uc.bind(ctx):
            with pytest.raises(KeyError):
                async with registry.scope(ctx):
                    raise KeyError("k")
            assert uc.current() is ctx
        assert uc.current_or_none() is None
