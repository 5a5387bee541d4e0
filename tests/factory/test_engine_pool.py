"""
Tests of the idle pool: engines reused by the same user only, reset,
bounded, and closed when stale.
"""

from __future__ import annotations

import logging

import anyio
import pytest

from anyio.lowlevel import checkpoint
from factory_helpers import (
    BoomError,
    close_engine,
    make_engine,
    settled,
    until,
    user,
)

from usercontext import EngineFactory


class TestPool:
    """
    Idle engines kept for reuse by the same user only.
    """

    async def test_reused_by_the_same_user_only(self, ctx, other_ctx):
        """
        With pool_idle=1 each user gets back their own engine and never another
        user's; created == closed + idle throughout.
        """
        factory = EngineFactory(make_engine, close=close_engine, pool_idle=1)
        seen = []
        for c in (ctx, ctx, other_ctx, ctx, other_ctx, ctx):
            async with factory.engine(c) as engine:
                assert engine.user_id == c.user_id
                seen.append((c.user_id, engine.id))
        by_user = {user: {i for u, i in seen if u == user} for user, _ in seen}
        assert {user: len(ids) for user, ids in by_user.items()} == {"u-42": 1, "u-99": 1}
        assert by_user["u-42"].isdisjoint(by_user["u-99"])
        s = factory.stats()
        assert (s.created, s.reused, s.idle, s.closed) == (2, 4, 2, 0)
        settled(factory)

        await factory.aclose()
        s = factory.stats()
        assert (s.idle, s.closed) == (0, 2)
        settled(factory)

    async def test_up_to_pool_idle_per_user(self, ctx):
        """
        At most pool_idle engines of a user are parked; the rest are closed.
        """
        factory = EngineFactory(make_engine, close=close_engine, per_user=3, pool_idle=2)
        gate = anyio.Event()
        engines = []

        async def use():
            async with factory.engine(ctx) as engine:
                engines.append(engine)
                await gate.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(use)
            await until(lambda: len(engines) == 3)
            gate.set()
        assert sorted(e.closed for e in engines) == [0, 0, 1]
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (3, 1, 2)
        parked = {e.id for e in engines if not e.closed}
        for _ in range(2):
            async with factory.engine(ctx) as engine:
                assert engine.id in parked
        assert factory.stats().reused == 2
        settled(factory)
        await factory.aclose()

    @pytest.mark.parametrize("reset_kind", ["sync", "async"])
    async def test_reset_before_parking(self, ctx, reset_kind):
        """
        reset (sync or async) is called on an engine before it is parked, not on
        an engine whose body failed (that one is closed).
        """
        resets = []
        if reset_kind == "sync":
            reset = resets.append
        else:

            async def reset(engine):
                await checkpoint()
                resets.append(engine)

        factory = EngineFactory(make_engine, close=close_engine, pool_idle=1, reset=reset)
        async with factory.engine(ctx) as engine:
            assert resets == []
        assert resets == [engine]
        assert factory.stats().idle == 1
        with pytest.raises(BoomError):
            async with factory.engine(ctx) as again:
                raise BoomError
        assert again is engine
        assert resets == [engine]
        assert engine.closed == 1
        assert factory.stats().idle == 0
        settled(factory)

    async def test_failing_reset_closes_the_engine(self, ctx, caplog):
        """
        An engine whose reset fails is closed instead of parked, with a warning,
        and the next request gets a new engine.
        """
        caplog.set_level(logging.WARNING, logger="usercontext")

        def reset(engine):
            raise BoomError("dirty")

        factory = EngineFactory(make_engine, close=close_engine, pool_idle=1, reset=reset)
        async with factory.engine(ctx) as first:
            pass
        assert first.closed == 1
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
            (logging.WARNING, "Resetting an engine for reuse failed, closing it: BoomError: dirty")
        ]
        async with factory.engine(ctx) as second:
            assert second is not first
        s = factory.stats()
        assert (s.created, s.closed, s.idle, s.reused) == (2, 2, 0, 0)

    async def test_stale_idle_engines_closed(self, ctx, other_ctx):
        """
        Idle engines parked longer than idle_ttl are closed when an engine is
        next given back; fresher ones stay.
        """
        factory = EngineFactory(make_engine, close=close_engine, pool_idle=1, idle_ttl=0.2)
        async with factory.engine(ctx) as old:
            pass
        await anyio.sleep(0.25)
        async with factory.engine(other_ctx) as fresh:
            pass
        assert old.closed == 1
        assert fresh.closed == 0
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (2, 1, 1)
        async with factory.engine(other_ctx) as again:
            assert again is fresh
        assert factory.stats().idle == 1
        settled(factory)
        await factory.aclose()

    async def test_stale_idle_engines_closed_on_the_way_out(self, ctx, other_ctx):
        """
        An idle engine that turns stale while another user's body runs is
        closed when that body's engine is given back.
        """
        factory = EngineFactory(make_engine, close=close_engine, pool_idle=1, idle_ttl=0.2)
        async with factory.engine(ctx) as old:
            pass
        async with factory.engine(other_ctx):
            assert old.closed == 0  # fresh when this engine was taken
            await anyio.sleep(0.25)
        assert old.closed == 1
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (2, 1, 1)
        await factory.aclose()
        settled(factory)

    async def test_stale_idle_engine_never_handed_out(self, ctx):
        """
        An idle engine older than idle_ttl is not handed out again: the user gets
        a new engine and the stale one is closed.
        """
        factory = EngineFactory(make_engine, close=close_engine, pool_idle=1, idle_ttl=0.1)
        async with factory.engine(ctx) as old:
            pass
        await anyio.sleep(0.15)
        async with factory.engine(ctx) as new:
            assert new is not old
        assert old.closed == 1
        assert factory.stats().reused == 0
        await factory.aclose()

    async def test_pool_max_closes_the_oldest(self):
        """
        Beyond pool_max idle engines over all users, the oldest is closed.
        """
        factory = EngineFactory(make_engine, close=close_engine, pool_idle=2, pool_max=2)
        engines = {}
        for user_id in ("u-1", "u-2", "u-3"):
            async with factory.engine(user(user_id)) as engine:
                engines[user_id] = engine
        assert {u: e.closed for u, e in engines.items()} == {"u-1": 1, "u-2": 0, "u-3": 0}
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (3, 1, 2)
        settled(factory)
        await factory.aclose()
        assert [e.closed for e in engines.values()] == [1, 1, 1]

    async def test_pool_max_evicts_one_of_a_users_engines(self, ctx, other_ctx):
        """
        Eviction by pool_max takes a user's oldest idle engine and keeps the rest
        of that user's idle engines for reuse.
        """
        factory = EngineFactory(
            make_engine, close=close_engine, per_user=2, pool_idle=2, pool_max=2
        )
        gate = anyio.Event()
        engines = []

        async def use(c):
            async with factory.engine(c) as engine:
                engines.append(engine)
                await gate.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(use, ctx)
            tg.start_soon(use, ctx)
            await until(lambda: len(engines) == 2)
            gate.set()
        async with factory.engine(other_ctx) as newest:
            pass
        assert sorted(e.closed for e in engines) == [0, 1]
        assert newest.closed == 0
        (kept,) = (e for e in engines if not e.closed)
        async with factory.engine(ctx) as engine:
            assert engine is kept
        s = factory.stats()
        assert (s.created, s.closed, s.idle, s.reused) == (3, 1, 2, 1)
        await factory.aclose()
        settled(factory)

    async def test_sweep_can_empty_the_pool(self, ctx, other_ctx):
        """
        When every idle engine is stale and the engine given back is not parked
        (its body failed), the pool ends up empty.
        """
        factory = EngineFactory(make_engine, close=close_engine, pool_idle=1, idle_ttl=0.1)
        async with factory.engine(other_ctx) as stale:
            pass
        await anyio.sleep(0.15)
        with pytest.raises(BoomError):
            async with factory.engine(ctx) as failed:
                raise BoomError
        assert (stale.closed, failed.closed) == (1, 1)
        s = factory.stats()
        assert (s.created, s.closed, s.idle) == (2, 2, 0)
        assert (len(factory._pool), factory._pool._by_user) == (0, {})

    async def test_other_users_close_errors_stay_theirs(self, ctx, other_ctx, caplog):
        """
        When a request's exit closes another user's idle engine (stale or evicted)
        and that close fails, the request does not see the error (it is not its
        engine, and the error may carry the other user's data); it is logged.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            if engine.user_id == "u-99":
                raise RuntimeError("secret of u-99")

        factory = EngineFactory(make_engine, close=close, pool_idle=1, idle_ttl=0.1)
        async with factory.engine(other_ctx):
            pass
        await anyio.sleep(0.15)
        async with factory.engine(ctx):
            pass  # must not raise u-99's close error
        assert any("secret of u-99" in r.getMessage() for r in caplog.records)

        factory = EngineFactory(make_engine, close=close, pool_idle=1, pool_max=1)
        async with factory.engine(other_ctx):
            pass
        async with factory.engine(ctx):
            pass  # evicts u-99's engine, whose close fails: not u-42's business
        await factory.aclose()

    async def test_aclose_closes_idle_engines(self, ctx, other_ctx, caplog):
        """
        aclose() closes every idle engine, logging (not raising) close errors.
        """
        caplog.set_level(logging.ERROR, logger="usercontext")

        def close(engine):
            engine.closed += 1
            if engine.user_id == "u-99":
                raise RuntimeError("close")

        factory = EngineFactory(make_engine, close=close, per_user=2, pool_idle=2)
        gate = anyio.Event()
        engines = []

        async def use(c):
            async with factory.engine(c) as engine:
                engines.append(engine)
                await gate.wait()

        async with anyio.create_task_group() as tg:
            for c in (ctx, ctx, other_ctx):
                tg.start_soon(use, c)
            await until(lambda: len(engines) == 3)
            gate.set()
        assert factory.stats().idle == 3
        await factory.aclose()
        assert [e.closed for e in engines] == [1, 1, 1]
        assert [r.getMessage() for r in caplog.records] == [
            "Closing an idle engine of user 'u-99' failed: RuntimeError: close"
        ]
        s = factory.stats()
        assert (s.created, s.closed, s.idle, s.close_errors) == (3, 3, 0, 1)
        settled(factory)
