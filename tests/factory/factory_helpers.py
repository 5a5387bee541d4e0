"""
Helpers shared by the tests of `EngineFactory`: engines, creates and closes
that record what happens, and small assertions.
"""

from __future__ import annotations

import contextlib
import itertools

import anyio

from anyio.lowlevel import checkpoint

from usercontext import UserContext
from usercontext.exceptions import (
    CloseTimeoutError,
    QuotaExceededError,
    QuotaTimeoutError,
)

from helpers import BoomError, Fatal, until  # noqa: F401  # re-exported: the tests of this folder import them from here


ids = itertools.count(1)


class Engine:
    """
    A stand-in for an expensive engine: it knows its user and how often it was
    closed.
    """

    def __init__(self, user_id, tag=None):
        self.id = next(ids)
        self.user_id = user_id
        self.tag = tag
        self.closed = 0

    def __repr__(self):
        return f"<Engine #{self.id} of {self.user_id}>"


def user(user_id):
    return UserContext(user_id=user_id, thread_id="t-1", run_id="r-1")


def make_engine(ctx):
    return Engine(ctx.user_id)


def close_engine(engine):
    engine.closed += 1


def settled(factory):
    """
    Assert that *factory* holds nothing: no engine in use, no slot taken, and
    every engine created is closed or idle.
    """
    s = factory.stats()
    assert s.in_use == 0
    assert s.top == ()
    assert s.quota.waiting == 0
    assert s.created == s.closed + s.idle
    assert factory.quota.stats().in_use == 0


def recording_creates(events):
    """
    A create hook of each kind, recording what happens in *events*.
    """

    def value(c):
        events.append("create")
        return Engine(c.user_id)

    async def awaitable(c):
        await checkpoint()
        return value(c)

    @contextlib.asynccontextmanager
    async def async_cm(c):
        engine = value(c)
        await checkpoint()
        yield engine
        events.append("exit")

    @contextlib.contextmanager
    def sync_cm(c):
        yield value(c)
        events.append("exit")

    return {"value": value, "awaitable": awaitable, "async_cm": async_cm, "sync_cm": sync_cm}


def recording_closes(events):
    """
    A sync and an async close hook, recording in *events*.
    """

    def sync(engine):
        engine.closed += 1
        events.append("close")

    async def async_(engine):
        await checkpoint()
        sync(engine)

    return {"sync": sync, "async": async_}


class FailFirst:
    """
    Hooks failing as *path* says, for the first engine only.
    """

    def __init__(self, path):
        self.path = path
        self.calls = 0

    def create(self, c):
        self.calls += 1
        if self.calls > 1:
            return Engine(c.user_id)
        return getattr(self, f"_{self.path}", self._ok)(c)

    def _ok(self, c):
        return Engine(c.user_id, "first")

    def _create_fails(self, c):
        raise BoomError("create")

    async def _async_create_fails(self, c):
        await checkpoint()
        raise BoomError("create")

    @contextlib.asynccontextmanager
    async def _enter_fails(self, c):
        raise BoomError("enter")
        yield  # a generator, so a context manager

    @contextlib.asynccontextmanager
    async def _exit_raises(self, c):
        yield Engine(c.user_id, "first")
        raise BoomError("exit")

    async def close(self, engine):
        if engine.tag == "first" and self.path == "close_raises":
            raise BoomError("close")
        if engine.tag == "first" and self.path == "close_hangs":
            await anyio.sleep_forever()
        engine.closed += 1


async def body(path, outer):
    if path == "body_fails":
        raise BoomError("body")
    if path == "body_cancelled":
        outer.cancel()
        await checkpoint()


# path -> (the error raised, or None; created, closed, create_errors, close_errors)
PATHS = {
    "create_fails": ("create", 0, 0, 1, 0),
    "async_create_fails": ("create", 0, 0, 1, 0),
    "enter_fails": ("enter", 0, 0, 1, 0),
    "body_fails": ("body", 1, 1, 0, 0),
    "body_cancelled": (None, 1, 1, 0, 0),
    "close_raises": ("close", 1, 1, 0, 1),
    "exit_raises": ("exit", 1, 1, 0, 1),
    "close_hangs": (CloseTimeoutError, 1, 1, 0, 1),
}


def sync_gen(c, behaviour):
    """
    A generator create whose cleanup behaves as *behaviour* says.
    """
    try:
        yield Engine(c.user_id)
    except KeyError:
        if behaviour == "reraise":
            raise
        if behaviour == "other":
            raise BoomError("cleanup") from None
        if behaviour == "again":
            yield None
        return
    if behaviour == "other":
        raise BoomError("cleanup")
    yield None  # "again" after a good body: yields twice


async def async_gen(c, behaviour):
    """
    The async twin of `sync_gen`.
    """
    try:
        yield Engine(c.user_id)
    except KeyError:
        if behaviour == "reraise":
            raise
        if behaviour == "other":
            raise BoomError("cleanup") from None
        if behaviour == "again":
            yield None
        return
    if behaviour == "other":
        raise BoomError("cleanup")
    yield None


# (behaviour, body fails) -> (error raised, what its note or message says, close_errors)
GEN_CASES = {
    ("swallow", True): (KeyError, "", 0),
    ("reraise", True): (KeyError, "", 0),
    ("other", True): (KeyError, "BoomError: cleanup", 1),
    ("again", True): (KeyError, "yielded again after an exception", 1),
    ("again", False): (RuntimeError, "yielded more than once", 1),
    ("other", False): (BoomError, "cleanup", 1),
}


def try_sync(factory, ctx):
    try:
        with factory.engine(ctx):
            return "ok"
    except (QuotaExceededError, QuotaTimeoutError) as e:
        return e
