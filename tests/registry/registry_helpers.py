"""
Helpers shared by the tests of `Registry` and `Scope`: providers of every kind,
a tracker of what they create and clean up, and small assertions.
"""

from __future__ import annotations

import contextlib
import time

import anyio
import pytest

from anyio.lowlevel import checkpoint

from helpers import BoomError, Fatal, until  # noqa: F401  # re-exported: the tests of this folder import them from here


# What a provider may return, and which of those a sync scope accepts. An
# "async_gen_no_await" has no await at all, so its cleanup cannot suspend.
KINDS = ("value", "awaitable", "sync_cm", "async_cm", "gen", "async_gen", "async_gen_no_await")


SYNC_KINDS = ("value", "sync_cm", "gen")


# Async kinds whose cleanup awaits, so that it can be slowed down or hang.
ASYNC_KINDS = ("awaitable", "async_cm", "async_gen")


# Kinds whose cleanup is handed the body's exception (a value's close gets the value only).
EXIT_KINDS = ("sync_cm", "async_cm", "gen", "async_gen", "async_gen_no_await")


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


class CM:
    def __init__(self, tracker, res):
        self.tracker = tracker
        self.res = res

    def __enter__(self):
        return self.res

    def __exit__(self, exc_type, exc, tb):
        self.tracker.finish(self.res, exc)


class ACM:
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
            "sync_cm": (lambda c: CM(self, make(key, c)), None),
            "async_cm": (lambda c: ACM(self, make(key, c)), None),
            "gen": (gen, None),
            "async_gen": (async_gen, None),
            "async_gen_no_await": (async_gen_no_await, None),
        }
        provider, close = providers[kind]
        self.registry.register(key, provider, close=close)


def settled(registry):
    """
    Assert that *registry* holds nothing open: no scope, no resource.
    """
    s = registry.stats()
    assert (s.scopes, s.top) == (0, ())


def run_in(context, coro):
    """
    Run *coro*, which must not suspend, to its end in *context*; return its
    result.
    """
    try:
        context.run(coro.send, None)
    except StopIteration as e:
        return e.value
    pytest.fail("the coroutine suspended")  # pragma: no cover


def raises_if(outcome):
    if outcome == "error":
        return pytest.raises(BoomError, match=r"^body")
    return contextlib.nullcontext()


def fail(value):
    raise BoomError(value)
