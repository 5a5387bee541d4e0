"""
Tests of `Registry.override`: a fixed value for a key, for tests.
"""

from __future__ import annotations

import pytest

from registry_helpers import (
    BoomError,
    Resource,
)


class TestOverride:
    """
    `Registry.override`: a fixed value for a key, for tests.
    """

    def test_replaces_then_restores(self, registry, tracker, ctx):
        """
        Inside override, scopes get the value as is, with no cleanup and no
        count; after it, the registered provider is back.
        """
        tracker.add("db", "gen")
        fake = object()

        with registry.override("db", fake), registry.scope(ctx) as scope:
            assert scope.get("db") is fake
            assert scope.get("db") is fake
        with registry.scope(ctx) as scope:
            real = scope.get("db")

        assert isinstance(real, Resource)
        assert tracker.created == tracker.closed == ["db"]
        assert registry.stats().created == 1

    async def test_async(self, registry, tracker, ctx):
        """
        aget sees the override too, even over an async provider.
        """
        tracker.add("db", "async_gen")

        with registry.override("db", "fake"):
            async with registry.scope(ctx) as scope:
                assert await scope.aget("db") == "fake"

        assert tracker.created == []

    def test_unregistered_key_removed_after(self, registry, ctx):
        """
        Overriding a key that was not registered registers it for the block
        only; afterwards asking for it is a KeyError again.
        """
        with registry.override("db", "fake"):
            assert "db" in registry
            with registry.scope(ctx) as scope:
                assert scope.get("db") == "fake"

        assert "db" not in registry
        with registry.scope(ctx) as scope, pytest.raises(KeyError):
            scope.get("db")

    def test_nested(self, registry, ctx):
        """
        Overrides nest: leaving the inner one brings back the outer value, and
        leaving the outer one the provider.
        """
        registry.register("db", lambda c: "real")
        seen = []

        with registry.override("db", "outer"):
            with registry.override("db", "inner"), registry.scope(ctx) as scope:
                seen.append(scope.get("db"))
            with registry.scope(ctx) as scope:
                seen.append(scope.get("db"))
        with registry.scope(ctx) as scope:
            seen.append(scope.get("db"))

        assert seen == ["inner", "outer", "real"]

    def test_restored_when_the_block_raises(self, registry, ctx):
        """
        The override is undone even when its block raises.
        """
        registry.register("db", lambda c: "real")

        with pytest.raises(BoomError), registry.override("db", "fake"):
            raise BoomError

        with registry.scope(ctx) as scope:
            assert scope.get("db") == "real"

    def test_applies_to_keys_first_asked_during_it(self, registry, tracker, ctx):
        """
        A scope keeps what it created: an override that starts after a key was
        asked for does not change it in that scope; keys first asked for during
        the override get the value.
        """
        tracker.add("db", "value")
        tracker.add("cache", "value")

        with registry.scope(ctx) as scope:
            db = scope.get("db")
            with registry.override("db", "fake-db"), registry.override("cache", "fake-cache"):
                assert scope.get("db") is db
                assert scope.get("cache") == "fake-cache"

        assert tracker.created == tracker.closed == ["db"]
