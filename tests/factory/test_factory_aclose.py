"""
Tests of `EngineFactory.aclose` and `async with factory`: closing with
bodies still running.
"""

from __future__ import annotations

import math
import time

import anyio
import pytest

from factory_helpers import (
    Engine,
    close_engine,
    make_engine,
    settled,
    until,
)

from usercontext import EngineFactory
from usercontext.exceptions import (
    FactoryClosedError,
)


class TestAclose:
    """
    `EngineFactory.aclose`: stop, let running bodies finish, close everything.
    """

    async def test_no_engine_after_aclose(self, ctx):
        """
        After aclose(), engine() raises FactoryClosedError at once and takes
        nothing; calling aclose() again is fine.
        """
        calls = []
        factory = EngineFactory(calls.append)
        await factory.aclose()
        with pytest.raises(FactoryClosedError, match="is closed and creates no more engines"):
            async with factory.engine(ctx):
                pass
        assert isinstance(FactoryClosedError(), RuntimeError)
        assert calls == []
        assert factory.quota.stats().granted == 0
        await factory.aclose()
        with pytest.raises(ValueError, match="timeout must be >= 0 seconds"):
            await factory.aclose(timeout=-1)

    async def test_running_bodies_get_the_timeout_then_are_cancelled(self, ctx, other_ctx):
        """
        Bodies running at aclose(timeout=t) get t seconds to finish; those still
        running are cancelled and see FactoryClosedError; all engines are closed
        and a second aclose() returns at once.
        """
        factory = EngineFactory(make_engine, close=close_engine)
        results = {}
        engines = []

        async def use(name, c, duration):
            try:
                async with factory.engine(c) as engine:
                    engines.append(engine)
                    await anyio.sleep(duration)
            except FactoryClosedError as e:
                results[name] = e
            else:
                results[name] = "ok"

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, "quick", ctx, 0.1)
            tg.start_soon(use, "stuck", other_ctx, math.inf)
            await until(lambda: factory.stats().in_use == 2)
            start = time.perf_counter()
            await factory.aclose(timeout=0.3)
            elapsed = time.perf_counter() - start
            assert factory.stats().in_use == 0

        assert 0.3 <= elapsed < 0.5
        assert results["quick"] == "ok"
        assert isinstance(results["stuck"], FactoryClosedError)
        assert str(results["stuck"]) == (
            "The EngineFactory was closed while user 'u-99' used an engine; the body was "
            "cancelled because the factory's close timeout of 0.3 s passed."
        )
        assert [e.closed for e in engines] == [1, 1]
        s = factory.stats()
        assert (s.created, s.closed, s.deadline_errors) == (2, 2, 0)
        settled(factory)
        start = time.perf_counter()
        await factory.aclose(timeout=5)
        assert time.perf_counter() - start < 0.1

    async def test_bodies_finishing_in_time(self, ctx):
        """
        aclose() returns as soon as the last running body finishes.
        """
        factory = EngineFactory(make_engine)

        async def use():
            async with factory.engine(ctx):
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            await until(lambda: factory.stats().in_use == 1)
            start = time.perf_counter()
            await factory.aclose(timeout=5)
            assert time.perf_counter() - start < 1
        settled(factory)

    async def test_request_waiting_for_a_slot(self, ctx):
        """
        A request still waiting for a slot when the factory closes gets
        FactoryClosedError once the slot frees, and creates nothing.
        """
        factory = EngineFactory(make_engine, per_user=1)
        results = []

        async def use(hold):
            try:
                async with factory.engine(ctx):
                    await anyio.sleep(hold)
            except FactoryClosedError as e:
                results.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, math.inf)
            await until(lambda: factory.stats().in_use == 1)
            tg.start_soon(use, 0)
            await until(lambda: factory.stats().quota.waiting == 1)
            await factory.aclose(timeout=0.05)
        assert len(results) == 2
        s = factory.stats()
        assert (s.created, s.closed) == (1, 1)
        settled(factory)

    async def test_engine_being_created_during_aclose(self, ctx):
        """
        A request whose engine is being created while aclose() runs never runs
        its body: it sees FactoryClosedError, and aclose() returns only once
        that engine is closed too.
        """
        events = []

        async def create(c):
            await anyio.sleep(0.2)
            return Engine(c.user_id)

        def close(engine):
            events.append("closed")

        factory = EngineFactory(create, close=close)
        outcome = []

        async def use():
            try:
                async with factory.engine(ctx):
                    events.append("body")
            except FactoryClosedError:
                outcome.append("refused")

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            await anyio.sleep(0.05)
            await factory.aclose(timeout=0.05)
            events.append("aclose returned")
        assert "body" not in events
        assert outcome == ["refused"]
        assert events == ["closed", "aclose returned"]
        settled(factory)


class TestFactoryAsContextManager:
    """
    `async with factory:`, the factory's repr, and what it holds as it closes.
    """

    async def test_async_with_closes_on_exit(self, ctx):
        """
        `async with factory:` gives the factory and closes it on exit: its
        idle engines are closed, and it creates no more engines.
        """
        closed = []
        async with EngineFactory(make_engine, close=closed.append, pool_idle=1) as factory:
            async with factory.engine(ctx) as engine:
                pass
            assert (factory.stats().idle, closed) == (1, [])
        assert closed == [engine]
        assert factory.stats().idle == 0
        with pytest.raises(FactoryClosedError):
            async with factory.engine(ctx):
                pass

    async def test_aclose_takes_timeout_by_keyword(self):
        """
        aclose's timeout is a keyword, as on every holder that closes.
        """
        factory = EngineFactory(make_engine)
        with pytest.raises(TypeError):
            await factory.aclose(5)  # type: ignore[misc]
        await factory.aclose(timeout=5)

    async def test_repr(self, ctx):
        """
        The repr names the create function, the state, and the engines in
        use and idle.
        """
        factory = EngineFactory(make_engine, pool_idle=1)
        assert repr(factory) == "<usercontext.EngineFactory(make_engine, open, in_use=0, idle=0)>"
        async with factory.engine(ctx):
            assert repr(factory) == (
                "<usercontext.EngineFactory(make_engine, open, in_use=1, idle=0)>"
            )
        await factory.aclose()
        assert repr(factory) == "<usercontext.EngineFactory(make_engine, closed, in_use=0, idle=0)>"
        assert repr(EngineFactory(object)) == (
            "<usercontext.EngineFactory(object, open, in_use=0, idle=0)>"
        )
        assert repr(EngineFactory(lambda c: c)).startswith(
            "<usercontext.EngineFactory(TestFactoryAsContextManager.test_repr.<locals>.<lambda>, "
        )
