"""
Tests of how a provider's result is classified (`kind_of`) and whether an
async generator can suspend (`can_suspend`).
"""

from __future__ import annotations

from anyio.lowlevel import checkpoint
from registry_helpers import (
    Later,
    Resource,
    SyncOnly,
    settled,
)

import usercontext._lifecycle as lifecycle


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
        settled(registry)

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
