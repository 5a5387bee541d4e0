"""
Tests of `Registry`: its arguments, `register`, `in`, `scope()`, and its stats.
"""

from __future__ import annotations

import contextvars
import math
import re
import sys

import anyio
import attrs
import pytest

import usercontext as uc

from usercontext import Registry, RegistryStats, UserContext
from usercontext.exceptions import (
    NoContextError,
)


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

from registry_helpers import (
    KINDS,
    BoomError,
    Resource,
    Tracker,
)


class TestRegistry:
    """
    `Registry`: its arguments, `register`, `in`, `scope()` and its repr.
    """

    @pytest.mark.parametrize(
        ("timeout", "error", "message"),
        [
            ("5", TypeError, "close_timeout must be a number of seconds, got '5'."),
            (None, TypeError, "close_timeout must be a number of seconds, got None."),
            (True, TypeError, "close_timeout must be a number of seconds, got True."),
            (0, ValueError, "close_timeout must be > 0 seconds, got 0."),
            (-1.5, ValueError, "close_timeout must be > 0 seconds, got -1.5."),
            (math.nan, ValueError, "close_timeout must be > 0 seconds, got nan."),
        ],
    )
    def test_bad_close_timeout(self, timeout, error, message):
        """
        close_timeout must be a number (not a bool) above zero; the error
        says which value was given.
        """
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            Registry(close_timeout=timeout)

    @pytest.mark.parametrize("timeout", [1, 0.001, math.inf])
    def test_good_close_timeout(self, timeout):
        """
        Any positive int or float is a cleanup timeout, kept as a float.
        """
        registry = Registry(close_timeout=timeout)

        assert registry._close_timeout == float(timeout)
        assert type(registry._close_timeout) is float

    def test_register_and_contains(self, registry):
        """
        A registered key is `in` the registry; other keys are not. Any hashable
        is a key: a type, a string, a tuple.
        """
        registry.register(Resource, lambda c: Resource("r", c.user_id))
        registry.register("db", lambda c: "db")
        registry.register(("db", "replica"), lambda c: "replica")

        assert Resource in registry
        assert "db" in registry
        assert ("db", "replica") in registry
        assert "cache" not in registry
        assert repr(registry) == "<usercontext.Registry(num_providers=3)>"

    def test_register_twice(self, registry, ctx):
        """
        Registering a key twice raises KeyError with a message naming the key
        and both ways out; the first provider stays in place.
        """
        registry.register(Resource, lambda c: "first")

        with pytest.raises(KeyError) as ei:
            registry.register(Resource, lambda c: "second")

        assert ei.value.args == (
            (
                "Resource is registered already. Pass replace=True to replace its provider, "
                "or use registry.override() in tests."
            ),
        )
        with registry.scope(ctx) as scope:
            assert scope.get(Resource) == "first"

    def test_replace(self, registry, ctx):
        """
        replace=True swaps the provider (and its close) for scopes that ask
        later; it also registers a key that was not registered.
        """
        closed = []
        registry.register("db", lambda c: "first", close=closed.append)
        registry.register("db", lambda c: "second", replace=True)
        registry.register("new", lambda c: "new", replace=True)

        with registry.scope(ctx) as scope:
            assert (scope.get("db"), scope.get("new")) == ("second", "new")
        assert closed == []
        assert repr(registry) == "<usercontext.Registry(num_providers=2)>"

    @pytest.mark.parametrize("provider", [None, "db", 42])
    def test_provider_not_callable(self, registry, provider):
        """
        A provider that is not callable is refused at registration, with a
        message naming the key and the value; nothing is registered.
        """
        message = f"The provider of 'db' must be callable, got {provider!r}."

        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            registry.register("db", provider)
        assert "db" not in registry

    @pytest.mark.parametrize("close", ["close", 42])
    def test_close_not_callable(self, registry, close):
        """
        close must be callable or None; anything else is refused at
        registration and nothing is registered.
        """
        message = f"close must be a callable or None, got {close!r}."

        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            registry.register("db", lambda c: "db", close=close)
        assert "db" not in registry

    @pytest.mark.parametrize("key", [["db"], {"db": 1}, {"db"}])
    def test_unhashable_key(self, registry, key):
        """
        An unhashable key raises TypeError at registration, before anything is
        stored.
        """
        with pytest.raises(TypeError, match="unhashable"):
            registry.register(key, lambda c: "db")
        assert repr(registry) == "<usercontext.Registry(num_providers=0)>"

    def test_scope_defaults_to_current(self, registry, ctx):
        """
        scope() without ctx takes the bound context; after the scope, the
        binding in place before is back.
        """
        child = ctx.child(run_id="r-2")
        with uc.bind(child):
            scope = registry.scope()
            assert scope.ctx is child
            with scope:
                assert uc.current() is child
            assert uc.current() is child

    def test_scope_without_context(self, registry):
        """
        scope() without ctx and with no context bound raises NoContextError
        (a LookupError), and opens nothing.
        """
        with pytest.raises(NoContextError, match="No UserContext is bound"):
            registry.scope()

        assert isinstance(NoContextError("x"), LookupError)
        assert registry.stats().opened == 0


