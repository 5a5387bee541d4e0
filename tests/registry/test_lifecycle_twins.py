"""
Tests that the scope's inline fast paths and their twins in
`usercontext._lifecycle` (`enter`/`aenter`, `leave`/`aleave`, which the engine
factory uses) do the same on the same cases: every kind of provider, both
colours, a body that succeeds, fails or is cancelled, a cleanup that succeeds
or fails.
"""

from __future__ import annotations

import sys

import anyio
import pytest

from registry_helpers import KINDS, SYNC_KINDS, BoomError, Fatal, Tracker

import usercontext._lifecycle as lifecycle

from usercontext import Registry


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


# What the scope says sync code should use instead, as _scope.py words it.
FIX = "use `async with registry.scope()` and `await scope.aget(key)`"
OUTCOMES = ("ok", "error", "cancel")


def _outcome(tracker, error):
    """
    What a path left behind, in figures that both paths must share.
    """
    if isinstance(error, ExceptionGroup):
        body, cleanups = None, list(error.exceptions)
    else:
        body = error
        cleanups = list(getattr(error, "close_errors", ()))
    return {
        "created": tracker.created,
        "closed": tracker.closed,
        "given": {k: type(v).__name__ for k, v in tracker.given.items()},
        "body": type(body).__name__,
        "cleanup errors": [(type(e).__name__, str(e)) for e in cleanups],
    }


def _body(outcome):
    if outcome == "error":
        raise BoomError("body")
    if outcome == "cancel":
        # Sync code is not cancelled: a KeyboardInterrupt is its nearest kin.
        raise Fatal


async def _abody(outcome, cancel_scope):
    if outcome == "error":
        raise BoomError("body")
    if outcome == "cancel":
        cancel_scope.cancel()
        await anyio.sleep_forever()


def _raise_as_a_scope(body_error, errors):
    """
    Raise as a scope does: the body's error with the cleanup errors listed,
    or the cleanup errors in a group.
    """
    if body_error is not None:
        body_error.close_errors = errors
        raise body_error
    if errors:
        raise ExceptionGroup("cleanups", errors)


def _tracked(kind, fails, ctx):
    tracker = Tracker(Registry())
    tracker.add("r", kind)
    if fails:
        tracker.fail.add("r")
    provider = tracker.registry._providers["r"]
    return tracker, provider


@pytest.mark.parametrize("fails", [False, True], ids=["cleanup_ok", "cleanup_fails"])
@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("kind", KINDS)
class TestTwins:
    """
    The scope's inline code and `_lifecycle`, run side by side.
    """

    def test_sync(self, ctx, kind, outcome, fails):
        """
        `Scope.get` and `__exit__` do what `enter` and `leave` do: the same
        resources created and closed, the same exception handed to each
        cleanup, the same errors; an async provider is refused alike.
        """
        tracker, _ = _tracked(kind, fails, ctx)
        error = None
        try:
            with tracker.registry.scope(ctx) as scope:
                scope.get("r")
                _body(outcome)
        except BaseException as e:  # compared below
            error = e
        inline = _outcome(tracker, error)

        tracker, provider = _tracked(kind, fails, ctx)
        error = None
        try:
            result = provider.make(ctx)
            entered = lifecycle.enter(
                result, lifecycle.kind_of(type(result)), "provider of 'r'", FIX
            )
            try:
                _body(outcome)
            except BaseException as e:
                error = e
            errors = []
            fatal = lifecycle.leave(
                entered, provider.close, (type(error), error, None), errors, fix=FIX, what="'r'"
            )
            assert fatal is None
            if errors and error is None:
                error = ExceptionGroup("cleanups", errors)
            elif error is not None:
                error.close_errors = errors
        except BaseException as e:  # compared below
            error = e
        assert _outcome(tracker, error) == inline
        if kind not in SYNC_KINDS:
            assert type(error) is TypeError

    async def test_async(self, ctx, kind, outcome, fails):
        """
        `Scope.aget` and `__aexit__` do what `aenter` and `aleave` do.
        """
        tracker, _ = _tracked(kind, fails, ctx)
        error = None
        try:
            with anyio.CancelScope() as cs:
                async with tracker.registry.scope(ctx) as scope:
                    await scope.aget("r")
                    await _abody(outcome, cs)
        except BaseException as e:  # compared below
            error = e
        inline = _outcome(tracker, error)

        tracker, provider = _tracked(kind, fails, ctx)
        error = None
        try:
            with anyio.CancelScope() as cs:
                result = provider.make(ctx)
                entered = await lifecycle.aenter(
                    result, lifecycle.kind_of(type(result)), "provider of 'r'"
                )
                body_error = None
                try:
                    await _abody(outcome, cs)
                except BaseException as e:
                    body_error = e
                errors = []
                fatal = await lifecycle.aleave(
                    entered,
                    provider.close,
                    (type(body_error), body_error, None),
                    errors,
                    timeout=5.0,
                    what="resource %r",
                    what_args=("r",),
                )
                assert fatal is None
                _raise_as_a_scope(body_error, errors)
        except BaseException as e:  # compared below
            error = e
        assert _outcome(tracker, error) == inline


class TestLeave:
    """
    `leave` and `aleave`: what a sync exit cannot do, and fatal errors.
    """

    async def test_async_resource_left_by_sync_code(self, ctx):
        """
        A resource entered the async way and left by sync code is a cleanup
        error naming it, as the scope reports it; a fatal error of a close
        hook is returned once the other step ran.
        """
        tracker, provider = _tracked("async_gen", False, ctx)
        result = provider.make(ctx)
        entered = await lifecycle.aenter(result, lifecycle.ASYNC_GEN, "provider of 'r'")
        errors = []

        def close(_value):
            raise Fatal

        fatal = lifecycle.leave(entered, close, (None, None, None), errors, fix=FIX, what="'r'")
        assert type(fatal) is Fatal
        assert [str(e) for e in errors] == [
            (
                "'r' (async generator) was entered by async code but left by sync code, so "
                f"its async cleanup cannot run; {FIX}."
            )
        ]
        await result.aclose()  # as the event loop would, at last
        assert tracker.closed == ["r"]

    async def test_fatal_error_of_an_async_close_hook(self, ctx):
        """
        aleave returns a close hook's fatal error once the exit ran, for the
        caller to raise after its other cleanups.
        """
        tracker, provider = _tracked("async_gen", False, ctx)
        result = provider.make(ctx)
        entered = await lifecycle.aenter(result, lifecycle.ASYNC_GEN, "provider of 'r'")
        errors = []

        def close(_value):
            raise Fatal

        fatal = await lifecycle.aleave(
            entered, close, (None, None, None), errors, timeout=5.0, what="resource %r"
        )
        assert (type(fatal), errors, tracker.closed) == (Fatal, [], ["r"])
