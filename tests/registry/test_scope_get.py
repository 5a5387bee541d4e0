"""
Tests of `Scope.get`: resources for sync code.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import warnings

import pytest


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

from registry_helpers import (
    ASYNC_KINDS,
    SYNC_KINDS,
    BoomError,
    Later,
    Resource,
    settled,
)


class TestScopeGet:
    """
    `Scope.get` and the sync `with` form: lazy, cached, sync providers only.
    """

    @pytest.mark.parametrize("kind", SYNC_KINDS)
    def test_kinds(self, registry, tracker, ctx, kind):
        """
        A value (with close), a context manager and a generator are each created
        on first get, with the scope's context, cached, and cleaned up once at
        exit.
        """
        tracker.add("db", kind)

        with registry.scope(ctx) as scope:
            assert tracker.created == []
            db = scope.get("db")
            assert (db.key, db.user_id) == ("db", "u-42")
            assert scope.get("db") is db
            assert tracker.closed == []

        assert tracker.created == tracker.closed == ["db"]
        assert db.closed == 1
        assert tracker.given == {"db": None}

    def test_unregistered_key(self, registry, ctx):
        """
        Asking for a key nobody registered is a KeyError naming the key and
        saying how to register it.
        """
        with registry.scope(ctx) as scope, pytest.raises(KeyError) as ei:
            scope.get("cache")

        assert ei.value.args == (
            (
                "Nothing is registered for 'cache'. Register a provider first: "
                "registry.register(key, provider)."
            ),
        )
        assert ei.value.__cause__ is None
        assert ei.value.__context__ is None

    def test_types_as_keys(self, registry, ctx):
        """
        A type is a natural key: the message of an unregistered one names it.
        """
        registry.register(Resource, lambda c: Resource("r", c.user_id))

        with registry.scope(ctx) as scope:
            assert isinstance(scope.get(Resource), Resource)
            with pytest.raises(KeyError, match="Nothing is registered for Later"):
                scope.get(Later)

    def test_close_after_exit(self, registry, ctx):
        """
        With both a context manager (or generator) and close, the exit runs
        first and close then gets the resource.
        """
        events = []

        @contextlib.contextmanager
        def cm(c):
            events.append("enter")
            yield "db"
            events.append("exit")

        registry.register("db", cm, close=lambda v: events.append(f"close {v}"))
        with registry.scope(ctx) as scope:
            scope.get("db")

        assert events == ["enter", "exit", "close db"]

    @pytest.mark.parametrize("kind", [*ASYNC_KINDS, "async_gen_no_await"])
    def test_refuses_async_providers(self, registry, tracker, ctx, kind):
        """
        get refuses a provider that needs awaiting with a TypeError pointing to
        aget; nothing is kept, and no "never awaited" warning follows.
        """
        tracker.add("db", kind)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with registry.scope(ctx) as scope:
                with pytest.raises(TypeError) as ei:
                    scope.get("db")
                assert repr(scope).endswith("resources=0)>")
            gc.collect()

        returned = {"awaitable": "awaitable", "async_cm": "async context manager"}
        assert str(ei.value) == (
            f"The provider of 'db' is asynchronous (it returned an "
            f"{returned.get(kind, 'async generator')}); use "
            "`async with registry.scope()` and `await scope.aget(key)`."
        )
        assert [str(w.message) for w in caught] == []
        assert tracker.closed == []
        assert registry.stats().created == 0

    def test_enters_dual_context_managers(self, registry, ctx):
        """
        An object that is both a context manager and an async one, such as
        `contextlib.nullcontext`, is entered with `with` by get.
        """
        registry.register("db", lambda c: contextlib.nullcontext("db"))

        with registry.scope(ctx) as scope:
            assert scope.get("db") == "db"

    def test_refuses_awaitables_without_close(self, registry, ctx):
        """
        An awaitable that is not a coroutine (no close method) is refused too.
        """
        registry.register("db", lambda c: Later("db"))

        with registry.scope(ctx) as scope, pytest.raises(TypeError, match="is asynchronous"):
            scope.get("db")

    @pytest.mark.parametrize("returned", ["coroutine", "awaitable"])
    def test_async_cleanup_in_a_sync_scope(self, registry, ctx, caplog, returned):
        """
        A close that returns an awaitable cannot run in a sync scope: it is a
        cleanup error (TypeError) raised in the group, the other cleanups still
        run, and the coroutine is closed, not left unawaited.
        """
        closed = []

        async def aclose(value):
            closed.append(value)  # never runs

        close = aclose if returned == "coroutine" else (lambda v: Later())
        registry.register("first", lambda c: "first", close=closed.append)
        registry.register("async", lambda c: "async", close=close)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ExceptionGroup) as ei, registry.scope(ctx) as scope:
                scope.get("first")
                scope.get("async")
            gc.collect()

        assert [str(e) for e in ei.value.exceptions] == [
            (
                "The close hook of 'async' is asynchronous (it returned an awaitable); use "
                "`async with registry.scope()` and `await scope.aget(key)`."
            )
        ]
        assert [type(e) for e in ei.value.exceptions] == [TypeError]
        assert closed == ["first"]
        assert [str(w.message) for w in caught] == []
        settled(registry)

    def test_provider_error(self, registry, ctx):
        """
        A provider (or a generator before its yield) that raises creates
        nothing: the error reaches the caller, nothing is counted or cleaned,
        and the next get tries again.
        """
        calls = []

        def flaky(c):
            calls.append(c)
            if len(calls) == 1:
                raise BoomError("first try")
            yield "db"

        registry.register("db", flaky)
        with registry.scope(ctx) as scope:
            with pytest.raises(BoomError, match="first try"):
                scope.get("db")
            assert registry.stats().created == 0
            assert scope.get("db") == "db"

        assert len(calls) == 2
        assert registry.stats().created == 1
        settled(registry)

    def test_threads_get_their_own(self, registry, tracker, ctx):
        """
        Sync scopes of the same user in two threads at once get two resources,
        each cleaned up in its own thread.
        """
        tracker.add("db", "gen")
        barrier = threading.Barrier(2, timeout=5)
        got = {}
        cached = {}

        def request(name):
            with registry.scope(ctx) as scope:
                got[name] = scope.get("db")
                barrier.wait()
                cached[name] = scope.get("db") is got[name]

        threads = [threading.Thread(target=request, args=(n,)) for n in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert got["a"] is not got["b"]
        assert cached == {"a": True, "b": True}
        assert (got["a"].closed, got["b"].closed) == (1, 1)
        assert registry.stats().opened == 2
        settled(registry)

    def test_generator_that_does_not_yield(self, registry, ctx):
        """
        A generator provider that returns without yielding is a RuntimeError
        naming the key (as contextlib's "generator didn't yield"), not a
        StopIteration escaping into the caller, where it would silently end
        an enclosing loop or generator.
        """

        def empty(c):
            return
            yield

        registry.register("db", empty)
        with registry.scope(ctx) as scope, pytest.raises(RuntimeError, match="'db'"):
            scope.get("db")
