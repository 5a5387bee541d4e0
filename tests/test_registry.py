"""
Tests of `Registry` and `Scope`: per-request resources, created on first use,
owned by one user, and cleaned up in reverse order on every path.
"""

# A scope's body and its exit are one block: it is that block that raises or warns.
# ruff: noqa: PT031

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import math
import re
import sys
import threading
import time
import warnings

import anyio
import attrs
import pytest

from anyio.lowlevel import checkpoint

import usercontext as uc
import usercontext._lifecycle as lifecycle

from usercontext import Registry, RegistryStats, UserContext
from usercontext.exceptions import (
    CloseTimeoutError,
    IsolationError,
    NoContextError,
    ScopeClosedError,
    UserContextError,
)


if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


# What a provider may return, and which of those a sync scope accepts. An
# "async_gen_no_await" has no await at all, so its cleanup cannot suspend.
KINDS = ("value", "awaitable", "sync_cm", "async_cm", "gen", "async_gen", "async_gen_no_await")
SYNC_KINDS = ("value", "sync_cm", "gen")
# Async kinds whose cleanup awaits, so that it can be slowed down or hang.
ASYNC_KINDS = ("awaitable", "async_cm", "async_gen")
# Kinds whose cleanup is handed the body's exception (a value's close gets the value only).
EXIT_KINDS = ("sync_cm", "async_cm", "gen", "async_gen", "async_gen_no_await")


class BoomError(Exception):
    """
    An error raised on purpose by a body or a cleanup.
    """


class Fatal(BaseException):
    """
    Stands for a KeyboardInterrupt or SystemExit raised by a cleanup.
    """


class Resource:
    """
    A stand-in resource: it knows its key and user, and how often it was closed.
    """

    def __init__(self, key, user_id):
        self.key = key
        self.user_id = user_id
        self.closed = 0

    def __repr__(self):
        return f"<Resource {self.key!r} of {self.user_id}>"


class SyncOnly:
    """
    A context manager with no async form, entering as *value*.
    """

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return None


class Later:
    """
    An awaitable that, unlike a coroutine, has no close() method.
    """

    def __init__(self, value=None):
        self.value = value

    def __await__(self):
        yield from ()
        return self.value


class _CM:
    def __init__(self, tracker, res):
        self.tracker = tracker
        self.res = res

    def __enter__(self):
        return self.res

    def __exit__(self, exc_type, exc, tb):
        self.tracker.finish(self.res, exc)


class _ACM:
    def __init__(self, tracker, res):
        self.tracker = tracker
        self.res = res

    async def __aenter__(self):
        await checkpoint()
        return self.res

    async def __aexit__(self, exc_type, exc, tb):
        await self.tracker.pause(self.res.key)
        self.tracker.finish(self.res, exc)


class Tracker:
    """
    Registers a provider of a given kind per key, and records in order what
    they create and clean up, and which exception each cleanup was handed.

    Keys in *fail* have a cleanup that raises `BoomError` after closing; keys
    in *hang* have an async cleanup that never ends (their cut is recorded in
    *cut*). Async cleanups sleep *delay* seconds, or pass a checkpoint.
    """

    def __init__(self, registry, *, delay=0.0):
        self.registry = registry
        self.delay = delay
        self.created = []
        self.closed = []
        self.given = {}
        self.times = {}
        self.fail = set()
        self.hang = set()
        self.cut = []

    def make(self, key, c):
        self.created.append(key)
        return Resource(key, c.user_id)

    def finish(self, res, exc=None):
        self.given[res.key] = exc
        res.closed += 1
        self.closed.append(res.key)
        self.times[res.key] = time.monotonic()
        if res.key in self.fail:
            raise BoomError(f"cleanup of {res.key}")

    async def pause(self, key):
        if key in self.hang:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                self.cut.append(key)
                raise
        if self.delay:
            await anyio.sleep(self.delay)
        else:
            await checkpoint()

    def add(self, key, kind):
        """
        Register *key* with a provider of *kind* (one of `KINDS`).
        """
        make, finish, pause = self.make, self.finish, self.pause

        def value(c):
            return make(key, c)

        async def awaitable(c):
            await checkpoint()
            return make(key, c)

        async def aclose(res):
            await pause(key)
            finish(res)

        def gen(c):
            res = make(key, c)
            try:
                yield res
            except BaseException as e:
                finish(res, e)
                raise
            finish(res)

        async def async_gen(c):
            await checkpoint()
            res = make(key, c)
            try:
                yield res
            except BaseException as e:
                await pause(key)
                finish(res, e)
                raise
            await pause(key)
            finish(res)

        async def async_gen_no_await(c):
            res = make(key, c)
            try:
                yield res
            except BaseException as e:
                finish(res, e)
                raise
            finish(res)

        providers = {
            "value": (value, finish),
            "awaitable": (awaitable, aclose),
            "sync_cm": (lambda c: _CM(self, make(key, c)), None),
            "async_cm": (lambda c: _ACM(self, make(key, c)), None),
            "gen": (gen, None),
            "async_gen": (async_gen, None),
            "async_gen_no_await": (async_gen_no_await, None),
        }
        provider, close = providers[kind]
        self.registry.register(key, provider, close=close)


