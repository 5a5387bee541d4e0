"""
Tests that a scope belongs to one user: another user's context is refused.
"""

from __future__ import annotations

import contextvars

import pytest

import usercontext as uc

from usercontext import UserContext
from usercontext.exceptions import (
    IsolationError,
)


class TestIsolation:
    """
    A scope's resources belong to its user: another user cannot get them.
    """

    def test_sync_other_user_refused(self, registry, tracker, ctx, other_ctx):
        """
        get while another user's context is bound raises IsolationError, for a
        cached key and a new one; the other user creates nothing.
        """
        tracker.add("db", "gen")
        tracker.add("cache", "value")
        message = (
            "'db' belongs to a scope of user 'u-42', but user 'u-99' asked for it. "
            "Open a scope for that user instead."
        )

        with registry.scope(ctx) as scope:
            scope.get("db")

            @uc.isolated
            def as_other(key):
                with uc.bind(other_ctx):
                    return scope.get(key)

            with pytest.raises(IsolationError) as ei:
                as_other("db")

            def in_fresh_context(key):
                with uc.bind(other_ctx):
                    return scope.get(key)

            with pytest.raises(IsolationError, match=r"^'cache' belongs to a scope of user"):
                contextvars.Context().run(in_fresh_context, "cache")
            assert scope.get("cache").user_id == "u-42"

        assert str(ei.value) == message
        assert tracker.created == ["db", "cache"]

    async def test_async_other_user_refused(self, registry, tracker, ctx, other_ctx):
        """
        aget from another user's context raises IsolationError, from an
        isolated task of the request and from a fresh Context.
        """
        tracker.add("db", "async_gen")

        async with registry.scope(ctx) as scope:
            db = await scope.aget("db")

            @uc.isolated
            async def as_other():
                with uc.bind(other_ctx):
                    return await scope.aget("db")

            with pytest.raises(IsolationError, match="user 'u-99' asked for it"):
                await as_other()

            def sync_as_other():
                with uc.bind(other_ctx):
                    return scope.get("db")

            with pytest.raises(IsolationError):
                contextvars.Context().run(sync_as_other)
            assert await scope.aget("db") is db

        assert tracker.created == ["db"]
        assert isinstance(IsolationError("x"), RuntimeError)

    def test_same_user_other_request(self, registry, ctx):
        """
        Another context of the same user (a child run, or a fresh request) may
        use the scope: ownership is per user.
        """
        registry.register("db", lambda c: object())
        same_user = UserContext(user_id="u-42", thread_id="t-9", run_id="r-9")

        with registry.scope(ctx) as scope:
            db = scope.get("db")
            with uc.bind(ctx.child(run_id="r-1.tool")):
                assert scope.get("db") is db

            def in_fresh():
                with uc.bind(same_user):
                    return scope.get("db")

            assert contextvars.Context().run(in_fresh) is db

    def test_no_context_bound(self, registry, ctx):
        """
        Code that runs with no context bound at all (a fresh Context, such as
        a plain thread's) is not another user: it gets the scope's resource.
        """
        registry.register("db", lambda c: object())

        with registry.scope(ctx) as scope:
            db = scope.get("db")
            assert contextvars.Context().run(scope.get, "db") is db