class TestRegistryStats:
    """
    `Registry.stats`: open and total counts that add up in scripted scenarios.
    """

    async def test_scripted(self, registry, tracker, ctx, other_ctx):
        """
        Counts of open scopes, resources open per key (most first, top N),
        created resources and cleanup errors follow the scopes as they open
        and close.
        """
        tracker.add("db", "async_gen")
        tracker.add("cache", "value")
        tracker.add(Resource, "sync_cm")
        assert registry.stats() == RegistryStats(
            in_use=0, top=(), scopes=0, opened=0, created=0, closed=0, close_errors=0
        )
        snapshots = []

        def other_user_requests():
            # Two nested scopes of another user, in a Context of their own.
            with registry.scope(other_ctx) as b:
                b.get("cache")
                b.get(Resource)
                with registry.scope(other_ctx) as c:
                    c.get("cache")
                    snapshots.extend([registry.stats(), registry.stats(top=1)])
                    snapshots.append(registry.stats(top=0))
                snapshots.append(registry.stats())

        async with registry.scope(ctx) as a:
            await a.aget("db")
            await a.aget("cache")
            await a.aget("db")  # cached: not created again
            contextvars.Context().run(other_user_requests)
            snapshots.append(registry.stats())

        assert snapshots[0] == RegistryStats(
            in_use=5,
            top=(("'cache'", 3), ("'db'", 1), ("Resource", 1)),
            scopes=3,
            opened=3,
            created=5,
            closed=0,
            close_errors=0,
        )
        assert snapshots[1].top == (("'cache'", 3),)
        assert snapshots[2].top == ()
        assert (snapshots[3].scopes, snapshots[3].top) == (
            2,
            (("'cache'", 2), ("'db'", 1), ("Resource", 1)),
        )
        assert (snapshots[4].scopes, snapshots[4].top) == (
            1,
            (("'db'", 1), ("'cache'", 1)),
        )
        assert registry.stats() == RegistryStats(
            in_use=0, top=(), scopes=0, opened=3, created=5, closed=5, close_errors=0
        )

    async def test_back_to_zero_after_failing_and_cancelled_scopes(self, registry, ctx):
        """
        After scopes whose body failed, whose cleanups failed, or that were
        cancelled, nothing is counted as open, and every cleanup error is
        counted.
        """
        tracker = Tracker(registry)
        for i in range(6):
            tracker.add(i, KINDS[i])
        tracker.fail.add(4)

        async def use(scope):
            for i in range(6):
                await scope.aget(i)

        with pytest.raises(BoomError, match=r"^body"):
            async with registry.scope(ctx) as scope:
                await use(scope)
                raise BoomError("body")
        with pytest.raises(ExceptionGroup):
            async with registry.scope(ctx) as scope:
                await use(scope)
        with anyio.CancelScope() as cs:
            async with registry.scope(ctx) as scope:
                await use(scope)
                cs.cancel()
                await anyio.sleep_forever()

        assert registry.stats() == RegistryStats(
            in_use=0, top=(), scopes=0, opened=3, created=18, closed=18, close_errors=3
        )
        assert tracker.closed == list(range(5, -1, -1)) * 3

    def test_counts_follow_the_key(self, registry, ctx):
        """
        Resources count under their key whichever provider made them: the
        counts hold when the provider is replaced, or overridden, while some
        of its resources are open.
        """
        closed = []
        registry.register("db", lambda c: "old", close=closed.append)

        with registry.scope(ctx) as a:
            assert a.get("db") == "old"
            registry.register("db", lambda c: "new", close=closed.append, replace=True)
            with registry.scope(ctx) as b:
                assert b.get("db") == "new"
                assert registry.stats().top == (("'db'", 2),)
                with registry.override("db", "fake"), registry.scope(ctx) as c:
                    assert c.get("db") == "fake"
                    assert registry.stats().top == (("'db'", 2),)
            assert registry.stats().top == (("'db'", 1),)

        assert closed == ["new", "old"]
        assert registry.stats() == RegistryStats(
            in_use=0, top=(), scopes=0, opened=3, created=2, closed=2, close_errors=0
        )

    def test_frozen(self, registry):
        """
        A snapshot is a frozen value: later scopes do not change it.
        """
        registry.register("db", lambda c: "db")
        before = registry.stats()
        ctx = UserContext(user_id="u-1", thread_id="t-1", run_id="r-1")
        with registry.scope(ctx) as scope:
            scope.get("db")

        assert before.opened == 0
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            before.opened = 1  # type: ignore[misc]