async def _until(predicate, *, timeout=5.0):
    """
    Let other tasks run until *predicate* holds; fail after *timeout*.
    """
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  # polls state that has no event
            await anyio.sleep(0.001)


def _settled(registry):
    """
    Assert that *registry* holds nothing open: no scope, no resource.
    """
    s = registry.stats()
    assert (s.scopes, s.top) == (0, ())


@pytest.fixture(name="registry")
def _registry():
    """
    An empty registry with the default cleanup timeout.
    """
    return Registry()


@pytest.fixture(name="tracker")
def _tracker(registry):
    """
    A tracker registering its providers in *registry*.
    """
    return Tracker(registry)


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
        _settled(registry)

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
        _settled(registry)

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
        _settled(registry)

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
        _settled(registry)

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
        _settled(registry)

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
                await _until(lambda: len(got) == 2)
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
        _settled(registry)

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
        _settled(registry)

    @pytest.mark.parametrize("kind", ["gen", "async_gen"])
    async def test_generator_that_does_not_yield(self, registry, ctx, kind):
        """
        A generator or async generator provider that returns without yielding
        is a RuntimeError naming the key, as contextlib's "generator didn't
        yield".
        """

        def empty(c):
            return
            yield

        async def aempty(c):
            return
            yield

        registry.register("db", empty if kind == "gen" else aempty)
        async with registry.scope(ctx) as scope:
            with pytest.raises(RuntimeError, match="'db'"):
                await scope.aget("db")


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


def _run_in(context, coro):
    """
    Run *coro*, which must not suspend, to its end in *context*; return its
    result.
    """
    try:
        context.run(coro.send, None)
    except StopIteration as e:
        return e.value
    pytest.fail("the coroutine suspended")  # pragma: no cover


def _raises_if(outcome):
    if outcome == "error":
        return pytest.raises(BoomError, match=r"^body")
    return contextlib.nullcontext()


