"""
Benchmarks of `Registry` scopes beside svcs and dishka doing the same job: a
request opens a scope (a container), gets one resource from a generator
provider, and closes it.

Every timed call serves ``BATCH`` (1,000) requests, so a time per call read
one unit down is the time per request: milliseconds as microseconds. Each
group holds ours and one rival (``--benchmark-group-by=group``), so the ratio
in parentheses beside the slower one is the ratio its target constrains (when
ours is the faster, the target ratio is the inverse of the rival's).

svcs and dishka are benchmark-only dependencies: without them their groups
are skipped.
"""

from __future__ import annotations

import asyncio
import warnings

from collections.abc import Iterator  # noqa: TC003  # dishka reads annotations at runtime

import pytest

import usercontext as uc


with warnings.catch_warnings():
    # svcs imports its Starlette integration when Starlette is installed, and
    # Starlette's test client warns on import about its httpx backend.
    warnings.simplefilter("ignore", DeprecationWarning)
    svcs = pytest.importorskip("svcs")
    dishka = pytest.importorskip("dishka")


BATCH = 1_000


class Session:
    """
    The per-request resource: made, handed out, closed.
    """

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


@pytest.fixture(name="loop", scope="module")
def _loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(name="ctx")
def _ctx():
    return uc.UserContext(user_id="u-42", thread_id="t-7", run_id="r-1")


def _ours_sync(benchmark, ctx):
    made: list[Session] = []

    def session(_ctx):
        s = Session()
        made.append(s)
        yield s
        s.closed = True

    registry = uc.Registry()
    registry.register(Session, session)

    def batch():
        made.clear()
        for _ in range(BATCH):
            with registry.scope(ctx) as scope:
                scope.get(Session)

    benchmark(batch)
    assert len(made) == BATCH
    assert all(s.closed for s in made)
    stats = registry.stats()
    assert (stats.scopes_open, stats.resources_open, stats.cleanup_errors) == (0, (), 0)


@pytest.mark.benchmark(group="registry: sync scope, one generator resource, vs svcs")
def test_svcs_sync(benchmark):
    """
    svcs: a `svcs.Container` per request, `container.get(T)` from a generator
    factory, then `container.close()`.
    """
    made: list[Session] = []

    def session():
        s = Session()
        made.append(s)
        yield s
        s.closed = True

    registry = svcs.Registry()
    registry.register_factory(Session, session)

    def batch():
        made.clear()
        for _ in range(BATCH):
            container = svcs.Container(registry)
            container.get(Session)
            container.close()

    benchmark(batch)
    assert len(made) == BATCH
    assert all(s.closed for s in made)


@pytest.mark.benchmark(group="registry: sync scope, one generator resource, vs svcs")
def test_registry_sync_vs_svcs(benchmark, ctx):
    """
    `with registry.scope(ctx) as scope: scope.get(T)` from a generator
    provider, which also binds ctx for the request. Target: <= 0.35x svcs.
    """
    _ours_sync(benchmark, ctx)


@pytest.mark.benchmark(group="registry: sync scope, one generator resource, vs dishka")
def test_dishka_sync(benchmark):
    """
    dishka: a `Provider` with a generator `provide` at REQUEST scope; the
    app container is entered once per request and asked for the resource.
    """
    made: list[Session] = []

    class SessionProvider(dishka.Provider):
        @dishka.provide(scope=dishka.Scope.REQUEST)
        def session(self) -> Iterator[Session]:
            s = Session()
            made.append(s)
            yield s
            s.closed = True

    container = dishka.make_container(SessionProvider())

    def batch():
        made.clear()
        for _ in range(BATCH):
            with container() as request:
                request.get(Session)

    benchmark(batch)
    container.close()
    assert len(made) == BATCH
    assert all(s.closed for s in made)


@pytest.mark.benchmark(group="registry: sync scope, one generator resource, vs dishka")
def test_registry_sync_vs_dishka(benchmark, ctx):
    """
    The same sync scope as against svcs. Target: <= 0.55x dishka.
    """
    _ours_sync(benchmark, ctx)


@pytest.mark.benchmark(group="registry: async scope, one async generator resource, vs svcs")
def test_svcs_async(benchmark, loop):
    """
    svcs: a container per request, `await container.aget(T)` from an async
    generator factory, then `await container.aclose()`.
    """
    made: list[Session] = []

    async def session():
        s = Session()
        made.append(s)
        yield s
        s.closed = True

    registry = svcs.Registry()
    registry.register_factory(Session, session)

    async def batch():
        made.clear()
        for _ in range(BATCH):
            container = svcs.Container(registry)
            await container.aget(Session)
            await container.aclose()

    benchmark(lambda: loop.run_until_complete(batch()))
    assert len(made) == BATCH
    assert all(s.closed for s in made)


@pytest.mark.benchmark(group="registry: async scope, one async generator resource, vs svcs")
def test_registry_async(benchmark, loop, ctx):
    """
    `async with registry.scope(ctx) as scope: await scope.aget(T)` from an
    async generator provider, cleaned up shielded and under the cleanup
    timeout. Target: <= 0.5x svcs.
    """
    made: list[Session] = []

    async def session(_ctx):
        s = Session()
        made.append(s)
        yield s
        s.closed = True

    registry = uc.Registry()
    registry.register(Session, session)

    async def batch():
        made.clear()
        for _ in range(BATCH):
            async with registry.scope(ctx) as scope:
                await scope.aget(Session)

    benchmark(lambda: loop.run_until_complete(batch()))
    assert len(made) == BATCH
    assert all(s.closed for s in made)
    stats = registry.stats()
    assert (stats.scopes_open, stats.resources_open, stats.cleanup_errors) == (0, (), 0)
