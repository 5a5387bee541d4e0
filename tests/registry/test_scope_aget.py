"""
Tests of `Scope.aget`: resources for async code, of any kind.
"""

from __future__ import annotations

import contextlib

import anyio
import pytest

from anyio.lowlevel import checkpoint
from registry_helpers import (
    KINDS,
    BoomError,
    Resource,
    Tracker,
    settled,
    until,
)


class TestScopeAget:
    """
    `Scope.aget` and the `async with` form: every kind of provider.
    """

    @pytest.mark.parametrize("kind", KINDS)
    async def test_kinds(self, registry, tracker, ctx, kind):
        """
        Each kind of provider is created on first aget with the scope's
        context, cached for the scope, and cleaned up once at exit.
        """
        tracker.add("db", kind)

        async with registry.scope(ctx) as scope:
            assert tracker.created == []
            db = await scope.aget("db")
            assert (db.key, db.user_id) == ("db", "u-42")
            assert await scope.aget("db") is db
            assert scope.get("db") is db  # cached: get does not call the provider
            assert tracker.closed == []

        assert tracker.created == tracker.closed == ["db"]
        assert db.closed == 1

    @pytest.mark.parametrize(
        "inner", ["value", "sync_cm", "async_cm", "gen", "async_gen", "async_gen_no_await"]
    )
    async def test_awaitable_of_another_kind(self, registry, ctx, inner):
        """
        What an awaitable resolves to is handled by its own kind: a context
        manager is entered, a generator started, and each cleaned up.
        """
        tracker = Tracker(registry)
        tracker.add("inner", inner)
        provider = registry._providers["inner"].make

        async def outer(c):
            await checkpoint()
            return provider(c)

        registry.register("outer", outer)
        async with registry.scope(ctx) as scope:
            db = await scope.aget("outer")

        assert isinstance(db, Resource)
        assert tracker.created == ["inner"]
        assert tracker.closed == ([] if inner == "value" else ["inner"])

    async def test_unregistered_key(self, registry, ctx):
        """
        aget of an unregistered key is a KeyError naming it.
        """
        async with registry.scope(ctx) as scope:
            with pytest.raises(KeyError, match="Nothing is registered for 'cache'"):
                await scope.aget("cache")

    async def test_async_close(self, registry, ctx):
        """
        close may be async: it is awaited after the exit, with the resource.
        """
        events = []

        async def aclose(value):
            await checkpoint()
            events.append(f"close {value}")

        @contextlib.asynccontextmanager
        async def acm(c):
            yield "db"
            events.append("exit")

        registry.register("db", acm, close=aclose)
        async with registry.scope(ctx) as scope:
            await scope.aget("db")

        assert events == ["exit", "close db"]

    async def test_concurrent_scopes_of_one_user(self, registry, tracker, ctx):
        """
        Two scopes of the same user open at the same time never share a
        resource: each creates its own and cleans it up.
        """
        tracker.add("db", "async_gen")
        got = {}
        cached = {}
        scopes = []

        async def request(name):
            async with registry.scope(ctx) as scope:
                got[name] = await scope.aget("db")
                await until(lambda: len(got) == 2)
                scopes.append(registry.stats().scopes)
                cached[name] = await scope.aget("db") is got[name]

        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "a")
            tg.start_soon(request, "b")

        assert got["a"] is not got["b"]
        assert cached == {"a": True, "b": True}
        assert max(scopes) == 2
        assert (got["a"].user_id, got["b"].user_id) == ("u-42", "u-42")
        assert (got["a"].closed, got["b"].closed) == (1, 1)
        assert tracker.created == ["db", "db"]
        settled(registry)

    async def test_tasks_of_the_scope_share_its_resources(self, registry, tracker, ctx):
        """
        Tasks started inside a scope run as its user and get the scope's
        cached resource.
        """
        tracker.add("db", "async_cm")
        seen = []

        async def task(scope):
            seen.append(await scope.aget("db"))

        async with registry.scope(ctx) as scope:
            db = await scope.aget("db")
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(task, scope)

        assert seen == [db, db, db]
        assert tracker.created == ["db"]

    async def test_provider_error(self, registry, ctx):
        """
        An async provider, or an async context manager's enter, that raises
        creates nothing; its error reaches the caller unchanged.
        """

        async def failing(c):
            await checkpoint()
            raise BoomError("provider")

        @contextlib.asynccontextmanager
        async def failing_enter(c):
            raise BoomError("enter")
            yield

        registry.register("a", failing)
        registry.register("b", failing_enter)
        async with registry.scope(ctx) as scope:
            with pytest.raises(BoomError, match="provider"):
                await scope.aget("a")
            with pytest.raises(BoomError, match="enter"):
                await scope.aget("b")

        assert registry.stats().created == 0
        settled(registry)

    @pytest.mark.parametrize("kind", ["gen", "async_gen", "awaited_gen"])
    async def test_generator_that_does_not_yield(self, registry, ctx, kind):
        """
        A generator or async generator provider that returns without yielding
        is a RuntimeError naming the key, as contextlib's "generator didn't
        yield"; so is a generator that a coroutine provider returns.
        """

        def empty(c):
            return
            yield

        async def aempty(c):
            return
            yield

        async def awaited(c):
            return empty(c)

        providers = {"gen": empty, "async_gen": aempty, "awaited_gen": awaited}
        registry.register("db", providers[kind])
        async with registry.scope(ctx) as scope:
            with pytest.raises(RuntimeError, match="'db'"):
                await scope.aget("db")