class TestCleanup:
    """
    Cleanup runs for every resource, in reverse order of creation, on every
    path; errors never stop other cleanups and never mask the body's error.
    """

    @pytest.mark.parametrize("outcome", ["success", "error", "cancel"])
    async def test_fifty_in_reverse_order(self, registry, ctx, outcome):
        """
        50 resources of every kind are each closed once, in exactly the reverse
        order of creation, when the body succeeds, raises, or is cancelled from
        an enclosing cancel scope; each cleanup gets the body's exception, and
        async cleanups can still await when the body was cancelled.
        """
        tracker = Tracker(registry, delay=0.001)
        for i in range(50):
            tracker.add(i, KINDS[i % len(KINDS)])

        with anyio.CancelScope() as cs, _raises_if(outcome) as raised:
            async with registry.scope(ctx) as scope:
                got = [await scope.aget(i) for i in range(50)]
                assert registry.stats().top[0] == ("0", 1)
                if outcome == "error":
                    raise BoomError("body")
                if outcome == "cancel":
                    cs.cancel()
                    await anyio.sleep_forever()

        assert tracker.created == list(range(50))
        assert tracker.closed == list(range(49, -1, -1))
        assert [r.closed for r in got] == [1] * 50
        assert cs.cancelled_caught is (outcome == "cancel")
        expected = {
            "success": type(None),
            "error": BoomError,
            "cancel": anyio.get_cancelled_exc_class(),
        }[outcome]
        given = {type(tracker.given[i]) for i in range(50) if KINDS[i % len(KINDS)] in EXIT_KINDS}
        assert given == {expected}
        if outcome == "error":
            assert not hasattr(raised.value, "close_errors")
            assert not hasattr(raised.value, "__notes__")
        s = registry.stats()
        assert (s.opened, s.created, s.close_errors) == (1, 50, 0)
        _settled(registry)

    @pytest.mark.parametrize("outcome", ["success", "error"])
    def test_fifty_in_reverse_order_sync(self, registry, ctx, outcome):
        """
        In a sync scope too, 50 resources of each sync kind are closed once, in
        reverse order, whether the body succeeds or raises.
        """
        tracker = Tracker(registry)
        for i in range(50):
            tracker.add(i, SYNC_KINDS[i % len(SYNC_KINDS)])

        with _raises_if(outcome), registry.scope(ctx) as scope:
            got = [scope.get(i) for i in range(50)]
            if outcome == "error":
                raise BoomError("body")

        assert tracker.closed == list(range(49, -1, -1))
        assert [r.closed for r in got] == [1] * 50
        _settled(registry)

    async def test_three_of_ten_fail_body_succeeds(self, registry, ctx, caplog):
        """
        When 3 of 10 cleanups raise and the body succeeded, the other 7 still
        run, and the 3 errors are raised as one ExceptionGroup, in cleanup
        order, and logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, KINDS[i % len(KINDS)])
        tracker.fail.update({2, 5, 8})

        with pytest.raises(ExceptionGroup) as ei:
            async with registry.scope(ctx) as scope:
                for i in range(10):
                    await scope.aget(i)

        assert tracker.closed == list(range(9, -1, -1))
        group = ei.value
        assert group.message == "3 cleanup(s) of a scope of user 'u-42' failed"
        assert [str(e) for e in group.exceptions] == [f"cleanup of {i}" for i in (8, 5, 2)]
        assert all(type(e) is BoomError for e in group.exceptions)
        assert [r.getMessage() for r in caplog.records] == [
            f"A cleanup of a scope of user 'u-42' failed: BoomError: cleanup of {i}"
            for i in (8, 5, 2)
        ]
        assert registry.stats().close_errors == 3
        _settled(registry)

    async def test_three_of_ten_fail_body_fails(self, registry, ctx, caplog):
        """
        When the body raised too, its exception propagates with its type (an
        `except ValueError` catches it), the 3 cleanup errors attached as notes
        and as `close_errors`, and logged; the other 7 cleanups ran.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, KINDS[i % len(KINDS)])
        tracker.fail.update({2, 5, 8})
        body_error = ValueError("body")
        caught = None

        try:
            async with registry.scope(ctx) as scope:
                for i in range(10):
                    await scope.aget(i)
                raise body_error
        except ValueError as e:
            caught = e

        assert caught is body_error
        assert tracker.closed == list(range(9, -1, -1))
        assert [str(e) for e in caught.close_errors] == [f"cleanup of {i}" for i in (8, 5, 2)]
        assert caught.__notes__ == [
            f"While cleaning up the scope: BoomError: cleanup of {i}" for i in (8, 5, 2)
        ]
        assert [(r.name, r.levelno) for r in caplog.records] == [("usercontext", logging.ERROR)] * 3
        assert registry.stats().close_errors == 3
        _settled(registry)

    def test_three_of_ten_fail_sync(self, registry, ctx, caplog):
        """
        In the sync form, 3 failing cleanups of 10 are raised as one group of
        3 after the other 7 ran.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, SYNC_KINDS[i % len(SYNC_KINDS)])
        tracker.fail.update({3, 5, 7})

        with pytest.raises(ExceptionGroup) as ei, registry.scope(ctx) as scope:
            for i in range(10):
                scope.get(i)

        assert [str(e) for e in ei.value.exceptions] == [f"cleanup of {i}" for i in (7, 5, 3)]
        assert tracker.closed == list(range(9, -1, -1))
        assert len(caplog.records) == 3
        assert registry.stats().close_errors == 3
        _settled(registry)

    def test_three_of_ten_fail_sync_body_fails(self, registry, ctx, caplog):
        """
        In the sync form with no event loop running (a thread, a WSGI app),
        the body's ValueError propagates with the 3 cleanup errors attached
        after the other 7 cleanups ran.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        tracker = Tracker(registry)
        for i in range(10):
            tracker.add(i, SYNC_KINDS[i % len(SYNC_KINDS)])
        tracker.fail.update({3, 5, 7})

        with pytest.raises(ValueError, match=r"^body") as ei, registry.scope(ctx) as scope:
            for i in range(10):
                scope.get(i)
            raise ValueError("body")

        assert [str(e) for e in ei.value.close_errors] == [f"cleanup of {i}" for i in (7, 5, 3)]
        assert len(ei.value.__notes__) == 3
        assert tracker.closed == list(range(9, -1, -1))
        assert len(caplog.records) == 3
        _settled(registry)

    async def test_close_runs_after_a_failing_exit(self, registry, ctx):
        """
        A resource's close still runs when its exit raised, in both forms; both
        errors are reported, exit's first.
        """
        closed = []

        def gen(c):
            yield "db"
            raise BoomError("exit")

        def close(value):
            closed.append(value)
            raise BoomError("close")

        registry.register("db", gen, close=close)
        with pytest.raises(ExceptionGroup) as async_ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
        with pytest.raises(ExceptionGroup) as sync_ei, registry.scope(ctx) as scope:
            scope.get("db")

        assert closed == ["db", "db"]
        for ei in (async_ei, sync_ei):
            assert [str(e) for e in ei.value.exceptions] == ["exit", "close"]
        assert registry.stats().close_errors == 4

    async def test_nested_scopes_add_up_close_errors(self, registry, ctx):
        """
        A body error leaving two nested scopes carries the cleanup errors of
        both, inner first.
        """
        registry.register("inner", lambda c: "inner", close=_fail)
        registry.register("outer", lambda c: "outer", close=_fail)

        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as outer:
                await outer.aget("outer")
                async with registry.scope(ctx) as inner:
                    await inner.aget("inner")
                    raise ValueError("body")

        assert [str(e) for e in ei.value.close_errors] == ["inner", "outer"]
        assert registry.stats().close_errors == 2

    @pytest.mark.parametrize("kind", ["gen", "async_gen"])
    async def test_generator_sees_the_body_error(self, registry, ctx, kind):
        """
        A generator's try/finally runs with the body's exception in flight, as
        under contextlib; re-raising it is no cleanup error. Without an error,
        the finally sees none.
        """
        seen = []

        def gen(c):
            try:
                yield "db"
            finally:
                seen.append(sys.exc_info()[1])

        async def agen(c):
            try:
                yield "db"
            finally:
                seen.append(sys.exc_info()[1])

        registry.register("db", gen if kind == "gen" else agen)
        body_error = ValueError("body")

        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                raise body_error
        async with registry.scope(ctx) as scope:
            await scope.aget("db")

        assert seen == [body_error, None]
        assert ei.value is body_error
        assert not hasattr(body_error, "close_errors")
        assert registry.stats().close_errors == 0

    @pytest.mark.parametrize("kind", ["gen", "async_gen", "sync_cm"])
    async def test_cleanup_cannot_swallow_the_body_error(self, registry, ctx, kind):
        """
        A generator that catches the body's exception and returns, or an exit
        that returns True, does not suppress it: the body's error still
        propagates, and it is no cleanup error.
        """
        swallowed = []

        def gen(c):
            try:
                yield "db"
            except ValueError as e:
                swallowed.append(e)

        async def agen(c):
            try:
                yield "db"
            except ValueError as e:
                swallowed.append(e)

        class Suppressing:
            def __enter__(self):
                return "db"

            def __exit__(self, exc_type, exc, tb):
                swallowed.append(exc)
                return True

        provider = {"gen": gen, "async_gen": agen, "sync_cm": lambda c: Suppressing()}[kind]
        registry.register("db", provider)

        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                raise ValueError("body")

        assert swallowed == [ei.value]
        assert registry.stats().close_errors == 0

    @pytest.mark.parametrize("kind", ["gen", "async_gen"])
    async def test_generator_raising_another_error(self, registry, ctx, kind):
        """
        A generator that answers the body's exception with another one is a
        cleanup error, chained to the body's.
        """

        def gen(c):
            try:
                yield "db"
            except ValueError as e:
                raise BoomError("cleanup") from e

        async def agen(c):
            try:
                yield "db"
            except ValueError as e:
                raise BoomError("cleanup") from e

        registry.register("db", gen if kind == "gen" else agen)
        with pytest.raises(ValueError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                raise ValueError("body")

        [error] = ei.value.close_errors
        assert isinstance(error, BoomError)
        assert error.__cause__ is ei.value
        assert ei.value.__notes__ == ["While cleaning up the scope: BoomError: cleanup"]

    @pytest.mark.parametrize("kind", ["gen", "async_gen"])
    @pytest.mark.parametrize("body_fails", [False, True])
    async def test_generator_yielding_twice(self, registry, ctx, kind, body_fails):
        """
        A generator that yields again instead of finishing is closed (its
        finally runs) and reported as a RuntimeError.
        """
        finished = []

        def gen(c):
            try:
                while True:
                    with contextlib.suppress(ValueError):
                        yield "db"
            finally:
                finished.append(True)

        async def agen(c):
            try:
                while True:
                    with contextlib.suppress(ValueError):
                        yield "db"
            finally:
                finished.append(True)

        registry.register("db", gen if kind == "gen" else agen)
        expected = ExceptionGroup if not body_fails else ValueError
        with pytest.raises(expected) as ei:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                if body_fails:
                    raise ValueError("body")

        errors = ei.value.close_errors if body_fails else ei.value.exceptions
        [error] = errors
        assert type(error) is RuntimeError
        what = "yielded again after an exception" if body_fails else "yielded more than once"
        assert str(error).endswith(f" {what}.")
        assert finished == [True]

    @pytest.mark.parametrize("where", ["sync_close", "async_close", "gen"])
    async def test_fatal_cleanup_error_runs_the_others(self, registry, ctx, where):
        """
        A BaseException that is no Exception (KeyboardInterrupt, SystemExit)
        from one cleanup propagates, but only after every other cleanup ran,
        as with contextlib.ExitStack: nothing is left open.
        """
        closed = []

        def sync_close(value):
            raise Fatal

        async def async_close(value):
            await checkpoint()
            raise Fatal

        def gen(c):
            yield "fatal"
            raise Fatal

        for key in ("a", "b"):
            registry.register(key, lambda c, key=key: key, close=closed.append)
        if where == "gen":
            registry.register("fatal", gen)
        else:
            close = sync_close if where == "sync_close" else async_close
            registry.register("fatal", lambda c: "fatal", close=close)

        with pytest.raises(Fatal):
            async with registry.scope(ctx) as scope:
                for key in ("a", "fatal", "b"):
                    await scope.aget(key)

        assert closed == ["b", "a"]
        _settled(registry)

    @pytest.mark.parametrize("body_fails", [False, True])
    def test_generator_yielding_twice_sync(self, registry, ctx, body_fails):
        """
        In a sync scope too, a generator that yields again instead of
        finishing is closed and reported as a RuntimeError.
        """
        finished = []

        def gen(c):
            try:
                while True:
                    with contextlib.suppress(ValueError):
                        yield "db"
            finally:
                finished.append(True)

        registry.register("db", gen)
        expected = ValueError if body_fails else ExceptionGroup
        with pytest.raises(expected) as ei, registry.scope(ctx) as scope:
            scope.get("db")
            if body_fails:
                raise ValueError("body")

        errors = ei.value.close_errors if body_fails else ei.value.exceptions
        [error] = errors
        assert type(error) is RuntimeError
        what = "yielded again after an exception" if body_fails else "yielded more than once"
        assert str(error).endswith(f" {what}.")
        assert finished == [True]
        _settled(registry)

    def test_fatal_cleanup_error_runs_the_others_sync(self, registry, ctx):
        """
        In a sync scope too, a fatal error from one cleanup does not skip the
        cleanups of resources created before it.
        """
        closed = []

        def fatal(value):
            raise Fatal

        registry.register("a", lambda c: "a", close=closed.append)
        registry.register("fatal", lambda c: "fatal", close=fatal)

        with pytest.raises(Fatal), registry.scope(ctx) as scope:
            scope.get("a")
            scope.get("fatal")

        assert closed == ["a"]
        _settled(registry)


def _fail(value):
    raise BoomError(value)


class TestCleanupUnderPressure:
    """
    Async cleanups are shielded from cancellation and bounded by the
    registry's close_timeout.
    """

    @pytest.mark.parametrize("body", ["succeeds", "cancelled"])
    async def test_cancelled_again_during_cleanup(self, registry, ctx, body):
        """
        Cancelling the request again, and its caller, while its async cleanups
        await does not cut them: all 10 run to the end, in reverse order, and
        the cancellation then takes effect.
        """
        tracker = Tracker(registry, delay=0.01)
        for i in range(10):
            tracker.add(i, ASYNC_KINDS[i % len(ASYNC_KINDS)])
        request_scope = anyio.CancelScope()
        after_cleanup = []

        async def request():
            with request_scope:
                async with registry.scope(ctx) as scope:
                    for i in range(10):
                        await scope.aget(i)
                    if body == "cancelled":
                        request_scope.cancel()
                        await anyio.sleep_forever()
                after_cleanup.append(True)
                await checkpoint()
                after_cleanup.append(False)  # never: the request is cancelled

        async def canceller():
            await _until(lambda: tracker.closed)
            request_scope.cancel()
            outer.cancel()

        start = time.monotonic()
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                tg.start_soon(canceller)

        assert tracker.closed == list(range(9, -1, -1))
        assert time.monotonic() - start >= 10 * 0.01
        assert after_cleanup == ([True] if body == "succeeds" else [])
        assert request_scope.cancelled_caught or outer.cancelled_caught
        _settled(registry)

    @pytest.mark.parametrize("kind", ASYNC_KINDS)
    async def test_hanging_cleanup_cut_at_timeout(self, ctx, caplog, kind):
        """
        A cleanup that hangs is cancelled after close_timeout (0.3 s, give or
        take 0.1 s); the cleanups after it still run, and the
        CloseTimeoutError (a TimeoutError) is raised and logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        registry = Registry(close_timeout=0.3)
        tracker = Tracker(registry)
        tracker.add(0, "gen")
        tracker.add(1, kind)
        tracker.add(2, "async_gen")
        tracker.hang.add(1)

        with pytest.raises(ExceptionGroup) as ei:
            async with registry.scope(ctx) as scope:
                for i in range(3):
                    await scope.aget(i)

        assert tracker.closed == [2, 0]
        assert tracker.cut == [1]
        assert abs(tracker.times[0] - tracker.times[2] - 0.3) <= 0.1
        [error] = ei.value.exceptions
        assert isinstance(error, CloseTimeoutError)
        assert isinstance(error, TimeoutError)
        assert str(error) == (
            "Closing resource 1 took longer than its timeout of 0.3 s and was cut. "
            "Make the cleanup faster or raise the timeout."
        )
        assert [r.getMessage() for r in caplog.records] == [
            f"A cleanup of a scope of user 'u-42' failed: CloseTimeoutError: {error}"
        ]
        assert registry.stats().close_errors == 1
        _settled(registry)

    async def test_hanging_cleanup_with_a_failing_body(self, ctx):
        """
        When the body failed, a cleanup cut at the timeout is attached to the
        body's error; each hanging cleanup gets its own timeout.
        """
        registry = Registry(close_timeout=0.3)
        tracker = Tracker(registry)
        for i in range(3):
            tracker.add(i, "async_gen")
        tracker.hang.update({0, 1})

        start = time.monotonic()
        with pytest.raises(BoomError, match=r"^body") as ei:
            async with registry.scope(ctx) as scope:
                for i in range(3):
                    await scope.aget(i)
                raise BoomError("body")

        assert abs(time.monotonic() - start - 0.6) <= 0.15
        assert tracker.closed == [2]
        assert tracker.cut == [1, 0]
        assert [type(e) for e in ei.value.close_errors] == [CloseTimeoutError] * 2
        assert [str(e).split(" took")[0] for e in ei.value.close_errors] == [
            "Closing resource 1",
            "Closing resource 0",
        ]
        _settled(registry)

    async def test_cancelled_body_with_failing_cleanup(self, registry, ctx, caplog):
        """
        A cancelled body's cancellation propagates unchanged, with no notes;
        a failing cleanup is logged and counted.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")
        registry.register("db", lambda c: "db", close=_fail)
        registry.register("cache", lambda c: "cache")

        cancelled = []

        with anyio.CancelScope() as cs:
            try:
                async with registry.scope(ctx) as scope:
                    await scope.aget("db")
                    await scope.aget("cache")
                    cs.cancel()
                    await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class() as e:
                cancelled.append(e)
                raise

        assert cs.cancelled_caught
        [e] = cancelled
        assert not hasattr(e, "__notes__")
        assert not hasattr(e, "close_errors")
        assert [r.getMessage() for r in caplog.records] == [
            "A cleanup of a scope of user 'u-42' failed: BoomError: db"
        ]
        assert registry.stats().close_errors == 1
        _settled(registry)


class TestCleanupWithoutAwait:
    """
    An async generator whose code has no await cannot suspend in its cleanup,
    so the shielded, bounded cancel scope is left out for it: a cancellation
    could not reach it, nor a deadline cut it. Every other async cleanup is
    shielded from its first step.
    """

    async def test_only_awaiting_cleanups_get_a_cancel_scope(self, registry, ctx):
        """
        The cleanup of an async generator without await sees no deadline of
        its own; one with an await sees the cleanup timeout as its deadline.
        Both run, in reverse order, with the scope's context bound.
        """
        seen = []

        async def no_await(c):
            yield "no_await"
            seen.append(("no_await", anyio.current_effective_deadline(), uc.current()))

        async def awaiting(c):
            yield "awaiting"
            await checkpoint()
            seen.append(("awaiting", anyio.current_effective_deadline(), uc.current()))

        registry.register("awaiting", awaiting)
        registry.register("no_await", no_await)
        async with registry.scope(ctx) as scope:
            await scope.aget("awaiting")
            await scope.aget("no_await")
            start = anyio.current_time()

        [(first, unbounded, ctx1), (second, deadline, ctx2)] = seen
        assert (first, second) == ("no_await", "awaiting")
        assert unbounded == math.inf
        assert 4.0 < deadline - start < 6.0  # the default close_timeout, 5 s
        assert ctx1 is ctx2 is ctx
        _settled(registry)

    async def test_cancelled_body(self, registry, ctx):
        """
        When the body was cancelled, an async generator without await is
        thrown the cancellation and finishes; the cancellation propagates.
        """
        given = []

        async def no_await(c):
            try:
                yield "db"
            except BaseException as e:
                given.append(e)
                raise

        registry.register("db", no_await)
        with anyio.CancelScope() as cs:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                cs.cancel()
                await anyio.sleep_forever()

        assert cs.cancelled_caught
        [e] = given
        assert isinstance(e, anyio.get_cancelled_exc_class())
        assert registry.stats().close_errors == 0
        _settled(registry)

    async def test_provider_switching_generators(self, registry, ctx):
        """
        A provider may return an async generator with an await in one scope
        and one without in the next: each is cleaned up as what it is.
        """
        deadlines = []

        async def no_await(c):
            yield "no_await"
            deadlines.append(anyio.current_effective_deadline())

        async def awaiting(c):
            yield "awaiting"
            await checkpoint()
            deadlines.append(anyio.current_effective_deadline())

        made = iter([awaiting, no_await, awaiting, no_await])

        def provider(c):
            return next(made)(c)

        registry.register("db", provider)
        for expected in ("awaiting", "no_await", "awaiting", "no_await"):
            async with registry.scope(ctx) as scope:
                assert await scope.aget("db") == expected

        assert [d == math.inf for d in deadlines] == [False, True, False, True]
        _settled(registry)

    @pytest.mark.parametrize("first", ["checkpoint_if_cancelled", "sleep", "fail_after"])
    async def test_first_step_of_an_awaiting_cleanup_is_shielded(self, ctx, first):
        """
        An awaiting cleanup runs inside its shielded scope from its first
        step: in a cancelled body it can check for cancellation, sleep, or
        open a cancel scope of its own at once, and it finishes, on both
        loops. Run before the scope was entered, the same first step would
        leave cancel scopes exited out of order (or, on trio, make
        `checkpoint_if_cancelled` fail).
        """
        done = []

        async def cleanup():
            if first == "checkpoint_if_cancelled":
                await anyio.lowlevel.checkpoint_if_cancelled()
                await anyio.sleep(0.01)
            elif first == "sleep":
                await anyio.sleep(0.01)
            else:
                with anyio.fail_after(1):
                    await anyio.sleep(0.01)
            done.append(True)

        async def agen(c):
            try:
                yield "db"
            finally:
                await cleanup()

        registry = Registry(close_timeout=1)
        registry.register("db", agen)
        with anyio.CancelScope() as cs:
            async with registry.scope(ctx) as scope:
                await scope.aget("db")
                cs.cancel()
                await anyio.sleep_forever()

        assert done == [True]
        assert cs.cancelled_caught
        assert registry.stats().close_errors == 0


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


class TestKinds:
    """
    What a provider returns is recognised by its type, through a bounded cache.
    """

    def test_cache_is_bounded(self, registry, ctx, monkeypatch):
        """
        Types beyond the cache's bound are still recognised, just not
        remembered.
        """
        monkeypatch.setattr(lifecycle, "_kinds", {})
        monkeypatch.setattr(lifecycle, "_KINDS_MAX", 2)
        classes = [type(f"Value{i}", (), {}) for i in range(3)]
        for i, cls in enumerate(classes):
            registry.register(i, lambda c, cls=cls: cls())
        registry.register("cm", lambda c: SyncOnly("entered"))

        with registry.scope(ctx) as scope:
            values = [scope.get(i) for i in range(3)]
            assert scope.get("cm") == "entered"

        assert [type(v) for v in values] == classes
        assert list(lifecycle._kinds) == classes[:2]

    def test_provider_switching_kinds(self, registry, ctx):
        """
        A provider may return a different kind of object from one scope to
        the next: each is handled as what it is, not as the one before.
        """
        closed = []

        def gen():
            yield "gen"
            closed.append("gen")

        made = iter([gen, lambda: "value", lambda: SyncOnly("cm"), gen])
        registry.register("db", lambda c: next(made)())
        for expected in ("gen", "value", "cm", "gen"):
            with registry.scope(ctx) as scope:
                assert scope.get("db") == expected

        assert closed == ["gen", "gen"]
        _settled(registry)

    def test_order_of_precedence(self):
        """
        Generators first, then async context managers, context managers,
        awaitables; anything else is a plain value.
        """

        class Both:
            def __enter__(self): ...
            def __exit__(self, *exc): ...
            async def __aenter__(self): ...
            async def __aexit__(self, *exc): ...
            def __await__(self): ...

        def gen():
            yield

        async def agen():
            yield

        assert lifecycle.kind_of(type(gen())) == lifecycle.GEN
        assert lifecycle.kind_of(type(agen())) == lifecycle.ASYNC_GEN
        assert lifecycle.kind_of(Both) == lifecycle.ASYNC_CM
        assert lifecycle.kind_of(SyncOnly) == lifecycle.SYNC_CM
        assert lifecycle.kind_of(Later) == lifecycle.AWAITABLE
        assert lifecycle.kind_of(Resource) == lifecycle.PLAIN


class TestCanSuspend:
    """
    `can_suspend` tells from a code object whether a coroutine or an async
    generator running it may ever await.
    """

    def test_shapes(self):  # noqa: C901  # one function per shape of code
        """
        Any await, async with, async for or async comprehension counts,
        wherever it is (a finally, after the yield); a yield does not, nor an
        await in a nested function.
        """

        async def only_yield():
            yield [i * 2 for i in range(3)]

        async def await_after_yield():
            yield 1
            await checkpoint()

        async def await_in_finally():
            try:
                yield 1
            finally:
                await checkpoint()

        async def async_with(cm):
            async with cm:
                yield 1

        async def async_for(it):
            async for x in it:
                yield x

        async def async_comprehension(it):
            yield [x async for x in it]

        async def nested():
            async def inner():
                await checkpoint()

            yield inner

        async def coroutine():
            return 1

        async def awaiting_coroutine():
            await checkpoint()

        cases = {
            only_yield: False,
            await_after_yield: True,
            await_in_finally: True,
            async_with: True,
            async_for: True,
            async_comprehension: True,
            nested: False,
            coroutine: False,
            awaiting_coroutine: True,
        }
        assert {f: lifecycle.can_suspend(f.__code__) for f in cases} == cases

    def test_cache(self, monkeypatch):
        """
        Answers are cached per code object, up to a bound; an entry is used
        only for the very code object it was made for.
        """

        async def no_await():
            yield 1

        async def awaiting():
            await checkpoint()
            yield 1

        monkeypatch.setattr(lifecycle, "_suspends", {})
        monkeypatch.setattr(lifecycle, "_SUSPENDS_MAX", 1)
        assert lifecycle.can_suspend(no_await.__code__) is False
        assert lifecycle.can_suspend(awaiting.__code__) is True
        assert list(lifecycle._suspends.values()) == [(no_await.__code__, False)]
        assert lifecycle.can_suspend(no_await.__code__) is False

        # An entry under the same id but for another code object is not used.
        lifecycle._suspends[id(awaiting.__code__)] = (no_await.__code__, False)
        assert lifecycle.can_suspend(awaiting.__code__) is True


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
        assert _run_in(contextvars.copy_context(), enter_and_get()) == "u-42"

        _run_in(contextvars.copy_context(), scope.__aexit__(None, None, None))

        assert closed == ["u-42"]
        _settled(registry)

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
